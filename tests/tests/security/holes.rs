//! Smaller holes: stderr to a regular file, a second shim on a live socket, daemons that leave an exec, clients that never acknowledge.
//!
//! Each test runs the real shim (as PID 1 of its own PID namespace where that matters) and
//! the real clients: the driver's output must reach a stderr that is a regular file (epoll
//! refuses those); a second shim must not take over the control socket of a live one, a dead
//! socket file is replaced and only the shim's own socket is removed at exit; a `setsid`
//! daemon started by an exec pins the documented limit (it survives the exec's timeout and
//! dies at shutdown, nothing is left after); `agentctl exec` of 1 GiB completes because it
//! acknowledges what it printed. In Docker, a tenant's own shim (uid 1000) started on the
//! bind-mounted socket directory of a live one is refused too.

use std::ffi::OsString;
use std::io::Read as _;
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use driver_protocol::message::Exec;

use crate::supervisor::{Driver, Setup, FAST};
use crate::support::control::ControlClient;
use crate::support::{
    children_of, is_root, poll_until, require_root, workspace_bin, Mode, PidFd, Running, Shim,
    TempDir, PATIENCE,
};

/// The exit code of a shim that failed before its child ran.
const EXIT_STARTUP: i32 = 125;

/// The shim options of a supervisor-mode run listening on `sock` (insecure unix), with the
/// fast test flags.
fn listen_args(sock: &Path) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "--control-listen".into(),
        format!("unix:{}", sock.display()).into(),
        "--control-insecure".into(),
    ];
    for (k, v) in FAST {
        args.push(k.into());
        args.push(v.into());
    }
    args
}

/// The echo driver's command line as one shell word list (for `sh -c … exec DRIVER`).
fn echo_driver() -> Result<String> {
    let argv = Driver::Rust.argv()?;
    let bin = argv
        .first()
        .and_then(|a| a.to_str())
        .ok_or_else(|| anyhow!("no echo driver path"))?;
    Ok(format!("'{bin}'"))
}

/// Waits until `sock` accepts a connection and answers `status`; the connection.
fn connect(sock: &Path, shim: &Running) -> Result<ControlClient> {
    let mut ctl = match ControlClient::connect(sock, PATIENCE) {
        Ok(c) => c,
        Err(e) => bail!("connect {}: {e:#}\n{}", sock.display(), shim.context()),
    };
    ctl.resume_from(0)?;
    ctl.status()
        .with_context(|| format!("status over {}\n{}", sock.display(), shim.context()))?;
    Ok(ctl)
}

/// (device, inode) of the file at `path`, not following a symlink.
fn identity(path: &Path) -> Result<(u64, u64)> {
    let meta =
        std::fs::symlink_metadata(path).with_context(|| format!("lstat {}", path.display()))?;
    Ok((meta.dev(), meta.ino()))
}

#[test]
fn stderr_to_a_regular_file_gets_the_drivers_output() -> Result<()> {
    require_root!();
    let dir = TempDir::new("holes-stderr")?;
    let sock = dir.path().join("c.sock");
    let log = dir.path().join("shim.log");
    let script = format!(
        "echo holes-out-marker; echo holes-err-marker >&2; exec {}",
        echo_driver()?
    );
    let shim = Shim::new()
        .pidns()
        .args(listen_args(&sock))
        .cmd(["sh", "-c", &script])
        .stderr_file(&log)
        .start()?;
    let mut ctl = connect(&sock, &shim)?;
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    let want = [
        "stdout: holes-out-marker",
        "stderr: holes-err-marker",
        "stdout: echo-driver: started",
    ];
    let seen = poll_until(PATIENCE, || {
        let text = read();
        want.iter().all(|w| text.contains(w)).then_some(text)
    });
    ensure!(
        seen.is_some(),
        "the driver's output never reached the shim's stderr (a regular file) within {PATIENCE:?}; \
         the file holds:\n{}\n{}",
        read(),
        shim.context()
    );
    // The shim carries on: still answering on its socket.
    ctl.status()?;
    ensure!(shim.alive(), "the shim died\n{}", shim.context());
    Ok(())
}

#[test]
fn a_second_shim_on_a_live_socket_refuses_and_the_first_stays_reachable() -> Result<()> {
    require_root!();
    let mut first = Setup::new(Mode::Pid1).start()?;
    first.expect_up(1)?;
    let sock = first.sock.clone();
    let before = identity(&sock)?;

    let mut second = Shim::new()
        .pidns()
        .args(listen_args(&sock))
        .cmd(Driver::Rust.argv()?)
        .start()?;
    // On a shim that takes the socket over, this wait runs out: it serves on and on.
    second.expect_exit(EXIT_STARTUP, Duration::from_secs(10))?;
    let err = second.stderr();
    ensure!(
        err.contains("live listener") && err.contains(&sock.display().to_string()),
        "the refusal does not say why: {err:?}"
    );
    drop(second);

    // The socket file is the first shim's, untouched, and the first shim answers on it: on
    // the connection it had, and on a new one.
    ensure!(identity(&sock)? == before, "the socket file was replaced");
    first.status()?;
    let mut again = connect(&sock, &first.shim)?;
    again.status()?;
    Ok(())
}

