//! How a client connects, retries and acknowledges: [`ConnectOptions`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use driver_protocol::message::Seq;
pub use driver_protocol::Backoff;

use crate::{Addr, Client, Error, Token};

/// Who acknowledges events to the shim.
///
/// ```
/// use control_link::{AckMode, ConnectOptions};
/// let opts = ConnectOptions::new().ack_mode(AckMode::Manual);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AckMode {
    /// Every event the [`EventStream`](crate::EventStream) hands out counts as processed;
    /// acks are batched (every 64 events, every MiB of events, or after 200 ms, and when the
    /// stream is dropped or the client closed).
    #[default]
    Auto,
    /// Only [`Client::ack`] acknowledges: call it once the events are durably processed.
    Manual,
}

/// A caller-provided cursor per agent: the last seq it processed (0 = none).
///
/// ```
/// use std::sync::Arc;
/// let cursors: control_link::CursorFn = Arc::new(|agent: &str| if agent == "a1" { 7 } else { 0 });
/// assert_eq!(cursors("a1"), 7);
/// ```
pub type CursorFn = Arc<dyn Fn(&str) -> Seq + Send + Sync>;

/// Options for [`Client`]s, [`Listener`](crate::Listener)s and [`Fleet`](crate::Fleet)s.
///
/// ```no_run
/// use std::time::Duration;
/// use control_link::{AckMode, ConnectOptions, Token};
///
/// # async fn demo() -> Result<(), control_link::Error> {
/// let client = ConnectOptions::new()
///     .token(Token::from_file("/run/secrets/agent-token")?)
///     .request_timeout(Duration::from_secs(5))
///     .ack_mode(AckMode::Manual)
///     .resume_from(1041) // the cursor persisted by the last run
///     .connect(&"tcp:10.0.0.7:7000".parse()?)
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ConnectOptions {
    pub(crate) token: Option<Token>,
    pub(crate) request_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) backoff: Backoff,
    pub(crate) ack_mode: AckMode,
    pub(crate) resume_from: Seq,
    pub(crate) cursors: Option<CursorFn>,
    pub(crate) expect_agent_id: Option<String>,
    pub(crate) event_buffer: usize,
    pub(crate) attach_buffer: usize,
    pub(crate) max_frame: usize,
    pub(crate) reconnect: bool,
    pub(crate) give_up_after: Option<Duration>,
    pub(crate) keepalive: Duration,
    pub(crate) wake_hook: Option<crate::WakeHook>,
    pub(crate) wake_timeout: Duration,
    pub(crate) max_handshakes: usize,
    pub(crate) consumer: Option<String>,
    pub(crate) from_now: bool,
}

