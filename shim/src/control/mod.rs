//! The control server: the control protocol (PROTOCOL.md §8) over unix sockets, TCP and
//! vsock, listened on (`--control-listen`) or dialed (`--control-connect`), every connection
//! authenticated by the shared token before it may become a session (a unix socket may go
//! without, with `--control-insecure`), with the replay buffer that makes delivery
//! exactly-once across reconnections.
//!
//! It exists so that the supervisor deals in commands and events only. Everything about
//! connections stays here: the `hello` exchange, the sessions (up to `--max-sessions` at once:
//! durable consumers, each with its own acknowledged position, a newer connection of one
//! replacing the older; and observers, which never hold an event back; PROTOCOL.md §8.7),
//! `ping`, `ack` and `resume_from`, bad frames, the ids of recent requests (a retried command
//! gets its recorded reply and is not executed twice; another body under a known id is
//! `conflict`), and the per-connection write queues that keep a client which does not read
//! from ever blocking PID 1.
//!
//! ```text
//!   supervisor ── publish / publish_raw ──► replay buffer (seq 1, 2, 3 …; freed up to the
//!        ▲                                        │  slowest consumer's ack)
//!        │ next_command / Reply::send             ▼  one cursor per session
//!        └──────────────── sessions: reader task ⇄ writer task ◄──► control clients
//! ```
//!
//! Everything runs on the supervisor's current-thread runtime, inside its `LocalSet`: the
//! accept loop and each connection's two tasks are `spawn_local`ed and share state through
//! `Rc<RefCell<…>>`, never borrowed across an `.await`.

mod addr;
mod attach;
mod auth;
mod buffer;
mod conn;
mod consumers;
mod dial;
#[cfg(any(test, fuzzing))]
pub mod fuzz;
mod gate;
mod ids;
mod registry;
mod source;
mod stream;
#[cfg(test)]
mod tests;
mod transport;
mod vsock;

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use driver_protocol::message::{
    ControlToShim, ErrorMsg, Event, Exec, ExecExit, ExecOutput, Hello, Limits, Message as _,
    OutputStream, RequestId, Role, Seq, ShimToControl,
};
use driver_protocol::{frame, EncodeError, ErrorCode};
use tokio::sync::{mpsc, Notify};
use tokio::task::AbortHandle;
use tracing::{debug, error, warn};

pub use addr::ControlAddr;
pub use auth::{read_token_file, Token, TokenError};
use buffer::Buffer;
use conn::Conn;
use consumers::Consumers;
use gate::{Gate, Refused};
use ids::IdCache;
pub use registry::RegistryConfig;
pub use stream::ReplyStream;
use transport::Listener;

/// Commands waiting for the supervisor; a client sending faster is simply not read.
const COMMAND_QUEUE: usize = 64;

/// The default cap of the dial-out backoff (`--control-reconnect-max`).
pub const DEFAULT_RECONNECT_MAX: Duration = Duration::from_secs(5);

/// How long a dialed connection may go without a frame from the control plane before it is
/// closed and redialed (`--control-idle-timeout`); control-link pings after 15 s of silence.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long an accepted connection may take to send its `hello` (PROTOCOL.md §8.1): a
/// control plane sends it at once, so a second is generous; a silent connection holds its
/// place in the gate no longer.
const HELLO_TIMEOUT: Duration = Duration::from_secs(1);

/// A consumer should acknowledge at least every this many events (advertised in `hello`)…
const ACK_EVERY: u64 = 64;

/// … and at most this long after an event it has not acknowledged yet (control-link's own
/// cadence).
const ACK_DELAY: Duration = Duration::from_millis(200);

/// How long an accepted connection may take to complete its whole handshake (`hello` and
/// `auth`): a peer that trickles its bytes holds its place no longer.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// How a connection came to be: accepted on the listener (and so through the [`gate`]), or
/// dialed by the shim.
#[derive(Debug, Clone)]
enum Origin {
    /// Accepted; the peer, for logs, and its source in the gate.
    Accepted(String, gate::Source),
    /// Dialed; the address, for logs.
    Dialed(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Accepted(peer, _) => write!(f, "accepted from {peer}"),
            Self::Dialed(addr) => write!(f, "dialed to {addr}"),
        }
    }
}

