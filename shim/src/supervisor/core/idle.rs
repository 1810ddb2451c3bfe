//! Idle detection (`--idle-after`): the facts a platform needs to pause an agent that has
//! nothing to do, and to know when it has work again.
//!
//! The agent is **busy** while a task is queued or running or an exec runs; each of these
//! is *work*. When the last work ends, or the driver sends an *activity* message (an event it
//! relays, a `task_done`, an exec request or exec message), the quiet stretch starts again
//! from that moment. A quiet stretch of `--idle-after` makes the agent **idle**: one `idle`
//! event, whose `idle_since_ms` is the wall-clock start of the stretch. Work or activity after
//! that makes it busy again: one `busy` event, before the event of what arrived (the
//! `task_accepted` of a submit, say). Liveness and lifecycle traffic (`ping`, `pong`,
//! `ready`, `paused`, replies) and the driver's stdout/stderr lines are not activity: a
//! driver that only answers pings, or a paused agent, stays idle. The driver's lifecycle
//! state does not matter either: idle is about work, not health.
//!
//! The shell calls [`Core::idle_tick`] once per turn of its loop, after every input: that is
//! where the end of work is noticed, whatever ended it (a `task_done`, a driver crash, a
//! cancel, an exec's exit).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use driver_protocol::message::{Busy, Idle};
use tracing::info;

use super::Core;

/// The idle tracker, present when `--idle-after` is set.
#[derive(Debug)]
pub(super) struct IdleTracker {
    after: Duration,
    /// The start of the current quiet stretch; `None` while there is work.
    quiet_since: Option<Instant>,
    /// The `idle` event was sent (and no `busy` since): its `idle_since_ms`.
    idle_since_ms: Option<u64>,
}

impl IdleTracker {
    /// A tracker whose first quiet stretch starts at `now` (the shim's start).
    pub(super) fn new(after: Duration, now: Instant) -> Self {
        IdleTracker {
            after,
            quiet_since: Some(now),
            idle_since_ms: None,
        }
    }
}

impl Core {
    /// Whether a task is queued or running or an exec runs.
    fn has_work(&self) -> bool {
        self.tasks.queued() > 0 || self.tasks.running().is_some() || !self.execs.is_empty()
    }

    /// Work arrived or the driver showed activity at `now`: the quiet stretch starts again,
    /// and an idle agent becomes busy (a `busy` event, before the event of what arrived).
    pub(super) fn activity(&mut self, now: Instant) {
        let Some(t) = self.idle.as_mut() else {
            return;
        };
        t.quiet_since = Some(now);
        if t.idle_since_ms.take().is_some() {
            info!("agent busy");
            self.event(Busy {});
        }
    }

    /// Notices the start and the end of work; called by the shell after every input.
    pub fn idle_tick(&mut self, now: Instant) {
        let work = self.has_work();
        let Some(t) = self.idle.as_mut() else {
            return;
        };
        if work {
            t.quiet_since = None;
            // Work that came in some other way than `activity` (none does today).
            if t.idle_since_ms.take().is_some() {
                info!("agent busy");
                self.event(Busy {});
            }
        } else if t.quiet_since.is_none() {
            t.quiet_since = Some(now);
        }
    }

    /// Whether idle detection is on (`--idle-after`).
    pub fn idle_enabled(&self) -> bool {
        self.idle.is_some()
    }

    /// When the agent crosses into idle, if it is quiet and not yet idle.
    pub(super) fn idle_deadline(&self) -> Option<Instant> {
        let t = self.idle.as_ref()?;
        if t.idle_since_ms.is_some() || self.stopping.is_some() || self.has_work() {
            return None;
        }
        t.quiet_since.and_then(|q| q.checked_add(t.after))
    }

    /// The quiet stretch reached `--idle-after`: one `idle` event.
    pub(super) fn idle_timer(&mut self, now: Instant) {
        if !super::due(self.idle_deadline(), now) {
            return;
        }
        let Some(t) = self.idle.as_mut() else {
            return;
        };
        let quiet = t
            .quiet_since
            .map(|q| now.saturating_duration_since(q))
            .unwrap_or_default();
        // The wall-clock start of the stretch: now, minus how long it has lasted.
        let since = SystemTime::now()
            .checked_sub(quiet)
            .and_then(|w| w.duration_since(UNIX_EPOCH).ok())
            .map_or(0, Self::ms);
        t.idle_since_ms = Some(since);
        info!(idle_since_ms = since, "agent idle");
        self.event(Idle {
            idle_since_ms: since,
        });
    }

