//! Connections that never authenticate cannot lock the control plane out.
//!
//! The attacker (`tests/src/bin/gate-attacker.rs`) is a tool process of the sandbox: the
//! control plane starts it with `exec`, so it runs inside the shim's pid, mount and network
//! namespaces, as root. It runs every strategy at once: hundreds of silent connections from
//! 200 loopback source addresses and the sandbox's own address, reopened as soon as they
//! close; slowloris connections (a byte a second); handshakes with a wrong token in a loop; a
//! connect/close flood. Meanwhile the control plane, from **outside** the sandbox, makes at
//! least [`ATTEMPTS`] connections one after the other and completes the whole handshake on
//! each: at least 99% must complete within a second.
//!
//! - TCP: the shim listens on `tcp:0.0.0.0:7000` in a network namespace of its own, joined to
//!   the test's by a veth pair with private addresses that exist only on this machine; the
//!   control plane connects from the host side.
//! - unix: the shim's socket (root's, mode 0600, with a token); the attacker is root inside
//!   the sandbox's pid namespace, the control plane connects from outside it.
//!
//! Each prints a `MEASURED` line: the handshake latencies (p50, p99, max) and what the
//! attacker did (connections made, held admitted at most, refusals it was sent).

use std::ffi::OsString;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use driver_protocol::message::Exec;

use crate::supervisor::{Driver, FAST};
use crate::support::control::{ControlClient, Stream, Target};
use crate::support::{poll_until, require_root, Running, Shim, TempDir, PATIENCE};

/// Control-plane connection attempts measured.
const ATTEMPTS: usize = 120;
/// The handshake must complete within this.
const WITHIN: Duration = Duration::from_secs(1);
/// How long one attempt may take before it is counted as failed and abandoned.
const ATTEMPT_LIMIT: Duration = Duration::from_millis(1500);
/// The whole measurement phase, at most (a shim that lets the attacker in fails long before).
const PHASE_LIMIT: Duration = Duration::from_secs(150);
/// How long the attack runs before the first measured attempt.
const WARM_UP: Duration = Duration::from_millis(2500);
/// The token.
const TOKEN: &[u8] = b"gate-test-token";

fn attacker() -> &'static str {
    env!("CARGO_BIN_EXE_gate-attacker")
}

/// A network namespace with a veth pair into it: `outside` on the host, `inside` in the
/// namespace. Deleted on drop (its end of the pair goes with it, and so the other).
struct NetNs {
    name: String,
    host_if: String,
    outside: String,
    inside: String,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("ip {args:?} (is iproute2 installed?)"))?;
    ensure!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

impl NetNs {
    fn new() -> Result<Self> {
        let id = std::process::id() % 100_000;
        let k = (std::process::id() % 200) + 20;
        let ns = NetNs {
            name: format!("asgate{id}"),
            host_if: format!("agh{id}"),
            outside: format!("10.213.{k}.1"),
            inside: format!("10.213.{k}.2"),
        };
        let peer = format!("ags{id}");
        ip(&["netns", "add", &ns.name])?;
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
        ])?;
        ip(&["link", "set", &peer, "netns", &ns.name])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", ns.outside),
            "dev",
            &ns.host_if,
        ])?;
        ip(&["link", "set", &ns.host_if, "up"])?;
        let inside = format!("{}/24", ns.inside);
        for args in [
            vec!["addr", "add", inside.as_str(), "dev", peer.as_str()],
            vec!["link", "set", peer.as_str(), "up"],
            vec!["link", "set", "lo", "up"],
        ] {
            let mut all = vec!["netns", "exec", ns.name.as_str(), "ip"];
            all.extend(args);
            ip(&all)?;
        }
        Ok(ns)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.host_if]);
    }
}

fn token_file(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("token");
    std::fs::write(&path, TOKEN)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(path)
}

