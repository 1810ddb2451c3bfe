//! Signals from outside and the shutdown sequence.
//!
//! SIGTERM/SIGINT (after `--rewrite`) or a `shutdown` request start the stop: the driver is
//! sent `shutdown`, at half the grace its group gets SIGTERM, at the grace SIGKILL (as PID 1:
//! everything). Other signals are forwarded to the driver's process group.

use std::time::{Duration, Instant};

use driver_protocol::message::{ShimToControl, Shutdown, SignalTarget};
use driver_protocol::ErrorCode;
use tracing::{debug, info, warn};

use crate::reaper::ExitStatus;
use crate::signals;
use crate::sys::SigInfo;

use super::super::lifecycle::Input;
use super::{due, err, ok, Core, Kill, Stopping};

impl Core {
    /// A signal from outside (not SIGCHLD: the shell reaps).
    pub fn on_signal(&mut self, info: &SigInfo, now: Instant) {
        let sig = info.signo;
        let Some(admitted) = self.admission.admit(info, &self.cfg.rewrites, now) else {
            return;
        };
        let fwd = admitted.signal;
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

    pub(super) fn begin_stop(&mut self, now: Instant, grace: Duration, reason: Option<String>) {
        if self.stopping.is_some() {
            return;
        }
        self.transition(Input::StopRequested);
        self.restart_at = None;
        self.pausing = None;
        self.cancelling = None;
        // Every tool process group gets SIGTERM now, SIGKILL after --exec-kill-grace.
        self.terminate_execs(now, |_| true);
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
                self.finish(self.last_exit.unwrap_or(ExitStatus::Exited(0)), now);
            }
        }
    }

    /// `signal`: send a signal to the driver's process group.
    pub(super) fn signal_command(&mut self, s: &driver_protocol::message::Signal) -> ShimToControl {
        if s.target == SignalTarget::Exec {
            let Some(id) = s.exec_id else {
                return err(s.id, ErrorCode::Invalid, "target exec needs an exec_id");
            };
            return match self.signal_exec_command(id, &s.signal) {
                Ok(()) => ok(s.id),
                Err((code, message)) => err(s.id, code, &message),
            };
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

    /// Half the grace: SIGTERM to the driver's group; the whole grace: SIGKILL.
    pub(super) fn stop_timer(&mut self, now: Instant) {
        let pid = self.driver.as_ref().map(|d| d.pid);
        if let Some(s) = self.stopping.as_mut() {
            if due(s.term_at, now) {
                s.term_at = None;
                if let Some(pid) = pid {
                    info!(pid, "half the grace is over: SIGTERM to the driver's group");
                    self.kill_group(pid, libc::SIGTERM);
                }
            }
        }
        if let Some(s) = self.stopping.as_mut() {
            if due(s.kill_at, now) {
                s.kill_at = None;
                warn!(grace = ?self.cfg.grace, "grace period over, sending SIGKILL");
                if self.pid1 {
                    self.kill(Kill::Everything);
                } else if let Some(pid) = pid {
                    self.kill_group(pid, libc::SIGKILL);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use driver_protocol::message::{ControlToShim, ShimToDriver, Shutdown};
    use driver_protocol::ErrorCode;

    use super::super::testkit::*;
    use crate::reaper::ExitStatus;
    use crate::sys::SigInfo;

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
        assert!(kills(&core).is_empty());
        // New work is refused while stopping.
        assert_eq!(
            err_code(&command(&mut core, submit(1, "late", false), t0)),
            Some(ErrorCode::ShuttingDown)
        );
        core.on_timer(t0 + Duration::from_secs(4));
        assert_eq!(kills(&core), vec![(-PID, libc::SIGTERM)]);
        core.on_timer(t0 + Duration::from_secs(8));
        assert_eq!(
            kills(&core),
            vec![(-PID, libc::SIGTERM), (-PID, libc::SIGKILL)]
        );
        core.on_driver_exit(PID, ExitStatus::Signaled(libc::SIGKILL), t0);
        assert_eq!(core.exit_code(), Some(137));
        assert_eq!(launches(&core.take_outputs()), 0);
    }

    #[test]
    fn a_forged_outside_sigterm_does_not_stop_pid1() {
        let t0 = Instant::now();
        let c = cfg();
        let mut core = TestCore::new(1, &c, t0);
        up(&mut core, t0);
        core.take_outputs();
        // rt_sigqueueinfo lets the sender write si_pid 0 and si_uid 0 with SI_QUEUE.
        let forged = SigInfo {
            signo: libc::SIGTERM,
            code: libc::SI_QUEUE,
            pid: 0,
            uid: 0,
        };
        core.on_signal(&forged, t0);
        assert!(states(&core.take_outputs()).is_empty());
        assert!(kills(&core).is_empty());
        // The same from `kill` outside the namespace is the runtime's stop.
        let term = SigInfo {
            code: libc::SI_USER,
            ..forged
        };
        core.on_signal(&term, t0);
        assert_eq!(states(&core.take_outputs()), vec![(S::Ready, S::Stopping)]);
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
        assert_eq!(kills(&core), vec![(-PID, libc::SIGHUP)]);
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
        c.opts.crash_loop_restarts = 1;
        let mut core = new_core(&c, t0);
        core.on_launched(PID, t0);
        core.on_driver_exit(PID, ExitStatus::Signaled(libc::SIGSEGV), t0);
        assert_eq!(core.state(), S::Error);
        core.take_outputs();
        let r = command(
            &mut core,
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
        let mut core = TestCore::new(1, &c, t0);
        up(&mut core, t0);
        command(
            &mut core,
            ControlToShim::Shutdown(Shutdown {
                id: 1,
                grace_ms: Some(100),
                reason: None,
            }),
            t0,
        );
        core.on_timer(t0 + Duration::from_millis(100));
        assert_eq!(
            kills(&core),
            vec![(-PID, libc::SIGTERM), (-1, libc::SIGKILL)]
        );
        assert_eq!(core.kill_deadline(), None);
    }
}
