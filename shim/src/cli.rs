//! The command line: flags, their `AGENT_SHIM_*` variables, and the help text.
//!
//! Every option can be set by a flag or by an environment variable (container images set
//! variables more easily than they rewrite an ENTRYPOINT); a flag beats its variable, which
//! beats the default. Parsing is `lexopt` (a few KiB) rather than clap (~150–180 KiB of static
//! binary). Option parsing stops at the first positional argument or at `--`; everything
//! after it is the command, passed through byte for byte.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

use crate::logging::LogFormat;
use crate::control::{ControlAddr, Token, DEFAULT_IDLE_TIMEOUT, DEFAULT_RECONNECT_MAX};
use crate::signals::{self, Rewrites};

/// The variable holding the control token. The shim removes it from its own environment
/// first thing, so no child ever sees it.
pub const TOKEN_VAR: &str = driver_protocol::token::TOKEN_ENV;

/// Default `--grace`.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(8);
/// Default `--cleanup-grace`.
pub const DEFAULT_CLEANUP_GRACE: Duration = Duration::from_secs(2);
/// Default `--spawn-timeout`.
pub const DEFAULT_SPAWN_TIMEOUT: Duration = Duration::from_secs(5);

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
}

use crate::limits::{self, Limits};
use crate::supervisor::restart::ParsePolicyError;
/// The restart policy of `--restart`.
pub use crate::supervisor::restart::RestartPolicy;

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
    /// `--event-buffer`.
    pub event_buffer: usize,
    /// `--event-buffer-bytes`.
    pub event_buffer_bytes: usize,
    /// `--user UID[:GID]`.
    pub user: Option<(u32, u32)>,
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
    /// `--max-execs`: execs running at once.
    pub max_execs: usize,
    /// `--exec-kill-grace`: SIGTERM to SIGKILL of an exec's group.
    pub exec_kill_grace: Duration,
    /// `--exec-drain`: after an exec's process exits, how long its output is still read.
    pub exec_drain: Duration,
    /// `--oom-score-adj DRIVER[:EXEC]`: the children's `oom_score_adj`.
    pub oom_score_adj: crate::oom::ChildScores,
}

impl Default for SupervisorOpts {
    fn default() -> Self {
        SupervisorOpts {
            control_listen: None,
            control_connect: None,
            control_insecure: false,
            control_token: None,
            control_reconnect_max: DEFAULT_RECONNECT_MAX,
            control_idle_timeout: DEFAULT_IDLE_TIMEOUT,
            agent_id: None,
            restart: RestartPolicy::OnFailure,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            backoff_factor: 2.0,
            backoff_jitter: 0.1,
            backoff_reset: Duration::from_secs(60),
            crash_loop_restarts: 5,
            crash_loop_window: Duration::from_secs(60),
            ready_timeout: Duration::from_secs(30),
            ping_interval: Duration::from_secs(10),
            ping_misses: 3,
            pause_timeout: Duration::from_secs(10),
            idle_after: None,
            cancel_grace: Duration::from_secs(5),
            task_queue: 64,
            event_buffer: 4096,
            event_buffer_bytes: 8 * 1024 * 1024,
            user: None,
            workdir: None,
            env_allow: None,
            env_deny: Vec::new(),
            log_line_max: 4096,
            log_rate: 100,
            limits: Limits::default(),
            max_execs: 128,
            exec_kill_grace: Duration::from_secs(2),
            exec_drain: Duration::from_millis(200),
            oom_score_adj: crate::oom::ChildScores::default(),
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

impl Default for Config {
    fn default() -> Self {
        Config {
            command: Vec::new(),
            pgroup: false,
            grace: DEFAULT_GRACE,
            cleanup_grace: DEFAULT_CLEANUP_GRACE,
            spawn_timeout: DEFAULT_SPAWN_TIMEOUT,
            rewrites: Rewrites::default(),
            remap_exit: Vec::new(),
            allow_internal_signals: false,
            log_level: "warn".to_owned(),
            log_format: LogFormat::Text,
            supervise: false,
            sup: SupervisorOpts::default(),
        }
    }
}

impl Config {
    /// The shim's exit code for a child's exit `code` (already 128+N for signal N), after
    /// `--remap-exit`.
    pub fn exit_code(&self, code: i32) -> i32 {
        self.remap_exit
            .iter()
            .rev()
            .find(|(from, _)| i32::from(*from) == code)
            .map_or(code, |(_, to)| i32::from(*to))
    }
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

/// The usage summary printed with every usage error.
pub const USAGE: &str = "usage: agent-shim [OPTIONS] [--] CMD [ARGS...]";

/// The `--help` text.
pub fn help() -> String {
    format!(
        "agent-shim {version}: PID 1 for containers and agent sandboxes.
Runs CMD as its child, reaps every zombie, forwards signals, exits with CMD's status.

{USAGE}

Options (each also settable by the environment variable shown; a flag beats its variable):
  -g, --pgroup               forward signals to CMD's process group, not only CMD
                             [AGENT_SHIM_PGROUP]
      --grace DUR            after SIGTERM/SIGINT, SIGKILL whatever is left after DUR
                             [AGENT_SHIM_GRACE, default 8s]
      --cleanup-grace DUR    as PID 1, after CMD exits: SIGTERM the rest, SIGKILL after DUR
                             [AGENT_SHIM_CLEANUP_GRACE, default 2s]
      --spawn-timeout DUR    a started child that has neither exec'd nor failed after DUR
                             is killed and its start fails [AGENT_SHIM_SPAWN_TIMEOUT,
                             default 5s]
      --rewrite FROM:TO      forward signal FROM as TO (TO = 0 drops it); repeatable
                             [AGENT_SHIM_REWRITE, comma-separated]
      --remap-exit FROM:TO   exit with TO when CMD's exit code is FROM; repeatable
                             [AGENT_SHIM_REMAP_EXIT, comma-separated]
      --allow-internal-signals
                             as PID 1, honour signals from non-root processes inside the
                             container [AGENT_SHIM_ALLOW_INTERNAL_SIGNALS]
      --log-level LEVEL      error|warn|info|debug|trace or target=level,...
                             [AGENT_SHIM_LOG, default warn]
      --log-format FMT       text|json [AGENT_SHIM_LOG_FORMAT, default text]
  -h, --help                 print this help
  -V, --version              print the version

Supervisor mode (CMD is an agent driver speaking the driver protocol; each flag also has its
AGENT_SHIM_* variable, e.g. --ping-interval is AGENT_SHIM_PING_INTERVAL):
      --supervise            supervise CMD without a control link
      --control-listen ADDR  serve the control protocol on ADDR: unix:PATH, tcp:HOST:PORT
                             ([v6] in brackets) or vsock:CID:PORT (CID a number or any)
      --control-connect ADDR dial the control plane at ADDR whenever no control connection
                             is live (reconnects with backoff); may be used with --control-listen
      --control-token-file PATH
                             the shared token (file mode 0600 or stricter, owned by us or
                             root); else from AGENT_SHIM_TOKEN. Required for tcp and vsock
      --control-insecure     allow a unix control socket without a token
      --control-reconnect-max DUR
                             cap of the dial-out backoff [5s]
      --control-idle-timeout DUR
                             a dialed connection with nothing from the control plane for
                             this long is closed and redialed [60s]
      --agent-id ID          sent in the shim's hello [AGENT_SHIM_AGENT_ID, default hostname]
      --restart POLICY       never|on-failure|always [default on-failure]
      --backoff-initial DUR  first restart delay [200ms]
      --backoff-max DUR      restart delay cap [30s]
      --backoff-factor F     delay multiplier per consecutive restart [2]
      --backoff-jitter F     +/- random fraction of each delay [0.1]
      --backoff-reset DUR    a run this long resets the backoff [60s]
      --crash-loop-restarts N, --crash-loop-window DUR
                             N restarts within DUR: state error, no more restarts [5, 60s]
      --ready-timeout DUR    launch to ready [30s]
      --ping-interval DUR    liveness ping period, 0 disables [10s]
      --ping-misses K        unanswered pings before the driver counts as hung [3]
      --pause-timeout DUR    time the driver has to reach a safe point [10s]
      --idle-after DUR       no task, no exec, no driver event for DUR: event idle [off]
      --cancel-grace DUR     default cancel grace [5s]
      --task-queue N         queued tasks [64]
      --event-buffer N, --event-buffer-bytes N
                             unacknowledged events kept for replay [4096, 8388608]
      --user UID[:GID]       run the driver as this user (supplementary groups dropped)
      --workdir DIR          the driver's working directory
      --env-allow NAME,...   only these variables reach the driver
      --env-deny NAME,...    these variables never reach the driver
      --log-line-max BYTES   driver output lines are cut at BYTES [4096]
      --log-rate N           driver output lines per second turned into events [100]

Sandbox limits (the driver and every exec) and tool execution:
      --rlimit NAME=SOFT[:HARD]
                             NOFILE, NPROC, AS, CPU or CORE; repeatable [AGENT_SHIM_RLIMIT]
      --umask MODE           octal, e.g. 022
      --no-new-privs         set no_new_privs (setuid bits grant nothing)
      --max-execs N          execs running at once; more are refused [128]
      --exec-kill-grace DUR  an exec's group gets SIGKILL this long after SIGTERM [2s]
      --exec-drain DUR       output still read after an exec's process exits [200ms]
      --oom-score-adj DRIVER[:EXEC]
                             oom_score_adj of the driver and of every exec, -1000..1000; the
                             shim itself goes to -1000 (needs CAP_SYS_RESOURCE) [500:1000]

DUR: 500ms, 8s, 2m, or a number of seconds (8, 0.5).
Signals: TERM, SIGTERM, 15, RTMIN+1... Booleans in the environment: 1/true/yes, 0/false/no.
Exit codes: CMD's code, 128+N if CMD died of signal N, 2 usage error, 125 the shim failed
(also: the token file is unreadable, empty, or group/other-accessible), 126 CMD not
executable, 127 CMD not found.
",
        version = env!("CARGO_PKG_VERSION")
    )
}

/// The `--version` line.
pub fn version() -> String {
    format!("agent-shim {}", env!("CARGO_PKG_VERSION"))
}

/// Parses a duration: `500ms`, `8s`, `2m`, `1h`, or a bare (possibly fractional) number of
/// seconds, rounded to the nearest nanosecond.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    const NANOS_PER_SEC: u128 = 1_000_000_000;
    let s = s.trim();
    let (num, unit_ns) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1_000_000)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, NANOS_PER_SEC)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60 * NANOS_PER_SEC)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600 * NANOS_PER_SEC)
    } else {
        (s, NANOS_PER_SEC)
    };
    let bad = || format!("invalid duration {s:?} (expected e.g. 500ms, 8s, 2m, 0.5)");
    let num = num.trim();
    if num.starts_with(['+', '-']) {
        return Err(bad());
    }
    let d = Decimal::parse(num).ok_or_else(bad)?;
    let nanos = d.scaled(unit_ns).ok_or_else(bad)?;
    let secs = u64::try_from(nanos / NANOS_PER_SEC).map_err(|_| bad())?;
    // The remainder is below 10^9.
    let sub = u32::try_from(nanos % NANOS_PER_SEC).map_err(|_| bad())?;
    Ok(Duration::new(secs, sub))
}

