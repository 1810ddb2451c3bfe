//! Recently seen request ids and their recorded replies, which make control commands
//! idempotent (PROTOCOL.md §8.4).
//!
//! A control plane that lost its connection retries an unanswered command with the same `id`.
//! If the shim already answered it, the retry gets the recorded reply frame and is not
//! executed again; if it is still being executed, the retry is swallowed and the reply goes to
//! the connection the retry came on. The window is bounded: an id older than the last
//! [`WINDOW`] is forgotten, and would be executed again.
//!
//! Each id is remembered with a hash of its request's body: an id reused for another request
//! is `conflict`, never the other request's reply (PROTOCOL.md §8.4).

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;
use driver_protocol::message::RequestId;

/// How many request ids are remembered.
pub(super) const WINDOW: usize = 1024;

/// What is known about a request id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Seen {
    /// Forwarded to the supervisor, not answered yet; the reply goes to this connection.
    Pending { conn: u64 },
    /// Answered with this frame.
    Done(Bytes),
}

/// The hash of a request's body: FNV-1a's step over 64-bit words in four independent lanes,
/// then the lanes, the length and the last bytes (small, and enough to tell two requests of
/// one client apart; ids are unique per client, so no one is attacking it). Every body is
/// hashed, a 256 KiB `fs_write_data` too: FNV-1a a byte at a time is one dependent multiply
/// a byte, the most of the shim's time on an upload; words in four lanes are 32 times fewer
/// steps on the chain. Each step is a bijection of the lane, so two bodies of one length
/// that differ in one word never hash alike.
pub(super) fn body_hash(body: &[u8]) -> u64 {
    const SEED: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0100_0000_01b3;
    let step = |h: u64, v: u64| (h ^ v).wrapping_mul(PRIME);
    let mut lanes = [SEED, SEED ^ 1, SEED ^ 2, SEED ^ 3];
    // Each block a fixed array read at constant offsets: four loads, xors and multiplies a
    // block, with no iterator or bounds check left in the loop (the shim is built for size,
    // where the iterator form of this loop was 14 instructions a word).
    let mut blocks = body.chunks_exact(32);
    for block in &mut blocks {
        if let Ok(block) = <&[u8; 32]>::try_from(block) {
            lanes[0] = step(lanes[0], word(block, 0));
            lanes[1] = step(lanes[1], word(block, 8));
            lanes[2] = step(lanes[2], word(block, 16));
            lanes[3] = step(lanes[3], word(block, 24));
        }
    }
    let rest = blocks.remainder();
    let h = lanes.into_iter().fold(step(SEED, body.len() as u64), step);
    rest.iter().fold(h, |h, b| step(h, u64::from(*b)))
}

/// The little-endian word at `at` (a constant where it is called) of a block.
#[inline(always)]
fn word(block: &[u8; 32], at: usize) -> u64 {
    let mut w = [0u8; 8];
    if let Some(bytes) = block.get(at..at + 8) {
        w.copy_from_slice(bytes);
    }
    u64::from_le_bytes(w)
}

/// The last [`WINDOW`] request ids.
#[derive(Debug, Default)]
pub(super) struct IdCache {
    seen: HashMap<RequestId, (Seen, u64)>,
    order: VecDeque<RequestId>,
}

impl IdCache {
    /// What is known about `id`.
    pub(super) fn get(&self, id: RequestId) -> Option<&Seen> {
        self.seen.get(&id).map(|(seen, _)| seen)
    }

    /// The hash of the body `id` was first seen with.
    pub(super) fn hash(&self, id: RequestId) -> Option<u64> {
        self.seen.get(&id).map(|(_, hash)| *hash)
    }