/// How the control server bounds what it keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlConfig {
    /// Unacknowledged events kept for replay; at this many the buffer is full.
    pub max_events: usize,
    /// Bytes of unacknowledged events (encoded frames) at which the buffer is full.
    pub max_bytes: usize,
    /// The largest frame read from a client, and sent to one.
    pub max_frame: usize,
    /// Sent in the shim's `hello`, for fleets.
    pub agent_id: Option<String>,
    /// The shared secret every connection must prove (PROTOCOL.md §8.2); `None` only for an
    /// insecure unix socket.
    pub token: Option<Token>,
    /// The cap of the dial-out backoff.
    pub reconnect_max: Duration,
    /// How long a dialed connection may go without a frame from the control plane.
    pub idle_timeout: Duration,
    /// Authenticated connections at once (consumers and observers).
    pub max_sessions: usize,
    /// Durable consumers known at once.
    pub max_consumers: usize,
    /// The exec registry's bounds.
    pub registry: RegistryConfig,
    /// Which per-child cgroups are in effect (`none`, `v1`, `v2-delegated`), told in the
    /// `hello`.
    pub cgroups: Option<&'static str>,
}

/// Knobs the protocol leaves to the implementation; tests shrink them.
#[derive(Debug, Clone, Copy)]
struct Tuning {
    /// Bytes of queued replies over which a connection that does not read is closed.
    out_queue_max: usize,
    /// How long a new connection has to send its `hello`.
    hello_timeout: Duration,
    /// How long a new connection has to complete its handshake (`hello`, and `auth`).
    handshake_timeout: Duration,
    /// How long a rejected connection's last `error` may take to be written.
    close_grace: Duration,
    /// The largest frame read before the handshake is complete.
    handshake_max_frame: usize,
    /// How long one dial may take.
    connect_timeout: Duration,
    /// The cap of the dial-out backoff.
    reconnect_max: Duration,
    /// How long a dialed connection may go without a frame from the control plane.
    dialed_idle: Duration,
    /// Failed handshakes at once, and per second, before new connections are turned away.
    failure_burst: f64,
    failure_refill: f64,
    /// Handshakes in progress at once.
    max_pending: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            out_queue_max: 8 * 1024 * 1024,
            hello_timeout: HELLO_TIMEOUT,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            close_grace: Duration::from_secs(2),
            handshake_max_frame: 16 * 1024,
            connect_timeout: Duration::from_secs(5),
            reconnect_max: DEFAULT_RECONNECT_MAX,
            dialed_idle: DEFAULT_IDLE_TIMEOUT,
            failure_burst: gate::FAILURE_BURST,
            failure_refill: gate::FAILURE_REFILL,
            max_pending: gate::MAX_PENDING,
        }
    }
}

/// A request for the supervisor, with the handle to answer it.
#[derive(Debug)]
pub struct Command {
    /// What the control plane asks.
    pub request: ControlToShim,
    /// Where the answer goes.
    pub reply: Reply,
}

/// The way back for one request's reply. Dropping it unanswered forgets the request's id,
/// so a retry is executed.
pub struct Reply {
    inner: Rc<Inner>,
    conn: u64,
    id: Option<RequestId>,
    sent: bool,
}

impl Reply {
    fn new(inner: Rc<Inner>, conn: u64, id: Option<RequestId>) -> Self {
        Self {
            inner,
            conn,
            id,
            sent: false,
        }
    }

    /// Sends the reply to the connection the request came from (if it is still the live one)
    /// and records it for idempotent retries of the same request id.
    pub fn send(mut self, msg: ShimToControl) {
        self.sent = true;
        let frame = match encode_frame(&msg, self.inner.max_frame) {
            Ok(frame) => frame,
            Err(err) => {
                error!(id = ?self.id, error = %err, "cannot encode a control reply");
                let fallback = ErrorMsg {
                    re: self.id,
                    code: ErrorCode::Internal,
                    message: format!("the reply could not be encoded: {err}"),
                    task_id: None,
                    first_available: None,
                };
                match encode_frame(&fallback.into(), self.inner.max_frame) {
                    Ok(frame) => frame,
                    Err(_) => return,
                }
            }
        };
        self.deliver(frame);
    }

