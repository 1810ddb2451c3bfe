//! The gate in front of the handshake: what keeps clients that cannot authenticate from
//! costing the shim more than a little, without letting them keep the real control plane
//! out.
//!
//! - **Failed handshakes are rate-limited per peer** (per IP address for TCP; all unix
//!   clients share one bucket — the socket is root's, mode 0600 — and so do all vsock
//!   clients): a token bucket of [`FAILURE_BURST`] failures at once, refilled at
//!   [`FAILURE_REFILL`] per second. While a peer's bucket is empty, its new connections are
//!   closed as soon as they are accepted: no `hello`, no handshake work, no log line each. A
//!   flood from one address therefore costs that address only: the control plane, connecting
//!   from another, is let in. A connection that closes without sending a byte (a TCP health
//!   check) is not a failure.
//! - **Connections still in their handshake are capped**: [`MAX_PENDING`] in all and a
//!   quarter of that per peer, so that one address holding handshakes open cannot fill every
//!   slot; over a cap a new connection is closed at once, and counted the same way.
//! - At most [`MAX_PEERS`] peers are remembered; buckets of peers that are idle and full are
//!   forgotten first. With every slot taken by peers still misbehaving, a new address is
//!   turned away as if the pending cap were reached.
//!
//! How many connections were closed unheard is logged at most once a second. The live
//! connection is never touched by any of this: it passed the gate long ago.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Failed handshakes that one peer may have at once.
pub(super) const FAILURE_BURST: f64 = 10.0;
/// Failed handshakes allowed per second to one peer, in the long run.
pub(super) const FAILURE_REFILL: f64 = 5.0;
/// Connections allowed in their handshake at the same time, from all peers.
pub(super) const MAX_PENDING: usize = 64;
/// Peers whose buckets are remembered.
pub(super) const MAX_PEERS: usize = 1024;
/// How often the count of connections closed unheard is logged.
const REPORT_EVERY: Duration = Duration::from_secs(1);

/// Who a connection comes from, as far as the gate is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum PeerKey {
    /// A TCP peer, by address (its port changes with every connection).
    Ip(IpAddr),
    /// Any unix-socket client.
    Unix,
    /// Any vsock client.
    Vsock,
}

/// Why the gate turned a connection away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refused {
    /// Too many failed handshakes lately from this peer.
    Failures,
    /// Too many connections in their handshake (in all, or from this peer).
    Pending,
}

/// Counts of connections closed unheard since the last report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Suppressed {
    /// Because of failed handshakes.
    pub(super) failures: u64,
    /// Because of the caps on pending handshakes.
    pub(super) pending: u64,
}

/// One peer's bucket of failures and its handshakes in progress.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
    pending: usize,
}

/// The token buckets of failed handshakes and the counts of pending ones.
#[derive(Debug)]
pub(super) struct Gate {
    burst: f64,
    refill: f64,
    max_pending: usize,
    max_pending_per_peer: usize,
    peers: HashMap<PeerKey, Bucket>,
    pending: usize,
    suppressed: Suppressed,
    reported: Option<Instant>,
}

impl Gate {
    /// Buckets of `burst` failures refilled at `refill` per second, per peer; at most
    /// `max_pending` handshakes at once (a quarter of that, at least 1, per peer).
    pub(super) fn new(burst: f64, refill: f64, max_pending: usize, _now: Instant) -> Self {
        Self {
            burst,
            refill,
            max_pending,
            max_pending_per_peer: (max_pending / 4).max(1),
            peers: HashMap::new(),
            pending: 0,
            suppressed: Suppressed::default(),
            reported: None,
        }
    }

    fn top_up(&self, b: &mut Bucket, now: Instant) {
        let secs = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + secs * self.refill).min(self.burst);
        b.last = now;
    }

    /// The bucket of `peer`, made if new (forgetting idle, full ones when at the limit);
    /// `None` when every slot is taken by peers that still matter.
    fn bucket(&mut self, peer: PeerKey, now: Instant) -> Option<&mut Bucket> {
        if !self.peers.contains_key(&peer) && self.peers.len() >= MAX_PEERS {
            let (burst, refill) = (self.burst, self.refill);
            self.peers.retain(|_, b| {
                let secs = now.saturating_duration_since(b.last).as_secs_f64();
                b.pending > 0 || b.tokens + secs * refill < burst
            });
            if self.peers.len() >= MAX_PEERS {
                return None;
            }
        }
        let burst = self.burst;
        let b = self.peers.entry(peer).or_insert(Bucket {
            tokens: burst,
            last: now,
            pending: 0,
        });
        Some(b)
    }

    /// A connection from `peer` was accepted: may it start a handshake? On `Ok` it counts as
    /// pending until [`Self::finished`].
    pub(super) fn admit(&mut self, peer: PeerKey, now: Instant) -> Result<(), Refused> {
        let (max_pending, per_peer, pending) =
            (self.max_pending, self.max_pending_per_peer, self.pending);
        let mut b = match self.bucket(peer, now) {
            Some(b) => *b,
            None => {
                self.suppressed.pending = self.suppressed.pending.saturating_add(1);
                return Err(Refused::Pending);
            }
        };
        self.top_up(&mut b, now);
        let verdict = if b.tokens < 1.0 {
            Err(Refused::Failures)
        } else if pending >= max_pending || b.pending >= per_peer {
            Err(Refused::Pending)
        } else {
            b.pending += 1;
            Ok(())
        };
        self.peers.insert(peer, b);
        match verdict {
            Ok(()) => self.pending += 1,
            Err(Refused::Failures) => {
                self.suppressed.failures = self.suppressed.failures.saturating_add(1);
            }
            Err(Refused::Pending) => {
                self.suppressed.pending = self.suppressed.pending.saturating_add(1);
            }
        }
        verdict
    }

    /// A handshake of `peer` admitted by [`Self::admit`] ended, `failed` or not.
    pub(super) fn finished(&mut self, peer: PeerKey, failed: bool, now: Instant) {
        self.pending = self.pending.saturating_sub(1);
        let Some(mut b) = self.peers.get(&peer).copied() else {
            return;
        };
        b.pending = b.pending.saturating_sub(1);
        if failed {
            self.top_up(&mut b, now);
            b.tokens = (b.tokens - 1.0).max(0.0);
        }
        self.peers.insert(peer, b);
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
