//! A spawn never blocks PID 1: a child stopped between fork and execve.
//!
//! Between its credential drop and its `execve`, a child of the shim runs as the tenant's uid,
//! so any process of that uid may `SIGSTOP` it there. A shim that reads the child's report
//! pipe with a blocking `read()` then waits forever: no `status`, no reaping, no signals. The
//! attacker here is `probe stop-spawns`, run as uid 1000 by the shim itself (an exec of the
//! control plane, like any tool call), which spins `tgkill(pid, pid, SIGSTOP)` on the newest
//! pids of the namespace (from `/proc/sys/kernel/ns_last_pid`) while the control plane asks
//! for execs and the driver restarts.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use driver_protocol::message::{
    ControlToShim, DriverState, Event, Exec, ShimToControl, Signal, SignalTarget,
};
use driver_protocol::ErrorCode;

use crate::supervisor::Setup;
use crate::support::control::{exec_of, ControlClient, ExecRun};
use crate::support::process::state_of;
use crate::support::{poll_until, probe, require_root, Mode, Shim, PATIENCE};

/// How long the attacker spins.
const ATTACK: Duration = Duration::from_secs(8);

/// `--spawn-timeout` of these runs (`AGENT_SHIM_SPAWN_TIMEOUT`).
const SPAWN_TIMEOUT: &str = "1s";

/// Longest a `status` may take while the attack runs (it is answered at once by a shim that
/// does not block; the margin is for a loaded CI machine).
const STATUS_MAX: Duration = Duration::from_secs(2);

/// Longest an `exec` may wait for its answer: the spawn timeout and a margin.
const EXEC_REPLY_MAX: Duration = Duration::from_secs(4);

/// The shim's children in state `letter` (`Z` zombie, `T` stopped), as host pids.
fn children_in(sup: &crate::supervisor::Sup, letter: char) -> Vec<libc::pid_t> {
    sup.shim
        .shim_children()
        .into_iter()
        .filter(|&p| state_of(p) == Some(letter))
        .collect()
}

