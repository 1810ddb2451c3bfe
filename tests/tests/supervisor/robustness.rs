//! Drivers that misbehave (garbage on the link, never reading it, hanging) cannot hurt the
//! shim; a reconnecting control client resumes exactly where it left off.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use driver_protocol::message::{DriverState, Event, Pause, ShimToControl, TaskStatus};
use driver_protocol::ErrorCode;

use super::{input, kinds, state_to, Setup};
use crate::support::control::ControlClient;
use crate::support::{in_both_modes, Mode, PATIENCE};

in_both_modes! {
    fn garbage_is_a_protocol_error_and_memory_stays_bounded(mode: Mode) -> Result<()> {
        let mut sup = Setup::new(mode).start()?;
        let mut pid = sup.expect_up(1)?;
        for round in 0..3u32 {
            let task = format!("g{round}");
            sup.submit(&task, input([("garbage", true.into()), ("text", "x".into())]))?;
            let (exited, _, seen) = sup.expect_exited()?;
            ensure!(
                exited.pid == pid && exited.reason == "protocol_error",
                "{exited:?}\n{}",
                sup.context()
            );
            let status = sup.status()?;
            ensure!(status.rss_bytes < 64 << 20, "rss {} after garbage", status.rss_bytes);
            let (done, next) = sup.done_and_up(&task, &seen, round + 2)?;
            ensure!(done.status == TaskStatus::Failed, "{done:?}");
            pid = next;
        }
        let status = sup.status()?;
        eprintln!(
            "MEASURED ({mode:?}): rss {} KiB after 3 drivers wrote a 4 GiB length prefix",
            status.rss_bytes >> 10
        );
        crate::supervisor::check_status_ready(&status, pid)?;
        ensure!(status.restarts == 3, "{status:?}");
        sup.submit("fine", "still fine".into())?;
        let (done, _, _) = sup.expect_done("fine")?;
        ensure!(done.status == TaskStatus::Succeeded, "{done:?}");
        Ok(())
    }

    fn driver_that_never_reads_cannot_block_the_shim(mode: Mode) -> Result<()> {
        // The FAST pings (200 ms × 3) would call it hung before the 1 s ready timeout; a
        // driver that has not finished its handshake must be judged by the ready timeout.
        never_reading_driver(mode, None)
    }

    fn driver_that_never_reads_without_pings(mode: Mode) -> Result<()> {
        never_reading_driver(mode, Some("0"))
    }

    fn hung_driver_cannot_block_control_requests(mode: Mode) -> Result<()> {
        // Liveness nearly off, so the hung driver stays; pause must time out.
        let mut sup = Setup::new(mode)
            .flag("--ping-interval", "100ms")
            .flag("--ping-misses", "100000")
            .flag("--pause-timeout", "500ms")
            .start()?;
        let pid = sup.expect_up(1)?;
        sup.submit("h", input([("hang", true.into())]))?;
        sup.status_until("task h running", |s| s.task_running.as_deref() == Some("h"))?;
        std::thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        let mut slowest = Duration::ZERO;
        for _ in 0..200 {
            let asked = Instant::now();
            let s = sup.ctl.status_within(Duration::from_secs(2))?;
            slowest = slowest.max(asked.elapsed());
            ensure!(s.driver_pid == Some(pid), "{s:?}");
        }
        let all = started.elapsed();
        eprintln!(
            "MEASURED ({mode:?}): 200 status requests with a hung driver took {all:?}, \
             slowest {slowest:?}"
        );
        ensure!(all < Duration::from_secs(10), "200 status requests took {all:?}");
        // A request that writes to the hung driver: accepted, then times out.
        let id = sup.ctl.id();
        let reply = sup.ctl.request(id, Pause { id, timeout_ms: None })?;
        ensure!(matches!(reply, ShimToControl::Ok(_)), "pause answered {reply:?}");
        let seen = sup.wait_all(
            "error{timeout} and state_changed back to ready",
            &[
                &|e| matches!(e, Event::Error(e) if e.code == ErrorCode::Timeout),
                &|e| matches!(e, Event::StateChanged(c)
                    if c.from == DriverState::Pausing && c.to == DriverState::Ready),
            ],
        )?;
        ensure!(
            seen.iter().any(|s| state_to(&s.event, DriverState::Pausing)),
            "no state_changed to pausing: {:?}",
            kinds(&seen)
        );
        let s = sup.ctl.status_within(Duration::from_secs(2))?;
        ensure!(s.state == DriverState::Ready && s.driver_pid == Some(pid), "{s:?}");
        Ok(())
    }

    fn reconnecting_client_gets_exactly_the_missing_events(mode: Mode) -> Result<()> {
        let mut sup = Setup::new(mode).start()?;
        sup.expect_up(1)?;
        // Processed so far: up to `cursor`.
        let cursor = sup.ctl.last_seq();
        sup.ctl.ack(cursor)?;
        // A second client replaces the first, which is closed.
        let mut second = ControlClient::connect(&sup.sock, PATIENCE)?;
        if let Err(e) = sup.ctl.until_closed(PATIENCE) {
            bail!("the old connection stayed open: {e:#}\n{}", sup.shim.context());
        }
        // Events happen while nobody has resumed: a task runs.
        let id = second.id();
        let reply = second.submit_with_id(id, "r", "one two".into())?;
        ensure!(matches!(reply, ShimToControl::Ok(_)), "{reply:?}");
        let deadline = Instant::now() + PATIENCE;
        let last = loop {
            let s = second.status()?;
            if s.task_running.is_none() && s.tasks_queued == 0 && s.last_seq > cursor {
                break s.last_seq;
            }
            ensure!(Instant::now() < deadline, "the task never finished: {s:?}");
            std::thread::sleep(Duration::from_millis(20));
        };
        // Let the stream settle, then read the final last_seq.
        std::thread::sleep(Duration::from_millis(300));
        let last = second.status()?.last_seq.max(last);
        second.resume_from(cursor)?;
        let mut got = Vec::new();
        while second.last_seq() < last {
            got.push(second.next_stamped(PATIENCE)?);
        }
        // The client checked seqs cursor+1, cursor+2, … with no gap or duplicate.
        ensure!(
            got.first().map(|s| s.seq) == Some(cursor + 1),
            "replay starts at {:?}, cursor {cursor}",
            got.first().map(|s| s.seq)
        );
        let done = got.iter().any(|s| {
            matches!(&s.event, Event::TaskDone(d)
                if d.task_id == "r" && d.status == TaskStatus::Succeeded)
        });
        ensure!(done, "the replay lacks the task's task_done: {:?}", kinds(&got));
        let accepted = got
            .iter()
            .filter(|s| matches!(&s.event, Event::TaskAccepted(a) if a.task_id == "r"))
            .count();
        ensure!(accepted == 1, "{:?}", kinds(&got));
        // A third client resuming from the middle gets the rest again, identical.
        second.ack(cursor + 1)?;
        let mid = cursor + 2;
        let mut third = ControlClient::connect(&sup.sock, PATIENCE)?;
        third.resume_from(mid)?;
        let mut again = Vec::new();
        while third.last_seq() < last {
            again.push(third.next_stamped(PATIENCE)?);
        }
        let want: Vec<_> = got
            .iter()
            .filter(|s| s.seq > mid)
            .map(|s| (s.seq, s.event.clone()))
            .collect();
        let have: Vec<_> = again.iter().map(|s| (s.seq, s.event.clone())).collect();
        ensure!(want == have, "replay differs:\nfirst {want:#?}\nsecond {have:#?}");
        Ok(())
    }
}