    /// `status_reply.idle_since_ms`: set while the agent is idle.
    pub(super) fn idle_since_ms(&self) -> Option<u64> {
        self.idle.as_ref().and_then(|t| t.idle_since_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::super::Output;
    use super::*;
    use driver_protocol::message::{
        DriverToShim, Event, Exec, Message as _, MessageChunk, TaskDone, TaskStatus,
    };

    use crate::reaper::ExitStatus;

    const AFTER: Duration = Duration::from_secs(60);

    fn idle_cfg() -> crate::supervisor::core::Settings {
        let mut c = cfg();
        c.opts.idle_after = Some(AFTER);
        // No pings: their timers would only add turns.
        c.opts.ping_interval = Duration::ZERO;
        c
    }

    /// What the shell does: an input, then the tick; plus the timer when it is due.
    fn turn(core: &mut TestCore, now: Instant) -> Vec<Output> {
        core.idle_tick(now);
        if core.next_deadline().is_some_and(|d| d <= now) {
            core.on_timer(now);
            core.idle_tick(now);
        }
        core.take_outputs()
    }

    fn idles(outs: &[Output]) -> Vec<u64> {
        events(outs)
            .into_iter()
            .filter_map(|e| match e {
                Event::Idle(i) => Some(i.idle_since_ms),
                _ => None,
            })
            .collect()
    }

    fn busies(outs: &[Output]) -> usize {
        events(outs)
            .into_iter()
            .filter(|e| matches!(e, Event::Busy(_)))
            .count()
    }

    fn wall_ms() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }

    fn status_idle(core: &mut TestCore, now: Instant) -> Option<u64> {
        core.status(99, now, &super::super::Counters::default())
            .idle_since_ms
    }

    fn done(task_id: &str) -> DriverToShim {
        DriverToShim::TaskDone(TaskDone {
            task_id: task_id.into(),
            status: TaskStatus::Succeeded,
            output: None,
            error: None,
        })
    }

    #[test]
    fn off_by_default_never_idle() {
        let t0 = Instant::now();
        let c = cfg();
        let mut core = new_core(&c, t0);
        up(&mut core, t0);
        assert!(!core.idle_enabled());
        let later = t0 + Duration::from_secs(3600);
        let outs = turn(&mut core, later);
        assert!(idles(&outs).is_empty());
        assert_eq!(status_idle(&mut core, later), None);
    }

    #[test]
    fn idle_fires_once_after_the_threshold_and_busy_on_a_submit() {
        let t0 = Instant::now();
        let c = idle_cfg();
        let before = wall_ms();
        let mut core = new_core(&c, t0);
        up(&mut core, t0);
        assert_eq!(core.next_deadline(), Some(t0 + AFTER));
        assert!(idles(&turn(&mut core, t0 + AFTER - Duration::from_millis(1))).is_empty());
        assert_eq!(status_idle(&mut core, t0 + AFTER / 2), None);
        let outs = turn(&mut core, t0 + AFTER);
        let since = idles(&outs);
        assert_eq!(since.len(), 1, "{outs:?}");
        // The stretch started at t0, one threshold before the wall clock of the crossing.
        let after_ms = u64::try_from(AFTER.as_millis()).unwrap();
        assert!(since[0] + after_ms >= before && since[0] + after_ms <= wall_ms() + 1000);
        assert_eq!(status_idle(&mut core, t0 + AFTER), Some(since[0]));
        // Once only, however long it stays idle.
        assert_eq!(core.next_deadline(), None);
        assert!(idles(&turn(&mut core, t0 + AFTER * 10)).is_empty());

        // A submit: busy first, then task_accepted.
        let t1 = t0 + AFTER * 10;
        let r = command(&mut core, submit(1, "t1", false), t1);
        assert!(is_ok(&r, 1));
        let outs = turn(&mut core, t1);
        let kinds: Vec<&str> = events(&outs).iter().map(|e| e.type_name()).collect();
        assert_eq!(kinds, ["busy", "task_accepted"], "{outs:?}");
        assert_eq!(status_idle(&mut core, t1), None);
        // A slow task: never idle while it runs.
        assert_eq!(core.next_deadline(), None);
        let outs = turn(&mut core, t1 + AFTER * 5);
        assert!(idles(&outs).is_empty());
        // It ends: the quiet stretch starts then, not when it was submitted.
        let t2 = t1 + AFTER * 5;
        core.on_driver_msg(done("t1"), body(), t2);
        let outs = turn(&mut core, t2);
        assert!(idles(&outs).is_empty() && busies(&outs) == 0);
        assert_eq!(core.next_deadline(), Some(t2 + AFTER));
        assert!(idles(&turn(&mut core, t2 + AFTER - Duration::from_millis(1))).is_empty());
        assert_eq!(idles(&turn(&mut core, t2 + AFTER)).len(), 1);
    }

    #[test]
    fn not_idle_during_a_long_exec_and_busy_when_one_starts() {
        let t0 = Instant::now();
        let c = idle_cfg();
        let mut core = new_core(&c, t0);
        up(&mut core, t0);
        assert_eq!(idles(&turn(&mut core, t0 + AFTER)).len(), 1);
        let t1 = t0 + AFTER * 2;
        let req = Exec::new(1, ["sleep", "1000"]);
        let id = core
            .admit(super::super::ExecOwner::Control, &req, None)
            .unwrap();
        core.exec_started(id, super::super::ExecOwner::Control, 500, &req, t1);
        let outs = turn(&mut core, t1);
        assert_eq!(busies(&outs), 1, "{outs:?}");
        // Ten thresholds of exec: no idle.
        let outs = turn(&mut core, t1 + AFTER * 10);
        assert!(idles(&outs).is_empty(), "{outs:?}");
        // It exits and its output closes: quiet from then.
        let t2 = t1 + AFTER * 10;
        core.on_exec_exit(id, ExitStatus::Exited(0), t2);
        core.exec_io_closed(id, t2);
        turn(&mut core, t2);
        assert_eq!(core.execs_running(), 0);
        assert_eq!(core.next_deadline(), Some(t2 + AFTER));
        assert_eq!(idles(&turn(&mut core, t2 + AFTER)).len(), 1);
    }

    #[test]
    fn driver_events_are_activity_pings_are_not() {
        let t0 = Instant::now();
        let c = idle_cfg();
        let mut core = new_core(&c, t0);
        up(&mut core, t0);
        // A driver event half-way restarts the stretch.
        let t1 = t0 + AFTER / 2;
        core.on_driver_msg(
            DriverToShim::MessageChunk(MessageChunk {
                task_id: None,
                text: "thinking aloud".into(),
                role: None,
                is_final: false,
            }),
            body(),
            t1,
        );
        turn(&mut core, t1);
        assert!(idles(&turn(&mut core, t0 + AFTER)).is_empty());
        assert_eq!(core.next_deadline(), Some(t1 + AFTER));
        // Pings and pongs are liveness, not activity.
        let t2 = t1 + AFTER / 2;
        core.on_driver_msg(
            DriverToShim::Ping(driver_protocol::message::Ping { id: 5 }),
            body(),
            t2,
        );
        turn(&mut core, t2);
        assert_eq!(core.next_deadline(), Some(t1 + AFTER));
        assert_eq!(idles(&turn(&mut core, t1 + AFTER)).len(), 1);
        // An event from the driver while idle: busy (before the relayed event).
        let t3 = t1 + AFTER * 2;
        core.on_driver_msg(
            DriverToShim::MessageChunk(MessageChunk {
                task_id: None,
                text: "wake up".into(),
                role: None,
                is_final: false,
            }),
            body(),
            t3,
        );
        let outs = turn(&mut core, t3);
        assert!(
            matches!(outs.first(), Some(Output::Event(e)) if matches!(**e, Event::Busy(_))),
            "{outs:?}"
        );
        assert!(matches!(outs.get(1), Some(Output::Relay(_))), "{outs:?}");
    }

    #[test]
    fn a_refused_or_duplicate_submit_is_not_work() {
        let t0 = Instant::now();
        let c = idle_cfg();
        let mut core = new_core(&c, t0);
        up(&mut core, t0);
        command(&mut core, submit(1, "t1", false), t0);
        core.on_driver_msg(done("t1"), body(), t0);
        turn(&mut core, t0);
        assert_eq!(idles(&turn(&mut core, t0 + AFTER)).len(), 1);
        // The same task id again: already done, nothing queued, still idle.
        let t1 = t0 + AFTER * 2;
        let r = command(&mut core, submit(2, "t1", false), t1);
        assert!(is_ok(&r, 2));
        let outs = turn(&mut core, t1);
        assert_eq!(busies(&outs), 0, "{outs:?}");
        assert!(status_idle(&mut core, t1).is_some());
    }
}
