//! Start and handshake, restarts with backoff, its reset, crash loops, hung drivers, and the
//! driver's output.

use std::time::Duration;

use anyhow::{ensure, Result};
use driver_protocol::message::{
    DriverState, Event, LogStream, RestartDriver, ShimToControl, TaskStatus,
};

use super::{crash, kinds, Driver, Setup, Sup, QUIET};
use crate::support::{in_both_modes, poll_until, Mode, PATIENCE};

/// Test 1: the start's events in order, a string task's events with seqs 1, 2, 3…, status.
pub(super) fn handshake_and_task(mode: Mode, driver: Driver) -> Result<()> {
    let mut sup = Setup::new(mode).driver(driver).start()?;
    // The client checks that seqs start at 1 and grow by exactly 1.
    let (ready, before) = sup.wait("driver_ready", |e| matches!(e, Event::DriverReady(_)))?;
    let Event::DriverReady(ready) = ready.event else {
        unreachable!()
    };
    // Without the log lines: driver_started, (state_changed to starting,) state_changed
    // starting → ready, then driver_ready.
    let life: Vec<_> = before
        .iter()
        .filter(|s| !matches!(s.event, Event::Log(_)))
        .collect();
    let started = life
        .iter()
        .position(
            |s| matches!(&s.event, Event::DriverStarted(d) if d.attempt == 1 && d.pid == ready.pid),
        )
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no driver_started{{attempt 1, pid {}}} before driver_ready: {:?}\n{}",
                ready.pid,
                kinds(&before),
                sup.context()
            )
        })?;
    let to_ready = life
        .iter()
        .position(|s| {
            matches!(&s.event, Event::StateChanged(c)
                if c.from == DriverState::Starting && c.to == DriverState::Ready)
        })
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no state_changed starting → ready before driver_ready: {:?}\n{}",
                kinds(&before),
                sup.context()
            )
        })?;
    ensure!(
        started < to_ready && to_ready == life.len() - 1,
        "order of the start's events: {:?}\n{}",
        kinds(&before),
        sup.context()
    );
    ensure!(ready.startup_ms < PATIENCE.as_millis() as u64, "{ready:?}");

    let status = sup.status()?;
    super::check_status_ready(&status, ready.pid)?;
    ensure!(status.restarts == 0, "{status:?}");
    ensure!(
        status.tasks_queued == 0 && status.task_running.is_none(),
        "{status:?}"
    );
    ensure!(status.last_seq >= sup.ctl.last_seq(), "{status:?}");

    sup.submit("t1", "hello brave world".into())?;
    let (done, _, events) = sup.expect_done("t1")?;
    ensure!(
        done.status == TaskStatus::Succeeded,
        "{done:?}\n{}",
        sup.context()
    );
    ensure!(done.output == Some("hello brave world".into()), "{done:?}");
    let accepted = events
        .iter()
        .filter(
            |s| matches!(&s.event, Event::TaskAccepted(a) if a.task_id == "t1" && a.position == 0),
        )
        .count();
    ensure!(accepted == 1, "task_accepted: {:?}", kinds(&events));
    let words: Vec<String> = events
        .iter()
        .filter_map(|s| match &s.event {
            Event::MessageChunk(c) if c.task_id.as_deref() == Some("t1") => Some(c.text.clone()),
            _ => None,
        })
        .collect();
    ensure!(
        words == ["hello", "brave", "world"],
        "chunks {words:?}: {:?}",
        kinds(&events)
    );
    let progress = events
        .iter()
        .filter(|s| {
            matches!(&s.event, Event::Progress(p)
                if p.task_id.as_deref() == Some("t1") && p.total == Some(3))
        })
        .count();
    ensure!(progress == 3, "progress events: {:?}", kinds(&events));
    // The accepted comes first among the task's events.
    let first_task_event = events
        .iter()
        .position(|s| matches!(s.event, Event::TaskAccepted(_)))
        .unwrap_or(usize::MAX);
    let first_chunk = events
        .iter()
        .position(|s| matches!(s.event, Event::MessageChunk(_)))
        .unwrap_or(0);
    ensure!(
        first_task_event < first_chunk,
        "task_accepted after a chunk: {:?}",
        kinds(&events)
    );

    let last = sup.ctl.last_seq();
    sup.ctl.ack(last)?;
    let status = sup.status()?;
    super::check_status_ready(&status, ready.pid)?;
    ensure!(
        status.tasks_queued == 0 && status.task_running.is_none(),
        "{status:?}"
    );
    ensure!(status.last_seq >= last, "{status:?} after seq {last}");
    ensure!(
        status.buffered_events <= status.last_seq - last,
        "acked up to {last}, yet {status:?}"
    );
    ensure!(status.uptime_ms > 0, "{status:?}");
    Ok(())
}