/// The attack: every exec is answered (started, or refused with `timeout`), `status` stays
/// prompt, the driver's stopped launches end as `exec_failed` and it comes back, nothing
/// stays a zombie or stopped, and SIGTERM still stops the shim gracefully with the driver's
/// code.
#[test]
fn a_tool_that_stops_fresh_children_does_not_block_pid1() -> Result<()> {
    require_root!();
    let mut sup = Setup::new(Mode::Pid1)
        .flag("--user", "1000:1000")
        // The variable rather than the flag: a shim without the setting runs the same test
        // (and hangs), instead of failing on a usage error.
        .env("AGENT_SHIM_SPAWN_TIMEOUT", SPAWN_TIMEOUT)
        .flag("--restart", "always")
        .flag("--crash-loop-restarts", "1000")
        .flag("--exec-kill-grace", "300ms")
        .flag("--grace", "3s")
        .env("ECHO_EXIT_CODE", "7")
        .start()?;
    sup.expect_up(1)?;

    // The tenant's tool: runs as uid 1000 like every exec here.
    let secs = ATTACK.as_secs().to_string();
    let attacker = sup.ctl.exec_started(|id| Exec {
        timeout_ms: Some(60_000),
        ..Exec::new(id, [probe(), "stop-spawns", secs.as_str()])
    })?;
    std::thread::sleep(Duration::from_millis(200));

    let started = Instant::now();
    let (mut ran, mut refused_timeout, mut refused_other) = (0u32, 0u32, Vec::new());
    let mut slowest_status = Duration::ZERO;
    let mut slowest_exec = Duration::ZERO;
    let mut crashes = 0u32;
    let mut driver_up = true;
    let mut next_crash = started + Duration::from_millis(500);
    while started.elapsed() < ATTACK - Duration::from_millis(500) {
        // The driver restarts under attack too: killed whenever it is up.
        if driver_up && Instant::now() >= next_crash {
            next_crash = Instant::now() + Duration::from_millis(300);
            crashes += 1;
            let id = sup.ctl.id();
            let kill = Signal {
                id,
                signal: "KILL".into(),
                target: SignalTarget::Driver,
                exec_id: None,
            };
            sup.ctl.request_within(id, kill, STATUS_MAX)?;
        }
        let id = sup.ctl.id();
        let asked = Instant::now();
        let req = Exec {
            timeout_ms: Some(2000),
            ..Exec::new(id, [probe(), "exit", "0"])
        };
        let reply = match sup.ctl.request_within(id, req, EXEC_REPLY_MAX) {
            Ok(r) => r,
            Err(e) => bail!(
                "exec {ran}+{refused_timeout} (asked {:?} into the attack) unanswered after \
                 {:?}: {e:#}\n{}",
                asked.duration_since(started),
                asked.elapsed(),
                sup.shim.context()
            ),
        };
        slowest_exec = slowest_exec.max(asked.elapsed());
        match reply {
            ShimToControl::ExecStarted(_) => ran += 1,
            ShimToControl::Error(e) if e.code == ErrorCode::Timeout => refused_timeout += 1,
            ShimToControl::Error(e) => refused_other.push(format!("{:?}: {}", e.code, e.message)),
            other => bail!("exec answered {other:?}"),
        }
        let asked = Instant::now();
        let s = match sup.ctl.status_within(STATUS_MAX) {
            Ok(s) => s,
            Err(e) => bail!(
                "status unanswered during the attack: {e:#}\n{}",
                sup.shim.context()
            ),
        };
        slowest_status = slowest_status.max(asked.elapsed());
        driver_up = s.state == DriverState::Ready;
    }

    // The attacker's own end; every event read meanwhile (the driver's launches it stopped).
    let mut attack = ExecRun::default();
    let mut events = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    while attack.exit.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(s) = sup.ctl.try_next_stamped(left)? else {
            bail!("the attacker did not end\n{}", sup.context());
        };
        if exec_of(&s.event) == Some(attacker.exec_id) {
            attack.take(&s.event)?;
        }
        events.push(s);
    }
    let last = sup.ctl.last_seq();
    sup.ctl.ack(last)?;
    let attack_out = attack.out();
    let reasons: Vec<&str> = events
        .iter()
        .filter_map(|s| match &s.event {
            Event::DriverExited(e) => Some(e.reason.as_str()),
            _ => None,
        })
        .collect();
    let exec_failed = reasons.iter().filter(|r| **r == "exec_failed").count();
    eprintln!(
        "MEASURED: {ran} execs ran, {refused_timeout} refused with timeout, other refusals \
         {refused_other:?}; {crashes} driver kills, {exec_failed} driver launches stopped \
         (exec_failed), driver exits {reasons:?}; slowest status {slowest_status:?}, slowest exec reply \
         {slowest_exec:?}; attacker: {:?} {:?}",
        attack_out.trim(),
        attack.exit
    );
    ensure!(
        refused_timeout + u32::try_from(exec_failed).unwrap_or(0) > 0,
        "the attack never caught a child before its execve (nothing proven): {attack_out}"
    );
    // No `ran > 0`: an attacker that wins every race stops every child of its uid, and what
    // the shim promises is an answer to each exec and a loop that goes on, not that any ran.
    ensure!(
        refused_other.is_empty(),
        "refused for another reason: {refused_other:?}"
    );

    // The driver comes back once the attack is over.
    let ready = poll_until(PATIENCE, || {
        sup.ctl
            .status_within(STATUS_MAX)
            .ok()
            .filter(|s| s.state == DriverState::Ready)
    });
    ensure!(
        ready.is_some(),
        "the driver did not come back\n{}",
        sup.context()
    );

    // Nothing stays a zombie, nothing stays stopped: the stopped tools were killed by their
    // timeout, the stopped launches by the spawn timeout.
    let clean = poll_until(Duration::from_secs(10), || {
        let left = [children_in(&sup, 'Z'), children_in(&sup, 'T')];
        left.iter().all(Vec::is_empty).then_some(())
    });
    ensure!(
        clean.is_some(),
        "zombies {:?}, stopped {:?}\n{}",
        children_in(&sup, 'Z'),
        children_in(&sup, 'T'),
        sup.context()
    );

    // A graceful stop still works and ends with the driver's code.
    sup.shim.signal(libc::SIGTERM)?;
    let code = sup.shim.wait_code(PATIENCE)?;
    ensure!(
        code == 7,
        "exit code {code} after SIGTERM\n{}",
        sup.shim.context()
    );
    Ok(())
}

