//! Every accepted task ends, and none is handed to a driver that is gone: not the next
//! queued task to a reaped driver whose last frames are read late, not a task accepted while
//! the shim waits for its execs before exiting (found by the `supervisor_core` fuzz target);
//! and every accepted task gets its `task_done` when the shim exits.

use std::time::Instant;

use driver_protocol::message::{DriverToShim, ShimToDriver, TaskDone, TaskStatus};
use driver_protocol::ErrorCode;

use crate::reaper::ExitStatus;

use super::testkit::*;
use super::Output;

fn task_sent(outs: &[Output]) -> usize {
    to_driver(outs)
        .iter()
        .filter(|m| matches!(m, ShimToDriver::Task(_)))
        .count()
}

/// A control `shutdown` with a 1 s grace.
fn shutdown(id: u64) -> driver_protocol::message::ControlToShim {
    driver_protocol::message::ControlToShim::Shutdown(driver_protocol::message::Shutdown {
        id,
        grace_ms: Some(1000),
        reason: None,
    })
}

fn done_msg(task_id: &str) -> DriverToShim {
    DriverToShim::TaskDone(TaskDone {
        task_id: task_id.to_owned(),
        status: TaskStatus::Succeeded,
        output: None,
        error: None,
    })
}

#[test]
fn leftover_frames_of_a_reaped_driver_start_no_task() {
    let t0 = Instant::now();
    let c = cfg();
    let mut core = new_core(&c, t0);
    up(&mut core, t0);
    assert!(is_ok(&command(&mut core, submit(1, "A", false), t0), 1));
    assert!(is_ok(&command(&mut core, submit(2, "B", false), t0), 2));
    assert_eq!(task_sent(&core.take_outputs()), 1);
    // Reaped; its last frame (A done) is read afterwards: relayed, but B is not sent.
    core.on_driver_exit_oom(PID, ExitStatus::Exited(1), None);
    assert_eq!(core.take_outputs(), vec![Output::CloseDriverLink]);
    core.on_driver_msg(done_msg("A"), body(), t0);
    let outs = core.take_outputs();
    assert!(outs.iter().any(|o| matches!(o, Output::Relay(_))));
    assert_eq!(task_sent(&outs), 0, "{outs:?}");
    core.on_driver_link_closed(t0);
    let outs = core.take_outputs();
    // B was never handed to the dead driver, so it is not failed: it waits for the next one.
    assert!(task_dones(&outs).is_empty(), "{outs:?}");
    assert_eq!(core.tasks.queued(), 1);
}

#[test]
fn every_accepted_task_ends_when_the_shim_exits() {
    let t0 = Instant::now();
    let mut c = cfg();
    c.opts.restart = crate::supervisor::restart::RestartPolicy::Never;
    let mut core = new_core(&c, t0);
    up(&mut core, t0);
    for (i, t) in ["A", "B", "C"].iter().enumerate() {
        command(&mut core, submit(i as u64 + 1, t, false), t0);
    }
    core.take_outputs();
    core.on_driver_exit(PID, ExitStatus::Exited(3), t0);
    let outs = core.take_outputs();
    let dones = task_dones(&outs);
    let ids: Vec<_> = dones.iter().map(|d| d.task_id.as_str()).collect();
    assert_eq!(ids, ["A", "B", "C"], "{outs:?}");
    assert!(dones.iter().all(|d| d.status == TaskStatus::Failed));
    assert_eq!(dones[1].error.as_deref(), Some("shim exiting"));
    assert!(core.exit_code().is_some());

    // On shutdown, queued tasks end cancelled.
    let mut core = new_core(&cfg(), t0);
    up(&mut core, t0);
    command(&mut core, submit(1, "A", false), t0);
    command(&mut core, submit(2, "B", true), t0);
    core.take_outputs();
    command(&mut core, shutdown(9), t0);
    core.on_driver_exit(PID, ExitStatus::Exited(0), t0);
    let outs = core.take_outputs();
    let dones = task_dones(&outs);
    assert!(dones
        .iter()
        .any(|d| d.task_id == "B" && d.status == TaskStatus::Cancelled));
    assert!(dones.iter().any(|d| d.task_id == "A"));
}

/// A task the driver is running when the shim shuts down, and that the driver does not end
/// itself, ends `cancelled` as the queued ones do (not `failed` by the driver's exit), with
/// or without `redeliver`.
#[test]
fn a_running_task_is_cancelled_by_a_shutdown() {
    let t0 = Instant::now();
    for redeliver in [false, true] {
        let mut core = new_core(&cfg(), t0);
        up(&mut core, t0);
        command(&mut core, submit(1, "A", redeliver), t0);
        command(&mut core, submit(2, "B", false), t0);
        core.take_outputs();
        command(&mut core, shutdown(9), t0);
        core.on_driver_exit(PID, ExitStatus::Signaled(libc::SIGTERM), t0);
        let outs = core.take_outputs();
        let dones = task_dones(&outs);
        let ends: Vec<_> = dones
            .iter()
            .map(|d| (d.task_id.as_str(), d.status, d.error.as_deref()))
            .collect();
        assert_eq!(
            ends,
            [
                ("A", TaskStatus::Cancelled, Some("shim shutting down")),
                ("B", TaskStatus::Cancelled, Some("shim shutting down")),
            ],
            "redeliver {redeliver}: {outs:?}"
        );
    }
}

/// Found by the `supervisor_core` fuzz target: the driver exits 0 (no restart under
/// `on-failure`) while one of its execs runs, so the shim ends every task and waits for the
/// exec before exiting. A `submit_task` in that window was accepted and then never got a
/// `task_done`. It is refused now.
#[test]
fn no_task_is_accepted_while_the_shim_waits_for_execs_to_exit() {
    let t0 = Instant::now();
    let c = cfg();
    let mut core = new_core(&c, t0);
    up(&mut core, t0);
    let req = driver_protocol::message::Exec {
        id: 1,
        argv: vec!["sh".into()],
        env: Default::default(),
        cwd: None,
        user: None,
        tty: None,
        stdin: false,
        timeout_ms: None,
        output_cap: None,
        task_id: None,
        limits: None,
        tag: None,
    };
    let owner = super::ExecOwner::Driver(PID);
    let id = core.admit(owner, &req, None).expect("admitted");
    core.exec_started(id, owner, 200, &req, t0);
    core.on_driver_exit(PID, ExitStatus::Exited(0), t0);
    core.take_outputs();
    assert_eq!(core.exit_code(), None, "waits for the exec");
    let reply = command(&mut core, submit(7, "late", false), t0);
    assert_eq!(err_code(&reply), Some(ErrorCode::ShuttingDown), "{reply:?}");
    let outs = core.take_outputs();
    assert!(
        !events(&outs)
            .iter()
            .any(|e| matches!(e, driver_protocol::message::Event::TaskAccepted(_))),
        "{outs:?}"
    );
    // The exec ends: the shim exits with the driver's code, no task left behind.
    core.on_exec_exit(id, ExitStatus::Signaled(15), t0);
    core.exec_io_closed(id, t0);
    assert_eq!(core.exit_code(), Some(0));
    assert_eq!(core.tasks.queued(), 0);
}
