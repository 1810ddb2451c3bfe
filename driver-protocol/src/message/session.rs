//! Messages of the control link's sessions: many clients at once, durable consumers and
//! observers (PROTOCOL.md §8.7).

use serde::{Deserialize, Serialize};

use super::{RequestId, Seq};

/// The shim's limits, in its `hello` (`limits`): what a client may send and how the shim
/// buffers, known before authentication.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Unacknowledged events the replay buffer holds before the driver is slowed.
    pub max_events: u64,
    /// Bytes of unacknowledged events the replay buffer holds before the driver is slowed.
    pub max_bytes: u64,
    /// The largest frame read from, or sent to, an authenticated client.
    pub max_frame: u64,
    /// The largest frame read before the handshake is complete.
    pub handshake_max_frame: u64,
    /// How many recent request ids are remembered (and so answered, not executed, again).
    pub ids_window: u64,
    /// How long a new connection may take to send its `hello`.
    pub hello_timeout_ms: u64,
    /// How long a new connection may take to complete its handshake.
    pub handshake_timeout_ms: u64,
    /// Authenticated sessions at once.
    pub max_sessions: u64,
    /// Durable consumers known at once.
    pub max_consumers: u64,
    /// A consumer should acknowledge at least every this many events …
    pub ack_every: u64,
    /// … and at most this long after the last event it has not acknowledged.
    pub ack_delay_ms: u64,
}

/// `lagged`: an observer fell behind the replay buffer; `missed` events were freed before it
/// was sent them, and it continues from `next_seq`. Not an event: it has no seq.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lagged {
    /// Events this observer will never get.
    pub missed: u64,
    /// The next seq it gets.
    pub next_seq: Seq,
}

/// `forget_consumer`: retire a durable consumer; the buffer no longer keeps events for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForgetConsumer {
    /// The request id.
    pub id: RequestId,
    /// The consumer's name.
    pub consumer: String,
}