    /// Records `frame` (a whole encoded reply) for retries of the request's id and writes it
    /// to the connection the request came from, if it is still the live one.
    fn deliver(&self, frame: bytes::Bytes) {
        let target = {
            let Ok(mut st) = self.inner.state.try_borrow_mut() else {
                error!(id = ?self.id, "control state busy; reply dropped");
                return;
            };
            let conn = match self.id {
                Some(id) => st.ids.complete(id, frame.clone()).unwrap_or(self.conn),
                None => self.conn,
            };
            st.session(conn)
        };
        match target {
            Some(conn) => conn.send(frame),
            None => debug!(id = ?self.id, "reply recorded; its connection is gone"),
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if self.sent {
            return;
        }
        let Some(id) = self.id else {
            return;
        };
        match self.inner.state.try_borrow_mut() {
            Ok(mut st) => st.ids.abandon(id),
            Err(_) => error!(id, "control state busy; an unanswered id stays pending"),
        }
        debug!(id, "control request dropped without a reply");
    }
}

impl fmt::Debug for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reply")
            .field("conn", &self.conn)
            .field("id", &self.id)
            .field("sent", &self.sent)
            .finish()
    }
}

/// The replay buffer's occupancy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferStats {
    /// Events waiting for an acknowledgement.
    pub events: u64,
    /// Their encoded size.
    pub bytes: u64,
    /// The last seq given out (0 before the first event).
    pub last_seq: u64,
}

/// What the server, its tasks and the replies share.
#[derive(Debug)]
struct Inner {
    state: RefCell<Shared>,
    /// Woken (all waiters) whenever an acknowledgement frees events.
    acked: Notify,
    commands: mpsc::Sender<Command>,
    /// Our `hello` without a nonce; each connection sends it with a nonce of its own.
    hello: Hello,
    token: Option<Token>,
    max_frame: usize,
    tuning: Tuning,
}

/// The mutable part, borrowed briefly and never across an `.await`.
#[derive(Debug)]
struct Shared {
    buffer: Buffer,
    /// The authenticated connections, oldest first (at most `--max-sessions`).
    sessions: Vec<Rc<Conn>>,
    /// The durable consumers and their positions.
    consumers: Consumers,
    /// `--max-sessions`.
    max_sessions: usize,
    ids: IdCache,
    next_conn: u64,
    /// Admission of accepted connections to the handshake.
    gate: Gate,
    /// Accepted connections still in their handshake, by id: the gate may evict one.
    handshaking: HashMap<u64, Weak<Conn>>,
    /// The execs running and recently exited, with their output's tail.
    registry: registry::Registry,
}

impl Shared {
    /// The open session `id`, if any.
    fn session(&self, id: u64) -> Option<Rc<Conn>> {
        self.sessions
            .iter()
            .find(|c| c.id == id && c.is_open())
            .cloned()
    }

    /// Frees what every consumer has acknowledged; true if anything was freed.
    fn free(&mut self) -> bool {
        match self.consumers.floor() {
            Some(floor) => self.buffer.ack(floor),
            None => false,
        }
    }

    /// Wakes the writers of the sessions attached to exec `id`.
    fn wake_attached(&self, id: u64) {
        for conn in self.sessions.iter().filter(|c| c.attached.follows(id)) {
            conn.wake();
        }
    }

    /// Wakes every streaming session's writer (an event was published).
    fn wake_streaming(&self) {
        for conn in self.sessions.iter().filter(|c| c.is_streaming()) {
            conn.wake();
        }
    }
}

impl Inner {
    /// Consumer `name` acknowledged every event up to `seq` (by `ack` or `resume_from`).
    fn ack(&self, name: &str, seq: Seq) {
        let freed = {
            let mut st = self.state.borrow_mut();
            // Past the last seq given out: a control plane counting another shim's seqs.
            if seq > st.buffer.stats().2 {
                return;
            }
            st.consumers.ack(name, seq) && st.free()
        };
        if freed {
            self.acked.notify_waiters();
        }
    }

    /// The buffer may have been freed by a change of the consumers: wake the waiters.
    fn refree(&self) {
        if self.state.borrow_mut().free() {
            self.acked.notify_waiters();
        }
    }

    /// A fresh connection id.
    fn next_id(&self) -> u64 {
        let mut st = self.state.borrow_mut();
        st.next_conn = st.next_conn.wrapping_add(1);
        st.next_conn
    }

    /// An open session that is the durable consumer `name` (any consumer: `None`), if any.
    fn live(&self, name: Option<&str>) -> Option<Rc<Conn>> {
        self.state
            .borrow()
            .sessions
            .iter()
            .find(|c| {
                c.is_open()
                    && match (c.consumer(), name) {
                        (Some(c), Some(n)) => c == n,
                        (Some(_), None) => true,
                        (None, _) => false,
                    }
            })
            .cloned()
    }
}

