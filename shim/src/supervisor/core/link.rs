//! The driver link as the core sees it: the handshake, every message from the driver, and the
//! liveness checks (the `--ready-timeout`, then pings).
//!
//! A driver that breaks the protocol, does not read its socket, is not ready in time or stops
//! answering pings is told (where it can be) and killed; its exit then carries the reason.

use std::time::{Duration, Instant};

use bytes::Bytes;
use driver_protocol::handshake;
use driver_protocol::message::{
    DriverReady, DriverState, DriverToShim, ErrorMsg, Ping, Pong, Role,
};
use driver_protocol::{DecodeError, ErrorCode};
use tracing::{debug, warn};

use super::super::lifecycle::Input;
use super::{due, Core, ExecOwner, ExitReason, Output};

/// Whether a message from the driver counts as activity for idle detection (see
/// [`idle`](super::idle)): what it relays as an event, `task_done`, and exec traffic; not
/// liveness, lifecycle or replies.
fn is_activity(msg: &DriverToShim) -> bool {
    match msg {
        DriverToShim::Error(e) => e.re.is_none(),
        DriverToShim::MessageChunk(_)
        | DriverToShim::ToolCall(_)
        | DriverToShim::ToolResult(_)
        | DriverToShim::FileChange(_)
        | DriverToShim::Progress(_)
        | DriverToShim::Log(_)
        | DriverToShim::Custom(_)
        | DriverToShim::TaskDone(_)
        | DriverToShim::Exec(_)
        | DriverToShim::ExecInput(_)
        | DriverToShim::ExecResize(_)
        | DriverToShim::ExecSignal(_) => true,
        DriverToShim::Hello(_)
        | DriverToShim::Ready(_)
        | DriverToShim::Paused(_)
        | DriverToShim::Ping(_)
        | DriverToShim::Pong(_)
        | DriverToShim::Ok(_)
        | DriverToShim::Unknown(_) => false,
    }
}

/// How long a driver that closed its socket may take to exit before it is a protocol error.
const EOF_GRACE: Duration = Duration::from_secs(1);

impl Core {
    /// The driver's socket reached end of stream, or writing to it failed, while the driver
    /// was not yet reaped: unless it is reaped within [`EOF_GRACE`] (it is just exiting),
    /// it is killed, reason `protocol_error`.
    pub fn on_driver_eof(&mut self, now: Instant) {
        if let Some(d) = self.driver.as_mut() {
            if !d.gone() && d.kill_reason.is_none() && d.eof_deadline.is_none() {
                debug!("the driver closed its socket");
                d.eof_deadline = now.checked_add(EOF_GRACE);
            }
        }
    }

