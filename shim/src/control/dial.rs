//! Dial-out (`--control-connect`): the shim calls the control plane, for sandboxes that
//! cannot be reached from outside (NAT, a microVM's vsock to its host).
//!
//! One `spawn_local` task, for as long as the server lives:
//!
//! ```text
//!  ┌─► wait while our consumer is connected otherwise (any consumer, at first): no thrashing
//!  │   dial, bounded by the connect timeout ── failed ──► sleep backoff ──┐
//!  │   serve it like an accepted one (hello both ways, auth)              │
//!  │   wait for it to end; authenticated? backoff reset : sleep backoff ──┤
//!  └──────────────────────────────────────────────────────────────────────┘
//! ```
//!
//! The delays are the project's one backoff rule ([`Backoff`], ± jitter around a capped
//! exponential), set up by [`backoff`] to be what they have always been: between half and
//! all of a step that doubles from 100 ms up to the cap (`--control-reconnect-max`), so that a
//! fleet of shims whose control plane restarts does not redial in step. Nothing here blocks the
//! supervisor: it is a task of its own, and every wait is a timer or a socket.

use std::rc::Rc;
use std::time::Duration;

use driver_protocol::Backoff;
use tracing::{debug, info, warn};

use super::addr::ControlAddr;
use super::{conn, transport, Inner, Origin};

/// The first step of the dial-out backoff: the first delay is between half of it and all
/// of it.
pub(super) const FIRST_STEP: Duration = Duration::from_millis(100);

/// The dial-out backoff for the cap `cap` (`--control-reconnect-max`): the delay before
/// redial n (0 = the first) is between half and all of `min(FIRST_STEP · 2^n, cap)`, drawn
/// uniformly. In the terms of [`Backoff`]: three quarters of that step, ± a third.
pub(super) fn backoff(cap: Duration) -> Backoff {
    Backoff {
        initial: FIRST_STEP - FIRST_STEP / 4,
        max: cap - cap / 4,
        factor: 2.0,
        jitter: 1.0 / 3.0,
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

/// The delay before redial `attempt`, which it then counts.
fn next_delay(backoff: &Backoff, attempt: &mut u32) -> Duration {
    let delay = backoff.delay(*attempt, random_unit());
    *attempt = attempt.saturating_add(1);
    delay
}

/// Dials `addr` whenever no connection is live, until aborted.
pub(super) async fn dial_loop(addr: ControlAddr, inner: Rc<Inner>) {
    let backoff = backoff(inner.tuning.reconnect_max);
    // Redials since the last authenticated connection.
    let mut attempt = 0;
    // The consumer the control plane's dialed connections were, once one authenticated.
    let mut ours: Option<String> = None;
    loop {
        // The control plane is connected otherwise (e.g. accepted on the listener) as the
        // consumer our dialed connection was (any consumer, before we know): wait for it to
        // end, rather than replace it and be replaced in turn. Other consumers and observers
        // (an operator's tools) do not stop the dialing.
        while let Some(live) = inner.live(ours.as_deref()) {
            live.closed().await;
        }
        debug!(addr = %addr, "dialing the control plane");
        let dialed =
            tokio::time::timeout(inner.tuning.connect_timeout, transport::dial(&addr)).await;
        let halves = match dialed {
            Ok(Ok(halves)) => halves,
            Ok(Err(err)) => {
                let delay = next_delay(&backoff, &mut attempt);
                debug!(addr = %addr, error = %err, ?delay, "control plane unreachable");
                tokio::time::sleep(delay).await;
                continue;
            }
            Err(_) => {
                let delay = next_delay(&backoff, &mut attempt);
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
            let delay = next_delay(&backoff, &mut attempt);
            tokio::time::sleep(delay).await;
            continue;
        };
        conn.closed().await;
        if let Some(name) = conn.consumer() {
            ours = Some(name);
        }
        if conn.authenticated() {
            info!(addr = %addr, "the dialed control connection ended; redialing");
            attempt = 0;
            // A short pause even so: a control plane that accepts and at once drops an
            // authenticated connection must not make the shim spin.
            tokio::time::sleep(next_delay(&backoff, &mut attempt)).await;
        } else {
            let delay = next_delay(&backoff, &mut attempt);
            debug!(addr = %addr, ?delay, "the dialed control connection did not authenticate");
            tokio::time::sleep(delay).await;
        }
    }
}