/// Signals addressed to a child still before its execve (here: a task cancel's and a
/// shutdown's) cannot end it while it is stopped there: the spawn deadline does, the exec
/// is refused with `timeout`, and a SIGTERM to the shim during the attack is still a
/// graceful stop with the driver's code.
#[test]
fn a_shutdown_during_the_attack_is_still_graceful() -> Result<()> {
    require_root!();
    let mut sup = Setup::new(Mode::Pid1)
        .flag("--user", "1000:1000")
        // The variable rather than the flag: a shim without the setting runs the same test
        // (and hangs), instead of failing on a usage error.
        .env("AGENT_SHIM_SPAWN_TIMEOUT", SPAWN_TIMEOUT)
        .flag("--exec-kill-grace", "300ms")
        .flag("--grace", "3s")
        .env("ECHO_EXIT_CODE", "9")
        .start()?;
    sup.expect_up(1)?;
    sup.ctl.exec_started(|id| Exec {
        timeout_ms: Some(60_000),
        ..Exec::new(id, [probe(), "stop-spawns", "20"])
    })?;
    std::thread::sleep(Duration::from_millis(200));
    // Keep asking until one exec is caught (its answer is the spawn timeout).
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut caught = false;
    let mut tries = 0u32;
    while !caught && Instant::now() < deadline {
        tries += 1;
        let id = sup.ctl.id();
        let req = Exec {
            timeout_ms: Some(1000),
            ..Exec::new(id, [probe(), "exit", "0"])
        };
        match sup.ctl.request_within(id, req, EXEC_REPLY_MAX) {
            Ok(ShimToControl::Error(e)) if e.code == ErrorCode::Timeout => caught = true,
            Ok(_) => {}
            Err(e) => bail!("exec {tries} unanswered: {e:#}\n{}", sup.shim.context()),
        }
    }
    eprintln!("MEASURED: caught after {tries} execs");
    ensure!(caught, "the attack never caught a child in {tries} execs");
    // One more exec, then SIGTERM while it may well be pending: the stop is still graceful.
    let id = sup.ctl.id();
    sup.ctl
        .send(ControlToShim::Exec(Exec::new(id, [probe(), "exit", "0"])))?;
    sup.shim.signal(libc::SIGTERM)?;
    let code = sup.shim.wait_code(PATIENCE)?;
    ensure!(
        code == 9,
        "exit code {code} after SIGTERM\n{}",
        sup.shim.context()
    );
    Ok(())
}

/// Mounts a FIFO over `target` inside the shim's mount namespace (private to the test run:
/// `unshare --mount-proc`), as a root tool of the tenant replacing the file would; the bind
/// mount is made by an exec of the shim itself, so the namespace is the shim's.
fn fifo_over(sup: &mut crate::supervisor::Sup, dir: &std::path::Path, target: &str) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let fifo = dir.join(target.trim_start_matches('/').replace('/', "_"));
    let c = std::ffi::CString::new(fifo.as_os_str().as_bytes())?;
    // SAFETY: a valid NUL-terminated path.
    ensure!(unsafe { libc::mkfifo(c.as_ptr(), 0o666) } == 0, "mkfifo");
    let fifo = fifo.to_string_lossy().into_owned();
    let started = sup
        .ctl
        .exec_started(|id| Exec::new(id, ["mount", "--bind", fifo.as_str(), target]))?;
    let run = sup.ctl.exec_run(started.exec_id, PATIENCE)?;
    ensure!(
        run.exit.as_ref().and_then(|x| x.code) == Some(0),
        "mount --bind {fifo} {target}: {run:?}"
    );
    Ok(())
}