    /// The grace after an end of stream on the driver's socket expired.
    pub(super) fn eof_timer(&mut self, now: Instant) {
        if let Some(d) = self.driver.as_mut() {
            if due(d.eof_deadline, now) {
                d.eof_deadline = None;
                warn!("the driver closed its socket but lives on: protocol error");
                self.kill_driver(ExitReason::ProtocolError);
            }
        }
    }

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
            first_available: None,
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
            first_available: None,
        });
        self.out.push(Output::StopReading);
        self.kill_driver(ExitReason::ProtocolError);
    }

    /// A driver event checked but not decoded (see `driver_protocol::check`): what
    /// [`Core::on_driver_msg`] does with one, without the message. True when the caller is
    /// to relay the body (after applying any outputs this produced: a `busy` event).
    pub fn on_driver_event(&mut self, type_name: &str, now: Instant) -> bool {
        let Some(driver) = self.driver.as_ref() else {
            return false;
        };
        if !driver.hello {
            self.protocol_violation(
                ErrorCode::InvalidState,
                format!("expected hello, got {type_name}"),
            );
            return false;
        }
        self.activity(now);
        true
    }

    /// One decoded message from the driver; `body` is its MessagePack body.
    pub fn on_driver_msg(&mut self, msg: DriverToShim, body: Bytes, now: Instant) {
        let Some(driver) = self.driver.as_mut() else {
            return;
        };
        if !driver.hello {
            match msg {
                DriverToShim::Hello(h) if h.role != Role::Driver => self.protocol_violation(
                    ErrorCode::Invalid,
                    format!("hello with role {:?}, expected driver", h.role),
                ),
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
        let dying = driver.kill_reason.is_some() || driver.gone();
        if is_activity(&msg) {
            self.activity(now);
        }
        match msg {
            DriverToShim::Hello(_) => debug!("ignoring a second hello from the driver"),
            DriverToShim::Ready(_) | DriverToShim::Paused(_) if dying => {
                debug!("ignoring ready/paused from a driver being killed");
            }
            DriverToShim::Ready(r) => self.on_ready(r.re, pid, started, now),
            DriverToShim::Paused(_) => self.on_paused(),
            DriverToShim::TaskDone(done) => self.on_task_done(&done.task_id, body),
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
            DriverToShim::Exec(e) => self.out.push(Output::StartExec(e)),
            DriverToShim::ExecInput(m) => {
                let r = self.exec_input(ExecOwner::Driver(pid), m);
                self.refused(r);
            }
            DriverToShim::ExecResize(m) => {
                let r = self.exec_resize(ExecOwner::Driver(pid), &m);
                self.refused(r);
            }
            DriverToShim::ExecSignal(m) => {
                let r = self.exec_signal(ExecOwner::Driver(pid), &m);
                self.refused(r);
            }
            DriverToShim::Unknown(u) => {
                debug!(type_name = u.type_name, "unknown message from the driver");
                self.send(ErrorMsg {
                    re: u.id,
                    code: ErrorCode::Unsupported,
                    message: format!("unknown message type {:?}", u.type_name),
                    task_id: None,
                    first_available: None,
                });
            }
        }
    }

    /// Tells the driver why an `exec_input`/`exec_resize`/`exec_signal` was refused (an
    /// `error` without `re`: those messages have no id).
    fn refused(&mut self, r: Result<(), super::Refusal>) {
        if let Err((code, message)) = r {
            debug!(%code, message, "exec message from the driver refused");
            self.send(ErrorMsg {
                re: None,
                code,
                message,
                task_id: None,
                first_available: None,
            });
        }
    }

    fn on_ready(&mut self, re: Option<u64>, pid: i32, started: Instant, now: Instant) {
        match self.lifecycle.state() {
            DriverState::Starting => {
                let interval = self.cfg.ping_interval;
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
            DriverState::Paused if self.resuming => self.on_resumed(),
            state => debug!(?state, ?re, "ignoring ready from the driver"),
        }
    }

    /// The `--ready-timeout` and the pings.
    pub(super) fn liveness_timer(&mut self, now: Instant) {
        if let Some(d) = self.driver.as_mut() {
            if due(d.ready_deadline, now) {
                d.ready_deadline = None;
                warn!(timeout = ?self.cfg.ready_timeout, "the driver was not ready in time");
                self.kill_driver(ExitReason::NotReady);
            }
        }
        if let Some(d) = self.driver.as_mut() {
            if due(d.next_ping, now) {
                let interval = self.cfg.ping_interval;
                d.next_ping = now.checked_add(interval);
                if d.pings_unanswered >= self.cfg.ping_misses {
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
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use driver_protocol::message::{DriverToShim, ErrorMsg, Event, Log, Pong, ShimToDriver};
    use driver_protocol::{DecodeError, ErrorCode};

    use super::super::testkit::*;
    use super::super::Output;
    use crate::reaper::ExitStatus;

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
        assert_eq!(kills(&core), vec![(-PID, libc::SIGKILL)]);
        core.on_driver_exit(PID, ExitStatus::Signaled(9), t0);
        assert_eq!(exited(&core.take_outputs())[0].reason, "protocol_error");
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
        assert!(kills(&core).is_empty());
        core.on_timer(t0 + 4 * s);
        assert_eq!(kills(&core), vec![(-PID, libc::SIGKILL)]);
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
        core.on_timer(t0 + c.ready_timeout);
        assert!(kills(&core).contains(&(-PID, libc::SIGKILL)));
        core.on_driver_exit(PID, ExitStatus::Signaled(9), t0 + c.ready_timeout);
        assert_eq!(exited(&core.take_outputs())[0].reason, "not_ready");
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
        assert!(kills(&core).is_empty());
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
            kills(&core),
            vec![(-PID, libc::SIGKILL), (-PID, libc::SIGKILL)]
        );
        core.on_driver_exit(PID, ExitStatus::Signaled(9), t0);
        assert_eq!(exited(&core.take_outputs())[0].reason, "protocol_error");

        // Exec failure: reason exec_failed; without a process at all too.
        let due = core.next_deadline().expect("restart");
        core.on_timer(due);
        core.take_outputs();
        core.on_launched(PID + 1, t0);
        core.on_driver_spawn_failed(PID + 1);
        core.on_driver_exit(PID + 1, ExitStatus::Exited(127), t0);
        assert_eq!(exited(&core.take_outputs())[0].reason, "exec_failed");
        let due = core.next_deadline().expect("restart");
        core.on_timer(due);
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
