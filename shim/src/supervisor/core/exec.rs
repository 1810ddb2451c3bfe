//! Tool processes (`exec`) as the core sees them: admission, ownership, the output cap, the
//! timers that end them, and the one `exec_exit` each gets.
//!
//! The shell starts the process and moves its bytes; the core decides. An exec ends in three
//! steps, whatever the order in which the kernel reports them:
//!
//! ```text
//!  running ──(reaped: status)──► draining ──(all output EOF, or --exec-drain over:
//!     │                                       ExecStop ⇒ the shell reads what is left and
//!     │                                       closes the pipes; the group gets SIGKILL)──►
//!     └──(all output EOF first)──► waiting for the status ──(reaped)──► exec_exit, removed
//!
//!  timeout / task cancel (after its grace) / driver gone / shim stopping:
//!     SIGTERM to the group ──(--exec-kill-grace)──► SIGKILL to the group
//! ```
//!
//! So `exec_exit` always follows the exec's last `exec_output`, and comes even when a
//! grandchild holds the pipe or the terminal open. A driver-owned exec talks to the driver
//! that started it only; when that driver is gone its execs are terminated. A control-owned
//! exec lives on whatever happens to connections.

use std::time::{Duration, Instant};

use driver_protocol::message::{
    valid_tag, ErrorMsg, Exec, ExecExit, ExecInput, ExecResize, ExecSignal, OutputStream,
    ShimToControl, TtySize, MAX_TAG,
};
use driver_protocol::ErrorCode;
use tracing::{debug, info, warn};

use crate::reaper::ExitStatus;
use crate::signals;

use super::{Core, Kill, Output};

/// After the shim decided to exit, how much longer than the kill grace and the drain the
/// last execs may take to be reaped before they are reported as they are.
const EXIT_SLACK: Duration = Duration::from_secs(1);

/// Who started an exec, and so who gets its output and may steer it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExecOwner {
    /// The driver with this pid.
    Driver(i32),
    /// The control plane.
    Control,
}

/// Why an exec request is refused: an `error` code and message.
pub type Refusal = (ErrorCode, String);

/// One running exec.
#[derive(Debug)]
pub(super) struct ExecEntry {
    owner: ExecOwner,
    pid: i32,
    started: Instant,
    task_id: Option<String>,
    cap: Option<u64>,
    /// Bytes forwarded per stream (stdout, stderr, pty).
    sent: [u64; 3],
    truncated: bool,
    timed_out: bool,
    timeout_at: Option<Instant>,
    /// SIGTERM to the group is due (a cancelled task's grace).
    term_at: Option<Instant>,
    /// SIGKILL to the group is due (a SIGTERM was sent).
    kill_at: Option<Instant>,
    /// Reaped: how it ended.
    status: Option<ExitStatus>,
    /// Reaped: whether the OOM killer killed it, when known.
    oom_killed: Option<bool>,
    /// Reaped with output still open: it is closed at this instant.
    drain_until: Option<Instant>,
    /// The shell still has output descriptors open.
    io_open: bool,
}

fn stream_index(s: OutputStream) -> usize {
    match s {
        OutputStream::Stdout => 0,
        OutputStream::Stderr => 1,
        OutputStream::Pty => 2,
    }
}

impl Core {
    /// Checks an `exec` request from `owner` (running as `user`, already resolved by the
    /// shell): [`Output::ExecAdmitted`] with its exec id (the shell then starts it and calls
    /// [`Core::exec_started`], or [`Core::exec_spawn_failed`] if starting failed), or
    /// [`Output::ExecRefused`].
    pub fn exec_admit(&mut self, owner: ExecOwner, req: &Exec, user: Option<(u32, u32)>) {
        let verdict = match self.admission(owner, req, user) {
            Ok(id) => Output::ExecAdmitted { id, owner, user },
            Err((code, message)) => Output::ExecRefused(code, message),
        };
        self.out.push(verdict);
    }

