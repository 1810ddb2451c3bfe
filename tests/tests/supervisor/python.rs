//! The Python echo driver under the real shim: the start and a task, and crash restarts with
//! backoff (skipped loudly when `AGENT_SHIM_PYTHON` is not set).

use anyhow::Result;

use super::lifecycle::{crash_backoff, handshake_and_task};
use super::Driver;
use crate::support::{in_both_modes, Mode};

/// Whether the Python driver can run; prints a loud skip line when not.
fn python_or_skip(test: &str) -> bool {
    let ok = crate::drivers::Driver::python_available();
    if !ok {
        eprintln!("SKIPPED (AGENT_SHIM_PYTHON not set): {test}");
    }
    ok
}

in_both_modes! {
    fn handshake_events_and_a_task(mode: Mode) -> Result<()> {
        if !python_or_skip(module_path!()) {
            return Ok(());
        }
        handshake_and_task(mode, Driver::Python)
    }

    fn crash_restarts_with_growing_backoff(mode: Mode) -> Result<()> {
        if !python_or_skip(module_path!()) {
            return Ok(());
        }
        crash_backoff(mode, Driver::Python)
    }
}
