//! The supervisor's synchronous core: every decision, no I/O.
//!
//! The core owns the driver's [`Lifecycle`], the [`Restarter`], the [`TaskQueue`] and every
//! timer (as deadlines). The async shell ([`super`]) feeds it inputs — a driver message, the
//! driver's exit, a control command, a signal, "a deadline passed" — and carries out what it
//! asks for: [`Output`]s (frames for the driver, events to publish, "launch the driver now")
//! and kills, which go straight through [`Sys::kill`]. Time is passed in, so the unit tests
//! drive every transition with a fake [`Sys`] and a made-up clock, without a process.
//!
//! ```text
//!  Launch ─► on_launched ─► hello ⇄ hello ─► ready ─► tasks, pause/resume, pings
//!                 │                                         │
//!                 └── ready timeout / ping misses / cancel grace / protocol error: SIGKILL
//!  on_driver_exit ─► driver_exited, task lost/requeued ─► restart (backoff) | crash loop | exit
//!  SIGTERM/shutdown ─► stopping: shutdown ─► grace/2 SIGTERM group ─► grace SIGKILL ─► exit
//! ```

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use driver_protocol::handshake;
use driver_protocol::message::{
    Cancel, CrashLoop, DriverExited, DriverReady, DriverRestarting, DriverStarted, DriverState,
    DriverToShim, ErrorMsg, Event, ExitInfo, Hello, OkReply, Pause, Paused, Ping, Pong, Resume,
    Role, ShimToControl, ShimToDriver, Shutdown, SignalTarget, StatusReply, TaskAccepted,
};
use driver_protocol::{DecodeError, ErrorCode};
use tracing::{debug, info, warn};

use crate::cli::Config;
use crate::reaper::ExitStatus;
use crate::signals::{self, Origin, WarnLimiter};
use crate::sys::{SigInfo, Sys};

use super::lifecycle::{Input, Lifecycle};
use super::restart::{BackoffConfig, CrashLoopConfig, Decision, Restarter};
use super::tasks::{CancelOutcome, LostOutcome, SubmitOutcome, TaskQueue};

/// Finished task ids remembered for idempotent `submit_task`.
const REMEMBER_TASKS: usize = 1024;

/// Something the shell must do for the core.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Queue this message for the driver.
    ToDriver(ShimToDriver),
    /// Publish this shim event.
    Event(Event),
    /// Publish this driver event, given as its MessagePack body (relayed, never re-encoded).
    Relay(Bytes),
    /// Launch the driver now (then call [`Core::on_launched`] or [`Core::on_launch_error`]).
    Launch,
    /// Stop reading the driver's socket (it sent something unusable).
    StopReading,
}

/// Why the driver ended, as reported in `driver_exited.reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// It exited 0 on its own.
    Exited,
    /// It exited non-zero or died of a signal on its own.
    Crashed,
    /// It stopped answering pings (or reading its socket); we killed it.
    Hung,
    /// It did not send `ready` in time; we killed it.
    NotReady,
    /// It sent something that is not the protocol; we killed it.
    ProtocolError,
    /// It could not be started.
    ExecFailed,
    /// A task's cancel grace expired; we killed it.
    CancelTimeout,
    /// We stopped it (shutdown or `restart_driver`).
    Shutdown,
}

impl ExitReason {
    /// The wire form.
    pub fn as_str(self) -> &'static str {
        match self {
            ExitReason::Exited => "exited",
            ExitReason::Crashed => "crashed",
            ExitReason::Hung => "hung",
            ExitReason::NotReady => "not_ready",
            ExitReason::ProtocolError => "protocol_error",
            ExitReason::ExecFailed => "exec_failed",
            ExitReason::CancelTimeout => "cancel_timeout",
            ExitReason::Shutdown => "shutdown",
        }
    }
}

/// The running driver.
#[derive(Debug)]
struct Driver {
    pid: i32,
    started: Instant,
    /// Its `hello` arrived and was accepted.
    hello: bool,
    /// Why we killed it, if we did (the first reason wins).
    kill_reason: Option<ExitReason>,
    ready_deadline: Option<Instant>,
    next_ping: Option<Instant>,
    pings_unanswered: u32,
}

/// A `pause` in progress.
#[derive(Debug)]
struct Pausing {
    control_id: u64,
    deadline: Instant,
}

/// A `cancel` forwarded to the driver, waiting for its `task_done`.
#[derive(Debug)]
struct Cancelling {
    task_id: String,
    deadline: Instant,
}

/// The shutdown sequence.
#[derive(Debug, Default)]
struct Stopping {
    term_at: Option<Instant>,
    kill_at: Option<Instant>,
}

/// The supervisor's decisions; see the module docs.
#[derive(Debug)]
pub struct Core<S: Sys> {
    sys: S,
    cfg: Config,
    own_pid: i32,
    pid1: bool,
    started: Instant,
    hello: Hello,
    lifecycle: Lifecycle,
    restarter: Restarter,
    tasks: TaskQueue,
    driver: Option<Driver>,
    /// The attempt number of the next launch.
    next_attempt: u32,
    next_request_id: u64,
    restart_at: Option<Instant>,
    relaunch_after_exit: bool,
    pausing: Option<Pausing>,
    paused_at: Option<SystemTime>,
    resuming: bool,
    cancelling: Option<Cancelling>,
    stopping: Option<Stopping>,
    last_exit: Option<ExitStatus>,
    exit_code: Option<i32>,
    limiter: WarnLimiter,
    out: Vec<Output>,
}

impl<S: Sys> Core<S> {
    /// A core for `cfg`; nothing launched yet (call [`Core::start`]).
    pub fn new(sys: S, cfg: &Config, now: Instant, seed: u64) -> Self {
        let own_pid = sys.getpid();
        let sup = &cfg.sup;
        let restarter = Restarter::new(
            sup.restart,
            BackoffConfig {
                initial: sup.backoff_initial,
                max: sup.backoff_max,
                factor: sup.backoff_factor,
                jitter: sup.backoff_jitter,
                reset_after: sup.backoff_reset,
            },
            CrashLoopConfig {
                restarts: sup.crash_loop_restarts,
                window: sup.crash_loop_window,
            },
            seed,
        );
        Core {
            own_pid,
            pid1: own_pid == 1,
            started: now,
            hello: Hello::new(Role::Shim, "agent-shim", env!("CARGO_PKG_VERSION")),
            lifecycle: Lifecycle::new(),
            restarter,
            tasks: TaskQueue::new(sup.task_queue, REMEMBER_TASKS),
            driver: None,
            next_attempt: 1,
            next_request_id: 1,
            restart_at: None,
            relaunch_after_exit: false,
            pausing: None,
            paused_at: None,
            resuming: false,
            cancelling: None,
            stopping: None,
            last_exit: None,
            exit_code: None,
            limiter: WarnLimiter::default(),
            out: Vec::new(),
            cfg: cfg.clone(),
            sys,
        }
    }

    /// Asks for the first launch.
    pub fn start(&mut self) {
        self.out.push(Output::Launch);
    }

