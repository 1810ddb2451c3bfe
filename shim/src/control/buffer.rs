//! The replay buffer: every event the shim has sequenced and the control plane has not yet
//! acknowledged, kept as ready-to-write frames.
//!
//! Events are stored once, encoded (`event{seq, event}` with its length header), as
//! reference-counted [`Bytes`]: a connection's writer hands them to the socket from here
//! ([`Buffer::gather`], one `writev` for many), a replay after `resume_from` re-sends the
//! same bytes, and nothing is ever re-encoded. The
//! buffer is the only place events live: a connection keeps a cursor into it rather than a
//! copy, so a slow or absent control plane costs the buffer's bounded memory once, never twice.
//!
//! ```text
//!   acked ─┐   ┌─ front (acked + 1)                      last_seq ─┐
//!          ▼   ▼                                                   ▼
//!   … 5  6 │ 7  8  9  10  11  12                                  13 │ 14 (next publish)
//!   dropped│◄──────────── buffered, waiting for ack ───────────────►│
//! ```
//!
//! The limits never drop anything: [`Buffer::push`] always stores, and [`Buffer::is_full`]
//! tells the supervisor to stop reading the driver (backpressure) until acks free room.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Bytes, BytesMut};
use driver_protocol::message::Seq;

/// The frames are written into chunks of at least this size, each frame split off as a
/// reference-counted slice of its chunk: one allocation per chunk, not one per event. A
/// chunk's memory is reused once every frame in it has been acknowledged, or freed.
const ARENA_CHUNK: usize = 64 * 1024;

/// Used-up chunks are kept, oldest first, to be written into again once all their frames
/// are acknowledged: a steady stream of events (or of large `exec_output` chunks) then
/// cycles through the same chunks instead of allocating, and with musl mapping and
/// faulting in, a fresh one each time. They are bounded in bytes by twice the buffer's own
/// byte limit (about what a full buffer holds anyway), and once every event is acknowledged
/// only this many chunks of the usual size stay, unless the last frame asked for was a
/// large one (see [`Buffer::large_run`]).
const IDLE_SPARE_CHUNKS: usize = 2;

/// The unacknowledged events, oldest first, with their bounds.
#[derive(Debug)]
pub(super) struct Buffer {
    /// `(seq, frame)`, consecutive seqs starting at `acked + 1`.
    events: VecDeque<(Seq, Bytes)>,
    /// Sum of the frames' lengths.
    bytes: usize,
    /// The last seq given out (0 before the first event).
    last_seq: Seq,
    /// Every event up to this seq has been acknowledged and forgotten.
    acked: Seq,
    max_events: usize,
    max_bytes: usize,
    /// Where the next frames are written (see [`ARENA_CHUNK`]): what is left of the chunk.
    arena: BytesMut,
    /// Used-up chunks and their sizes, oldest first (see [`IDLE_SPARE_CHUNKS`]).
    spare: VecDeque<(BytesMut, usize)>,
    /// The sum of the spare chunks' sizes.
    spare_bytes: usize,
    /// The size of the arena's chunk.
    arena_size: usize,
    /// The last frame asked for was larger than [`ARENA_CHUNK`] (a chunk of its own): while
    /// such frames keep coming (an exec writing fast), the buffer empties at every ack of
    /// the stream, and its chunks are kept for the next frames rather than unmapped and
    /// mapped again each time (a munmap and 32 page faults per 128 KiB of output). The
    /// first smaller frame ends the run, and the next ack that empties the buffer frees
    /// them; until then at most the buffer's byte limit of them stay (what it may hold when
    /// full anyway: a control plane that acknowledges late has that much in flight).
    large_run: bool,
}

impl Buffer {
    /// An empty buffer that is full at `max_events` events or `max_bytes` bytes (each at
    /// least 1).
    pub(super) fn new(max_events: usize, max_bytes: usize) -> Self {
        Self {
            events: VecDeque::new(),
            bytes: 0,
            last_seq: 0,
            acked: 0,
            max_events: max_events.max(1),
            max_bytes: max_bytes.max(1),
            arena: BytesMut::new(),
            spare: VecDeque::new(),
            spare_bytes: 0,
            arena_size: 0,
            large_run: false,
        }
    }

