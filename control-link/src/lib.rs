#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod addr;
mod attach;
mod client;
mod error;
mod events;
mod fleet;
mod fs;
mod link;
mod listener;
mod options;
#[cfg(feature = "schema")]
mod outcome;
mod output;
mod random;
mod session;
mod shared;
mod spec;
mod token;
mod wake;

pub use driver_protocol as protocol;
pub use driver_protocol::message::{ExecStarted, Reading, RequestId, Seq, StatusReply};

/// The durable consumer a [`Client`] or [`Fleet`] is unless told otherwise
/// ([`ConnectOptions::consumer`], [`ConnectOptions::observer`]).
pub const DEFAULT_CONSUMER: &str = "control";
pub use driver_protocol::ErrorCode;

pub use attach::{AttachItem, AttachStream};
pub use client::{connect, Client};
pub use driver_protocol::net::{Addr, AddrError};
pub use error::Error;
pub use events::{AgentId, EventStream, RawEvent, RawEventStream};
pub use fleet::{Fleet, FleetEvents};
pub use fs::{Files, FsReader, WriteOptions};
pub use listener::Listener;
pub use options::{AckMode, Backoff, ConnectOptions, CursorFn};
#[cfg(feature = "schema")]
pub use outcome::{SchemaError, TaskOutcome};
pub use spec::{ExecSpec, Sig, Target, TaskSpec};
pub use token::{Token, TOKEN_ENV};
pub use wake::{WakeError, WakeHook};
