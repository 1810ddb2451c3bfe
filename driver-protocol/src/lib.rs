#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

pub mod message;

mod error;
mod raw;

pub use error::{DecodeError, EncodeError, ErrorCode};
pub use message::Message;

/// The protocol's name, sent in every `hello`.
pub const PROTOCOL_NAME: &str = "agent-shim";

/// Every protocol version this crate speaks, lowest first.
pub const SUPPORTED_VERSIONS: &[u32] = &[1];

/// The default maximum frame length: 16 MiB of MessagePack body.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;
