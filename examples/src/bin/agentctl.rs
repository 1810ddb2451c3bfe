//! agentctl: a command line over control-link, for one agent-shim.
//!
//! ```text
//! agentctl [--addr ADDR] [--token-file F] [--json] [--timeout DUR] CMD
//! ```
//!
//! See `examples/README.md` for the commands, the output formats and the exit codes, or
//! `agentctl --help` and `agentctl CMD --help`. The options before `CMD` may also follow it:
//! `--json` always means JSON output. Every
//! event-reading command acknowledges what it consumed, once it is done with it: `tail` acks
//! an event once its line is printed and flushed, so `tail --from <last seq printed>` after a
//! crash continues exactly once; `exec` acks its output once written and flushed (else the
//! shim's replay buffer fills and the exec stalls for good), `task --follow` and
//! `pause --wait` the events they print. The events these three pass over (another task's,
//! the driver's logs) are acknowledged as read: acks are cumulative anyway, and a flood of
//! them must not fill the shim's buffer and hold what the command waits for.
//!
//! agentctl is an observer by default (PROTOCOL.md §8.7): its acknowledgements move no
//! consumer's position, so `agentctl tail` beside a running control plane never takes events
//! from it. `--consumer NAME` makes it the durable consumer NAME instead (its acks then free
//! events, and a newer connection of NAME replaces it).

use std::collections::BTreeMap;
use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::error::ErrorKind;

#[path = "agentctl/files.rs"]
mod files;
use clap::{CommandFactory as _, Parser, Subcommand};
use control_link::protocol::message::{Event, Paused, TaskDone, TaskStatus};
use control_link::{
    AckMode, Addr, AddrError, Client, ConnectOptions, Error, ErrorCode, EventStream, ExecSpec,
    Target, TaskSpec, Token,
};
use tokio::io::AsyncReadExt as _;

/// The variable holding the default address.
const ADDR_ENV: &str = "AGENT_SHIM_CONTROL";

/// Exit codes (documented in examples/README.md).
///
/// `exec` exits with the remote command's code, so there agentctl keeps its own failures
/// apart from it after docker's convention: 125 for agentctl's own, 126 and 127 for a
/// command that could not be started or was not found. The other commands use 1 to 4.
mod exit {
    /// The shim refused the request, or the followed task did not succeed.
    pub const FAILED: u8 = 1;
    /// Bad usage (clap's own code for a command line it rejects).
    pub const USAGE: u8 = 2;
    /// No connection: unreachable, refused, unauthorized, or lost for good.
    pub const CONNECT: u8 = 3;
    /// A request or a wait timed out.
    pub const TIMEOUT: u8 = 4;
    /// `exec`: agentctl itself failed (usage, connection, timeout, a refusal other than
    /// the two below), so the code cannot be mistaken for the command's.
    pub const EXEC_OWN: u8 = 125;
    /// `exec`: the command could not be started (the shim's `invalid`: not executable, a
    /// bad `cwd` or `user`).
    pub const EXEC_CANNOT_RUN: u8 = 126;
    /// `exec`: the command was not found (the shim's `not_found`).
    pub const EXEC_NOT_FOUND: u8 = 127;
}

const AFTER_HELP: &str = "\
ADDR is unix:PATH, tcp:HOST:PORT or vsock:CID:PORT (default: $AGENT_SHIM_CONTROL).
The token comes from --token-file, else $AGENT_SHIM_TOKEN if set.

Exit codes: 0 done; 1 refused, or the followed task did not succeed; 2 usage; 3 no
connection; 4 a timeout. `exec` exits with the command's code (128+N for signal N), 125
when agentctl itself fails, 126 when the command cannot be started, 127 when it is not
found.";

/// A failure with its exit code.
struct Fail(u8, String);

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        let code = match &e {
            Error::Timeout(_) => exit::TIMEOUT,
            Error::Remote { .. } => exit::FAILED,
            _ => exit::CONNECT,
        };
        Fail(code, error_chain(&e))
    }
}

