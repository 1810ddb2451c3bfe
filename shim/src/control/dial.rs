//! Dial-out (`--control-connect`): the shim calls the control plane, for sandboxes that
//! cannot be reached from outside (NAT, a microVM's vsock to its host).
//!
//! One `spawn_local` task, for as long as the server lives:
//!
//! ```text
//!  ┌─► wait while any connection is live (accepted or dialed): no thrashing
//!  │   dial, bounded by the connect timeout ── failed ──► sleep backoff ──┐
//!  │   serve it like an accepted one (hello both ways, auth)              │
//!  │   wait for it to end; authenticated? backoff reset : sleep backoff ──┤
//!  └──────────────────────────────────────────────────────────────────────┘
//! ```
//!
//! The backoff doubles from [`Backoff::INITIAL`] up to the cap (`--control-reconnect-max`),
//! each delay drawn between half and all of the current step (jitter, so a fleet of shims
//! whose control plane restarts does not redial in step). Nothing here blocks the
//! supervisor: it is a task of its own, and every wait is a timer or a socket.

use std::rc::Rc;
use std::time::Duration;

use tracing::{debug, info, warn};

use super::addr::ControlAddr;
use super::{conn, transport, Inner, Origin};

/// Capped exponential backoff with jitter.
#[derive(Debug, Clone)]
pub(super) struct Backoff {
    step: Duration,
    cap: Duration,
}

impl Backoff {
    /// The first delay step.
    pub(super) const INITIAL: Duration = Duration::from_millis(100);

    /// A backoff starting at [`Self::INITIAL`] (or `cap` if smaller), doubling up to `cap`.
    pub(super) fn new(cap: Duration) -> Self {
        Self {
            step: Self::INITIAL.min(cap),
            cap,
        }
    }

    /// Back to the first step.
    pub(super) fn reset(&mut self) {
        self.step = Self::INITIAL.min(self.cap);
    }

    /// The next delay: uniformly between half the step and the whole step (`unit` in
    /// [0, 1) picks where); the step then doubles, up to the cap.
    pub(super) fn next_delay(&mut self, unit: f64) -> Duration {
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let delay = self.step.mul_f64(0.5 + 0.5 * unit);
        self.step = self.step.saturating_mul(2).min(self.cap);
        delay
    }
}

/// A number in [0, 1) from the kernel's random pool (0.5 if it is unavailable).
fn random_unit() -> f64 {
    let mut b = [0u8; 8];
    match crate::sys::getrandom(&mut b) {
        Ok(()) => (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64,
        Err(_) => 0.5,
    }
}

/// Dials `addr` whenever no connection is live, until aborted.
pub(super) async fn dial_loop(addr: ControlAddr, inner: Rc<Inner>) {
    let mut backoff = Backoff::new(inner.tuning.reconnect_max);
    loop {
        // Another connection (e.g. accepted on the listener) is live: wait for it to end.
        while let Some(live) = inner.live() {
            live.closed().await;
        }
        debug!(addr = %addr, "dialing the control plane");
        let dialed =
            tokio::time::timeout(inner.tuning.connect_timeout, transport::dial(&addr)).await;
        let halves = match dialed {
            Ok(Ok(halves)) => halves,
            Ok(Err(err)) => {
                let delay = backoff.next_delay(random_unit());
                debug!(addr = %addr, error = %err, ?delay, "control plane unreachable");
                tokio::time::sleep(delay).await;
                continue;
            }
            Err(_) => {
                let delay = backoff.next_delay(random_unit());
                warn!(addr = %addr, timeout = ?inner.tuning.connect_timeout, ?delay,
                    "dialing the control plane timed out");
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        let Some(conn) = conn::start(
            halves,
            &inner,
            Origin::Dialed(addr.to_string()),
            inner.next_id(),
        ) else {
            let delay = backoff.next_delay(random_unit());
            tokio::time::sleep(delay).await;
            continue;
        };
        conn.closed().await;
        if conn.authenticated() {
            info!(addr = %addr, "the dialed control connection ended; redialing");
            backoff.reset();
            // A short pause even so: a control plane that accepts and at once drops an
            // authenticated connection must not make the shim spin.
            tokio::time::sleep(backoff.next_delay(random_unit())).await;
        } else {
            let delay = backoff.next_delay(random_unit());
            debug!(addr = %addr, ?delay, "the dialed control connection did not authenticate");
            tokio::time::sleep(delay).await;
        }
    }
}
