//! The driver as a process: its launch, its exit, the restart (or crash loop) that follows,
//! and killing it.
//!
//! Every way the driver ends funnels into one place, which reports `driver_exited` with the
//! reason, settles the running task, and asks the [`Restarter`](super::Restarter) what next.

use std::time::Instant;

use std::collections::BTreeMap;

use driver_protocol::message::{
    CrashLoop, DriverExited, DriverRestarting, DriverStarted, SetDriver, ShimToControl, Shutdown,
    TaskStatus,
};
use driver_protocol::ErrorCode;
use tracing::{debug, info, warn};

use crate::reaper::ExitStatus;
use crate::signals;

use super::super::lifecycle::Input;
use super::super::restart::Decision;
use super::super::tasks::LostOutcome;
use super::{due, err, ok, Core, Driver, ExitReason, Kill, Output, Stopping};

impl Core {
    /// The driver was forked as `pid` (its exit will reach [`Core::on_driver_exit_oom`]).
    pub fn on_launched(&mut self, pid: i32, now: Instant) {
        let attempt = self.next_attempt;
        self.next_attempt = attempt.saturating_add(1);
        let sup = &self.cfg.opts;
        self.driver = Some(Driver {
            pid,
            started: now,
            hello: false,
            kill_reason: None,
            ready_deadline: now.checked_add(sup.ready_timeout),
            // Pings start at `ready`: until then `--ready-timeout` is the liveness check.
            next_ping: None,
            pings_unanswered: 0,
            exit: None,
            eof_deadline: None,
        });
        info!(pid, attempt, "driver started");
        self.transition(Input::Launched);
        self.event(DriverStarted {
            pid: pid.unsigned_abs(),
            attempt,
        });
        self.send(self.hello.clone());
    }

    /// The driver `pid` (launched with [`Core::on_launched`]) never ran: its `execve` or a
    /// step before it failed, or it did not get that far within `--spawn-timeout` and was
    /// killed. Its exit, when reaped, is an `exec_failed` (the restart policy follows).
    pub fn on_driver_spawn_failed(&mut self, pid: i32) {
        if let Some(d) = self.driver.as_mut().filter(|d| d.pid == pid) {
            d.kill_reason.get_or_insert(ExitReason::ExecFailed);
        }
    }

    /// The driver could not even be forked: a failed start without a process.
    pub fn on_launch_error(&mut self, now: Instant) {
        let attempt = self.next_attempt;
        self.next_attempt = attempt.saturating_add(1);
        self.transition(Input::Launched);
        self.event(DriverStarted { pid: 0, attempt });
        self.driver_gone(
            0,
            now,
            ExitStatus::Exited(125),
            ExitReason::ExecFailed,
            None,
            now,
        );
    }

    /// The reaper collected the driver; whether the OOM killer killed it is not known. The
    /// driver's link is closed at once (the tests' and the fuzzer's shortcut for
    /// [`Core::on_driver_exit_oom`] and [`Core::on_driver_link_closed`]).
    #[cfg(any(test, fuzzing))]
    pub fn on_driver_exit(&mut self, pid: i32, status: ExitStatus, now: Instant) {
        self.on_driver_exit_oom(pid, status, None);
        self.on_driver_link_closed(now);
    }

    /// The reaper collected the driver; `oom_killed` is the shell's reading of the OOM-kill
    /// counter (`None`: unknown). What it left in its socket is still to be handed over, and
    /// is relayed but starts nothing (no task is sent to a dead driver): the core asks for
    /// [`Output::CloseDriverLink`], and the exit is decided in
    /// [`Core::on_driver_link_closed`].
    pub fn on_driver_exit_oom(&mut self, pid: i32, status: ExitStatus, oom_killed: Option<bool>) {
        let Some(d) = self
            .driver
            .as_mut()
            .filter(|d| d.pid == pid && d.exit.is_none())
        else {
            debug!(pid, "not the current driver");
            return;
        };
        d.exit = Some((status, oom_killed));
        self.out.push(Output::CloseDriverLink);
    }

    /// The shell read what the reaped driver left and closed its link
    /// ([`Output::CloseDriverLink`]): its exit is decided now.
    pub fn on_driver_link_closed(&mut self, now: Instant) {
        let Some(driver) = self.driver.take_if(|d| d.exit.is_some()) else {
            return;
        };
        let Some((status, oom_killed)) = driver.exit else {
            return;
        };
        let reason = driver.kill_reason.unwrap_or(match status {
            ExitStatus::Exited(0) => ExitReason::Exited,
            _ => ExitReason::Crashed,
        });
        self.driver_gone(driver.pid, driver.started, status, reason, oom_killed, now);
    }