    /// The seq the next event gets.
    pub(super) fn next_seq(&self) -> Seq {
        self.last_seq.saturating_add(1)
    }

    /// Stores the frame of the event numbered [`Self::next_seq`], even when full.
    pub(super) fn push(&mut self, frame: Bytes) -> Seq {
        let seq = self.next_seq();
        self.last_seq = seq;
        self.bytes = self.bytes.saturating_add(frame.len());
        self.events.push_back((seq, frame));
        seq
    }

    /// An empty buffer with room for at least `len` bytes, to write the next frame into
    /// and then [`Self::push_written`] (or [`BytesMut::clear`], to give up on it).
    pub(super) fn frame_space(&mut self, len: usize) -> &mut BytesMut {
        self.arena.clear();
        self.large_run = len > ARENA_CHUNK;
        let want = len.max(ARENA_CHUNK);
        // The chunk itself, when every frame in it is gone already.
        if self.arena.capacity() >= len || self.arena.try_reclaim(want) {
            return &mut self.arena;
        }
        let used = std::mem::take(&mut self.arena);
        let used_size = std::mem::replace(&mut self.arena_size, want);
        self.arena = self
            .reuse_spare(want)
            .unwrap_or_else(|| BytesMut::with_capacity(want));
        // The chunks of a full buffer are all spare (or the arena) once it drains: a bound of
        // twice the byte limit leaves room for the frames past it and for the arena.
        let bound = self.max_bytes.saturating_mul(2);
        if used_size > 0 && self.spare_bytes.saturating_add(used_size) <= bound {
            self.spare_bytes += used_size;
            self.spare.push_back((used, used_size));
        }
        &mut self.arena
    }

    /// The oldest spare chunk, reset to its full size, if every frame in it is gone and it
    /// holds `want` bytes; spare chunks too small for `want` are freed on the way.
    fn reuse_spare(&mut self, want: usize) -> Option<BytesMut> {
        loop {
            let (front, size) = self.spare.front_mut()?;
            let size = *size;
            if !front.try_reclaim(size) {
                return None; // still referenced by an unacknowledged frame
            }
            let (chunk, _) = self.spare.pop_front()?;
            self.spare_bytes -= size;
            if size >= want {
                self.arena_size = size;
                return Some(chunk);
            }
        }
    }

    /// Stores what was written into [`Self::frame_space`] as the frame of the event numbered
    /// [`Self::next_seq`] (see [`Self::push`]).
    pub(super) fn push_written(&mut self) -> Seq {
        let frame = self.arena.split().freeze();
        self.push(frame)
    }

    /// Forgets every event up to `seq` (cumulative); returns whether anything was freed.
    ///
    /// A `seq` beyond the last one given out is clamped to it: the control plane cannot
    /// acknowledge events that do not exist yet.
    pub(super) fn ack(&mut self, seq: Seq) -> bool {
        // Past the last seq given out: a control plane counting another shim's seqs (one
        // before a restart). Nothing of ours can be acknowledged by it.
        if seq > self.last_seq || seq <= self.acked {
            return false;
        }
        self.acked = seq;
        let mut freed = false;
        while let Some((front, frame)) = self.events.front() {
            if *front > seq {
                break;
            }
            self.bytes = self.bytes.saturating_sub(frame.len());
            self.events.pop_front();
            freed = true;
        }
        if self.events.is_empty() {
            // Idle again: keep a few chunks of the usual size, free the rest; in a run of
            // large frames, the chunks the run cycles through, up to the byte limit.
            let large_run = self.large_run;
            let max_bytes = self.max_bytes;
            let mut kept = 0;
            let mut bytes = 0usize;
            self.spare.retain(|(_, size)| {
                let keep = if large_run {
                    bytes.saturating_add(*size) <= max_bytes
                } else {
                    *size == ARENA_CHUNK && kept < IDLE_SPARE_CHUNKS
                };
                if keep {
                    kept += 1;
                    bytes += *size;
                }
                keep
            });
            self.spare_bytes = bytes;
        }
        freed
    }

    /// Every event up to this seq is acknowledged.
    pub(super) fn acked(&self) -> Seq {
        self.acked
    }

    /// At a limit: the supervisor should stop reading the driver.
    pub(super) fn is_full(&self) -> bool {
        self.events.len() >= self.max_events || self.bytes >= self.max_bytes
    }

