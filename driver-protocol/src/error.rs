//! Errors of the protocol crate, and the stable error codes that travel on the wire.
//!
//! Two different things live here. [`ErrorCode`] is part of the protocol: the `code` field of
//! an `error` message, a stable lowercase string a driver in any language can match on.
//! [`DecodeError`] and [`EncodeError`] are this crate's Rust errors; each maps to the
//! [`ErrorCode`] a peer should be told about through [`DecodeError::code`].

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The `code` of an `error` message: a stable string, matched by peers in every language.
///
/// Codes this version does not know decode to [`ErrorCode::Other`] and keep their text, so a
/// newer peer's codes are shown rather than rejected.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// No protocol version is spoken by both sides (`unsupported_version`).
    UnsupportedVersion,
    /// A frame's length prefix exceeds the receiver's limit (`frame_too_large`).
    FrameTooLarge,
    /// The frame is not a MessagePack map with a string `type`, or a field has the wrong
    /// type (`malformed`).
    Malformed,
    /// The `type` is unknown, or not valid on this link or in this direction (`unsupported`).
    Unsupported,
    /// Authentication failed or is missing (`unauthorized`).
    Unauthorized,
    /// Well-formed, but a value is not acceptable: an empty argv, an unknown signal name
    /// (`invalid`).
    Invalid,
    /// The request cannot be honoured in the current state, e.g. `resume` when not paused
    /// (`invalid_state`).
    InvalidState,
    /// The task, exec or other object named does not exist (`not_found`).
    NotFound,
    /// A bounded resource is full: the task queue, the exec slots, the replay buffer
    /// (`limit`).
    Limit,
    /// The receiver is too busy to take this now, but would later: a connection turned
    /// away before its handshake while others are pending; retry with backoff (`busy`).
    Busy,
    /// The operation did not complete in the time allowed (`timeout`).
    Timeout,
    /// The sender is stopping and takes no new work (`shutting_down`).
    ShuttingDown,
    /// The receiver failed for a reason of its own; the request may be retried (`internal`).
    Internal,
    /// A code this version does not know, kept verbatim.
    Other(String),
}

impl ErrorCode {
    /// Every code this version defines, in wire form.
    pub const KNOWN: &'static [&'static str] = &[
        "unsupported_version",
        "frame_too_large",
        "malformed",
        "unsupported",
        "unauthorized",
        "invalid",
        "invalid_state",
        "not_found",
        "limit",
        "busy",
        "timeout",
        "shutting_down",
        "internal",
    ];

    /// The wire form of this code.
    pub fn as_str(&self) -> &str {
        match self {
            Self::UnsupportedVersion => "unsupported_version",
            Self::FrameTooLarge => "frame_too_large",
            Self::Malformed => "malformed",
            Self::Unsupported => "unsupported",
            Self::Unauthorized => "unauthorized",
            Self::Invalid => "invalid",
            Self::InvalidState => "invalid_state",
            Self::NotFound => "not_found",
            Self::Limit => "limit",
            Self::Busy => "busy",
            Self::Timeout => "timeout",
            Self::ShuttingDown => "shutting_down",
            Self::Internal => "internal",
            Self::Other(s) => s,
        }
    }

    /// Parses a wire code; unknown codes become [`ErrorCode::Other`].
    pub fn parse(s: &str) -> Self {
        match s {
            "unsupported_version" => Self::UnsupportedVersion,
            "frame_too_large" => Self::FrameTooLarge,
            "malformed" => Self::Malformed,
            "unsupported" => Self::Unsupported,
            "unauthorized" => Self::Unauthorized,
            "invalid" => Self::Invalid,
            "invalid_state" => Self::InvalidState,
            "not_found" => Self::NotFound,
            "limit" => Self::Limit,
            "busy" => Self::Busy,
            "timeout" => Self::Timeout,
            "shutting_down" => Self::ShuttingDown,
            "internal" => Self::Internal,
            other => Self::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        Ok(Self::parse(&s))
    }
}

/// A frame or message could not be decoded.
///
/// The variants say what a peer should be told; the details are in the message text only, so
/// callers match on [`DecodeError::code`] rather than on the text.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The length prefix announced more than the configured maximum.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// The announced length.
        len: u64,
        /// The receiver's limit.
        max: usize,
    },
    /// The bytes are not a message of this protocol.
    #[error("malformed message: {detail}")]
    Malformed {
        /// The `type` of the message, when it could be read.
        type_name: Option<String>,
        /// The request id of the message, when it could be read, so the error can carry `re`.
        id: Option<u64>,
        /// What was wrong, for logs.
        detail: String,
    },
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({have} of {want} bytes)")]
    Truncated {
        /// Bytes received of the frame (header included).
        have: usize,
        /// Bytes the frame needed (header included).
        want: usize,
    },
    /// Reading the underlying stream failed.
    #[error("reading a frame failed")]
    Io(#[from] std::io::Error),
}

impl DecodeError {
    /// The protocol error code a peer should receive for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            Self::Malformed { .. } | Self::Truncated { .. } => ErrorCode::Malformed,
            Self::Io(_) => ErrorCode::Internal,
        }
    }

    /// The request id of the offending message, when it could be read.
    pub fn request_id(&self) -> Option<u64> {
        match self {
            Self::Malformed { id, .. } => *id,
            _ => None,
        }
    }

    pub(crate) fn malformed(
        type_name: Option<&str>,
        id: Option<u64>,
        detail: impl fmt::Display,
    ) -> Self {
        Self::Malformed {
            type_name: type_name.map(str::to_owned),
            id,
            detail: detail.to_string(),
        }
    }
}

/// A message could not be encoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The encoded message is larger than the frame limit.
    #[error("encoded message of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// The encoded length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The value cannot be represented (for example, an `Unknown` message).
    #[error("message cannot be encoded: {0}")]
    Unencodable(String),
    /// Writing to the underlying stream failed.
    #[error("writing a frame failed")]
    Io(#[from] std::io::Error),
}