/// Crashes the ready driver with a task; the `driver_exited` and the delay from it to the
/// next `driver_started` (as the client saw them), checking the events between.
pub(super) fn crash_once(
    sup: &mut Sup,
    task_id: &str,
    attempt: u32,
    want_delay: Duration,
) -> Result<Duration> {
    sup.submit(task_id, crash(3))?;
    let (exited, exited_at, mut seen) = sup.expect_exited()?;
    ensure!(
        exited.code == Some(3) && exited.signal.is_none() && exited.reason == "crashed",
        "{exited:?}\n{}",
        sup.context()
    );
    let (restarting, skipped) = sup.wait("driver_restarting", |e| {
        matches!(e, Event::DriverRestarting(_))
    })?;
    seen.extend(skipped);
    let Event::DriverRestarting(restarting) = restarting.event else {
        unreachable!()
    };
    ensure!(
        restarting.attempt == attempt && restarting.delay_ms == want_delay.as_millis() as u64,
        "{restarting:?}, want attempt {attempt} after {want_delay:?}\n{}",
        sup.context()
    );
    let (pid, started_at, skipped) = sup.expect_started(attempt)?;
    seen.extend(skipped);
    let failed = seen.iter().any(|s| {
        matches!(&s.event, Event::TaskDone(d)
            if d.task_id == task_id && d.status == TaskStatus::Failed
                && d.error.as_deref().is_some_and(|e| e.starts_with("driver crashed")))
    });
    ensure!(
        failed,
        "no task_done{{failed, driver crashed…}} for {task_id} before the restart: {:?}\n{}",
        kinds(&seen),
        sup.context()
    );
    sup.expect_ready(pid)?;
    Ok(started_at.duration_since(exited_at))
}

/// How much earlier than the real gap two events may be observed by the client.
const DELIVERY_SKEW: Duration = Duration::from_millis(50);

/// Test 2: three crashes in a row ⇒ restarts after 100, 200, 400 ms.
pub(super) fn crash_backoff(mode: Mode, driver: Driver) -> Result<()> {
    let mut sup = Setup::new(mode).driver(driver).start()?;
    sup.expect_up(1)?;
    let mut delays = Vec::new();
    for (i, want) in [100u64, 200, 400].into_iter().enumerate() {
        let want = Duration::from_millis(want);
        let got = crash_once(&mut sup, &format!("c{i}"), i as u32 + 2, want)?;
        delays.push(got);
        // `got` is measured between two event arrivals at this client, so delivery skew can
        // shave a few milliseconds off the real gap; the exact configured delay is asserted on
        // the shim's own `driver_restarting.delay_ms` in `crash_once`.
        ensure!(
            got + DELIVERY_SKEW >= want && got < want + Duration::from_millis(1500),
            "restart {} came after {got:?}, configured {want:?}\n{}",
            i + 1,
            sup.context()
        );
    }
    eprintln!(
        "MEASURED ({mode:?}, {driver:?}): restart delays {delays:?} \
         (configured 100ms, 200ms, 400ms)"
    );
    ensure!(
        delays[0] < delays[1] && delays[1] < delays[2],
        "delays do not grow: {delays:?}"
    );
    let status = sup.status()?;
    ensure!(status.restarts == 3, "{status:?}");
    ensure!(
        status.last_exit.as_ref().is_some_and(|e| e.code == Some(3)),
        "{status:?}"
    );
    Ok(())
}