fn usage(msg: impl Into<String>) -> Fail {
    Fail(exit::USAGE, msg.into())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// A command line over control-link, for one agent-shim.
#[derive(Debug, Parser)]
#[command(name = "agentctl", version, after_help = AFTER_HELP)]
struct Cli {
    /// The shim's control address [default: $AGENT_SHIM_CONTROL].
    #[arg(long, global = true, value_name = "ADDR")]
    addr: Option<String>,
    /// The file holding the token [default: $AGENT_SHIM_TOKEN].
    #[arg(long, global = true, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// One JSON object per line instead of human-readable lines.
    #[arg(long, global = true)]
    json: bool,
    /// Bounds the connection, each request, and how long a lost connection is redialed.
    #[arg(long, global = true, value_name = "DUR", default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
    /// Connect as this durable consumer (its acks free events); default: an observer, which
    /// never moves the control plane's cursor.
    #[arg(long, global = true, value_name = "NAME")]
    consumer: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// The shim's status.
    Status,
    /// Print the events after SEQ, acking each once printed.
    Tail {
        /// Start after this seq.
        #[arg(long, value_name = "SEQ", default_value_t = 0)]
        from: u64,
        /// Stop after N events (default: until interrupted).
        #[arg(long, value_name = "N")]
        count: Option<u64>,
    },
    /// Submit a task, then follow its events until its task_done.
    Task {
        /// The task's input, as text.
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        text: Option<String>,
        /// The task's input: the JSON value in FILE.
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
        /// The task's id [default: agentctl-MS-PID, the time in ms and our pid].
        #[arg(long, value_name = "TASK_ID")]
        id: Option<String>,
        /// Return once the task is submitted.
        #[arg(long)]
        no_follow: bool,
    },
    /// Cancel a queued or running task.
    Cancel {
        /// The task to cancel.
        task_id: String,
    },
    /// Pause the agent.
    Pause {
        /// Wait until the agent is at its safe point (the `paused` event).
        #[arg(long)]
        wait: bool,
    },
    /// Resume the agent.
    Resume {
        /// Set the sandbox's wall clock first (after a snapshot restore), to this time in
        /// milliseconds since the Unix epoch, or to this machine's time with `now`.
        #[arg(long, value_name = "MS|now")]
        clock: Option<ClockArg>,
    },
    /// Signal the driver's process group.
    Signal {
        /// TERM, SIGTERM, 15, ...
        sig: String,
    },
    /// Relaunch the driver (also out of a crash loop).
    Restart,
    /// Replace the driver command.
    SetDriver {
        /// The new command line, taken verbatim.
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "CMD"
        )]
        argv: Vec<String>,
    },
    /// Run a command in the sandbox, streaming its output; exit with its code.
    Exec {
        /// On a terminal of our size, ours in raw mode; SIGWINCH forwarded.
        #[arg(long)]
        tty: bool,
        /// A label `ps` shows (1 to 64 bytes of `[A-Za-z0-9._:/@+=-]`).
        #[arg(long, value_name = "TAG")]
        tag: Option<String>,
        /// The command line, taken verbatim.
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "CMD"
        )]
        argv: Vec<String>,
    },
    // exec registry
    /// The execs running and the recently exited ones.
    Ps,
    /// Follow a running (or recently exited) exec: its retained output, then live output;
    /// exit with its code.
    Attach {
        /// The exec's id (`ps`).
        exec_id: u64,
        /// Start at this byte offset of its output [default: the oldest byte retained].
        #[arg(long, value_name = "OFFSET")]
        from: Option<u64>,
    },
    /// Stop the agent and the shim.
    Shutdown {
        /// How long the driver has to stop before it is killed.
        #[arg(long, value_name = "DUR", value_parser = parse_duration)]
        grace: Option<Duration>,
    },
    /// Round trip to the shim.
    Ping,
    // files
    /// Copy a file (a tree with -r) into the sandbox or out of it; sandbox paths start
    /// with ':' (`cp ./in :/work/in`, `cp :/work/out ./out`).
    Cp {
        /// Copy directories recursively.
        #[arg(short = 'r', long)]
        recursive: bool,
        /// The source.
        src: String,
        /// The destination.
        dst: String,
    },
    /// List a directory in the sandbox (or describe one file).
    Ls {
        /// The path in the sandbox.
        path: String,
    },
    /// Print a file of the sandbox.
    Cat {
        /// The path in the sandbox.
        path: String,
    },
    /// Remove a path in the sandbox.
    Rm {
        /// Remove a directory with everything in it.
        #[arg(short = 'r', long)]
        recursive: bool,
        /// The path in the sandbox.
        path: String,
    },
    /// Create a directory in the sandbox.
    Mkdir {
        /// Create missing parents too; no error if it exists.
        #[arg(short = 'p', long)]
        parents: bool,
        /// The path in the sandbox.
        path: String,
    },
    /// Move a path in the sandbox.
    Mv {
        /// The path to move.
        from: String,
        /// Its new path.
        to: String,
    },
    /// Print the changes under a path in the sandbox, acking each once printed.
    Watch {
        /// The tree below, directories created later included.
        #[arg(short = 'r', long)]
        recursive: bool,
        /// Stop after N changes (default: until interrupted).
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        /// The path in the sandbox.
        path: String,
    },
    // microVM
    /// Set the sandbox's wall clock (a microVM's, after a snapshot restore or a long pause).
    SetClock {
        /// The time, in milliseconds since the Unix epoch [default: this machine's time].
        #[arg(long, value_name = "MS")]
        unix_ms: Option<u64>,
    },
    // Resources.
    /// One resource reading: the sandbox's cgroup, its workspace disk, its processes.
    Metrics,
    /// A live view of the sandbox's resources, refreshed every DUR.
    Top {
        /// Time between readings.
        #[arg(long, value_name = "DUR", default_value = "2s", value_parser = parse_duration)]
        interval: Duration,
        /// Stop after N readings (default: until interrupted).
        #[arg(long, value_name = "N")]
        count: Option<u64>,
    },
}

/// Parses the command line; a rejected one exits here (2, or 125 for `exec`), `--help` and
/// `--version` exit 0.
fn parse() -> Cli {
    match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            let code = match e.kind() {
                ErrorKind::DisplayHelp
                | ErrorKind::DisplayVersion
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
                    if !e.use_stderr() =>
                {
                    0
                }
                _ if exec_requested() => exit::EXEC_OWN,
                _ => exit::USAGE,
            };
            std::process::exit(i32::from(code));
        }
    }
}

