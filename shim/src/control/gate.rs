//! The gate in front of the handshake: what keeps clients that cannot authenticate from
//! costing the shim more than a little, and above all from keeping the real control plane
//! out, whatever addresses they use.
//!
//! Everything is counted per [`Source`] (see [`super::source`]): all of the sandbox (its
//! loopback range, its own addresses, the unix clients in its pid namespace) is **one**
//! source, the inside; a peer outside counts by network (/24, /64), or by uid on a unix
//! socket.
//!
//! - **Handshakes in progress are capped, fairly**: [`MAX_PENDING`] in all, at most a quarter
//!   of that from any one source (the inside included). A newcomer over its source's quota is
//!   turned away with `error{code:"busy"}`. When every slot is taken, a newcomer from a source
//!   that holds clearly fewer than the busiest one takes the place of the **busiest source's
//!   oldest** pending connection (which is sent `busy` and closed); a newcomer of the busiest
//!   source itself is turned away. So a source can only ever crowd out itself: a control
//!   plane connecting from outside always finds room, however many connections the inside
//!   holds, opens or closes.
//! - **Failed handshakes are rate-limited per source**: a token bucket of [`FAILURE_BURST`]
//!   failures at once, refilled at [`FAILURE_REFILL`] per second. While a source's bucket is
//!   empty its new connections are sent `error{code:"limit"}` and closed as soon as they are
//!   accepted: no `hello`, no handshake work, no log line each. A wrong token, a bad frame, a
//!   handshake not completed in time count as failures; a connection that closes without
//!   sending a byte (a TCP health check), or that is evicted, does not.
//! - The deadlines (the peer's `hello` within a second, the whole handshake within three, in
//!   `conn.rs`) bound how long any pending connection holds its slot, one byte a second or
//!   not.
//! - At most [`MAX_SOURCES`] sources are remembered; idle ones with full buckets are
//!   forgotten first. With every entry taken by sources still misbehaving, a new source is
//!   turned away as `busy`.
//!
//! How many connections were turned away is logged at most once a second. The live
//! connection is never touched by any of this: it passed the gate long ago.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

pub(super) use super::source::Source;

/// Failed handshakes that one source may have at once.
pub(super) const FAILURE_BURST: f64 = 10.0;
/// Failed handshakes allowed per second to one source, in the long run.
pub(super) const FAILURE_REFILL: f64 = 5.0;
/// Connections allowed in their handshake at the same time, from all sources.
pub(super) const MAX_PENDING: usize = 64;
/// Sources whose buckets are remembered.
pub(super) const MAX_SOURCES: usize = 1024;
/// How often the count of connections turned away is logged.
const REPORT_EVERY: Duration = Duration::from_secs(1);

/// Why the gate turned a connection away; each is an `error` code sent before the close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refused {
    /// Too many failed handshakes lately from this source (`limit`).
    Failures,
    /// Too many handshakes pending from this source, or in all (`busy`).
    Busy,
}

/// A connection the gate let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Admitted {
    /// The pending connection whose place it took: to be sent `busy` and closed.
    pub(super) evict: Option<u64>,
}

/// Counts of connections turned away since the last report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Suppressed {
    /// Because of failed handshakes (`limit`).
    pub(super) failures: u64,
    /// Because their source had its share of pending handshakes (`busy`).
    pub(super) busy: u64,
    /// Pending connections closed to make room for another source's.
    pub(super) evicted: u64,
}

/// One source's bucket of failures and its handshakes in progress, oldest first.
#[derive(Debug, Clone)]
struct Entry {
    tokens: f64,
    last: Instant,
    pending: VecDeque<u64>,
}

/// The token buckets of failed handshakes and the pending handshakes, per source.
#[derive(Debug)]
pub(super) struct Gate {
    burst: f64,
    refill: f64,
    max_pending: usize,
    per_source: usize,
    sources: HashMap<Source, Entry>,
    pending: usize,
    suppressed: Suppressed,
    reported: Option<Instant>,
}