    fn driver_gone(
        &mut self,
        pid: i32,
        started: Instant,
        status: ExitStatus,
        reason: ExitReason,
        oom_killed: Option<bool>,
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
        info!(
            pid,
            ?status,
            reason = reason.as_str(),
            oom_killed,
            "driver exited"
        );
        self.event(DriverExited {
            pid: pid.unsigned_abs(),
            code,
            signal,
            uptime_ms: Self::ms(uptime),
            reason: reason.as_str().to_owned(),
            oom_killed,
        });
        self.pausing = None;
        self.replacing = None;
        self.paused_at = None;
        self.resuming = false;
        self.resume_deadline = None;
        self.cancelling = None;
        self.last_exit = Some(status);
        self.transition(Input::Exited);
        // Stopping: the running task is not lost but cancelled, as the queued ones are
        // ([`Core::finish`] ends them all).
        let lost = match self.stopping {
            Some(_) => None,
            None => self
                .tasks
                .driver_lost(&format!("driver {}: {detail}", reason.as_str())),
        };
        match lost {
            Some(LostOutcome::Failed(done)) => self.event(done),
            Some(LostOutcome::Requeued { task_id, attempt }) => {
                info!(task_id, attempt, "task will be redelivered");
            }
            None => {}
        }
        self.driver_execs_gone(pid, now);
        if self.stopping.is_some() {
            self.finish(status, now);
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
            Decision::Stop => self.finish(status, now),
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

    pub(super) fn finish(&mut self, status: ExitStatus, now: Instant) {
        if self.exit_code.is_none() && self.exit_pending.is_none() {
            // Every accepted task gets its task_done before the shim goes.
            let (how, why) = if self.stopping.is_some() {
                (TaskStatus::Cancelled, "shim shutting down")
            } else {
                (TaskStatus::Failed, "shim exiting")
            };
            for done in self.tasks.end_all(how, why) {
                self.event(done);
            }
            // Every exec gets its exec_exit too: terminated, then reported.
            self.exit_after_execs(self.cfg.exit_code(status.code()), now);
        }
    }

    /// SIGKILLs the driver's process group (and the driver, if it left its group).
    pub(super) fn kill_driver(&mut self, reason: ExitReason) {
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

    /// Sends `sig` to the driver's process group (or to the driver, if it left its group).
    pub(super) fn kill_group(&mut self, pid: i32, sig: i32) {
        self.kill(Kill::Driver { pid, sig });
    }

    /// `restart_driver`: forget the crash history and launch again (killing a running driver
    /// first).
    pub(super) fn restart_driver(&mut self, re: u64) -> ShimToControl {
        if self.stopping.is_some() {
            return err(
                re,
                driver_protocol::ErrorCode::ShuttingDown,
                "the shim is shutting down",
            );
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
        ok(re)
    }

    /// `set_driver`: from now on launch `argv` (with `env` on top of the scrubbed
    /// environment). A running driver gets a graceful stop — `shutdown`, SIGTERM to its group
    /// after half the grace, SIGKILL after the whole grace — and the new command starts once
    /// it is gone; no task is delivered to the old driver meanwhile (a running one is settled
    /// like any other lost task). The crash history is forgotten: the new command starts with
    /// a clean slate, also out of `error`.
    pub(super) fn set_driver(&mut self, s: SetDriver, now: Instant) -> ShimToControl {
        if self.stopping.is_some() {
            return err(s.id, ErrorCode::ShuttingDown, "the shim is shutting down");
        }
        if let Err(why) = check_command(&s.argv, &s.env) {
            return err(s.id, ErrorCode::Invalid, &why);
        }
        info!(argv = ?s.argv, env = s.env.len(), "driver command replaced");
        self.command = s.argv.into_iter().map(Into::into).collect();
        self.command_env = s.env;
        self.restarter.reset();
        self.next_attempt = 1;
        self.restart_at = None;
        let grace = self.cfg.grace;
        match self.driver.as_mut() {
            Some(d) if d.kill_reason.is_none() && !d.gone() => {
                d.kill_reason = Some(ExitReason::Shutdown);
                self.relaunch_after_exit = true;
                self.pausing = None;
                self.transition(Input::StopRequested);
                let id = self.request_id();
                self.send(Shutdown {
                    id,
                    grace_ms: Some(Self::ms(grace)),
                    reason: Some("set_driver".to_owned()),
                });
                self.replacing = Some(Stopping {
                    term_at: now.checked_add(grace / 2),
                    kill_at: now.checked_add(grace),
                });
            }
            // Already on its way out: the new command starts when it is gone.
            Some(_) => self.relaunch_after_exit = true,
            None => {
                self.transition(Input::Recover);
                self.out.push(Output::Launch);
            }
        }
        ok(s.id)
    }

    /// The graceful stop of a driver being replaced: SIGTERM at half the grace, SIGKILL at
    /// the end.
    pub(super) fn replace_timer(&mut self, now: Instant) {
        let Some(pid) = self.driver.as_ref().map(|d| d.pid) else {
            return;
        };
        let Some(r) = self.replacing.as_mut() else {
            return;
        };
        if due(r.term_at, now) {
            r.term_at = None;
            info!(pid, "replaced driver: SIGTERM to its group");
            self.kill_group(pid, libc::SIGTERM);
        }
        if let Some(r) = self.replacing.as_mut().filter(|r| due(r.kill_at, now)) {
            r.kill_at = None;
            warn!(
                pid,
                "replaced driver still running after the grace: SIGKILL"
            );
            self.kill_group(pid, libc::SIGKILL);
        }
    }

    /// The backoff delay is over: launch again (unless stopping or already running).
    pub(super) fn restart_timer(&mut self, now: Instant) {
        if due(self.restart_at, now) {
            self.restart_at = None;
            if self.driver.is_none() && self.stopping.is_none() {
                self.out.push(Output::Launch);
            }
        }
    }
}

/// Variables a driver command may not set: the protocol fd is the shim's to give.
const RESERVED_ENV: &[&str] = &[crate::driver::FD_VAR, crate::driver::TOKEN_VAR];

/// A `set_driver` command the kernel can run: a program, no NUL anywhere, names without `=`.
fn check_command(argv: &[String], env: &BTreeMap<String, String>) -> Result<(), String> {
    match argv.first() {
        None => return Err("argv is empty".to_owned()),
        Some(p) if p.is_empty() => return Err("argv[0] is empty".to_owned()),
        Some(_) => {}
    }
    if argv.iter().any(|a| a.contains('\0')) {
        return Err("argv contains a NUL byte".to_owned());
    }
    for (k, v) in env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(format!("invalid environment variable {k:?}"));
        }
        if RESERVED_ENV.contains(&k.as_str()) {
            return Err(format!("{k} is set by the shim"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use driver_protocol::message::{
        ControlToShim, DriverRestarting, DriverStarted, Event, RestartDriver, SetDriver,
        ShimToDriver,
    };
    use driver_protocol::ErrorCode;

    use super::super::testkit::*;
    use crate::reaper::ExitStatus;

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
        c.opts.crash_loop_restarts = 3;
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
        let r = command(
            &mut core,
            ControlToShim::RestartDriver(RestartDriver { id: 9 }),
            now,
        );
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
        let r = command(
            &mut core,
            ControlToShim::RestartDriver(RestartDriver { id: 1 }),
            t0,
        );
        assert!(is_ok(&r, 1));
        assert_eq!(kills(&core), vec![(-PID, libc::SIGKILL)]);
        assert_eq!(launches(&core.take_outputs()), 0);
        core.on_driver_exit(PID, ExitStatus::Signaled(9), t0);
        let outs = core.take_outputs();
        assert_eq!(exited(&outs)[0].reason, "shutdown");
        assert_eq!(launches(&outs), 1);
    }

    fn set_driver(id: u64, argv: &[&str], env: &[(&str, &str)]) -> ControlToShim {
        ControlToShim::SetDriver(SetDriver {
            id,
            argv: argv.iter().map(|a| (*a).to_owned()).collect(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        })
    }

    #[test]
    fn set_driver_stops_the_old_driver_gracefully_then_launches_the_new_command() {
        let t0 = Instant::now();
        let mut c = cfg();
        c.opts.ping_interval = Duration::from_secs(60);
        let mut core = new_core(&c, t0);
        up(&mut core, t0);
        let r = command(&mut core, set_driver(1, &["new", "--x"], &[("A", "b")]), t0);
        assert!(is_ok(&r, 1), "{r:?}");
        let (argv, env) = core.driver_command();
        assert_eq!(argv, ["new", "--x"].map(std::ffi::OsString::from));
        assert_eq!(env.get("A").map(String::as_str), Some("b"));
        let outs = core.take_outputs();
        assert!(
            to_driver(&outs).iter().any(|m| matches!(
                m,
                ShimToDriver::Shutdown(s) if s.reason.as_deref() == Some("set_driver")
            )),
            "{outs:?}"
        );
        assert_eq!(states(&outs), vec![(S::Ready, S::Stopping)]);
        assert!(kills(&core).is_empty(), "killed at once");
        // No task goes to the old driver meanwhile.
        let r = command(&mut core, submit(2, "t", false), t0);
        assert!(is_ok(&r, 2));
        assert!(!to_driver(&core.take_outputs())
            .iter()
            .any(|m| matches!(m, ShimToDriver::Task(_))));
        // Half the grace: SIGTERM; the whole grace: SIGKILL.
        assert_eq!(core.next_deadline(), Some(t0 + Duration::from_secs(4)));
        core.on_timer(t0 + Duration::from_secs(4));
        assert_eq!(kills(&core), vec![(-PID, libc::SIGTERM)]);
        core.on_timer(t0 + Duration::from_secs(8));
        assert_eq!(
            kills(&core),
            vec![(-PID, libc::SIGTERM), (-PID, libc::SIGKILL)]
        );
        let t1 = t0 + Duration::from_secs(9);
        core.on_driver_exit(PID, ExitStatus::Signaled(9), t1);
        let outs = core.take_outputs();
        assert_eq!(exited(&outs)[0].reason, "shutdown");
        assert_eq!(launches(&outs), 1);
        assert_eq!(
            core.next_deadline(),
            None,
            "the replacement deadlines are gone"
        );
        // The new driver comes up as attempt 1 and gets the queued task.
        core.on_launched(PID + 1, t1);
        core.on_driver_msg(hello(), body(), t1);
        core.on_driver_msg(ready(), body(), t1);
        let outs = core.take_outputs();
        assert!(events(&outs)
            .iter()
            .any(|e| matches!(e, Event::DriverStarted(DriverStarted { attempt: 1, .. }))));
        assert!(to_driver(&outs)
            .iter()
            .any(|m| matches!(m, ShimToDriver::Task(t) if t.task_id == "t")));
    }

    #[test]
    fn set_driver_out_of_a_crash_loop_launches_at_once() {
        let t0 = Instant::now();
        let mut c = cfg();
        c.opts.crash_loop_restarts = 1;
        let mut core = new_core(&c, t0);
        up(&mut core, t0);
        core.on_driver_exit(PID, ExitStatus::Exited(1), t0);
        core.take_outputs();
        assert_eq!(core.state(), S::Error);
        let r = command(&mut core, set_driver(1, &["fixed"], &[]), t0);
        assert!(is_ok(&r, 1), "{r:?}");
        let outs = core.take_outputs();
        assert_eq!(launches(&outs), 1);
        assert_eq!(states(&outs), vec![(S::Error, S::Exited)]);
    }

    #[test]
    fn set_driver_refuses_bad_commands_and_keeps_the_old_one() {
        let t0 = Instant::now();
        let c = cfg();
        let mut core = new_core(&c, t0);
        up(&mut core, t0);
        for bad in [
            set_driver(1, &[], &[]),
            set_driver(2, &[""], &[]),
            set_driver(3, &["a\0b"], &[]),
            set_driver(4, &["ok"], &[("A=B", "c")]),
            set_driver(5, &["ok"], &[("AGENT_SHIM_FD", "7")]),
            set_driver(6, &["ok"], &[("AGENT_SHIM_TOKEN", "x")]),
        ] {
            let r = command(&mut core, bad, t0);
            assert_eq!(err_code(&r), Some(ErrorCode::Invalid), "{r:?}");
        }
        assert_eq!(
            core.driver_command().0,
            ["driver"].map(std::ffi::OsString::from)
        );
        assert!(core.take_outputs().is_empty());
        command(
            &mut core,
            ControlToShim::Shutdown(driver_protocol::message::Shutdown {
                id: 9,
                grace_ms: None,
                reason: None,
            }),
            t0,
        );
        let r = command(&mut core, set_driver(10, &["late"], &[]), t0);
        assert_eq!(err_code(&r), Some(ErrorCode::ShuttingDown));
    }
}