    /// The exec id for an `exec` request, or why it is refused.
    fn admission(
        &mut self,
        owner: ExecOwner,
        req: &Exec,
        user: Option<(u32, u32)>,
    ) -> Result<u64, Refusal> {
        if self.stopping.is_some() || self.exit_pending.is_some() {
            return Err((ErrorCode::ShuttingDown, "the shim is shutting down".into()));
        }
        if req.argv.is_empty() || req.argv.first().is_some_and(String::is_empty) {
            return Err((ErrorCode::Invalid, "argv is empty".into()));
        }
        if req.tag.as_deref().is_some_and(|t| !valid_tag(t)) {
            return Err((
                ErrorCode::Invalid,
                format!("tag: 1 to {MAX_TAG} bytes of [A-Za-z0-9._:/@+=-]"),
            ));
        }
        if req.tty.is_some_and(|t| t.rows == 0 || t.cols == 0) {
            return Err((ErrorCode::Invalid, "tty rows and cols must be > 0".into()));
        }
        if let ExecOwner::Driver(pid) = owner {
            if self
                .driver
                .as_ref()
                .is_none_or(|d| d.pid != pid || d.gone())
            {
                return Err((ErrorCode::InvalidState, "the driver is gone".into()));
            }
            // A driver dropped to a uid must not get root back through its tools.
            let confined = self.cfg.opts.user.is_some_and(|(uid, _)| uid != 0);
            if confined && user.is_some_and(|(uid, gid)| uid == 0 || gid == 0) {
                return Err((
                    ErrorCode::Invalid,
                    "the driver runs confined (--user) and may not run execs as root".into(),
                ));
            }
        }
        if self.execs.len() >= self.cfg.opts.max_execs {
            return Err((
                ErrorCode::Limit,
                format!(
                    "all exec slots are taken ({} running, --max-execs {})",
                    self.execs.len(),
                    self.cfg.opts.max_execs
                ),
            ));
        }
        let id = self.next_exec_id;
        self.next_exec_id = self.next_exec_id.wrapping_add(1).max(1);
        Ok(id)
    }

    /// The exec admitted as `id` runs as `pid` (its process group): its timers start.
    pub fn exec_started(&mut self, id: u64, owner: ExecOwner, pid: i32, req: &Exec, now: Instant) {
        info!(exec_id = id, pid, argv = ?req.argv, ?owner, "exec started");
        self.activity(now);
        self.execs.insert(
            id,
            ExecEntry {
                owner,
                pid,
                started: now,
                task_id: req.task_id.clone(),
                cap: req.output_cap,
                sent: [0; 3],
                truncated: false,
                timed_out: false,
                timeout_at: req
                    .timeout_ms
                    .and_then(|ms| now.checked_add(Duration::from_millis(ms))),
                term_at: None,
                kill_at: None,
                status: None,
                oom_killed: None,
                drain_until: None,
                io_open: true,
            },
        );
    }

    /// The exec `id` (registered with [`Core::exec_started`]) never ran: its `execve` or a
    /// step before it failed, or it did not get that far within `--spawn-timeout` and was
    /// killed. Its owner gets an `error` reply instead of `exec_started`, so no `exec_exit`
    /// follows; its slot is free again.
    pub fn exec_spawn_failed(&mut self, id: u64, now: Instant) {
        if self.execs.remove(&id).is_none() {
            return;
        }
        debug!(exec_id = id, "exec did not start: forgotten");
        self.activity(now);
        if self.execs.is_empty() {
            if let Some(code) = self.exit_pending.take() {
                self.set_exit(code);
            }
        }
    }

    /// Execs running (not yet reported by `exec_exit`).
    pub fn execs_running(&self) -> usize {
        self.execs.len()
    }

