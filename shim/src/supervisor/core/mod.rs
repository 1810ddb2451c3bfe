//! The supervisor's synchronous core: every decision, no I/O.
//!
//! The core owns the driver's [`Lifecycle`], the [`Restarter`], the [`TaskQueue`] and every
//! timer (as deadlines). The async shell ([`super`]) feeds it inputs — a driver message, the
//! driver's exit, a control command, a signal, "a deadline passed", the figures only the
//! shell can read — and carries out what it asks for. Decisions leave the core one way only,
//! as [`Output`]s: frames for the driver, events to publish, a control command's reply,
//! "launch the driver now", a [`Kill`]. Time is passed in too, so the unit tests drive every
//! transition with a made-up clock and read every decision from the outputs, without a
//! process or a syscall.
//!
//! ```text
//!  Launch ─► on_launched ─► hello ⇄ hello ─► ready ─► tasks, pause/resume, pings
//!                 │                                         │
//!                 └── ready timeout / ping misses / cancel grace / protocol error: SIGKILL
//!  on_driver_exit ─► driver_exited, task lost/requeued ─► restart (backoff) | crash loop | exit
//!  SIGTERM/shutdown ─► stopping: shutdown ─► grace/2 SIGTERM group ─► grace SIGKILL ─► exit
//! ```

//!
//! This file holds the core's state and its entry points; the decisions live by concern in
//! [`launch`] (launch, exit, restart), [`link`] (handshake, driver messages, liveness),
//! [`delivery`] (tasks and cancel), [`pause`] (pause/resume) and [`shutdown`] (signals and
//! the stop sequence).

mod clock;
mod delivery;
#[cfg(test)]
mod driver_faults;
mod exec;
#[cfg(any(test, fuzzing))]
pub mod fuzz;
mod idle;
mod launch;
mod link;
mod output;
mod pause;
#[cfg(test)]
mod pending;
mod settings;
mod shutdown;
#[cfg(test)]
mod task_ends;
#[cfg(test)]
mod testkit;

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use driver_protocol::message::{
    DriverState, ErrorMsg, Event, ExitInfo, Hello, OkReply, Role, ShimToControl, ShimToDriver,
    StatusReply,
};
use driver_protocol::{Backoff, ErrorCode};
use tracing::{debug, info, warn};

use crate::reaper::ExitStatus;
use crate::signals::{self, Admission};

use super::lifecycle::{Input, Lifecycle};
use super::restart::{BackoffConfig, CrashLoopConfig, Restarter};
use super::tasks::TaskQueue;

pub use self::exec::{ExecOwner, Refusal};
pub use self::output::{Counters, Kill, Output};
pub use self::settings::Settings;

/// Finished task ids remembered for idempotent `submit_task`.
const REMEMBER_TASKS: usize = 1024;

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
    /// How it ended (and the OOM reading), once reaped, until its link is closed.
    exit: Option<(ExitStatus, Option<bool>)>,
    /// It closed its socket (or a write failed) while alive: unless it is reaped by then,
    /// this is a protocol error.
    eof_deadline: Option<Instant>,
}

