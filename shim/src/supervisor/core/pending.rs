//! The core's side of a pending spawn (a child forked but not yet known to have exec'd; see
//! the shell's `spawning` module): the driver and execs are known to the core by pid from
//! the fork on, and a start that fails later — a failed step before `execve`, or a child
//! stopped there past `--spawn-timeout` and killed — is settled here.

use std::time::{Duration, Instant};

use driver_protocol::message::{ControlToShim, Exec, RestartDriver, Shutdown};

use super::testkit::*;
use super::ExecOwner;
use crate::reaper::ExitStatus;

fn shutdown(id: u64) -> ControlToShim {
    ControlToShim::Shutdown(Shutdown {
        id,
        grace_ms: None,
        reason: None,
    })
}

#[test]
fn a_driver_that_fails_before_execve_is_an_exec_failure_and_restarts() {
    let t0 = Instant::now();
    let c = cfg();
    let mut core = new_core(&c, t0);
    core.on_launched(PID, t0);
    core.take_outputs();
    // The report said its execve failed; it has _exit(127)ed.
    core.on_driver_spawn_failed(PID);
    core.on_driver_exit(PID, ExitStatus::Exited(127), t0);
    let outs = core.take_outputs();
    let x = exited(&outs);
    assert_eq!(x.len(), 1, "{outs:?}");
    assert_eq!(
        (x[0].reason.as_str(), x[0].code),
        ("exec_failed", Some(127))
    );
    // The restart policy follows, as for any exec failure.
    let at = core.next_deadline().expect("a restart is scheduled");
    core.on_timer(at);
    assert_eq!(launches(&core.take_outputs()), 1);
}

#[test]
fn a_driver_stopped_before_execve_and_killed_is_an_exec_failure() {
    let t0 = Instant::now();
    let c = cfg();
    let mut core = new_core(&c, t0);
    core.on_launched(PID, t0);
    core.take_outputs();
    // --spawn-timeout: the shell SIGKILLed it; a later spawn failure does not change that.
    core.on_driver_spawn_failed(PID);
    core.on_driver_spawn_failed(PID);
    core.on_driver_exit(PID, ExitStatus::Signaled(libc::SIGKILL), t0);
    let outs = core.take_outputs();
    let x = exited(&outs);
    assert_eq!(x[0].reason, "exec_failed", "{outs:?}");
    assert_eq!(x[0].signal.as_deref(), Some("SIGKILL"));
}

#[test]
fn a_spawn_failure_of_an_old_driver_does_not_touch_the_new_one() {
    let t0 = Instant::now();
    let c = cfg();
    let mut core = new_core(&c, t0);
    up(&mut core, t0);
    core.on_driver_spawn_failed(PID + 1);
    core.on_driver_exit(PID, ExitStatus::Exited(3), t0);
    assert_eq!(exited(&core.take_outputs())[0].reason, "crashed");
}

#[test]
fn shutdown_while_the_driver_launch_is_pending() {
    let t0 = Instant::now();
    let c = cfg();
    let mut core = new_core(&c, t0);
    core.on_launched(PID, t0);
    core.take_outputs();
    command(&mut core, shutdown(1), t0);
    // Stopped before its execve: SIGTERM stays blocked in it; the spawn deadline's SIGKILL
    // ends it, and it is reported as what it was: a driver that never ran.
    core.on_driver_spawn_failed(PID);
    core.on_driver_exit(PID, ExitStatus::Signaled(libc::SIGKILL), t0);
    let outs = core.take_outputs();
    assert_eq!(exited(&outs)[0].reason, "exec_failed", "{outs:?}");
    assert_eq!(launches(&outs), 0, "no restart while stopping");
    assert_eq!(core.exit_code(), Some(128 + libc::SIGKILL));
}

