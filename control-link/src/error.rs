//! The one error type of the crate: what can go wrong talking to a shim.
//!
//! Errors the shim reports (`error{code, message}`) are [`Error::Remote`] with the protocol's
//! [`ErrorCode`]; everything else is local: the socket, the handshake, a timeout, a closed
//! client.

use std::time::Duration;

use driver_protocol::handshake::HandshakeError;
use driver_protocol::message::{Message as _, ShimToControl};
use driver_protocol::{DecodeError, EncodeError, ErrorCode};

/// What went wrong.
///
/// ```
/// use control_link::{Error, ErrorCode};
///
/// let err = Error::Remote { code: ErrorCode::NotFound, message: "no task t9".into() };
/// assert_eq!(err.to_string(), "the shim answered not_found: no task t9");
/// assert_eq!(err.code(), Some(&ErrorCode::NotFound));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The socket failed.
    #[error("i/o error")]
    Io(#[from] std::io::Error),
    /// An address could not be parsed.
    #[error("invalid address {addr:?}: {reason}")]
    InvalidAddr {
        /// The text given.
        addr: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The shim broke the protocol (an unexpected message, a bad frame).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A frame from the shim could not be decoded.
    #[error("bad frame from the shim")]
    Decode(#[from] DecodeError),
    /// A message could not be encoded (e.g. over the frame limit).
    #[error("cannot encode a message")]
    Encode(#[from] EncodeError),
    /// The `hello` exchange failed (protocol, version, role).
    #[error("handshake failed")]
    Handshake(#[from] HandshakeError),
    /// The operation did not complete in time.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The client is closed (by [`Client::close`](crate::Client::close), or it gave up
    /// reconnecting).
    #[error("the client is closed")]
    Closed,
    /// There is no connection right now (for messages that are not retried, such as
    /// `exec_input`).
    #[error("not connected to the shim")]
    NotConnected,
    /// Authentication failed: a wrong token, a shim that does not prove the token, or a shim
    /// that offers no nonce although we have a token (a downgrade).
    #[error("unauthorized: {reason}")]
    Unauthorized {
        /// Why.
        reason: String,
    },
    /// The shim answered the request with `error{code, message}`.
    #[error("the shim answered {code}: {message}")]
    Remote {
        /// The protocol's error code.
        code: ErrorCode,
        /// The shim's explanation.
        message: String,
    },
    /// The shim serves another agent than the one expected.
    #[error("the shim serves agent {got:?}, expected {expected:?}")]
    AgentMismatch {
        /// The agent id expected.
        expected: String,
        /// The agent id in the shim's `hello` (`None`: it sent none).
        got: Option<String>,
    },
    /// A token could not be loaded.
    #[error("token: {0}")]
    Token(String),
    /// The address needs a token (only unix sockets may be used without one).
    #[error("{0} needs a token: only unix sockets may be used without one")]
    Insecure(String),
    /// The event stream of this client was already taken (or belongs to a [`Fleet`](crate::Fleet)).
    #[error("the event stream was already taken")]
    EventsTaken,
    /// A newer connection of the same durable consumer (another instance of this control
    /// plane, say) took this client's place: the client closed rather than fight over it
    /// (PROTOCOL.md §8.7).
    #[error("replaced by a newer connection of consumer {consumer:?}")]
    Replaced {
        /// The consumer's name.
        consumer: String,
    },
    /// The wake hook ([`ConnectOptions::wake_hook`](crate::ConnectOptions::wake_hook))
    /// failed to wake a paused agent.
    #[error("waking the agent failed")]
    Wake(#[source] crate::WakeError),
}

impl Error {
    /// The protocol error code, for [`Error::Remote`].
    ///
    /// ```
    /// # use control_link::Error;
    /// assert_eq!(Error::Closed.code(), None);
    /// ```
    pub fn code(&self) -> Option<&ErrorCode> {
        match self {
            Self::Remote { code, .. } => Some(code),
            _ => None,
        }
    }

    /// Whether the shim turned the connection away as `busy` before its handshake: too
    /// many handshakes pending from this client's source right now. Worth a retry after a
    /// backoff (the first connect of a client does so by itself, within its connect timeout).
    ///
    /// ```
    /// # use control_link::{Error, ErrorCode};
    /// let err = Error::Remote { code: ErrorCode::Busy, message: "retry later".into() };
    /// assert!(err.is_busy());
    /// assert!(!Error::Closed.is_busy());
    /// ```
    pub fn is_busy(&self) -> bool {
        matches!(
            self,
            Self::Remote {
                code: ErrorCode::Busy,
                ..
            }
        )
    }

    /// Whether this error, from a reconnect's handshake, says the shim refuses this client
    /// (a wrong token, another agent) rather than that it could not be reached.
    pub(crate) fn is_refusal(&self) -> bool {
        matches!(self, Self::Unauthorized { .. } | Self::AgentMismatch { .. })
    }

    /// A copy of a refusal (see [`Error::is_refusal`]), for every request it fails;
    /// [`Error::Closed`] for any other error.
    pub(crate) fn copy_refusal(&self) -> Self {
        match self {
            Self::Unauthorized { reason } => Self::Unauthorized {
                reason: reason.clone(),
            },
            Self::AgentMismatch { expected, got } => Self::AgentMismatch {
                expected: expected.clone(),
                got: got.clone(),
            },
            Self::Replaced { consumer } => Self::Replaced {
                consumer: consumer.clone(),
            },
            _ => Self::Closed,
        }
    }

    /// The error a shim's `error` message stands for (`unauthorized` is
    /// [`Error::Unauthorized`]).
    pub(crate) fn remote(code: ErrorCode, message: String) -> Self {
        if code == ErrorCode::Unauthorized {
            return Self::Unauthorized { reason: message };
        }
        Self::Remote { code, message }
    }
}

/// The error for a reply of the wrong type to a request.
pub(crate) fn unexpected(msg: &ShimToControl) -> Error {
    Error::Protocol(format!("unexpected reply {}", msg.type_name()))
}