#[test]
fn a_dead_socket_file_is_replaced_and_only_our_own_socket_is_removed_at_exit() -> Result<()> {
    require_root!();
    let dir = TempDir::new("holes-dead")?;
    let sock = dir.path().join("c.sock");
    // A socket file nobody listens on any more (a shim killed with SIGKILL leaves one).
    drop(UnixListener::bind(&sock)?);
    ensure!(
        UnixStream::connect(&sock).is_err(),
        "the old socket still listens"
    );

    let mut shim = Shim::new()
        .pidns()
        .args(listen_args(&sock))
        .cmd(Driver::Rust.argv()?)
        .start()?;
    let mut ctl = connect(&sock, &shim)?;
    ctl.status()?;

    // Someone else binds the path while the shim runs (an operator's second shim after an
    // `rm`, or whatever the tenant put in a directory it can write).
    std::fs::remove_file(&sock)?;
    let other = UnixListener::bind(&sock)?;
    let theirs = identity(&sock)?;

    drop(ctl);
    shim.signal(libc::SIGTERM)?;
    shim.wait_timeout(PATIENCE)?;
    ensure!(
        sock.exists() && identity(&sock)? == theirs,
        "the exiting shim removed a socket that was not its own\n{}",
        shim.context()
    );
    // And it still works for its owner.
    let _client = UnixStream::connect(&sock).context("connect to the other listener")?;
    other.set_nonblocking(true)?;
    let accepted = poll_until(PATIENCE, || other.accept().ok());
    ensure!(accepted.is_some(), "the other listener lost its socket");
    Ok(())
}

/// The host pid of the shim's child whose command line contains `needle`.
fn child_with(shim: &Running, needle: &str) -> Option<libc::pid_t> {
    children_of(shim.pid()).into_iter().find(|p| {
        std::fs::read(format!("/proc/{p}/cmdline"))
            .map(|c| {
                String::from_utf8_lossy(&c)
                    .replace('\0', " ")
                    .contains(needle)
            })
            .unwrap_or(false)
    })
}

/// Pins the documented limit (docs/SECURITY.md, shim/README.md § Tool execution): without a
/// per-exec cgroup, a process that leaves the exec's session with `setsid` cannot be told
/// from any other orphan, so it survives the exec's timeout; PID 1 kills it at shutdown and
/// nothing is left after. Where the shim has per-exec cgroups (`status.cgroups` is not
/// `none`: as root with writable cgroup v1 hierarchies, as on this machine) the daemon dies
/// with the exec's timeout instead (`resources::cgroups` tests that mode in full).
#[test]
fn a_setsid_daemon_outlives_the_exec_timeout_and_dies_at_shutdown() -> Result<()> {
    require_root!();
    let mut sup = Setup::new(Mode::Pid1)
        .flag("--exec-kill-grace", "300ms")
        .start()?;
    sup.expect_up(1)?;
    // The daemon's `sleep 6173` is its mark; the exec itself waits far past its timeout.
    let started = sup.ctl.exec_started(|id| Exec {
        timeout_ms: Some(500),
        ..Exec::new(
            id,
            [
                "sh",
                "-c",
                "setsid sleep 6173 </dev/null >/dev/null 2>&1 & sleep 100",
            ],
        )
    })?;
    let run = sup.ctl.exec_run(started.exec_id, PATIENCE)?;
    let exit = run.exit.clone().ok_or_else(|| anyhow!("no exec_exit"))?;
    ensure!(exit.timed_out, "the exec did not time out: {exit:?}");
    let delegated = sup.status()?.cgroups.is_some_and(|m| m != "none");
    if delegated {
        let gone = poll_until(PATIENCE, || {
            child_with(&sup.shim, "sleep 6173").is_none().then_some(())
        });
        ensure!(
            gone.is_some(),
            "a setsid daemon outlived its exec's cgroup\n{}",
            sup.context()
        );
        return Ok(());
    }

    // The exec's group is gone; the daemon, re-parented to PID 1, is not.
    let daemon = poll_until(PATIENCE, || child_with(&sup.shim, "sleep 6173"))
        .ok_or_else(|| anyhow!("the daemon is not a child of PID 1\n{}", sup.context()))?;
    let daemon = PidFd::open(daemon)?;
    std::thread::sleep(Duration::from_millis(1000));
    ensure!(
        daemon.alive(),
        "the daemon died with the exec's timeout: the documented limit changed, update the docs"
    );
    ensure!(
        child_with(&sup.shim, "sleep 100").is_none(),
        "the exec's own process survived its timeout"
    );

    // Shutdown: PID 1 kills what is left, and nothing outlives it.
    sup.shim.signal(libc::SIGTERM)?;
    sup.shim.wait_timeout(PATIENCE)?;
    let gone = poll_until(PATIENCE, || (!daemon.alive()).then_some(()));
    ensure!(gone.is_some(), "the daemon outlived the shim");
    Ok(())
}