/// A root tool replaces `/etc/passwd` with a FIFO: an exec naming its user by name is refused
/// at once (`invalid`: not a regular file) instead of leaving PID 1 in `open()`; `status`
/// stays prompt and numeric users still run.
#[test]
fn a_fifo_as_etc_passwd_does_not_block_pid1() -> Result<()> {
    require_root!();
    let dir = crate::support::TempDir::new("fifo-passwd")?;
    let mut sup = Setup::new(Mode::Pid1)
        .flag("--ping-interval", "0")
        .start()?;
    sup.expect_up(1)?;
    fifo_over(&mut sup, dir.path(), "/etc/passwd")?;
    let id = sup.ctl.id();
    let req = Exec {
        user: Some("nobody".into()),
        ..Exec::new(id, [probe(), "exit", "0"])
    };
    let reply = match sup.ctl.request_within(id, req, EXEC_REPLY_MAX) {
        Ok(r) => r,
        Err(e) => bail!(
            "exec as a named user unanswered: {e:#}\n{}",
            sup.shim.context()
        ),
    };
    match &reply {
        ShimToControl::Error(e) if e.code == ErrorCode::Invalid => {
            ensure!(e.message.contains("not a regular file"), "{e:?}");
        }
        other => bail!("exec as a named user answered {other:?}"),
    }
    sup.ctl.status_within(STATUS_MAX)?;
    let ok = sup.ctl.exec_started(|id| Exec {
        user: Some("65534:65534".into()),
        ..Exec::new(id, [probe(), "exit", "0"])
    })?;
    let run = sup.ctl.exec_run(ok.exec_id, PATIENCE)?;
    ensure!(run.exit.as_ref().and_then(|x| x.code) == Some(0), "{run:?}");
    Ok(())
}

/// A root tool replaces `/dev/null` with a FIFO: the next exec and the next driver launch
/// still start (their stdin is the `/dev/null` opened before any tenant code ran), without
/// PID 1 blocking in `open()`.
#[test]
fn a_fifo_as_dev_null_does_not_block_pid1() -> Result<()> {
    require_root!();
    let dir = crate::support::TempDir::new("fifo-null")?;
    let mut sup = Setup::new(Mode::Pid1)
        .flag("--ping-interval", "0")
        .start()?;
    sup.expect_up(1)?;
    fifo_over(&mut sup, dir.path(), "/dev/null")?;
    let id = sup.ctl.id();
    let reply =
        match sup
            .ctl
            .request_within(id, Exec::new(id, [probe(), "exit", "0"]), EXEC_REPLY_MAX)
        {
            Ok(r) => r,
            Err(e) => bail!("exec unanswered: {e:#}\n{}", sup.shim.context()),
        };
    let ShimToControl::ExecStarted(started) = reply else {
        bail!("exec answered {reply:?}");
    };
    let run = sup.ctl.exec_run(started.exec_id, PATIENCE)?;
    ensure!(run.exit.as_ref().and_then(|x| x.code) == Some(0), "{run:?}");
    // The driver's next launch too.
    let id = sup.ctl.id();
    let kill = Signal {
        id,
        signal: "KILL".into(),
        target: SignalTarget::Driver,
        exec_id: None,
    };
    sup.ctl.request_within(id, kill, STATUS_MAX)?;
    sup.expect_up(2)?;
    sup.ctl.status_within(STATUS_MAX)?;
    Ok(())
}

/// Plain mode: the child fills the stderr pipe it shares with the shim (nobody reads it for
/// now), then exits, which the shim logs (`--log-level info`): the log line is dropped
/// instead of blocking PID 1, which reaps the child and exits with its code while stderr is
/// still stalled.
#[test]
fn a_child_that_fills_stderr_cannot_block_plain_mode() -> Result<()> {
    require_root!();
    let mut run = Shim::new()
        .args(["--log-level", "info"])
        .stderr_unread()
        .probe(["kill-init", "--fill-stderr"])
        .start()?;
    let code = run.wait_code(Duration::from_secs(8));
    run.read_stderr();
    let code = match code {
        Ok(c) => c,
        Err(e) => bail!(
            "the shim did not exit with stderr stalled: {e:#}\n{}",
            run.context()
        ),
    };
    let out = run.rest_of_stdout(Duration::from_secs(1));
    ensure!(code == 7, "exit code {code}: {out:?}\n{}", run.context());
    ensure!(
        out.iter().any(|l| l.starts_with("filled=")) && out.iter().any(|l| l == "alive"),
        "{out:?}"
    );
    Ok(())
}