/// Whether the rejected command line asked for `exec` (whose usage errors must not look
/// like the command's exit code).
fn exec_requested() -> bool {
    Cli::command()
        .ignore_errors(true)
        .try_get_matches()
        .is_ok_and(|m| m.subcommand_name() == Some("exec"))
}

fn main() -> ExitCode {
    let cli = parse();
    let is_exec = matches!(cli.cmd, Cmd::Exec { .. });
    let result = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => {
            let result = rt.block_on(run(cli));
            // A read of stdin may still wait in a blocking thread (`exec` forwards stdin):
            // do not wait for it, or agentctl would hang until the next key press.
            rt.shutdown_background();
            result
        }
        Err(e) => Err(Fail(
            exit::CONNECT,
            format!("cannot start the runtime: {e}"),
        )),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(Fail(code, msg)) => {
            eprintln!("agentctl: {msg}");
            // `exec`'s own failures stay apart from the command's codes.
            let code = match code {
                exit::EXEC_CANNOT_RUN | exit::EXEC_NOT_FOUND | exit::EXEC_OWN => code,
                _ if is_exec => exit::EXEC_OWN,
                _ => code,
            };
            ExitCode::from(code)
        }
    }
}

/// A time to set the sandbox's clock to: `now` (this machine's) or milliseconds since the
/// Unix epoch.
#[derive(Debug, Clone, Copy)]
enum ClockArg {
    Now,
    Unix(u64),
}

impl ClockArg {
    fn time(self) -> std::time::SystemTime {
        match self {
            ClockArg::Now => std::time::SystemTime::now(),
            ClockArg::Unix(ms) => std::time::UNIX_EPOCH + Duration::from_millis(ms),
        }
    }
}

impl std::str::FromStr for ClockArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "now" {
            return Ok(ClockArg::Now);
        }
        s.parse()
            .map(ClockArg::Unix)
            .map_err(|_| format!("bad time {s:?}: milliseconds since the Unix epoch, or `now`"))
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("bad duration unit in {s:?}")),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("bad duration {s:?}"))
}

async fn run(cli: Cli) -> Result<u8, Fail> {
    let addr = match cli.addr.clone().or_else(|| std::env::var(ADDR_ENV).ok()) {
        Some(a) => a,
        None => return Err(usage(format!("no address: use --addr or set {ADDR_ENV}"))),
    };
    let addr: Addr = addr
        .parse()
        .map_err(|e: AddrError| usage(Error::from(e).to_string()))?;
    let token = match &cli.token_file {
        Some(f) => Some(Token::from_file(f).map_err(|e| Fail(exit::USAGE, e.to_string()))?),
        None => Token::from_default_env().ok(),
    };
    let mut opts = ConnectOptions::new()
        .maybe_token(token)
        .request_timeout(cli.timeout)
        .connect_timeout(cli.timeout)
        .give_up_after(cli.timeout)
        .ack_mode(AckMode::Manual);
    opts = match &cli.consumer {
        Some(name) => opts.consumer(name.clone()),
        None => opts.observer(false),
    };
    if let Cmd::Tail { from, .. } = &cli.cmd {
        opts = opts.resume_from(*from);
    }
    let client = opts.connect(&addr).await?;
    let out = Out { json: cli.json };
    let result = command(&client, cli.cmd, &out).await;
    client.close().await;
    result
}

/// Prints in the chosen format.
struct Out {
    json: bool,
}

impl Out {
    fn line(&self, human: impl FnOnce() -> String, json: impl FnOnce() -> serde_json::Value) {
        let text = if self.json {
            json().to_string()
        } else {
            human()
        };
        let mut stdout = std::io::stdout().lock();
        // A closed stdout (`| head`) is not an error worth a panic.
        let _ = writeln!(stdout, "{text}");
        let _ = stdout.flush();
    }

    fn ok(&self, what: &str) {
        self.line(
            || what.to_owned(),
            || serde_json::json!({"ok": true, "what": what}),
        );
    }