/// The echo driver under a shim with the fast test flags, `listen` and the token.
fn shim(listen: &str, token: &Path, netns: Option<&str>) -> Result<Running> {
    let mut args: Vec<OsString> = FAST
        .iter()
        .flat_map(|(k, v)| [OsString::from(k), OsString::from(v)])
        .collect();
    args.extend(
        [
            "--control-listen",
            listen,
            "--control-token-file",
            &token.display().to_string(),
        ]
        .map(OsString::from),
    );
    let mut builder = Shim::new().args(args).cmd(Driver::Rust.argv()?);
    if let Some(ns) = netns {
        builder = builder.netns(ns);
    }
    builder.start()
}

/// One connection and handshake from the control plane, timed from before the connect.
fn attempt(target: &Target) -> Result<Duration> {
    let started = Instant::now();
    let stream = match target {
        Target::Tcp(addr) => {
            let addr: SocketAddr = addr.parse()?;
            Stream::Tcp(TcpStream::connect_timeout(&addr, ATTEMPT_LIMIT)?)
        }
        Target::Unix(path) => Stream::Unix(std::os::unix::net::UnixStream::connect(path)?),
    };
    let left = ATTEMPT_LIMIT.saturating_sub(started.elapsed());
    ControlClient::over(stream, Some(TOKEN), left)?;
    Ok(started.elapsed())
}

