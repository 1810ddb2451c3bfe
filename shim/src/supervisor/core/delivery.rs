//! Tasks as the core sees them: accepting `submit_task`, delivering one task at a time once
//! the driver is ready, relaying its `task_done`, and cancelling (dequeue, or forward a
//! `cancel` and kill the driver when its grace expires).
//!
//! The queue itself (order, idempotency, redelivery) is [`TaskQueue`](super::TaskQueue); this
//! module decides *when* it is consulted.

use std::time::{Duration, Instant};

use bytes::Bytes;
use driver_protocol::message::{Cancel, CancelTask, DriverState, SubmitTask, TaskAccepted};
use driver_protocol::message::{ErrorMsg, ShimToControl};
use driver_protocol::ErrorCode;
use tracing::{info, warn};

use super::super::tasks::{CancelOutcome, SubmitOutcome};
use super::{err, ok, Cancelling, Core, ExitReason, Output};

impl Core {
    /// Sends the next queued task if the driver can take it.
    pub(super) fn start_next(&mut self) {
        if self.lifecycle.state() != DriverState::Ready
            || self
                .driver
                .as_ref()
                .is_none_or(|d| d.kill_reason.is_some() || d.gone())
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

    /// The driver's `task_done` (its MessagePack `body` is relayed as is).
    pub(super) fn on_task_done(&mut self, task_id: &str, body: Bytes) {
        if self.tasks.running() == Some(task_id)
            && !self.relayable("task_done", Some(task_id.as_bytes()), body.len())
        {
            // Too large to relay: the task runs on, for a task_done that fits.
            return;
        }
        if self.tasks.finish(task_id) {
            if self
                .cancelling
                .as_ref()
                .is_some_and(|c| c.task_id == task_id)
            {
                self.cancelling = None;
            }
            self.out.push(Output::Relay(body));
            self.start_next();
        } else {
            // Not relayed; the driver is told (a second task_done, or a task it was not given).
            let (code, message) = if self.tasks.is_finished(task_id) {
                (
                    ErrorCode::InvalidState,
                    format!("task {task_id:?} has ended already: a second task_done is dropped"),
                )
            } else {
                (
                    ErrorCode::NotFound,
                    format!("task_done dropped: task {task_id:?} is not running on this driver"),
                )
            };
            warn!(task_id, %code, "task_done for a task not running: dropped");
            self.send(ErrorMsg {
                re: None,
                code,
                message,
                task_id: Some(task_id.to_owned()),
                first_available: None,
            });
        }
    }

    /// `submit_task`: queue it (idempotently) and deliver it if the driver is free.
    pub(super) fn submit_task(&mut self, s: SubmitTask, now: Instant) -> ShimToControl {
        let re = s.id;
        if self.stopping.is_some() {
            return err(re, ErrorCode::ShuttingDown, "the shim is shutting down");
        }
        // The shim decided to exit and only waits for its execs: every task has had its
        // task_done already, and a task accepted now would never get one.
        if self.exit_pending.is_some() || self.exit_code.is_some() {
            return err(re, ErrorCode::ShuttingDown, "the shim is exiting");
        }
        if self.reading_paused.is_some() {
            // The event buffer is full: its task_accepted would overshoot the bound.
            return err(
                re,
                ErrorCode::Limit,
                "the event buffer is full (the control plane is not acknowledging)",
            );
        }
        if s.max_attempts == Some(0) {
            return err(re, ErrorCode::Invalid, "max_attempts must be at least 1");
        }
        let task_id = s.task_id.clone();
        match self.tasks.submit(s) {
            SubmitOutcome::Accepted { position } => {
                self.activity(now);
                self.event(TaskAccepted { task_id, position });
                self.start_next();
                ok(re)
            }
            SubmitOutcome::Duplicate => ShimToControl::Ok(driver_protocol::message::OkReply {
                re,
                duplicate: Some(true),
            }),
            SubmitOutcome::Full => err(
                re,
                ErrorCode::Limit,
                &format!("task queue full ({} tasks)", self.cfg.opts.task_queue),
            ),
        }
    }

    /// `cancel_task`: drop a queued task, or ask the driver to stop the running one.
    pub(super) fn cancel_task(&mut self, c: CancelTask, now: Instant) -> ShimToControl {
        match self.tasks.cancel(&c.task_id) {
            CancelOutcome::Dequeued(done) => {
                self.event(done);
                ok(c.id)
            }
            CancelOutcome::Running => {
                if self.cancelling.is_none() {
                    let grace = c
                        .grace_ms
                        .map_or(self.cfg.opts.cancel_grace, Duration::from_millis);
                    // The task's tool processes die after the same grace.
                    self.cancel_task_execs(&c.task_id, grace, now);
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
        }
    }

    /// The cancel grace expired: kill the driver, the task ends `cancelled`.
    pub(super) fn cancel_timer(&mut self, now: Instant) {
        if self.cancelling.as_ref().is_some_and(|c| c.deadline <= now) {
            self.cancelling = None;
            self.kill_driver(ExitReason::CancelTimeout);
            if let Some(done) = self.tasks.abandon_running("cancel grace expired") {
                self.event(done);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use driver_protocol::message::{
        Cancel, ControlToShim, DriverToShim, Event, ShimToDriver, TaskDone, TaskStatus,
    };
    use driver_protocol::ErrorCode;

    use super::super::testkit::*;
    use super::super::Output;
    use crate::reaper::ExitStatus;

    #[test]
    fn cancel_grace_expiry_kills_and_reports_cancelled() {
        let t0 = Instant::now();
        let c = cfg();
        let mut core = new_core(&c, t0);
        up(&mut core, t0);
        command(&mut core, submit(1, "t1", false), t0);
        core.take_outputs();
        let r = command(
            &mut core,
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
        assert!(kills(&core).is_empty());
        core.on_timer(t0 + Duration::from_millis(500));
        assert_eq!(kills(&core), vec![(-PID, libc::SIGKILL)]);
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
        // ... not relayed; the driver is told the task has ended already.
        let outs = core.take_outputs();
        assert!(
            matches!(
                &outs[..],
                [Output::ToDriver(m)] if matches!(&**m, ShimToDriver::Error(e)
                    if e.code == ErrorCode::InvalidState && e.task_id.as_deref() == Some("t1"))
            ),
            "{outs:?}"
        );
        // Our own SIGKILL: the shell found no rise of the OOM-kill counter.
        core.on_driver_exit_oom(PID, ExitStatus::Signaled(9), Some(false));
        core.on_driver_link_closed(t0);
        let outs = core.take_outputs();
        assert_eq!(exited(&outs)[0].reason, "cancel_timeout");
        assert_eq!(exited(&outs)[0].oom_killed, Some(false));
        assert!(task_dones(&outs).is_empty());
    }

    #[test]
    fn cancel_of_a_queued_and_of_an_unknown_task() {
        let t0 = Instant::now();
        let c = cfg();
        let mut core = new_core(&c, t0);
        command(&mut core, submit(1, "q", false), t0);
        core.take_outputs();
        let cancel = |id, t: &str| {
            ControlToShim::CancelTask(driver_protocol::message::CancelTask {
                id,
                task_id: t.into(),
                grace_ms: None,
            })
        };
        assert!(is_ok(&command(&mut core, cancel(2, "q"), t0), 2));
        assert_eq!(
            task_dones(&core.take_outputs())[0].status,
            TaskStatus::Cancelled
        );
        assert_eq!(
            err_code(&command(&mut core, cancel(3, "nope"), t0)),
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
        let r = command(&mut core, submit(1, "t1", false), t0);
        assert!(is_ok(&r, 1));
        let outs = core.take_outputs();
        assert!(events(&outs)
            .iter()
            .any(|e| matches!(e, Event::TaskAccepted(a) if a.task_id == "t1")));
        assert!(to_driver(&outs).is_empty(), "not before ready");
        // A retry is acknowledged and changes nothing.
        assert!(is_ok(&command(&mut core, submit(2, "t1", false), t0), 2));
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
        command(&mut core, submit(3, "t2", false), t0);
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
        command(&mut core, submit(1, "r", true), t0);
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
        command(&mut core, submit(2, "f", false), t1);
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
}
