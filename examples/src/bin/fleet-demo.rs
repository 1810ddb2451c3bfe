//! `fleet-demo`: a small fleet of agents, driven from one control-link [`Fleet`].
//!
//! It starts `--agents N` agent-shims (each as PID 1 of its own PID namespace when run as
//! root and `unshare` is there, as a child subreaper otherwise), each supervising the echo
//! driver and dialing this process's `Fleet` over a unix socket with a token. Then it submits
//! tasks to every agent, crashes one driver to show the restart, cuts one control connection
//! mid-task to show the resume, waits for every agent to go idle (`--idle-after`), pauses
//! one and wakes it with a new task (through the Fleet's wake hook), draws a live view
//! (agents × state × tasks done × each driver's memory and CPU, from the shims' periodic
//! `metrics` events), and ends
//! with a summary that counts the events delivered, duplicated and lost. Duplicates and
//! losses are counted from the seqs independently of control-link: both must be 0, and every
//! task must end, or the demo exits 1.
//!
//! ```text
//! cargo run --release -p agent-shim-examples --bin fleet-demo -- [--agents N] [--tasks N]
//!     [--shim PATH] [--driver PATH] [--no-view]
//! ```

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{IsTerminal as _, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use control_link::protocol::message::{DriverState, Event, ProcRole, TaskStatus};
use control_link::{Addr, AgentId, ConnectOptions, Fleet, Seq, TaskSpec, Token};

/// How long the fleet may take to come up, and the end to be delivered.
const PATIENCE: Duration = Duration::from_secs(60);

/// The live view's refresh period.
/// Each shim's `--idle-after`.
const IDLE_AFTER: &str = "300ms";

/// Each shim's `--metrics-interval` (the view's memory and CPU columns): 200 ms, or 2 ms
/// per agent, so that a large fleet sends at most 500 readings a second.
fn metrics_interval(agents: usize) -> String {
    format!("{}ms", (agents * 2).max(200))
}

const FRAME: Duration = Duration::from_millis(250);

/// What went wrong, for the message before exit code 2.
type Error = Box<dyn std::error::Error + Send + Sync>;

/// Starts N agent-shims with the echo driver, all dialing one control-link Fleet, submits
/// tasks, crashes one driver, cuts one control connection, and checks that every event
/// arrived exactly once.
#[derive(Debug, Parser)]
#[command(name = "fleet-demo", version)]
struct Args {
    /// Agents to start.
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = count(2000))]
    agents: usize,
    /// Tasks per agent.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = count(1000))]
    tasks: usize,
    /// The agent-shim binary [default: $AGENT_SHIM_BIN, or next to this program].
    #[arg(long, value_name = "PATH")]
    shim: Option<PathBuf>,
    /// The echo driver [default: next to this program].
    #[arg(long, value_name = "PATH")]
    driver: Option<PathBuf>,
    /// No live view, only the summary.
    #[arg(long = "no-view", action = clap::ArgAction::SetFalse)]
    view: bool,
}

/// A parser for a number from 1 to `max`.
fn count(max: usize) -> impl Fn(&str) -> Result<usize, String> + Clone {
    move |s| {
        s.parse::<usize>()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| format!("expected a number from 1 to {max}"))
    }
}

fn main() -> ExitCode {
    // A rejected command line exits 2 (the code for a setup failure too), `--help` 0.
    let mut args = Args::parse();
    if args.shim.is_none() {
        args.shim = std::env::var_os("AGENT_SHIM_BIN").map(PathBuf::from);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fleet-demo: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("fleet-demo: {e}");
            ExitCode::from(2)
        }
    }
}

/// What the demo knows about one agent, from its events alone.
#[derive(Debug, Default)]
struct Agent {
    state: Option<DriverState>,
    /// The last seq received (events arrive with seq + 1 each time).
    last_seq: Seq,
    events: u64,
    duplicates: u64,
    lost: u64,
    submitted: usize,
    succeeded: usize,
    failed: usize,
    cancelled: usize,
    restarts: u32,
    /// Idle now (an `idle` event, no `busy` since).
    idle: bool,
    /// `idle` events received.
    idles: u64,
    /// The driver's resident memory in the last `metrics` event.
    memory: Option<u64>,
    /// The driver's CPU time in the last `metrics` event, and when it was read (ms).
    cpu: Option<(u64, u64)>,
    /// The driver's CPU use between the last two `metrics` events (1.0 = one CPU).
    cpu_share: Option<f64>,
}

