//! [`Client`]: a cheap, cloneable handle on one shim, with a typed method for every control
//! request.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use driver_protocol::message::{
    AttachExec, CancelTask, ControlToShim, DetachExec, DriverState, ExecAttached, ExecInfo,
    ExecInput, ExecResize, ExecSignal, ExecStarted, ListExecs, Metrics, Pause, Ping, Reading,
    RequestId, RestartDriver, Resume, Seq, SetDriver, ShimToControl, Shutdown, Signal,
    SignalTarget, Status, StatusReply,
};
use tokio::sync::{mpsc, oneshot};

use crate::error::unexpected;
use crate::events::{FleetItem, Item, Sink};
use crate::link::Connected;
use crate::options::ConnectOptions;
use crate::session::{dial_first, Cmd, Session, Shared, Source};
use crate::shared::Position;
use crate::{
    Addr, AgentId, AttachStream, Error, EventStream, ExecSpec, RawEventStream, Sig, Target,
    TaskSpec, Token,
};

/// Connects to the shim at `addr` with the default [`ConnectOptions`] and `token` (`None`
/// only for a unix socket of a shim run with `--control-insecure`).
///
/// The first connection and handshake happen before this returns, so a wrong address or
/// token is an error here; later drops are redialed in the background.
///
/// ```no_run
/// # async fn demo() -> Result<(), control_link::Error> {
/// let client = control_link::connect(&"unix:/run/agent.sock".parse()?, None).await?;
/// println!("{:?}", client.status().await?.state);
/// # Ok(()) }
/// ```
pub async fn connect(addr: &Addr, token: Option<Token>) -> Result<Client, Error> {
    ConnectOptions::new().maybe_token(token).connect(addr).await
}

