//! What the core needs to know of the command line, and nothing else: the core is built from
//! these [`Settings`] (the supervisor makes them from the CLI's `Config`; the core's tests
//! write them directly). The supervisor's own options are the CLI's [`CoreOpts`] group as it
//! is, not a copy of its fields.

use std::ffi::OsString;
use std::time::Duration;

pub use crate::cli::CoreOpts;
use crate::signals::Rewrites;

/// The core's settings: the driver command, the signal and exit options it shares with plain
/// init mode, and the supervisor's [`CoreOpts`].
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// The driver command and its arguments (`command[0]` is the program).
    pub command: Vec<OsString>,
    /// `--grace`: SIGTERM to SIGKILL of a stop.
    pub grace: Duration,
    /// `--rewrite` rules for signals from outside.
    pub rewrites: Rewrites,
    /// `--remap-exit` rules, `(from, to)`; a later rule for the same code wins.
    pub remap_exit: Vec<(u8, u8)>,
    /// `--allow-internal-signals`.
    pub allow_internal_signals: bool,
    /// Restarts, liveness, tasks and execs (`--restart`, `--ping-interval`, `--max-execs`, …).
    pub opts: CoreOpts,
}

impl Settings {
    /// The shim's exit code for the driver's exit `code`, after `--remap-exit`.
    pub fn exit_code(&self, code: i32) -> i32 {
        crate::cli::remap_exit(&self.remap_exit, code)
    }
}
