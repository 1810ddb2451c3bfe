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

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    agent_shim::fuzz::supervisor_core(data);
});
