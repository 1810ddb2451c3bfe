//! The command line: flags, their `AGENT_SHIM_*` variables, and the help text.
//!
//! Every option can be set by a flag or by an environment variable (container images set
//! variables more easily than they rewrite an ENTRYPOINT); a flag beats its variable, which
//! beats the default. Each option is defined once, in the table of [`defs`]; [`parse()`] reads
//! the command line and the environment through it, and [`help()`] prints it. Parsing is
//! `lexopt` (a few KiB) rather than clap (~150–180 KiB of static binary). Option parsing stops
//! at the first positional argument or at `--`; everything after it is the command, passed
//! through byte for byte.

mod decimal;
mod defs;
mod flag;
mod help;
mod parse;
#[cfg(test)]
mod tests;
mod values;

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

use crate::control::{ControlAddr, Token};
use crate::limits::Limits;
use crate::logging::LogFormat;
use crate::signals::Rewrites;
/// The restart policy of `--restart`.
pub use values::RestartPolicy;

pub use help::{help, version, USAGE};
pub use parse::parse;

/// The variable holding the control token. The shim removes it from its own environment
/// first thing, so no child ever sees it.
pub use crate::driver::TOKEN_VAR;

/// Everything the shim needs to know, plain init mode and supervisor mode.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The command and its arguments, as given (`command[0]` is the program).
    pub command: Vec<OsString>,
    /// Forward signals to the child's process group instead of the child.
    pub pgroup: bool,
    /// How long after SIGTERM/SIGINT before everything is SIGKILLed.
    pub grace: Duration,
    /// As PID 1, how long the leftovers get between SIGTERM and SIGKILL after the child exits.
    pub cleanup_grace: Duration,
    /// How long a forked child may take to `execve` (or report why not) before it is killed
    /// and its start fails (`--spawn-timeout`).
    pub spawn_timeout: Duration,
    /// `--rewrite` rules.
    pub rewrites: Rewrites,
    /// `--remap-exit` rules, `(from, to)`; a later rule for the same code wins.
    pub remap_exit: Vec<(u8, u8)>,
    /// Honour signals from non-root processes inside the PID namespace.
    pub allow_internal_signals: bool,
    /// A [`crate::logging::Targets`] directive list (`warn`, `agent_shim=debug`).
    pub log_level: String,
    /// Log format.
    pub log_format: LogFormat,
    /// `--supervise`: supervisor mode without a control socket.
    pub supervise: bool,
    /// Supervisor-mode options (ignored in plain mode).
    pub sup: SupervisorOpts,
    /// microVM init duties (`--vm`, `--hostname`, `--root`).
    pub vm: crate::vm::VmOpts,
}

/// Where the control token comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenSource {
    /// `--control-token-file PATH`: read (and its permissions checked) at startup.
    File(PathBuf),
    /// The `AGENT_SHIM_TOKEN` variable.
    Env(Token),
}

/// Supervisor-mode options; see the README's "Supervisor mode" section for each.
#[derive(Clone, Debug, PartialEq)]
pub struct SupervisorOpts {
    /// `--control-listen ADDR`.
    pub control_listen: Option<ControlAddr>,
    /// `--control-connect ADDR`.
    pub control_connect: Option<ControlAddr>,
    /// `--control-insecure`.
    pub control_insecure: bool,
    /// `--control-token-file`, else `AGENT_SHIM_TOKEN`.
    pub control_token: Option<TokenSource>,
    /// `--control-reconnect-max`.
    pub control_reconnect_max: Duration,
    /// `--control-idle-timeout`.
    pub control_idle_timeout: Duration,
    /// `--agent-id` (`None`: the hostname).
    pub agent_id: Option<String>,
    /// What the supervisor's core decides with (restarts, liveness, tasks, execs).
    pub core: CoreOpts,
    /// `--event-buffer`.
    pub event_buffer: usize,
    /// `--event-buffer-bytes`.
    pub event_buffer_bytes: usize,
    /// `--max-sessions`.
    pub max_sessions: usize,
    /// `--max-consumers`.
    pub max_consumers: usize,
    /// `--exec-retain`.
    pub exec_retain: usize,
    /// `--exec-history`.
    pub exec_history: usize,
    /// `--exec-history-ttl`.
    pub exec_history_ttl: Duration,
    /// `--workdir`.
    pub workdir: Option<PathBuf>,
    /// `--env-allow` (`None` = every variable).
    pub env_allow: Option<Vec<String>>,
    /// `--env-deny`.
    pub env_deny: Vec<String>,
    /// `--log-line-max`.
    pub log_line_max: usize,
    /// `--log-rate` (0 = unlimited).
    pub log_rate: u32,
    /// `--rlimit`, `--umask`, `--no-new-privs`: for the driver and every exec.
    pub limits: Limits,
    /// `--oom-score-adj DRIVER[:EXEC]`: the children's `oom_score_adj`.
    pub oom_score_adj: crate::oom::ChildScores,
    /// `--fs-root`: where file operations are confined.
    pub fs_root: PathBuf,
    /// `--fs-max-ops`: file operations running at once.
    pub fs_max_ops: usize,
    /// `--fs-max-watches`: watches at once.
    pub fs_max_watches: usize,
    /// `--fs-watch-rate`: events a second per watch.
    pub fs_watch_rate: u32,
    /// `--metrics-interval` (`None`: no periodic `metrics` event).
    pub metrics_interval: Option<Duration>,
}

