//! Auto-wake: a task submitted to a paused (frozen) agent wakes it first.
//!
//! The platform pauses an idle agent (`pause`, then it freezes the container) and gives
//! control-link a [`WakeHook`] that unfreezes it. [`Client::submit_task`](crate::Client::submit_task)
//! then looks the same whether the agent was running or paused:
//!
//! ```text
//!  submit_task ─► needs a wake? (last known state pausing/paused, or no connection)
//!        │ no                          │ yes: one waker per agent (a lock); the others wait
//!        ▼                             ▼      for it, then find the agent awake
//!     deliver              hook(agent) ─► redial now ─► poll status (bounded):
//!                                          paused ─► resume ─► … ─► ready ─► deliver
//! ```
//!
//! The last known state comes from the agent's `state_changed`/`paused` events (when the
//! events are streamed), from `status` replies, and from this client's own `pause` and
//! `resume`.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use driver_protocol::message::DriverState;
use futures_core::future::BoxFuture;
use tokio::sync::Mutex;

use crate::AgentId;

/// What a wake hook may fail with.
pub type WakeError = Box<dyn std::error::Error + Send + Sync>;

/// An async hook that makes a paused agent's sandbox run again (e.g. `docker unpause`),
/// called with the agent's id. It must succeed when the sandbox already runs.
///
/// ```
/// use std::sync::Arc;
/// use control_link::{AgentId, WakeHook};
/// let hook: WakeHook = Arc::new(|agent: AgentId| {
///     Box::pin(async move {
///         println!("unfreezing {agent}");
///         Ok(())
///     })
/// });
/// ```
pub type WakeHook = Arc<dyn Fn(AgentId) -> BoxFuture<'static, Result<(), WakeError>> + Send + Sync>;

/// Boxes a closure returning a future into a [`WakeHook`].
pub(crate) fn hook<F, Fut, E>(f: F) -> WakeHook
where
    F: Fn(AgentId) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<WakeError>,
{
    Arc::new(move |agent| {
        let fut = f(agent);
        Box::pin(async move { fut.await.map_err(Into::into) })
    })
}

/// Per-client wake state, shared by the session and the client handles.
#[derive(Debug, Default)]
pub(crate) struct WakeState {
    /// The last known state is `pausing` or `paused`.
    paused: AtomicBool,
    /// Held by the one submit that wakes the agent; the others wait on it.
    pub(crate) lock: Mutex<()>,
}

impl WakeState {
    /// Records the driver's state as last seen.
    pub(crate) fn saw_state(&self, state: DriverState) {
        let paused = matches!(state, DriverState::Pausing | DriverState::Paused);
        self.paused.store(paused, Ordering::Release);
    }

    /// Whether the last known state is `pausing` or `paused`.
    pub(crate) fn paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }
}

/// How often the state is polled while waking.
pub(crate) const WAKE_POLL: Duration = Duration::from_millis(25);

/// Each status request while waking gets at most this (then it is asked again): a frozen
/// shim does not answer, a thawed one at once.
pub(crate) const WAKE_STATUS_TRY: Duration = Duration::from_secs(1);