/// `--spawn-timeout`: a duration above zero (a zero deadline would fail every start).
fn parse_spawn_timeout(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err("the spawn timeout must be above zero".to_owned());
    }
    Ok(d)
}

/// A decimal number as `f64::from_str` writes it (`12`, `0.5`, `.5`, `5.`, `1e3`, `-2.5E-1`),
/// without the float parser: `mantissa * 10^exp`, keeping the first 19 significant digits.
/// (`f64`'s parser and its tables are about 15 KiB of the static binary, for two options.)
#[derive(Clone, Copy, Debug, PartialEq)]
struct Decimal {
    negative: bool,
    mantissa: u64,
    exp: i32,
}

impl Decimal {
    fn parse(s: &str) -> Option<Self> {
        let (negative, s) = match s.as_bytes().first() {
            Some(b'-') => (true, s.get(1..)?),
            Some(b'+') => (false, s.get(1..)?),
            _ => (false, s),
        };
        let (number, exp) = match s.find(['e', 'E']) {
            Some(i) => (s.get(..i)?, Some(s.get(i + 1..)?)),
            None => (s, None),
        };
        let (int, frac) = number.split_once('.').unwrap_or((number, ""));
        if int.is_empty() && frac.is_empty() {
            return None;
        }
        let mut mantissa: u64 = 0;
        let mut exp10: i64 = 0;
        let mut digits = 0;
        for (i, b) in int.bytes().chain(frac.bytes()).enumerate() {
            if !b.is_ascii_digit() {
                return None;
            }
            let in_frac = i >= int.len();
            if mantissa == 0 && b == b'0' {
                // A leading zero is not a significant digit.
                exp10 -= i64::from(in_frac);
                continue;
            }
            if digits < 19 {
                mantissa = mantissa * 10 + u64::from(b - b'0');
                digits += 1;
                exp10 -= i64::from(in_frac);
            } else {
                exp10 += i64::from(!in_frac);
            }
        }
        if let Some(e) = exp {
            let (neg, digits) = match e.as_bytes().first() {
                Some(b'-') => (true, e.get(1..)?),
                Some(b'+') => (false, e.get(1..)?),
                _ => (false, e),
            };
            if digits.is_empty() {
                return None;
            }
            let mut n: i64 = 0;
            for b in digits.bytes() {
                if !b.is_ascii_digit() {
                    return None;
                }
                n = (n * 10 + i64::from(b - b'0')).min(1 << 40);
            }
            exp10 += if neg { -n } else { n };
        }
        Some(Self {
            negative,
            mantissa,
            exp: i32::try_from(exp10.clamp(-100_000, 100_000)).unwrap_or_default(),
        })
    }

    /// `|self| * unit`, rounded to the nearest integer; `None` if it overflows `u128`.
    fn scaled(self, unit: u128) -> Option<u128> {
        if self.mantissa == 0 {
            return Some(0);
        }
        let v = u128::from(self.mantissa) * unit;
        if self.exp >= 0 {
            let mut v = v;
            for _ in 0..self.exp {
                v = v.checked_mul(10)?;
            }
            Some(v)
        } else if self.exp < -38 {
            Some(0)
        } else {
            let d = 10u128.pow(self.exp.unsigned_abs());
            let (q, r) = (v / d, v % d);
            Some(if r >= d - r { q + 1 } else { q })
        }
    }

