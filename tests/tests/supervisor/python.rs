//! The Python echo driver under the real shim: the start and a task, and crash restarts with
//! backoff (skipped loudly when `AGENT_SHIM_PYTHON` is not set).

use anyhow::Result;

use super::lifecycle::{crash_backoff, handshake_and_task};
use super::Driver;
use crate::support::{in_both_modes, Mode};

in_both_modes! {
    fn handshake_events_and_a_task(mode: Mode) -> Result<()> {
        if !crate::drivers::Driver::python_available() {
            return crate::support::skip("python", "AGENT_SHIM_PYTHON not set", module_path!());
        }
        handshake_and_task(mode, Driver::Python)
    }

    fn crash_restarts_with_growing_backoff(mode: Mode) -> Result<()> {
        if !crate::drivers::Driver::python_available() {
            return crate::support::skip("python", "AGENT_SHIM_PYTHON not set", module_path!());
        }
        crash_backoff(mode, Driver::Python)
    }
}