impl Agent {
    fn ended(&self) -> usize {
        self.succeeded + self.failed + self.cancelled
    }

    /// Counts one event by its seq: the next one, a duplicate, or after a gap.
    fn count(&mut self, seq: Seq, event: &Event) {
        if seq <= self.last_seq {
            self.duplicates += 1;
            return;
        }
        self.lost += seq - self.last_seq - 1;
        self.last_seq = seq;
        self.events += 1;
        match event {
            Event::StateChanged(c) => self.state = Some(c.to),
            Event::DriverRestarting(_) => self.restarts += 1,
            Event::Idle(_) => {
                self.idle = true;
                self.idles += 1;
            }
            Event::Busy(_) => self.idle = false,
            Event::Metrics(r) => {
                let driver = r.procs.iter().find(|p| p.role == ProcRole::Driver);
                self.memory = driver.map(|p| p.rss_bytes);
                let now = driver.map(|p| (p.cpu_us, r.time_ms));
                self.cpu_share = match (self.cpu, now) {
                    (Some((then, t0)), Some((cpu, t1))) if t1 > t0 => {
                        Some(cpu.saturating_sub(then) as f64 / ((t1 - t0) as f64 * 1000.0))
                    }
                    _ => None,
                };
                self.cpu = now;
            }
            Event::TaskDone(done) => match done.status {
                TaskStatus::Succeeded => self.succeeded += 1,
                TaskStatus::Failed => self.failed += 1,
                TaskStatus::Cancelled => self.cancelled += 1,
            },
            _ => {}
        }
    }
}