/// Kills (SIGKILL) the pids it holds when dropped: the shim and its stopped child of the
/// traced run below, whatever the outcome.
struct KillOnDrop(Vec<libc::pid_t>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for &pid in self.0.iter().rev() {
            // SAFETY: kill has no memory-safety preconditions; these are our own processes
            // (the shim is our child, its child is not reaped before the shim is gone).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// `waitpid(pid, __WALL | WNOHANG)` until it reports, at most [`PATIENCE`].
fn wait_stop(pid: libc::pid_t) -> Result<libc::c_int> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let mut status = 0;
        // SAFETY: a valid status pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::__WALL | libc::WNOHANG) };
        if r == pid {
            return Ok(status);
        }
        ensure!(
            r == 0,
            "waitpid({pid}): {}",
            std::io::Error::last_os_error()
        );
        ensure!(Instant::now() < deadline, "{pid} did not stop in time");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A shim started traced by this test (root, outside its namespace): its first `fork` is
/// caught and the new child left in a group stop before it ran a single instruction, with
/// its report pipe open — as a tenant's SIGSTOP between the credential drop and `execve`
/// would leave it, but deterministically. Then the shim goes on, untraced.
struct Traced {
    shim: std::process::Child,
    /// The stopped child.
    child: libc::pid_t,
    _guard: KillOnDrop,
}

fn start_traced(args: &[&str], envs: &[(&str, &str)]) -> Result<Traced> {
    use std::os::unix::process::CommandExt as _;
    let mut cmd = std::process::Command::new(crate::support::shim_bin()?);
    cmd.args(args);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("AGENT_SHIM_") {
            cmd.env_remove(key);
        }
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    // SAFETY: between fork and exec only ptrace(2), async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let shim = cmd.spawn()?;
    let pid = shim.id() as libc::pid_t;
    let mut guard = KillOnDrop(vec![pid]);
    // Stopped at its execve (SIGTRAP): follow its forks, and die with us.
    wait_stop(pid)?;
    let opts = libc::PTRACE_O_TRACEFORK | libc::PTRACE_O_EXITKILL;
    // SAFETY: ptrace requests on our stopped tracee.
    unsafe {
        ensure!(
            libc::ptrace(libc::PTRACE_SETOPTIONS, pid, 0, opts) == 0,
            "SETOPTIONS"
        );
        ensure!(libc::ptrace(libc::PTRACE_CONT, pid, 0, 0) == 0, "CONT");
    }
    // Its fork: the new child starts traced, in a stop, before running anything.
    let fork_event = libc::SIGTRAP | (libc::PTRACE_EVENT_FORK << 8);
    loop {
        let status = wait_stop(pid)?;
        ensure!(
            libc::WIFSTOPPED(status),
            "the shim ended before forking: {status:#x}"
        );
        if status >> 8 == fork_event {
            break;
        }
        // Another stop (a signal): hand it on.
        // SAFETY: ptrace on our stopped tracee.
        unsafe { libc::ptrace(libc::PTRACE_CONT, pid, 0, libc::WSTOPSIG(status)) };
    }
    let mut child: libc::c_ulong = 0;
    // SAFETY: GETEVENTMSG writes one unsigned long.
    unsafe {
        libc::ptrace(
            libc::PTRACE_GETEVENTMSG,
            pid,
            0,
            &mut child as *mut libc::c_ulong,
        )
    };
    let child = libc::pid_t::try_from(child)?;
    guard.0.push(child);
    wait_stop(child)?;
    // Detached with SIGSTOP: it stays stopped; the shim goes on.
    // SAFETY: ptrace on our stopped tracees.
    unsafe {
        ensure!(
            libc::ptrace(libc::PTRACE_DETACH, child, 0, libc::SIGSTOP) == 0,
            "DETACH child"
        );
        ensure!(
            libc::ptrace(libc::PTRACE_DETACH, pid, 0, 0) == 0,
            "DETACH shim"
        );
    }
    Ok(Traced {
        shim,
        child,
        _guard: guard,
    })
}

impl Traced {
    /// Waits at most `timeout` for the shim's exit; its code and stderr.
    fn wait(&mut self, timeout: Duration) -> Result<(Option<i32>, String)> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.shim.try_wait()? {
                break status;
            }
            if Instant::now() >= deadline {
                bail!(
                    "the shim did not exit within {timeout:?} (its stopped child: state {:?})",
                    state_of(self.child)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut stderr = String::new();
        if let Some(mut e) = self.shim.stderr.take() {
            use std::io::Read as _;
            e.read_to_string(&mut stderr)?;
        }
        Ok((status.code(), stderr))
    }
}

/// Plain mode: the command is stopped before its `execve` ([`start_traced`]). The shim waits
/// at most `--spawn-timeout`, kills it, reaps it and exits 124 saying why (main's shim
/// waited in `read()` forever).
#[test]
fn plain_mode_kills_a_command_stopped_before_execve() -> Result<()> {
    require_root!();
    // The variable, not the flag: a shim without the setting runs the same test (and hangs).
    let mut t = start_traced(
        &["--", probe(), "exit", "0"],
        &[("AGENT_SHIM_SPAWN_TIMEOUT", "500ms")],
    )?;
    let asked = Instant::now();
    let (code, stderr) = t.wait(Duration::from_secs(10))?;
    let took = asked.elapsed();
    eprintln!("MEASURED: exit {code:?} {took:?} after the stop; stderr {stderr:?}");
    ensure!(code == Some(124), "exit {code:?}: {stderr}");
    ensure!(stderr.contains("not started within 500ms"), "{stderr}");
    ensure!(took < Duration::from_secs(3), "took {took:?}");
    ensure!(
        state_of(t.child).is_none(),
        "the stopped child is still there: {:?}",
        state_of(t.child)
    );
    Ok(())
}

/// Supervisor mode: the driver's first launch is stopped before its `execve`
/// ([`start_traced`]). The shim answers `status` meanwhile, kills the launch at
/// `--spawn-timeout` (`driver_exited{reason: exec_failed, signal: SIGKILL}`), relaunches it,
/// and still stops gracefully on SIGTERM with the driver's code.
#[test]
fn a_driver_launch_stopped_before_execve_is_killed_and_restarted() -> Result<()> {
    require_root!();
    let dir = crate::support::TempDir::new("traced-sup")?;
    let sock = dir.path().join("c.sock");
    let listen = format!("unix:{}", sock.display());
    let driver = crate::drivers::echo_driver_bin()?;
    let driver = driver.to_string_lossy().into_owned();
    let mut t = start_traced(
        &[
            "--control-listen",
            &listen,
            "--control-insecure",
            "--backoff-initial",
            "100ms",
            "--backoff-jitter",
            "0",
            "--",
            &driver,
        ],
        &[("AGENT_SHIM_SPAWN_TIMEOUT", "1s"), ("ECHO_EXIT_CODE", "5")],
    )?;
    let stopped_at = Instant::now();
    let target = crate::support::control::Target::Unix(sock.clone());
    let mut ctl = match ControlClient::connect_to(&target, None, Duration::from_secs(5)) {
        Ok(c) => c,
        Err(e) => bail!("no control connection while the launch is stopped: {e:#}"),
    };
    ctl.resume_from(0)?;
    // While the launch is pending: answered at once, the driver still starting.
    let asked = Instant::now();
    let s = ctl.status_within(STATUS_MAX)?;
    let status_took = asked.elapsed();
    ensure!(s.state == DriverState::Starting, "{s:?}");
    let (exited, _) = ctl.wait_event(|e| matches!(e, Event::DriverExited(_)), PATIENCE)?;
    let killed_after = stopped_at.elapsed();
    let Event::DriverExited(exited) = exited.event else {
        unreachable!()
    };
    ensure!(
        exited.reason == "exec_failed" && exited.signal.as_deref() == Some("SIGKILL"),
        "{exited:?}"
    );
    ensure!(
        exited.pid == u32::try_from(t.child)?,
        "{exited:?}, stopped child {}",
        t.child
    );
    ctl.wait_event(|e| matches!(e, Event::DriverReady(_)), PATIENCE)?;
    ensure!(
        state_of(t.child).is_none(),
        "the stopped launch is still there"
    );
    // SAFETY: kill on our own child.
    unsafe { libc::kill(t.shim.id() as libc::pid_t, libc::SIGTERM) };
    let (code, stderr) = t.wait(PATIENCE)?;
    eprintln!(
        "MEASURED: status during the stopped launch in {status_took:?}; launch killed \
         {killed_after:?} after the stop; exit {code:?}"
    );
    ensure!(code == Some(5), "exit {code:?}: {stderr}");
    Ok(())
}