    /// Takes the outputs produced so far, in order.
    pub fn take_outputs(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.out)
    }

    /// The shim's exit code once it should exit.
    pub fn exit_code(&self) -> Option<i32> {
        self.exit_code
    }

    /// The driver's state.
    pub fn state(&self) -> DriverState {
        self.lifecycle.state()
    }

    /// The driver's pid, while it runs.
    pub fn driver_pid(&self) -> Option<i32> {
        self.driver.as_ref().map(|d| d.pid)
    }

    /// The `--grace` SIGKILL deadline of the shutdown sequence, if one is running.
    pub fn kill_deadline(&self) -> Option<Instant> {
        self.stopping.as_ref().and_then(|s| s.kill_at)
    }

    fn request_id(&mut self) -> u64 {
        let id = self.next_request_id;
        self.next_request_id = self.next_request_id.wrapping_add(1).max(1);
        id
    }

    fn send(&mut self, msg: impl Into<ShimToDriver>) {
        self.out.push(Output::ToDriver(msg.into()));
    }

    fn event(&mut self, ev: impl Into<Event>) {
        self.out.push(Output::Event(ev.into()));
    }

    fn transition(&mut self, input: Input) {
        match self.lifecycle.apply(input) {
            Ok(Some(change)) => {
                info!(from = ?change.from, to = ?change.to, "driver state changed");
                self.event(change);
            }
            Ok(None) => {}
            Err(err) => warn!(%err, "ignoring an invalid lifecycle transition"),
        }
    }

    fn since(now: Instant, then: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(then).as_millis()).unwrap_or(u64::MAX)
    }

    fn ms(d: Duration) -> u64 {
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
    }

    // ---- launch and exit ------------------------------------------------------------------

    /// The driver was forked as `pid` (its exit will reach [`Core::on_driver_exit`]).
    pub fn on_launched(&mut self, pid: i32, now: Instant) {
        let attempt = self.next_attempt;
        self.next_attempt = attempt.saturating_add(1);
        let sup = &self.cfg.sup;
        self.driver = Some(Driver {
            pid,
            started: now,
            hello: false,
            kill_reason: None,
            ready_deadline: now.checked_add(sup.ready_timeout),
            // Pings start at `ready`: until then `--ready-timeout` is the liveness check.
            next_ping: None,
            pings_unanswered: 0,
        });
        info!(pid, attempt, "driver started");
        self.transition(Input::Launched);
        self.event(DriverStarted {
            pid: pid.unsigned_abs(),
            attempt,
        });
        self.send(self.hello.clone());
    }

    /// The driver was forked as `pid` but its `execve` (or credential change) failed: its
    /// exit is an `exec_failed`.
    pub fn on_exec_failed(&mut self, pid: i32, now: Instant) {
        self.on_launched(pid, now);
        if let Some(d) = self.driver.as_mut() {
            d.kill_reason = Some(ExitReason::ExecFailed);
        }
    }

    /// The driver could not even be forked: a failed start without a process.
    pub fn on_launch_error(&mut self, now: Instant) {
        let attempt = self.next_attempt;
        self.next_attempt = attempt.saturating_add(1);
        self.transition(Input::Launched);
        self.event(DriverStarted { pid: 0, attempt });
        self.driver_gone(0, now, ExitStatus::Exited(125), ExitReason::ExecFailed, now);
    }

    /// The reaper collected the driver.
    pub fn on_driver_exit(&mut self, pid: i32, status: ExitStatus, now: Instant) {
        let Some(driver) = self.driver.take_if(|d| d.pid == pid) else {
            debug!(pid, "not the current driver");
            return;
        };
        let reason = driver.kill_reason.unwrap_or(match status {
            ExitStatus::Exited(0) => ExitReason::Exited,
            _ => ExitReason::Crashed,
        });
        self.driver_gone(pid, driver.started, status, reason, now);
    }

    fn driver_gone(
        &mut self,
        pid: i32,
        started: Instant,
        status: ExitStatus,
        reason: ExitReason,
        now: Instant,
    ) {
        let uptime = now.saturating_duration_since(started);
        let (code, signal, detail) = match status {
            ExitStatus::Exited(c) => (Some(c), None, format!("exit code {c}")),
            ExitStatus::Signaled(s) => {
                let name = signals::name(s);
                let detail = format!("signal {name}");
                (None, Some(name), detail)
            }
        };
        info!(pid, ?status, reason = reason.as_str(), "driver exited");
        self.event(DriverExited {
            pid: pid.unsigned_abs(),
            code,
            signal,
            uptime_ms: Self::ms(uptime),
            reason: reason.as_str().to_owned(),
        });
        self.pausing = None;
        self.paused_at = None;
        self.resuming = false;
        self.cancelling = None;
        self.last_exit = Some(status);
        self.transition(Input::Exited);
        match self
            .tasks
            .driver_lost(&format!("driver {}: {detail}", reason.as_str()))
        {
            Some(LostOutcome::Failed(done)) => self.event(done),
            Some(LostOutcome::Requeued { task_id, attempt }) => {
                info!(task_id, attempt, "task will be redelivered");
            }
            None => {}
        }
        if self.stopping.is_some() {
            self.finish(status);
            return;
        }
        if self.relaunch_after_exit {
            self.relaunch_after_exit = false;
            self.out.push(Output::Launch);
            return;
        }
        let clean = reason == ExitReason::Exited;
        match self.restarter.on_exit(now, uptime, clean) {
            Decision::Restart { attempt, delay } => {
                info!(attempt, ?delay, "restarting the driver");
                self.next_attempt = attempt;
                self.event(DriverRestarting {
                    attempt,
                    delay_ms: Self::ms(delay),
                });
                self.restart_at = Some(now.checked_add(delay).unwrap_or(now));
            }
            Decision::Stop => self.finish(status),
            Decision::CrashLoop { restarts, window } => {
                warn!(restarts, ?window, "driver crash loop: not restarting it");
                self.event(CrashLoop {
                    restarts,
                    window_ms: Self::ms(window),
                });
                self.transition(Input::CrashLoop);
            }
        }
    }

    fn finish(&mut self, status: ExitStatus) {
        if self.exit_code.is_none() {
            self.exit_code = Some(self.cfg.exit_code(status.code()));
        }
    }

    /// SIGKILLs the driver's process group (and the driver, if it left its group).
    fn kill_driver(&mut self, reason: ExitReason) {
        let Some(d) = self.driver.as_mut() else {
            return;
        };
        if d.kill_reason.is_none() {
            d.kill_reason = Some(reason);
        }
        let pid = d.pid;
        warn!(
            pid,
            reason = reason.as_str(),
            "killing the driver's process group"
        );
        self.kill_group(pid, libc::SIGKILL);
    }

    fn kill_group(&self, pid: i32, sig: i32) {
        match self.sys.kill(-pid, sig) {
            Ok(()) => {}
            Err(nix::errno::Errno::ESRCH) => {
                if let Err(err) = self.sys.kill(pid, sig) {
                    debug!(%err, pid, "cannot signal the driver");
                }
            }
            Err(err) => warn!(%err, pid, "cannot signal the driver's group"),
        }
    }

    // ---- the driver link ------------------------------------------------------------------

    /// The shim's write queue to the driver is over its bound: the driver does not read.
    pub fn on_driver_unwritable(&mut self) {
        self.kill_driver(ExitReason::Hung);
    }

    /// A frame from the driver could not be decoded: tell it, then kill it.
    pub fn on_driver_decode_error(&mut self, err: &DecodeError) {
        warn!(%err, "bad frame from the driver");
        self.send(ErrorMsg {
            re: err.request_id(),
            code: err.code(),
            message: err.to_string(),
            task_id: None,
        });
        self.out.push(Output::StopReading);
        self.kill_driver(ExitReason::ProtocolError);
    }

    fn protocol_violation(&mut self, code: ErrorCode, message: String) {
        warn!(message, "driver protocol error");
        self.send(ErrorMsg {
            re: None,
            code,
            message,
            task_id: None,
        });
        self.out.push(Output::StopReading);
        self.kill_driver(ExitReason::ProtocolError);
    }

    /// One decoded message from the driver; `body` is its MessagePack body.
    pub fn on_driver_msg(&mut self, msg: DriverToShim, body: Bytes, now: Instant) {
        let Some(driver) = self.driver.as_mut() else {
            return;
        };
        if !driver.hello {
            match msg {
                DriverToShim::Hello(h) => match handshake::negotiate(&self.hello, &h) {
                    Ok(n) => {
                        debug!(version = n.version, software = h.software, "driver hello");
                        driver.hello = true;
                    }
                    Err(err) => self.protocol_violation(err.code(), err.to_string()),
                },
                other => self.protocol_violation(
                    ErrorCode::InvalidState,
                    format!(
                        "expected hello, got {}",
                        driver_protocol::message::Message::type_name(&other)
                    ),
                ),
            }
            return;
        }
        let pid = driver.pid;
        let started = driver.started;
        // Being killed: its events and task results still count (a late `task_done` for an
        // abandoned task is dropped by the queue), but it changes no state any more.
        let dying = driver.kill_reason.is_some();
        match msg {
            DriverToShim::Hello(_) => debug!("ignoring a second hello from the driver"),
            DriverToShim::Ready(_) | DriverToShim::Paused(_) if dying => {
                debug!("ignoring ready/paused from a driver being killed");
            }
            DriverToShim::Ready(r) => self.on_ready(r.re, pid, started, now),
            DriverToShim::Paused(_) => {
                if let Some(p) = self.pausing.take() {
                    self.transition(Input::Paused);
                    self.paused_at = Some(SystemTime::now());
                    self.event(Paused {
                        re: Some(p.control_id),
                    });
                } else {
                    debug!("unexpected paused from the driver");
                }
            }
            DriverToShim::TaskDone(done) => {
                if self.tasks.finish(&done.task_id) {
                    if self
                        .cancelling
                        .as_ref()
                        .is_some_and(|c| c.task_id == done.task_id)
                    {
                        self.cancelling = None;
                    }
                    self.out.push(Output::Relay(body));
                    self.start_next();
                } else {
                    warn!(
                        task_id = done.task_id,
                        "task_done for a task not running: dropped"
                    );
                }
            }
            DriverToShim::Ping(p) => self.send(Pong { re: p.id }),
            DriverToShim::Pong(_) => {
                if let Some(d) = self.driver.as_mut() {
                    d.pings_unanswered = 0;
                }
            }
            DriverToShim::Ok(r) => debug!(re = r.re, "driver ok"),
            DriverToShim::Error(e) if e.re.is_some() => {
                debug!(re = e.re, code = %e.code, message = e.message, "driver error reply");
            }
            DriverToShim::Error(_)
            | DriverToShim::MessageChunk(_)
            | DriverToShim::ToolCall(_)
            | DriverToShim::ToolResult(_)
            | DriverToShim::FileChange(_)
            | DriverToShim::Progress(_)
            | DriverToShim::Log(_)
            | DriverToShim::Custom(_) => self.out.push(Output::Relay(body)),
            DriverToShim::Exec(e) => self.unsupported(Some(e.id), "exec"),
            DriverToShim::ExecInput(_) => self.unsupported(None, "exec_input"),
            DriverToShim::ExecResize(_) => self.unsupported(None, "exec_resize"),
            DriverToShim::ExecSignal(_) => self.unsupported(None, "exec_signal"),
            DriverToShim::Unknown(u) => {
                debug!(type_name = u.type_name, "unknown message from the driver");
                self.send(ErrorMsg {
                    re: u.id,
                    code: ErrorCode::Unsupported,
                    message: format!("unknown message type {:?}", u.type_name),
                    task_id: None,
                });
            }
        }
    }

    fn unsupported(&mut self, re: Option<u64>, what: &str) {
        self.send(ErrorMsg {
            re,
            code: ErrorCode::Unsupported,
            message: format!("{what} is not implemented yet"),
            task_id: None,
        });
    }

    fn on_ready(&mut self, re: Option<u64>, pid: i32, started: Instant, now: Instant) {
        match self.lifecycle.state() {
            DriverState::Starting => {
                let interval = self.cfg.sup.ping_interval;
                if let Some(d) = self.driver.as_mut() {
                    d.ready_deadline = None;
                    if !interval.is_zero() {
                        d.next_ping = now.checked_add(interval);
                    }
                }
                self.transition(Input::Ready);
                self.event(DriverReady {
                    pid: pid.unsigned_abs(),
                    startup_ms: Self::since(now, started),
                });
                self.start_next();
            }
            DriverState::Paused if self.resuming => {
                self.resuming = false;
                self.paused_at = None;
                self.transition(Input::Resumed);
                self.start_next();
            }
            state => debug!(?state, ?re, "ignoring ready from the driver"),
        }
    }

    /// Sends the next queued task if the driver can take it.
    fn start_next(&mut self) {
        if self.lifecycle.state() != DriverState::Ready
            || self.driver.as_ref().is_none_or(|d| d.kill_reason.is_some())
        {
            return;
        }
        if let Some(task) = self.tasks.start_next() {
            info!(
                task_id = task.task_id,
                attempt = task.attempt,
                "task delivered"
            );
            self.send(task);
        }
    }

    // ---- timers ---------------------------------------------------------------------------

    /// The nearest deadline, if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        let d = self.driver.as_ref();
        let s = self.stopping.as_ref();
        [
            self.restart_at,
            d.and_then(|d| d.ready_deadline),
            d.and_then(|d| d.next_ping),
            self.pausing.as_ref().map(|p| p.deadline),
            self.cancelling.as_ref().map(|c| c.deadline),
            s.and_then(|s| s.term_at),
            s.and_then(|s| s.kill_at),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Handles every deadline that is due at `now`.
    pub fn on_timer(&mut self, now: Instant) {
        let due = |t: Option<Instant>| t.is_some_and(|t| t <= now);
        if due(self.restart_at) {
            self.restart_at = None;
            if self.driver.is_none() && self.stopping.is_none() {
                self.out.push(Output::Launch);
            }
        }
        if let Some(d) = self.driver.as_mut() {
            if due(d.ready_deadline) {
                d.ready_deadline = None;
                warn!(timeout = ?self.cfg.sup.ready_timeout, "the driver was not ready in time");
                self.kill_driver(ExitReason::NotReady);
            }
        }
        if let Some(d) = self.driver.as_mut() {
            if due(d.next_ping) {
                let interval = self.cfg.sup.ping_interval;
                d.next_ping = now.checked_add(interval);
                if d.pings_unanswered >= self.cfg.sup.ping_misses {
                    d.next_ping = None;
                    warn!(
                        misses = d.pings_unanswered,
                        "the driver does not answer pings"
                    );
                    self.kill_driver(ExitReason::Hung);
                } else {
                    d.pings_unanswered = d.pings_unanswered.saturating_add(1);
                    let id = self.request_id();
                    self.send(Ping { id });
                }
            }
        }
        if self.pausing.as_ref().is_some_and(|p| p.deadline <= now) {
            self.pausing = None;
            warn!("the driver did not pause in time");
            self.transition(Input::PauseTimedOut);
            self.event(ErrorMsg {
                re: None,
                code: ErrorCode::Timeout,
                message: "the driver did not reach a safe point in time".to_owned(),
                task_id: None,
            });
            self.start_next();
        }
        if self.cancelling.as_ref().is_some_and(|c| c.deadline <= now) {
            self.cancelling = None;
            self.kill_driver(ExitReason::CancelTimeout);
            if let Some(done) = self.tasks.abandon_running("cancel grace expired") {
                self.event(done);
            }
        }
        let pid = self.driver.as_ref().map(|d| d.pid);
        if let Some(s) = self.stopping.as_mut() {
            if due(s.term_at) {
                s.term_at = None;
                if let Some(pid) = pid {
                    info!(pid, "half the grace is over: SIGTERM to the driver's group");
                    self.kill_group(pid, libc::SIGTERM);
                }
            }
        }
        if let Some(s) = self.stopping.as_mut() {
            if due(s.kill_at) {
                s.kill_at = None;
                warn!(grace = ?self.cfg.grace, "grace period over, sending SIGKILL");
                if self.pid1 {
                    if let Err(err) = self.sys.kill(-1, libc::SIGKILL) {
                        debug!(%err, "kill(-1) failed");
                    }
                } else if let Some(pid) = pid {
                    self.kill_group(pid, libc::SIGKILL);
                }
            }
        }
    }

    // ---- signals --------------------------------------------------------------------------

    /// A signal from outside (not SIGCHLD: the shell reaps).
    pub fn on_signal(&mut self, info: &SigInfo, now: Instant) {
        let sig = info.signo;
        match signals::origin(
            info,
            self.own_pid,
            self.pid1,
            self.cfg.allow_internal_signals,
        ) {
            Origin::Accepted => {}
            Origin::Ourselves => return,
            Origin::Internal => {
                if let Some(suppressed) = self.limiter.check(info.pid, now) {
                    warn!(
                        signal = %signals::name(sig),
                        sender_pid = info.pid,
                        suppressed,
                        "ignoring a signal sent to PID 1 from inside the container \
                         (--allow-internal-signals to honour it)"
                    );
                }
                return;
            }
        }
        let Some(fwd) = self.cfg.rewrites.apply(sig) else {
            debug!(signal = %signals::name(sig), "dropping signal (--rewrite to 0)");
            return;
        };
        if fwd == libc::SIGTERM || fwd == libc::SIGINT {
            info!(signal = %signals::name(sig), "stop requested");
            self.begin_stop(
                now,
                self.cfg.grace,
                Some(format!("signal {}", signals::name(sig))),
            );
            return;
        }
        if let Some(pid) = self.driver_pid() {
            debug!(signal = %signals::name(fwd), pid, "forwarding signal to the driver's group");
            self.kill_group(pid, fwd);
        }
    }

    fn begin_stop(&mut self, now: Instant, grace: Duration, reason: Option<String>) {
        if self.stopping.is_some() {
            return;
        }
        self.transition(Input::StopRequested);
        self.restart_at = None;
        self.pausing = None;
        self.cancelling = None;
        match self.driver.as_ref() {
            Some(_) => {
                let id = self.request_id();
                self.send(Shutdown {
                    id,
                    grace_ms: Some(Self::ms(grace)),
                    reason,
                });
                self.stopping = Some(Stopping {
                    term_at: now.checked_add(grace / 2),
                    kill_at: now.checked_add(grace),
                });
            }
            None => {
                self.stopping = Some(Stopping::default());
                self.finish(self.last_exit.unwrap_or(ExitStatus::Exited(0)));
            }
        }
    }

    // ---- control commands -----------------------------------------------------------------

    /// Executes one control command and returns its reply. `status` is answered by the shell
    /// (it adds what only it knows) from [`Core::status`].
    pub fn on_command(
        &mut self,
        req: driver_protocol::message::ControlToShim,
        now: Instant,
    ) -> ShimToControl {
        use driver_protocol::message::ControlToShim as C;
        let ok = |re| ShimToControl::Ok(OkReply { re });
        let err = |re, code, message: &str| {
            ShimToControl::Error(ErrorMsg {
                re: Some(re),
                code,
                message: message.to_owned(),
                task_id: None,
            })
        };
        match req {
            C::SubmitTask(s) => {
                let re = s.id;
                if self.stopping.is_some() {
                    return err(re, ErrorCode::ShuttingDown, "the shim is shutting down");
                }
                let task_id = s.task_id.clone();
                match self.tasks.submit(s) {
                    SubmitOutcome::Accepted { position } => {
                        self.event(TaskAccepted { task_id, position });
                        self.start_next();
                        ok(re)
                    }
                    SubmitOutcome::Duplicate => ok(re),
                    SubmitOutcome::Full => err(
                        re,
                        ErrorCode::Limit,
                        &format!("task queue full ({} tasks)", self.cfg.sup.task_queue),
                    ),
                }
            }
            C::CancelTask(c) => match self.tasks.cancel(&c.task_id) {
                CancelOutcome::Dequeued(done) => {
                    self.event(done);
                    ok(c.id)
                }
                CancelOutcome::Running => {
                    if self.cancelling.is_none() {
                        let grace = c
                            .grace_ms
                            .map_or(self.cfg.sup.cancel_grace, Duration::from_millis);
                        let id = self.request_id();
                        self.send(Cancel {
                            id,
                            task_id: c.task_id.clone(),
                            grace_ms: Some(Self::ms(grace)),
                        });
                        self.cancelling = Some(Cancelling {
                            task_id: c.task_id,
                            deadline: now.checked_add(grace).unwrap_or(now),
                        });
                    }
                    ok(c.id)
                }
                CancelOutcome::Unknown => err(c.id, ErrorCode::NotFound, "no such task"),
            },
            C::Pause(p) => {
                if self.lifecycle.state() != DriverState::Ready || self.driver.is_none() {
                    return err(p.id, ErrorCode::InvalidState, "the driver is not ready");
                }
                let timeout = self.cfg.sup.pause_timeout;
                let id = self.request_id();
                self.transition(Input::PauseRequested);
                self.send(Pause {
                    id,
                    timeout_ms: Some(Self::ms(timeout)),
                });
                self.pausing = Some(Pausing {
                    control_id: p.id,
                    deadline: now.checked_add(timeout).unwrap_or(now),
                });
                ok(p.id)
            }
            C::Resume(r) => {
                if self.lifecycle.state() != DriverState::Paused || self.resuming {
                    return err(r.id, ErrorCode::InvalidState, "the driver is not paused");
                }
                let slept = self
                    .paused_at
                    .and_then(|t| SystemTime::now().duration_since(t).ok())
                    .unwrap_or_default();
                let id = self.request_id();
                self.send(Resume {
                    id,
                    slept_ms: Some(Self::ms(slept)),
                });
                self.resuming = true;
                ok(r.id)
            }
            C::Signal(s) => {
                if s.target == SignalTarget::Exec {
                    return err(s.id, ErrorCode::Unsupported, "exec is not implemented yet");
                }
                let Some(sig) = signals::parse(&s.signal) else {
                    return err(s.id, ErrorCode::Invalid, "unknown signal");
                };
                match self.driver_pid() {
                    Some(pid) => {
                        self.kill_group(pid, sig);
                        ok(s.id)
                    }
                    None => err(s.id, ErrorCode::InvalidState, "no driver is running"),
                }
            }
            C::RestartDriver(r) => {
                if self.stopping.is_some() {
                    return err(r.id, ErrorCode::ShuttingDown, "the shim is shutting down");
                }
                self.restarter.reset();
                self.next_attempt = 1;
                self.restart_at = None;
                self.transition(Input::Recover);
                if self.driver.is_some() {
                    self.relaunch_after_exit = true;
                    self.kill_driver(ExitReason::Shutdown);
                } else {
                    self.out.push(Output::Launch);
                }
                ok(r.id)
            }
            C::Shutdown(s) => {
                let grace = s.grace_ms.map_or(self.cfg.grace, Duration::from_millis);
                self.begin_stop(now, grace, s.reason);
                ok(s.id)
            }
            C::SetDriver(s) => err(
                s.id,
                ErrorCode::Unsupported,
                "set_driver is not implemented yet",
            ),
            C::Exec(e) => err(e.id, ErrorCode::Unsupported, "exec is not implemented yet"),
            C::Status(s) => ShimToControl::StatusReply(self.status(s.id, now)),
            other => {
                let re = match &other {
                    C::Unknown(u) => u.id,
                    _ => None,
                };
                ShimToControl::Error(ErrorMsg {
                    re,
                    code: ErrorCode::Unsupported,
                    message: format!(
                        "{} is not implemented yet",
                        driver_protocol::message::Message::type_name(&other)
                    ),
                    task_id: None,
                })
            }
        }
    }

    /// What the core knows for a `status_reply`; the shell fills in the buffer, the reaper
    /// and memory figures.
    pub fn status(&self, re: u64, now: Instant) -> StatusReply {
        StatusReply {
            re,
            state: self.state(),
            driver_pid: self.driver.as_ref().map(|d| d.pid.unsigned_abs()),
            restarts: self.restarter.restarts(),
            uptime_ms: Self::since(now, self.started),
            last_exit: self.last_exit.map(|s| match s {
                ExitStatus::Exited(c) => ExitInfo {
                    code: Some(c),
                    signal: None,
                },
                ExitStatus::Signaled(sig) => ExitInfo {
                    code: None,
                    signal: Some(signals::name(sig)),
                },
            }),
            children: u32::from(self.driver.is_some()),
            reaped: 0,
            tasks_queued: u32::try_from(self.tasks.queued()).unwrap_or(u32::MAX),
            task_running: self.tasks.running().map(str::to_owned),
            execs_running: 0,
            buffered_events: 0,
            buffered_bytes: 0,
            last_seq: 0,
            rss_bytes: 0,
            idle_since_ms: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::Fake;
    use driver_protocol::message::{
        ControlToShim, Log, RestartDriver, Status, SubmitTask, TaskDone, TaskStatus,
    };

    const PID: i32 = 100;

    fn cfg() -> Config {
        let mut c = Config {
            command: vec!["driver".into()],
            grace: Duration::from_secs(8),
            ..Config::default()
        };
        c.supervise = true;
        c.sup.backoff_jitter = 0.0;
        c.sup.ping_interval = Duration::from_secs(1);
        c.sup.ping_misses = 2;
        c
    }

    fn new_core(cfg: &Config, t0: Instant) -> Core<Fake> {
        let sys = Fake {
            pid: 7,
            ..Fake::default()
        };
        Core::new(sys, cfg, t0, 1)
    }

    fn body() -> Bytes {
        Bytes::from_static(b"\x81\xa4type\xa3log")
    }

    fn events(outs: &[Output]) -> Vec<&Event> {
        outs.iter()
            .filter_map(|o| match o {
                Output::Event(e) => Some(e),
                _ => None,
            })
            .collect()
    }

    fn states(outs: &[Output]) -> Vec<(DriverState, DriverState)> {
        events(outs)
            .into_iter()
            .filter_map(|e| match e {
                Event::StateChanged(c) => Some((c.from, c.to)),
                _ => None,
            })
            .collect()
    }

    fn to_driver(outs: &[Output]) -> Vec<&ShimToDriver> {
        outs.iter()
            .filter_map(|o| match o {
                Output::ToDriver(m) => Some(m),
                _ => None,
            })
            .collect()
    }

    fn launches(outs: &[Output]) -> usize {
        outs.iter().filter(|o| matches!(o, Output::Launch)).count()
    }

    fn hello() -> DriverToShim {
        DriverToShim::Hello(Hello::new(Role::Driver, "test", "1"))
    }

    fn ready() -> DriverToShim {
        DriverToShim::Ready(driver_protocol::message::Ready { re: None })
    }

    /// Launch as PID 100, hello, ready; returns the outputs of the whole start.
    fn up(core: &mut Core<Fake>, now: Instant) -> Vec<Output> {
        core.on_launched(PID, now);
        core.on_driver_msg(hello(), body(), now);
        core.on_driver_msg(ready(), body(), now);
        core.take_outputs()
    }

    fn submit(id: u64, task_id: &str, redeliver: bool) -> ControlToShim {
        ControlToShim::SubmitTask(SubmitTask {
            id,
            task_id: task_id.to_owned(),
            input: "hi".into(),
            output_schema: None,
            timeout_ms: None,
            redeliver,
        })
    }

    fn is_ok(r: &ShimToControl, re: u64) -> bool {
        matches!(r, ShimToControl::Ok(OkReply { re: x }) if *x == re)
    }

    fn err_code(r: &ShimToControl) -> Option<ErrorCode> {
        match r {
            ShimToControl::Error(e) => Some(e.code.clone()),
            _ => None,
        }
    }

    fn task_dones(outs: &[Output]) -> Vec<&TaskDone> {
        events(outs)
            .into_iter()
            .filter_map(|e| match e {
                Event::TaskDone(t) => Some(t),
                _ => None,
            })
            .collect()
    }

    fn exited(outs: &[Output]) -> Vec<&DriverExited> {
        events(outs)
            .into_iter()
            .filter_map(|e| match e {
                Event::DriverExited(x) => Some(x),
                _ => None,
            })
            .collect()
    }

    use DriverState as S;

    #[test]
    fn start_emits_launch_then_starting_and_ready() {
        let t0 = Instant::now();
        let c = cfg();
        let mut core = new_core(&c, t0);
        core.start();
        assert_eq!(launches(&core.take_outputs()), 1);
        core.on_launched(PID, t0);
        let outs = core.take_outputs();
        assert_eq!(states(&outs), vec![(S::Exited, S::Starting)]);
        assert!(events(&outs)
            .iter()
            .any(|e| matches!(e, Event::DriverStarted(d) if d.pid == 100 && d.attempt == 1)));
        assert!(matches!(to_driver(&outs)[..], [ShimToDriver::Hello(_)]));
        core.on_driver_msg(hello(), body(), t0);
        core.on_driver_msg(ready(), body(), t0 + Duration::from_millis(30));
        let outs = core.take_outputs();
        assert_eq!(states(&outs), vec![(S::Starting, S::Ready)]);
        assert!(events(&outs)
            .iter()
            .any(|e| matches!(e, Event::DriverReady(d) if d.pid == 100 && d.startup_ms == 30)));
    }

    #[test]
    fn a_message_before_hello_is_a_protocol_error() {
        let t0 = Instant::now();
        let c = cfg();
        let mut core = new_core(&c, t0);
        core.on_launched(PID, t0);
        core.take_outputs();
        core.on_driver_msg(ready(), body(), t0);
        let outs = core.take_outputs();
        assert!(matches!(to_driver(&outs)[..], [ShimToDriver::Error(_)]));
        assert!(outs.contains(&Output::StopReading));
        assert_eq!(*core.sys.kills.borrow(), vec![(-PID, libc::SIGKILL)]);
        core.on_driver_exit(PID, ExitStatus::Signaled(9), t0);
        assert_eq!(exited(&core.take_outputs())[0].reason, "protocol_error");
    }

    #[test]
    fn pause_resume_and_shutdown_transitions() {
        let t0 = Instant::now();
        let c = cfg();
        let mut core = new_core(&c, t0);
        up(&mut core, t0);
        let r = core.on_command(
            ControlToShim::Pause(Pause {
                id: 5,
                timeout_ms: None,
            }),
            t0,
        );
        assert!(is_ok(&r, 5));
        let outs = core.take_outputs();
        assert_eq!(states(&outs), vec![(S::Ready, S::Pausing)]);
        assert!(matches!(to_driver(&outs)[..], [ShimToDriver::Pause(_)]));
        // A second pause is refused.
        let r = core.on_command(
            ControlToShim::Pause(Pause {
                id: 6,
                timeout_ms: None,
            }),
            t0,
        );
        assert_eq!(err_code(&r), Some(ErrorCode::InvalidState));
        core.on_driver_msg(DriverToShim::Paused(Paused { re: Some(1) }), body(), t0);
        let outs = core.take_outputs();
        assert_eq!(states(&outs), vec![(S::Pausing, S::Paused)]);
        assert!(events(&outs)
            .iter()
            .any(|e| matches!(e, Event::Paused(Paused { re: Some(5) }))));
        let r = core.on_command(
            ControlToShim::Resume(Resume {
                id: 7,
                slept_ms: None,
            }),
            t0,
        );
        assert!(is_ok(&r, 7));
        let outs = core.take_outputs();
        assert!(matches!(
            to_driver(&outs)[..],
            [ShimToDriver::Resume(Resume {
                slept_ms: Some(_),
                ..
            })]
        ));
        core.on_driver_msg(
            DriverToShim::Ready(driver_protocol::message::Ready { re: Some(2) }),
            body(),
            t0,
        );
        assert_eq!(states(&core.take_outputs()), vec![(S::Paused, S::Ready)]);
        let r = core.on_command(
            ControlToShim::Shutdown(Shutdown {
                id: 8,
                grace_ms: Some(1000),
                reason: None,
            }),
            t0,
        );
        assert!(is_ok(&r, 8));
        let outs = core.take_outputs();
        assert_eq!(states(&outs), vec![(S::Ready, S::Stopping)]);
        assert!(matches!(
            to_driver(&outs)[..],
            [ShimToDriver::Shutdown(Shutdown {
                grace_ms: Some(1000),
                ..
            })]
        ));
        core.on_driver_exit(PID, ExitStatus::Exited(3), t0);
        let outs = core.take_outputs();
        assert_eq!(states(&outs), vec![(S::Stopping, S::Exited)]);
        assert_eq!(core.exit_code(), Some(3));
        assert_eq!(launches(&outs), 0);
    }

    #[test]
    fn pause_timeout_returns_to_ready_with_an_error_event() {
        let t0 = Instant::now();
        let c = cfg();
        let mut core = new_core(&c, t0);
        up(&mut core, t0);
        core.on_command(
            ControlToShim::Pause(Pause {
                id: 5,
                timeout_ms: None,
            }),
            t0,
        );
        core.take_outputs();
        core.on_timer(t0 + c.sup.pause_timeout);
        let outs = core.take_outputs();
        assert_eq!(states(&outs), vec![(S::Pausing, S::Ready)]);
        assert!(events(&outs).iter().any(|e| matches!(
            e,
            Event::Error(ErrorMsg {
                code: ErrorCode::Timeout,
                ..
            })
        )));
    }

    #[test]
    fn crash_restarts_with_backoff() {
        let t0 = Instant::now();
        let c = cfg();
        let mut core = new_core(&c, t0);
        up(&mut core, t0);
        let t1 = t0 + Duration::from_secs(1);
        core.on_driver_exit(PID, ExitStatus::Exited(1), t1);
        let outs = core.take_outputs();
        assert_eq!(exited(&outs)[0].reason, "crashed");
        assert_eq!(exited(&outs)[0].code, Some(1));
        assert!(events(&outs).iter().any(|e| matches!(
            e,
            Event::DriverRestarting(DriverRestarting {
                attempt: 2,
                delay_ms: 200
            })
        )));
        assert_eq!(launches(&outs), 0);
        assert_eq!(core.next_deadline(), Some(t1 + Duration::from_millis(200)));
        core.on_timer(t1 + Duration::from_millis(199));
        assert_eq!(launches(&core.take_outputs()), 0);
        core.on_timer(t1 + Duration::from_millis(200));
        assert_eq!(launches(&core.take_outputs()), 1);
        core.on_launched(PID + 1, t1 + Duration::from_millis(200));
        assert!(events(&core.take_outputs())
            .iter()
            .any(|e| matches!(e, Event::DriverStarted(d) if d.attempt == 2)));
        // Second crash: doubled delay.
        core.on_driver_exit(PID + 1, ExitStatus::Signaled(libc::SIGSEGV), t1);
        let outs = core.take_outputs();
        assert_eq!(exited(&outs)[0].signal.as_deref(), Some("SIGSEGV"));
        assert!(events(&outs).iter().any(|e| matches!(
            e,
            Event::DriverRestarting(DriverRestarting { delay_ms: 400, .. })
        )));
    }

    #[test]
    fn clean_exit_with_on_failure_exits_the_shim() {
        let t0 = Instant::now();
        let c = cfg();
        let mut core = new_core(&c, t0);
        up(&mut core, t0);
        core.on_driver_exit(PID, ExitStatus::Exited(0), t0);
        let outs = core.take_outputs();
        assert_eq!(exited(&outs)[0].reason, "exited");
        assert_eq!(core.exit_code(), Some(0));
        assert_eq!(launches(&outs), 0);
    }

    #[test]
    fn crash_loop_goes_to_error_and_restart_driver_recovers() {
        let t0 = Instant::now();
        let mut c = cfg();
        c.sup.crash_loop_restarts = 3;
        let mut core = new_core(&c, t0);
        let mut now = t0;
        let mut pid = PID;
        let mut looped = false;
        for _ in 0..10 {
            core.on_launched(pid, now);
            core.take_outputs();
            core.on_driver_exit(pid, ExitStatus::Exited(1), now);
            let outs = core.take_outputs();
            if events(&outs)
                .iter()
                .any(|e| matches!(e, Event::CrashLoop(_)))
            {
                assert_eq!(
                    states(&outs),
                    vec![(S::Starting, S::Exited), (S::Exited, S::Error)]
                );
                looped = true;
                break;
            }
            now = core.next_deadline().expect("a restart is scheduled");
            core.on_timer(now);
            assert_eq!(launches(&core.take_outputs()), 1);
            pid += 1;
        }
        assert!(looped, "no crash loop detected");
        assert_eq!(core.state(), S::Error);
        assert_eq!(core.next_deadline(), None, "no more restarts");
        assert_eq!(core.exit_code(), None, "the shim stays up");
        let r = core.on_command(ControlToShim::RestartDriver(RestartDriver { id: 9 }), now);
        assert!(is_ok(&r, 9));
        let outs = core.take_outputs();
        assert_eq!(states(&outs), vec![(S::Error, S::Exited)]);
        assert_eq!(launches(&outs), 1);
        core.on_launched(pid + 1, now);
        assert_eq!(states(&core.take_outputs()), vec![(S::Exited, S::Starting)]);
    }

    #[test]
    fn restart_driver_kills_a_running_driver_then_relaunches() {
        let t0 = Instant::now();
        let c = cfg();
        let mut core = new_core(&c, t0);
        up(&mut core, t0);
        let r = core.on_command(ControlToShim::RestartDriver(RestartDriver { id: 1 }), t0);
        assert!(is_ok(&r, 1));
        assert_eq!(*core.sys.kills.borrow(), vec![(-PID, libc::SIGKILL)]);
        assert_eq!(launches(&core.take_outputs()), 0);
        core.on_driver_exit(PID, ExitStatus::Signaled(9), t0);
        let outs = core.take_outputs();
        assert_eq!(exited(&outs)[0].reason, "shutdown");
        assert_eq!(launches(&outs), 1);
    }

    #[test]
    fn ping_misses_kill_the_group() {
        let t0 = Instant::now();
        let c = cfg();
        let mut core = new_core(&c, t0);
        up(&mut core, t0);
        let s = Duration::from_secs(1);
        core.on_timer(t0 + s);
        assert!(matches!(
            to_driver(&core.take_outputs())[..],
            [ShimToDriver::Ping(_)]
        ));
        // An answer resets the count.
        core.on_driver_msg(DriverToShim::Pong(Pong { re: 1 }), body(), t0 + s);
        core.on_timer(t0 + 2 * s);
        core.on_timer(t0 + 3 * s);
        assert_eq!(to_driver(&core.take_outputs()).len(), 2);
        assert!(core.sys.kills.borrow().is_empty());
        core.on_timer(t0 + 4 * s);
        assert_eq!(*core.sys.kills.borrow(), vec![(-PID, libc::SIGKILL)]);
        core.on_driver_exit(PID, ExitStatus::Signaled(9), t0 + 4 * s);
        let outs = core.take_outputs();
        assert_eq!(exited(&outs)[0].reason, "hung");
        assert!(events(&outs)
            .iter()
            .any(|e| matches!(e, Event::DriverRestarting(_))));
    }

    #[test]
    fn ready_timeout_is_not_ready() {
        let t0 = Instant::now();
        let c = cfg();
        let mut core = new_core(&c, t0);
        core.on_launched(PID, t0);
        core.on_driver_msg(hello(), body(), t0);
        core.on_timer(t0 + c.sup.ready_timeout);
        assert!(core.sys.kills.borrow().contains(&(-PID, libc::SIGKILL)));
        core.on_driver_exit(PID, ExitStatus::Signaled(9), t0 + c.sup.ready_timeout);
        assert_eq!(exited(&core.take_outputs())[0].reason, "not_ready");
    }

    #[test]
    fn cancel_grace_expiry_kills_and_reports_cancelled() {
        let t0 = Instant::now();
        let c = cfg();
        let mut core = new_core(&c, t0);
        up(&mut core, t0);
        core.on_command(submit(1, "t1", false), t0);
        core.take_outputs();
        let r = core.on_command(
            ControlToShim::CancelTask(driver_protocol::message::CancelTask {
                id: 2,
                task_id: "t1".into(),
                grace_ms: Some(500),
            }),
            t0,
        );
        assert!(is_ok(&r, 2));
        let outs = core.take_outputs();
        assert!(matches!(
            to_driver(&outs)[..],
            [ShimToDriver::Cancel(Cancel {
                grace_ms: Some(500),
                ..
            })]
        ));
        core.on_timer(t0 + Duration::from_millis(499));
        assert!(core.sys.kills.borrow().is_empty());
        core.on_timer(t0 + Duration::from_millis(500));
        assert_eq!(*core.sys.kills.borrow(), vec![(-PID, libc::SIGKILL)]);
        let outs = core.take_outputs();
        let done = task_dones(&outs);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].status, TaskStatus::Cancelled);
        assert_eq!(done[0].error.as_deref(), Some("cancel grace expired"));
        // The driver's late task_done is dropped.
        core.on_driver_msg(
            DriverToShim::TaskDone(TaskDone {
                task_id: "t1".into(),
                status: TaskStatus::Succeeded,
                output: None,
                error: None,
            }),
            body(),
            t0,
        );
        assert!(core.take_outputs().is_empty());
        core.on_driver_exit(PID, ExitStatus::Signaled(9), t0);
        let outs = core.take_outputs();
        assert_eq!(exited(&outs)[0].reason, "cancel_timeout");
        assert!(task_dones(&outs).is_empty());
    }

    #[test]
    fn cancel_of_a_queued_and_of_an_unknown_task() {
        let t0 = Instant::now();
        let c = cfg();
        let mut core = new_core(&c, t0);
        core.on_command(submit(1, "q", false), t0);
        core.take_outputs();
        let cancel = |id, t: &str| {
            ControlToShim::CancelTask(driver_protocol::message::CancelTask {
                id,
                task_id: t.into(),
                grace_ms: None,
            })
        };
        assert!(is_ok(&core.on_command(cancel(2, "q"), t0), 2));
        assert_eq!(
            task_dones(&core.take_outputs())[0].status,
            TaskStatus::Cancelled
        );
        assert_eq!(
            err_code(&core.on_command(cancel(3, "nope"), t0)),
            Some(ErrorCode::NotFound)
        );
    }

    #[test]
    fn a_task_waits_for_ready_and_is_delivered_once() {
        let t0 = Instant::now();
        let c = cfg();
        let mut core = new_core(&c, t0);
        core.on_launched(PID, t0);
        core.take_outputs();
        let r = core.on_command(submit(1, "t1", false), t0);
        assert!(is_ok(&r, 1));
        let outs = core.take_outputs();
        assert!(events(&outs)
            .iter()
            .any(|e| matches!(e, Event::TaskAccepted(a) if a.task_id == "t1")));
        assert!(to_driver(&outs).is_empty(), "not before ready");
        // A retry is acknowledged and changes nothing.
        assert!(is_ok(&core.on_command(submit(2, "t1", false), t0), 2));
        assert!(core.take_outputs().is_empty());
        core.on_driver_msg(hello(), body(), t0);
        core.on_driver_msg(ready(), body(), t0);
        let outs = core.take_outputs();
        let tasks: Vec<_> = to_driver(&outs)
            .into_iter()
            .filter(|m| matches!(m, ShimToDriver::Task(_)))
            .collect();
        assert_eq!(tasks.len(), 1);
        core.on_driver_msg(ready(), body(), t0);
        assert!(to_driver(&core.take_outputs()).is_empty());
        // Its task_done is relayed and frees the slot.
        core.on_command(submit(3, "t2", false), t0);
        assert!(to_driver(&core.take_outputs()).is_empty(), "one at a time");
        core.on_driver_msg(
            DriverToShim::TaskDone(TaskDone {
                task_id: "t1".into(),
                status: TaskStatus::Succeeded,
                output: None,
                error: None,
            }),
            body(),
            t0,
        );
        let outs = core.take_outputs();
        assert!(outs.iter().any(|o| matches!(o, Output::Relay(_))));
        assert!(matches!(
            to_driver(&outs)[..],
            [ShimToDriver::Task(driver_protocol::message::Task { ref task_id, .. })] if task_id == "t2"
        ));
    }

    #[test]
    fn a_running_task_is_redelivered_or_failed_when_the_driver_crashes() {
        let t0 = Instant::now();
        let c = cfg();
        let mut core = new_core(&c, t0);
        up(&mut core, t0);
        core.on_command(submit(1, "r", true), t0);
        core.take_outputs();
        core.on_driver_exit(PID, ExitStatus::Exited(1), t0);
        assert!(task_dones(&core.take_outputs()).is_empty());
        let t1 = core.next_deadline().expect("restart scheduled");
        core.on_timer(t1);
        core.take_outputs();
        core.on_launched(PID + 1, t1);
        core.on_driver_msg(hello(), body(), t1);
        core.on_driver_msg(ready(), body(), t1);
        let outs = core.take_outputs();
        assert!(
            matches!(
                to_driver(&outs)[..],
                [
                    _,
                    ShimToDriver::Task(driver_protocol::message::Task { attempt: 2, .. })
                ]
            ),
            "{outs:?}"
        );

        // Without redeliver: failed with the reason.
        core.on_command(submit(2, "f", false), t1);
        core.on_driver_msg(
            DriverToShim::TaskDone(TaskDone {
                task_id: "r".into(),
                status: TaskStatus::Succeeded,
                output: None,
                error: None,
            }),
            body(),
            t1,
        );
        core.take_outputs();
        core.on_driver_exit(PID + 1, ExitStatus::Exited(1), t1);
        let outs = core.take_outputs();
        let done = task_dones(&outs);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].status, TaskStatus::Failed);
        assert_eq!(
            done[0].error.as_deref(),
            Some("driver crashed: exit code 1")
        );
    }

    #[test]
    fn sigterm_starts_the_shutdown_sequence() {
        let t0 = Instant::now();
        let c = cfg();
        let mut core = new_core(&c, t0);
        up(&mut core, t0);
        let term = SigInfo {
            signo: libc::SIGTERM,
            code: libc::SI_USER,
            pid: 0,
            uid: 0,
        };
        core.on_signal(&term, t0);
        let outs = core.take_outputs();
        assert_eq!(states(&outs), vec![(S::Ready, S::Stopping)]);
        assert!(matches!(to_driver(&outs)[..], [ShimToDriver::Shutdown(_)]));
        assert!(core.sys.kills.borrow().is_empty());
        // New work is refused while stopping.
        assert_eq!(
            err_code(&core.on_command(submit(1, "late", false), t0)),
            Some(ErrorCode::ShuttingDown)
        );
        core.on_timer(t0 + Duration::from_secs(4));
        assert_eq!(*core.sys.kills.borrow(), vec![(-PID, libc::SIGTERM)]);
        core.on_timer(t0 + Duration::from_secs(8));
        assert_eq!(
            *core.sys.kills.borrow(),
            vec![(-PID, libc::SIGTERM), (-PID, libc::SIGKILL)]
        );
        core.on_driver_exit(PID, ExitStatus::Signaled(libc::SIGKILL), t0);
        assert_eq!(core.exit_code(), Some(137));
        assert_eq!(launches(&core.take_outputs()), 0);
    }

    #[test]
    fn other_signals_go_to_the_driver_group() {
        let t0 = Instant::now();
        let c = cfg();
        let mut core = new_core(&c, t0);
        up(&mut core, t0);
        let hup = SigInfo {
            signo: libc::SIGHUP,
            code: libc::SI_USER,
            pid: 0,
            uid: 0,
        };
        core.on_signal(&hup, t0);
        assert_eq!(*core.sys.kills.borrow(), vec![(-PID, libc::SIGHUP)]);
    }

    #[test]
    fn status_and_unsupported_commands() {
        let t0 = Instant::now();
        let c = cfg();
        let mut core = new_core(&c, t0);
        up(&mut core, t0);
        match core.on_command(ControlToShim::Status(Status { id: 4 }), t0) {
            ShimToControl::StatusReply(s) => {
                assert_eq!(s.re, 4);
                assert_eq!(s.state, S::Ready);
                assert_eq!(s.driver_pid, Some(100));
            }
            other => panic!("{other:?}"),
        }
        let r = core.on_command(
            ControlToShim::SetDriver(driver_protocol::message::SetDriver {
                id: 5,
                argv: vec![],
                env: Default::default(),
            }),
            t0,
        );
        assert_eq!(err_code(&r), Some(ErrorCode::Unsupported));
    }

    #[test]
    fn unknown_driver_messages_get_unsupported_and_events_are_relayed() {
        let t0 = Instant::now();
        let c = cfg();
        let mut core = new_core(&c, t0);
        up(&mut core, t0);
        core.on_driver_msg(
            DriverToShim::Unknown(driver_protocol::message::Unknown {
                type_name: "bogus".into(),
                id: Some(3),
            }),
            body(),
            t0,
        );
        let outs = core.take_outputs();
        assert!(matches!(
            to_driver(&outs)[..],
            [ShimToDriver::Error(ErrorMsg {
                re: Some(3),
                code: ErrorCode::Unsupported,
                ..
            })]
        ));
        core.on_driver_msg(
            DriverToShim::Log(Log {
                task_id: None,
                stream: driver_protocol::message::LogStream::Driver,
                level: None,
                text: "x".into(),
                truncated: false,
            }),
            body(),
            t0,
        );
        assert_eq!(core.take_outputs(), vec![Output::Relay(body())]);
        assert!(core.sys.kills.borrow().is_empty());
    }

    #[test]
    fn stop_without_a_driver_exits_at_once_with_the_last_code() {
        // In backoff (state exited): SIGTERM ⇒ stopping, exit with the crash's code.
        let t0 = Instant::now();
        let c = cfg();
        let mut core = new_core(&c, t0);
        up(&mut core, t0);
        core.on_driver_exit(PID, ExitStatus::Exited(4), t0);
        core.take_outputs();
        assert!(core.next_deadline().is_some(), "a restart is scheduled");
        let term = SigInfo {
            signo: libc::SIGINT,
            code: libc::SI_USER,
            pid: 0,
            uid: 0,
        };
        core.on_signal(&term, t0);
        let outs = core.take_outputs();
        assert_eq!(states(&outs), vec![(S::Exited, S::Stopping)]);
        assert_eq!(core.exit_code(), Some(4));
        assert_eq!(core.next_deadline(), None, "the restart is cancelled");
        assert_eq!(launches(&outs), 0);
    }

    #[test]
    fn stop_from_error_state() {
        let t0 = Instant::now();
        let mut c = cfg();
        c.sup.crash_loop_restarts = 1;
        let mut core = new_core(&c, t0);
        core.on_launched(PID, t0);
        core.on_driver_exit(PID, ExitStatus::Signaled(libc::SIGSEGV), t0);
        assert_eq!(core.state(), S::Error);
        core.take_outputs();
        let r = core.on_command(
            ControlToShim::Shutdown(Shutdown {
                id: 1,
                grace_ms: None,
                reason: None,
            }),
            t0,
        );
        assert!(is_ok(&r, 1));
        assert_eq!(states(&core.take_outputs()), vec![(S::Error, S::Stopping)]);
        assert_eq!(core.exit_code(), Some(128 + libc::SIGSEGV));
    }

    #[test]
    fn as_pid1_the_grace_kills_everything() {
        let t0 = Instant::now();
        let c = cfg();
        let sys = Fake {
            pid: 1,
            ..Fake::default()
        };
        let mut core = Core::new(sys, &c, t0, 1);
        up(&mut core, t0);
        core.on_command(
            ControlToShim::Shutdown(Shutdown {
                id: 1,
                grace_ms: Some(100),
                reason: None,
            }),
            t0,
        );
        core.on_timer(t0 + Duration::from_millis(100));
        assert_eq!(
            *core.sys.kills.borrow(),
            vec![(-PID, libc::SIGTERM), (-1, libc::SIGKILL)]
        );
        assert_eq!(core.kill_deadline(), None);
    }

    #[test]
    fn bad_frames_and_a_driver_that_does_not_read() {
        let t0 = Instant::now();
        let c = cfg();
        let mut core = new_core(&c, t0);
        up(&mut core, t0);
        let err = DecodeError::FrameTooLarge {
            len: u64::from(u32::MAX),
            max: driver_protocol::DEFAULT_MAX_FRAME,
        };
        core.on_driver_decode_error(&err);
        let outs = core.take_outputs();
        assert!(matches!(
            to_driver(&outs)[..],
            [ShimToDriver::Error(ErrorMsg {
                code: ErrorCode::FrameTooLarge,
                ..
            })]
        ));
        assert!(outs.contains(&Output::StopReading));
        // A second reason does not replace the first.
        core.on_driver_unwritable();
        assert_eq!(
            *core.sys.kills.borrow(),
            vec![(-PID, libc::SIGKILL), (-PID, libc::SIGKILL)]
        );
        core.on_driver_exit(PID, ExitStatus::Signaled(9), t0);
        assert_eq!(exited(&core.take_outputs())[0].reason, "protocol_error");

        // Exec failure: reason exec_failed; without a process at all too.
        core.on_timer(core.next_deadline().expect("restart"));
        core.take_outputs();
        core.on_exec_failed(PID + 1, t0);
        core.on_driver_exit(PID + 1, ExitStatus::Exited(127), t0);
        assert_eq!(exited(&core.take_outputs())[0].reason, "exec_failed");
        core.on_timer(core.next_deadline().expect("restart"));
        core.take_outputs();
        core.on_launch_error(t0);
        let outs = core.take_outputs();
        assert_eq!(exited(&outs)[0].reason, "exec_failed");
        assert_eq!(
            states(&outs),
            vec![(S::Exited, S::Starting), (S::Starting, S::Exited)]
        );
    }
}
