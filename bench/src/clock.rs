//! One clock for every timestamp, in the bench and in its helper processes.
//!
//! `CLOCK_MONOTONIC` is system-wide (PID namespaces do not change it), so a timestamp taken
//! in a child inside a fresh PID namespace can be subtracted from one taken by the bench.

/// Nanoseconds of `CLOCK_MONOTONIC`.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}
