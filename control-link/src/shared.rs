//! What a session shares with its client handles and its event stream: the cursors that
//! decide what may be acknowledged, the wake-ups for batched acks, the connection state, and
//! the request-id generator.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use driver_protocol::message::{RequestId, Seq};
use tokio::sync::Notify;

use crate::options::AckMode;
use crate::Error;

/// How long acks wait to be batched.
pub(crate) const ACK_INTERVAL: Duration = Duration::from_millis(200);

/// Events taken from a stream after which an ack is sent at once.
pub(crate) const ACK_EVERY: u32 = 64;

/// Bytes of events taken from a stream after which an ack is sent at once: an eighth of the
/// shim's default replay buffer (8 MiB), so that large events (an exec's output, 128 KiB
/// each) are acknowledged long before the shim's buffer fills and it stops reading.
pub(crate) const ACK_BYTES: usize = 1024 * 1024;

/// What a stream took since its last ack went out.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct AckBatch {
    events: u32,
    bytes: usize,
}

/// Where a fleet client's stream stands, handed from a replaced client to its successor.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Position {
    /// The last seq a fleet's stream handed out (the successor skips replays up to it).
    pub(crate) handed_out: Seq,
    /// [`Shared::consumed`].
    pub(crate) consumed: Seq,
    /// [`Shared::user_acked`].
    pub(crate) user_acked: Seq,
}

impl Position {
    /// A fresh client's position: everything up to `cursor` processed.
    pub(crate) fn at(cursor: Seq) -> Self {
        Self {
            handed_out: cursor,
            consumed: cursor,
            user_acked: cursor,
        }
    }
}

