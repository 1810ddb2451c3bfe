//! Shared fixtures for the core's unit tests: a config, a core on a fake [`Sys`](crate::sys::Sys),
//! a driver brought up to `ready`, and filters over the core's outputs.

use std::time::{Duration, Instant};

use bytes::Bytes;
use driver_protocol::message::{
    ControlToShim, DriverExited, DriverState, DriverToShim, Event, Hello, OkReply, Role,
    ShimToControl, ShimToDriver, SubmitTask, TaskDone,
};
use driver_protocol::ErrorCode;

use crate::sys::fake::Fake;

use super::{Core, Output, Settings};

pub(super) use driver_protocol::message::DriverState as S;

pub(super) const PID: i32 = 100;

pub(super) fn cfg() -> Settings {
    Settings {
        command: vec!["driver".into()],
        grace: Duration::from_secs(8),
        backoff_jitter: 0.0,
        ping_interval: Duration::from_secs(1),
        ping_misses: 2,
        ..Settings::default()
    }
}

pub(super) fn new_core(cfg: &Settings, t0: Instant) -> Core<Fake> {
    let sys = Fake {
        pid: 7,
        ..Fake::default()
    };
    Core::new(sys, cfg, t0, 1)
}

pub(super) fn body() -> Bytes {
    Bytes::from_static(b"\x81\xa4type\xa3log")
}

pub(super) fn events(outs: &[Output]) -> Vec<&Event> {
    outs.iter()
        .filter_map(|o| match o {
            Output::Event(e) => Some(e),
            _ => None,
        })
        .collect()
}

pub(super) fn states(outs: &[Output]) -> Vec<(DriverState, DriverState)> {
    events(outs)
        .into_iter()
        .filter_map(|e| match e {
            Event::StateChanged(c) => Some((c.from, c.to)),
            _ => None,
        })
        .collect()
}

pub(super) fn to_driver(outs: &[Output]) -> Vec<&ShimToDriver> {
    outs.iter()
        .filter_map(|o| match o {
            Output::ToDriver(m) => Some(m),
            _ => None,
        })
        .collect()
}

pub(super) fn launches(outs: &[Output]) -> usize {
    outs.iter().filter(|o| matches!(o, Output::Launch)).count()
}

pub(super) fn hello() -> DriverToShim {
    DriverToShim::Hello(Hello::new(Role::Driver, "test", "1"))
}

pub(super) fn ready() -> DriverToShim {
    DriverToShim::Ready(driver_protocol::message::Ready { re: None })
}

/// Launch as PID 100, hello, ready; returns the outputs of the whole start.
pub(super) fn up(core: &mut Core<Fake>, now: Instant) -> Vec<Output> {
    core.on_launched(PID, now);
    core.on_driver_msg(hello(), body(), now);
    core.on_driver_msg(ready(), body(), now);
    core.take_outputs()
}

pub(super) fn submit(id: u64, task_id: &str, redeliver: bool) -> ControlToShim {
    ControlToShim::SubmitTask(SubmitTask {
        id,
        task_id: task_id.to_owned(),
        input: "hi".into(),
        output_schema: None,
        timeout_ms: None,
        redeliver,
    })
}

pub(super) fn is_ok(r: &ShimToControl, re: u64) -> bool {
    matches!(r, ShimToControl::Ok(OkReply { re: x }) if *x == re)
}

pub(super) fn err_code(r: &ShimToControl) -> Option<ErrorCode> {
    match r {
        ShimToControl::Error(e) => Some(e.code.clone()),
        _ => None,
    }
}

pub(super) fn task_dones(outs: &[Output]) -> Vec<&TaskDone> {
    events(outs)
        .into_iter()
        .filter_map(|e| match e {
            Event::TaskDone(t) => Some(t),
            _ => None,
        })
        .collect()
}

pub(super) fn exited(outs: &[Output]) -> Vec<&DriverExited> {
    events(outs)
        .into_iter()
        .filter_map(|e| match e {
            Event::DriverExited(x) => Some(x),
            _ => None,
        })
        .collect()
}
