#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

pub mod backoff;
pub mod blocking;
pub mod check;
#[cfg(feature = "tokio-codec")]
pub mod codec;
pub mod envelope;
pub mod frame;
pub mod handshake;
pub mod message;
#[cfg(feature = "net")]
pub mod net;
pub mod raw;
pub mod token;

mod de;
mod enc;
mod error;
mod mpack;

pub use backoff::Backoff;
pub use error::{DecodeError, EncodeError, ErrorCode};
pub use message::Message;
pub use token::{Token, TokenError};

/// The variable that tells a driver which file descriptor is its socket to the shim
/// (PROTOCOL.md §7); the control token's variable is [`token::TOKEN_ENV`].
///
/// ```
/// assert_eq!(driver_protocol::FD_ENV, "AGENT_SHIM_FD");
/// ```
pub const FD_ENV: &str = "AGENT_SHIM_FD";

/// The protocol's name, sent in every `hello`.
pub const PROTOCOL_NAME: &str = "agent-shim";

/// Every protocol version this crate speaks, lowest first.
pub const SUPPORTED_VERSIONS: &[u32] = &[1];

/// The default maximum frame length: 16 MiB of MessagePack body.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

/// The deepest nesting of arrays and maps a message body may have.
///
/// A message's own map is level 1, so a field's value may nest 63 more levels. The `event`
/// value of an `event` envelope is itself a message and counts from its own map, so relaying
/// an event never makes it too deep. Deeper bodies are [`ErrorCode::Malformed`]: the limit
/// keeps a hostile `[[[[…` from exhausting the receiver's stack.
pub const MAX_DEPTH: usize = 64;
