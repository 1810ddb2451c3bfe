//! The gate in front of the handshake: what keeps clients that cannot authenticate from
//! costing the shim more than a little.
//!
//! - **Failed handshakes are rate-limited** by a token bucket ([`FAILURE_BURST`] failures at
//!   once, refilled at [`FAILURE_REFILL`] per second). While it is empty, new connections
//!   are closed as soon as they are accepted: no `hello`, no handshake work, no log line
//!   each. How many were closed that way is logged at most once a second.
//! - **Connections still in their handshake are capped** ([`MAX_PENDING`]); over the cap a
//!   new connection is closed at once, and counted the same way.
//!
//! The live connection is never touched by any of this: it passed the gate long ago.

use std::time::{Duration, Instant};

/// Failed handshakes that may happen at once.
pub(super) const FAILURE_BURST: f64 = 10.0;
/// Failed handshakes allowed per second, in the long run.
pub(super) const FAILURE_REFILL: f64 = 5.0;
/// Connections allowed in their handshake at the same time.
pub(super) const MAX_PENDING: usize = 16;
/// How often the count of connections closed unheard is logged.
const REPORT_EVERY: Duration = Duration::from_secs(1);

/// Why the gate turned a connection away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refused {
    /// Too many failed handshakes lately.
    Failures,
    /// Too many connections in their handshake.
    Pending,
}

/// Counts of connections closed unheard since the last report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Suppressed {
    /// Because of failed handshakes.
    pub(super) failures: u64,
    /// Because of the cap on pending handshakes.
    pub(super) pending: u64,
}

/// The token bucket of failed handshakes and the count of pending ones.
#[derive(Debug)]
pub(super) struct Gate {
    burst: f64,
    refill: f64,
    max_pending: usize,
    tokens: f64,
    last: Instant,
    pending: usize,
    suppressed: Suppressed,
    reported: Option<Instant>,
}

impl Gate {
    /// A full bucket of `burst` failures refilled at `refill` per second; at most
    /// `max_pending` handshakes at once.
    pub(super) fn new(burst: f64, refill: f64, max_pending: usize, now: Instant) -> Self {
        Self {
            burst,
            refill,
            max_pending,
            tokens: burst,
            last: now,
            pending: 0,
            suppressed: Suppressed::default(),
            reported: None,
        }
    }

    fn top_up(&mut self, now: Instant) {
        let secs = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + secs * self.refill).min(self.burst);
        self.last = now;
    }

    /// A connection was accepted: may it start a handshake? On `Ok` it counts as pending
    /// until [`Self::finished`].
    pub(super) fn admit(&mut self, now: Instant) -> Result<(), Refused> {
        self.top_up(now);
        if self.tokens < 1.0 {
            self.suppressed.failures = self.suppressed.failures.saturating_add(1);
            return Err(Refused::Failures);
        }
        if self.pending >= self.max_pending {
            self.suppressed.pending = self.suppressed.pending.saturating_add(1);
            return Err(Refused::Pending);
        }
        self.pending += 1;
        Ok(())
    }

    /// A handshake admitted by [`Self::admit`] ended, `failed` or not.
    pub(super) fn finished(&mut self, failed: bool, now: Instant) {
        self.pending = self.pending.saturating_sub(1);
        if failed {
            self.top_up(now);
            self.tokens = (self.tokens - 1.0).max(0.0);
        }
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