impl Driver {
    /// Reaped: its last frames are still handed over, but it takes nothing more.
    fn gone(&self) -> bool {
        self.exit.is_some()
    }
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
pub struct Core {
    cfg: Settings,
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
    /// The driver must answer `resume` with `ready` by then (`--pause-timeout`).
    resume_deadline: Option<Instant>,
    cancelling: Option<Cancelling>,
    stopping: Option<Stopping>,
    /// `set_driver` is replacing a running driver: its graceful-stop deadlines.
    replacing: Option<Stopping>,
    /// The driver command (`set_driver` replaces the one from the command line).
    command: Vec<std::ffi::OsString>,
    /// Variables `set_driver` sets on top of the scrubbed environment.
    command_env: std::collections::BTreeMap<String, String>,
    last_exit: Option<ExitStatus>,
    exit_code: Option<i32>,
    /// Since when the shell does not read the driver (the event buffer is full).
    reading_paused: Option<Instant>,
    /// The origin rule, its warnings and `--rewrite` for signals from outside.
    admission: Admission,
    out: Vec<Output>,
    /// Running execs by id.
    execs: BTreeMap<u64, exec::ExecEntry>,
    next_exec_id: u64,
    /// The exit code, once decided, while execs are still being terminated.
    exit_pending: Option<i32>,
    /// Execs still not reported by then are reported as they are, and the shim exits.
    exit_deadline: Option<Instant>,
    /// Idle detection, with `--idle-after`.
    idle: Option<idle::IdleTracker>,
}

impl Core {
    /// A core for `cfg` in a shim whose pid is `own_pid`; nothing launched yet (call
    /// [`Core::start`]).
    pub fn new(own_pid: i32, cfg: &Settings, now: Instant, seed: u64) -> Self {
        let sup = &cfg.opts;
        let restarter = Restarter::new(
            sup.restart,
            BackoffConfig {
                delays: Backoff {
                    initial: sup.backoff_initial,
                    max: sup.backoff_max,
                    factor: sup.backoff_factor,
                    jitter: sup.backoff_jitter,
                },
                reset_after: sup.backoff_reset,
            },
            CrashLoopConfig {
                restarts: sup.crash_loop_restarts,
                window: sup.crash_loop_window,
            },
            seed,
        );
        Core {
            pid1: own_pid == 1,
            started: now,
            hello: Hello::new(Role::Shim, "agent-shim", env!("CARGO_PKG_VERSION")),
            lifecycle: Lifecycle::new(),
            restarter,
            tasks: TaskQueue::new(sup.task_queue, REMEMBER_TASKS)
                .with_max_attempts(sup.max_attempts),
            driver: None,
            next_attempt: 1,
            next_request_id: 1,
            restart_at: None,
            relaunch_after_exit: false,
            pausing: None,
            paused_at: None,
            resuming: false,
            resume_deadline: None,
            cancelling: None,
            stopping: None,
            replacing: None,
            command: cfg.command.clone(),
            command_env: std::collections::BTreeMap::new(),
            last_exit: None,
            exit_code: None,
            reading_paused: None,
            admission: Admission::new(own_pid, cfg.allow_internal_signals),
            out: Vec::new(),
            execs: BTreeMap::new(),
            next_exec_id: 1,
            exit_pending: None,
            exit_deadline: None,
            idle: sup
                .idle_after
                .map(|after| idle::IdleTracker::new(after, now)),
            cfg: cfg.clone(),
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

    /// The outputs produced so far, in order (read without taking them).
    pub fn outputs(&self) -> &[Output] {
        &self.out
    }

    /// Takes the outputs when they are exactly one [`Output::RelayEvent`] (the common case of
    /// a driver event: relaying it is all there is to do), so the shell publishes it at once
    /// without a turn of its output loop; otherwise leaves them.
    pub fn take_lone_relay(&mut self) -> bool {
        let lone = matches!(self.out.as_slice(), [Output::RelayEvent]);
        if lone {
            // `pop`, not `clear`: the one output is dropped in place here, without a call
            // to the drop loop over a slice of outputs.
            self.out.pop();
        }
        lone
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

    /// The command the next launch runs: `(argv, variables set on top of the environment)`.
    pub fn driver_command(
        &self,
    ) -> (
        &[std::ffi::OsString],
        &std::collections::BTreeMap<String, String>,
    ) {
        (&self.command, &self.command_env)
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
        self.out.push(Output::ToDriver(Box::new(msg.into())));
    }

    fn event(&mut self, ev: impl Into<Event>) {
        self.out.push(Output::Event(Box::new(ev.into())));
    }

    /// The shim exits with `code`: its last event says so (in a microVM, the one way besides
    /// the console that the code reaches the control plane).
    fn set_exit(&mut self, code: i32) {
        if self.exit_code.is_none() {
            self.exit_code = Some(code);
            self.event(driver_protocol::message::ShimExiting { code });
        }
    }

    fn kill(&mut self, kill: Kill) {
        self.out.push(Output::Kill(kill));
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

    // ---- timers ---------------------------------------------------------------------------

    /// The nearest deadline, if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        let d = self.driver.as_ref();
        let s = self.stopping.as_ref();
        // While the driver is not read, its liveness and answer deadlines stand still.
        let live = self.reading_paused.is_none();
        [
            self.restart_at,
            d.and_then(|d| d.ready_deadline).filter(|_| live),
            d.and_then(|d| d.next_ping).filter(|_| live),
            self.pausing.as_ref().map(|p| p.deadline).filter(|_| live),
            self.resume_deadline.filter(|_| live),
            d.and_then(|d| d.eof_deadline),
            self.cancelling
                .as_ref()
                .map(|c| c.deadline)
                .filter(|_| live),
            s.and_then(|s| s.term_at),
            s.and_then(|s| s.kill_at),
            self.replacing.as_ref().and_then(|r| r.term_at),
            self.replacing.as_ref().and_then(|r| r.kill_at),
            self.exec_deadline(),
            self.idle_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Handles every deadline that is due at `now`.
    pub fn on_timer(&mut self, now: Instant) {
        self.restart_timer(now);
        self.eof_timer(now);
        if self.reading_paused.is_none() {
            self.liveness_timer(now);
            self.pause_timer(now);
            self.cancel_timer(now);
        }
        self.stop_timer(now);
        self.replace_timer(now);
        self.exec_timer(now);
        self.idle_timer(now);
    }

    /// The shell stopped reading the driver (the event buffer is full): unanswered pings
    /// do not count and the ready, pause and cancel deadlines stand still until
    /// [`Core::reading_resumed`] (a healthy driver is not hung because we do not listen).
    pub fn reading_paused(&mut self, now: Instant) {
        if self.reading_paused.is_none() {
            debug!("not reading the driver: its deadlines stand still");
            self.reading_paused = Some(now);
        }
    }

    /// The shell reads the driver again: its deadlines move back by the paused time.
    pub fn reading_resumed(&mut self, now: Instant) {
        let Some(since) = self.reading_paused.take() else {
            return;
        };
        let paused = now.saturating_duration_since(since);
        let later = |t: &mut Instant| *t = t.checked_add(paused).unwrap_or(*t);
        if let Some(d) = self.driver.as_mut() {
            d.ready_deadline.as_mut().map(later);
            d.next_ping.as_mut().map(later);
        }
        if let Some(p) = self.pausing.as_mut() {
            later(&mut p.deadline);
        }
        self.resume_deadline.as_mut().map(later);
        if let Some(c) = self.cancelling.as_mut() {
            later(&mut c.deadline);
        }
    }

    // ---- control commands -----------------------------------------------------------------

    /// Executes one control command; its reply is an [`Output::Reply`], ahead of the
    /// command's other outputs. `status` is answered by [`Core::on_status`], which takes the
    /// figures only the shell can read.
    pub fn on_command(&mut self, req: driver_protocol::message::ControlToShim, now: Instant) {
        let first = self.out.len();
        let reply = self.execute(req, now);
        self.out.insert(first, Output::Reply(Box::new(reply)));
    }

    /// Executes one control command and returns its reply.
    fn execute(
        &mut self,
        req: driver_protocol::message::ControlToShim,
        now: Instant,
    ) -> ShimToControl {
        use driver_protocol::message::ControlToShim as C;
        match req {
            C::SubmitTask(s) => self.submit_task(s, now),
            C::CancelTask(c) => self.cancel_task(c, now),
            C::Pause(p) => self.pause(p.id, now),
            C::Resume(r) => self.resume(r.id, now),
            C::Signal(s) => self.signal_command(&s),
            C::RestartDriver(r) => self.restart_driver(r.id),
            C::Shutdown(s) => {
                let grace = s.grace_ms.map_or(self.cfg.grace, Duration::from_millis);
                self.begin_stop(now, grace, s.reason);
                ok(s.id)
            }
            C::SetDriver(s) => self.set_driver(s, now),
            C::Exec(e) => err(
                e.id,
                ErrorCode::Internal,
                "exec is started by the shell (Core::exec_admit)",
            ),
            C::Status(s) => err(
                s.id,
                ErrorCode::Internal,
                "status is answered with the shell's counters (Core::on_status)",
            ),
            C::Metrics(m) => err(
                m.id,
                ErrorCode::Internal,
                "metrics is answered with the shell's readings",
            ),
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
                    first_available: None,
                })
            }
        }
    }

    /// A `status` request `re`, with the figures only the shell can read (`counters`): its
    /// `status_reply` is an [`Output::Reply`].
    pub fn on_status(&mut self, re: u64, now: Instant, counters: &Counters) {
        let reply = self.status_reply(re, now, counters);
        self.out
            .push(Output::Reply(Box::new(ShimToControl::StatusReply(reply))));
    }

    /// The `status_reply` to request `re`: what the core knows, and the shell's `counters`.
    fn status_reply(&self, re: u64, now: Instant, counters: &Counters) -> StatusReply {
        // The driver and the execs, unless the shell counted every child itself.
        let children = u32::try_from(self.execs_running())
            .unwrap_or(u32::MAX)
            .saturating_add(u32::from(self.driver.is_some()));
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
            children: counters.children.unwrap_or(children),
            reaped: counters.reaped,
            tasks_queued: u32::try_from(self.tasks.queued()).unwrap_or(u32::MAX),
            task_running: self.tasks.running().map(str::to_owned),
            execs_running: u32::try_from(self.execs_running()).unwrap_or(u32::MAX),
            buffered_events: counters.buffered_events,
            buffered_bytes: counters.buffered_bytes,
            last_seq: counters.last_seq,
            rss_bytes: counters.rss_bytes,
            idle_since_ms: self.idle_since_ms(),
            cgroups: counters.cgroups.map(str::to_owned),
        }
    }
}

/// The verdicts of the entry points that answer at once, taken back from the outputs, for
/// the unit tests and the fuzz harness.
#[cfg(any(test, fuzzing))]
impl Core {
    /// [`Core::exec_admit`]'s verdict: the exec id, or the refusal.
    pub(crate) fn admit(
        &mut self,
        owner: ExecOwner,
        req: &driver_protocol::message::Exec,
        user: Option<(u32, u32)>,
    ) -> Result<u64, Refusal> {
        self.exec_admit(owner, req, user);
        match self.out.pop() {
            Some(Output::ExecAdmitted { id, .. }) => Ok(id),
            Some(Output::ExecRefused(code, message)) => Err((code, message)),
            other => panic!("exec_admit gave no verdict: {other:?}"),
        }
    }