/// The agents' shim processes; killed by pid when dropped.
struct Processes {
    children: Vec<Child>,
}

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.children {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

async fn run(args: Args) -> Result<bool, Error> {
    let (shim, driver) = binaries(&args)?;
    let dir = std::env::temp_dir().join(format!("fleet-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut cleanup = RemoveDir {
        dir: dir.clone(),
        keep: true,
    };
    let token_path = dir.join("token");
    let token = write_token(&token_path)?;
    let socket = Addr::Unix(dir.join("control.sock"));

    // The wake hook: a platform would unfreeze the agent's container here (`docker
    // unpause`); the demo pauses agents at the protocol level only, so it just counts.
    let wakes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let hook_wakes = std::sync::Arc::clone(&wakes);
    let opts = ConnectOptions::new()
        .token(token.clone())
        .wake_hook(move |agent: AgentId| {
            hook_wakes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            println!("fleet-demo: waking {agent} for a new task");
            async { Ok::<(), std::io::Error>(()) }
        });
    let fleet = Fleet::new(opts);
    fleet.listen(&socket).await?;
    let mut events = fleet.events()?;

    let namespaces = is_root() && which("unshare").is_some();
    let n = args.agents;
    println!(
        "fleet-demo: starting {n} agents ({}), each agent-shim + echo driver, dialing {socket}",
        if namespaces {
            "each PID 1 of its own PID namespace"
        } else {
            "as child subreapers"
        }
    );
    let mut procs = Processes {
        children: Vec::with_capacity(n),
    };
    for i in 0..n {
        let child = start_agent(&shim, &driver, &socket, &token_path, &dir, i, n, namespaces)?;
        procs.children.push(child);
    }

    let ids: Vec<AgentId> = (0..n).map(|i| AgentId::from(agent_name(i))).collect();
    let mut agents: BTreeMap<AgentId, Agent> = ids
        .iter()
        .map(|id| (id.clone(), Agent::default()))
        .collect();
    let started = Instant::now();

    // 1. Every agent connected and its driver ready.
    wait_until(&mut events, &mut agents, "every agent ready", |a| {
        a.values().all(|a| a.state == Some(DriverState::Ready))
    })
    .await?;
    println!(
        "fleet-demo: {n} agents ready in {} ms",
        started.elapsed().as_millis()
    );
    // An operator tails agent 0 beside the fleet: an observer on the agent's own socket,
    // acknowledging everything it reads, which must change nothing for the fleet (the
    // consumer "control"): the summary still counts zero lost and zero duplicated.
    let operator = tokio::spawn(tail_as_operator(
        Addr::Unix(dir.join(format!("{}.sock", agent_name(0)))),
        token,
    ));

    // 2. Tasks for everyone: words streamed one by one, with a little delay so the view
    // moves. Agent 0's first task crashes its driver (it is restarted); agent 1's
    // connection is cut while its tasks stream (it resumes).
    let mut expected = 0usize;
    for (i, id) in ids.iter().enumerate() {
        let Some(client) = fleet.client(id) else {
            return Err(format!("{id} is not connected").into());
        };
        for t in 0..args.tasks {
            let task_id = format!("{id}-task-{t}");
            let input = if i == 0 && t == 0 {
                map([("crash", 3.into())])
            } else {
                map([
                    ("text", "the quick brown fox jumps over the lazy dog".into()),
                    ("delay_ms", 20.into()),
                ])
            };
            client.submit_task(TaskSpec::new(task_id, input)).await?;
            if let Some(a) = agents.get_mut(id) {
                a.submitted += 1;
            }
            expected += 1;
        }
    }
    let cut = ids.get(1).cloned();
    let mut cut_done = false;

    // 3. The live view until every task has ended.
    let view = args.view && std::io::stdout().is_terminal();
    let mut drawn = 0usize;
    let deadline = Instant::now() + PATIENCE;
    let mut next_frame = Instant::now();
    loop {
        let ended: usize = agents.values().map(Agent::ended).sum();
        if ended >= expected {
            break;
        }
        if Instant::now() >= deadline {
            return Err(format!("only {ended} of {expected} tasks ended in {PATIENCE:?}").into());
        }
        // Cut agent 1's connection once its first task has streamed a little.
        if !cut_done {
            if let Some(id) = &cut {
                if agents.get(id).is_some_and(|a| a.events >= 12) {
                    if let Some(client) = fleet.client(id) {
                        client.drop_connection();
                        cut_done = true;
                        println!("fleet-demo: cut {id}'s control connection mid-task");
                    }
                }
            }
        }
        if view && Instant::now() >= next_frame {
            drawn = draw(&agents, drawn);
            next_frame = Instant::now() + FRAME;
        }
        next_event(&mut events, &mut agents, FRAME).await;
    }
    if view {
        draw(&agents, drawn);
    }

    // 4. Delivery check: each shim's last seq (status) must be the last one received.
    let mut last = BTreeMap::new();
    for id in &ids {
        if let Some(client) = fleet.client(id) {
            last.insert(id.clone(), client.status().await?.last_seq);
        }
    }
    let caught_up = wait_until(&mut events, &mut agents, "every event delivered", |a| {
        last.iter()
            .all(|(id, seq)| a.get(id).is_some_and(|a| a.last_seq >= *seq))
    })
    .await;
    for (id, seq) in &last {
        if let Some(a) = agents.get_mut(id) {
            // Never received: lost.
            a.lost += seq.saturating_sub(a.last_seq);
        }
    }

    // 5. Every agent goes idle once its work is done; one is paused (a platform would freeze
    // its container now) and a new task wakes it: the hook, a resume, the task.
    wait_until(&mut events, &mut agents, "every agent idle", |a| {
        a.values().all(|a| a.idle)
    })
    .await?;
    let went_idle = agents.values().filter(|a| a.idles > 0).count();
    println!("fleet-demo: every agent idle ({IDLE_AFTER} without work)");
    let mut woken = None;
    if let Some(id) = ids.last() {
        if let Some(client) = fleet.client(id) {
            client.pause(None).await?;
            wait_until(&mut events, &mut agents, "the agent paused", |a| {
                a.get(id)
                    .is_some_and(|a| a.state == Some(DriverState::Paused))
            })
            .await?;
            println!("fleet-demo: paused idle {id}");
            let text = "good morning";
            client
                .submit_task(TaskSpec::new(
                    format!("{id}-wake"),
                    map([("text", text.into())]),
                ))
                .await?;
            expected += 1;
            if let Some(a) = agents.get_mut(id) {
                a.submitted += 1;
            }
            wait_until(&mut events, &mut agents, "the waking task done", |a| {
                a.get(id).is_some_and(|a| a.ended() >= a.submitted)
            })
            .await?;
            woken = Some(id.clone());
        }
    }
    let wakes = wakes.load(std::sync::atomic::Ordering::SeqCst);

    // 6. Shut every agent down; each shim exits with its driver's status.
    for id in &ids {
        if let Some(client) = fleet.client(id) {
            if let Err(e) = client
                .shutdown(Some(Duration::from_secs(2)), Some("demo over"))
                .await
            {
                eprintln!("fleet-demo: shutdown of {id}: {e}");
            }
        }
    }
    let exited = wait_exit(&mut procs, Duration::from_secs(10)).await;
    fleet.close().await;
    operator.abort();
    let tailed = operator.await.ok().unwrap_or(0);
    let tailed = TAILED.load(std::sync::atomic::Ordering::SeqCst).max(tailed);

    let elapsed = started.elapsed();
    let total = |f: fn(&Agent) -> u64| agents.values().map(f).sum::<u64>();
    let delivered = total(|a| a.events);
    let duplicates = total(|a| a.duplicates);
    let lost = total(|a| a.lost);
    let succeeded = total(|a| a.succeeded as u64);
    let failed = total(|a| a.failed as u64);
    let restarts = total(|a| u64::from(a.restarts));
    println!();
    println!("fleet-demo summary");
    println!("  agents            {n} ({exited} exited cleanly after shutdown)");
    println!("  tasks             {expected} submitted, {succeeded} succeeded, {failed} failed (the crash)");
    println!("  driver restarts   {restarts}");
    println!(
        "  idle / wake       {went_idle} went idle; {}",
        match &woken {
            Some(id) => format!("{id} paused, woken by a new task ({wakes} wake)"),
            None => "none woken".to_owned(),
        }
    );
    println!(
        "  connection cut    {}",
        if cut_done { "1 (resumed)" } else { "none" }
    );
    println!("  operator tail     {tailed} events of agent-0, as an observer beside the fleet");
    let readings: Vec<_> = agents
        .iter()
        .filter_map(|(id, a)| a.memory.map(|m| (id, m, a.cpu_share)))
        .collect();
    if readings.is_empty() {
        println!("  drivers           no metrics reading arrived");
    } else if readings.len() <= 4 {
        for (id, memory, cpu) in &readings {
            let cpu = cpu.map_or("-".to_owned(), |c| format!("{:.1}%", c * 100.0));
            println!(
                "  {:<17} driver memory {:.1} MiB, cpu {cpu}",
                id.to_string(),
                *memory as f64 / 1048576.0
            );
        }
    } else {
        let total: u64 = readings.iter().map(|r| r.1).sum();
        let max = readings.iter().map(|r| r.1).max().unwrap_or(0);
        let cpu: f64 = readings.iter().filter_map(|r| r.2).sum();
        println!(
            "  drivers           memory {:.1} MiB in all (largest {:.1} MiB), cpu {:.1}% in all",
            total as f64 / 1048576.0,
            max as f64 / 1048576.0,
            cpu * 100.0
        );
    }
    println!("  events delivered  {delivered}");
    println!("  duplicates        {duplicates}");
    println!("  lost              {lost}");
    println!("  elapsed           {:.2} s", elapsed.as_secs_f64());
    let ok = duplicates == 0
        && lost == 0
        && caught_up.is_ok()
        && exited == n
        && went_idle == n
        && woken.is_some()
        && wakes == 1;
    if let Err(e) = caught_up {
        println!("  FAILED: {e}");
    }
    if exited != n {
        println!(
            "  FAILED: {} agents did not exit after shutdown",
            n - exited
        );
    }
    if ok {
        cleanup.keep = false;
        println!("OK");
    } else {
        println!("FAILED (the agents' logs are in {})", dir.display());
    }
    Ok(ok)
}

/// A msgpack map from string keys.
fn map<const N: usize>(pairs: [(&str, rmpv::Value); N]) -> rmpv::Value {
    rmpv::Value::Map(pairs.into_iter().map(|(k, v)| (k.into(), v)).collect())
}

/// Events the operator's tail has read so far.
static TAILED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The operator: an observer tailing one agent's socket, acknowledging what it reads (which,
/// as an observer's, frees nothing), until aborted; returns the events read.
async fn tail_as_operator(addr: Addr, token: Token) -> u64 {
    let opts = ConnectOptions::new().token(token).observer(true);
    let client = match opts.connect(&addr).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fleet-demo: the operator cannot connect to {addr}: {e}");
            return 0;
        }
    };
    let Ok(mut events) = client.events() else {
        return 0;
    };
    let mut n = 0;
    while let Some((seq, _)) = events.next().await {
        client.ack(seq);
        n += 1;
        TAILED.store(n, std::sync::atomic::Ordering::SeqCst);
    }
    n
}