impl Gate {
    /// Buckets of `burst` failures refilled at `refill` per second, per source; at most
    /// `max_pending` handshakes at once, a quarter of that (at least 1) per source.
    pub(super) fn new(burst: f64, refill: f64, max_pending: usize) -> Self {
        Self {
            burst,
            refill,
            max_pending: max_pending.max(1),
            per_source: (max_pending / 4).max(1),
            sources: HashMap::new(),
            pending: 0,
            suppressed: Suppressed::default(),
            reported: None,
        }
    }

    /// `entry`'s tokens as of `now`.
    fn top_up(&self, entry: &mut Entry, now: Instant) {
        let secs = now.saturating_duration_since(entry.last).as_secs_f64();
        entry.tokens = (entry.tokens + secs * self.refill).min(self.burst);
        entry.last = now;
    }

    /// Makes room for a new source's entry if needed; false when every entry still matters.
    fn room_for(&mut self, source: Source, now: Instant) -> bool {
        if self.sources.contains_key(&source) || self.sources.len() < MAX_SOURCES {
            return true;
        }
        let (burst, refill) = (self.burst, self.refill);
        self.sources.retain(|_, e| {
            let secs = now.saturating_duration_since(e.last).as_secs_f64();
            !e.pending.is_empty() || e.tokens + secs * refill < burst
        });
        self.sources.len() < MAX_SOURCES
    }

    /// The source with the most pending handshakes (ties: the one whose oldest is oldest,
    /// i.e. has the smallest connection id), and how many it has.
    fn busiest(&self) -> Option<(Source, usize)> {
        self.sources
            .iter()
            .filter_map(|(s, e)| e.pending.front().map(|&first| (*s, e.pending.len(), first)))
            .max_by(|a, b| a.1.cmp(&b.1).then(b.2.cmp(&a.2)))
            .map(|(s, n, _)| (s, n))
    }

    /// Connection `conn` from `source` was accepted: may it start a handshake? When
    /// admitted it counts as pending until [`Self::finished`] (or until evicted).
    pub(super) fn admit(
        &mut self,
        source: Source,
        conn: u64,
        now: Instant,
    ) -> Result<Admitted, Refused> {
        let verdict = self.decide(source, conn, now);
        match verdict {
            Ok(Admitted { evict: Some(_) }) => {
                self.suppressed.evicted = self.suppressed.evicted.saturating_add(1);
            }
            Ok(_) => {}
            Err(Refused::Failures) => {
                self.suppressed.failures = self.suppressed.failures.saturating_add(1);
            }
            Err(Refused::Busy) => self.suppressed.busy = self.suppressed.busy.saturating_add(1),
        }
        verdict
    }

    fn decide(&mut self, source: Source, conn: u64, now: Instant) -> Result<Admitted, Refused> {
        if !self.room_for(source, now) {
            return Err(Refused::Busy);
        }
        let burst = self.burst;
        let mut entry = self.sources.remove(&source).unwrap_or(Entry {
            tokens: burst,
            last: now,
            pending: VecDeque::new(),
        });
        self.top_up(&mut entry, now);
        let mine = entry.pending.len();
        let verdict = if entry.tokens < 1.0 {
            Err(Refused::Failures)
        } else if mine >= self.per_source {
            Err(Refused::Busy)
        } else if self.pending < self.max_pending {
            Ok(Admitted { evict: None })
        } else {
            // Full: the newcomer takes the busiest source's oldest place, if its own source
            // holds clearly fewer (two fewer: two sources of equal weight do not take turns
            // evicting each other).
            match self.busiest() {
                Some((victim, theirs)) if mine + 1 < theirs => {
                    let evicted = self
                        .sources
                        .get_mut(&victim)
                        .and_then(|e| e.pending.pop_front());
                    if evicted.is_some() {
                        self.pending = self.pending.saturating_sub(1);
                    }
                    Ok(Admitted { evict: evicted })
                }
                _ => Err(Refused::Busy),
            }
        };
        if verdict.is_ok() {
            entry.pending.push_back(conn);
            self.pending += 1;
        }
        self.sources.insert(source, entry);
        verdict
    }