/// Where the control server meets its control plane: a listening address, an address to
/// dial, or both.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Endpoints {
    /// `--control-listen`: accept connections here.
    pub listen: Option<ControlAddr>,
    /// `--control-connect`: dial here whenever no connection is live.
    pub connect: Option<ControlAddr>,
}

/// The control server: accepts (and/or dials) connections, buffers events, hands commands
/// to the supervisor.
#[derive(Debug)]
pub struct ControlServer {
    inner: Rc<Inner>,
    commands: mpsc::Receiver<Command>,
    /// The accept loop and the dialer, aborted on drop.
    tasks: Vec<AbortHandle>,
    /// The unix socket file to remove on drop, if it is still ours.
    unix_file: Option<transport::SocketFile>,
}

impl ControlServer {
    /// Listens on `addr` only (see [`Self::start`]).
    #[cfg(test)]
    pub fn bind(addr: &ControlAddr, cfg: ControlConfig) -> io::Result<Self> {
        let endpoints = Endpoints {
            listen: Some(addr.clone()),
            connect: None,
        };
        Self::start(&endpoints, cfg)
    }

    /// Binds the listening address, if any (a unix socket: mode 0600, a stale socket file
    /// replaced), and spawns the accept loop and the dialer with `spawn_local`. Must be
    /// called inside the LocalSet.
    pub fn start(endpoints: &Endpoints, cfg: ControlConfig) -> io::Result<Self> {
        let tuning = Tuning {
            reconnect_max: cfg.reconnect_max,
            dialed_idle: cfg.idle_timeout,
            ..Tuning::default()
        };
        Self::start_tuned(endpoints, cfg, tuning)
    }

    #[cfg(test)]
    fn bind_tuned(addr: &ControlAddr, cfg: ControlConfig, tuning: Tuning) -> io::Result<Self> {
        let endpoints = Endpoints {
            listen: Some(addr.clone()),
            connect: None,
        };
        Self::start_tuned(&endpoints, cfg, tuning)
    }