fn agent_name(i: usize) -> String {
    format!("agent-{i}")
}

/// Reads events until `done` holds (at most [`PATIENCE`]).
async fn wait_until(
    events: &mut control_link::FleetEvents,
    agents: &mut BTreeMap<AgentId, Agent>,
    what: &str,
    done: impl Fn(&BTreeMap<AgentId, Agent>) -> bool,
) -> Result<(), Error> {
    let deadline = Instant::now() + PATIENCE;
    while !done(agents) {
        if Instant::now() >= deadline {
            return Err(format!("waiting for {what}: not within {PATIENCE:?}").into());
        }
        next_event(events, agents, FRAME).await;
    }
    Ok(())
}

/// Counts the next event, if one comes within `wait`.
async fn next_event(
    events: &mut control_link::FleetEvents,
    agents: &mut BTreeMap<AgentId, Agent>,
    wait: Duration,
) {
    if let Ok(Some((id, seq, event))) = tokio::time::timeout(wait, events.next()).await {
        agents.entry(id).or_default().count(seq, &event);
    }
}

/// Draws the view over the previous one (`drawn` lines); returns the lines drawn.
fn draw(agents: &BTreeMap<AgentId, Agent>, drawn: usize) -> usize {
    let mut out = String::new();
    if drawn > 0 {
        out.push_str(&format!("\x1b[{drawn}A"));
    }
    let mut lines = 0;
    let mut line = |s: String| {
        out.push_str("\x1b[2K");
        out.push_str(&s);
        out.push('\n');
        lines += 1;
    };
    if agents.len() <= 16 {
        line(format!(
            "{:<10} {:<9} {:>7} {:>8} {:>9} {:>9} {:>6}",
            "agent", "state", "tasks", "events", "restarts", "memory", "cpu"
        ));
        for (id, a) in agents {
            let state = a
                .state
                .map_or("-".to_owned(), |s| format!("{s:?}").to_lowercase());
            let memory = a
                .memory
                .map_or("-".to_owned(), |b| format!("{:.1}M", b as f64 / 1048576.0));
            let cpu = a
                .cpu_share
                .map_or("-".to_owned(), |c| format!("{:.1}%", c * 100.0));
            line(format!(
                "{:<10} {:<9} {:>3}/{:<3} {:>8} {:>9} {:>9} {:>6}",
                id.to_string(),
                state,
                a.ended(),
                a.submitted,
                a.events,
                a.restarts,
                memory,
                cpu
            ));
        }
    } else {
        let mut by_state: BTreeMap<String, usize> = BTreeMap::new();
        for a in agents.values() {
            let s = a
                .state
                .map_or("-".to_owned(), |s| format!("{s:?}").to_lowercase());
            *by_state.entry(s).or_default() += 1;
        }
        let ended: usize = agents.values().map(Agent::ended).sum();
        let submitted: usize = agents.values().map(|a| a.submitted).sum();
        let events: u64 = agents.values().map(|a| a.events).sum();
        let memory: u64 = agents.values().filter_map(|a| a.memory).sum();
        let cpu: f64 = agents.values().filter_map(|a| a.cpu_share).sum();
        line(format!(
            "agents by state {by_state:?}  tasks {ended}/{submitted}  events {events}  drivers' memory {:.1}M  cpu {:.1}%",
            memory as f64 / 1048576.0,
            cpu * 100.0
        ));
    }
    print!("{out}");
    let _ = std::io::stdout().flush();
    lines
}

