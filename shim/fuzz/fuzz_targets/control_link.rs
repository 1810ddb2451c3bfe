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

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    agent_shim::fuzz::control_link(data);
});
