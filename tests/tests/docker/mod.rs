//! End to end in real containers, driven by the `docker` CLI: `Dockerfile.agent` built from
//! the static binaries, the shim as the container's PID 1, control-link on the host driving it
//! over a bind-mounted unix socket and over TCP on a user-defined network, `docker stop`,
//! `kill`, `pause`/`unpause`, `network disconnect`/`connect`, and a `Fleet` of 20 containers.
//!
//! When no Docker engine answers, every test prints a loud `SKIPPED` line and passes, except
//! under `CI=true`, where it fails (`support::skip`).
//!
//! Hygiene: every image, container and network is named `agent-shim-e2e-<run>-…` and labelled
//! with the test process's pid; guards remove them on drop (also when a test fails), and each
//! test process first sweeps what dead test processes left behind (a test killed by its
//! timeout runs no destructor). Every `docker` command has a deadline.
//!
//! The images are built once per test run and shared by the run's test processes (nextest
//! runs each test in its own process): see [`image`](mod@image).

mod build;
mod container;
mod control;
mod files;
mod fleet;
mod image;
mod lifecycle;
mod network;
mod reaping;
mod wake;

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};

pub use container::{Container, Network, Run};
pub use image::image;

/// How long one `docker` command may take (a build, a container start on a loaded machine).
pub const DOCKER_PATIENCE: Duration = Duration::from_secs(120);

/// The label on everything these tests create; its value is the creating process's pid.
pub const LABEL: &str = "io.agent-shim.e2e.pid";

/// Prints a loud skip line and returns from the test when no Docker engine answers.
macro_rules! require_docker {
    () => {
        if !$crate::docker::available() {
            return $crate::support::skip(
                "docker",
                "no Docker engine answers `docker version`",
                module_path!(),
            );
        }
    };
}
pub(crate) use require_docker;

/// Whether a Docker engine answers (asked once per process, within 20 s).
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        match docker(
            &["version", "--format", "{{.Server.Version}}"],
            Duration::from_secs(20),
        ) {
            Ok(version) => {
                eprintln!("docker engine {version}");
                true
            }
            Err(e) => {
                eprintln!("no docker engine: {e:#}");
                false
            }
        }
    })
}

/// This test run's name: `$AGENT_SHIM_E2E_RUN` (set by `.ci/run`, which removes the run's
/// images when it ends), else shared by the processes of one nextest run (`NEXTEST_RUN_ID`),
/// else this process's own.
pub fn run_name() -> &'static str {
    static NAME: OnceLock<String> = OnceLock::new();
    NAME.get_or_init(|| {
        let id = std::env::var("AGENT_SHIM_E2E_RUN")
            .or_else(|_| std::env::var("NEXTEST_RUN_ID"))
            .ok()
            .map(|id| {
                id.to_ascii_lowercase()
                    .chars()
                    .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                    .take(32)
                    .collect::<String>()
            })
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| format!("p{}", std::process::id()));
        format!("agent-shim-e2e-{id}")
    })
}

/// A name for one container or network of this process: unique per run, process and call.
pub fn unique(what: &str) -> String {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}-{what}-{}-{n}", run_name(), std::process::id())
}

/// Runs `docker ARGS` for at most `limit`; its stdout (trimmed), or an error with its stderr.
pub fn docker(args: &[&str], limit: Duration) -> Result<String> {
    docker_in(args, None, limit)
}