    /// The exec id and pid (its session's) of every exec whose process has not been reaped.
    pub fn exec_pids(&self) -> impl Iterator<Item = (u64, i32)> + '_ {
        self.execs
            .iter()
            .filter(|(_, e)| e.status.is_none())
            .map(|(&id, e)| (id, e.pid))
    }

    /// The owner of exec `id`, while it runs.
    pub fn exec_owner(&self, id: u64) -> Option<ExecOwner> {
        self.execs.get(&id).map(|e| e.owner)
    }

    /// `n` bytes of `stream` were read from exec `id`: how many of them to forward (the rest
    /// is over its `output_cap`, dropped, and marks it truncated).
    pub fn exec_output(&mut self, id: u64, stream: OutputStream, n: usize) -> usize {
        let Some(e) = self.execs.get_mut(&id) else {
            return 0;
        };
        let Some(sent) = e.sent.get_mut(stream_index(stream)) else {
            return 0;
        };
        let n64 = u64::try_from(n).unwrap_or(u64::MAX);
        let allowed = match e.cap {
            Some(cap) => n64.min(cap.saturating_sub(*sent)),
            None => n64,
        };
        if allowed < n64 {
            if !e.truncated {
                debug!(exec_id = id, ?stream, "output cap reached: truncated");
            }
            e.truncated = true;
        }
        *sent = sent.saturating_add(allowed);
        usize::try_from(allowed).unwrap_or(n)
    }

    /// The exec's process (`Owner::Exec(id)`) was reaped; whether the OOM killer killed it is
    /// not known.
    #[cfg(any(test, fuzzing))]
    pub fn on_exec_exit(&mut self, id: u64, status: ExitStatus, now: Instant) {
        self.on_exec_exit_oom(id, status, None, now);
    }

    /// The exec's process (`Owner::Exec(id)`) was reaped; `oom_killed` is the shell's reading
    /// of the OOM-kill counter (`None`: unknown).
    pub fn on_exec_exit_oom(
        &mut self,
        id: u64,
        status: ExitStatus,
        oom_killed: Option<bool>,
        now: Instant,
    ) {
        let drain = self.cfg.opts.exec_drain;
        let Some(e) = self.execs.get_mut(&id) else {
            debug!(exec_id = id, "exit of an unknown exec");
            return;
        };
        debug!(exec_id = id, ?status, "exec process exited");
        e.status = Some(status);
        e.oom_killed = oom_killed;
        e.timeout_at = None;
        e.term_at = None;
        if e.io_open {
            e.drain_until = Some(now.checked_add(drain).unwrap_or(now));
        } else {
            self.exec_done(id, now);
        }
    }

    /// The shell closed every output descriptor of exec `id` (end of file, or after
    /// [`Output::ExecStop`]).
    pub fn exec_io_closed(&mut self, id: u64, now: Instant) {
        let Some(e) = self.execs.get_mut(&id) else {
            return;
        };
        e.io_open = false;
        e.drain_until = None;
        if e.status.is_some() {
            self.exec_done(id, now);
        }
    }

    /// Reports exec `id`'s end to its owner and forgets it.
    fn exec_done(&mut self, id: u64, now: Instant) {
        let Some(e) = self.execs.remove(&id) else {
            return;
        };
        let (code, signal) = match e.status {
            Some(ExitStatus::Exited(c)) => (Some(c), None),
            Some(ExitStatus::Signaled(s)) => (None, Some(signals::name(s))),
            None => (None, None),
        };
        let exit = ExecExit {
            exec_id: id,
            code,
            signal,
            timed_out: e.timed_out,
            truncated: e.truncated,
            duration_ms: Self::since(now, e.started),
            oom_killed: e.oom_killed,
        };
        info!(
            exec_id = id,
            code,
            signal = exit.signal,
            timed_out = e.timed_out,
            oom_killed = e.oom_killed,
            "exec ended"
        );
        // Grandchildren that kept the output open, or anything left in the group.
        self.kill_exec_group(e.pid, libc::SIGKILL);
        self.out.push(Output::ExecEnded(exit.clone()));
        match e.owner {
            ExecOwner::Control => self.event(exit),
            ExecOwner::Driver(pid) => {
                if self
                    .driver
                    .as_ref()
                    .is_some_and(|d| d.pid == pid && !d.gone())
                {
                    self.send(exit);
                }
            }
        }
        if self.execs.is_empty() {
            if let Some(code) = self.exit_pending.take() {
                self.set_exit(code);
            }
        }
    }

    /// Checks that `owner` may steer exec `id`; the refusal otherwise (`not_found`).
    fn owned(&self, owner: ExecOwner, id: u64) -> Result<&ExecEntry, Refusal> {
        self.execs
            .get(&id)
            .filter(|e| e.owner == owner)
            .ok_or_else(|| (ErrorCode::NotFound, format!("no exec {id}")))
    }

    /// `exec_input` from `owner`: [`Output::ExecInput`], or the refusal to `owner`.
    pub fn exec_input(&mut self, owner: ExecOwner, m: ExecInput) {
        match self.owned(owner, m.exec_id) {
            Ok(_) => self.out.push(Output::ExecInput(m)),
            Err(refusal) => self.refuse_steering(owner, refusal),
        }
    }

    /// `exec_resize` from `owner`: [`Output::ExecResize`], or the refusal to `owner`.
    pub fn exec_resize(&mut self, owner: ExecOwner, m: &ExecResize) {
        let checked = self.owned(owner, m.exec_id).and_then(|_| {
            if m.rows == 0 || m.cols == 0 {
                return Err((ErrorCode::Invalid, "rows and cols must be > 0".into()));
            }
            Ok(())
        });
        match checked {
            Ok(()) => self.out.push(Output::ExecResize(
                m.exec_id,
                TtySize {
                    rows: m.rows,
                    cols: m.cols,
                },
            )),
            Err(refusal) => self.refuse_steering(owner, refusal),
        }
    }

    /// `exec_signal` from `owner`: the signal goes to the exec's whole process group (an
    /// [`Output::Kill`]), or the refusal to `owner`.
    pub fn exec_signal(&mut self, owner: ExecOwner, m: &ExecSignal) {
        let signalled = self
            .owned(owner, m.exec_id)
            .map(|e| e.pid)
            .and_then(|pid| self.signal_exec(m.exec_id, pid, &m.signal));
        if let Err(refusal) = signalled {
            self.refuse_steering(owner, refusal);
        }
    }

    /// Tells `owner` why an `exec_input`/`exec_resize`/`exec_signal` was refused: an `error`
    /// without `re` (those messages have no id), to the driver or as the control reply.
    fn refuse_steering(&mut self, owner: ExecOwner, (code, message): Refusal) {
        let msg = ErrorMsg {
            re: None,
            code,
            message,
            task_id: None,
            first_available: None,
        };
        match owner {
            ExecOwner::Driver(_) => {
                debug!(code = %msg.code, message = msg.message, "exec message from the driver refused");
                self.send(msg);
            }
            ExecOwner::Control => self
                .out
                .push(Output::Reply(Box::new(ShimToControl::Error(msg)))),
        }
    }

    /// `signal{target: "exec"}` from the control plane (any exec).
    pub(super) fn signal_exec_command(&mut self, id: u64, signal: &str) -> Result<(), Refusal> {
        let pid = self
            .execs
            .get(&id)
            .map(|e| e.pid)
            .ok_or_else(|| (ErrorCode::NotFound, format!("no exec {id}")))?;
        self.signal_exec(id, pid, signal)
    }

    fn signal_exec(&mut self, id: u64, pid: i32, signal: &str) -> Result<(), Refusal> {
        let sig = signals::parse(signal)
            .ok_or_else(|| (ErrorCode::Invalid, format!("unknown signal {signal:?}")))?;
        debug!(exec_id = id, pid, signal = %signals::name(sig), "signalling an exec's group");
        self.kill_exec_group(pid, sig);
        Ok(())
    }

    fn kill_exec_group(&mut self, pid: i32, sig: i32) {
        self.kill(Kill::Exec { pid, sig });
    }

    /// SIGTERM to the groups of the execs `pick` selects (not already being killed), SIGKILL
    /// after `--exec-kill-grace`.
    pub(super) fn terminate_execs(&mut self, now: Instant, pick: impl Fn(&ExecEntry) -> bool) {
        let grace = self.cfg.opts.exec_kill_grace;
        let mut groups = Vec::new();
        for e in self.execs.values_mut().filter(|e| pick(e)) {
            e.term_at = None;
            if e.kill_at.is_none() {
                e.kill_at = Some(now.checked_add(grace).unwrap_or(now));
                groups.push(e.pid);
            }
        }
        for pid in groups {
            self.kill_exec_group(pid, libc::SIGTERM);
        }
    }

    /// The driver `pid` is gone: its execs lose their consumer and are terminated.
    pub(super) fn driver_execs_gone(&mut self, pid: i32, now: Instant) {
        self.terminate_execs(now, |e| e.owner == ExecOwner::Driver(pid));
    }

    /// Task `task_id` is being cancelled: its execs are terminated after `grace`.
    pub(super) fn cancel_task_execs(&mut self, task_id: &str, grace: Duration, now: Instant) {
        let at = now.checked_add(grace).unwrap_or(now);
        for e in self.execs.values_mut() {
            if e.task_id.as_deref() == Some(task_id) && e.kill_at.is_none() {
                e.term_at = Some(e.term_at.map_or(at, |t| t.min(at)));
            }
        }
    }

    /// The shim decided to exit with `code`: once every exec has been reported (they are
    /// terminated now, and reported as they are after a bounded wait).
    pub(super) fn exit_after_execs(&mut self, code: i32, now: Instant) {
        if self.execs.is_empty() {
            self.set_exit(code);
            return;
        }
        info!(execs = self.execs.len(), "terminating execs before exiting");
        self.exit_pending = Some(code);
        let sup = &self.cfg.opts;
        self.exit_deadline = now.checked_add(
            sup.exec_kill_grace
                .saturating_add(sup.exec_drain)
                .saturating_add(EXIT_SLACK),
        );
        self.terminate_execs(now, |_| true);
    }

    /// The nearest exec deadline.
    pub(super) fn exec_deadline(&self) -> Option<Instant> {
        self.execs
            .values()
            .flat_map(|e| [e.timeout_at, e.term_at, e.kill_at, e.drain_until])
            .chain([self.exit_deadline])
            .flatten()
            .min()
    }

    /// Timeouts, cancel graces, kill graces and drains that are due.
    pub(super) fn exec_timer(&mut self, now: Instant) {
        let grace = self.cfg.opts.exec_kill_grace;
        let mut signals_due = Vec::new();
        let mut stops = Vec::new();
        for (&id, e) in &mut self.execs {
            if super::due(e.timeout_at, now) {
                e.timeout_at = None;
                e.timed_out = true;
                warn!(exec_id = id, "exec timed out: SIGTERM to its group");
                e.term_at = Some(now);
            }
            if super::due(e.term_at, now) {
                e.term_at = None;
                if e.kill_at.is_none() {
                    e.kill_at = Some(now.checked_add(grace).unwrap_or(now));
                    signals_due.push((e.pid, libc::SIGTERM));
                }
            }
            if super::due(e.kill_at, now) {
                e.kill_at = None;
                signals_due.push((e.pid, libc::SIGKILL));
            }
            if super::due(e.drain_until, now) {
                e.drain_until = None;
                debug!(exec_id = id, "drain over: closing the exec's output");
                signals_due.push((e.pid, libc::SIGKILL));
                stops.push(id);
            }
        }
        for (pid, sig) in signals_due {
            self.kill_exec_group(pid, sig);
        }
        for id in stops {
            self.out.push(Output::ExecStop(id));
        }
        if super::due(self.exit_deadline, now) {
            self.exit_deadline = None;
            let left: Vec<u64> = self.execs.keys().copied().collect();
            warn!(
                execs = left.len(),
                "execs not reaped in time: reported as they are"
            );
            for id in left {
                if let Some(e) = self.execs.get(&id) {
                    self.kill_exec_group(e.pid, libc::SIGKILL);
                }
                self.out.push(Output::ExecStop(id));
                if let Some(e) = self.execs.get_mut(&id) {
                    e.io_open = false;
                }
                self.exec_done(id, now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use driver_protocol::message::{
        CancelTask, ControlToShim, DriverToShim, Event, Exec, ExecExit, ExecInput, ExecSignal,
        OutputStream, ShimToDriver, Signal, SignalTarget,
    };
    use driver_protocol::ErrorCode;

    use super::super::testkit::*;
    use super::super::Output;
    use super::ExecOwner;
    use crate::reaper::ExitStatus;

    fn exec(id: u64, argv: &[&str]) -> Exec {
        Exec::new(id, argv.iter().copied())
    }

    /// Admits and "starts" `req` as pid `pid`; its exec id.
    fn start(core: &mut TestCore, owner: ExecOwner, req: &Exec, pid: i32, t: Instant) -> u64 {
        let id = core.admit(owner, req, None).expect("admitted");
        core.exec_started(id, owner, pid, req, t);
        id
    }

    #[test]
    fn an_exec_ends_after_exit_and_eof_in_either_order() {
        let t0 = Instant::now();
        let c = cfg();
        let mut core = new_core(&c, t0);
        up(&mut core, t0);
        let owner = ExecOwner::Driver(PID);
        let a = start(&mut core, owner, &exec(1, &["true"]), 200, t0);
        let b = start(&mut core, ExecOwner::Control, &exec(2, &["false"]), 201, t0);
        assert_eq!(core.execs_running(), 2);
        core.take_outputs();
        // a: EOF, then the exit ⇒ exec_exit to the driver at once.
        core.exec_io_closed(a, t0);
        assert!(exec_exits(&core.take_outputs()).is_empty());
        let t1 = t0 + Duration::from_millis(30);
        core.on_exec_exit(a, ExitStatus::Exited(0), t1);
        let outs = core.take_outputs();
        assert!(matches!(
            to_driver(&outs)[..],
            [ShimToDriver::ExecExit(ExecExit {
                code: Some(0),
                duration_ms: 30,
                ..
            })]
        ));
        // b: the exit (an OOM kill, as the shell read the counter), then EOF ⇒ an event
        // (control-owned) that says so.
        core.on_exec_exit_oom(b, ExitStatus::Signaled(libc::SIGKILL), Some(true), t1);
        assert!(exec_exits(&core.take_outputs()).is_empty());
        core.exec_io_closed(b, t1);
        let outs = core.take_outputs();
        assert!(matches!(
            events(&outs)[..],
            [Event::ExecExit(ExecExit { code: None, signal: Some(s), oom_killed: Some(true), .. })]
                if s == "SIGKILL"
        ));
        assert_eq!(core.execs_running(), 0);
        // The groups are killed at the end (grandchildren holding nothing open).
        assert_eq!(
            kills(&core),
            vec![(-200, libc::SIGKILL), (-201, libc::SIGKILL)]
        );
    }

    #[test]
    fn a_grandchild_holding_the_output_does_not_hold_the_exit() {
        let t0 = Instant::now();
        let c = cfg();
        let mut core = new_core(&c, t0);
        up(&mut core, t0);
        let id = start(&mut core, ExecOwner::Control, &exec(1, &["sh"]), 300, t0);
        core.on_exec_exit(id, ExitStatus::Exited(0), t0);
        assert_eq!(core.next_deadline(), Some(t0 + c.opts.exec_drain));
        core.on_timer(t0 + c.opts.exec_drain);
        let outs = core.take_outputs();
        assert!(outs.contains(&Output::ExecStop(id)), "{outs:?}");
        assert_eq!(kills(&core), vec![(-300, libc::SIGKILL)]);
        // The shell closes the pipes and says so: then the exit.
        core.exec_io_closed(id, t0 + c.opts.exec_drain);
        assert_eq!(exec_exits(&core.take_outputs()).len(), 1);
    }

    #[test]
    fn timeout_terms_then_kills_the_group() {
        let t0 = Instant::now();
        let c = cfg();
        let mut core = new_core(&c, t0);
        up(&mut core, t0);
        let mut req = exec(1, &["sleep", "100"]);
        req.timeout_ms = Some(500);
        let id = start(&mut core, ExecOwner::Driver(PID), &req, 400, t0);
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(core.next_deadline().map(|d| d <= t1), Some(true));
        core.on_timer(t1);
        assert_eq!(kills(&core), vec![(-400, libc::SIGTERM)]);
        let t2 = t1 + c.opts.exec_kill_grace;
        core.on_timer(t2);
        assert_eq!(
            kills(&core),
            vec![(-400, libc::SIGTERM), (-400, libc::SIGKILL)]
        );
        core.on_exec_exit(id, ExitStatus::Signaled(libc::SIGKILL), t2);
        core.exec_io_closed(id, t2);
        let x = exec_exits(&core.take_outputs());
        assert!(
            x[0].timed_out && x[0].signal.as_deref() == Some("SIGKILL"),
            "{x:?}"
        );
        assert_eq!(x[0].duration_ms, 500 + 2000);
    }

    #[test]
    fn output_cap_truncates_per_stream() {
        let t0 = Instant::now();
        let c = cfg();
        let mut core = new_core(&c, t0);
        up(&mut core, t0);
        let mut req = exec(1, &["yes"]);
        req.output_cap = Some(10);
        let id = start(&mut core, ExecOwner::Control, &req, 500, t0);
        assert_eq!(core.exec_output(id, OutputStream::Stdout, 6), 6);
        assert_eq!(core.exec_output(id, OutputStream::Stderr, 10), 10);
        assert_eq!(core.exec_output(id, OutputStream::Stdout, 6), 4);
        assert_eq!(core.exec_output(id, OutputStream::Stdout, 6), 0);
        core.exec_io_closed(id, t0);
        core.on_exec_exit(id, ExitStatus::Exited(0), t0);
        assert!(exec_exits(&core.take_outputs())[0].truncated);
        // Without a cap nothing is cut.
        let id = start(&mut core, ExecOwner::Control, &exec(2, &["yes"]), 501, t0);
        assert_eq!(core.exec_output(id, OutputStream::Pty, 1 << 20), 1 << 20);
    }

    #[test]
    fn limits_ownership_and_refusals() {
        let t0 = Instant::now();
        let mut c = cfg();
        c.opts.max_execs = 2;
        let mut core = new_core(&c, t0);
        up(&mut core, t0);
        let d = ExecOwner::Driver(PID);
        let a = start(&mut core, d, &exec(1, &["a"]), 600, t0);
        start(&mut core, ExecOwner::Control, &exec(2, &["b"]), 601, t0);
        let (code, msg) = core.admit(d, &exec(3, &["c"]), None).unwrap_err();
        assert_eq!(code, ErrorCode::Limit);
        assert!(msg.contains("--max-execs 2"), "{msg}");
        assert_eq!(
            core.admit(d, &exec(4, &[]), None).unwrap_err().0,
            ErrorCode::Invalid
        );
        // Another owner's exec, or an unknown one, is not found.
        let input = |id| ExecInput {
            exec_id: id,
            data: Bytes::from_static(b"x"),
            eof: true,
        };
        assert_eq!(
            {
                core.exec_input(ExecOwner::Control, input(a));
                core.steering_refused()
            }
            .unwrap_err()
            .0,
            ErrorCode::NotFound
        );
        assert_eq!(
            {
                core.exec_input(d, input(99));
                core.steering_refused()
            }
            .unwrap_err()
            .0,
            ErrorCode::NotFound
        );
        core.take_outputs();
        {
            core.exec_input(d, input(a));
            core.steering_refused()
        }
        .unwrap();
        assert_eq!(core.take_outputs(), vec![Output::ExecInput(input(a))]);
        // exec_signal goes to the whole group; a bad name is invalid.
        let sig = |s: &str| ExecSignal {
            exec_id: a,
            signal: s.into(),
        };
        {
            core.exec_signal(d, &sig("INT"));
            core.steering_refused()
        }
        .unwrap();
        assert_eq!(kills(&core), vec![(-600, libc::SIGINT)]);
        assert_eq!(
            {
                core.exec_signal(d, &sig("NOPE"));
                core.steering_refused()
            }
            .unwrap_err()
            .0,
            ErrorCode::Invalid
        );
        // The control plane's signal{target: exec} reaches any exec.
        let r = command(
            &mut core,
            ControlToShim::Signal(Signal {
                id: 7,
                signal: "TERM".into(),
                target: SignalTarget::Exec,
                exec_id: Some(a),
            }),
            t0,
        );
        assert!(is_ok(&r, 7), "{r:?}");
        assert_eq!(kills(&core).last(), Some(&(-600, libc::SIGTERM)));
        let r = command(
            &mut core,
            ControlToShim::Signal(Signal {
                id: 8,
                signal: "TERM".into(),
                target: SignalTarget::Exec,
                exec_id: Some(12345),
            }),
            t0,
        );
        assert_eq!(err_code(&r), Some(ErrorCode::NotFound));
        // The driver's exec messages go through the same checks; unknown ids get not_found
        // without re.
        core.take_outputs();
        core.on_driver_msg(
            DriverToShim::ExecSignal(ExecSignal {
                exec_id: 77,
                signal: "TERM".into(),
            }),
            body(),
            t0,
        );
        let outs = core.take_outputs();
        assert!(matches!(
            to_driver(&outs)[..],
            [ShimToDriver::Error(e)] if e.re.is_none() && e.code == ErrorCode::NotFound
        ));
        // A driver exec request becomes a start for the shell.
        core.on_driver_msg(DriverToShim::Exec(exec(9, &["ls"])), body(), t0);
        assert_eq!(
            core.take_outputs(),
            vec![Output::StartExec(Box::new(exec(9, &["ls"])))]
        );
    }

    #[test]
    fn a_confined_driver_may_not_exec_as_root() {
        let t0 = Instant::now();
        let mut c = cfg();
        c.opts.user = Some((1000, 1000));
        let mut core = new_core(&c, t0);
        up(&mut core, t0);
        let d = ExecOwner::Driver(PID);
        let r = core.admit(d, &exec(1, &["id"]), Some((0, 0)));
        assert_eq!(r.unwrap_err().0, ErrorCode::Invalid);
        assert!(core.admit(d, &exec(1, &["id"]), Some((1001, 1001))).is_ok());
        // The control plane is trusted.
        assert!(core
            .admit(ExecOwner::Control, &exec(1, &["id"]), Some((0, 0)))
            .is_ok());
    }

    #[test]
    fn driver_exit_and_task_cancel_terminate_execs() {
        let t0 = Instant::now();
        let c = cfg();
        let mut core = new_core(&c, t0);
        up(&mut core, t0);
        command(&mut core, submit(1, "t1", false), t0);
        let mut req = exec(1, &["sleep", "100"]);
        req.task_id = Some("t1".into());
        let a = start(&mut core, ExecOwner::Driver(PID), &req, 700, t0);
        let b = start(&mut core, ExecOwner::Control, &exec(2, &["sleep"]), 701, t0);
        let r = command(
            &mut core,
            ControlToShim::CancelTask(CancelTask {
                id: 2,
                task_id: "t1".into(),
                grace_ms: Some(300),
            }),
            t0,
        );
        assert!(is_ok(&r, 2));
        core.on_timer(t0 + Duration::from_millis(299));
        assert!(kills(&core).is_empty());
        let t1 = t0 + Duration::from_millis(300);
        core.on_timer(t1);
        assert!(kills(&core).contains(&(-700, libc::SIGTERM)));
        assert!(!kills(&core).iter().any(|k| k.0 == -701));
        core.on_exec_exit(a, ExitStatus::Signaled(libc::SIGTERM), t1);
        core.exec_io_closed(a, t1);
        assert_eq!(exec_exits(&core.take_outputs()).len(), 1);
        // The driver's exit terminates its own execs only.
        let c2 = start(&mut core, ExecOwner::Driver(PID), &exec(3, &["x"]), 702, t1);
        core.clear_kills();
        core.on_driver_exit(PID, ExitStatus::Exited(1), t1);
        assert_eq!(kills(&core), vec![(-702, libc::SIGTERM)]);
        // Its exit is not sent to a driver that is gone.
        core.take_outputs();
        core.on_exec_exit(c2, ExitStatus::Signaled(libc::SIGTERM), t1);
        core.exec_io_closed(c2, t1);
        assert!(exec_exits(&core.take_outputs()).is_empty());
        assert_eq!(core.exec_owner(b), Some(ExecOwner::Control));
    }

    #[test]
    fn shutdown_waits_for_every_exec_exit() {
        let t0 = Instant::now();
        let c = cfg();
        let mut core = new_core(&c, t0);
        up(&mut core, t0);
        let id = start(&mut core, ExecOwner::Control, &exec(1, &["sleep"]), 800, t0);
        command(
            &mut core,
            ControlToShim::Shutdown(driver_protocol::message::Shutdown {
                id: 1,
                grace_ms: Some(1000),
                reason: None,
            }),
            t0,
        );
        // Execs get SIGTERM with the stop; new ones are refused.
        assert!(kills(&core).contains(&(-800, libc::SIGTERM)));
        assert_eq!(
            core.admit(ExecOwner::Control, &exec(2, &["x"]), None)
                .unwrap_err()
                .0,
            ErrorCode::ShuttingDown
        );
        core.on_driver_exit(PID, ExitStatus::Exited(0), t0);
        assert_eq!(core.exit_code(), None, "an exec is still running");
        core.on_exec_exit(id, ExitStatus::Signaled(libc::SIGTERM), t0);
        core.exec_io_closed(id, t0);
        assert_eq!(exec_exits(&core.take_outputs()).len(), 1);
        assert_eq!(core.exit_code(), Some(0));
    }

    #[test]
    fn execs_that_are_never_reaped_are_reported_at_the_exit_deadline() {
        let t0 = Instant::now();
        let c = cfg();
        let mut core = new_core(&c, t0);
        up(&mut core, t0);
        start(&mut core, ExecOwner::Control, &exec(1, &["stuck"]), 900, t0);
        core.on_driver_exit(PID, ExitStatus::Exited(0), t0);
        // --restart on-failure and exit 0: the shim exits, after its exec.
        let mut now = t0;
        for _ in 0..10 {
            match core.next_deadline() {
                Some(d) => {
                    now = d;
                    core.on_timer(d);
                }
                None => break,
            }
            if core.exit_code().is_some() {
                break;
            }
        }
        assert_eq!(core.exit_code(), Some(0));
        let x = exec_exits(&core.take_outputs());
        assert_eq!(x.len(), 1);
        assert!(x[0].code.is_none() && x[0].signal.is_none(), "{x:?}");
        assert!(now <= t0 + c.opts.exec_kill_grace + c.opts.exec_drain + super::EXIT_SLACK);
    }

    #[test]
    fn status_counts_execs() {
        let t0 = Instant::now();
        let c = cfg();
        let mut core = new_core(&c, t0);
        up(&mut core, t0);
        start(&mut core, ExecOwner::Control, &exec(1, &["a"]), 1000, t0);
        let s = core.status(3, t0, &super::super::Counters::default());
        assert_eq!(s.execs_running, 1);
        assert_eq!(s.children, 2);
    }
}