    fn event(&self, seq: u64, event: &Event) {
        self.line(
            || format!("{seq:>6} {}", describe(event)),
            || serde_json::json!({"seq": seq, "event": to_json(event)}),
        );
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or_else(|e| serde_json::json!({"unprintable": e.to_string()}))
}

/// `status.idle_since_ms` for people: how long the agent has been idle.
fn idle_text(since_ms: Option<u64>) -> String {
    let Some(since) = since_ms else {
        return "no (busy, or the shim runs without --idle-after)".to_owned();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    let ms = now.saturating_sub(since);
    format!(
        "for {}.{:03} s (since {since} ms after the Unix epoch)",
        ms / 1000,
        ms % 1000
    )
}

fn value_text(v: &rmpv::Value) -> String {
    match v {
        rmpv::Value::String(s) => format!("{:?}", s.as_str().unwrap_or("<non-utf8>")),
        other => to_json(other).to_string(),
    }
}

/// A one-line human description of an event.
fn describe(event: &Event) -> String {
    let task = |t: &Option<String>| t.as_deref().map(|t| format!(" [{t}]")).unwrap_or_default();
    match event {
        Event::MessageChunk(m) => format!("message{} {:?}", task(&m.task_id), m.text),
        Event::ToolCall(c) => format!(
            "tool_call{} {} {}",
            task(&c.task_id),
            c.name,
            value_text(&c.input)
        ),
        Event::ToolResult(r) => format!(
            "tool_result{} {}{}",
            task(&r.task_id),
            value_text(&r.output),
            if r.is_error { " (error)" } else { "" }
        ),
        Event::Progress(p) => format!(
            "progress{} {}/{} {}",
            task(&p.task_id),
            p.done.map_or("?".into(), |d| d.to_string()),
            p.total.map_or("?".into(), |d| d.to_string()),
            p.message.as_deref().unwrap_or("")
        ),
        Event::Log(l) => format!("log{} {:?}: {}", task(&l.task_id), l.stream, l.text),
        Event::TaskDone(d) => format!(
            "task_done [{}] {:?}{}{}",
            d.task_id,
            d.status,
            d.output
                .as_ref()
                .map(|o| format!(" output={}", value_text(o)))
                .unwrap_or_default(),
            d.error
                .as_ref()
                .map(|e| format!(" error={e:?}"))
                .unwrap_or_default()
        ),
        Event::TaskAccepted(a) => format!("task_accepted [{}] position {}", a.task_id, a.position),
        Event::StateChanged(s) => format!("state {:?} -> {:?}", s.from, s.to),
        Event::DriverStarted(s) => format!("driver_started pid {} attempt {}", s.pid, s.attempt),
        Event::DriverReady(r) => format!("driver_ready pid {} in {} ms", r.pid, r.startup_ms),
        Event::Error(e) => format!("error{} {}: {}", task(&e.task_id), e.code, e.message),
        other => format!("{} {}", other_type(other), to_json(other)),
    }
}

fn other_type(e: &Event) -> &str {
    use control_link::protocol::Message as _;
    e.type_name()
}

async fn command(client: &Client, cmd: Cmd, out: &Out) -> Result<u8, Fail> {
    match cmd {
        Cmd::Status => {
            let s = client.status().await?;
            out.line(
                || {
                    let mut t = format!(
                        "state {:?}\ndriver pid {}\nrestarts {}\nuptime {} ms\ntasks queued {}\ntask running {}\nexecs running {}\nchildren {}\nreaped {}\nbuffered events {} ({} bytes)\nlast seq {}\nrss {} bytes",
                        s.state,
                        s.driver_pid.map_or("-".into(), |p| p.to_string()),
                        s.restarts,
                        s.uptime_ms,
                        s.tasks_queued,
                        s.task_running.as_deref().unwrap_or("-"),
                        s.execs_running,
                        s.children,
                        s.reaped,
                        s.buffered_events,
                        s.buffered_bytes,
                        s.last_seq,
                        s.rss_bytes
                    );
                    t.push_str(&format!("\nidle {}", idle_text(s.idle_since_ms)));
                    if let Some(agent) = client.agent_id() {
                        t.push_str(&format!("\nagent {agent}"));
                    }
                    t
                },
                || to_json(&s),
            );
            Ok(0)
        }
        Cmd::Tail { count, .. } => {
            let mut events = client.events()?;
            let mut n = 0;
            while count.is_none_or(|c| n < c) {
                let Some((seq, event)) = events.next().await else {
                    return Err(Fail(exit::CONNECT, "the connection was lost".into()));
                };
                out.event(seq, &event);
                // Printed and flushed: now it may be forgotten.
                client.ack(seq);
                n += 1;
            }
            Ok(0)
        }
        Cmd::Task {
            text,
            file,
            id,
            no_follow,
        } => {
            let input = match (text, file) {
                (Some(t), _) => rmpv::Value::from(t),
                (None, None) => return Err(usage("task takes TEXT or --file FILE")),
                (None, Some(f)) => {
                    let text = std::fs::read_to_string(&f)
                        .map_err(|e| usage(format!("cannot read {}: {e}", f.display())))?;
                    let json: serde_json::Value = serde_json::from_str(&text)
                        .map_err(|e| usage(format!("{}: {e}", f.display())))?;
                    json_to_msgpack(&json)
                }
            };
            let id = id.unwrap_or_else(new_task_id);
            let events = if !no_follow {
                Some(client.events()?)
            } else {
                None
            };
            client.submit_task(TaskSpec::new(id.clone(), input)).await?;
            out.line(
                || format!("submitted {id}"),
                || serde_json::json!({"submitted": id}),
            );
            match events {
                Some(events) => follow_task(client, events, &id, out).await,
                None => Ok(0),
            }
        }
        Cmd::Cancel { task_id: task } => {
            client.cancel_task(&task, None).await?;
            out.ok(&format!("cancel {task} accepted"));
            Ok(0)
        }
        Cmd::Pause { wait } => {
            let mut events = if wait { Some(client.events()?) } else { None };
            let id = client.pause(None).await?;
            out.line(
                || format!("pause accepted (id {id})"),
                || serde_json::json!({"ok": true, "pause_id": id}),
            );
            if let Some(events) = &mut events {
                loop {
                    match events.next().await {
                        Some((seq, Event::Paused(Paused { re: Some(re) }))) if re == id => {
                            out.event(seq, &Event::Paused(Paused { re: Some(re) }));
                            client.ack(seq);
                            break;
                        }
                        // Passed over: acknowledged, so the shim's buffer never fills up
                        // with what this command does not print.
                        Some((seq, _)) => client.ack(seq),
                        None => return Err(Fail(exit::CONNECT, "the connection was lost".into())),
                    }
                }
            }
            Ok(0)
        }
        Cmd::Resume { clock } => {
            client.resume(clock.map(ClockArg::time)).await?;
            out.ok("resume accepted");
            Ok(0)
        }
        Cmd::Signal { sig } => {
            client.signal(sig.as_str(), Target::Driver).await?;
            out.ok(&format!("signal {sig} sent"));
            Ok(0)
        }
        Cmd::Restart => {
            client.restart_driver().await?;
            out.ok("restart accepted");
            Ok(0)
        }
        Cmd::SetDriver { argv } => {
            client.set_driver(argv, BTreeMap::new()).await?;
            out.ok("set-driver accepted");
            Ok(0)
        }
        Cmd::Exec { tty, tag, argv } => exec(client, tty, tag, argv, out).await,
        Cmd::Ps => registry::ps(client, out).await,
        Cmd::Attach { exec_id, from } => registry::attach(client, exec_id, from, out).await,
        // files
        Cmd::Cp {
            recursive,
            src,
            dst,
        } => files::cp(client, &src, &dst, recursive, out).await,
        Cmd::Ls { path } => files::ls(client, &path, out).await,
        Cmd::Cat { path } => files::cat(client, &path).await,
        Cmd::Rm { recursive, path } => {
            files::simple(client, files::Simple::Rm { path, recursive }, out).await
        }
        Cmd::Mkdir { parents, path } => {
            files::simple(client, files::Simple::Mkdir { path, parents }, out).await
        }
        Cmd::Mv { from, to } => files::simple(client, files::Simple::Mv { from, to }, out).await,
        Cmd::Watch {
            recursive,
            count,
            path,
        } => files::watch(client, &path, recursive, count, out).await,
        Cmd::Shutdown { grace } => {
            client.shutdown(grace, Some("agentctl")).await?;
            out.ok("shutdown accepted");
            Ok(0)
        }
        Cmd::Ping => {
            let rtt = client.ping().await?;
            out.line(
                || format!("pong in {rtt:?}"),
                || serde_json::json!({"pong": true, "rtt_us": rtt.as_micros() as u64}),
            );
            Ok(0)
        }
        Cmd::SetClock { unix_ms } => {
            let time =
                unix_ms.map_or_else(std::time::SystemTime::now, |ms| ClockArg::Unix(ms).time());
            client.set_clock(time).await?;
            out.ok("clock set");
            Ok(0)
        }
        Cmd::Metrics => {
            let r = client.metrics().await?;
            out.line(|| resources::describe(&r, None), || to_json(&r));
            Ok(0)
        }
        Cmd::Top { interval, count } => resources::top(client, out, interval, count).await,
    }
}

/// `metrics` and `top`: resource readings as text.
mod resources {
    use std::fmt::Write as _;
    use std::io::{IsTerminal as _, Write as _};
    use std::time::Duration;

    use control_link::protocol::message::{ProcRole, Reading};
    use control_link::Client;

    use super::{to_json, Fail, Out};

    /// Reads every `interval`, printing each reading (on a terminal: in place of the last),
    /// with CPU use as a share of a CPU since the previous reading.
    pub(super) async fn top(
        client: &Client,
        out: &Out,
        interval: Duration,
        count: Option<u64>,
    ) -> Result<u8, Fail> {
        let clear = !out.json && std::io::stdout().is_terminal();
        let mut prev: Option<Reading> = None;
        let mut n = 0u64;
        let mut tick = tokio::time::interval(interval);
        while count.is_none_or(|c| n < c) {
            tokio::select! {
                _ = tick.tick() => {}
                _ = tokio::signal::ctrl_c() => break,
            }
            let r = client.metrics().await?;
            if clear {
                let mut stdout = std::io::stdout().lock();
                let _ = write!(stdout, "\x1b[H\x1b[2J");
                let _ = stdout.flush();
            }
            out.line(|| describe(&r, prev.as_ref()), || to_json(&r));
            prev = Some(r);
            n += 1;
        }
        Ok(0)
    }

    /// A reading as lines of text; with the previous reading, CPU use in between.
    pub(super) fn describe(r: &Reading, prev: Option<&Reading>) -> String {
        let mut t = format!("time {} ms", r.time_ms);
        let dt_us = prev
            .map(|p| r.time_ms.saturating_sub(p.time_ms).saturating_mul(1000))
            .filter(|&d| d > 0);
        match &r.cgroup {
            Some(c) => {
                let _ = write!(t, "\ncgroup v{}", c.version);
                let _ = write!(
                    t,
                    "\nmemory {} of {} (peak {}, anon {}, cache {})",
                    bytes(c.memory_bytes),
                    limit_bytes(c.memory_limit_bytes),
                    bytes(c.memory_peak_bytes),
                    bytes(c.memory_anon_bytes),
                    bytes(c.memory_file_bytes)
                );
                let _ = write!(
                    t,
                    "\nswap {} of {}",
                    bytes(c.swap_bytes),
                    limit_bytes(c.swap_limit_bytes)
                );
                let _ = write!(t, "\noom {} (kills {})", num(c.oom), num(c.oom_kills));
                let cpus = match (c.cpu_quota_us, c.cpu_period_us) {
                    (Some(q), Some(p)) if p > 0 => format!("{:.2} cpus", q as f64 / p as f64),
                    _ => "no limit".to_owned(),
                };
                let rate = match (dt_us, prev.and_then(|p| p.cgroup.as_ref())) {
                    (Some(dt), Some(pc)) => match (c.cpu_usage_us, pc.cpu_usage_us) {
                        (Some(now), Some(then)) => {
                            format!(
                                " ({:.1}%)",
                                now.saturating_sub(then) as f64 * 100.0 / dt as f64
                            )
                        }
                        _ => String::new(),
                    },
                    _ => String::new(),
                };
                let _ = write!(
                    t,
                    "\ncpu {}{rate}, {cpus}, throttled {} of {} periods ({})",
                    secs(c.cpu_usage_us),
                    num(c.cpu_throttled_periods),
                    num(c.cpu_periods),
                    secs(c.cpu_throttled_us)
                );
                let _ = write!(
                    t,
                    "\npids {} of {}",
                    num(c.pids),
                    c.pids_limit
                        .map_or("no limit".to_owned(), |l| l.to_string())
                );
                let _ = write!(
                    t,
                    "\nio read {}, written {}",
                    bytes(c.io_read_bytes),
                    bytes(c.io_write_bytes)
                );
            }
            None => t.push_str("\ncgroup -"),
        }
        match &r.workspace {
            Some(w) => {
                let _ = write!(
                    t,
                    "\nworkspace {} used of {} ({} free), inodes {} of {}",
                    bytes(Some(w.used_bytes)),
                    bytes(Some(w.size_bytes)),
                    bytes(Some(w.avail_bytes)),
                    w.inodes_used,
                    w.inodes
                );
            }
            None => t.push_str("\nworkspace -"),
        }
        for p in &r.procs {
            let who = match (p.role, p.exec_id) {
                (ProcRole::Driver, _) => "driver".to_owned(),
                (ProcRole::Exec, Some(id)) => format!("exec {id}"),
                (ProcRole::Exec, None) => "exec".to_owned(),
            };
            let then = prev.and_then(|pr| {
                pr.procs
                    .iter()
                    .find(|q| q.role == p.role && q.exec_id == p.exec_id && q.pid == p.pid)
            });
            let rate = match (dt_us, then) {
                (Some(dt), Some(q)) => format!(
                    " ({:.1}%)",
                    p.cpu_us.saturating_sub(q.cpu_us) as f64 * 100.0 / dt as f64
                ),
                _ => String::new(),
            };
            let _ = write!(
                t,
                "\n{who} pid {}: {} processes, rss {}, cpu {}{rate}",
                p.pid,
                p.pids,
                bytes(Some(p.rss_bytes)),
                secs(Some(p.cpu_us))
            );
        }
        t
    }

    fn num(v: Option<u64>) -> String {
        v.map_or("-".to_owned(), |n| n.to_string())
    }

    fn secs(us: Option<u64>) -> String {
        us.map_or("-".to_owned(), |us| format!("{:.2} s", us as f64 / 1e6))
    }

    fn limit_bytes(v: Option<u64>) -> String {
        v.map_or("no limit".to_owned(), |b| bytes(Some(b)))
    }

    /// Bytes in the largest binary unit that keeps the number ≥ 1.
    pub(super) fn bytes(v: Option<u64>) -> String {
        let Some(b) = v else {
            return "-".to_owned();
        };
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut x = b as f64;
        let mut u = 0;
        while x >= 1024.0 && u + 1 < UNITS.len() {
            x /= 1024.0;
            u += 1;
        }
        if u == 0 {
            format!("{b} B")
        } else {
            format!("{x:.1} {}", UNITS[u])
        }
    }
}

/// Prints the task's events until its `task_done`; exit 0 only if it succeeded.
async fn follow_task(
    client: &Client,
    mut events: EventStream,
    id: &str,
    out: &Out,
) -> Result<u8, Fail> {
    while let Some((seq, event)) = events.next().await {
        if event_task(&event) != Some(id) {
            client.ack(seq);
            continue;
        }
        out.event(seq, &event);
        client.ack(seq);
        if let Event::TaskDone(TaskDone { status, .. }) = event {
            return Ok(if status == TaskStatus::Succeeded {
                0
            } else {
                exit::FAILED
            });
        }
    }
    Err(Fail(exit::CONNECT, "the connection was lost".into()))
}

fn event_task(e: &Event) -> Option<&str> {
    match e {
        Event::MessageChunk(m) => m.task_id.as_deref(),
        Event::ToolCall(m) => m.task_id.as_deref(),
        Event::ToolResult(m) => m.task_id.as_deref(),
        Event::FileChange(m) => m.task_id.as_deref(),
        Event::Progress(m) => m.task_id.as_deref(),
        Event::Log(m) => m.task_id.as_deref(),
        Event::Custom(m) => m.task_id.as_deref(),
        Event::Error(m) => m.task_id.as_deref(),
        Event::TaskDone(m) => Some(&m.task_id),
        Event::TaskAccepted(m) => Some(&m.task_id),
        _ => None,
    }
}

fn new_task_id() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!("agentctl-{ms}-{}", std::process::id())
}

fn json_to_msgpack(v: &serde_json::Value) -> rmpv::Value {
    use serde_json::Value as J;
    match v {
        J::Null => rmpv::Value::Nil,
        J::Bool(b) => rmpv::Value::Boolean(*b),
        J::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
            (Some(u), _, _) => rmpv::Value::from(u),
            (None, Some(i), _) => rmpv::Value::from(i),
            (_, _, Some(f)) => rmpv::Value::F64(f),
            _ => rmpv::Value::Nil,
        },
        J::String(s) => rmpv::Value::from(s.as_str()),
        J::Array(a) => rmpv::Value::Array(a.iter().map(json_to_msgpack).collect()),
        J::Object(o) => rmpv::Value::Map(
            o.iter()
                .map(|(k, v)| (rmpv::Value::from(k.as_str()), json_to_msgpack(v)))
                .collect(),
        ),
    }
}