/// What a fleet's stream handed out for one client, and whether that client was replaced.
#[derive(Debug)]
struct Handover {
    retired: bool,
    handed_out: Seq,
    /// What the fleet's stream took of this client since its last ack.
    batch: AckBatch,
}

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
    /// Manual mode: a stream handed out [`ACK_EVERY`] events or [`ACK_BYTES`] since the last
    /// time this was cleared, so the caller's next [`Client::ack`](crate::Client::ack) goes
    /// out at once instead of within [`ACK_INTERVAL`].
    pub(crate) manual_ack_due: AtomicBool,
    pub(crate) connected: AtomicBool,
    pub(crate) closed: AtomicBool,
    pub(crate) agent_id: Mutex<Option<String>>,
    /// A fleet's hand-out state; its lock orders handing out against retiring.
    handover: Mutex<Handover>,
    /// Why the session closed by itself (a refusal), once it did.
    close_reason: Mutex<Option<Error>>,
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
    pub(crate) fn new(ack_mode: AckMode, start: Position) -> Self {
        Self {
            ack_mode,
            consumed: AtomicU64::new(start.consumed),
            user_acked: AtomicU64::new(start.user_acked),
            handover: Mutex::new(Handover {
                retired: false,
                handed_out: start.handed_out,
                batch: AckBatch::default(),
            }),
            ack_soon: Notify::new(),
            ack_now: Notify::new(),
            manual_ack_due: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            agent_id: Mutex::new(None),
            close_reason: Mutex::new(None),
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

    /// The consumer took the event `seq`, which took `len` bytes on the wire, from a stream.
    pub(crate) fn taken(&self, seq: Seq, len: usize, since_flush: &mut AckBatch) {
        let auto = self.ack_mode == AckMode::Auto;
        if auto {
            self.consumed.fetch_max(seq, Ordering::AcqRel);
        }
        since_flush.events = since_flush.events.saturating_add(1);
        since_flush.bytes = since_flush.bytes.saturating_add(len);
        let due = since_flush.events >= ACK_EVERY || since_flush.bytes >= ACK_BYTES;
        if due {
            *since_flush = AckBatch::default();
        }
        match (auto, due) {
            (true, true) => self.ack_now.notify_one(),
            (true, false) => self.ack_soon.notify_one(),
            // Manual: only the caller acks; a large batch makes its next ack go out at once.
            (false, true) => self.manual_ack_due.store(true, Ordering::Release),
            (false, false) => {}
        }
    }

    /// The caller acknowledged up to `seq` (manual or auto mode): sent at once when a batch
    /// is due (see [`Self::manual_ack_due`]), else within [`ACK_INTERVAL`].
    pub(crate) fn user_ack(&self, seq: Seq) {
        self.user_acked.fetch_max(seq, Ordering::AcqRel);
        if self.manual_ack_due.swap(false, Ordering::AcqRel) {
            self.ack_now.notify_one();
        } else {
            self.ack_soon.notify_one();
        }
    }

    /// A fleet's stream hands out the event `seq` of this client, unless the client was
    /// replaced (then false: its successor delivers the event instead).
    ///
    /// `len` is the bytes the event took on the wire; acks follow [`Shared::taken`]'s rule,
    /// counted per client (one stream takes the events of many).
    pub(crate) fn hand_out(&self, seq: Seq, len: usize) -> bool {
        let mut h = self.handover.lock().unwrap_or_else(PoisonError::into_inner);
        if h.retired {
            return false;
        }
        h.handed_out = h.handed_out.max(seq);
        self.taken(seq, len, &mut h.batch);
        true
    }

    /// Marks the client replaced: the fleet's stream hands out none of its events from now
    /// on. Returns where the stream stands, for the successor.
    pub(crate) fn retire(&self) -> Position {
        let mut h = self.handover.lock().unwrap_or_else(PoisonError::into_inner);
        h.retired = true;
        Position {
            handed_out: h.handed_out,
            consumed: self.consumed.load(Ordering::Acquire),
            user_acked: self.user_acked.load(Ordering::Acquire),
        }
    }

    /// The shim behind the address restarted its seqs: everything up to `seq` counts as
    /// processed and handed out.
    pub(crate) fn restart_at(&self, seq: Seq) {
        let mut h = self.handover.lock().unwrap_or_else(PoisonError::into_inner);
        h.handed_out = seq;
        self.consumed.store(seq, Ordering::Release);
        self.user_acked.store(seq, Ordering::Release);
    }

    /// Records why the session is closing by itself (kept: the first reason).
    pub(crate) fn set_close_reason(&self, reason: Error) {
        if let Ok(mut slot) = self.close_reason.lock() {
            slot.get_or_insert(reason);
        }
    }

    /// A copy of the reason the session closed by itself, if it did.
    pub(crate) fn close_reason(&self) -> Option<Error> {
        self.close_reason
            .lock()
            .ok()
            .and_then(|r| r.as_ref().map(Error::copy_refusal))
    }

    /// The error for a request the closed session cannot serve: its close reason, else
    /// [`Error::Closed`].
    pub(crate) fn closed_error(&self) -> Error {
        self.close_reason().unwrap_or(Error::Closed)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether an ack is due now (the `ack_now` permit is taken).
    fn ack_due(shared: &Shared) -> bool {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            tokio::time::timeout(Duration::ZERO, shared.ack_now.notified())
                .await
                .is_ok()
        })
    }

    #[test]
    fn acks_go_out_every_64_events_or_every_mib_also_for_a_fleet() {
        let shared = Shared::new(AckMode::Auto, Position::at(0));
        let mut batch = AckBatch::default();
        for seq in 1..ACK_EVERY as u64 {
            shared.taken(seq, 200, &mut batch);
        }
        assert!(!ack_due(&shared), "63 small events wait");
        shared.taken(64, 200, &mut batch);
        assert!(ack_due(&shared), "the 64th goes out");

        // Large events (an exec's output): long before 64 of them fill the shim's buffer.
        let chunk = 128 * 1024 + 64;
        for seq in 65..72 {
            shared.taken(seq, chunk, &mut batch);
            assert!(!ack_due(&shared), "{seq}");
        }
        shared.taken(72, chunk, &mut batch);
        assert!(ack_due(&shared), "8 chunks of 128 KiB are over a MiB");
        assert_eq!(shared.consumed.load(Ordering::Acquire), 72);

        // A fleet's stream counts per client, across the calls that hand events out.
        let fleet = Shared::new(AckMode::Auto, Position::at(0));
        for seq in 1..ACK_EVERY as u64 {
            assert!(fleet.hand_out(seq, 200));
        }
        assert!(!ack_due(&fleet));
        assert!(fleet.hand_out(64, 200));
        assert!(ack_due(&fleet), "the 64th handed out goes out");
        assert!(fleet.hand_out(65, 2 * ACK_BYTES));
        assert!(ack_due(&fleet), "a large event goes out at once");

        // Manual mode: the stream acknowledges nothing.
        let manual = Shared::new(AckMode::Manual, Position::at(0));
        let mut batch = AckBatch::default();
        manual.taken(1, 2 * ACK_BYTES, &mut batch);
        assert!(!ack_due(&manual));
        assert_eq!(manual.consumed.load(Ordering::Acquire), 0);
        // ... but the caller's next ack after a large batch goes out at once, the one after
        // that waits to be batched again.
        manual.user_ack(1);
        assert!(ack_due(&manual), "the ack after a MiB goes out at once");
        manual.taken(2, 200, &mut batch);
        manual.user_ack(2);
        assert!(!ack_due(&manual), "a small batch waits");
        assert_eq!(manual.user_acked.load(Ordering::Acquire), 2);
    }
}