    /// The refusal of the `exec_input`/`exec_resize`/`exec_signal` just given, if it was
    /// refused (taken from the outputs); what it asked for otherwise stays.
    #[cfg(test)]
    pub(crate) fn steering_refused(&mut self) -> Result<(), Refusal> {
        let refusal = match self.out.last() {
            Some(Output::Reply(r)) => match &**r {
                ShimToControl::Error(e) => Some(e),
                _ => None,
            },
            Some(Output::ToDriver(m)) => match &**m {
                ShimToDriver::Error(e) => Some(e),
                _ => None,
            },
            _ => None,
        };
        match refusal {
            Some(e) if e.re.is_none() => {
                let (code, message) = (e.code.clone(), e.message.clone());
                self.out.pop();
                Err((code, message))
            }
            _ => Ok(()),
        }
    }

    /// [`Core::on_status`]'s reply.
    pub(crate) fn status(&mut self, re: u64, now: Instant, counters: &Counters) -> StatusReply {
        self.on_status(re, now, counters);
        match self.out.pop() {
            Some(Output::Reply(r)) => match *r {
                ShimToControl::StatusReply(r) => r,
                other => panic!("on_status gave no status_reply: {other:?}"),
            },
            other => panic!("on_status gave no status_reply: {other:?}"),
        }
    }
}

/// Whether the deadline `t` (if any) has come at `now`.
fn due(t: Option<Instant>, now: Instant) -> bool {
    t.is_some_and(|t| t <= now)
}

/// The reply to a control request that was carried out.
fn ok(re: u64) -> ShimToControl {
    ShimToControl::Ok(OkReply {
        re,
        duplicate: None,
    })
}

/// The reply to a control request that was refused.
fn err(re: u64, code: ErrorCode, message: &str) -> ShimToControl {
    ShimToControl::Error(ErrorMsg {
        re: Some(re),
        code,
        message: message.to_owned(),
        task_id: None,
        first_available: None,
    })
}

#[cfg(test)]
mod tests {
    use super::testkit::*;
    use super::*;
    use driver_protocol::message::{ControlToShim, Status};

