//! The shim's own modules, compiled once for every fuzz target with `--cfg fuzzing` (which
//! cargo-fuzz sets, enabling `supervisor::core::fuzz`, `control::fuzz` and the fake `Sys`).
//! The targets in `fuzz_targets/` call [`supervisor_core`] and [`control_link`].

// The shim's modules are compiled here for their fuzz entry points only.
#![allow(dead_code, unused_imports)]

#[path = "../../src/cli.rs"]
mod cli;
#[path = "../../src/control/mod.rs"]
mod control;
#[path = "../../src/driver.rs"]
mod driver;
#[path = "../../src/exec.rs"]
mod exec;
#[path = "../../src/init.rs"]
mod init;
#[path = "../../src/limits.rs"]
mod limits;
#[path = "../../src/logging/mod.rs"]
mod logging;
#[path = "../../src/oom.rs"]
mod oom;
#[path = "../../src/reaper.rs"]
mod reaper;
#[path = "../../src/signals.rs"]
mod signals;
#[path = "../../src/spawn.rs"]
mod spawn;
#[path = "../../src/supervisor/mod.rs"]
mod supervisor;
#[path = "../../src/sys.rs"]
mod sys;

/// One input through the supervisor core (`shim/src/supervisor/core/fuzz.rs`).
pub fn supervisor_core(data: &[u8]) {
    supervisor::core::fuzz::run(data);
}

/// One input through the control side (`shim/src/control/fuzz.rs`).
pub fn control_link(data: &[u8]) {
    control::fuzz::run(data);
}
