//! What the core needs to know of the command line, and nothing else: the core is built from
//! these [`Settings`] (the supervisor makes them from the CLI's `Config`; the core's tests
//! write them directly).

use std::ffi::OsString;
use std::time::Duration;

use crate::signals::Rewrites;
use crate::supervisor::restart::RestartPolicy;

/// The core's settings; each field is the flag of the same name.
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
    /// `--restart`.
    pub restart: RestartPolicy,
    /// `--backoff-initial`.
    pub backoff_initial: Duration,
    /// `--backoff-max`.
    pub backoff_max: Duration,
    /// `--backoff-factor`.
    pub backoff_factor: f64,
    /// `--backoff-jitter`.
    pub backoff_jitter: f64,
    /// `--backoff-reset`.
    pub backoff_reset: Duration,
    /// `--crash-loop-restarts`.
    pub crash_loop_restarts: u32,
    /// `--crash-loop-window`.
    pub crash_loop_window: Duration,
    /// `--ready-timeout`.
    pub ready_timeout: Duration,
    /// `--ping-interval` (zero disables pings).
    pub ping_interval: Duration,
    /// `--ping-misses`.
    pub ping_misses: u32,
    /// `--pause-timeout`.
    pub pause_timeout: Duration,
    /// `--idle-after` (`None`: idle detection is off).
    pub idle_after: Option<Duration>,
    /// `--cancel-grace`.
    pub cancel_grace: Duration,
    /// `--task-queue`.
    pub task_queue: usize,
    /// `--user UID[:GID]` (a driver confined to a non-root uid cannot ask for root).
    pub user: Option<(u32, u32)>,
    /// `--max-execs`.
    pub max_execs: usize,
    /// `--exec-kill-grace`.
    pub exec_kill_grace: Duration,
    /// `--exec-drain`.
    pub exec_drain: Duration,
}

impl Settings {
    /// The shim's exit code for the driver's exit `code`, after `--remap-exit`.
    pub fn exit_code(&self, code: i32) -> i32 {
        crate::cli::remap_exit(&self.remap_exit, code)
    }
}