impl fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("token", &self.token)
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("backoff", &self.backoff)
            .field("ack_mode", &self.ack_mode)
            .field("resume_from", &self.resume_from)
            .field("cursors", &self.cursors.is_some())
            .field("expect_agent_id", &self.expect_agent_id)
            .field("event_buffer", &self.event_buffer)
            .field("attach_buffer", &self.attach_buffer)
            .field("max_frame", &self.max_frame)
            .field("reconnect", &self.reconnect)
            .field("give_up_after", &self.give_up_after)
            .field("keepalive", &self.keepalive)
            .field("wake_hook", &self.wake_hook.is_some())
            .field("wake_timeout", &self.wake_timeout)
            .field("max_handshakes", &self.max_handshakes)
            .field("consumer", &self.consumer)
            .field("from_now", &self.from_now)
            .finish()
    }
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl ConnectOptions {
    /// The defaults: no token, 10 s per request, 10 s to connect and authenticate, backoff
    /// 100 ms → 5 s ± 20 %, auto acks, resume from 0, 256 buffered events, 16 MiB frames,
    /// reconnect forever, keepalive after 15 s of silence, no wake hook (30 s to wake with
    /// one), 128 handshakes at a time on a listener, the durable consumer
    /// [`DEFAULT_CONSUMER`](crate::DEFAULT_CONSUMER).
    ///
    /// ```
    /// let opts = control_link::ConnectOptions::new();
    /// ```
    pub fn new() -> Self {
        Self {
            token: None,
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            backoff: Backoff::default(),
            ack_mode: AckMode::Auto,
            resume_from: 0,
            cursors: None,
            expect_agent_id: None,
            event_buffer: 256,
            attach_buffer: 4 << 20,
            max_frame: driver_protocol::DEFAULT_MAX_FRAME,
            reconnect: true,
            give_up_after: None,
            keepalive: Duration::from_secs(15),
            wake_hook: None,
            wake_timeout: Duration::from_secs(30),
            max_handshakes: 128,
            consumer: Some(crate::DEFAULT_CONSUMER.to_owned()),
            from_now: false,
        }
    }

    /// Authenticate with this token (required for TCP and vsock).
    ///
    /// ```
    /// # use control_link::{ConnectOptions, Token};
    /// let opts = ConnectOptions::new().token(Token::from_bytes("secret")?);
    /// # Ok::<(), control_link::Error>(())
    /// ```
    pub fn token(mut self, token: Token) -> Self {
        self.token = Some(token);
        self
    }

    /// Authenticate with this token, if any.
    ///
    /// ```
    /// # use control_link::ConnectOptions;
    /// let opts = ConnectOptions::new().maybe_token(None);
    /// ```
    pub fn maybe_token(mut self, token: Option<Token>) -> Self {
        self.token = token;
        self
    }

    /// How long each request may take, retries after reconnects included (default 10 s).
    ///
    /// ```
    /// # use std::time::Duration;
    /// let opts = control_link::ConnectOptions::new().request_timeout(Duration::from_secs(3));
    /// ```
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// How long one connection attempt, handshake included, may take (default 10 s).
    ///
    /// ```
    /// # use std::time::Duration;
    /// let opts = control_link::ConnectOptions::new().connect_timeout(Duration::from_secs(2));
    /// ```
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The reconnect backoff: the delay before redial n (0 = the first after a drop) is
    /// `min(initial · factor^n, max)`, ± `jitter` (see [`Backoff`], which is
    /// driver-protocol's, the same rule the shim's restarts and dial-out follow). Default
    /// [`Backoff::default`]: 100 ms, ×2, capped at 5 s, ± 20 %.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use control_link::{Backoff, ConnectOptions};
    /// let opts = ConnectOptions::new().backoff(Backoff {
    ///     initial: Duration::from_millis(20), max: Duration::from_secs(1), jitter: 0.1,
    ///     ..Backoff::default() });
    /// ```
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Who acknowledges events (default [`AckMode::Auto`]).
    ///
    /// ```
    /// # use control_link::{AckMode, ConnectOptions};
    /// let opts = ConnectOptions::new().ack_mode(AckMode::Manual);
    /// ```
    pub fn ack_mode(mut self, mode: AckMode) -> Self {
        self.ack_mode = mode;
        self
    }

    /// Connects as the durable consumer `name` (default
    /// [`DEFAULT_CONSUMER`](crate::DEFAULT_CONSUMER)): the shim keeps every event until this
    /// consumer acknowledges it, and a newer connection of the same name (another instance
    /// of the control plane) replaces this one, which then closes with
    /// [`Error::Replaced`](crate::Error::Replaced) (PROTOCOL.md §8.7).
    ///
    /// ```
    /// let opts = control_link::ConnectOptions::new().consumer("log-shipper");
    /// ```
    pub fn consumer(mut self, name: impl Into<String>) -> Self {
        self.consumer = Some(name.into());
        self
    }

    /// Connects as an observer: no acknowledgement of this client moves any position, a slow
    /// observer never slows the agent (past the buffer it is told `lagged` and skips ahead),
    /// and it starts from [`resume_from`](Self::resume_from)'s seq if that is still buffered
    /// (`from_now`: with live events only). For operators' tools and dashboards.
    ///
    /// ```
    /// let opts = control_link::ConnectOptions::new().observer(true);
    /// ```
    pub fn observer(mut self, from_now: bool) -> Self {
        self.consumer = None;
        self.from_now = from_now;
        self
    }

    /// The last seq already processed (a persisted cursor): the event stream starts after
    /// it (default 0: every buffered event).
    ///
    /// ```
    /// let opts = control_link::ConnectOptions::new().resume_from(42);
    /// ```
    pub fn resume_from(mut self, seq: Seq) -> Self {
        self.resume_from = seq;
        self
    }

    /// Cursors per agent, for [`Listener`](crate::Listener)s and
    /// [`Fleet`](crate::Fleet)s (and clients whose shim names its agent): called once per
    /// agent when it first connects. Overrides [`resume_from`](Self::resume_from) for shims
    /// that send an `agent_id`.
    ///
    /// ```
    /// # use std::collections::HashMap;
    /// # use std::sync::Arc;
    /// let saved: Arc<HashMap<String, u64>> = Arc::new(HashMap::from([("a1".into(), 17)]));
    /// let opts = control_link::ConnectOptions::new()
    ///     .cursor_for(move |agent| saved.get(agent).copied().unwrap_or(0));
    /// ```
    pub fn cursor_for(mut self, cursors: impl Fn(&str) -> Seq + Send + Sync + 'static) -> Self {
        self.cursors = Some(Arc::new(cursors));
        self
    }

    /// Refuse a shim whose `hello` does not name this agent.
    ///
    /// ```
    /// let opts = control_link::ConnectOptions::new().expect_agent_id("agent-7");
    /// ```
    pub fn expect_agent_id(mut self, agent_id: impl Into<String>) -> Self {
        self.expect_agent_id = Some(agent_id.into());
        self
    }

    /// Events read ahead of the consumer (default 256; at least 1). A consumer that falls
    /// behind stops the reading of the socket, and the shim buffers.
    ///
    /// ```
    /// let opts = control_link::ConnectOptions::new().event_buffer(1024);
    /// ```
    pub fn event_buffer(mut self, events: usize) -> Self {
        self.event_buffer = events.max(1);
        self
    }

    /// Output bytes each [`AttachStream`](crate::AttachStream) holds unread (default 4 MiB).
    /// Output beyond it is dropped, never waited for (the connection's other traffic goes
    /// on), and the stream's reader is told with an
    /// [`AttachItem::Lagged`](crate::AttachItem::Lagged) before its next item.
    ///
    /// ```
    /// let opts = control_link::ConnectOptions::new().attach_buffer(1 << 20);
    /// ```
    pub fn attach_buffer(mut self, bytes: usize) -> Self {
        self.attach_buffer = bytes;
        self
    }

    /// The largest frame accepted from the shim (default 16 MiB). Until the handshake
    /// completes, frames are limited to 64 KiB whatever this says.
    ///
    /// ```
    /// let opts = control_link::ConnectOptions::new().max_frame(1 << 20);
    /// ```
    pub fn max_frame(mut self, bytes: usize) -> Self {
        self.max_frame = bytes;
        self
    }

    /// Whether to redial after the connection drops (default true). Without, the client
    /// closes when its connection does.
    ///
    /// ```
    /// let opts = control_link::ConnectOptions::new().reconnect(false);
    /// ```
    pub fn reconnect(mut self, reconnect: bool) -> Self {
        self.reconnect = reconnect;
        self
    }

    /// Close the client when no connection could be made for this long (default: never).
    ///
    /// ```
    /// # use std::time::Duration;
    /// let opts = control_link::ConnectOptions::new().give_up_after(Duration::from_secs(60));
    /// ```
    pub fn give_up_after(mut self, limit: Duration) -> Self {
        self.give_up_after = Some(limit);
        self
    }

    /// After this long without a frame from the shim, ping it; without an answer within as
    /// long again, drop the connection and reconnect (catches half-open TCP and vsock
    /// connections). Zero turns it off. Default 15 s.
    ///
    /// ```
    /// # use std::time::Duration;
    /// let opts = control_link::ConnectOptions::new().keepalive(Duration::from_secs(5));
    /// ```
    pub fn keepalive(mut self, interval: Duration) -> Self {
        self.keepalive = interval;
        self
    }

    /// Auto-wake: before a task is submitted to an agent whose last known state is
    /// `pausing`/`paused`, or while its connection is down (a frozen container), call
    /// `hook(agent)` to make its sandbox run again (e.g. `docker unpause`), wait until the
    /// shim answers, `resume` it if it is paused, wait for state `ready`, then deliver the
    /// task. Concurrent submits to one agent call the hook once. The whole wake is bounded
    /// by [`wake_timeout`](Self::wake_timeout); a failing hook fails the submit with
    /// [`Error::Wake`]. The hook must succeed when the sandbox already runs (the state known
    /// to the client may be stale). The agent is the [`Fleet`](crate::Fleet)'s id, else
    /// the shim's `agent_id`, else the address dialed.
    ///
    /// ```
    /// use control_link::{AgentId, ConnectOptions};
    /// let opts = ConnectOptions::new().wake_hook(|agent: AgentId| async move {
    ///     // e.g. run `docker unpause <container of agent>` here
    ///     println!("waking {agent}");
    ///     Ok::<(), std::io::Error>(())
    /// });
    /// ```
    pub fn wake_hook<F, Fut, E>(mut self, hook: F) -> Self
    where
        F: Fn(crate::AgentId) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<(), E>> + Send + 'static,
        E: Into<crate::WakeError>,
    {
        self.wake_hook = Some(crate::wake::hook(hook));
        self
    }

    /// How long an auto-wake may take in all: the hook, the shim becoming reachable, the
    /// resume, state `ready` (default 30 s). Past it the submit fails with
    /// [`Error::Timeout`].
    ///
    /// ```
    /// # use std::time::Duration;
    /// let opts = control_link::ConnectOptions::new().wake_timeout(Duration::from_secs(10));
    /// ```
    pub fn wake_timeout(mut self, limit: Duration) -> Self {
        self.wake_timeout = limit;
        self
    }

    /// How many accepted connections a [`Listener`](crate::Listener) (or
    /// [`Fleet::listen`](crate::Fleet::listen)) authenticates at a time (default 128; at
    /// least 1). A connection accepted while that many are still in their handshake is closed
    /// at once (and logged); its shim dials again with its backoff. With the 64 KiB limit on
    /// frames before authentication and the connect timeout on the handshake, this bounds
    /// what peers that never authenticate can hold: about `max_handshakes × 64 KiB`, for at
    /// most the connect timeout each.
    ///
    /// ```
    /// let opts = control_link::ConnectOptions::new().max_handshakes(512);
    /// ```
    pub fn max_handshakes(mut self, handshakes: usize) -> Self {
        self.max_handshakes = handshakes.max(1);
        self
    }

    /// Connects to a shim with these options (see [`connect`](crate::connect)).
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), control_link::Error> {
    /// let client = control_link::ConnectOptions::new()
    ///     .connect(&"unix:/run/agent.sock".parse()?)
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(&self, addr: &Addr) -> Result<Client, Error> {
        Client::dial(addr, self.clone()).await
    }

    /// Refuses an insecure address.
    pub(crate) fn check_addr(&self, addr: &Addr) -> Result<(), Error> {
        if self.token.is_none() && !addr.allows_insecure() {
            return Err(Error::Insecure(addr.to_string()));
        }
        Ok(())
    }

    /// The starting cursor for an agent.
    pub(crate) fn cursor(&self, agent_id: Option<&str>) -> Seq {
        match (&self.cursors, agent_id) {
            (Some(f), Some(agent)) => f(agent),
            _ => self.resume_from,
        }
    }
}
