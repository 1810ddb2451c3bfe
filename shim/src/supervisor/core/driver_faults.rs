//! A driver's liveness and protocol faults: pings do not count while the shim has paused
//! reading (backpressure is not a hang) and the deadlines move by the pause; a `resume`
//! without `ready` times out and the driver counts as hung; a `hello` with another role and
//! end of stream on a live driver are protocol errors.

use std::time::{Duration, Instant};

use driver_protocol::message::{DriverToShim, ShimToDriver};
use driver_protocol::ErrorCode;

use crate::reaper::ExitStatus;

use super::testkit::*;
use super::Output;

#[test]
fn while_reading_is_paused_pings_do_not_count_and_deadlines_move() {
    let t0 = Instant::now();
    let c = cfg(); // ping 1 s, 2 misses
    let mut core = new_core(&c, t0);
    up(&mut core, t0);
    core.reading_paused(t0 + Duration::from_millis(500));
    // No liveness deadline while paused; timers far later kill nothing.
    assert!(core.next_deadline().is_none());
    core.on_timer(t0 + Duration::from_secs(10));
    assert!(kills(&core).is_empty());
    assert!(to_driver(&core.take_outputs()).is_empty());
    // A task submitted while the event buffer is full is refused.
    let r = command(
        &mut core,
        submit(1, "A", false),
        t0 + Duration::from_secs(10),
    );
    assert_eq!(err_code(&r), Some(ErrorCode::Limit));
    core.reading_resumed(t0 + Duration::from_millis(10_500));
    // The ping deadline (1 s) moved back by the 10 s paused.
    assert_eq!(core.next_deadline(), Some(t0 + Duration::from_secs(11)));
    assert!(is_ok(&command(&mut core, submit(2, "B", false), t0), 2));
}

#[test]
fn a_resume_without_ready_times_out_and_the_driver_counts_as_hung() {
    use driver_protocol::message::{ControlToShim, Event, Pause, Paused, Resume};
    let t0 = Instant::now();
    let mut c = cfg();
    c.opts.ping_interval = Duration::ZERO;
    c.opts.pause_timeout = Duration::from_secs(2);
    let mut core = new_core(&c, t0);
    up(&mut core, t0);
    let pause = ControlToShim::Pause(Pause {
        id: 5,
        timeout_ms: None,
    });
    assert!(is_ok(&command(&mut core, pause, t0), 5));
    core.on_driver_msg(DriverToShim::Paused(Paused { re: Some(1) }), body(), t0);
    let resume = ControlToShim::Resume(Resume::new(6));
    let t1 = t0 + Duration::from_secs(10);
    assert!(is_ok(&command(&mut core, resume, t1), 6));
    core.take_outputs();
    assert_eq!(core.next_deadline(), Some(t1 + Duration::from_secs(2)));
    core.on_timer(t1 + Duration::from_secs(2));
    let outs = core.take_outputs();
    assert!(events(&outs)
        .iter()
        .any(|e| matches!(e, Event::Error(x) if x.code == ErrorCode::Timeout)));
    assert_eq!(kills(&core), vec![(-PID, libc::SIGKILL)]);
    core.on_driver_exit(PID, ExitStatus::Signaled(9), t1);
    assert_eq!(exited(&core.take_outputs())[0].reason, "hung");
}

#[test]
fn a_hello_with_another_role_is_a_protocol_error() {
    use driver_protocol::message::{Hello, Role};
    let t0 = Instant::now();
    let c = cfg();
    let mut core = new_core(&c, t0);
    core.on_launched(PID, t0);
    core.take_outputs();
    let h = DriverToShim::Hello(Hello::new(Role::Control, "test", "1"));
    core.on_driver_msg(h, body(), t0);
    let outs = core.take_outputs();
    assert!(matches!(
        to_driver(&outs)[..],
        [ShimToDriver::Error(e)] if e.code == ErrorCode::Invalid
    ));
    assert!(outs.contains(&Output::StopReading));
    assert_eq!(kills(&core), vec![(-PID, libc::SIGKILL)]);
    core.on_driver_exit(PID, ExitStatus::Signaled(9), t0);
    assert_eq!(exited(&core.take_outputs())[0].reason, "protocol_error");
}

#[test]
fn end_of_stream_on_a_live_driver_is_a_protocol_error() {
    let t0 = Instant::now();
    let c = cfg();
    let mut core = new_core(&c, t0);
    up(&mut core, t0);
    core.on_driver_eof(t0);
    // A driver that is just exiting gets a moment to be reaped.
    assert!(kills(&core).is_empty());
    core.on_timer(t0 + Duration::from_secs(1));
    assert_eq!(kills(&core), vec![(-PID, libc::SIGKILL)]);
    core.on_driver_exit(PID, ExitStatus::Signaled(9), t0);
    assert_eq!(exited(&core.take_outputs())[0].reason, "protocol_error");

    // Reaped in time (end of stream because it exited): its own exit reason stands.
    let mut core = new_core(&c, t0);
    up(&mut core, t0);
    core.on_driver_eof(t0);
    core.on_driver_exit(PID, ExitStatus::Exited(0), t0);
    assert_eq!(exited(&core.take_outputs())[0].reason, "exited");
    assert!(kills(&core).is_empty());
}