/// Test 11: `sh -c 'exec sleep 1000'` as the driver never reads its socket nor says hello:
/// status stays prompt, and the ready timeout (1 s) kills it with reason `not_ready`.
fn never_reading_driver(mode: Mode, ping_interval: Option<&str>) -> Result<()> {
    let mut setup =
        Setup::new(mode)
            .flag("--ready-timeout", "1s")
            .driver_cmd(["sh", "-c", "exec sleep 1000"]);
    if let Some(ping) = ping_interval {
        setup = setup.flag("--ping-interval", ping);
    }
    let mut sup = setup.start()?;
    let (pid, started_at, _) = sup.expect_started(1)?;
    // While it never answers, status is answered promptly, state starting.
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let asked = Instant::now();
        let s = sup.ctl.status_within(Duration::from_secs(1))?;
        slowest = slowest.max(asked.elapsed());
        ensure!(
            matches!(s.state, DriverState::Starting | DriverState::Exited),
            "{s:?}"
        );
    }
    let (exited, at, _) = sup.expect_exited()?;
    ensure!(
        exited.pid == pid && exited.reason == "not_ready",
        "{exited:?}\n{}",
        sup.context()
    );
    let after = at.duration_since(started_at);
    ensure!(
        after >= Duration::from_millis(900) && after < Duration::from_secs(4),
        "not_ready after {after:?} (ready timeout 1 s)"
    );
    sup.expect_started(2)?;
    eprintln!(
        "MEASURED ({mode:?}): slowest status while starting {slowest:?}; not_ready after {after:?}"
    );
    Ok(())
}