/// [`docker`] in the directory `dir` (a build context).
pub fn docker_in(args: &[&str], dir: Option<&std::path::Path>, limit: Duration) -> Result<String> {
    let mut cmd = Command::new("docker");
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(dir) = dir {
        cmd.current_dir(dir);
    }
    let shown = format!("docker {}", args.join(" "));
    let mut child = cmd.spawn().with_context(|| format!("spawn {shown}"))?;
    let collect = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = collect(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = collect(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().context("wait for docker")? {
            break status;
        }
        if Instant::now() > deadline {
            // Our own child, by pid; then reaped.
            let _ = child.kill();
            let _ = child.wait();
            bail!("{shown}: no answer within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out.join().map_err(|_| anyhow!("stdout reader panicked"))?;
    let stderr = err.join().map_err(|_| anyhow!("stderr reader panicked"))?;
    if !status.success() {
        bail!("{shown}: {status}\n{}{}", stdout.trim(), stderr.trim());
    }
    Ok(stdout.trim().to_owned())
}

/// Whether the process `pid` (of the host's PID namespace) is alive.
fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes the containers and networks that dead test processes left behind (once per
/// process; errors are ignored: a sweep must never fail a test).
pub fn sweep() {
    static SWEPT: OnceLock<()> = OnceLock::new();
    SWEPT.get_or_init(|| {
        let filter = format!("label={LABEL}");
        let limit = Duration::from_secs(30);
        let listed = |args: &[&str]| -> Vec<(String, u32)> {
            docker(args, limit)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| {
                    let (name, pid) = l.split_once(' ')?;
                    Some((name.to_owned(), pid.trim().parse().ok()?))
                })
                .filter(|(_, pid)| !pid_alive(*pid))
                .collect()
        };
        let format = format!("{{{{.Names}}}} {{{{.Label \"{LABEL}\"}}}}");
        for (name, _) in listed(&["ps", "-a", "--filter", &filter, "--format", &format]) {
            let _ = docker(&["rm", "-f", "-v", &name], limit);
        }
        let format = format!("{{{{.Name}}}} {{{{.Label \"{LABEL}\"}}}}");
        for (name, _) in listed(&["network", "ls", "--filter", &filter, "--format", &format]) {
            let _ = docker(&["network", "rm", &name], limit);
        }
    });
}

/// Polls `check` until it returns `Some`, at most `limit`; the error names `what`.
pub fn wait_for<T>(limit: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `key=value` lines of a probe report, as a map.
pub fn report(text: &str) -> std::collections::BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// The shim flags every supervised container gets: the fast timings of the other tests.
pub fn fast_flags() -> Vec<String> {
    crate::supervisor::FAST
        .iter()
        .flat_map(|(k, v)| [(*k).to_owned(), (*v).to_owned()])
        .collect()
}

/// A supervised container of the test image: the echo driver under the shim, which listens
/// on a unix socket in a host directory bind-mounted at `/run/agent-shim`, with a token from
/// a 0600 file in the same directory.
///
/// Field order is drop order: the container, then the directory.
#[derive(Debug)]
pub struct UnixAgent {
    /// The container.
    pub container: Container,
    /// The control socket, as the host sees it.
    pub addr: control_link::Addr,
    /// The token.
    pub token: control_link::Token,
    /// The bind-mounted directory (kept until the container is gone).
    _dir: crate::support::TempDir,
}

impl UnixAgent {
    /// Starts one from `image` with extra `docker run` options and shim flags, and waits for
    /// its socket.
    pub fn start(image: &str, docker_opts: &[&str], shim_flags: &[&str]) -> Result<UnixAgent> {
        Self::start_driver(
            image,
            docker_opts,
            shim_flags,
            &["/usr/local/bin/echo-driver"],
        )
    }

    /// [`UnixAgent::start`] with another driver command. A flag in `shim_flags` replaces the
    /// [`fast_flags`] value of the same name.
    pub fn start_driver(
        image: &str,
        docker_opts: &[&str],
        shim_flags: &[&str],
        driver: &[&str],
    ) -> Result<UnixAgent> {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = crate::support::TempDir::new("docker-unix")?;
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, format!("token-{}\n", unique("t")))?;
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600))?;
        let token = control_link::Token::from_file(&token_file)?;
        let fast: Vec<String> = crate::supervisor::FAST
            .iter()
            .filter(|(k, _)| !shim_flags.contains(k))
            .flat_map(|(k, v)| [(*k).to_owned(), (*v).to_owned()])
            .collect();
        let container = Run::new("unix")
            .opt("-v")
            .opt(format!("{}:/run/agent-shim", dir.path().display()))
            .opts(docker_opts.iter().copied())
            .args([
                "--control-listen",
                "unix:/run/agent-shim/control.sock",
                "--control-token-file",
                "/run/agent-shim/token",
            ])
            .args(fast)
            .args(shim_flags.iter().copied())
            .args(["--"])
            .args(driver.iter().copied())
            .start(image)?;
        let sock = dir.path().join("control.sock");
        wait_for(DOCKER_PATIENCE, "the control socket", || {
            sock.exists().then_some(())
        })
        .with_context(|| format!("logs:\n{}", container.logs()))?;
        Ok(UnixAgent {
            container,
            addr: control_link::Addr::Unix(sock),
            token,
            _dir: dir,
        })
    }

    /// Connection options with its token and quick reconnects.
    pub fn options(&self) -> control_link::ConnectOptions {
        connect_options().token(self.token.clone())
    }
}

/// How long the driver says it was frozen: the `N` of its `resumed after N ms` log among
/// `events`.
pub fn resumed_after_ms(
    events: &[(control_link::Seq, control_link::protocol::message::Event)],
) -> Result<u64> {
    use control_link::protocol::message::{Event, LogStream};
    events
        .iter()
        .find_map(|(_, e)| match e {
            Event::Log(l) if l.stream == LogStream::Driver => l
                .text
                .strip_prefix("resumed after ")?
                .strip_suffix(" ms")?
                .parse::<u64>()
                .ok(),
            _ => None,
        })
        .with_context(|| {
            format!(
                "no `resumed after` log: {}",
                crate::control_link::kinds(events)
            )
        })
}

/// Connection options for a test: quick reconnects.
pub fn connect_options() -> control_link::ConnectOptions {
    control_link::ConnectOptions::new().backoff(control_link::Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(300),
        jitter: 0.2,
        ..control_link::Backoff::default()
    })
}

/// Connects to `addr`, retrying while the shim in a starting container does not listen yet.
pub async fn connect_when_up(
    opts: &control_link::ConnectOptions,
    addr: &control_link::Addr,
) -> Result<control_link::Client> {
    let deadline = tokio::time::Instant::now() + DOCKER_PATIENCE;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), opts.connect(addr)).await {
            Ok(Ok(client)) => return Ok(client),
            Ok(Err(e)) if tokio::time::Instant::now() > deadline => {
                return Err(e).with_context(|| format!("connect to {addr}"))
            }
            Err(_) if tokio::time::Instant::now() > deadline => bail!("connect to {addr}: timeout"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Runs `argv` in the sandbox through the control link; its stdout and stderr, and its exit.
pub async fn exec_output(
    client: &control_link::Client,
    events: &mut control_link::EventStream,
    argv: &[&str],
) -> Result<(String, control_link::protocol::message::ExecExit)> {
    use control_link::protocol::message::Event;
    let started = client
        .exec(control_link::ExecSpec::new(argv.iter().copied()))
        .await?;
    let got = crate::control_link::read_until(
        events,
        crate::support::PATIENCE,
        |e| matches!(e, Event::ExecExit(x) if x.exec_id == started.exec_id),
    )
    .await?;
    let mut out = Vec::new();
    let mut exit = None;
    for (_, e) in got {
        match e {
            Event::ExecOutput(o) if o.exec_id == started.exec_id => out.extend_from_slice(&o.data),
            Event::ExecExit(x) if x.exec_id == started.exec_id => exit = Some(x),
            _ => {}
        }
    }
    let exit = exit.ok_or_else(|| anyhow!("no exec_exit"))?;
    Ok((String::from_utf8_lossy(&out).into_owned(), exit))
}

/// The echo driver of `container`, as the host sees it: its host pid.
pub fn driver_on_host(container: &Container) -> Result<libc::pid_t> {
    let init = container.host_pid()?;
    wait_for(crate::support::PATIENCE, "the driver process", || {
        crate::support::children_of(init).into_iter().find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "echo-driver")
        })
    })
}

/// A `Name:` line of `/proc/PID/status` (its value, tabs and all).
pub fn proc_status(pid: libc::pid_t, field: &str) -> Result<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(|v| v.trim().to_owned())
        .ok_or_else(|| anyhow!("no {field} in /proc/{pid}/status"))
}
