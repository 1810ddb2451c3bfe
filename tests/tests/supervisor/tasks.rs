//! Tasks across a restart, cancel past the grace, pause/resume, and SIGTERM during a task.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use driver_protocol::message::{
    CancelTask, DriverState, Event, LogStream, Pause, Resume, ShimToControl, TaskStatus,
};
use driver_protocol::ErrorCode;

use super::{chunk_of, crash, done_of, input, kinds, state_to, Setup, QUIET};
use crate::support::process::PidFd;
use crate::support::{in_both_modes, poll_until, Mode, PATIENCE};

in_both_modes! {
    fn task_submitted_during_a_restart_runs_once(mode: Mode) -> Result<()> {
        let mut sup = Setup::new(mode).flag("--backoff-initial", "1s").start()?;
        sup.expect_up(1)?;
        sup.submit("c", crash(3))?;
        let (exited, _, _) = sup.expect_exited()?;
        ensure!(exited.reason == "crashed", "{exited:?}");
        // In the backoff now (1 s): submit, and retry the submit.
        let id = sup.ctl.id();
        let first = sup.ctl.submit_with_id(id, "t", "after the restart".into())?;
        ensure!(matches!(first, ShimToControl::Ok(ref ok) if ok.re == id), "{first:?}");
        let status = sup.status()?;
        ensure!(
            matches!(status.state, DriverState::Exited | DriverState::Starting)
                && status.tasks_queued == 1,
            "the submit did not land in the backoff: {status:?}"
        );
        // The same request id again: the recorded reply.
        let again = sup.ctl.submit_with_id(id, "t", "after the restart".into())?;
        ensure!(matches!(again, ShimToControl::Ok(ref ok) if ok.re == id), "{again:?}");
        // A new request for the same task id: ok, and nothing else.
        let retry = sup.ctl.submit("t", "after the restart".into())?;
        ensure!(matches!(retry, ShimToControl::Ok(_)), "{retry:?}");

        let (pid, _, mut seen) = sup.expect_started(2)?;
        let (_, skipped) = sup.expect_ready(pid)?;
        seen.extend(skipped);
        let ready_seq = sup.ctl.last_seq();
        let (done, _, skipped) = sup.expect_done("t")?;
        seen.extend(skipped);
        ensure!(done.status == TaskStatus::Succeeded, "{done:?}");
        seen.extend(sup.ctl.events_for(QUIET)?);
        let accepted = seen
            .iter()
            .filter(|s| matches!(&s.event, Event::TaskAccepted(a) if a.task_id == "t"))
            .count();
        let dones = 1 + seen
            .iter()
            .filter(|s| matches!(&s.event, Event::TaskDone(d) if d.task_id == "t"))
            .count();
        ensure!(
            accepted == 1 && dones == 1,
            "task t: {accepted} task_accepted, {dones} task_done: {:?}",
            kinds(&seen)
        );
        let first_chunk = seen
            .iter()
            .find(|s| chunk_of(&s.event, "t"))
            .map(|s| s.seq);
        ensure!(
            first_chunk.is_some_and(|seq| seq > ready_seq),
            "task t ran before the new driver_ready (seq {ready_seq}): {:?}",
            kinds(&seen)
        );
        let chunks = seen
            .iter()
            .filter(|s| chunk_of(&s.event, "t"))
            .count();
        ensure!(chunks == 3, "task t delivered more than once? {chunks} chunks");
        Ok(())
    }

    fn cancel_past_the_grace_kills_the_driver(mode: Mode) -> Result<()> {
        let mut sup = Setup::new(mode).start()?;
        let pid = sup.expect_up(1)?;
        let host = sup.host_pid(pid)?;
        let driver = PidFd::open(host)?;
        sup.submit(
            "slow",
            input([
                ("text", "a b c".into()),
                ("delay_ms", 10_000.into()),
                ("ignore_cancel", true.into()),
            ]),
        )?;
        sup.status_until("task slow running", |s| s.task_running.as_deref() == Some("slow"))?;
        let id = sup.ctl.id();
        let asked = Instant::now();
        let reply = sup.ctl.request(
            id,
            CancelTask { id, task_id: "slow".into(), grace_ms: Some(500) },
        )?;
        ensure!(matches!(reply, ShimToControl::Ok(_)), "cancel_task answered {reply:?}");
        let (done, at, mut seen) = sup.expect_done("slow")?;
        let took = at.duration_since(asked);
        eprintln!("MEASURED ({mode:?}): cancelled past a 500 ms grace after {took:?}");
        ensure!(
            done.status == TaskStatus::Cancelled
                && done.error.as_deref() == Some("cancel grace expired"),
            "{done:?}"
        );
        ensure!(
            took >= Duration::from_millis(500) && took < Duration::from_millis(2500),
            "task_done cancelled after {took:?} (grace 500 ms)\n{}",
            sup.context()
        );
        let gone = poll_until(Duration::from_secs(2), || (!driver.alive()).then_some(()));
        ensure!(gone.is_some(), "the driver (host pid {host}) survived the cancel");
        let exited = seen.iter().find_map(|s| match &s.event {
            Event::DriverExited(e) => Some(e.clone()),
            _ => None,
        });
        let exited = match exited {
            Some(e) => e,
            None => {
                let (e, _, skipped) = sup.expect_exited()?;
                seen.extend(skipped);
                e
            }
        };
        ensure!(exited.pid == pid && exited.reason == "cancel_timeout", "{exited:?}");
        sup.expect_up(2)?;
        // The late task_done of the killed driver, if any, is dropped: one in all.
        let rest = sup.ctl.events_for(QUIET)?;
        ensure!(
            !rest.iter().chain(seen.iter()).any(|s| done_of(&s.event, "slow")),
            "a second task_done for the cancelled task: {:?}",
            kinds(&rest)
        );
        Ok(())
    }

    fn pause_and_resume_report_the_elapsed_time(mode: Mode) -> Result<()> {
        let mut sup = Setup::new(mode).start()?;
        sup.expect_up(1)?;
        sup.submit("p", input([("text", "a b c".into()), ("delay_ms", 200.into())]))?;
        sup.wait("the first chunk", |e| matches!(e, Event::MessageChunk(_)))?;
        let pause_id = sup.ctl.id();
        let reply = sup.ctl.request(pause_id, Pause { id: pause_id, timeout_ms: None })?;
        ensure!(matches!(reply, ShimToControl::Ok(_)), "pause answered {reply:?}");
        // `paused{re}` and state_changed pausing → paused, in either order, after a
        // state_changed ready → pausing.
        let seen = sup.wait_all(
            "paused and state_changed to paused",
            &[
                &|e| matches!(e, Event::Paused(_)),
                &|e| state_to(e, DriverState::Paused),
            ],
        )?;
        let paused = seen.iter().find_map(|s| match &s.event {
            Event::Paused(p) => Some(p.clone()),
            _ => None,
        });
        ensure!(
            paused.as_ref().is_some_and(|p| p.re == Some(pause_id)),
            "{paused:?}, pause id {pause_id}"
        );
        let pausing = seen.iter().position(|s| state_to(&s.event, DriverState::Pausing));
        let to_paused = seen.iter().position(|s| state_to(&s.event, DriverState::Paused));
        ensure!(
            pausing.is_some() && pausing < to_paused,
            "no state_changed to pausing before paused: {:?}",
            kinds(&seen)
        );
        ensure!(sup.status()?.state == DriverState::Paused, "status is not paused");
        // Nothing of the task while paused.
        let quiet = sup.ctl.events_for(Duration::from_millis(300))?;
        ensure!(
            !quiet.iter().any(|s| matches!(s.event, Event::MessageChunk(_) | Event::TaskDone(_))),
            "the task went on while paused: {:?}",
            kinds(&quiet)
        );
        let id = sup.ctl.id();
        let reply = sup.ctl.request(id, Resume { id, slept_ms: None, unix_ms: None })?;
        ensure!(matches!(reply, ShimToControl::Ok(_)), "resume answered {reply:?}");
        let (log, _) = sup.wait("the driver's resumed log", |e| {
            matches!(e, Event::Log(l)
                if l.stream == LogStream::Driver && l.text.starts_with("resumed after "))
        })?;
        let Event::Log(log) = log.event else { unreachable!() };
        let slept: u64 = log
            .text
            .trim_start_matches("resumed after ")
            .trim_end_matches(" ms")
            .parse()?;
        eprintln!("MEASURED ({mode:?}): {:?} (slept ≥ 300 ms)", log.text);
        ensure!((300..PATIENCE.as_millis() as u64).contains(&slept), "{log:?}");
        let (done, _, seen) = sup.expect_done("p")?;
        ensure!(
            seen.iter().any(|s| state_to(&s.event, DriverState::Ready)),
            "no state_changed to ready after resume: {:?}",
            kinds(&seen)
        );
        ensure!(done.status == TaskStatus::Succeeded, "{done:?}");
        // Resume when not paused: invalid_state.
        let id = sup.ctl.id();
        let reply = sup.ctl.request(id, Resume { id, slept_ms: None, unix_ms: None })?;
        ensure!(
            matches!(&reply, ShimToControl::Error(e) if e.code == ErrorCode::InvalidState),
            "resume when ready answered {reply:?}"
        );
        Ok(())
    }

    fn sigterm_during_a_task_exits_with_the_drivers_code(mode: Mode) -> Result<()> {
        let mut sup = Setup::new(mode)
            .flag("--grace", "4s")
            .env("ECHO_EXIT_CODE", "7")
            .start()?;
        sup.expect_up(1)?;
        sup.submit("long", input([("text", "a b c d e f g h".into()), ("delay_ms", 1000.into())]))?;
        sup.wait("the first chunk", |e| matches!(e, Event::MessageChunk(_)))?;
        let sent = Instant::now();
        sup.shim.signal(libc::SIGTERM)?;
        let (done, _, seen) = sup.expect_done("long")?;
        ensure!(done.status == TaskStatus::Cancelled, "{done:?}");
        ensure!(
            seen.iter().any(|s| state_to(&s.event, DriverState::Stopping)),
            "no state_changed to stopping: {:?}",
            kinds(&seen)
        );
        let mut rest = match sup.ctl.until_closed(PATIENCE) {
            Ok(rest) => rest,
            Err(e) => anyhow::bail!("{e:#}\n{}", sup.shim.context()),
        };
        rest.extend(seen);
        let exited = rest.iter().find_map(|s| match &s.event {
            Event::DriverExited(e) => Some(e.clone()),
            _ => None,
        });
        ensure!(
            exited.as_ref().is_some_and(|e| e.code == Some(7)),
            "driver_exited {exited:?}: {:?}",
            kinds(&rest)
        );
        let code = sup.shim.wait_code(PATIENCE)?;
        let took = sent.elapsed();
        eprintln!("MEASURED ({mode:?}): exit {code} {took:?} after SIGTERM (grace 4 s)");
        ensure!(code == 7, "shim exit code {code}, want 7\n{}", sup.shim.context());
        ensure!(took < Duration::from_secs(4), "took {took:?}, grace 4 s");
        Ok(())
    }
}
