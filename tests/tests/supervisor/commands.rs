//! The rest of the control commands: the bounded queue, cancel of queued and unknown tasks,
//! ping, signal, the commands of later issues, `--restart never`, and the flags' usage errors.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Result};
use driver_protocol::message::{
    CancelTask, ControlToShim, Event, Ping, SetDriver, ShimToControl, Signal, SignalTarget,
    TaskStatus,
};
use driver_protocol::ErrorCode;

use super::{crash, done_of, input, kinds, Setup};
use crate::support::{in_both_modes, Mode, Shim, PATIENCE};

/// Sends a request with a fresh id and returns the error code it is answered with.
fn error_code(sup: &mut super::Sup, make: impl FnOnce(u64) -> ControlToShim) -> Result<ErrorCode> {
    let id = sup.ctl.id();
    let msg = make(id);
    match sup.ctl.request(id, msg)? {
        ShimToControl::Error(e) => Ok(e.code),
        other => anyhow::bail!("expected an error, got {other:?}"),
    }
}

in_both_modes! {
    fn full_queue_refuses_and_queued_tasks_cancel(mode: Mode) -> Result<()> {
        let mut sup = Setup::new(mode).flag("--task-queue", "2").start()?;
        sup.expect_up(1)?;
        sup.submit("run", input([("text", "a b".into()), ("delay_ms", 2000.into())]))?;
        sup.status_until("task run running", |s| s.task_running.as_deref() == Some("run"))?;
        sup.submit("q1", "one".into())?;
        sup.submit("q2", "two".into())?;
        let full = sup.ctl.submit("q3", "three".into())?;
        ensure!(
            matches!(&full, ShimToControl::Error(e) if e.code == ErrorCode::Limit),
            "a submit to a full queue answered {full:?}"
        );
        let status = sup.status()?;
        ensure!(status.tasks_queued == 2, "{status:?}");
        // Cancel a queued task: ok, and its task_done{cancelled}.
        sup.ctl.expect_ok(|id| CancelTask { id, task_id: "q1".into(), grace_ms: None }.into())?;
        let (done, _, _) = sup.expect_done("q1")?;
        ensure!(done.status == TaskStatus::Cancelled, "{done:?}");
        ensure!(sup.status()?.tasks_queued == 1, "q1 still queued");
        // Unknown task: not_found.
        let code = error_code(&mut sup, |id| {
            CancelTask { id, task_id: "nope".into(), grace_ms: None }.into()
        })?;
        ensure!(code == ErrorCode::NotFound, "cancel of an unknown task: {code:?}");
        // The others run, in order.
        let (done, _, seen) = sup.expect_done("run")?;
        ensure!(done.status == TaskStatus::Succeeded, "{done:?}");
        let (done, _, more) = sup.expect_done("q2")?;
        ensure!(done.status == TaskStatus::Succeeded, "{done:?}");
        ensure!(
            !seen
                .iter()
                .chain(more.iter())
                .any(|s| done_of(&s.event, "q1") || done_of(&s.event, "q3")),
            "events of a cancelled or refused task: {:?}",
            kinds(&more)
        );
        Ok(())
    }

    fn ping_signal_and_later_commands(mode: Mode) -> Result<()> {
        let mut sup = Setup::new(mode).start()?;
        let pid = sup.expect_up(1)?;
        let id = sup.ctl.id();
        let pong = sup.ctl.request(id, Ping { id })?;
        ensure!(matches!(pong, ShimToControl::Pong(ref p) if p.re == id), "{pong:?}");
        let code = error_code(&mut sup, |id| {
            Signal { id, signal: "TERM".into(), target: SignalTarget::Exec, exec_id: Some(1) }
                .into()
        })?;
        ensure!(code == ErrorCode::NotFound, "signal to an unknown exec: {code:?}");
        // A signal to the driver's group: SIGKILL ⇒ it dies of it and is restarted.
        sup.ctl.expect_ok(|id| {
            Signal { id, signal: "KILL".into(), target: SignalTarget::Driver, exec_id: None }
                .into()
        })?;
        let (exited, _, _) = sup.expect_exited()?;
        ensure!(
            exited.pid == pid
                && exited.reason == "crashed"
                && exited.signal.as_deref().is_some_and(|s| s.contains("KILL")),
            "{exited:?}"
        );
        sup.expect_up(2)?;
        Ok(())
    }

    fn set_driver_hot_swaps_the_command(mode: Mode) -> Result<()> {
        let mut sup = Setup::new(mode).start()?;
        let old = sup.expect_up(1)?;
        sup.submit("before", "one two".into())?;
        let (done, _, _) = sup.expect_done("before")?;
        ensure!(done.status == TaskStatus::Succeeded, "{done:?}");
        // A bad command is refused and changes nothing.
        let code = error_code(&mut sup, |id| {
            SetDriver { id, argv: vec![], env: BTreeMap::new() }.into()
        })?;
        ensure!(code == ErrorCode::Invalid, "set_driver with an empty argv: {code:?}");
        // The new command proves its argv and env on stdout, then becomes the echo driver.
        let echo = crate::drivers::echo_driver_bin()?;
        let argv = vec![
            "sh".to_owned(),
            "-c".to_owned(),
            "echo swapped:$SWAP_MARK; exec \"$0\"".to_owned(),
            echo.display().to_string(),
        ];
        let env = BTreeMap::from([("SWAP_MARK".to_owned(), "m1".to_owned())]);
        sup.ctl.expect_ok(|id| SetDriver { id, argv, env }.into())?;
        // The old driver gets a graceful shutdown: it exits 0 on its own, reason "shutdown".
        let (exited, _, _) = sup.expect_exited()?;
        ensure!(
            exited.pid == old && exited.reason == "shutdown" && exited.code == Some(0),
            "the old driver was not stopped gracefully: {exited:?}"
        );
        let (new, _, _) = sup.expect_started(1)?;
        ensure!(new != old, "the same pid {new} after set_driver");
        let seen = sup.wait_all(
            "the new driver's mark and readiness",
            &[
                &|e| matches!(e, Event::Log(l) if l.text == "swapped:m1"),
                &|e| matches!(e, Event::DriverReady(r) if r.pid == new),
            ],
        )?;
        ensure!(
            !seen.iter().any(|s| matches!(s.event, Event::DriverExited(_))),
            "the new driver exited: {:?}",
            kinds(&seen)
        );
        sup.submit("after", "three".into())?;
        let (done, _, _) = sup.expect_done("after")?;
        ensure!(done.status == TaskStatus::Succeeded, "{done:?}");
        let status = sup.status()?;
        ensure!(status.driver_pid == Some(new), "{status:?}");
        Ok(())
    }

    fn restart_never_exits_with_the_drivers_code(mode: Mode) -> Result<()> {
        let mut sup = Setup::new(mode).flag("--restart", "never").start()?;
        sup.expect_up(1)?;
        sup.submit("c", crash(5))?;
        let events = match sup.ctl.until_closed(PATIENCE) {
            Ok(events) => events,
            Err(e) => anyhow::bail!("{e:#}\n{}", sup.shim.context()),
        };
        let exited = events.iter().find_map(|s| match &s.event {
            Event::DriverExited(e) => Some(e.clone()),
            _ => None,
        });
        ensure!(
            exited.as_ref().is_some_and(|e| e.code == Some(5) && e.reason == "crashed"),
            "driver_exited {exited:?}: {:?}",
            kinds(&events)
        );
        ensure!(
            !events.iter().any(|s| {
                matches!(s.event, Event::DriverRestarting(_) | Event::DriverStarted(_))
            }),
            "restarted with --restart never: {:?}",
            kinds(&events)
        );
        let code = sup.shim.wait_code(PATIENCE)?;
        ensure!(code == 5, "shim exit code {code}, want 5\n{}", sup.shim.context());
        Ok(())
    }
}

#[test]
fn control_listen_needs_insecure_and_unix() -> Result<()> {
    let echo = crate::drivers::echo_driver_bin()?;
    for args in [
        &["--control-listen", "unix:/tmp/agent-shim-never.sock"][..],
        &["--control-listen", "tcp:127.0.0.1:9", "--control-insecure"][..],
    ] {
        let out = Shim::new()
            .mode(Mode::Subreaper)
            .args(args)
            .cmd([&echo])
            .run(Duration::from_secs(10))?;
        ensure!(
            out.code == 2,
            "{args:?}: expected a usage error (2): {out:?}"
        );
        ensure!(
            out.stderr.contains("token"),
            "{args:?}: the message does not say a token is needed: {out:?}"
        );
    }
    Ok(())
}