/// The supervisor options its core decides with; the core's settings are made of these and
/// of the signal and exit options above (see `supervisor::core::Settings`). `Default` is
/// blank (every field empty, zero or off); the flags' defaults are `CoreOpts::flag_defaults`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CoreOpts {
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
    /// `--user UID[:GID]`.
    pub user: Option<(u32, u32)>,
    /// `--max-execs`: execs running at once.
    pub max_execs: usize,
    /// `--exec-kill-grace`: SIGTERM to SIGKILL of an exec's group.
    pub exec_kill_grace: Duration,
    /// `--exec-drain`: after an exec's process exits, how long its output is still read.
    pub exec_drain: Duration,
    /// `--max-attempts`: deliveries of a `redeliver` task that gives no `max_attempts`.
    pub max_attempts: u32,
}

impl CoreOpts {
    /// The defaults of the flag table.
    pub fn flag_defaults() -> Self {
        Config::default().sup.core
    }
}

impl Default for SupervisorOpts {
    /// The defaults of the flag table.
    fn default() -> Self {
        Config::default().sup
    }
}

impl Default for Config {
    /// The defaults of the flag table: each flag's shown default run through its setter.
    fn default() -> Self {
        let mut c = Config::blank();
        for flag in defs::FLAGS {
            if let flag::Shown::Value(v) = flag.default {
                // Every default parses (tested in `defs`); a bad one would keep the blank.
                let _ = (flag.set)(&mut c, v);
            }
        }
        c
    }
}

impl Config {
    /// Every field empty, zero or off: what a flag whose default is not a value (`none`,
    /// `off`, `the shim's`) leaves.
    fn blank() -> Self {
        Config {
            command: Vec::new(),
            pgroup: false,
            grace: Duration::ZERO,
            cleanup_grace: Duration::ZERO,
            spawn_timeout: Duration::ZERO,
            rewrites: Rewrites::default(),
            remap_exit: Vec::new(),
            allow_internal_signals: false,
            log_level: String::new(),
            log_format: LogFormat::Text,
            supervise: false,
            sup: SupervisorOpts {
                control_listen: None,
                control_connect: None,
                control_insecure: false,
                control_token: None,
                control_reconnect_max: Duration::ZERO,
                control_idle_timeout: Duration::ZERO,
                agent_id: None,
                core: CoreOpts::default(),
                event_buffer: 0,
                event_buffer_bytes: 0,
                max_sessions: 0,
                max_consumers: 0,
                exec_retain: 0,
                exec_history: 0,
                exec_history_ttl: Duration::ZERO,
                workdir: None,
                env_allow: None,
                env_deny: Vec::new(),
                log_line_max: 0,
                log_rate: 0,
                limits: Limits::default(),
                oom_score_adj: crate::oom::ChildScores::default(),
                fs_root: PathBuf::new(),
                fs_max_ops: 0,
                fs_max_watches: 0,
                fs_watch_rate: 0,
                metrics_interval: None,
            },
            vm: crate::vm::VmOpts::default(),
        }
    }
}

impl Config {
    /// Whether supervisor mode is on (`--supervise`, `--control-listen` or
    /// `--control-connect`).
    pub fn supervisor_mode(&self) -> bool {
        self.supervise || self.sup.control_listen.is_some() || self.sup.control_connect.is_some()
    }
}

impl Config {
    /// The shim's exit code for a child's exit `code` (already 128+N for signal N), after
    /// `--remap-exit`.
    pub fn exit_code(&self, code: i32) -> i32 {
        remap_exit(&self.remap_exit, code)
    }
}

/// The exit code for `code` after the `--remap-exit` `rules` (the last rule for it wins).
pub fn remap_exit(rules: &[(u8, u8)], code: i32) -> i32 {
    rules
        .iter()
        .rev()
        .find(|(from, _)| i32::from(*from) == code)
        .map_or(code, |(_, to)| i32::from(*to))
}

/// What the command line asked for.
#[derive(Debug, PartialEq)]
pub enum Action {
    /// Run the command.
    Run(Box<Config>),
    /// `--help`.
    Help,
    /// `--version`.
    Version,
}

/// A usage error: the message is printed with the usage summary, and the shim exits 2.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{0}")]
pub struct UsageError(String);

impl From<lexopt::Error> for UsageError {
    fn from(e: lexopt::Error) -> Self {
        UsageError(e.to_string())
    }
}