/// Waits for every shim process to exit; returns how many exited with status 0.
async fn wait_exit(procs: &mut Processes, limit: Duration) -> usize {
    let deadline = Instant::now() + limit;
    loop {
        let mut running = 0;
        let mut clean = 0;
        for child in &mut procs.children {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => clean += 1,
                Ok(Some(_)) | Err(_) => {}
                Ok(None) => running += 1,
            }
        }
        if running == 0 || Instant::now() >= deadline {
            return clean;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[allow(clippy::too_many_arguments)]
fn start_agent(
    shim: &Path,
    driver: &Path,
    socket: &Addr,
    token: &Path,
    dir: &Path,
    i: usize,
    agents: usize,
    namespaces: bool,
) -> Result<Child, Error> {
    let log = std::fs::File::create(dir.join(format!("{}.log", agent_name(i))))?;
    let mut argv: Vec<OsString> = Vec::new();
    if namespaces {
        // `--kill-child`: killing unshare (by pid, at cleanup) kills the shim too.
        for a in ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"] {
            argv.push(a.into());
        }
    }
    argv.push(shim.into());
    for a in [
        "--control-connect".to_owned(),
        socket.to_string(),
        // Also listening, for an operator's tools (agentctl) beside the fleet.
        "--control-listen".to_owned(),
        format!(
            "unix:{}",
            dir.join(format!("{}.sock", agent_name(i))).display()
        ),
        "--control-token-file".to_owned(),
        token.display().to_string(),
        "--agent-id".to_owned(),
        agent_name(i),
        "--backoff-initial".to_owned(),
        "50ms".to_owned(),
        "--idle-after".to_owned(),
        IDLE_AFTER.to_owned(),
        "--metrics-interval".to_owned(),
        metrics_interval(agents),
        "--".to_owned(),
    ] {
        argv.push(a.into());
    }
    argv.push(driver.into());
    let (program, rest) = argv.split_first().ok_or("empty command")?;
    let child = Command::new(program)
        .args(rest)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .env("RUST_LOG", "info")
        .spawn()?;
    Ok(child)
}

/// A fresh random token in a file only its owner can read.
fn write_token(path: &Path) -> Result<Token, Error> {
    use std::io::Read as _;
    let mut raw = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut raw)?;
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode_0600()
        .open(path)?;
    f.write_all(hex.as_bytes())?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(Token::from_bytes(hex.as_bytes())?)
}

