//! Idle detection (`--idle-after`) and the pause-with-the-container sequence, end to end.
//!
//! The container freezer is simulated by SIGSTOP of the shim and its driver (what the cgroup
//! freezer does to every process of the sandbox, as far as they can tell), SIGCONT to thaw.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Result};
use driver_protocol::message::{
    DriverState, Event, Exec, LogStream, Pause, Resume, ShimToControl, Status, TaskStatus,
};

use super::{input, kinds, state_to, Setup, Sup, QUIET};
use crate::support::control::Stamped;
use crate::support::process::PidFd;
use crate::support::{in_both_modes, Mode, PATIENCE};

/// The idle threshold of these tests: short, so they run fast; the assertions allow noise.
const IDLE_AFTER: Duration = Duration::from_millis(400);

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn is_idle(e: &Event) -> bool {
    matches!(e, Event::Idle(_))
}

fn is_busy(e: &Event) -> bool {
    matches!(e, Event::Busy(_))
}

fn idle_setup(mode: Mode) -> Setup {
    Setup::new(mode)
        .flag("--idle-after", "400ms")
        // Pings are liveness, not activity; they stay on to prove it.
        .flag("--ping-interval", "100ms")
}

/// Waits for `idle`; its `idle_since_ms`.
fn expect_idle(sup: &mut Sup) -> Result<(u64, Stamped, Vec<Stamped>)> {
    let (s, skipped) = sup.wait("idle", is_idle)?;
    let Event::Idle(i) = &s.event else {
        unreachable!()
    };
    Ok((i.idle_since_ms, s.clone(), skipped))
}