    /// Nothing waits for an acknowledgement.
    pub(super) fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// `(events, bytes, last_seq)`.
    pub(super) fn stats(&self) -> (usize, usize, Seq) {
        (self.events.len(), self.bytes, self.last_seq)
    }

    /// The frame of the event after `cursor` if it is at least `min` bytes long: written to
    /// the socket as it is, rather than copied into a batch.
    pub(super) fn next_large(&self, cursor: Seq, min: usize) -> Option<(Seq, Bytes)> {
        let &(front, _) = self.events.front()?;
        let next = cursor.max(self.acked).saturating_add(1);
        let skip = usize::try_from(next.saturating_sub(front)).ok()?;
        self.events
            .get(skip)
            .filter(|(_, frame)| frame.len() >= min)
            .map(|(seq, frame)| (*seq, frame.clone()))
    }

    /// The frames of the events after `cursor`, in order, as slices of the buffer put into
    /// `out` until they hold at least `limit` bytes (at least one frame when there is one,
    /// at most `out.len()`): written to the socket from here with one `writev`, not copied.
    /// Returns how many were put and the seq of the first (consecutive seqs follow).
    ///
    /// Events already acknowledged are skipped, wherever the cursor is.
    pub(super) fn gather<'a>(
        &'a self,
        cursor: Seq,
        out: &mut [IoSlice<'a>],
        limit: usize,
    ) -> (usize, Seq) {
        let next = cursor.max(self.acked).saturating_add(1);
        let Some(&(front, _)) = self.events.front() else {
            return (0, next);
        };
        let skip = usize::try_from(next.saturating_sub(front)).unwrap_or(usize::MAX);
        if skip >= self.events.len() {
            return (0, next);
        }
        let mut n = 0;
        let mut bytes = 0usize;
        // `range`, not `iter().skip()`: the writer asks again after every partial write,
        // and stepping over the events written already would cost as many steps.
        for ((_, frame), slot) in self.events.range(skip..).zip(out.iter_mut()) {
            if n > 0 && bytes >= limit {
                break;
            }
            *slot = IoSlice::new(frame);
            bytes = bytes.saturating_add(frame.len());
            n += 1;
        }
        (n, next)
    }

    /// How many events after `cursor` are buffered (acknowledged ones skipped).
    pub(super) fn count_after(&self, cursor: Seq) -> usize {
        let Some(&(front, _)) = self.events.front() else {
            return 0;
        };
        let next = cursor.max(self.acked).saturating_add(1);
        let skip = usize::try_from(next.saturating_sub(front)).unwrap_or(usize::MAX);
        self.events.len().saturating_sub(skip)
    }

    /// The frame of event `seq`, while it is buffered.
    pub(super) fn frame(&self, seq: Seq) -> Option<&Bytes> {
        let &(front, _) = self.events.front()?;
        let i = usize::try_from(seq.checked_sub(front)?).ok()?;
        self.events.get(i).map(|(_, frame)| frame)
    }

    /// Appends the frames of the events after `cursor` to `out`, in order, until `out`
    /// holds at least `limit` bytes (at least one frame is appended when there is one);
    /// returns the seq of the last frame appended, or `cursor` when none was.
    ///
    /// Events already acknowledged are skipped, wherever the cursor is.
    pub(super) fn fill(&self, cursor: Seq, out: &mut Vec<u8>, limit: usize) -> Seq {
        let Some(&(front, _)) = self.events.front() else {
            return cursor;
        };
        let next = cursor.max(self.acked).saturating_add(1);
        let skip = usize::try_from(next.saturating_sub(front)).unwrap_or(usize::MAX);
        let mut last = cursor;
        if skip >= self.events.len() {
            return last;
        }
        for (seq, frame) in self.events.range(skip..) {
            // A frame that would overflow the batch waits for the next one (where a large
            // frame is written on its own, see [`Self::next_large`]).
            if !out.is_empty() && out.len().saturating_add(frame.len()) > limit {
                break;
            }
            out.extend_from_slice(frame);
            last = *seq;
        }
        last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: u8, len: usize) -> Bytes {
        Bytes::from(vec![n; len])
    }