fn agentctl_bin() -> Result<PathBuf> {
    workspace_bin(
        "AGENTCTL_BIN",
        &["debug/agentctl"],
        "`cargo build -p agent-shim-examples`",
    )
}

#[test]
fn agentctl_exec_of_a_gibibyte_completes() -> Result<()> {
    const GIB: u64 = 1 << 30;
    // Under nextest's own 120 s so a stall is reported with how far it got (about 13 s
    // in a debug build on a shared 2-core machine).
    let limit = Duration::from_secs(60);
    let shim = crate::control_link::LinkShim::start(if is_root() {
        Mode::Pid1
    } else {
        Mode::Subreaper
    })?;
    let mut child = Command::new(agentctl_bin()?)
        .arg("--addr")
        .arg(shim.addr.to_string())
        // No control plane here: agentctl must be the consumer that frees what it read (an
        // observer's acks free nothing, PROTOCOL.md §8.7, and nobody else would ack).
        .args(["--consumer", "ops"])
        .args(["exec", "--", "sh", "-c", "head -c 1G /dev/zero; exit 7"])
        .env_remove("AGENT_SHIM_TOKEN")
        .env_remove("AGENT_SHIM_CONTROL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = PidFd::open(i32::try_from(child.id())?)?;
    let mut out = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut err = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
    let counter = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        let mut n: u64 = 0;
        let mut zeros = true;
        while let Ok(k) = out.read(&mut buf) {
            if k == 0 {
                break;
            }
            zeros &= buf.get(..k).is_some_and(|b| b.iter().all(|&x| x == 0));
            n += k as u64;
        }
        (n, zeros)
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let t0 = Instant::now();
    let status = poll_until(limit, || child.try_wait().ok().flatten());
    let Some(status) = status else {
        // Stalled: kill it by pid (its pidfd), then report how far it got.
        let _ = pid.signal(libc::SIGKILL);
        let _ = child.wait();
        let (n, _) = counter.join().map_err(|_| anyhow!("counter"))?;
        bail!(
            "agentctl exec of 1 GiB did not finish within {limit:?}: {n} bytes arrived\n{}",
            shim.shim.context()
        );
    };
    let took = t0.elapsed();
    let (n, zeros) = counter.join().map_err(|_| anyhow!("counter"))?;
    let err = err_t.join().map_err(|_| anyhow!("stderr reader"))?;
    eprintln!("MEASURED agentctl exec of 1 GiB: {n} bytes in {took:?}");
    ensure!(
        n == GIB && zeros,
        "{n} bytes (all zeros: {zeros}), want {GIB}; stderr: {err}"
    );
    ensure!(
        status.code() == Some(7),
        "agentctl exited {status:?}; stderr: {err}"
    );
    Ok(())
}

/// A tenant with write access to the socket's directory (a host directory bind-mounted into
/// several sandboxes) starts its own shim there as uid 1000: it must not take the live
/// socket over.
#[test]
fn a_tenants_second_shim_in_docker_cannot_take_a_live_socket_over() -> Result<()> {
    crate::docker::require_docker!();
    use crate::docker::{image, Run, UnixAgent};
    let images = image()?;
    let agent = UnixAgent::start(&images.test, &[], &[])?;
    let control_link::Addr::Unix(sock) = &agent.addr else {
        bail!("not a unix address: {}", agent.addr);
    };
    let dir = sock
        .parent()
        .ok_or_else(|| anyhow!("no directory for {}", sock.display()))?;
    let before = identity(sock)?;
    let rt = crate::control_link::runtime()?;
    let status = |what: &'static str| -> Result<()> {
        rt.block_on(async {
            let client =
                crate::control_link::within(PATIENCE, what, agent.options().connect(&agent.addr))
                    .await??;
            let s = crate::control_link::within(PATIENCE, what, client.status()).await??;
            ensure!(s.driver_pid.is_some(), "{what}: {s:?}");
            client.close().await;
            Ok(())
        })
    };
    status("before")?;

    let tenant = Run::new("holes-tenant")
        .opts(["--user", "1000:1000", "-v"])
        .opt(format!("{}:/run/agent-shim", dir.display()))
        .args([
            "--control-listen",
            "unix:/run/agent-shim/control.sock",
            "--control-insecure",
            "--",
            "/usr/local/bin/echo-driver",
        ])
        .start(&images.test)?;
    // On a shim that takes the socket over, this wait runs out: it serves on and on.
    let code = tenant.wait_exit(Duration::from_secs(30))?;
    let logs = tenant.logs();
    eprintln!("the tenant's shim exited {code}: {}", logs.trim());
    ensure!(
        code == EXIT_STARTUP,
        "the tenant's shim exited {code}: {logs}"
    );
    ensure!(
        logs.contains("control.sock"),
        "the refusal does not name the socket: {logs}"
    );
    ensure!(identity(sock)? == before, "the socket file was replaced");
    status("after")?;
    Ok(())
}
