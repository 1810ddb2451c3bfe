//! The command line: flags, their `AGENT_SHIM_*` variables, and the help text.
//!
//! Every option can be set by a flag or by an environment variable (container images set
//! variables more easily than they rewrite an ENTRYPOINT); a flag beats its variable, which
//! beats the default. Parsing is `lexopt` (a few KiB) rather than clap (~150–180 KiB of static
//! binary). Option parsing stops at the first positional argument or at `--`; everything
//! after it is the command, passed through byte for byte.

use std::ffi::OsString;
use std::time::Duration;

use thiserror::Error;

use crate::signals::{self, Rewrites};

/// Default `--grace`.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(8);
/// Default `--cleanup-grace`.
pub const DEFAULT_CLEANUP_GRACE: Duration = Duration::from_secs(2);

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines, no timestamps (`docker logs` adds them).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Everything plain init mode needs to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The command and its arguments, as given (`command[0]` is the program).
    pub command: Vec<OsString>,
    /// Forward signals to the child's process group instead of the child.
    pub pgroup: bool,
    /// How long after SIGTERM/SIGINT before everything is SIGKILLed.
    pub grace: Duration,
    /// As PID 1, how long the leftovers get between SIGTERM and SIGKILL after the child exits.
    pub cleanup_grace: Duration,
    /// `--rewrite` rules.
    pub rewrites: Rewrites,
    /// `--remap-exit` rules, `(from, to)`; a later rule for the same code wins.
    pub remap_exit: Vec<(u8, u8)>,
    /// Honour signals from non-root processes inside the PID namespace.
    pub allow_internal_signals: bool,
    /// A `tracing_subscriber::filter::Targets` directive list (`warn`, `agent_shim=debug`).
    pub log_level: String,
    /// Log format.
    pub log_format: LogFormat,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            command: Vec::new(),
            pgroup: false,
            grace: DEFAULT_GRACE,
            cleanup_grace: DEFAULT_CLEANUP_GRACE,
            rewrites: Rewrites::default(),
            remap_exit: Vec::new(),
            allow_internal_signals: false,
            log_level: "warn".to_owned(),
            log_format: LogFormat::Text,
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
#[derive(Debug, PartialEq, Eq)]
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

DUR: 500ms, 8s, 2m, or a number of seconds (8, 0.5).
Signals: TERM, SIGTERM, 15, RTMIN+1... Booleans in the environment: 1/true/yes, 0/false/no.
Exit codes: CMD's code, 128+N if CMD died of signal N, 2 usage error, 125 the shim failed,
126 CMD not executable, 127 CMD not found.
",
        version = env!("CARGO_PKG_VERSION")
    )
}

/// The `--version` line.
pub fn version() -> String {
    format!("agent-shim {}", env!("CARGO_PKG_VERSION"))
}

/// Parses a duration: `500ms`, `8s`, `2m`, `1h`, or a bare (possibly fractional) number of
/// seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (s, 1.0)
    };
    let bad = || format!("invalid duration {s:?} (expected e.g. 500ms, 8s, 2m, 0.5)");
    let n: f64 = num.trim().parse().map_err(|_| bad())?;
    if !n.is_finite() || n < 0.0 || num.trim().starts_with(['+', '-']) {
        return Err(bad());
    }
    Duration::try_from_secs_f64(n * scale).map_err(|_| bad())
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
    s.parse::<tracing_subscriber::filter::Targets>()
        .map(|_| s.to_owned())
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
    let cfg = Config {
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
        assert_eq!(c.log_level, "warn");
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
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("8s"), Ok(Duration::from_secs(8)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("8"), Ok(Duration::from_secs(8)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        for bad in ["", "s", "-1", "+1", "1x", "NaN", "inf", "1e400", "ms"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
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