    /// The nearest `f64` (exactly the nearest when the mantissa has at most 15 digits and
    /// `|exp| <= 22`, which covers every sensible factor).
    fn to_f64(self) -> f64 {
        if self.mantissa == 0 {
            // `0e400` is zero, not 0 × ∞.
            return 0.0;
        }
        // The mantissa is below 10^19; the conversion rounds to the nearest.
        let m = self.mantissa as f64;
        let v = if self.exp >= 0 {
            m * 10f64.powi(self.exp)
        } else {
            m / 10f64.powi(-self.exp)
        };
        if self.negative {
            -v
        } else {
            v
        }
    }
}

/// Parses a `--remap-exit` pair `FROM:TO` of exit codes 0–255.
pub fn parse_exit_pair(s: &str) -> Result<(u8, u8), String> {
    let (from, to) = s
        .split_once(':')
        .ok_or_else(|| format!("expected FROM:TO, got {s:?}"))?;
    let code = |c: &str| {
        c.trim()
            .parse::<u8>()
            .map_err(|_| format!("invalid exit code {c:?} (expected 0-255)"))
    };
    Ok((code(from)?, code(to)?))
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        _ => Err(format!(
            "invalid boolean {s:?} (expected 1/true/yes or 0/false/no)"
        )),
    }
}

/// Validates a log level: `LEVEL` or a comma-separated list of `LEVEL` / `target=LEVEL`.
/// (A bare word is a *target* to `Targets`, so `loud` would silently mean "trace for target
/// loud"; it is rejected here instead.)
fn parse_log_level(s: &str) -> Result<String, String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let s = s.trim();
    let bad = || {
        format!("invalid log level {s:?} (expected error|warn|info|debug|trace|off or target=level,...)")
    };
    for part in s.split(',').map(str::trim) {
        let level =
            part.split_once('=').map_or(
                part,
                |(target, level)| {
                    if target.trim().is_empty() {
                        ""
                    } else {
                        level
                    }
                },
            );
        if !LEVELS.contains(&level.trim().to_ascii_lowercase().as_str()) {
            return Err(bad());
        }
    }
    // Spaces around the parts and their `=` are not part of the names.
    let normalized = s
        .split(',')
        .map(|part| match part.split_once('=') {
            Some((target, level)) => format!("{}={}", target.trim(), level.trim()),
            None => part.trim().to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",");
    crate::logging::Targets::parse(&normalized)
        .map(|_| normalized)
        .map_err(|_| bad())
}

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err(format!("invalid log format {s:?} (expected text or json)")),
    }
}

fn list(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').map(str::trim).filter(|p| !p.is_empty())
}

/// Prefixes an error with where the value came from.
fn ctx<T>(source: &str, r: Result<T, String>) -> Result<T, UsageError> {
    r.map_err(|e| UsageError(format!("{source}: {e}")))
}

fn from_var<T>(
    value: Option<String>,
    name: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Option<T>, UsageError> {
    value.map(|v| ctx(name, parse(&v))).transpose()
}

fn from_list<T>(
    value: Option<String>,
    name: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Vec<T>, UsageError> {
    value.as_deref().map_or(Ok(Vec::new()), |v| {
        list(v).map(|p| ctx(name, parse(p))).collect()
    })
}

/// The options given as flags; `None` = not given.
#[derive(Default)]
struct Flags {
    pgroup: Option<bool>,
    grace: Option<Duration>,
    cleanup_grace: Option<Duration>,
    spawn_timeout: Option<Duration>,
    rewrites: Option<Vec<(i32, i32)>>,
    remap_exit: Option<Vec<(u8, u8)>>,
    allow_internal_signals: Option<bool>,
    log_level: Option<String>,
    log_format: Option<LogFormat>,
}

fn utf8(source: &str, v: OsString) -> Result<String, UsageError> {
    v.into_string()
        .map_err(|_| UsageError(format!("{source}: value is not valid UTF-8")))
}

/// Supervisor-mode flags without a value.
const SUP_SWITCHES: &[&str] = &["supervise", "control-insecure", "no-new-privs"];

/// Supervisor-mode flags with a value.
const SUP_VALUES: &[&str] = &[
    "control-listen",
    "control-connect",
    "control-token-file",
    "control-reconnect-max",
    "control-idle-timeout",
    "agent-id",
    "restart",
    "backoff-initial",
    "backoff-max",
    "backoff-factor",
    "backoff-jitter",
    "backoff-reset",
    "crash-loop-restarts",
    "crash-loop-window",
    "ready-timeout",
    "ping-interval",
    "ping-misses",
    "pause-timeout",
    "idle-after",
    "cancel-grace",
    "task-queue",
    "event-buffer",
    "event-buffer-bytes",
    "user",
    "workdir",
    "env-allow",
    "env-deny",
    "log-line-max",
    "log-rate",
    "umask",
    "max-execs",
    "exec-kill-grace",
    "exec-drain",
    "oom-score-adj",
];

fn parse_num<T: std::str::FromStr>(s: &str) -> Result<T, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("invalid number {s:?}"))
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let unsigned = t.strip_prefix(['+', '-']).unwrap_or(t).to_ascii_lowercase();
    let Some(d) = Decimal::parse(t) else {
        // `inf` and `nan` are numbers, just not acceptable ones.
        return Err(if ["inf", "infinity", "nan"].contains(&unsigned.as_str()) {
            format!("invalid number {s:?} (expected a finite number >= 0)")
        } else {
            format!("invalid number {s:?}")
        });
    };
    let v = d.to_f64();
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(format!(
            "invalid number {s:?} (expected a finite number >= 0)"
        ))
    }
}

fn parse_restart(s: &str) -> Result<RestartPolicy, String> {
    s.trim()
        .parse()
        .map_err(|e: ParsePolicyError| e.to_string())
}

fn parse_control_addr(s: &str) -> Result<Option<ControlAddr>, String> {
    s.parse()
        .map(Some)
        .map_err(|e: driver_protocol::net::AddrError| e.to_string())
}

fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!("{s:?} must be more than zero")),
        d => Ok(d),
    }
}

fn parse_names(s: &str) -> Result<Vec<String>, String> {
    Ok(list(s).map(str::to_owned).collect())
}