    #[test]
    fn seqs_start_at_one_and_ack_frees_cumulatively() {
        let mut b = Buffer::new(10, 1000);
        assert_eq!(b.next_seq(), 1);
        for i in 1..=5u8 {
            assert_eq!(b.push(frame(i, 10)), u64::from(i));
        }
        assert_eq!(b.stats(), (5, 50, 5));
        assert!(b.ack(3));
        assert_eq!(b.stats(), (2, 20, 5));
        assert!(!b.ack(2), "an older ack frees nothing");
        assert!(
            !b.ack(99),
            "an ack past the last seq (another shim's) frees nothing"
        );
        assert_eq!(b.stats(), (2, 20, 5));
        assert!(b.ack(5));
        assert_eq!(b.acked(), 5);
        assert!(b.is_empty());
        assert_eq!(b.push(frame(6, 1)), 6, "seqs are never reused");
    }

    #[test]
    fn full_at_either_limit_but_never_drops() {
        let mut b = Buffer::new(3, 100);
        b.push(frame(1, 10));
        b.push(frame(2, 10));
        assert!(!b.is_full());
        b.push(frame(3, 10));
        assert!(b.is_full());
        b.push(frame(4, 10));
        assert_eq!(b.stats().0, 4, "a full buffer still stores");
        b.ack(4);
        b.push(frame(5, 100));
        assert!(b.is_full(), "full by bytes");
    }

    #[test]
    fn frames_written_in_place_share_chunks_and_count_their_own_length() {
        let mut b = Buffer::new(100, 1_000_000);
        for i in 1..=3u8 {
            let out = b.frame_space(10);
            out.extend_from_slice(&[i; 10]);
            assert_eq!(b.push_written(), u64::from(i));
        }
        assert_eq!(b.stats(), (3, 30, 3));
        // A frame given up on leaves nothing behind.
        b.frame_space(5).extend_from_slice(&[9; 5]);
        let big = b.frame_space(2 * ARENA_CHUNK);
        assert!(big.is_empty() && big.capacity() >= 2 * ARENA_CHUNK);
        big.extend_from_slice(&[4; 7]);
        b.push_written();
        let mut out = Vec::new();
        b.fill(0, &mut out, usize::MAX);
        let mut want = Vec::new();
        for (n, len) in [(1u8, 10), (2, 10), (3, 10), (4, 7)] {
            want.extend(std::iter::repeat_n(n, len));
        }
        assert_eq!(out, want);
        assert!(b.ack(4) && b.is_empty());
    }

    #[test]
    fn chunks_are_reused_once_their_frames_are_acknowledged() {
        let mut b = Buffer::new(100_000, usize::MAX);
        let frame_len = 1000;
        let mut chunks = std::collections::BTreeSet::new();
        for round in 0..20u64 {
            // A chunk's worth of frames and more, then everything is acknowledged.
            for _ in 0..100 {
                let out = b.frame_space(frame_len);
                out.extend_from_slice(&[1; 1000]);
                chunks.insert(out.as_ptr() as usize & !(ARENA_CHUNK - 1));
                b.push_written();
            }
            assert!(b.ack(b.stats().2), "round {round}");
        }
        // 2,000 frames of 1,000 bytes: 31 chunks if none were reused.
        assert!(chunks.len() <= 8, "{} chunks", chunks.len());
        // A huge frame gets a chunk of its own, which is not kept.
        let out = b.frame_space(4 * ARENA_CHUNK);
        out.extend_from_slice(&vec![2; 4 * ARENA_CHUNK]);
        b.push_written();
        b.frame_space(10).extend_from_slice(&[3; 10]);
        b.push_written();
        b.ack(b.stats().2);
        assert!(b.spare.len() <= IDLE_SPARE_CHUNKS);
        assert!(b.spare.iter().all(|(_, size)| *size == ARENA_CHUNK));
        assert_eq!(b.spare_bytes, b.spare.len() * ARENA_CHUNK);
    }