in_both_modes! {
    fn idle_fires_once_after_the_threshold_and_busy_on_new_work(mode: Mode) -> Result<()> {
        let started_wall = wall_ms();
        let mut sup = idle_setup(mode).start()?;
        sup.expect_up(1)?;
        let (since, _, skipped) = expect_idle(&mut sup)?;
        ensure!(!skipped.iter().any(|s| is_busy(&s.event)), "{:?}", kinds(&skipped));
        let now = wall_ms();
        ensure!(
            since + 200 >= started_wall && since <= now,
            "idle_since_ms {since} outside [{started_wall}, {now}]"
        );
        let status = sup.status()?;
        ensure!(status.idle_since_ms == Some(since), "{status:?}");
        // Once: nothing more while nothing happens (pings run every 100 ms meanwhile).
        let more = sup.ctl.events_for(QUIET)?;
        ensure!(
            !more.iter().any(|s| is_idle(&s.event) || is_busy(&s.event)),
            "{:?}",
            kinds(&more)
        );

        // A task: busy, before its task_accepted.
        sup.submit("t1", "one two".into())?;
        let (_, seen) = sup.wait("task_done t1", |e| matches!(e, Event::TaskDone(d) if d.task_id == "t1"))?;
        let order: Vec<&str> = seen
            .iter()
            .filter_map(|s| match &s.event {
                Event::Busy(_) => Some("busy"),
                Event::TaskAccepted(_) => Some("task_accepted"),
                _ => None,
            })
            .collect();
        ensure!(order == ["busy", "task_accepted"], "{:?}", kinds(&seen));
        let status = sup.status()?;
        ensure!(status.idle_since_ms.is_none(), "{status:?}");
        // Idle again a threshold after the task ended, not before.
        let done_at = Instant::now();
        let (since2, at, _) = expect_idle(&mut sup)?;
        let waited = at.at.duration_since(done_at);
        eprintln!("MEASURED ({mode:?}): idle again {waited:?} after task_done (threshold 400 ms)");
        ensure!(since2 > since, "{since2} <= {since}");
        ensure!(waited + Duration::from_millis(150) >= IDLE_AFTER, "idle after only {waited:?}");
        Ok(())
    }

    fn no_idle_during_a_slow_task_or_a_long_exec(mode: Mode) -> Result<()> {
        let mut sup = idle_setup(mode).start()?;
        sup.expect_up(1)?;
        expect_idle(&mut sup)?;

        // A task that sends nothing for 3 thresholds: still busy.
        sup.submit("slow", input([("text", "x".into()), ("delay_ms", 1200.into())]))?;
        let (_, seen) = sup.wait("task_done slow", |e| matches!(e, Event::TaskDone(d) if d.task_id == "slow"))?;
        let accepted = seen
            .iter()
            .position(|s| matches!(&s.event, Event::TaskAccepted(_)));
        ensure!(accepted.is_some(), "{:?}", kinds(&seen));
        ensure!(
            !seen.iter().any(|s| is_idle(&s.event)),
            "idle during a running task: {:?}",
            kinds(&seen)
        );
        expect_idle(&mut sup)?;

        // An exec of the control plane that runs 3 thresholds quietly: still busy.
        let started = sup.ctl.exec_started(|id| Exec::new(id, ["sleep", "1.2"]))?;
        let status = sup.status()?;
        ensure!(status.idle_since_ms.is_none() && status.execs_running == 1, "{status:?}");
        let (_, seen) = sup.wait_within(
            "exec_exit",
            |e| matches!(e, Event::ExecExit(x) if x.exec_id == started.exec_id),
            PATIENCE,
        )?;
        ensure!(seen.iter().any(|s| is_busy(&s.event)), "no busy for the exec: {:?}", kinds(&seen));
        ensure!(
            !seen.iter().any(|s| is_idle(&s.event)),
            "idle during a running exec: {:?}",
            kinds(&seen)
        );
        expect_idle(&mut sup)?;
        Ok(())
    }

    // The sequence a platform runs to pause an idle agent with its container (see
    // PROTOCOL.md §8.6): `pause` → the driver reaches its safe point → event `paused` →
    // freeze (here SIGSTOP of the shim and its driver) → thaw (SIGCONT) → `resume` → the
    // driver is told how long it slept → state `ready` → new work runs.
    fn pause_with_the_container(mode: Mode) -> Result<()> {
        let mut sup = idle_setup(mode).start()?;
        let pid = sup.expect_up(1)?;
        expect_idle(&mut sup)?;
        let driver = PidFd::open(sup.host_pid(pid)?)?;

        let id = sup.ctl.id();
        let reply = sup.ctl.request(id, Pause { id, timeout_ms: None })?;
        ensure!(matches!(reply, ShimToControl::Ok(_)), "pause answered {reply:?}");
        sup.wait("paused", |e| matches!(e, Event::Paused(p) if p.re == Some(id)))?;
        let status = sup.status()?;
        ensure!(status.state == DriverState::Paused, "{status:?}");
        ensure!(status.idle_since_ms.is_some(), "pausing made it busy: {status:?}");

        // Freeze: every process of the sandbox stops.
        let frozen_at = Instant::now();
        sup.shim.signal(libc::SIGSTOP)?;
        ensure!(driver.signal(libc::SIGSTOP)?, "the driver is gone");
        // Frozen, the shim answers nothing.
        let probe = sup.ctl.id();
        sup.ctl.send(Status { id: probe })?;
        let early = sup.ctl.reply_to(probe, Duration::from_millis(500));
        ensure!(early.is_err(), "a frozen shim answered status: {early:?}");
        std::thread::sleep(Duration::from_millis(500));
        // Thaw: the shim answers what was asked meanwhile.
        ensure!(driver.signal(libc::SIGCONT)?, "the driver is gone");
        sup.shim.signal(libc::SIGCONT)?;
        let frozen = frozen_at.elapsed();
        let late = sup.ctl.reply_to(probe, PATIENCE)?;
        ensure!(
            matches!(&late, ShimToControl::StatusReply(s) if s.state == DriverState::Paused),
            "{late:?}"
        );

        let id = sup.ctl.id();
        let reply = sup.ctl.request(id, Resume { id, slept_ms: None, unix_ms: None })?;
        ensure!(matches!(reply, ShimToControl::Ok(_)), "resume answered {reply:?}");
        let (_, seen) = sup.wait("state ready", |e| state_to(e, DriverState::Ready))?;
        // The echo driver logs the slept_ms it was given.
        let slept = seen.iter().chain(sup.ctl.take_pending().iter()).find_map(|s| match &s.event {
            Event::Log(l) if l.stream == LogStream::Driver => l
                .text
                .strip_prefix("resumed after ")
                .and_then(|t| t.strip_suffix(" ms"))
                .and_then(|n| n.parse::<u64>().ok()),
            _ => None,
        });
        let slept = match slept {
            Some(s) => s,
            None => {
                let (s, _) = sup.wait("the driver's resumed log", |e| {
                    matches!(e, Event::Log(l) if l.text.starts_with("resumed after "))
                })?;
                let Event::Log(l) = s.event else { unreachable!() };
                l.text
                    .trim_start_matches("resumed after ")
                    .trim_end_matches(" ms")
                    .parse()?
            }
        };
        eprintln!("MEASURED ({mode:?}): frozen {frozen:?}, driver told slept_ms {slept}");
        ensure!(
            Duration::from_millis(slept) + Duration::from_millis(50) >= frozen,
            "slept_ms {slept} < frozen {frozen:?}"
        );
        // Work after the thaw runs as before.
        sup.submit("after", "thawed".into())?;
        let (done, _, _) = sup.expect_done("after")?;
        ensure!(done.status == TaskStatus::Succeeded, "{done:?}");
        Ok(())
    }
}