/// Resolves the supervisor flags (given as flags in `flags`, else from their variables).
fn supervisor_opts(
    flags: &BTreeMap<String, String>,
    var: &dyn Fn(&str) -> Result<Option<String>, UsageError>,
    env_token: Option<OsString>,
) -> Result<(bool, SupervisorOpts), UsageError> {
    // The value of flag `name` and where it came from.
    let get = |name: &str| -> Result<Option<(String, String)>, UsageError> {
        if let Some(v) = flags.get(name) {
            return Ok(Some((format!("--{name}"), v.clone())));
        }
        let var_name = format!("AGENT_SHIM_{}", name.to_ascii_uppercase().replace('-', "_"));
        Ok(var(&var_name)?.map(|v| (var_name, v)))
    };
    fn one<T>(
        got: Option<(String, String)>,
        default: T,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<T, UsageError> {
        match got {
            Some((source, v)) => ctx(&source, parse(&v)),
            None => Ok(default),
        }
    }
    let d = SupervisorOpts::default();
    let supervise = one(get("supervise")?, false, parse_bool)?;
    let control_insecure = one(get("control-insecure")?, false, parse_bool)?;
    let control_listen = one(get("control-listen")?, None, parse_control_addr)?;
    let control_connect = one(get("control-connect")?, None, parse_control_addr)?;
    let token_file = one(get("control-token-file")?, None, |s| {
        Ok(Some(PathBuf::from(s)))
    })?;
    // The token matters only with a control link: plain mode ignores an empty variable.
    let linked = control_listen.is_some() || control_connect.is_some();
    let env_token = env_token.filter(|_| linked);
    let control_token = match (token_file, env_token) {
        (Some(path), _) => Some(TokenSource::File(path)),
        (None, Some(v)) => {
            use std::os::unix::ffi::OsStringExt as _;
            let token = Token::from_line(v.into_vec())
                .map_err(|_| UsageError(format!("{TOKEN_VAR} is empty")))?;
            Some(TokenSource::Env(token))
        }
        (None, None) => None,
    };
    if control_token.is_none() {
        for (flag, addr) in [
            ("--control-listen", &control_listen),
            ("--control-connect", &control_connect),
        ] {
            match addr {
                Some(addr) if addr.is_network() => {
                    return Err(UsageError(format!(
                        "{flag} {addr} needs a token: --control-token-file PATH or {TOKEN_VAR}"
                    )))
                }
                Some(addr) if !control_insecure => {
                    return Err(UsageError(format!(
                        "{flag} {addr} needs a token (--control-token-file PATH or \
                         {TOKEN_VAR}) or --control-insecure"
                    )))
                }
                _ => {}
            }
        }
    }
    let sup = SupervisorOpts {
        control_listen,
        control_connect,
        control_insecure,
        control_token,
        control_reconnect_max: one(
            get("control-reconnect-max")?,
            d.control_reconnect_max,
            parse_positive_duration,
        )?,
        control_idle_timeout: one(
            get("control-idle-timeout")?,
            d.control_idle_timeout,
            parse_positive_duration,
        )?,
        agent_id: one(get("agent-id")?, None, |s| {
            let s = s.trim();
            if s.is_empty() {
                Err("the agent id is empty".to_owned())
            } else {
                Ok(Some(s.to_owned()))
            }
        })?,
        restart: one(get("restart")?, d.restart, parse_restart)?,
        backoff_initial: one(get("backoff-initial")?, d.backoff_initial, parse_duration)?,
        backoff_max: one(get("backoff-max")?, d.backoff_max, parse_duration)?,
        backoff_factor: one(get("backoff-factor")?, d.backoff_factor, parse_fraction)?,
        backoff_jitter: one(get("backoff-jitter")?, d.backoff_jitter, parse_fraction)?,
        backoff_reset: one(get("backoff-reset")?, d.backoff_reset, parse_duration)?,
        crash_loop_restarts: one(
            get("crash-loop-restarts")?,
            d.crash_loop_restarts,
            parse_num,
        )?,
        crash_loop_window: one(
            get("crash-loop-window")?,
            d.crash_loop_window,
            parse_duration,
        )?,
        ready_timeout: one(get("ready-timeout")?, d.ready_timeout, parse_duration)?,
        ping_interval: one(get("ping-interval")?, d.ping_interval, parse_duration)?,
        ping_misses: one(get("ping-misses")?, d.ping_misses, parse_num)?,
        pause_timeout: one(get("pause-timeout")?, d.pause_timeout, parse_duration)?,
        idle_after: one(get("idle-after")?, None, |s| {
            parse_positive_duration(s).map(Some)
        })?,
        cancel_grace: one(get("cancel-grace")?, d.cancel_grace, parse_duration)?,
        task_queue: one(get("task-queue")?, d.task_queue, parse_num)?,
        event_buffer: one(get("event-buffer")?, d.event_buffer, parse_num)?,
        event_buffer_bytes: one(get("event-buffer-bytes")?, d.event_buffer_bytes, parse_num)?,
        user: one(get("user")?, None, |s| {
            crate::driver::parse_user(s).map(Some)
        })?,
        workdir: one(get("workdir")?, None, |s| Ok(Some(PathBuf::from(s))))?,
        env_allow: one(get("env-allow")?, None, |s| parse_names(s).map(Some))?,
        env_deny: one(get("env-deny")?, Vec::new(), parse_names)?,
        log_line_max: one(get("log-line-max")?, d.log_line_max, parse_num)?,
        log_rate: one(get("log-rate")?, d.log_rate, parse_num)?,
        limits: Limits {
            rlimits: one(get("rlimit")?, Vec::new(), |s| {
                list(s).map(limits::parse_rlimit).collect()
            })?,
            umask: one(get("umask")?, None, |s| limits::parse_umask(s).map(Some))?,
            no_new_privs: one(get("no-new-privs")?, false, parse_bool)?,
            oom_score_adj: None,
        },
        max_execs: one(get("max-execs")?, d.max_execs, |s| {
            parse_num(s).and_then(|n: usize| {
                if n == 0 {
                    Err("must be at least 1".to_owned())
                } else {
                    Ok(n)
                }
            })
        })?,
        exec_kill_grace: one(get("exec-kill-grace")?, d.exec_kill_grace, parse_duration)?,
        exec_drain: one(get("exec-drain")?, d.exec_drain, parse_duration)?,
        oom_score_adj: one(
            get("oom-score-adj")?,
            d.oom_score_adj,
            crate::oom::parse_child_scores,
        )?,
    };
    Ok((supervise, sup))
}

/// Parses the command line (`args` without the program name) and the environment (`env`
/// looks a variable up).
pub fn parse<I, E>(args: I, env: E) -> Result<Action, UsageError>
where
    I: IntoIterator<Item = OsString>,
    E: Fn(&str) -> Option<OsString>,
{
    use lexopt::Arg::{Long, Short, Value};

    // 1. Flags. Repeatable list flags, when given, replace the variable's list as a whole.
    let mut f = Flags::default();
    let mut sup_flags = BTreeMap::new();
    let mut command = Vec::new();
    let mut p = lexopt::Parser::from_args(args);
    while let Some(arg) = p.next()? {
        match arg {
            Short('h') | Long("help") => return Ok(Action::Help),
            Short('V') | Long("version") => return Ok(Action::Version),
            Short('g') | Long("pgroup") => f.pgroup = Some(true),
            Long("allow-internal-signals") => f.allow_internal_signals = Some(true),
            Long("grace") => {
                let v = utf8("--grace", p.value()?)?;
                f.grace = Some(ctx("--grace", parse_duration(&v))?);
            }
            Long("cleanup-grace") => {
                let v = utf8("--cleanup-grace", p.value()?)?;
                f.cleanup_grace = Some(ctx("--cleanup-grace", parse_duration(&v))?);
            }
            Long("spawn-timeout") => {
                let v = utf8("--spawn-timeout", p.value()?)?;
                f.spawn_timeout = Some(ctx("--spawn-timeout", parse_spawn_timeout(&v))?);
            }
            Long("rewrite") => {
                let v = utf8("--rewrite", p.value()?)?;
                let pair = ctx("--rewrite", signals::parse_rewrite(&v))?;
                f.rewrites.get_or_insert_with(Vec::new).push(pair);
            }
            Long("remap-exit") => {
                let v = utf8("--remap-exit", p.value()?)?;
                let pair = ctx("--remap-exit", parse_exit_pair(&v))?;
                f.remap_exit.get_or_insert_with(Vec::new).push(pair);
            }
            Long("log-level") => {
                let v = utf8("--log-level", p.value()?)?;
                f.log_level = Some(ctx("--log-level", parse_log_level(&v))?);
            }
            Long("log-format") => {
                let v = utf8("--log-format", p.value()?)?;
                f.log_format = Some(ctx("--log-format", parse_log_format(&v))?);
            }
            Long("rlimit") => {
                // Repeatable: the values are kept as one comma-separated list, like the
                // variable's.
                let v = utf8("--rlimit", p.value()?)?;
                sup_flags
                    .entry("rlimit".to_owned())
                    .and_modify(|all: &mut String| {
                        all.push(',');
                        all.push_str(&v);
                    })
                    .or_insert(v);
            }
            Long(name) if SUP_SWITCHES.contains(&name) => {
                sup_flags.insert(name.to_owned(), "1".to_owned());
            }
            Long(name) if SUP_VALUES.contains(&name) => {
                let name = name.to_owned();
                let v = utf8(&format!("--{name}"), p.value()?)?;
                let once = ["control-listen", "control-connect"].contains(&name.as_str());
                if sup_flags.insert(name.clone(), v).is_some() && once {
                    return Err(UsageError(format!("--{name} may be given only once")));
                }
            }
            Value(program) => {
                command.push(program);
                command.extend(p.raw_args()?);
                break;
            }
            other => return Err(other.unexpected().into()),
        }
    }
    if command.is_empty() {
        return Err(UsageError("no command given".to_owned()));
    }

    // 2. The environment, for what no flag set (a bad variable a flag overrides is ignored).
    let var = |name: &str| -> Result<Option<String>, UsageError> {
        env(name).map(|v| utf8(name, v)).transpose()
    };
    let d = Config::default();
    let (supervise, sup) = supervisor_opts(&sup_flags, &var, env(TOKEN_VAR))?;
    let cfg = Config {
        supervise,
        sup,
        command,
        pgroup: match f.pgroup {
            Some(v) => v,
            None => from_var(var("AGENT_SHIM_PGROUP")?, "AGENT_SHIM_PGROUP", parse_bool)?
                .unwrap_or(d.pgroup),
        },
        grace: match f.grace {
            Some(v) => v,
            None => from_var(var("AGENT_SHIM_GRACE")?, "AGENT_SHIM_GRACE", parse_duration)?
                .unwrap_or(d.grace),
        },
        cleanup_grace: match f.cleanup_grace {
            Some(v) => v,
            None => {
                let name = "AGENT_SHIM_CLEANUP_GRACE";
                from_var(var(name)?, name, parse_duration)?.unwrap_or(d.cleanup_grace)
            }
        },
        spawn_timeout: match f.spawn_timeout {
            Some(v) => v,
            None => {
                let name = "AGENT_SHIM_SPAWN_TIMEOUT";
                from_var(var(name)?, name, parse_spawn_timeout)?.unwrap_or(d.spawn_timeout)
            }
        },
        rewrites: Rewrites::new(match f.rewrites {
            Some(v) => v,
            None => from_list(var("AGENT_SHIM_REWRITE")?, "AGENT_SHIM_REWRITE", |s| {
                signals::parse_rewrite(s)
            })?,
        }),
        remap_exit: match f.remap_exit {
            Some(v) => v,
            None => from_list(
                var("AGENT_SHIM_REMAP_EXIT")?,
                "AGENT_SHIM_REMAP_EXIT",
                parse_exit_pair,
            )?,
        },
        allow_internal_signals: match f.allow_internal_signals {
            Some(v) => v,
            None => {
                let name = "AGENT_SHIM_ALLOW_INTERNAL_SIGNALS";
                from_var(var(name)?, name, parse_bool)?.unwrap_or(d.allow_internal_signals)
            }
        },
        log_level: match f.log_level {
            Some(v) => v,
            None => from_var(var("AGENT_SHIM_LOG")?, "AGENT_SHIM_LOG", parse_log_level)?
                .unwrap_or(d.log_level),
        },
        log_format: match f.log_format {
            Some(v) => v,
            None => {
                let name = "AGENT_SHIM_LOG_FORMAT";
                from_var(var(name)?, name, parse_log_format)?.unwrap_or(d.log_format)
            }
        },
    };
    Ok(Action::Run(Box::new(cfg)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::os::unix::ffi::OsStringExt;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    fn run_with(args: &[&str], env: &[(&str, &str)]) -> Result<Config, UsageError> {
        let env: HashMap<String, OsString> = env
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        match parse(os(args), |k| env.get(k).cloned())? {
            Action::Run(c) => Ok(*c),
            other => panic!("expected Run, got {other:?}"),
        }
    }

    fn run(args: &[&str]) -> Result<Config, UsageError> {
        run_with(args, &[])
    }

    #[test]
    fn defaults() {
        let c = run(&["--", "sleep", "1"]).unwrap();
        assert_eq!(
            c,
            Config {
                command: os(&["sleep", "1"]),
                ..Config::default()
            }
        );
        assert_eq!(c.grace, Duration::from_secs(8));
        assert_eq!(c.cleanup_grace, Duration::from_secs(2));
        assert_eq!(c.spawn_timeout, Duration::from_secs(5));
        assert_eq!(c.log_level, "warn");
    }

    #[test]
    fn spawn_timeout_flag_and_variable() {
        let c = run(&["--spawn-timeout", "750ms", "x"]).unwrap();
        assert_eq!(c.spawn_timeout, Duration::from_millis(750));
        let c = run_with(&["x"], &[("AGENT_SHIM_SPAWN_TIMEOUT", "2")]).unwrap();
        assert_eq!(c.spawn_timeout, Duration::from_secs(2));
        let c = run_with(
            &["--spawn-timeout=1s", "x"],
            &[("AGENT_SHIM_SPAWN_TIMEOUT", "0")],
        )
        .unwrap();
        assert_eq!(c.spawn_timeout, Duration::from_secs(1));
        assert!(run(&["--spawn-timeout", "0", "x"]).is_err());
        assert!(run_with(&["x"], &[("AGENT_SHIM_SPAWN_TIMEOUT", "soon")]).is_err());
    }

    #[test]
    fn dashdash_is_optional_and_the_first_positional_ends_options() {
        let c = run(&["-g", "sh", "-c", "exit 3", "--grace", "--", "x"]).unwrap();
        assert!(c.pgroup);
        assert_eq!(c.command, os(&["sh", "-c", "exit 3", "--grace", "--", "x"]));
        let c = run(&["--", "--help"]).unwrap();
        assert_eq!(c.command, os(&["--help"]));
        let c = run(&["--", "-g"]).unwrap();
        assert!(!c.pgroup);
    }

    #[test]
    fn every_flag() {
        let c = run(&[
            "--pgroup",
            "--grace",
            "1.5",
            "--cleanup-grace=250ms",
            "--rewrite",
            "TERM:QUIT",
            "--rewrite",
            "SIGHUP:0",
            "--remap-exit",
            "143:0",
            "--allow-internal-signals",
            "--log-level",
            "agent_shim=debug",
            "--log-format",
            "json",
            "true",
        ])
        .unwrap();
        assert!(c.pgroup && c.allow_internal_signals);
        assert_eq!(c.grace, Duration::from_millis(1500));
        assert_eq!(c.cleanup_grace, Duration::from_millis(250));
        assert_eq!(c.rewrites.apply(libc::SIGTERM), Some(libc::SIGQUIT));
        assert_eq!(c.rewrites.apply(libc::SIGHUP), None);
        assert_eq!(c.remap_exit, vec![(143, 0)]);
        assert_eq!(c.log_level, "agent_shim=debug");
        assert_eq!(c.log_format, LogFormat::Json);
    }

    #[test]
    fn zero_fractions_with_huge_exponents_are_zero() {
        assert_eq!(parse_fraction("0e400"), Ok(0.0));
        assert_eq!(parse_fraction("00e595"), Ok(0.0));
        assert_eq!(parse_fraction("-0"), Ok(-0.0));
        assert!(parse_fraction("1e400").is_err());
    }

    #[test]
    fn log_levels_lose_the_spaces_around_their_parts() {
        assert_eq!(
            parse_log_level(" warn , agent_shim = debug ").as_deref(),
            Ok("warn,agent_shim=debug")
        );
        assert!(parse_log_level("warn,a=loud").is_err());
    }

    #[test]
    fn environment_and_precedence() {
        let env = [
            ("AGENT_SHIM_PGROUP", "yes"),
            ("AGENT_SHIM_GRACE", "3s"),
            ("AGENT_SHIM_CLEANUP_GRACE", "1"),
            ("AGENT_SHIM_REWRITE", "TERM:INT, USR1:USR2"),
            ("AGENT_SHIM_REMAP_EXIT", "1:0,2:0"),
            ("AGENT_SHIM_ALLOW_INTERNAL_SIGNALS", "true"),
            ("AGENT_SHIM_LOG", "debug"),
            ("AGENT_SHIM_LOG_FORMAT", "json"),
        ];
        let c = run_with(&["cmd"], &env).unwrap();
        assert!(c.pgroup && c.allow_internal_signals);
        assert_eq!(c.grace, Duration::from_secs(3));
        assert_eq!(c.cleanup_grace, Duration::from_secs(1));
        assert_eq!(c.rewrites.apply(libc::SIGUSR1), Some(libc::SIGUSR2));
        assert_eq!(c.remap_exit, vec![(1, 0), (2, 0)]);
        assert_eq!(c.log_level, "debug");
        assert_eq!(c.log_format, LogFormat::Json);

        // Flags beat variables; list flags replace the variable's list.
        let c = run_with(
            &[
                "--grace",
                "5s",
                "--rewrite",
                "HUP:TERM",
                "--remap-exit",
                "3:4",
                "--log-level",
                "error",
                "--log-format",
                "text",
                "cmd",
            ],
            &env,
        )
        .unwrap();
        assert_eq!(c.grace, Duration::from_secs(5));
        assert_eq!(c.rewrites.apply(libc::SIGUSR1), Some(libc::SIGUSR1));
        assert_eq!(c.rewrites.apply(libc::SIGHUP), Some(libc::SIGTERM));
        assert_eq!(c.remap_exit, vec![(3, 4)]);
        assert_eq!(c.log_level, "error");
        assert_eq!(c.log_format, LogFormat::Text);

        // A bad variable overridden by its flag is never looked at.
        let c = run_with(&["--grace", "1", "cmd"], &[("AGENT_SHIM_GRACE", "bogus")]).unwrap();
        assert_eq!(c.grace, Duration::from_secs(1));
        let c = run_with(&["--log-level", "DEBUG,agent_shim=trace", "cmd"], &[]).unwrap();
        assert_eq!(c.log_level, "DEBUG,agent_shim=trace");

        let c = run_with(&["cmd"], &[("AGENT_SHIM_PGROUP", "0")]).unwrap();
        assert!(!c.pgroup);
    }

    #[test]
    fn help_and_version() {
        assert_eq!(parse(os(&["--help"]), |_| None), Ok(Action::Help));
        assert_eq!(parse(os(&["-h", "x"]), |_| None), Ok(Action::Help));
        assert_eq!(parse(os(&["-V"]), |_| None), Ok(Action::Version));
        assert!(help().contains("--remap-exit"));
        assert!(version().starts_with("agent-shim "));
    }

    #[test]
    fn usage_errors() {
        for bad in [
            &[][..],
            &["--"],
            &["-g"],
            &["--bogus", "x"],
            &["-x", "x"],
            &["--grace"],
            &["--grace", "soon", "x"],
            &["--grace", "-1", "x"],
            &["--cleanup-grace", "1y", "x"],
            &["--rewrite", "TERM", "x"],
            &["--rewrite", "NOPE:TERM", "x"],
            &["--remap-exit", "256:0", "x"],
            &["--remap-exit", "1", "x"],
            &["--log-level", "loud", "x"],
            &["--log-level", "a=loud", "x"],
            &["--log-level", "=debug", "x"],
            &["--log-level", "", "x"],
            &["--log-format", "xml", "x"],
            &["--pgroup=yes", "x"],
        ] {
            assert!(run(bad).is_err(), "{bad:?} should be a usage error");
        }
        for (k, v) in [
            ("AGENT_SHIM_PGROUP", "maybe"),
            ("AGENT_SHIM_GRACE", "x"),
            ("AGENT_SHIM_REWRITE", "TERM"),
            ("AGENT_SHIM_REMAP_EXIT", "a:b"),
            ("AGENT_SHIM_LOG_FORMAT", "xml"),
        ] {
            let err = run_with(&["x"], &[(k, v)]).unwrap_err();
            assert!(err.to_string().contains(k), "{err}");
        }
    }

    #[test]
    fn non_utf8_command_bytes_pass_through() {
        let weird = OsString::from_vec(vec![b'a', 0xff, b' ', b'b']);
        let args = vec![OsString::from("echo"), weird.clone(), OsString::new()];
        match parse(args, |_| None).unwrap() {
            Action::Run(c) => assert_eq!(c.command, vec![OsString::from("echo"), weird, "".into()]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn supervisor_flags_defaults_and_environment() {
        let c = run(&["drv"]).unwrap();
        assert!(!c.supervisor_mode());
        assert_eq!(c.sup, SupervisorOpts::default());
        assert_eq!(c.sup.backoff_initial, Duration::from_millis(200));
        assert_eq!(c.sup.backoff_max, Duration::from_secs(30));
        assert_eq!(c.sup.backoff_reset, Duration::from_secs(60));

        let c = run(&[
            "--control-listen",
            "unix:/tmp/x.sock",
            "--control-insecure",
            "--restart",
            "always",
            "--backoff-initial",
            "50ms",
            "--backoff-factor",
            "3",
            "--crash-loop-restarts",
            "7",
            "--ping-interval",
            "0",
            "--task-queue",
            "2",
            "--user",
            "65534:65533",
            "--workdir",
            "/tmp",
            "--env-allow",
            "PATH, HOME",
            "--env-deny",
            "SECRET",
            "--log-rate",
            "0",
            "drv",
        ])
        .unwrap();
        assert!(c.supervisor_mode());
        assert_eq!(
            c.sup.control_listen,
            Some(ControlAddr::Unix(PathBuf::from("/tmp/x.sock")))
        );
        assert_eq!(c.sup.control_connect, None);
        assert_eq!(c.sup.control_token, None);
        assert_eq!(c.sup.control_reconnect_max, Duration::from_secs(5));
        assert_eq!(c.sup.restart, RestartPolicy::Always);
        assert_eq!(c.sup.backoff_initial, Duration::from_millis(50));
        assert_eq!(c.sup.backoff_factor, 3.0);
        assert_eq!(c.sup.crash_loop_restarts, 7);
        assert!(c.sup.ping_interval.is_zero());
        assert_eq!(c.sup.task_queue, 2);
        assert_eq!(c.sup.user, Some((65534, 65533)));
        assert_eq!(c.sup.workdir, Some(PathBuf::from("/tmp")));
        assert_eq!(
            c.sup.env_allow,
            Some(vec!["PATH".to_owned(), "HOME".to_owned()])
        );
        assert_eq!(c.sup.env_deny, vec!["SECRET".to_owned()]);
        assert_eq!(c.sup.log_rate, 0);

        let c = run_with(
            &["--ping-misses", "9", "drv"],
            &[
                ("AGENT_SHIM_SUPERVISE", "1"),
                ("AGENT_SHIM_RESTART", "never"),
                ("AGENT_SHIM_PING_MISSES", "bogus"),
                ("AGENT_SHIM_CANCEL_GRACE", "250ms"),
            ],
        )
        .unwrap();
        assert!(c.supervise && c.supervisor_mode());
        assert_eq!(c.sup.restart, RestartPolicy::Never);
        assert_eq!(c.sup.ping_misses, 9);
        assert_eq!(c.sup.cancel_grace, Duration::from_millis(250));
    }

    #[test]
    fn sandbox_limit_and_exec_flags() {
        use crate::limits::{Resource, Rlimit};
        let d = run(&["drv"]).unwrap();
        assert_eq!(d.sup.max_execs, 128);
        assert_eq!(d.sup.exec_kill_grace, Duration::from_secs(2));
        assert_eq!(d.sup.exec_drain, Duration::from_millis(200));
        assert_eq!(d.sup.limits, Limits::default());
        let c = run(&[
            "--rlimit",
            "NOFILE=64",
            "--rlimit",
            "NPROC=50:60",
            "--umask",
            "027",
            "--no-new-privs",
            "--max-execs",
            "3",
            "--exec-kill-grace",
            "500ms",
            "--exec-drain=1s",
            "drv",
        ])
        .unwrap();
        let rl = |resource, soft, hard| Rlimit {
            resource,
            soft,
            hard,
        };
        assert_eq!(
            c.sup.limits.rlimits,
            vec![rl(Resource::Nofile, 64, 64), rl(Resource::Nproc, 50, 60)]
        );
        assert_eq!(c.sup.limits.umask, Some(0o027));
        assert!(c.sup.limits.no_new_privs);
        assert_eq!(c.sup.max_execs, 3);
        assert_eq!(c.sup.exec_kill_grace, Duration::from_millis(500));
        assert_eq!(c.sup.exec_drain, Duration::from_secs(1));
        // The variable is a list; a flag replaces it as a whole.
        let c = run_with(
            &["drv"],
            &[
                ("AGENT_SHIM_RLIMIT", "CORE=0,CPU=10:20"),
                ("AGENT_SHIM_NO_NEW_PRIVS", "yes"),
            ],
        )
        .unwrap();
        assert_eq!(
            c.sup.limits.rlimits,
            vec![rl(Resource::Core, 0, 0), rl(Resource::Cpu, 10, 20)]
        );
        assert!(c.sup.limits.no_new_privs);
        let c = run_with(
            &["--rlimit", "AS=1000", "drv"],
            &[("AGENT_SHIM_RLIMIT", "CORE=0")],
        )
        .unwrap();
        assert_eq!(c.sup.limits.rlimits, vec![rl(Resource::As, 1000, 1000)]);
        for bad in [
            &["--rlimit", "STACK=1", "drv"][..],
            &["--rlimit", "NOFILE=2:1", "drv"],
            &["--umask", "999", "drv"],
            &["--max-execs", "0", "drv"],
            &["--exec-drain", "soon", "drv"],
        ] {
            assert!(run(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn supervisor_usage_errors() {
        for bad in [
            &["--control-listen", "unix:/x", "drv"][..],
            &[
                "--control-listen",
                "tcp:1.2.3.4:5",
                "--control-insecure",
                "drv",
            ],
            &["--control-listen", "vsock:3:5", "--control-insecure", "drv"],
            &["--control-listen", "/x", "--control-insecure", "drv"],
            &["--restart", "sometimes", "drv"],
            &["--backoff-factor", "-1", "drv"],
            &["--backoff-jitter", "NaN", "drv"],
            &["--task-queue", "-3", "drv"],
            &["--user", "nobody", "drv"],
            &["--ready-timeout", "soon", "drv"],
        ] {
            assert!(run(bad).is_err(), "{bad:?} should be a usage error");
        }
        let err = run(&["--control-listen", "tcp:h:1", "--control-insecure", "x"]).unwrap_err();
        assert!(
            err.to_string()
                .contains("--control-listen tcp:h:1 needs a token"),
            "{err}"
        );
        let err = run(&["--control-listen", "unix:/x", "x"]).unwrap_err();
        assert!(err.to_string().contains("or --control-insecure"), "{err}");
        let err = run(&["--control-connect", "vsock:2:5", "x"]).unwrap_err();
        assert!(err.to_string().contains("needs a token"), "{err}");
        let err = run_with(
            &["--control-listen", "tcp:h:1", "x"],
            &[("AGENT_SHIM_TOKEN", "")],
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("AGENT_SHIM_TOKEN is empty"),
            "{err}"
        );
        let err = run(&[
            "--control-insecure",
            "--control-listen",
            "unix:/a",
            "--control-listen",
            "unix:/b",
            "x",
        ])
        .unwrap_err();
        assert!(err.to_string().contains("only once"), "{err}");
        for bad in [
            "tcp:host",
            "tcp:::1:5",
            "tcp:[nope]:5",
            "tcp::5",
            "tcp:h:70000",
            "vsock:x:5",
            "vsock:3",
            "udp:1:2",
        ] {
            let err = run(&["--control-token-file", "/t", "--control-listen", bad, "x"]);
            assert!(err.is_err(), "{bad} should be refused");
        }
        assert!(run(&["--control-reconnect-max", "0", "--supervise", "x"]).is_err());
        // Without a control link an empty token variable is nobody's business.
        assert!(run_with(&["x"], &[("AGENT_SHIM_TOKEN", "")]).is_ok());
        assert!(run_with(&["--supervise", "x"], &[("AGENT_SHIM_TOKEN", "")]).is_ok());
        assert!(run(&["--agent-id", " ", "--supervise", "x"]).is_err());
        let err = run_with(&["x"], &[("AGENT_SHIM_LOG_RATE", "many")]).unwrap_err();
        assert!(err.to_string().contains("AGENT_SHIM_LOG_RATE"), "{err}");
    }

    #[test]
    fn idle_after_is_off_by_default_and_positive() {
        assert_eq!(run(&["--supervise", "x"]).unwrap().sup.idle_after, None);
        let c = run(&["--idle-after", "90s", "--supervise", "x"]).unwrap();
        assert_eq!(c.sup.idle_after, Some(Duration::from_secs(90)));
        let c = run_with(&["--supervise", "x"], &[("AGENT_SHIM_IDLE_AFTER", "250ms")]).unwrap();
        assert_eq!(c.sup.idle_after, Some(Duration::from_millis(250)));
        assert!(run(&["--idle-after", "0", "--supervise", "x"]).is_err());
        assert!(run(&["--idle-after", "soon", "--supervise", "x"]).is_err());
    }

    #[test]
    fn control_transports_tokens_and_dial_out() {
        let c = run(&[
            "--control-listen",
            "tcp:[::1]:7000",
            "--control-connect",
            "vsock:2:1024",
            "--control-token-file",
            "/run/secrets/token",
            "--control-reconnect-max",
            "750ms",
            "--agent-id",
            "agent-42",
            "drv",
        ])
        .unwrap();
        assert!(c.supervisor_mode());
        assert_eq!(
            c.sup.control_listen,
            Some(ControlAddr::Tcp {
                host: "::1".into(),
                port: 7000
            })
        );
        assert_eq!(
            c.sup.control_connect,
            Some(ControlAddr::Vsock { cid: 2, port: 1024 })
        );
        assert_eq!(
            c.sup.control_token,
            Some(TokenSource::File("/run/secrets/token".into()))
        );
        assert_eq!(c.sup.control_reconnect_max, Duration::from_millis(750));
        assert_eq!(c.sup.agent_id.as_deref(), Some("agent-42"));

        // Dial-out alone is supervisor mode; the token from the environment, newline
        // stripped; the agent id from its variable.
        let c = run_with(
            &["--control-connect", "tcp:ctl.example:9000", "drv"],
            &[
                ("AGENT_SHIM_TOKEN", "s3cret\n"),
                ("AGENT_SHIM_AGENT_ID", "from-env"),
            ],
        )
        .unwrap();
        assert!(c.supervisor_mode());
        assert_eq!(c.sup.control_listen, None);
        assert_eq!(
            c.sup.control_connect,
            Some(ControlAddr::Tcp {
                host: "ctl.example".into(),
                port: 9000
            })
        );
        let want = Token::from_line(b"s3cret").unwrap();
        assert_eq!(c.sup.control_token, Some(TokenSource::Env(want)));
        assert_eq!(c.sup.agent_id.as_deref(), Some("from-env"));
        // The Debug form never shows the token.
        assert!(!format!("{c:?}").contains("s3cret"));

        // The file wins over the variable; a unix socket with a token needs no
        // --control-insecure.
        let c = run_with(
            &[
                "--control-listen",
                "unix:/run/c.sock",
                "--control-token-file",
                "/t",
                "drv",
            ],
            &[("AGENT_SHIM_TOKEN", "")],
        )
        .unwrap();
        assert_eq!(c.sup.control_token, Some(TokenSource::File("/t".into())));
        assert!(!c.sup.control_insecure);

        // vsock any, IPv4, names.
        for (addr, want) in [
            (
                "vsock:any:5000",
                ControlAddr::Vsock {
                    cid: u32::MAX,
                    port: 5000,
                },
            ),
            (
                "tcp:127.0.0.1:1",
                ControlAddr::Tcp {
                    host: "127.0.0.1".into(),
                    port: 1,
                },
            ),
        ] {
            let c = run_with(
                &["--control-listen", addr, "drv"],
                &[("AGENT_SHIM_TOKEN", "t")],
            )
            .unwrap();
            assert_eq!(c.sup.control_listen.as_ref(), Some(&want));
            assert_eq!(want.to_string(), addr);
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("8s"), Ok(Duration::from_secs(8)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("8"), Ok(Duration::from_secs(8)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration(".25s"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2."), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1e3ms"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("2.5E-1"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("0.1"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("0.0000000015"), Ok(Duration::from_nanos(2)));
        assert_eq!(parse_duration("0e999"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("1e-99"), Ok(Duration::ZERO));
        assert_eq!(
            parse_duration("9223372036854775807"),
            Ok(Duration::from_secs(i64::MAX as u64))
        );
        assert_eq!(
            parse_duration("12345678901234567890123"),
            Err(
                "invalid duration \"12345678901234567890123\" (expected e.g. 500ms, 8s, 2m, 0.5)"
                    .into()
            )
        );
        for bad in [
            "", "s", "-1", "+1", "1x", "NaN", "inf", "1e400", "ms", ".", "1e", "1e+", "1.2.3",
            "1 5", "0x10", "1_000", "e5", "- 1",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn fractions() {
        for (s, v) in [
            ("2", 2.0),
            ("1.5", 1.5),
            ("0.1", 0.1),
            (" 0.3 ", 0.3),
            ("+3", 3.0),
            ("-0", 0.0),
            (".5", 0.5),
            ("1e2", 100.0),
            ("2.5e-3", 0.0025),
            ("0.000001", 1e-6),
            ("123456789.123456", 123_456_789.123_456),
        ] {
            assert_eq!(parse_fraction(s), Ok(v), "{s}");
        }
        assert_eq!(
            parse_fraction("inf"),
            Err("invalid number \"inf\" (expected a finite number >= 0)".into())
        );
        assert_eq!(
            parse_fraction("-1"),
            Err("invalid number \"-1\" (expected a finite number >= 0)".into())
        );
        assert_eq!(
            parse_fraction("1e400"),
            Err("invalid number \"1e400\" (expected a finite number >= 0)".into())
        );
        assert_eq!(parse_fraction("x"), Err("invalid number \"x\"".into()));
        assert_eq!(parse_fraction(""), Err("invalid number \"\"".into()));
    }

    #[test]
    fn exit_pairs_and_remap() {
        assert_eq!(parse_exit_pair("143:0"), Ok((143, 0)));
        assert!(parse_exit_pair("-1:0").is_err());
        assert!(parse_exit_pair("1:").is_err());
        let c = Config {
            remap_exit: vec![(143, 0), (1, 2), (1, 3)],
            ..Config::default()
        };
        assert_eq!(c.exit_code(143), 0);
        assert_eq!(c.exit_code(1), 3);
        assert_eq!(c.exit_code(42), 42);
    }

    #[test]
    fn booleans() {
        for t in ["1", "true", "YES", "on"] {
            assert_eq!(parse_bool(t), Ok(true));
        }
        for f in ["0", "false", "No", "off", ""] {
            assert_eq!(parse_bool(f), Ok(false));
        }
        assert!(parse_bool("2").is_err());
    }
}