    #[test]
    fn a_run_of_large_frames_reuses_its_chunks_across_acks_that_empty_the_buffer() {
        let mut b = Buffer::new(100_000, 8 << 20);
        let len = 2 * ARENA_CHUNK + 100;
        let mut chunks = std::collections::BTreeSet::new();
        for _ in 0..50 {
            // A few frames in flight, then every one is acknowledged: the buffer empties.
            for _ in 0..4 {
                let out = b.frame_space(len);
                chunks.insert(out.as_ptr() as usize);
                out.extend_from_slice(&vec![7; len]);
                b.push_written();
            }
            assert!(b.ack(b.stats().2) && b.is_empty());
            assert!(b.spare_bytes >= 3 * len, "the run's chunks are kept");
        }
        // 200 frames: 200 chunks if none were reused.
        assert!(chunks.len() <= 5, "{} chunks", chunks.len());
        assert!(b.spare_bytes <= 8 << 20);
        // A small frame ends the run: the next ack that empties the buffer frees them.
        b.frame_space(10).extend_from_slice(&[3; 10]);
        b.push_written();
        b.ack(b.stats().2);
        assert!(b.spare.iter().all(|(_, size)| *size == ARENA_CHUNK));
        assert!(b.spare.len() <= IDLE_SPARE_CHUNKS);
    }

    /// `Buffer::gather` into `slots` slots: the frames' first bytes and the first seq.
    fn gathered(b: &Buffer, cursor: Seq, slots: usize, limit: usize) -> (Vec<u8>, Seq) {
        let mut out = vec![IoSlice::new(&[]); slots];
        let (n, first) = b.gather(cursor, &mut out, limit);
        let firsts = out.iter().take(n).map(|s| s[0]).collect();
        (firsts, first)
    }

    #[test]
    fn gather_gives_the_frames_after_the_cursor_as_slices() {
        let mut b = Buffer::new(100, 10_000);
        assert_eq!(gathered(&b, 0, 3, 100), (vec![], 1), "nothing buffered");
        for i in 1..=6u8 {
            b.push(frame(i, 4));
        }
        assert_eq!(gathered(&b, 1, 3, 8), (vec![2, 3], 2), "up to the limit");
        assert_eq!(
            gathered(&b, 0, 3, 1000),
            (vec![1, 2, 3], 1),
            "at most the slots given"
        );
        assert_eq!(
            gathered(&b, 4, 3, 1),
            (vec![5], 5),
            "one frame even over the limit"
        );
        assert_eq!(gathered(&b, 6, 3, 100), (vec![], 7), "nothing new");
        assert_eq!(
            (b.count_after(0), b.count_after(4), b.count_after(9)),
            (6, 2, 0)
        );
        b.ack(4);
        assert_eq!(
            gathered(&b, 1, 3, 100),
            (vec![5, 6], 5),
            "acked events are skipped"
        );
        assert_eq!(b.count_after(1), 2, "acked events are not counted");
        assert_eq!(b.frame(4), None, "acknowledged");
        assert_eq!(b.frame(6).map(|f| f[0]), Some(6));
        assert_eq!(b.frame(7), None, "not yet");
    }

    #[test]
    fn fill_sends_what_follows_the_cursor_in_batches() {
        let mut b = Buffer::new(100, 10_000);
        for i in 1..=6u8 {
            b.push(frame(i, 4));
        }
        let mut out = Vec::new();
        assert_eq!(b.fill(2, &mut out, 8), 4);
        assert_eq!(out, [3, 3, 3, 3, 4, 4, 4, 4]);
        out.clear();
        assert_eq!(b.fill(4, &mut out, 1000), 6);
        assert_eq!(out.len(), 8);
        out.clear();
        assert_eq!(b.fill(6, &mut out, 1000), 6, "nothing new");
        assert!(out.is_empty());
        b.ack(5);
        assert_eq!(b.fill(0, &mut out, 1000), 6, "acked events are skipped");
        assert_eq!(out, [6, 6, 6, 6]);
        out.clear();
        assert_eq!(b.fill(0, &mut out, 1), 6, "one frame even over the limit");
        out.clear();
        b.push(frame(7, 100));
        assert_eq!(b.fill(5, &mut out, 50), 6, "the large frame waits");
        assert_eq!(b.next_large(5, 50), None, "6 is small");
        let (seq, big) = b.next_large(6, 50).expect("7 is large");
        assert_eq!((seq, big.len()), (7, 100));
        assert_eq!(b.next_large(7, 50), None, "nothing after 7");
    }
}