in_both_modes! {
    fn handshake_events_and_a_task(mode: Mode) -> Result<()> {
        handshake_and_task(mode, Driver::Rust)
    }

    fn crash_restarts_with_growing_backoff(mode: Mode) -> Result<()> {
        crash_backoff(mode, Driver::Rust)
    }

    fn stable_run_resets_the_backoff(mode: Mode) -> Result<()> {
        let mut sup = Setup::new(mode).flag("--backoff-reset", "500ms").start()?;
        sup.expect_up(1)?;
        let ms = Duration::from_millis;
        let d1 = crash_once(&mut sup, "c1", 2, ms(100))?;
        // Crashes again at once: the run was short, the delay doubles.
        let d2 = crash_once(&mut sup, "c2", 3, ms(200))?;
        // Stays up longer than the reset time: back to the initial delay.
        std::thread::sleep(ms(800));
        let d3 = crash_once(&mut sup, "c3", 4, ms(100))?;
        eprintln!("MEASURED ({mode:?}): delays {d1:?}, {d2:?}, then after a stable run {d3:?}");
        let skew = DELIVERY_SKEW;
        ensure!(
            d1 + skew >= ms(100) && d2 + skew >= ms(200) && d3 + skew >= ms(100),
            "{d1:?} {d2:?} {d3:?}"
        );
        Ok(())
    }

    fn crash_loop_stops_restarts_until_restart_driver(mode: Mode) -> Result<()> {
        let mut sup = Setup::new(mode)
            .flag("--crash-loop-restarts", "3")
            .flag("--crash-loop-window", "30s")
            .start()?;
        let mut pid = sup.expect_up(1)?;
        let mut crashes = 0;
        let crash_loop = loop {
            ensure!(crashes < 5, "no crash_loop after {crashes} crashes\n{}", sup.context());
            crashes += 1;
            sup.submit(&format!("c{crashes}"), crash(3))?;
            let (exited, _, _) = sup.expect_exited()?;
            ensure!(exited.pid == pid && exited.reason == "crashed", "{exited:?}");
            let (next, _) = sup.wait("driver_started or crash_loop", |e| {
                matches!(e, Event::DriverStarted(_) | Event::CrashLoop(_))
            })?;
            match next.event {
                Event::CrashLoop(c) => break c,
                Event::DriverStarted(s) => {
                    pid = s.pid;
                    sup.expect_ready(pid)?;
                }
                _ => unreachable!(),
            }
        };
        eprintln!("MEASURED ({mode:?}): crash_loop after {crashes} crashes: {crash_loop:?}");
        ensure!(
            crash_loop.restarts == 3 && crash_loop.window_ms == 30_000,
            "{crash_loop:?}"
        );
        ensure!(crashes <= 4, "crash_loop only after {crashes} crashes");
        let status = sup.status()?;
        ensure!(
            status.state == DriverState::Error && status.driver_pid.is_none(),
            "{status:?}"
        );
        // No further start for a while.
        let quiet = sup.ctl.events_for(QUIET * 2)?;
        ensure!(
            !quiet.iter().any(|s| matches!(s.event, Event::DriverStarted(_))),
            "started again in state error: {:?}",
            kinds(&quiet)
        );
        ensure!(sup.status()?.state == DriverState::Error, "left state error");
        // restart_driver recovers.
        let id = sup.ctl.id();
        let reply = sup.ctl.request(id, RestartDriver { id })?;
        ensure!(matches!(reply, ShimToControl::Ok(_)), "restart_driver answered {reply:?}");
        let (s, _) = sup.wait("driver_started", |e| matches!(e, Event::DriverStarted(_)))?;
        let Event::DriverStarted(started) = s.event else { unreachable!() };
        sup.expect_ready(started.pid)?;
        sup.submit("after", "still here".into())?;
        let (done, _, _) = sup.expect_done("after")?;
        ensure!(done.status == TaskStatus::Succeeded, "{done:?}");
        ensure!(sup.status()?.state == DriverState::Ready, "not ready after restart_driver");
        Ok(())
    }

    fn hung_driver_is_killed_and_restarted(mode: Mode) -> Result<()> {
        let mut sup = Setup::new(mode).start()?;
        let pid = sup.expect_up(1)?;
        let host = sup.host_pid(pid)?;
        let started = std::time::Instant::now();
        sup.submit("h", crate::drivers::input([("hang", true.into())]))?;
        let (exited, at, seen) = sup.expect_exited()?;
        eprintln!(
            "MEASURED ({mode:?}): hung driver killed {:?} after the task (ping 200ms × 3)",
            at.duration_since(started)
        );
        ensure!(
            exited.pid == pid && exited.reason == "hung" && exited.code.is_none(),
            "{exited:?}\n{}",
            sup.context()
        );
        ensure!(
            exited.signal.as_deref().is_some_and(|s| s.contains("KILL")),
            "{exited:?}"
        );
        ensure!(
            at.duration_since(started) >= Duration::from_millis(400),
            "killed as hung after only {:?}",
            at.duration_since(started)
        );
        let (done, _) = sup.done_and_up("h", &seen, 2)?;
        ensure!(
            done.status == TaskStatus::Failed
                && done.error.as_deref().is_some_and(|e| e.starts_with("driver hung")),
            "{done:?}"
        );
        ensure!(
            poll_until(PATIENCE, || (!crate::support::process::PidFd::open(host)
                .map(|p| p.alive())
                .unwrap_or(false))
            .then_some(()))
            .is_some(),
            "the hung driver (host pid {host}) is still alive"
        );
        Ok(())
    }

    fn driver_output_goes_to_stderr_and_log_events(mode: Mode) -> Result<()> {
        let mut sup = Setup::new(mode).start()?;
        let (pid, _, _) = sup.expect_started(1)?;
        // Both streams' lines, in either order.
        let log = |stream: LogStream| {
            move |e: &Event| {
                matches!(e, Event::Log(l)
                    if l.stream == stream && l.text == "echo-driver: started" && !l.truncated)
            }
        };
        sup.wait_all(
            "log events of both streams",
            &[&log(LogStream::Stdout), &log(LogStream::Stderr)],
        )?;
        let want = format!("driver[{pid}] stdout: echo-driver: started");
        let want_err = format!("driver[{pid}] stderr: echo-driver: started");
        let found = poll_until(PATIENCE, || {
            let err = sup.shim.stderr();
            (err.contains(&want) && err.contains(&want_err)).then_some(())
        });
        ensure!(
            found.is_some(),
            "no {want:?} and {want_err:?} on the shim's stderr\n{}",
            sup.context()
        );
        Ok(())
    }
}