/// A handle on one shim's control link. Clones share the connection; the connection closes
/// when the last clone (and the last [`EventStream`]) is dropped, or on [`Client::close`].
///
/// Every request has a fresh id (random high 32 bits per client, a counter below), is
/// bounded by the request timeout, and is sent again with the same id after a reconnect, so
/// it is executed once.
///
/// ```no_run
/// use control_link::{connect, TaskSpec};
///
/// # async fn demo() -> Result<(), control_link::Error> {
/// let client = connect(&"unix:/run/agent.sock".parse()?, None).await?;
/// let mut events = client.events()?;
/// client.submit_task(TaskSpec::new("t1", "hello")).await?;
/// while let Some((seq, event)) = events.next().await {
///     println!("{seq}: {event:?}");
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    cmds: mpsc::UnboundedSender<Cmd>,
    shared: Arc<Shared>,
    events: Mutex<Option<mpsc::Receiver<Item>>>,
    request_timeout: Duration,
    /// Output bytes an [`AttachStream`] holds unread.
    attach_buffer: usize,
    close_timeout: Duration,
    wake_hook: Option<crate::WakeHook>,
    wake_timeout: Duration,
    /// The agent named to the wake hook.
    wake_agent: AgentId,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("shared", &self.shared)
            .field("request_timeout", &self.request_timeout)
            .field("wake_hook", &self.wake_hook.is_some())
            .field("wake_agent", &self.wake_agent)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Dials `addr` and starts the session.
    pub(crate) async fn dial(addr: &Addr, opts: ConnectOptions) -> Result<Self, Error> {
        opts.check_addr(addr)?;
        let conn = dial_first(addr, &opts).await?;
        if let Some(want) = &opts.expect_agent_id {
            if conn.hello.agent_id.as_deref() != Some(want.as_str()) {
                return Err(Error::AgentMismatch {
                    expected: want.clone(),
                    got: conn.hello.agent_id.clone(),
                });
            }
        }
        Ok(Self::start(
            opts,
            Source::Dial(addr.clone()),
            conn,
            None,
            None,
        ))
    }

    /// Starts a session on a connection that completed its handshake, from `inherit` (a
    /// replaced fleet client's position) or else from the options' cursor.
    pub(crate) fn start(
        opts: ConnectOptions,
        source: Source,
        conn: Connected,
        fleet: Option<(AgentId, mpsc::Sender<FleetItem>)>,
        inherit: Option<Position>,
    ) -> Self {
        let agent = conn.hello.agent_id.clone();
        let wake_agent = match (&fleet, &agent, &source) {
            (Some((id, _)), _, _) => id.clone(),
            (None, Some(a), _) => AgentId::from(a.as_str()),
            (None, None, Source::Dial(addr)) => AgentId::from(addr.to_string()),
            (None, None, Source::Handoff(_)) => AgentId::from(""),
        };
        let start = inherit.unwrap_or_else(|| {
            Position::at(match &fleet {
                Some((id, _)) => opts.cursor(Some(id)),
                None => opts.cursor(agent.as_deref()),
            })
        });
        let shared = Arc::new(Shared::new(opts.ack_mode, start));
        shared.connected.store(true, Ordering::Release);
        shared.set_agent_id(agent.clone());
        let (tx, rx) = mpsc::unbounded_channel();
        let (sink, events) = match fleet {
            Some((agent, tx)) => (Sink::Fleet { agent, tx }, None),
            None => {
                let (etx, erx) = mpsc::channel(opts.event_buffer);
                (Sink::Own(etx), Some(erx))
            }
        };
        let expect = opts.expect_agent_id.clone().or(agent);
        let request_timeout = opts.request_timeout;
        let attach_buffer = opts.attach_buffer;
        let close_timeout = opts.connect_timeout;
        let wake_hook = opts.wake_hook.clone();
        let wake_timeout = opts.wake_timeout;
        let session = Session::new(
            opts,
            rx,
            Arc::clone(&shared),
            sink,
            start.handed_out,
            expect,
        );
        tokio::spawn(session.run(source, conn));
        Self {
            inner: Arc::new(Inner {
                cmds: tx,
                shared,
                events: Mutex::new(events),
                request_timeout,
                attach_buffer,
                close_timeout,
                wake_hook,
                wake_timeout,
                wake_agent,
            }),
        }
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.inner.shared
    }

    /// The agent id the shim sent in its `hello`, if any.
    ///
    /// ```no_run
    /// # async fn demo(client: control_link::Client) {
    /// if let Some(agent) = client.agent_id() { println!("talking to {agent}"); }
    /// # }
    /// ```
    pub fn agent_id(&self) -> Option<String> {
        self.inner.shared.agent_id()
    }

    /// Whether a connection is up right now.
    ///
    /// ```no_run
    /// # async fn demo(client: control_link::Client) {
    /// println!("connected: {}", client.is_connected());
    /// # }
    /// ```
    pub fn is_connected(&self) -> bool {
        self.inner.shared.connected.load(Ordering::Acquire)
    }

    /// Whether the client is closed (by [`Client::close`], after giving up reconnecting, or
    /// refused for good: see [`Client::close_reason`]).
    ///
    /// ```no_run
    /// # async fn demo(client: control_link::Client) {
    /// assert!(!client.is_closed());
    /// # }
    /// ```
    pub fn is_closed(&self) -> bool {
        self.inner.shared.closed.load(Ordering::Acquire)
    }

    /// Why the client closed by itself, if it did because the shim refused it for good:
    /// [`Error::Unauthorized`] (the shim behind the address now wants another token) or
    /// [`Error::AgentMismatch`] (it serves another agent), after 3 refused reconnects in a
    /// row; or [`Error::Replaced`] at once, when a newer connection of the same durable
    /// consumer took this one's place (failover: the two never reconnect over each other).
    /// Requests then fail with this error and the event stream ends. `None` while the
    /// client is open, and after [`Client::close`] or giving up reconnecting
    /// ([`ConnectOptions::give_up_after`]).
    ///
    /// ```no_run
    /// # async fn demo(client: control_link::Client) -> Result<(), control_link::Error> {
    /// let mut events = client.events()?;
    /// while let Some((seq, event)) = events.next().await { /* … */ }
    /// if let Some(reason) = client.close_reason() {
    ///     eprintln!("the shim refuses us: {reason}"); // e.g. fetch the new token, connect again
    /// }
    /// # Ok(()) }
    /// ```
    pub fn close_reason(&self) -> Option<Error> {
        self.inner.shared.close_reason()
    }

    /// The event stream: every event once, in seq order, across reconnects. Taking it makes
    /// the client send `resume_from` (a client whose stream is never taken receives no
    /// events). It can be taken once; a [`Fleet`](crate::Fleet)'s clients have none (see
    /// [`Fleet::events`](crate::Fleet::events)).
    ///
    /// ```no_run
    /// # async fn demo(client: control_link::Client) -> Result<(), control_link::Error> {
    /// let mut events = client.events()?;
    /// while let Some((seq, event)) = events.next().await {
    ///     println!("{seq} {event:?}");
    /// }
    /// # Ok(()) }
    /// ```
    pub fn events(&self) -> Result<EventStream, Error> {
        let rx = self.take_events(false)?;
        Ok(EventStream::new(rx, self.clone()))
    }

    /// The event stream with events left encoded: the same events, order, acknowledgements
    /// and resumption as [`Client::events`], each a [`RawEvent`](crate::RawEvent) (seq,
    /// `type`, MessagePack body) that is decoded only when asked. For a control plane that
    /// archives or forwards events; reading a `type` and the body costs a fraction of
    /// decoding every event. Either stream can be taken, once.
    ///
    /// ```no_run
    /// # async fn demo(client: control_link::Client) -> Result<(), control_link::Error> {
    /// let mut events = client.raw_events()?;
    /// while let Some(event) = events.next().await {
    ///     println!("{} {} ({} bytes)", event.seq(), event.type_name(), event.body().len());
    /// }
    /// # Ok(()) }
    /// ```
    pub fn raw_events(&self) -> Result<RawEventStream, Error> {
        let rx = self.take_events(true)?;
        Ok(RawEventStream::new(rx, self.clone()))
    }

    /// Takes the event channel and starts events (raw or decoded).
    fn take_events(&self, raw: bool) -> Result<mpsc::Receiver<Item>, Error> {
        let rx = self
            .inner
            .events
            .lock()
            .ok()
            .and_then(|mut slot| slot.take())
            .ok_or(Error::EventsTaken)?;
        let _ = self.inner.cmds.send(Cmd::StartEvents { raw });
        Ok(rx)
    }

    /// Acknowledges every event up to `seq` as processed (cumulative). In
    /// [`AckMode::Manual`](crate::AckMode::Manual) this is the only way events are acked:
    /// call it after persisting. Acks are batched (sent within 200 ms, and on close), except
    /// that once 64 events or 1 MiB of events were taken from the stream since the last such
    /// batch, the next ack goes out at once, so a caller that acks as it goes keeps a fast
    /// stream (an exec's output) flowing instead of stalling on the shim's full buffer.
    ///
    /// ```no_run
    /// # async fn demo(client: control_link::Client) -> Result<(), control_link::Error> {
    /// let mut events = client.events()?;
    /// if let Some((seq, event)) = events.next().await {
    ///     // … store the event and the cursor `seq` atomically, then:
    ///     client.ack(seq);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn ack(&self, seq: Seq) {
        self.inner.shared.user_ack(seq);
    }

    /// Sends pending acks now, then closes the connection and stops reconnecting. Requests
    /// in flight fail with [`Error::Closed`]; the event stream ends.
    ///
    /// ```no_run
    /// # async fn demo(client: control_link::Client) {
    /// client.close().await;
    /// # }
    /// ```
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.inner.cmds.send(Cmd::Close(tx)).is_ok() {
            let _ = tokio::time::timeout(self.inner.close_timeout, rx).await;
        }
    }

    /// A fresh request id.
    pub(crate) fn next_id(&self) -> RequestId {
        self.inner.shared.next_id()
    }

    /// Sends a request answered by a stream of frames; they come on the receiver (closed at
    /// the end, or when the connection drops).
    pub(crate) fn stream(
        &self,
        id: RequestId,
        msg: ControlToShim,
    ) -> Result<mpsc::Receiver<ShimToControl>, Error> {
        let (frames, rx) = mpsc::channel(16);
        self.inner
            .cmds
            .send(Cmd::Stream {
                id,
                msg: Box::new(msg),
                frames,
            })
            .map_err(|_| self.inner.shared.closed_error())?;
        Ok(rx)
    }

    pub(crate) async fn call(
        &self,
        id: RequestId,
        msg: ControlToShim,
    ) -> Result<ShimToControl, Error> {
        let limit = self.inner.request_timeout;
        let call = async {
            let (tx, rx) = oneshot::channel();
            self.inner
                .cmds
                .send(Cmd::Request {
                    id,
                    msg: Box::new(msg),
                    reply: tx,
                })
                .map_err(|_| self.inner.shared.closed_error())?;
            rx.await.map_err(|_| self.inner.shared.closed_error())?
        };
        match tokio::time::timeout(limit, call).await {
            Ok(Ok(ShimToControl::Error(e))) => Err(Error::remote(e.code, e.message)),
            Ok(r) => r,
            Err(_) => Err(Error::Timeout(limit)),
        }
    }

    async fn call_ok(
        &self,
        make: impl FnOnce(RequestId) -> ControlToShim,
    ) -> Result<RequestId, Error> {
        let id = self.inner.shared.next_id();
        match self.call(id, make(id)).await? {
            ShimToControl::Ok(_) => Ok(id),
            other => Err(unexpected(&other)),
        }
    }

    async fn notice(&self, msg: ControlToShim) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .cmds
            .send(Cmd::Notice {
                msg: Box::new(msg),
                done: tx,
            })
            .map_err(|_| self.inner.shared.closed_error())?;
        let limit = self.inner.request_timeout;
        match tokio::time::timeout(limit, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(self.inner.shared.closed_error()),
            Err(_) => Err(Error::Timeout(limit)),
        }
    }

    /// Queues a task (`submit_task`). Idempotent: a task id already queued, running or done
    /// is not queued again. Its events follow: `task_accepted`, the driver's, `task_done`.
    ///
    /// ```no_run
    /// # async fn demo(client: control_link::Client) -> Result<(), control_link::Error> {
    /// use control_link::TaskSpec;
    /// client.submit_task(TaskSpec::new("t1", "write a haiku").redeliver(true)).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// With a [wake hook](crate::ConnectOptions::wake_hook), a paused agent (or one whose
    /// connection is down) is woken first: see [`ConnectOptions::wake_hook`](crate::ConnectOptions::wake_hook).
    pub async fn submit_task(&self, task: TaskSpec) -> Result<(), Error> {
        #[cfg(feature = "schema")]
        if let Some(schema) = task.schema() {
            if let Ok(mut memo) = self.inner.shared.schemas.lock() {
                memo.remember(task.task_id(), schema.clone());
            }
        }
        self.wake_if_needed().await?;
        self.call_ok(|id| task.into_message(id).into())
            .await
            .map(drop)
    }

    /// Cancels a queued or running task (`not_found` for an unknown or finished one).
    ///
    /// ```no_run
    /// # async fn demo(client: control_link::Client) -> Result<(), control_link::Error> {
    /// client.cancel_task("t1", Some(std::time::Duration::from_secs(2))).await?;
    /// # Ok(()) }
    /// ```
    pub async fn cancel_task(&self, task_id: &str, grace: Option<Duration>) -> Result<(), Error> {
        self.call_ok(|id| {
            CancelTask {
                id,
                task_id: task_id.to_owned(),
                grace_ms: grace.map(millis),
            }
            .into()
        })
        .await
        .map(drop)
    }

    /// Asks the driver to reach a safe point. Returns the request id: the event
    /// `paused{re}` with this id says the agent is at its safe point.
    ///
    /// ```no_run
    /// # async fn demo(client: control_link::Client) -> Result<(), control_link::Error> {
    /// use control_link::protocol::message::{Event, Paused};
    /// let mut events = client.events()?;
    /// let id = client.pause(None).await?;
    /// while let Some((_, event)) = events.next().await {
    ///     if matches!(event, Event::Paused(Paused { re: Some(re) }) if re == id) { break; }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn pause(&self, timeout: Option<Duration>) -> Result<RequestId, Error> {
        let id = self
            .call_ok(|id| {
                Pause {
                    id,
                    timeout_ms: timeout.map(millis),
                }
                .into()
            })
            .await?;
        self.inner.shared.wake.saw_state(DriverState::Pausing);
        Ok(id)
    }

    /// Resumes a paused agent (`invalid_state` when not paused). With `clock`, the shim
    /// first sets the sandbox's wall clock to it, as [`set_clock`](Self::set_clock) does
    /// (a `clock_set` event reports the jump), and only then wakes the driver, in one
    /// request: what a microVM restored from a snapshot needs. A time the kernel refuses is
    /// `invalid` (`internal` where the shim may not set the clock) and the agent stays paused.
    ///
    /// ```no_run
    /// # async fn demo(client: control_link::Client) -> Result<(), control_link::Error> {
    /// client.resume(None).await?;
    /// // After a snapshot restore:
    /// client.resume(Some(std::time::SystemTime::now())).await?;
    /// # Ok(()) }
    /// ```
    pub async fn resume(&self, clock: Option<std::time::SystemTime>) -> Result<(), Error> {
        let unix_ms = clock.map(unix_ms);
        self.call_ok(|id| {
            Resume {
                unix_ms,
                ..Resume::new(id)
            }
            .into()
        })
        .await?;
        self.inner.shared.wake.saw_state(DriverState::Ready);
        Ok(())
    }

    /// Sends a signal to the driver's process group or to an exec's.
    ///
    /// ```no_run
    /// # async fn demo(client: control_link::Client) -> Result<(), control_link::Error> {
    /// use control_link::Target;
    /// client.signal("USR1", Target::Driver).await?;
    /// client.signal(15, Target::Exec(3)).await?;
    /// # Ok(()) }
    /// ```
    pub async fn signal(&self, signal: impl Into<Sig>, target: Target) -> Result<(), Error> {
        let signal = signal.into().0;
        let (target, exec_id) = match target {
            Target::Driver => (SignalTarget::Driver, None),
            Target::Exec(e) => (SignalTarget::Exec, Some(e)),
        };
        self.call_ok(|id| {
            Signal {
                id,
                signal,
                target,
                exec_id,
            }
            .into()
        })
        .await
        .map(drop)
    }

    /// Relaunches the driver, also out of state `error` after a crash loop.
    ///
    /// ```no_run
    /// # async fn demo(client: control_link::Client) -> Result<(), control_link::Error> {
    /// client.restart_driver().await?;
    /// # Ok(()) }
    /// ```
    pub async fn restart_driver(&self) -> Result<(), Error> {
        self.call_ok(|id| RestartDriver { id }.into())
            .await
            .map(drop)
    }

    /// Replaces the driver command; the old driver gets a graceful shutdown.
    ///
    /// ```no_run
    /// # async fn demo(client: control_link::Client) -> Result<(), control_link::Error> {
    /// use std::collections::BTreeMap;
    /// let env = BTreeMap::from([("MODEL".to_string(), "large".to_string())]);
    /// client.set_driver(["python3", "-m", "my_agent"], env).await?;
    /// # Ok(()) }
    /// ```
    pub async fn set_driver<S: Into<String>>(
        &self,
        argv: impl IntoIterator<Item = S>,
        env: BTreeMap<String, String>,
    ) -> Result<(), Error> {
        let argv: Vec<String> = argv.into_iter().map(Into::into).collect();
        self.call_ok(|id| SetDriver { id, argv, env }.into())
            .await
            .map(drop)
    }

    /// Runs a tool process; its `exec_output` and `exec_exit` arrive as events.
    ///
    /// ```no_run
    /// # async fn demo(client: control_link::Client) -> Result<(), control_link::Error> {
    /// use control_link::ExecSpec;
    /// let started = client.exec(ExecSpec::new(["ls", "-l"])).await?;
    /// println!("exec {} is pid {}", started.exec_id, started.pid);
    /// # Ok(()) }
    /// ```
    pub async fn exec(&self, spec: ExecSpec) -> Result<ExecStarted, Error> {
        let id = self.inner.shared.next_id();
        match self.call(id, spec.into_message(id).into()).await? {
            ShimToControl::ExecStarted(s) => Ok(s),
            other => Err(unexpected(&other)),
        }
    }

    /// Sends bytes to an exec's stdin (or terminal); `eof` closes it. Not retried across
    /// reconnects: without a connection it is [`Error::NotConnected`].
    ///
    /// ```no_run
    /// # async fn demo(client: control_link::Client) -> Result<(), control_link::Error> {
    /// client.exec_input(3, b"ls\n".to_vec(), false).await?;
    /// # Ok(()) }
    /// ```
    pub async fn exec_input(
        &self,
        exec_id: u64,
        data: impl Into<bytes::Bytes>,
        eof: bool,
    ) -> Result<(), Error> {
        self.notice(
            ExecInput {
                exec_id,
                data: data.into(),
                eof,
            }
            .into(),
        )
        .await
    }

    /// Tells an exec its terminal changed size.
    ///
    /// ```no_run
    /// # async fn demo(client: control_link::Client) -> Result<(), control_link::Error> {
    /// client.exec_resize(3, 50, 132).await?;
    /// # Ok(()) }
    /// ```
    pub async fn exec_resize(&self, exec_id: u64, rows: u16, cols: u16) -> Result<(), Error> {
        self.notice(
            ExecResize {
                exec_id,
                rows,
                cols,
            }
            .into(),
        )
        .await
    }

    /// Sends a signal to an exec's process group.
    ///
    /// ```no_run
    /// # async fn demo(client: control_link::Client) -> Result<(), control_link::Error> {
    /// client.exec_signal(3, "INT").await?;
    /// # Ok(()) }
    /// ```
    pub async fn exec_signal(&self, exec_id: u64, signal: impl Into<Sig>) -> Result<(), Error> {
        let signal = signal.into().0;
        self.notice(ExecSignal { exec_id, signal }.into()).await
    }

    /// The shim's status.
    ///
    /// ```no_run
    /// # async fn demo(client: control_link::Client) -> Result<(), control_link::Error> {
    /// let s = client.status().await?;
    /// println!("{:?}, {} restarts, last seq {}", s.state, s.restarts, s.last_seq);
    /// # Ok(()) }
    /// ```
    pub async fn status(&self) -> Result<StatusReply, Error> {
        let id = self.inner.shared.next_id();
        match self.call(id, Status { id }.into()).await? {
            ShimToControl::StatusReply(s) => {
                self.inner.shared.wake.saw_state(s.state);
                Ok(s)
            }
            other => Err(unexpected(&other)),
        }
    }

    /// A resource reading of the sandbox (`metrics`, PROTOCOL.md §8.9): its cgroup's memory,
    /// CPU, pids and io, its workspace disk, the driver's and each exec's processes. Every
    /// figure is optional: present only when the shim could read it.
    ///
    /// ```no_run
    /// # async fn demo(client: control_link::Client) -> Result<(), control_link::Error> {
    /// let r = client.metrics().await?;
    /// if let Some(cg) = &r.cgroup {
    ///     println!("memory {:?} of {:?} bytes", cg.memory_bytes, cg.memory_limit_bytes);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn metrics(&self) -> Result<Reading, Error> {
        let id = self.inner.shared.next_id();
        match self.call(id, Metrics { id }.into()).await? {
            ShimToControl::MetricsReply(m) => Ok(m.into_reading()),
            other => Err(unexpected(&other)),
        }
    }

    /// The execs running and the recently exited ones (`list_execs`, PROTOCOL.md §8.10):
    /// argv, pid, user, tag, owner, start time, and for an exited one how and when it ended.
    ///
    /// ```no_run
    /// # async fn demo(client: control_link::Client) -> Result<(), control_link::Error> {
    /// for e in client.list_execs().await? {
    ///     println!("{} {:?} {:?} {:?}", e.exec_id, e.tag, e.argv, e.exit);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn list_execs(&self) -> Result<Vec<ExecInfo>, Error> {
        let id = self.inner.shared.next_id();
        match self.call(id, ListExecs { id }.into()).await? {
            ShimToControl::ExecList(l) => Ok(l.execs),
            other => Err(unexpected(&other)),
        }
    }

    /// Attaches to exec `exec_id` (`attach_exec`, PROTOCOL.md §8.10): the output the shim
    /// still retains from `from_offset` (`None`: the oldest byte retained), then the live
    /// output, then the exit. An offset no longer retained is
    /// [`Error::Remote`] with code `gap` (the message names the first retained offset).
    /// Read-only: the exec's owner is not affected.
    ///
    /// ```no_run
    /// # async fn demo(client: control_link::Client) -> Result<(), control_link::Error> {
    /// use control_link::AttachItem;
    /// let (attached, mut stream) = client.attach_exec(17, None).await?;
    /// println!("from byte {}", attached.from_offset);
    /// while let Some(item) = stream.next().await {
    ///     match item {
    ///         AttachItem::Output(o) => print!("{}", String::from_utf8_lossy(&o.data)),
    ///         AttachItem::Lagged(l) => eprintln!("skipped {} bytes", l.missed),
    ///         AttachItem::Exit(x) => println!("exit {:?}", x.code),
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn attach_exec(
        &self,
        exec_id: u64,
        from_offset: Option<u64>,
    ) -> Result<(ExecAttached, AttachStream), Error> {
        let id = self.inner.shared.next_id();
        let msg = AttachExec {
            id,
            exec_id,
            from_offset,
        }
        .into();
        let limit = self.inner.request_timeout;
        let (sink, stream) = crate::attach::channel(exec_id, 0, self.inner.attach_buffer);
        let call = async {
            let (tx, reply) = oneshot::channel();
            self.inner
                .cmds
                .send(Cmd::Attach {
                    id,
                    msg: Box::new(msg),
                    exec_id,
                    reply: tx,
                    sink,
                })
                .map_err(|_| self.inner.shared.closed_error())?;
            reply.await.map_err(|_| self.inner.shared.closed_error())?
        };
        match tokio::time::timeout(limit, call).await {
            Ok(Ok(ShimToControl::ExecAttached(a))) => {
                let stream = stream.starting_at(a.from_offset);
                Ok((a, stream))
            }
            Ok(Ok(ShimToControl::Error(e))) => Err(Error::remote(e.code, e.message)),
            Ok(Ok(other)) => Err(unexpected(&other)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::Timeout(limit)),
        }
    }

    /// Stops following exec `exec_id` on this connection (`detach_exec`).
    pub async fn detach_exec(&self, exec_id: u64) -> Result<(), Error> {
        self.call_ok(|id| DetachExec { id, exec_id }.into())
            .await
            .map(|_| ())
    }

    /// How a task this client submitted ended: its `task_done`, with the output checked
    /// against the `output_schema` it was submitted with (feature `schema`). A task this
    /// client does not know (submitted elsewhere, or one of the 4096 most recent no more)
    /// is taken as having no schema: use [`TaskOutcome::check`](crate::TaskOutcome::check)
    /// with the stored schema then.
    ///
    /// ```no_run
    /// # async fn demo(client: control_link::Client) -> Result<(), control_link::Error> {
    /// use control_link::protocol::message::Event;
    /// use control_link::{TaskOutcome, TaskSpec};
    /// let schema = rmpv::Value::Map(vec![("type".into(), "integer".into())]);
    /// let mut events = client.events()?;
    /// client.submit_task(TaskSpec::new("t1", "2+2?").output_schema(schema)).await?;
    /// while let Some((_, event)) = events.next().await {
    ///     if let Event::TaskDone(done) = &event {
    ///         match client.task_outcome(done) {
    ///             TaskOutcome::SchemaInvalid { errors, .. } => eprintln!("bad output: {errors:?}"),
    ///             other => println!("{other:?}"),
    ///         }
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "schema")]
    pub fn task_outcome(&self, done: &driver_protocol::message::TaskDone) -> crate::TaskOutcome {
        let memo = self.inner.shared.schemas.lock().ok();
        let schema = memo.as_ref().and_then(|m| m.get(&done.task_id));
        crate::TaskOutcome::check(done, schema)
    }

    /// Whether a submit would wake the agent first: a wake hook is set, and the last known
    /// state is `pausing`/`paused` or no connection is up.
    ///
    /// ```no_run
    /// # fn demo(client: control_link::Client) {
    /// if client.needs_wake() { println!("the next task wakes the agent"); }
    /// # }
    /// ```
    pub fn needs_wake(&self) -> bool {
        self.inner.wake_hook.is_some() && (self.inner.shared.wake.paused() || !self.is_connected())
    }

    /// Wakes the agent if it needs it (see [`ConnectOptions::wake_hook`](crate::ConnectOptions::wake_hook)).
    async fn wake_if_needed(&self) -> Result<(), Error> {
        let Some(hook) = self.inner.wake_hook.clone() else {
            return Ok(());
        };
        if !self.needs_wake() {
            return Ok(());
        }
        let limit = self.inner.wake_timeout;
        let wake = async {
            // One waker per agent; whoever waited finds it awake (or wakes it, if that
            // failed).
            let _waker = self.inner.shared.wake.lock.lock().await;
            if !self.needs_wake() {
                return Ok(());
            }
            let agent = self.inner.wake_agent.clone();
            tracing::info!(%agent, "waking the agent before a submit");
            hook(agent).await.map_err(Error::Wake)?;
            let _ = self.inner.cmds.send(Cmd::RedialNow);
            self.until_ready().await
        };
        tokio::time::timeout(limit, wake)
            .await
            .unwrap_or(Err(Error::Timeout(limit)))
    }

    /// After the hook: waits for the shim to answer, resumes it if paused, waits for
    /// `ready` (or a state where waiting is pointless). Bounded by the caller.
    async fn until_ready(&self) -> Result<(), Error> {
        let mut resumed = false;
        loop {
            let id = self.inner.shared.next_id();
            let probe = tokio::time::timeout(
                crate::wake::WAKE_STATUS_TRY,
                self.call(id, Status { id }.into()),
            )
            .await;
            if let Ok(Ok(ShimToControl::StatusReply(s))) = probe {
                self.inner.shared.wake.saw_state(s.state);
                match s.state {
                    DriverState::Paused if !resumed => {
                        match self.call_ok(|id| Resume::new(id).into()).await {
                            Ok(_) => resumed = true,
                            // Someone else resumed it meanwhile.
                            Err(e) if e.code() == Some(&crate::ErrorCode::InvalidState) => {}
                            Err(e) => return Err(e),
                        }
                    }
                    // Taking tasks; or a state no waiting changes (the shim answers the
                    // submit as it will).
                    DriverState::Ready | DriverState::Error | DriverState::Stopping => {
                        return Ok(())
                    }
                    _ => {}
                }
            }
            tokio::time::sleep(crate::wake::WAKE_POLL).await;
        }
    }

    /// Stops the agent and the shim: the driver gets `grace`, buffered events are
    /// delivered, the shim exits.
    ///
    /// ```no_run
    /// # async fn demo(client: control_link::Client) -> Result<(), control_link::Error> {
    /// client.shutdown(Some(std::time::Duration::from_secs(5)), Some("scale down")).await?;
    /// # Ok(()) }
    /// ```
    pub async fn shutdown(
        &self,
        grace: Option<Duration>,
        reason: Option<&str>,
    ) -> Result<(), Error> {
        self.call_ok(|id| {
            Shutdown {
                id,
                grace_ms: grace.map(millis),
                reason: reason.map(str::to_owned),
            }
            .into()
        })
        .await
        .map(drop)
    }

    /// Pings the shim; returns the round-trip time.
    ///
    /// ```no_run
    /// # async fn demo(client: control_link::Client) -> Result<(), control_link::Error> {
    /// println!("rtt {:?}", client.ping().await?);
    /// # Ok(()) }
    /// ```
    pub async fn ping(&self) -> Result<Duration, Error> {
        let id = self.inner.shared.next_id();
        let start = Instant::now();
        match self.call(id, Ping { id }.into()).await? {
            ShimToControl::Pong(_) => Ok(start.elapsed()),
            other => Err(unexpected(&other)),
        }
    }

    /// Sets the sandbox's wall clock to `time` (a microVM's is wrong after a snapshot restore
    /// or a long pause; to set it as a paused agent resumes, give the time to
    /// [`resume`](Self::resume) instead). The jump the shim corrected arrives as a
    /// `clock_set` event. `invalid` for a time the kernel refuses, `internal` where the shim
    /// may not set the clock (inside a container).
    ///
    /// ```no_run
    /// # async fn demo(client: control_link::Client) -> Result<(), control_link::Error> {
    /// client.set_clock(std::time::SystemTime::now()).await?;
    /// # Ok(()) }
    /// ```
    pub async fn set_clock(&self, time: std::time::SystemTime) -> Result<(), Error> {
        let unix_ms = unix_ms(time);
        self.call_ok(|id| driver_protocol::message::SetClock { id, unix_ms }.into())
            .await?;
        Ok(())
    }

    /// Drops the current connection as a network failure would. A client from [`connect`]
    /// dials again; one accepted by a [`Listener`](crate::Listener) or a
    /// [`Fleet`](crate::Fleet) waits for its shim to dial again. Either way the event stream
    /// resumes where the consumer is: nothing is lost or repeated. For failover drills and
    /// demos.
    ///
    /// ```no_run
    /// # async fn demo(client: control_link::Client) {
    /// client.drop_connection();
    /// # }
    /// ```
    pub fn drop_connection(&self) {
        self.inner.shared.drop_now.notify_one();
    }

    /// Test hook: the next request is written, then the connection drops before its reply
    /// is read (a lost reply).
    #[doc(hidden)]
    pub fn test_drop_after_next_send(&self) {
        self.inner
            .shared
            .drop_after_send
            .store(true, Ordering::Release);
    }

    /// Test hook: sends a request with a chosen id (to simulate another instance's retry).
    #[doc(hidden)]
    pub async fn test_request(
        &self,
        id: RequestId,
        msg: ControlToShim,
    ) -> Result<ShimToControl, Error> {
        self.call(id, msg).await
    }
}

/// A reply of the wrong type.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `time` in milliseconds since the Unix epoch (0 before it, `u64::MAX` past what fits).
fn unix_ms(time: std::time::SystemTime) -> u64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