    fn start_tuned(endpoints: &Endpoints, cfg: ControlConfig, tuning: Tuning) -> io::Result<Self> {
        if cfg.token.is_none()
            && endpoints
                .listen
                .iter()
                .chain(&endpoints.connect)
                .any(ControlAddr::is_network)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a tcp or vsock control link needs a token",
            ));
        }
        let (listener, unix_file) = match endpoints.listen.as_ref().map(Listener::bind) {
            Some(bound) => {
                let (listener, file) = bound?;
                (Some(listener), file)
            }
            None => (None, None),
        };
        let mut hello = Hello::new(Role::Shim, "agent-shim", env!("CARGO_PKG_VERSION"));
        hello.agent_id = cfg.agent_id.clone();
        hello.cgroups = cfg.cgroups.map(str::to_owned);
        hello.instance = Some(instance());
        let max_sessions = cfg.max_sessions.max(1);
        let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        hello.limits = Some(Box::new(Limits {
            max_events: cfg.max_events as u64,
            max_bytes: cfg.max_bytes as u64,
            max_frame: cfg.max_frame as u64,
            handshake_max_frame: tuning.handshake_max_frame.min(cfg.max_frame) as u64,
            ids_window: ids::WINDOW as u64,
            hello_timeout_ms: millis(tuning.hello_timeout.min(tuning.handshake_timeout)),
            handshake_timeout_ms: millis(tuning.handshake_timeout),
            max_sessions: max_sessions as u64,
            max_consumers: cfg.max_consumers.max(1) as u64,
            ack_every: ACK_EVERY,
            ack_delay_ms: millis(ACK_DELAY),
        }));
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let gate = Gate::new(
            tuning.failure_burst,
            tuning.failure_refill,
            tuning.max_pending,
        );
        let inner = Rc::new(Inner {
            state: RefCell::new(Shared {
                buffer: Buffer::new(cfg.max_events, cfg.max_bytes),
                sessions: Vec::new(),
                consumers: Consumers::new(cfg.max_consumers),
                max_sessions,
                ids: IdCache::default(),
                next_conn: 0,
                gate,
                handshaking: HashMap::new(),
                registry: registry::Registry::new(cfg.registry),
            }),
            acked: Notify::new(),
            commands: tx,
            hello,
            token: cfg.token,
            max_frame: cfg.max_frame,
            tuning,
        });
        let mut tasks = Vec::new();
        if let Some(listener) = listener {
            let task = tokio::task::spawn_local(accept_loop(listener, Rc::clone(&inner)));
            tasks.push(task.abort_handle());
        }
        if let Some(addr) = &endpoints.connect {
            let task = tokio::task::spawn_local(dial::dial_loop(addr.clone(), Rc::clone(&inner)));
            tasks.push(task.abort_handle());
        }
        Ok(Self {
            inner,
            commands: rx,
            tasks,
            unix_file,
        })
    }

    /// The next request for the supervisor. `hello`, `ping`, `ack`, `resume_from` and retried
    /// ids are handled inside; everything else comes out here. Cancel-safe (an mpsc recv).
    pub async fn next_command(&mut self) -> Command {
        match self.commands.recv().await {
            Some(cmd) => cmd,
            // The server holds a sender (in `inner`), so the channel never closes.
            None => std::future::pending().await,
        }
    }

    /// Gives `event` the next seq, buffers it, wakes every streaming session.
    pub fn publish(&mut self, event: &Event) -> u64 {
        let max = self.inner.max_frame;
        let mut st = self.inner.state.borrow_mut();
        let seq = st.buffer.next_seq();
        // Encoded in place, into the replay buffer's storage (no body of its own first),
        // sized for the whole frame: a chunk of output that outgrew its space would be
        // copied into fresh memory.
        let hint = match event {
            Event::ExecOutput(o) => o.data.len().saturating_add(256),
            _ => 256,
        };
        let out = st.buffer.frame_space(hint);
        if let Err(err) = frame::write_event(out, max, seq, event) {
            drop(st);
            let body = match err {
                EncodeError::FrameTooLarge { len, .. } => {
                    warn!(seq, len, "event over the frame limit replaced");
                    let msg = format!("an event of {len} bytes was over the frame limit");
                    substitute(ErrorCode::FrameTooLarge, msg)
                }
                err => {
                    error!(r#type = event.type_name(), error = %err, "cannot encode an event");
                    substitute(ErrorCode::Internal, format!("event lost: {err}"))
                }
            };
            return self.publish_raw(&body);
        }
        let seq = st.buffer.push_written();
        st.wake_streaming();
        seq
    }

    /// Same for a driver event already encoded (its MessagePack body, validated by the caller):
    /// spliced with `envelope::encode_event_envelope`, never re-encoded.
    pub fn publish_raw(&mut self, event_body: &[u8]) -> u64 {
        let max = self.inner.max_frame;
        let mut st = self.inner.state.borrow_mut();
        let seq = st.buffer.next_seq();
        let out = st.buffer.frame_space(event_body.len().saturating_add(32));
        if let Err(err) = frame::write_event_envelope(out, max, seq, event_body) {
            // A client would reject the frame and, reconnecting, get it again forever: the
            // seq carries an error event instead.
            warn!(seq, len = event_body.len(), error = %err, "event over the frame limit replaced");
            let msg = format!(
                "an event of {} bytes was over the frame limit",
                event_body.len()
            );
            let body = substitute(ErrorCode::FrameTooLarge, msg);
            out.clear();
            if let Err(err) = frame::write_event_envelope(out, max, seq, &body) {
                error!(seq, error = %err, "cannot encode even an error event; seq skipped");
            }
        }
        let seq = st.buffer.push_written();
        st.wake_streaming();
        seq
    }

    /// The replay buffer is at a limit: the supervisor stops reading the driver.
    pub fn is_full(&self) -> bool {
        self.inner.state.borrow().buffer.is_full()
    }

    /// Resolves once the buffer is no longer full. Cancel-safe (tokio::sync::Notify).
    pub async fn not_full(&self) {
        self.wait_acked(|b| !b.is_full()).await;
    }

    /// Waits until every buffered event is acked, at most `timeout`; false if some are not.
    pub async fn drain(&self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.wait_acked(Buffer::is_empty))
            .await
            .is_ok()
    }

    async fn wait_acked(&self, done: impl Fn(&Buffer) -> bool) {
        loop {
            let notified = self.inner.acked.notified();
            tokio::pin!(notified);
            // Registered before the check, so an ack between the two is not missed.
            notified.as_mut().enable();
            if done(&self.inner.state.borrow().buffer) {
                return;
            }
            notified.await;
        }
    }

    /// The replay buffer's occupancy.
    pub fn stats(&self) -> BufferStats {
        let (events, bytes, last_seq) = self.inner.state.borrow().buffer.stats();
        BufferStats {
            events: events as u64,
            bytes: bytes as u64,
            last_seq,
        }
    }

    /// Exec `id` started as `pid` for `owner` (`driver` or `control`), running as `uid`: the
    /// registry lists it from now on.
    pub fn exec_started(&self, id: u64, req: &Exec, pid: i32, uid: u32, owner: &str) {
        self.inner
            .state
            .borrow_mut()
            .registry
            .started(id, req, pid, uid, owner);
    }

    /// `data` of exec `id`'s `stream` was forwarded to its owner: retained, and the
    /// connections attached to the exec are woken.
    pub fn exec_output(&self, id: u64, stream: OutputStream, data: &[u8]) {
        let st = &mut *self.inner.state.borrow_mut();
        if st.registry.output(id, stream, data) {
            st.wake_attached(id);
        }
    }

    /// Reads a chunk of exec `id`'s `stream` straight into the replay buffer and publishes it
    /// as an `exec_output` event, with no copy of its bytes in between: `read` appends at most
    /// `room` bytes to the buffer it is given (a read(2) into its spare capacity), `keep` says
    /// how many of the bytes read are forwarded (the output cap), and those are retained
    /// ([`Self::exec_output`]) and published behind the head the event's encoding puts before
    /// them (see [`frame::exec_output_head`]). Returns what `read` returned; nothing is
    /// published when it fails or nothing is kept.
    pub fn read_exec_output(
        &mut self,
        id: u64,
        stream: OutputStream,
        room: usize,
        read: impl FnOnce(&mut BytesMut) -> io::Result<usize>,
        keep: impl FnOnce(usize) -> usize,
    ) -> io::Result<usize> {
        const HEAD: usize = frame::EXEC_OUTPUT_HEAD_MAX;
        let max = self.inner.max_frame;
        let mut guard = self.inner.state.borrow_mut();
        let st = &mut *guard;
        let seq = st.buffer.next_seq();
        let out = st.buffer.frame_space(HEAD.saturating_add(room));
        out.resize(HEAD, 0);
        let n = match read(out) {
            Ok(n) => n,
            Err(err) => {
                out.clear();
                return Err(err);
            }
        };
        let kept = keep(n).min(n).min(out.len().saturating_sub(HEAD));
        out.truncate(HEAD.saturating_add(kept));
        if kept == 0 {
            out.clear();
            return Ok(n);
        }
        let mut head = [0u8; HEAD];
        let head_len = match frame::exec_output_head(&mut head, max, seq, id, stream, kept) {
            Ok(len) => len,
            Err(_) => {
                // Over the frame limit: published the usual way, which puts an error event
                // in its place.
                let data = Bytes::copy_from_slice(out.get(HEAD..).unwrap_or_default());
                out.clear();
                drop(guard);
                self.exec_output(id, stream, &data);
                self.publish(&Event::ExecOutput(ExecOutput {
                    exec_id: id,
                    stream,
                    data,
                }));
                return Ok(n);
            }
        };
        let attached = st
            .registry
            .output(id, stream, out.get(HEAD..).unwrap_or_default());
        let at = HEAD.saturating_sub(head_len);
        if let (Some(dst), Some(src)) = (out.get_mut(at..HEAD), head.get(at..)) {
            dst.copy_from_slice(src);
        }
        out.advance(at);
        st.buffer.push_written();
        if attached {
            st.wake_attached(id);
        }
        st.wake_streaming();
        Ok(n)
    }

    /// Exec `exit.exec_id` ended.
    pub fn exec_ended(&self, exit: &ExecExit) {
        let st = &mut *self.inner.state.borrow_mut();
        if st.registry.ended(exit, Instant::now()) {
            st.wake_attached(exit.exec_id);
        }
    }

    /// A durable consumer is connected (observers do not acknowledge).
    pub fn connected(&self) -> bool {
        self.inner.live(None).is_some()
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        let sessions = std::mem::take(&mut self.inner.state.borrow_mut().sessions);
        for conn in sessions {
            conn.close_now();
        }
        if let Some(file) = &self.unix_file {
            file.remove();
        }
    }
}

