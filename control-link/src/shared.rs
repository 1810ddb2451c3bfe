//! What a session shares with its client handles and its event stream: the cursors that
//! decide what may be acknowledged, the wake-ups for batched acks, the connection state, and
//! the request-id generator.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use driver_protocol::message::{RequestId, Seq};
use tokio::sync::Notify;

use crate::options::AckMode;

/// How long acks wait to be batched.
pub(crate) const ACK_INTERVAL: Duration = Duration::from_millis(200);

/// Events taken from a stream after which an ack is sent at once.
pub(crate) const ACK_EVERY: u32 = 64;

/// State shared by the session, its client handles and its event stream.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) ack_mode: AckMode,
    /// The last seq the stream handed to the consumer.
    pub(crate) consumed: AtomicU64,
    /// The last seq the caller acknowledged with `Client::ack`.
    pub(crate) user_acked: AtomicU64,
    /// Send an ack within [`ACK_INTERVAL`].
    pub(crate) ack_soon: Notify,
    /// Send an ack now.
    pub(crate) ack_now: Notify,
    pub(crate) connected: AtomicBool,
    pub(crate) closed: AtomicBool,
    pub(crate) agent_id: Mutex<Option<String>>,
    /// Random high 32 bits of every request id of this client.
    id_high: u64,
    id_counter: AtomicU32,
    /// Test hooks: drop the connection now / after the next request is written.
    pub(crate) drop_now: Notify,
    pub(crate) drop_after_send: AtomicBool,
    /// The last known state, and the lock of the one waker (auto-wake).
    pub(crate) wake: crate::wake::WakeState,
    /// The `output_schema` of each task this client submitted (bounded).
    #[cfg(feature = "schema")]
    pub(crate) schemas: Mutex<crate::outcome::SchemaMemo>,
}

impl Shared {
    pub(crate) fn new(ack_mode: AckMode, cursor: Seq) -> Self {
        Self {
            ack_mode,
            consumed: AtomicU64::new(cursor),
            user_acked: AtomicU64::new(cursor),
            ack_soon: Notify::new(),
            ack_now: Notify::new(),
            connected: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            agent_id: Mutex::new(None),
            id_high: crate::random::u64() << 32,
            id_counter: AtomicU32::new(0),
            drop_now: Notify::new(),
            drop_after_send: AtomicBool::new(false),
            wake: crate::wake::WakeState::default(),
            #[cfg(feature = "schema")]
            schemas: Mutex::default(),
        }
    }

    /// A request id unique across clients: random high 32 bits, a counter in the low 32.
    pub(crate) fn next_id(&self) -> RequestId {
        let low = self
            .id_counter
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(1);
        self.id_high | u64::from(low)
    }

    /// The consumer took the event `seq` from a stream.
    pub(crate) fn taken(&self, seq: Seq, since_flush: &mut u32) {
        if self.ack_mode != AckMode::Auto {
            return;
        }
        self.consumed.fetch_max(seq, Ordering::AcqRel);
        *since_flush += 1;
        if *since_flush >= ACK_EVERY {
            *since_flush = 0;
            self.ack_now.notify_one();
        } else {
            self.ack_soon.notify_one();
        }
    }

    pub(crate) fn agent_id(&self) -> Option<String> {
        self.agent_id.lock().map(|a| a.clone()).unwrap_or(None)
    }

    pub(crate) fn set_agent_id(&self, id: Option<String>) {
        if let Ok(mut slot) = self.agent_id.lock() {
            if id.is_some() {
                *slot = id;
            }
        }
    }
}
