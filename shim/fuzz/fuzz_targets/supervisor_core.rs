//! Arbitrary inbound message sequences (driver side and control side) through the shim's
//! supervisor core; the decoding of the input and the invariants are in
//! `shim/src/supervisor/core/fuzz.rs`.
//!
//! Run from `shim/` (cargo-fuzz and the nightly toolchain are needed):
//!
//! ```text
//! cargo install cargo-fuzz
//! cargo +nightly fuzz run supervisor_core -- -max_total_time=600
//! ```

#![no_main]
// The shim's modules are compiled here for their supervisor core only.
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
#[path = "../../src/logging.rs"]
mod logging;
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

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    supervisor::core::fuzz::run(data);
});