    /// The handshake of `conn` from `source` ended, `failed` or not. Nothing happens for a
    /// connection the gate no longer counts (it was evicted).
    pub(super) fn finished(&mut self, source: Source, conn: u64, failed: bool, now: Instant) {
        let Some(mut entry) = self.sources.remove(&source) else {
            return;
        };
        if let Some(at) = entry.pending.iter().position(|&c| c == conn) {
            entry.pending.remove(at);
            self.pending = self.pending.saturating_sub(1);
            if failed {
                self.top_up(&mut entry, now);
                entry.tokens = (entry.tokens - 1.0).max(0.0);
            }
        }
        self.sources.insert(source, entry);
    }

    /// Handshakes in progress.
    #[cfg(test)]
    pub(super) fn pending(&self) -> usize {
        self.pending
    }

    /// The counts to log now, if any and if the last report is a second old; resets them.
    pub(super) fn report(&mut self, now: Instant) -> Option<Suppressed> {
        if self.suppressed == Suppressed::default() {
            return None;
        }
        if self
            .reported
            .is_some_and(|at| now.saturating_duration_since(at) < REPORT_EVERY)
        {
            return None;
        }
        self.reported = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INSIDE: Source = Source::Inside;

    fn net(n: u8) -> Source {
        Source::Net4([10, 0, n])
    }

    /// A gate and a fake clock: `at(ms)` is that many milliseconds after the start.
    fn gate(burst: f64, refill: f64, max: usize) -> (Gate, impl Fn(u64) -> Instant) {
        let t0 = Instant::now();
        (Gate::new(burst, refill, max), move |ms| {
            t0 + Duration::from_millis(ms)
        })
    }

    const IN: Result<Admitted, Refused> = Ok(Admitted { evict: None });

    #[test]
    fn failures_are_rate_limited_per_source_and_refill() {
        let (mut g, at) = gate(3.0, 2.0, 8);
        let (a, b) = (net(1), net(2));
        // Three failures empty the bucket.
        for conn in 0..3 {
            assert_eq!(g.admit(a, conn, at(0)), IN);
            g.finished(a, conn, true, at(0));
        }
        for conn in 3..8 {
            assert_eq!(g.admit(a, conn, at(0)), Err(Refused::Failures));
        }
        assert_eq!(g.pending(), 0);
        // Another source is not slowed by the first one's failures.
        assert_eq!(g.admit(b, 10, at(0)), IN);
        g.finished(b, 10, false, at(0));
        // Half a second refills one token (2 per second); a success costs nothing.
        assert_eq!(g.admit(a, 11, at(500)), IN);
        g.finished(a, 11, false, at(500));
        assert_eq!(g.admit(a, 12, at(500)), IN);
        g.finished(a, 12, true, at(500));
        assert_eq!(g.admit(a, 13, at(500)), Err(Refused::Failures));
        // A long pause refills to the burst, no further.
        for conn in 20..23 {
            assert_eq!(g.admit(a, conn, at(60_000)), IN);
            g.finished(a, conn, true, at(60_000));
        }
        assert_eq!(g.admit(a, 23, at(60_000)), Err(Refused::Failures));
        // Silent connections that never failed leave the bucket as it was.
        for conn in 30..60 {
            assert_eq!(g.admit(b, conn, at(60_000)), IN);
            g.finished(b, conn, false, at(60_000));
        }
    }

    #[test]
    fn a_source_holds_at_most_a_quarter_and_the_newcomer_over_it_is_refused() {
        let (mut g, at) = gate(10.0, 5.0, 16);
        for conn in 0..4 {
            assert_eq!(g.admit(INSIDE, conn, at(0)), IN);
        }
        // The inside's fifth: busy. Its earlier connections are untouched.
        assert_eq!(g.admit(INSIDE, 4, at(0)), Err(Refused::Busy));
        assert_eq!(g.pending(), 4);
        // Every other source still gets in.
        for n in 1..=3 {
            assert_eq!(g.admit(net(n), 100 + u64::from(n), at(0)), IN);
        }
        // One of the inside's ends: room for exactly one more of its own.
        g.finished(INSIDE, 2, false, at(1));
        assert_eq!(g.admit(INSIDE, 5, at(1)), IN);
        assert_eq!(g.admit(INSIDE, 6, at(1)), Err(Refused::Busy));
        // A connection of one source is never counted against another.
        g.finished(net(1), 3, false, at(1));
        assert_eq!(g.pending(), 7);
    }

    #[test]
    fn when_full_a_newcomer_takes_the_busiest_sources_oldest_place() {
        let (mut g, at) = gate(10.0, 5.0, 16);
        // Four sources of four fill every slot (the inside first, so its oldest is 0).
        let mut conn = 0;
        for s in [INSIDE, net(1), net(2), net(3)] {
            for _ in 0..4 {
                assert_eq!(g.admit(s, conn, at(conn)), IN);
                conn += 1;
            }
        }
        assert_eq!(g.pending(), 16);
        // A full source's newcomer: refused, nobody evicted.
        assert_eq!(g.admit(INSIDE, 100, at(100)), Err(Refused::Busy));
        assert_eq!(g.admit(net(2), 101, at(100)), Err(Refused::Busy));
        // A new source: the busiest, oldest (the inside's conn 0) makes room.
        let outside = net(9);
        assert_eq!(
            g.admit(outside, 102, at(100)),
            Ok(Admitted { evict: Some(0) })
        );
        assert_eq!(g.pending(), 16);
        // The evicted connection's own end changes nothing (it is no longer counted).
        g.finished(INSIDE, 0, true, at(101));
        assert_eq!(g.pending(), 16);
        // Next: the busiest are now net 1..3 (4 each); the oldest of them goes.
        assert_eq!(
            g.admit(outside, 103, at(102)),
            Ok(Admitted { evict: Some(4) })
        );
        // Two sources of equal weight do not evict each other: net(9) has 2, the busiest 4
        // → 3 fine; then at 3 against 4 it stops.
        assert_eq!(
            g.admit(outside, 104, at(103)),
            Ok(Admitted { evict: Some(8) })
        );
        assert_eq!(g.admit(outside, 105, at(104)), Err(Refused::Busy));
        let report = g.report(at(105)).unwrap();
        assert_eq!(
            report,
            Suppressed {
                failures: 0,
                busy: 3,
                evicted: 3
            }
        );
        assert_eq!(g.report(at(106)), None, "reset; nothing new");
    }

    #[test]
    fn an_inside_that_churns_connections_never_refuses_the_outside() {
        // A model of the attack: the inside keeps opening connections as fast as it can
        // (each refused or taking a place), and fails handshakes; the outside's one
        // connection attempt every 10 ms is always admitted.
        let (mut g, at) = gate(FAILURE_BURST, FAILURE_REFILL, MAX_PENDING);
        let mut conn = 0u64;
        let mut inside_open: VecDeque<u64> = VecDeque::new();
        for ms in 0..10_000u64 {
            for _ in 0..20 {
                conn += 1;
                if g.admit(INSIDE, conn, at(ms)).is_ok() {
                    inside_open.push_back(conn);
                }
            }
            // Some of the inside's end as failures (wrong tokens).
            if ms % 3 == 0 {
                if let Some(c) = inside_open.pop_front() {
                    g.finished(INSIDE, c, true, at(ms));
                }
            }
            if ms % 10 == 0 {
                conn += 1;
                let who = net((ms % 7) as u8);
                assert!(
                    g.admit(who, conn, at(ms)).is_ok(),
                    "outside refused at {ms} ms"
                );
                g.finished(who, conn, false, at(ms));
            }
        }
        assert!(g.pending() <= MAX_PENDING / 4);
    }

    #[test]
    fn forgotten_sources_make_room_and_busy_ones_do_not() {
        let (mut g, at) = gate(2.0, 0.001, 4 * MAX_SOURCES);
        // Every entry taken by sources with an empty bucket.
        for n in 0..MAX_SOURCES as u64 {
            let s = Source::Net6([0, 0, 0, 0, 0, 0, (n >> 8) as u8, n as u8]);
            for k in 0..2 {
                assert_eq!(g.admit(s, n * 2 + k, at(0)), IN);
                g.finished(s, n * 2 + k, true, at(0));
            }
        }
        assert_eq!(g.admit(net(1), 1 << 40, at(1)), Err(Refused::Busy));
        // Once they refill (0.001/s: after 2000 s), they are forgotten.
        assert_eq!(g.admit(net(1), 1 << 41, at(2_001_000)), IN);
    }
}