/// Accepts connections until the server is dropped (which aborts this task); each goes
/// through the [`gate`] before any handshake work is done for it. Nothing here waits for a
/// peer: a refusal is one small frame written if the socket takes it now, then the close.
async fn accept_loop(listener: Listener, inner: Rc<Inner>) {
    let mut classifier = source::Classifier::default();
    loop {
        match listener.accept(&mut classifier).await {
            Ok((halves, peer, source)) => admit(halves, peer, source, &inner).await,
            Err(err) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %err, "control socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Lets an accepted connection start its handshake, evicting another if the gate says so,
/// or turns it away with `error{code:"busy"|"limit"}`.
async fn admit(halves: transport::Halves, peer: String, source: gate::Source, inner: &Rc<Inner>) {
    let now = Instant::now();
    let id = inner.next_id();
    let (admitted, report) = {
        let mut st = inner.state.borrow_mut();
        let admitted = st.gate.admit(source, id, now);
        (admitted, st.gate.report(now))
    };
    if let Some(n) = report {
        warn!(
            failed_handshakes = n.failures,
            busy = n.busy,
            evicted = n.evicted,
            "control connections turned away (suppressed): too many failed handshakes or \
             handshakes in progress from their source"
        );
    }
    match admitted {
        Ok(admitted) => {
            if let Some(old) = admitted.evict {
                let victim = inner
                    .state
                    .borrow_mut()
                    .handshaking
                    .remove(&old)
                    .and_then(|w| w.upgrade());
                if let Some(victim) = victim {
                    debug!(conn = old, %source, "pending control connection evicted");
                    victim.evict(inner);
                }
            }
            let origin = Origin::Accepted(peer, source);
            // Not started (no randomness): the gate's count is given back.
            if conn::start(halves, inner, origin, id).is_none() {
                inner
                    .state
                    .borrow_mut()
                    .gate
                    .finished(source, id, true, Instant::now());
            }
        }
        Err(why) => {
            let (code, message) = match why {
                Refused::Busy => (
                    ErrorCode::Busy,
                    "too many handshakes pending from this source; retry later",
                ),
                Refused::Failures => (
                    ErrorCode::Limit,
                    "too many failed handshakes from this source; slow down",
                ),
            };
            debug!(%peer, %source, %code, "control connection turned away");
            let refusal = ErrorMsg {
                re: None,
                code,
                message: message.to_owned(),
                task_id: None,
                first_available: None,
            };
            match encode_frame(&refusal.into(), inner.max_frame) {
                Ok(frame) => transport::refuse(halves, &frame).await,
                Err(err) => debug!(error = %err, "cannot encode a refusal"),
            }
        }
    }
}

/// One frame holding `msg`.
pub(crate) fn encode_frame(msg: &ShimToControl, max: usize) -> Result<Bytes, EncodeError> {
    let mut out = BytesMut::new();
    frame::write_message(&mut out, max, msg)?;
    Ok(out.freeze())
}

/// The body of an `error` event standing in for an event that could not be sent.
fn substitute(code: ErrorCode, message: String) -> Vec<u8> {
    let event = Event::Error(ErrorMsg::new(None, code, message));
    event_body(&event).unwrap_or_default()
}

/// An event's MessagePack body (what `Event::to_body` gives), encoded by the very code that
/// encodes published events ([`frame::write_event`]), so that the shim holds one copy of the
/// event encoder rather than one per output type.
pub(crate) fn event_body(event: &Event) -> Result<Vec<u8>, EncodeError> {
    let mut out = BytesMut::new();
    frame::write_event(&mut out, usize::MAX, 0, event)?;
    // The frame header and the envelope `{type: "event", seq: 0, event:` before the body.
    let mut head = Vec::new();
    driver_protocol::envelope::encode_event_envelope(0, &[], &mut head);
    Ok(out
        .get(frame::HEADER_LEN + head.len()..)
        .unwrap_or_default()
        .to_vec())
}

/// This shim's `hello.instance`: random, drawn once per control server (PROTOCOL.md §8.3).
/// Should the kernel give no random bytes, the clock and the pid stand in: the number only
/// has to differ from the previous shim's behind the same address.
fn instance() -> u64 {
    let mut b = [0u8; 8];
    if crate::sys::getrandom(&mut b).is_ok() {
        return u64::from_le_bytes(b);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    now ^ u64::from(std::process::id()).rotate_left(32)
}
