//! The control side of the shim before and around the live connection: handshakes (hello,
//! auth with and without a token) and the replay buffer under ack and resume cursors; the
//! decoding of the input and the invariants are in `shim/src/control/fuzz.rs`.
//!
//! Run from `shim/` (cargo-fuzz and the nightly toolchain are needed):
//!
//! ```text
//! cargo install cargo-fuzz
//! cargo +nightly fuzz run control_link -- -max_total_time=600
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
    control::fuzz::run(data);
});