/// The local terminal in raw mode; restored on drop.
struct RawMode {
    saved: libc::termios,
}

impl RawMode {
    fn enter() -> Option<Self> {
        // SAFETY: termios is plain old data; tcgetattr fills it and we check the result.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 and a valid termios pointer.
        if unsafe { libc::tcgetattr(0, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: `raw` is a valid termios.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: fd 0 and a valid termios pointer.
        if unsafe { libc::tcsetattr(0, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(Self { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: fd 0 and the termios saved by `enter`.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.saved) };
    }
}

fn terminal_size() -> (u16, u16) {
    // SAFETY: winsize is plain old data; TIOCGWINSZ fills it and we check the result.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: fd 1 and a valid winsize pointer.
    if unsafe { libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) } == 0 && ws.ws_row > 0 {
        (ws.ws_row, ws.ws_col)
    } else {
        (24, 80)
    }
}

/// Runs a command in the sandbox: stdin → exec_input, output → stdout/stderr, SIGWINCH →
/// exec_resize; the exit code is the exec's (128+N for signal N).
async fn exec(
    client: &Client,
    tty: bool,
    tag: Option<String>,
    argv: Vec<String>,
    out: &Out,
) -> Result<u8, Fail> {
    let mut events = client.events()?;
    let mut spec = ExecSpec::new(argv).stdin(true);
    if let Some(tag) = tag {
        spec = spec.tag(tag);
    }
    if tty {
        let (rows, cols) = terminal_size();
        spec = spec.tty(rows, cols);
    }
    let started = client.exec(spec).await.map_err(|e| {
        let code = match e.code() {
            Some(ErrorCode::NotFound) => exit::EXEC_NOT_FOUND,
            Some(ErrorCode::Invalid) => exit::EXEC_CANNOT_RUN,
            _ => exit::EXEC_OWN,
        };
        Fail(code, error_chain(&e))
    })?;
    let exec_id = started.exec_id;
    let _raw = if tty && std::io::stdin().is_terminal() {
        RawMode::enter()
    } else {
        None
    };
    let mut winch = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
        .map_err(|e| Fail(exit::CONNECT, format!("cannot watch SIGWINCH: {e}")))?;
    let mut stdin = tokio::io::stdin();
    let mut buf = vec![0u8; 16 * 1024];
    let mut stdin_open = true;
    loop {
        tokio::select! {
            ev = events.next() => match ev {
                Some((seq, Event::ExecOutput(o))) if o.exec_id == exec_id => {
                    if out.json {
                        out.event(seq, &Event::ExecOutput(o));
                    } else {
                        let is_err = o.stream == control_link::protocol::message::OutputStream::Stderr;
                        let res = if is_err {
                            let mut e = std::io::stderr().lock();
                            e.write_all(&o.data).and_then(|()| e.flush())
                        } else {
                            let mut s = std::io::stdout().lock();
                            s.write_all(&o.data).and_then(|()| s.flush())
                        };
                        // A closed stdout/stderr is the reader's business; the output was
                        // consumed all the same.
                        let _ = res;
                    }
                    // Written and flushed: the shim may forget it (and read on).
                    client.ack(seq);
                }
                Some((seq, Event::ExecExit(x))) if x.exec_id == exec_id => {
                    let code = exit_status(x.code, x.signal.as_deref());
                    if out.json {
                        out.event(seq, &Event::ExecExit(x));
                    }
                    client.ack(seq);
                    return Ok(code);
                }
                // Another exec's or the driver's: passed over and acknowledged, so that a
                // flood of them cannot fill the shim's buffer and hold this exec's output.
                Some((seq, _)) => client.ack(seq),
                None => return Err(Fail(exit::CONNECT, "the connection was lost".into())),
            },
            n = stdin.read(&mut buf), if stdin_open => match n {
                Ok(0) | Err(_) => {
                    stdin_open = false;
                    client.exec_input(exec_id, Vec::new(), true).await?;
                }
                Ok(n) => client.exec_input(exec_id, buf[..n].to_vec(), false).await?,
            },
            _ = winch.recv(), if tty => {
                let (rows, cols) = terminal_size();
                client.exec_resize(exec_id, rows, cols).await?;
            }
        }
    }
}

/// An exec's exit as agentctl's exit code: its code, 128+N for signal N.
fn exit_status(code: Option<i32>, signal: Option<&str>) -> u8 {
    match (code, signal) {
        (Some(c), _) => u8::try_from(c).unwrap_or(exit::EXEC_OWN),
        (None, Some(sig)) => 128u8.saturating_add(signal_number(sig)),
        (None, None) => exit::EXEC_OWN,
    }
}

/// `ps` and `attach`: the exec registry (PROTOCOL.md §8.10).
mod registry {
    use std::io::Write as _;

    use control_link::protocol::message::{ExecInfo, OutputStream};
    use control_link::{AttachItem, Client};

    use super::{error_chain, exit, exit_status, to_json, Fail, Out};

    /// The table, or one JSON object per exec.
    pub(super) async fn ps(client: &Client, out: &Out) -> Result<u8, Fail> {
        let execs = client.list_execs().await?;
        if out.json {
            for e in &execs {
                out.line(String::new, || to_json(e));
            }
            return Ok(0);
        }
        let mut t = format!(
            "{:>6} {:>7} {:>5} {:<7} {:<16} {:<14} {:>10}  COMMAND\n",
            "ID", "PID", "UID", "OWNER", "TAG", "STATUS", "OUTPUT"
        );
        for e in &execs {
            t.push_str(&row(e));
            t.push('\n');
        }
        let _ = std::io::stdout().lock().write_all(t.as_bytes());
        Ok(0)
    }

    fn row(e: &ExecInfo) -> String {
        let status = match &e.exit {
            None => "running".to_owned(),
            Some(x) => match (x.code, x.signal.as_deref()) {
                (Some(c), _) => format!("exited {c}"),
                (None, Some(s)) => format!("killed {s}"),
                (None, None) => "ended".to_owned(),
            },
        };
        let mut cmd = e.argv.join(" ");
        if e.argv_truncated {
            cmd.push('…');
        }
        format!(
            "{:>6} {:>7} {:>5} {:<7} {:<16} {:<14} {:>10}  {}",
            e.exec_id,
            e.pid,
            e.uid,
            e.owner,
            e.tag.as_deref().unwrap_or("-"),
            status,
            e.output_bytes,
            cmd
        )
    }

    /// Streams the exec's output to stdout/stderr (with `--json`, one object per frame)
    /// and exits with its status; bytes skipped because we read too slowly are said on
    /// stderr.
    pub(super) async fn attach(
        client: &Client,
        exec_id: u64,
        from: Option<u64>,
        out: &Out,
    ) -> Result<u8, Fail> {
        let (attached, mut stream) = client
            .attach_exec(exec_id, from)
            .await
            .map_err(|e| Fail(exit::EXEC_OWN, error_chain(&e)))?;
        if out.json {
            out.line(String::new, || to_json(&attached));
        }
        while let Some(item) = stream.next().await {
            match item {
                AttachItem::Output(o) if out.json => out.line(String::new, || to_json(&o)),
                AttachItem::Output(o) => {
                    // A closed stdout/stderr is the reader's business.
                    let _ = if o.stream == OutputStream::Stderr {
                        let mut e = std::io::stderr().lock();
                        e.write_all(&o.data).and_then(|()| e.flush())
                    } else {
                        let mut s = std::io::stdout().lock();
                        s.write_all(&o.data).and_then(|()| s.flush())
                    };
                }
                AttachItem::Lagged(l) => {
                    if out.json {
                        out.line(String::new, || to_json(&l));
                    } else {
                        eprintln!(
                            "agentctl: {} bytes of output skipped (too slow); going on at {}",
                            l.missed, l.next_offset
                        );
                    }
                }
                AttachItem::Exit(x) => {
                    if out.json {
                        out.line(String::new, || to_json(&x));
                    }
                    return Ok(exit_status(x.code, x.signal.as_deref()));
                }
            }
        }
        Err(Fail(
            exit::EXEC_OWN,
            format!(
                "the connection was lost; attach again with --from {}",
                stream.next_offset()
            ),
        ))
    }
}

fn signal_number(name: &str) -> u8 {
    let n = name.trim_start_matches("SIG");
    match n {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "ABRT" => 6,
        "KILL" => 9,
        "USR1" => 10,
        "SEGV" => 11,
        "USR2" => 12,
        "PIPE" => 13,
        "ALRM" => 14,
        "TERM" => 15,
        other => other.parse().unwrap_or(0),
    }
}