#[test]
fn restart_driver_while_the_launch_is_pending_waits_for_its_exit() {
    let t0 = Instant::now();
    let c = cfg();
    let mut core = new_core(&c, t0);
    core.on_launched(PID, t0);
    core.take_outputs();
    let _ = command(
        &mut core,
        ControlToShim::RestartDriver(RestartDriver { id: 1 }),
        t0,
    );
    core.take_outputs();
    core.on_driver_spawn_failed(PID);
    core.on_driver_exit(PID, ExitStatus::Signaled(libc::SIGKILL), t0);
    let outs = core.take_outputs();
    assert_eq!(exited(&outs).len(), 1, "{outs:?}");
    assert!(core.exit_code().is_none());
}

#[test]
fn an_exec_that_never_ran_gets_no_exec_exit_and_frees_its_slot() {
    let t0 = Instant::now();
    let mut c = cfg();
    c.opts.max_execs = 1;
    let mut core = new_core(&c, t0);
    up(&mut core, t0);
    let req = Exec::new(1, ["tool"]);
    let id = core
        .admit(ExecOwner::Control, &req, None)
        .expect("admitted");
    core.exec_started(id, ExecOwner::Control, 300, &req, t0);
    // Pending: the slot is taken.
    assert!(core
        .admit(ExecOwner::Control, &Exec::new(2, ["tool"]), None)
        .is_err());
    core.take_outputs();
    // Its spawn failed (or timed out): the requester gets an error reply instead.
    core.exec_spawn_failed(id, t0);
    assert_eq!(core.execs_running(), 0);
    assert!(core.exec_owner(id).is_none());
    // Its exit, reaped later, is nobody's.
    core.on_exec_exit(id, ExitStatus::Signaled(libc::SIGKILL), t0);
    core.exec_io_closed(id, t0);
    assert!(exec_exits(&core.take_outputs()).is_empty());
    assert!(core
        .admit(ExecOwner::Control, &Exec::new(3, ["tool"]), None)
        .is_ok());
    // Twice is harmless.
    core.exec_spawn_failed(id, t0);
}

#[test]
fn a_pending_exec_is_cancelled_and_killed_like_a_running_one() {
    let t0 = Instant::now();
    let c = cfg();
    let mut core = new_core(&c, t0);
    up(&mut core, t0);
    let mut req = Exec::new(1, ["tool"]);
    req.timeout_ms = Some(100);
    let id = core
        .admit(ExecOwner::Control, &req, None)
        .expect("admitted");
    core.exec_started(id, ExecOwner::Control, 300, &req, t0);
    let t1 = t0 + Duration::from_millis(100);
    core.on_timer(t1);
    core.on_timer(t1 + c.opts.exec_kill_grace);
    assert_eq!(
        kills(&core),
        vec![(-300, libc::SIGTERM), (-300, libc::SIGKILL)]
    );
    // The SIGKILL ended it before its execve: reaped while pending, so the shell decides
    // the spawn first; with a report of failure it is forgotten without an exec_exit.
    core.exec_spawn_failed(id, t1);
    core.on_exec_exit(id, ExitStatus::Signaled(libc::SIGKILL), t1);
    assert!(exec_exits(&core.take_outputs()).is_empty());
}

#[test]
fn shutdown_waits_for_a_pending_exec_and_exits_once_it_never_ran() {
    let t0 = Instant::now();
    let c = cfg();
    let mut core = new_core(&c, t0);
    up(&mut core, t0);
    let req = Exec::new(1, ["tool"]);
    let id = core
        .admit(ExecOwner::Control, &req, None)
        .expect("admitted");
    core.exec_started(id, ExecOwner::Control, 300, &req, t0);
    command(&mut core, shutdown(2), t0);
    core.on_driver_exit(PID, ExitStatus::Exited(0), t0);
    assert_eq!(
        core.exit_code(),
        None,
        "the pending exec is still being ended"
    );
    core.exec_spawn_failed(id, t0);
    assert_eq!(core.exit_code(), Some(0));
    assert!(exec_exits(&core.take_outputs()).is_empty());
}