/// `OpenOptions::mode(0o600)` under a name that reads well in a chain.
trait Mode0600 {
    fn mode_0600(&mut self) -> &mut Self;
}

impl Mode0600 for std::fs::OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt as _;
        self.mode(0o600)
    }
}

/// The shim and the driver: from the flags (or `$AGENT_SHIM_BIN`), else next to this
/// program; when run by cargo, they are built first.
fn binaries(args: &Args) -> Result<(PathBuf, PathBuf), Error> {
    let here = std::env::current_exe()?
        .parent()
        .map(Path::to_path_buf)
        .ok_or("cannot locate this program's directory")?;
    let shim = args.shim.clone().unwrap_or_else(|| here.join("agent-shim"));
    let driver = args
        .driver
        .clone()
        .unwrap_or_else(|| here.join("echo-driver"));
    // Run by cargo (`cargo run -p agent-shim-examples`): make sure both are built and
    // current (a no-op when they are).
    let explicit = args.shim.is_some() && args.driver.is_some();
    if let (Some(cargo), false) = (std::env::var_os("CARGO"), explicit) {
        let release = here.file_name().is_some_and(|d| d == "release");
        println!("fleet-demo: building agent-shim and the echo driver (cargo build)");
        let mut build = Command::new(cargo);
        build.args([
            "build",
            "-q",
            "-p",
            "agent-shim",
            "-p",
            "agent-shim-examples",
        ]);
        if release {
            build.arg("--release");
        }
        let status = build.status()?;
        if !status.success() {
            return Err(format!("cargo build failed: {status}").into());
        }
    }
    for p in [&shim, &driver] {
        if !p.is_file() {
            return Err(format!(
                "{} not found: build it (cargo build --release -p agent-shim -p \
                 agent-shim-examples) or pass --shim and --driver",
                p.display()
            )
            .into());
        }
    }
    Ok((shim, driver))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Removes the demo's directory (token, socket, logs) at the end, unless told to keep it
/// (a failed run keeps the agents' logs).
struct RemoveDir {
    dir: PathBuf,
    keep: bool,
}

impl Drop for RemoveDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