    #[test]
    fn kills_signal_the_group_and_a_driver_that_left_it() {
        use crate::sys::fake::Fake;
        let sys = Fake::default();
        Kill::Driver { pid: 100, sig: 15 }.apply(&sys);
        Kill::Exec { pid: 200, sig: 9 }.apply(&sys);
        Kill::Everything.apply(&sys);
        assert_eq!(*sys.kills.borrow(), vec![(-100, 15), (-200, 9), (-1, 9)]);
        // No such group: the driver alone (it left its group); an exec's group is gone.
        let sys = Fake {
            kill_result: std::cell::RefCell::new(Some(nix::errno::Errno::ESRCH)),
            ..Fake::default()
        };
        Kill::Driver { pid: 100, sig: 15 }.apply(&sys);
        Kill::Exec { pid: 200, sig: 9 }.apply(&sys);
        assert_eq!(*sys.kills.borrow(), vec![(-100, 15), (100, 15), (-200, 9)]);
    }

    #[test]
    fn a_reply_goes_ahead_of_its_commands_other_outputs() {
        let t0 = Instant::now();
        let c = cfg();
        let mut core = new_core(&c, t0);
        up(&mut core, t0);
        core.on_command(submit(1, "t1", false), t0);
        let outs = core.take_outputs();
        assert!(
            matches!(outs.first(), Some(Output::Reply(r)) if is_ok(r, 1)),
            "{outs:?}"
        );
        assert!(outs.len() > 1, "the task is accepted and sent: {outs:?}");
        assert_eq!(
            outs.iter()
                .filter(|o| matches!(o, Output::Reply(_)))
                .count(),
            1
        );
    }

