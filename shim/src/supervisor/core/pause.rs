//! Pause and resume: the driver is asked to reach a safe point (`pause`), reports `paused`,
//! and on `resume` is told how long it slept, answering `ready`.
//!
//! A driver that does not pause in time goes back to `ready` with a `timeout` error event: a
//! pause is a request, not a kill.

use std::time::{Instant, SystemTime};

use driver_protocol::message::{DriverState, ErrorMsg, Pause, Paused, Resume, ShimToControl};
use driver_protocol::ErrorCode;
use tracing::{debug, warn};

use super::super::lifecycle::Input;
use super::{err, ok, Core, Pausing};

impl Core {
    /// `pause` (control request `re`): ask the driver for a safe point.
    pub(super) fn pause(&mut self, re: u64, now: Instant) -> ShimToControl {
        if self.lifecycle.state() != DriverState::Ready || self.driver.is_none() {
            return err(re, ErrorCode::InvalidState, "the driver is not ready");
        }
        let timeout = self.cfg.opts.pause_timeout;
        let id = self.request_id();
        self.transition(Input::PauseRequested);
        self.send(Pause {
            id,
            timeout_ms: Some(Self::ms(timeout)),
        });
        self.pausing = Some(Pausing {
            control_id: re,
            deadline: now.checked_add(timeout).unwrap_or(now),
        });
        ok(re)
    }

    /// `resume` (control request `re`): wake the driver, telling it how long it slept.
    pub(super) fn resume(&mut self, re: u64, now: Instant) -> ShimToControl {
        if self.lifecycle.state() != DriverState::Paused || self.resuming {
            return err(re, ErrorCode::InvalidState, "the driver is not paused");
        }
        let slept = self
            .paused_at
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .unwrap_or_default();
        let id = self.request_id();
        self.send(Resume {
            id,
            slept_ms: Some(Self::ms(slept)),
            unix_ms: None,
        });
        self.resuming = true;
        self.resume_deadline = now.checked_add(self.cfg.opts.pause_timeout);
        ok(re)
    }

    /// `resume{unix_ms}` (control request `re`): the wall clock is set first (`set_clock`
    /// does, reporting `clock_set`), then the driver is woken and measures its sleep on the
    /// corrected clock. Nothing happens unless the driver is paused; a clock the kernel
    /// refuses answers as `set_clock` would and leaves the driver paused.
    pub fn resume_at(
        &mut self,
        re: u64,
        unix_ms: u64,
        set_clock: impl FnOnce(u64) -> std::io::Result<i64>,
        now: Instant,
    ) -> ShimToControl {
        if self.lifecycle.state() != DriverState::Paused || self.resuming {
            return err(re, ErrorCode::InvalidState, "the driver is not paused");
        }
        let reply = self.clock_set(re, unix_ms, set_clock(unix_ms), now);
        if !matches!(reply, ShimToControl::Ok(_)) {
            return reply;
        }
        self.resume(re, now)
    }

    /// The driver's `paused`.
    pub(super) fn on_paused(&mut self) {
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

    /// The driver's `ready` after a `resume`.
    pub(super) fn on_resumed(&mut self) {
        self.resuming = false;
        self.resume_deadline = None;
        self.paused_at = None;
        self.transition(Input::Resumed);
        self.start_next();
    }

    /// The driver did not pause in time: back to `ready`, with an error event.
    pub(super) fn pause_timer(&mut self, now: Instant) {
        if self.pausing.as_ref().is_some_and(|p| p.deadline <= now) {
            self.pausing = None;
            warn!("the driver did not pause in time");
            self.transition(Input::PauseTimedOut);
            self.event(ErrorMsg {
                re: None,
                code: ErrorCode::Timeout,
                message: "the driver did not reach a safe point in time".to_owned(),
                task_id: None,
                first_available: None,
            });
            self.start_next();
        }
        if super::due(self.resume_deadline, now) {
            self.resume_deadline = None;
            warn!("the driver did not answer resume in time: it counts as hung");
            self.event(ErrorMsg {
                re: None,
                code: ErrorCode::Timeout,
                message: "the driver did not resume in time".to_owned(),
                task_id: None,
                first_available: None,
            });
            self.kill_driver(super::ExitReason::Hung);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use driver_protocol::message::{
        ClockSet, ControlToShim, DriverToShim, ErrorMsg, Event, Pause, Paused, Resume,
        ShimToDriver, Shutdown,
    };
    use driver_protocol::ErrorCode;

    use super::super::testkit::*;
    use super::super::Output;
    use crate::reaper::ExitStatus;

    #[test]
    fn pause_resume_and_shutdown_transitions() {
        let t0 = Instant::now();
        let c = cfg();
        let mut core = new_core(&c, t0);
        up(&mut core, t0);
        let r = command(
            &mut core,
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
        let r = command(
            &mut core,
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
        let r = command(&mut core, ControlToShim::Resume(Resume::new(7)), t0);
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
        let r = command(
            &mut core,
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
        command(
            &mut core,
            ControlToShim::Pause(Pause {
                id: 5,
                timeout_ms: None,
            }),
            t0,
        );
        core.take_outputs();
        core.on_timer(t0 + c.opts.pause_timeout);
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
    fn resume_with_a_time_sets_the_clock_first_and_only_when_paused() {
        let t0 = Instant::now();
        let c = cfg();
        let mut core = new_core(&c, t0);
        up(&mut core, t0);
        core.take_outputs();
        // Not paused: refused, and the clock is left alone.
        let r = core.resume_at(3, 1_000, |_| panic!("the clock was set"), t0);
        assert_eq!(err_code(&r), Some(ErrorCode::InvalidState));
        assert!(core.take_outputs().is_empty());
        let r = command(
            &mut core,
            ControlToShim::Pause(Pause {
                id: 5,
                timeout_ms: None,
            }),
            t0,
        );
        assert!(is_ok(&r, 5));
        core.on_driver_msg(DriverToShim::Paused(Paused { re: Some(1) }), body(), t0);
        core.take_outputs();
        // A time the kernel refuses: the error, no event, and the driver stays paused.
        let r = core.resume_at(
            6,
            u64::MAX,
            |_| Err(std::io::Error::from_raw_os_error(libc::EINVAL)),
            t0,
        );
        assert_eq!(err_code(&r), Some(ErrorCode::Invalid));
        assert!(core.take_outputs().is_empty());
        // Set: `clock_set` is published before the driver is told to resume.
        let r = core.resume_at(7, 2_000, |ms| Ok(i64::try_from(ms).unwrap_or(0) - 500), t0);
        assert!(is_ok(&r, 7));
        let outs = core.take_outputs();
        let clock = outs.iter().position(|o| {
            matches!(o, Output::Event(e) if matches!(
                **e,
                Event::ClockSet(ClockSet {
                    unix_ms: 2_000,
                    jump_ms: 1_500
                })
            ))
        });
        let resume = outs.iter().position(
            |o| matches!(o, Output::ToDriver(m) if matches!(**m, ShimToDriver::Resume(_))),
        );
        assert!(
            clock.is_some() && resume.is_some() && clock < resume,
            "{outs:?}"
        );
        // Resuming: a second one is refused without touching the clock.
        let r = core.resume_at(8, 3_000, |_| panic!("the clock was set"), t0);
        assert_eq!(err_code(&r), Some(ErrorCode::InvalidState));
    }
}