/// Waits until a full handshake succeeds (the listener is up, the driver need not be).
fn first_client(target: &Target, shim: &Running) -> Result<ControlClient> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let stream = Stream::connect(target, PATIENCE)?;
        match ControlClient::over(stream, Some(TOKEN), PATIENCE) {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => {
                bail!("no handshake: {e:#}\n{}", shim.context())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// The figures of one run.
struct Figures {
    made: usize,
    within: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
    errors: Vec<String>,
}

/// Starts the attacker inside the sandbox, lets it warm up, measures the control plane's
/// attempts, stops the attacker, and returns its `ATTACK` line with the figures.
fn run_attack(
    target: &Target,
    shim: &Running,
    attacker_target: &str,
    extra: &[&str],
    stop_file: &Path,
) -> Result<(Figures, Result<String>)> {
    let mut ctl = first_client(target, shim)?;
    let mut argv: Vec<String> = vec![
        attacker().to_owned(),
        attacker_target.to_owned(),
        "240".to_owned(),
        "--until-file".to_owned(),
        stop_file.display().to_string(),
    ];
    argv.extend(extra.iter().map(|s| (*s).to_owned()));
    let started = ctl.exec_started(|id| Exec {
        timeout_ms: Some(250_000),
        ..Exec::new(id, argv.iter().map(String::as_str))
    })?;
    drop(ctl);
    std::thread::sleep(WARM_UP);

    let phase = Instant::now();
    let mut times = Vec::new();
    let mut errors = Vec::new();
    while times.len() + errors.len() < ATTEMPTS && phase.elapsed() < PHASE_LIMIT {
        match attempt(target) {
            Ok(t) => times.push(t),
            Err(e) => errors.push(format!("{e:#}")),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::write(stop_file, b"stop")?;

    // A last connection collects the attacker's report (its exec output).
    let line = (|| {
        let mut ctl = first_client(target, shim)?;
        ctl.resume_from(0)?;
        let run = ctl.exec_run(started.exec_id, PATIENCE * 2)?;
        let out = run.out();
        out.lines()
            .find(|l| l.starts_with("ATTACK "))
            .map(str::to_owned)
            .with_context(|| format!("no ATTACK line from the attacker: {out:?}"))
    })();

    let made = times.len() + errors.len();
    let within = times.iter().filter(|t| **t <= WITHIN).count();
    times.sort();
    let pick = |q: f64| {
        times
            .get(((times.len() as f64 * q) as usize).min(times.len().saturating_sub(1)))
            .copied()
            .unwrap_or(ATTEMPT_LIMIT)
    };
    let figures = Figures {
        made,
        within,
        p50: pick(0.5),
        p99: pick(0.99),
        max: times.last().copied().unwrap_or(ATTEMPT_LIMIT),
        errors,
    };
    Ok((figures, line))
}

/// A field of the `ATTACK` line.
fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The assertions shared by both variants.
fn judge(what: &str, f: &Figures, attack: Result<String>) -> Result<()> {
    let attack = attack.unwrap_or_else(|e| format!("(no report from the attacker: {e:#})"));
    let attack = attack.as_str();
    println!(
        "MEASURED gate {what}: {within}/{made} control-plane handshakes within {WITHIN:?} \
         (p50 {p50:?}, p99 {p99:?}, max {max:?}, {failed} failed) while the attacker ran: {attack}",
        within = f.within,
        made = f.made,
        p50 = f.p50,
        p99 = f.p99,
        max = f.max,
        failed = f.errors.len(),
    );
    ensure!(
        f.made >= 100,
        "only {} attempts within {PHASE_LIMIT:?}",
        f.made
    );
    ensure!(
        f.within * 100 >= f.made * 99,
        "{what}: only {} of {} control-plane handshakes completed within {WITHIN:?}; \
         first errors: {:?}",
        f.within,
        f.made,
        f.errors.iter().take(3).collect::<Vec<_>>()
    );
    // The attack was real: it made thousands of connections, held admitted ones, failed
    // handshakes, and every refusal it got was an `error` frame, never a bare close.
    ensure!(
        field(attack, "connects") >= 1000,
        "a feeble attack: {attack}"
    );
    ensure!(field(attack, "held_max") >= 1, "nothing held: {attack}");
    ensure!(
        field(attack, "wrong_tokens") >= 10,
        "no wrong tokens: {attack}"
    );
    ensure!(
        field(attack, "busy") + field(attack, "limit") >= 100,
        "no busy or limit refusals: {attack}"
    );
    ensure!(
        field(attack, "bare_closes") == 0,
        "refusals without an error frame: {attack}"
    );
    Ok(())
}

/// TCP: the control plane from outside the sandbox's network namespace.
#[test]
fn an_inside_attacker_cannot_keep_the_control_plane_out_over_tcp() -> Result<()> {
    require_root!();
    let dir = TempDir::new("gate-tcp")?;
    let token = token_file(dir.path())?;
    let ns = NetNs::new()?;
    let shim = shim("tcp:0.0.0.0:7000", &token, Some(&ns.name))?;
    let target = Target::Tcp(format!("{}:7000", ns.inside));
    let (figures, attack) = run_attack(
        &target,
        &shim,
        "tcp:127.0.0.1:7000",
        &["--own", &ns.inside, "--sources", "200", "--holders", "400"],
        &dir.path().join("stop"),
    )?;
    let outside = &ns.outside;
    judge(
        &format!("tcp (control plane at {outside})"),
        &figures,
        attack,
    )?;
    ensure!(shim.alive(), "the shim died\n{}", shim.context());
    Ok(())
}

/// unix: the control plane from outside the sandbox's pid namespace.
#[test]
fn an_inside_attacker_cannot_keep_the_control_plane_out_over_unix() -> Result<()> {
    require_root!();
    let dir = TempDir::new("gate-unix")?;
    let token = token_file(dir.path())?;
    let sock = dir.path().join("c.sock");
    let shim = shim(&format!("unix:{}", sock.display()), &token, None)?;
    if poll_until(PATIENCE, || sock.exists().then_some(())).is_none() {
        bail!("no control socket\n{}", shim.context());
    }
    let target = Target::Unix(sock.clone());
    let (figures, attack) = run_attack(
        &target,
        &shim,
        &format!("unix:{}", sock.display()),
        &["--holders", "400"],
        &dir.path().join("stop"),
    )?;
    judge("unix", &figures, attack)?;
    ensure!(shim.alive(), "the shim died\n{}", shim.context());
    Ok(())
}
