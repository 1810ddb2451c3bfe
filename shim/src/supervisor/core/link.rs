//! The driver link as the core sees it: the handshake, every message from the driver, and the
//! liveness checks (the `--ready-timeout`, then pings).
//!
//! A driver that breaks the protocol, does not read its socket, is not ready in time or stops
//! answering pings is told (where it can be) and killed; its exit then carries the reason.

use std::time::{Duration, Instant};

use bytes::Bytes;
use driver_protocol::envelope::MAX_EVENT_BODY;
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

    /// A driver event checked but not decoded (see `driver_protocol::check`), naming
    /// `task_id`, of `len` bytes: what [`Core::on_driver_msg`] does with one, without the
    /// message. To relay it, the core asks for [`Output::RelayEvent`] (after any other output
    /// this produced: a `busy` event); the shell holds the body. When that is the only
    /// output, the shell takes it with [`Core::take_lone_relay`] and publishes at once.
    pub fn on_driver_event(
        &mut self,
        type_name: &str,
        task_id: Option<&[u8]>,
        len: usize,
        now: Instant,
    ) {
        if self.driver_event(type_name, task_id, len, now) {
            self.out.push(Output::RelayEvent);
        }
    }

    /// What `on_driver_event` does but the asking: whether the event is relayed.
    fn driver_event(
        &mut self,
        type_name: &str,
        task_id: Option<&[u8]>,
        len: usize,
        now: Instant,
    ) -> bool {
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
        self.relayable(type_name, task_id, len)
    }

    /// Whether a driver event (or `task_done`) of `len` bytes naming `task_id` is relayed:
    /// its envelope must fit a control frame, and a task it names must be the one the
    /// driver runs. Otherwise the driver is told why, with an `error` naming the task, and
    /// the event is not relayed (the driver is not killed: the frame itself was sound).
    pub(super) fn relayable(
        &mut self,
        type_name: &str,
        task_id: Option<&[u8]>,
        len: usize,
    ) -> bool {
        let refusal = if len > MAX_EVENT_BODY {
            (
                ErrorCode::FrameTooLarge,
                format!(
                    "{type_name} of {len} bytes not relayed: an event may have at most \
                     {MAX_EVENT_BODY} bytes (the frame limit less its envelope)"
                ),
            )
        } else {
            match task_id {
                Some(t) if self.tasks.running().map(str::as_bytes) != Some(t) => (
                    ErrorCode::NotFound,
                    format!(
                        "{type_name} not relayed: task {:?} is not running on this driver",
                        String::from_utf8_lossy(t)
                    ),
                ),
                _ => return true,
            }
        };
        debug!(type_name, len, code = %refusal.0, "driver event refused");
        self.send(ErrorMsg {
            re: None,
            code: refusal.0,
            message: refusal.1,
            task_id: task_id.map(|t| String::from_utf8_lossy(t).into_owned()),
            first_available: None,
        });
        false
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
            ev @ (DriverToShim::Error(_)
            | DriverToShim::MessageChunk(_)
            | DriverToShim::ToolCall(_)
            | DriverToShim::ToolResult(_)
            | DriverToShim::FileChange(_)
            | DriverToShim::Progress(_)
            | DriverToShim::Log(_)
            | DriverToShim::Custom(_)) => {
                let type_name = driver_protocol::message::Message::type_name(&ev);
                let task_id = ev.event_task_id().map(str::as_bytes);
                if self.relayable(type_name, task_id, body.len()) {
                    self.out.push(Output::Relay(body));
                }
            }
            DriverToShim::Exec(e) => self.out.push(Output::StartExec(Box::new(e))),
            DriverToShim::ExecInput(m) => self.exec_input(ExecOwner::Driver(pid), m),
            DriverToShim::ExecResize(m) => self.exec_resize(ExecOwner::Driver(pid), &m),
            DriverToShim::ExecSignal(m) => self.exec_signal(ExecOwner::Driver(pid), &m),
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

    fn on_ready(&mut self, re: Option<u64>, pid: i32, started: Instant, now: Instant) {
        match self.lifecycle.state() {
            DriverState::Starting => {
                let interval = self.cfg.opts.ping_interval;
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
                warn!(timeout = ?self.cfg.opts.ready_timeout, "the driver was not ready in time");
                self.kill_driver(ExitReason::NotReady);
            }
        }
        if let Some(d) = self.driver.as_mut() {
            if due(d.next_ping, now) {
                let interval = self.cfg.opts.ping_interval;
                d.next_ping = now.checked_add(interval);
                if d.pings_unanswered >= self.cfg.opts.ping_misses {
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

    /// The driver's error notices in `outs`: `(code, task_id)`.
    fn notices(outs: &[Output]) -> Vec<(ErrorCode, Option<String>)> {
        to_driver(outs)
            .iter()
            .filter_map(|m| match m {
                ShimToDriver::Error(e) if e.re.is_none() => {
                    Some((e.code.clone(), e.task_id.clone()))
                }
                _ => None,
            })
            .collect()
    }

    fn relays(outs: &[Output]) -> usize {
        outs.iter()
            .filter(|o| matches!(o, Output::Relay(_) | Output::RelayEvent))
            .count()
    }

    /// An event naming a task the driver is not running, or too large for its envelope, is
    /// not relayed and the driver is told; events of the running task, or of none, are.
    #[test]
    fn events_of_other_tasks_and_oversized_events_are_refused() {
        use driver_protocol::envelope::MAX_EVENT_BODY;
        let t0 = Instant::now();
        let mut core = new_core(&cfg(), t0);
        up(&mut core, t0);
        command(&mut core, submit(1, "A", false), t0);
        command(&mut core, submit(2, "B", false), t0);
        core.take_outputs();
        for (task, len, relayed, notice) in [
            (None, 10, true, None),
            (Some("A"), 10, true, None),
            (Some("A"), MAX_EVENT_BODY, true, None),
            (
                Some("A"),
                MAX_EVENT_BODY + 1,
                false,
                Some(ErrorCode::FrameTooLarge),
            ),
            (
                None,
                MAX_EVENT_BODY + 1,
                false,
                Some(ErrorCode::FrameTooLarge),
            ),
            (Some("B"), 10, false, Some(ErrorCode::NotFound)),
            (Some("ghost"), 10, false, Some(ErrorCode::NotFound)),
        ] {
            core.on_driver_event("custom", task.map(str::as_bytes), len, t0);
            let outs = core.take_outputs();
            assert_eq!(
                relays(&outs),
                usize::from(relayed),
                "{task:?} {len}: {outs:?}"
            );
            let want: Vec<_> = notice
                .into_iter()
                .map(|c| (c, task.map(str::to_owned)))
                .collect();
            assert_eq!(notices(&outs), want, "{task:?} {len}");
        }
        // The decoded path decides the same.
        let log = |task: &str| {
            DriverToShim::Log(Log {
                task_id: Some(task.into()),
                stream: driver_protocol::message::LogStream::Driver,
                level: None,
                text: "x".into(),
                truncated: false,
            })
        };
        core.on_driver_msg(log("A"), body(), t0);
        assert_eq!(relays(&core.take_outputs()), 1);
        core.on_driver_msg(log("ghost"), body(), t0);
        let outs = core.take_outputs();
        assert_eq!(relays(&outs), 0);
        assert_eq!(
            notices(&outs),
            [(ErrorCode::NotFound, Some("ghost".into()))]
        );
    }

    /// `task_done` for a task the driver was not given (queued, or unknown) is `not_found`, a
    /// second one `invalid_state`; neither is relayed, and neither ends anything.
    #[test]
    fn stray_and_second_task_dones_are_refused() {
        let t0 = Instant::now();
        let mut core = new_core(&cfg(), t0);
        up(&mut core, t0);
        command(&mut core, submit(1, "A", false), t0);
        command(&mut core, submit(2, "B", false), t0);
        core.take_outputs();
        let done = |task: &str| {
            DriverToShim::TaskDone(driver_protocol::message::TaskDone {
                task_id: task.into(),
                status: driver_protocol::message::TaskStatus::Succeeded,
                output: None,
                error: None,
            })
        };
        for (task, code) in [("B", ErrorCode::NotFound), ("ghost", ErrorCode::NotFound)] {
            core.on_driver_msg(done(task), body(), t0);
            let outs = core.take_outputs();
            assert_eq!(relays(&outs), 0, "{outs:?}");
            assert_eq!(notices(&outs), [(code, Some(task.to_owned()))]);
        }
        assert_eq!(core.tasks.running(), Some("A"));
        core.on_driver_msg(done("A"), body(), t0);
        let outs = core.take_outputs();
        assert_eq!(relays(&outs), 1);
        assert!(notices(&outs).is_empty());
        assert_eq!(core.tasks.running(), Some("B"));
        core.on_driver_msg(done("A"), body(), t0);
        let outs = core.take_outputs();
        assert_eq!(relays(&outs), 0);
        assert_eq!(
            notices(&outs),
            [(ErrorCode::InvalidState, Some("A".into()))]
        );
        assert_eq!(core.tasks.running(), Some("B"), "B runs on");
    }

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
        core.on_timer(t0 + c.opts.ready_timeout);
        assert!(kills(&core).contains(&(-PID, libc::SIGKILL)));
        core.on_driver_exit(PID, ExitStatus::Signaled(9), t0 + c.opts.ready_timeout);
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