    #[test]
    fn status_and_unsupported_commands() {
        let t0 = Instant::now();
        let c = cfg();
        let mut core = new_core(&c, t0);
        up(&mut core, t0);
        let s = core.status(4, t0, &Counters::default());
        assert_eq!(s.re, 4);
        assert_eq!(s.state, S::Ready);
        assert_eq!(s.driver_pid, Some(100));
        assert_eq!(s.children, 1, "the driver");
        let counted = Counters {
            children: Some(3),
            reaped: 5,
            buffered_events: 6,
            buffered_bytes: 7,
            last_seq: 8,
            rss_bytes: 9,
            cgroups: Some("v1"),
        };
        let s = core.status(4, t0, &counted);
        assert_eq!(
            (
                s.children,
                s.reaped,
                s.buffered_events,
                s.buffered_bytes,
                s.last_seq,
                s.rss_bytes
            ),
            (3, 5, 6, 7, 8, 9)
        );
        // Through `on_command`, `status` is an internal error: the shell answers it.
        let r = command(&mut core, ControlToShim::Status(Status { id: 4 }), t0);
        assert_eq!(err_code(&r), Some(ErrorCode::Internal));
        let r = command(
            &mut core,
            ControlToShim::Unknown(driver_protocol::message::Unknown {
                type_name: "launch_rockets".into(),
                id: Some(5),
            }),
            t0,
        );
        assert_eq!(err_code(&r), Some(ErrorCode::Unsupported));
    }
}
