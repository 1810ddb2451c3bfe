//! Errors of the protocol crate, and the stable error codes that travel on the wire.
//!
//! Two different things live here. [`ErrorCode`] is part of the protocol: the `code` field of
//! an `error` message, a stable lowercase string a driver in any language can match on.
//! [`DecodeError`] and [`EncodeError`] are this crate's Rust errors; each maps to the
//! [`ErrorCode`] a peer should be told about through [`DecodeError::code`].

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Defines [`ErrorCode`] from one table of `Variant = "wire"` rows: the enum, its
/// [`KNOWN`](ErrorCode::KNOWN) list, [`as_str`](ErrorCode::as_str) and
/// [`parse`](ErrorCode::parse), so that a code's string is written once.
macro_rules! error_codes {
    ($($(#[$meta:meta])* $variant:ident = $wire:literal,)*) => {
        /// The `code` of an `error` message: a stable string, matched by peers in every
        /// language.
        ///
        /// Codes this version does not know decode to [`ErrorCode::Other`] and keep their
        /// text, so a newer peer's codes are shown rather than rejected.
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $($(#[$meta])* $variant,)*
            /// A code this version does not know, kept verbatim.
            Other(String),
        }

        impl ErrorCode {
            /// Every code this version defines, in wire form.
            pub const KNOWN: &'static [&'static str] = &[$($wire),*];

            /// The wire form of this code.
            pub fn as_str(&self) -> &str {
                match self {
                    $(Self::$variant => $wire,)*
                    Self::Other(s) => s,
                }
            }

            /// Parses a wire code; unknown codes become [`ErrorCode::Other`].
            pub fn parse(s: &str) -> Self {
                match s {
                    $($wire => Self::$variant,)*
                    other => Self::Other(other.to_owned()),
                }
            }
        }
    };
}

error_codes! {
    /// No protocol version is spoken by both sides (`unsupported_version`).
    UnsupportedVersion = "unsupported_version",
    /// A frame's length prefix exceeds the receiver's limit (`frame_too_large`).
    FrameTooLarge = "frame_too_large",
    /// The frame is not a MessagePack map with a string `type`, or a field has the wrong
    /// type (`malformed`).
    Malformed = "malformed",
    /// The `type` is unknown, or not valid on this link or in this direction (`unsupported`).
    Unsupported = "unsupported",
    /// Authentication failed or is missing (`unauthorized`).
    Unauthorized = "unauthorized",
    /// Well-formed, but a value is not acceptable: an empty argv, an unknown signal name
    /// (`invalid`).
    Invalid = "invalid",
    /// The request cannot be honoured in the current state, e.g. `resume` when not paused
    /// (`invalid_state`).
    InvalidState = "invalid_state",
    /// The task, exec or other object named does not exist (`not_found`).
    NotFound = "not_found",
    /// A bounded resource is full: the task queue, the exec slots, the replay buffer
    /// (`limit`).
    Limit = "limit",
    /// The receiver is too busy to take this now, but would later: a connection turned
    /// away before its handshake while others are pending; retry with backoff (`busy`).
    Busy = "busy",
    /// The operation did not complete in the time allowed (`timeout`).
    Timeout = "timeout",
    /// The sender is stopping and takes no new work (`shutting_down`).
    ShuttingDown = "shutting_down",
    /// The receiver failed for a reason of its own; the request may be retried (`internal`).
    Internal = "internal",
    // sessions
    /// A newer connection of the same durable consumer took this one's place; it is closed
    /// (`replaced`).
    Replaced = "replaced",
    /// `resume_from` names a seq older than the oldest event still buffered for this
    /// consumer or observer; `first_available` says where the buffer starts (`gap`).
    Gap = "gap",
    /// A request id was reused for a request with another body (`conflict`).
    Conflict = "conflict",
    // files
    /// A path is not acceptable: empty, not UTF-8, or leading out of the file root through
    /// `..`, a symlink or a magic link (`bad_path`).
    BadPath = "bad_path",
    /// The sandbox user may not do this to this path (`permission`).
    Permission = "permission",
    /// The file system is full, or the user's quota is (`no_space`).
    NoSpace = "no_space",
    /// The file changed while it was being read (`changed`).
    Changed = "changed",
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

impl crate::enc::Put for ErrorCode {
    fn put(&self, e: &mut crate::enc::Enc<'_>) -> Result<(), EncodeError> {
        e.str(self.as_str().as_bytes())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_code_round_trips_and_others_are_kept() {
        assert_eq!(ErrorCode::KNOWN.len(), 20);
        for wire in ErrorCode::KNOWN {
            let code = ErrorCode::parse(wire);
            assert!(!matches!(code, ErrorCode::Other(_)), "{wire}");
            assert_eq!(code.as_str(), *wire);
            assert_eq!(code.to_string(), *wire);
        }
        assert_eq!(ErrorCode::parse("malformed"), ErrorCode::Malformed);
        assert_eq!(ErrorCode::ShuttingDown.as_str(), "shutting_down");
        let newer = ErrorCode::parse("from_the_future");
        assert_eq!(newer, ErrorCode::Other("from_the_future".into()));
        assert_eq!(newer.as_str(), "from_the_future");
    }
}