    /// Records `id` (with its body's `hash`) as forwarded on connection `conn`, forgetting
    /// the oldest id when the window is full.
    pub(super) fn begin(&mut self, id: RequestId, conn: u64, hash: u64) {
        if self
            .seen
            .insert(id, (Seen::Pending { conn }, hash))
            .is_some()
        {
            return;
        }
        self.order.push_back(id);
        while self.order.len() > WINDOW {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
    }

    /// A retry of a pending `id` arrived on connection `conn`: its reply goes there.
    pub(super) fn redirect(&mut self, id: RequestId, conn: u64) {
        if let Some((Seen::Pending { conn: c }, _)) = self.seen.get_mut(&id) {
            *c = conn;
        }
    }

    /// Records the reply to `id`; returns the connection it should go to, when the id is
    /// still remembered as pending.
    pub(super) fn complete(&mut self, id: RequestId, frame: Bytes) -> Option<u64> {
        let (entry, _) = self.seen.get_mut(&id)?;
        let conn = match entry {
            Seen::Pending { conn } => Some(*conn),
            Seen::Done(_) => None,
        };
        *entry = Seen::Done(frame);
        conn
    }

    /// The request `id` will never be answered (its command was dropped): forget it, so a
    /// retry is executed.
    pub(super) fn abandon(&mut self, id: RequestId) {
        if matches!(self.seen.get(&id), Some((Seen::Pending { .. }, _))) {
            self.seen.remove(&id);
            self.order.retain(|i| *i != id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_then_done_then_forgotten_after_the_window() {
        let mut ids = IdCache::default();
        ids.begin(1, 10, 0);
        assert_eq!(ids.get(1), Some(&Seen::Pending { conn: 10 }));
        ids.redirect(1, 11);
        assert_eq!(ids.complete(1, Bytes::from_static(b"r")), Some(11));
        assert_eq!(ids.get(1), Some(&Seen::Done(Bytes::from_static(b"r"))));
        for id in 2..=WINDOW as u64 {
            ids.begin(id, 10, 0);
        }
        assert!(ids.get(1).is_some(), "exactly WINDOW ids are kept");
        ids.begin(5000, 10, 0);
        assert!(ids.get(1).is_none());
        assert!(ids.get(2).is_some());
    }

    /// The hash is the one of its plain form (each 8-byte word into its lane in turn),
    /// whatever the length and the tail.
    #[test]
    fn the_hash_is_its_plain_form() {
        fn plain(body: &[u8]) -> u64 {
            const SEED: u64 = 0xcbf2_9ce4_8422_2325;
            const PRIME: u64 = 0x0100_0000_01b3;
            let step = |h: u64, v: u64| (h ^ v).wrapping_mul(PRIME);
            let mut lanes = [SEED, SEED ^ 1, SEED ^ 2, SEED ^ 3];
            let whole = body.len() / 32 * 32;
            for (i, word) in body[..whole].chunks_exact(8).enumerate() {
                let w = u64::from_le_bytes(word.try_into().unwrap());
                lanes[i % 4] = step(lanes[i % 4], w);
            }
            let h = lanes.into_iter().fold(step(SEED, body.len() as u64), step);
            body[whole..].iter().fold(h, |h, b| step(h, u64::from(*b)))
        }
        let body: Vec<u8> = (0..300u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
            .collect();
        for len in 0..body.len() {
            assert_eq!(body_hash(&body[..len]), plain(&body[..len]), "length {len}");
        }
    }

    #[test]
    fn the_hash_tells_bodies_apart() {
        assert_ne!(body_hash(b"status 1"), body_hash(b"status 2"));
        assert_eq!(body_hash(b""), body_hash(b""));
        assert_ne!(body_hash(b""), body_hash(b"\0"));
        // A change of any one byte of a large body, in a whole block or in the tail, and
        // a byte more or less, all tell.
        let body: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let h = body_hash(&body);
        assert_eq!(h, body_hash(&body.clone()));
        for at in [0, 7, 8, 31, 32, 500, 991, 992, 999] {
            for bit in [0, 7] {
                let mut other = body.clone();
                other[at] ^= 1 << bit;
                assert_ne!(body_hash(&other), h, "byte {at} bit {bit}");
            }
        }
        assert_ne!(body_hash(&body[..999]), h);
        let mut longer = body.clone();
        longer.push(0);
        assert_ne!(body_hash(&longer), h);
    }

    #[test]
    fn abandoned_ids_are_forgotten_but_answered_ones_are_not() {
        let mut ids = IdCache::default();
        ids.begin(1, 1, 0);
        ids.begin(2, 1, 7);
        assert_eq!(ids.hash(2), Some(7));
        ids.complete(2, Bytes::new());
        ids.abandon(1);
        ids.abandon(2);
        assert!(ids.get(1).is_none());
        assert!(ids.get(2).is_some());
        assert_eq!(
            ids.complete(7, Bytes::new()),
            None,
            "unknown ids are not recorded"
        );
        assert!(ids.get(7).is_none());
    }
}
