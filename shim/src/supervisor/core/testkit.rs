//! Shared fixtures for the core's unit tests: a config, a core, a driver brought up to
//! `ready`, and filters over the core's outputs.

use std::time::{Duration, Instant};

use bytes::Bytes;
use driver_protocol::message::{
    ControlToShim, DriverExited, DriverState, DriverToShim, Event, Hello, OkReply, Role,
    ShimToControl, ShimToDriver, SubmitTask, TaskDone,
};
use driver_protocol::ErrorCode;

use super::settings::CoreOpts;
use super::{Core, Output, Settings};

pub(super) use driver_protocol::message::DriverState as S;

pub(super) const PID: i32 = 100;

pub(super) fn cfg() -> Settings {
    Settings {
        command: vec!["driver".into()],
        grace: Duration::from_secs(8),
        opts: CoreOpts {
            backoff_jitter: 0.0,
            ping_interval: Duration::from_secs(1),
            ping_misses: 2,
            ..CoreOpts::flag_defaults()
        },
        ..Settings::default()
    }
}

/// A core (in a shim that is not PID 1) with a log of the kills it asked for.
pub(super) fn new_core(cfg: &Settings, t0: Instant) -> TestCore {
    TestCore::new(7, cfg, t0)
}

/// A [`Core`] whose [`TestCore::take_outputs`] remembers every [`Output::Kill`], so a test
/// can look at all the signals sent so far, whoever took the outputs meanwhile.
pub(super) struct TestCore {
    core: Core,
    kills: Vec<(i32, i32)>,
}

impl TestCore {
    /// A core for a shim whose pid is `own_pid`.
    pub(super) fn new(own_pid: i32, cfg: &Settings, t0: Instant) -> Self {
        TestCore {
            core: Core::new(own_pid, cfg, t0, 1),
            kills: Vec::new(),
        }
    }

    /// [`Core::take_outputs`], logging the kills.
    pub(super) fn take_outputs(&mut self) -> Vec<Output> {
        let outs = self.core.take_outputs();
        self.kills.extend(kills_in(&outs));
        outs
    }

    /// Forgets the kills sent so far (taken or not); other outputs stay.
    pub(super) fn clear_kills(&mut self) {
        self.kills.clear();
        self.core.out.retain(|o| !matches!(o, Output::Kill(_)));
    }
}

impl std::ops::Deref for TestCore {
    type Target = Core;
    fn deref(&self) -> &Core {
        &self.core
    }
}

impl std::ops::DerefMut for TestCore {
    fn deref_mut(&mut self) -> &mut Core {
        &mut self.core
    }
}

/// The kills among `outs`, as the first `kill(2)` of each (`(-pgid, sig)` for a group,
/// `(-1, SIGKILL)` for everything).
pub(super) fn kills_in(outs: &[Output]) -> Vec<(i32, i32)> {
    outs.iter()
        .filter_map(|o| match o {
            Output::Kill(k) => Some(k.target()),
            _ => None,
        })
        .collect()
}

pub(super) fn body() -> Bytes {
    Bytes::from_static(b"\x81\xa4type\xa3log")
}

pub(super) fn events(outs: &[Output]) -> Vec<&Event> {
    outs.iter()
        .filter_map(|o| match o {
            Output::Event(e) => Some(&**e),
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

/// The exec exits among `outs`, to the driver or as events.
pub(super) fn exec_exits(outs: &[Output]) -> Vec<driver_protocol::message::ExecExit> {
    outs.iter()
        .filter_map(|o| match o {
            Output::ToDriver(m) => match &**m {
                ShimToDriver::ExecExit(x) => Some(x.clone()),
                _ => None,
            },
            Output::Event(e) => match &**e {
                Event::ExecExit(x) => Some(x.clone()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

pub(super) fn to_driver(outs: &[Output]) -> Vec<&ShimToDriver> {
    outs.iter()
        .filter_map(|o| match o {
            Output::ToDriver(m) => Some(&**m),
            _ => None,
        })
        .collect()
}

/// Runs control command `req` and returns its reply, taken out of the outputs (the others
/// stay).
pub(super) fn command(core: &mut Core, req: ControlToShim, now: Instant) -> ShimToControl {
    core.on_command(req, now);
    let at = core.out.iter().position(|o| matches!(o, Output::Reply(_)));
    match at.map(|i| core.out.remove(i)) {
        Some(Output::Reply(r)) => *r,
        other => panic!("no reply: {other:?}"),
    }
}

/// Every kill the core asked for so far, in order (see [`kills_in`]).
pub(super) fn kills(core: &TestCore) -> Vec<(i32, i32)> {
    let mut all = core.kills.clone();
    all.extend(kills_in(&core.core.out));
    all
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
pub(super) fn up(core: &mut TestCore, now: Instant) -> Vec<Output> {
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
        max_attempts: None,
    })
}

pub(super) fn is_ok(r: &ShimToControl, re: u64) -> bool {
    matches!(r, ShimToControl::Ok(OkReply { re: x, .. }) if *x == re)
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
