//! Hostile drivers (`tests/src/bin/hostile-driver.rs`): a driver is untrusted code, and
//! whatever it does on its socket, to its file descriptor, to PID 1 or to the shim's control
//! socket and token, the shim stays up, stays responsive, and keeps its bounds.
//! (Garbage, a 4 GiB length prefix and a driver that never reads are in `robustness.rs`; a
//! fork bomb under NPROC and a non-root exec signalling PID 1 in `exec.rs`.)

use std::os::unix::fs::PermissionsExt as _;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use driver_protocol::message::{DriverState, Event, LogStream, ShimToControl};
use driver_protocol::ErrorCode;

use super::Setup;
use crate::support::{is_root, Mode, TempDir};

pub(super) fn hostile() -> &'static str {
    env!("CARGO_BIN_EXE_hostile-driver")
}

pub(super) fn one_mode() -> Mode {
    if is_root() {
        Mode::Pid1
    } else {
        Mode::Subreaper
    }
}

/// Waits for the driver's stderr line starting with `prefix`; returns it.
fn stderr_line(sup: &mut super::Sup, prefix: &str) -> Result<String> {
    let (s, _) = sup.wait(&format!("driver stderr {prefix:?}"), |e| {
        matches!(e, Event::Log(l) if l.stream == LogStream::Stderr && l.text.starts_with(prefix))
    })?;
    match s.event {
        Event::Log(l) => Ok(l.text),
        _ => unreachable!("matched a log event"),
    }
}

/// A status request is answered within `within`, `n` times in a row; returns the slowest.
fn responsive(sup: &mut super::Sup, n: u32, within: Duration) -> Result<Duration> {
    let mut slowest = Duration::ZERO;
    for _ in 0..n {
        let asked = Instant::now();
        sup.ctl.status_within(within)?;
        slowest = slowest.max(asked.elapsed());
    }
    Ok(slowest)
}

/// A frame whose header promises 64 KiB and whose body stops after 10 bytes, then silence:
/// the shim waits for the rest without blocking anything else, and the driver, which no
/// longer answers pings, is killed as hung and restarted.
#[test]
fn a_half_written_frame_blocks_nothing_and_the_driver_is_killed_as_hung() -> Result<()> {
    let mut sup = Setup::new(one_mode())
        .driver_cmd([hostile(), "half-frame"])
        .start()?;
    let pid = sup.expect_up(1)?;
    // The frame is pending from right after `ready` until the driver is killed (~0.8 s).
    // (Its stderr line may come before or after `driver_ready`: it is not waited for.)
    let slowest = responsive(&mut sup, 20, Duration::from_secs(1))?;
    let (exited, _, _) = sup.expect_exited()?;
    ensure!(
        exited.pid == pid && exited.reason == "hung",
        "{exited:?}\n{}",
        sup.context()
    );
    sup.expect_started(2)?;
    eprintln!("MEASURED: slowest status with a half-written frame pending {slowest:?}");
    Ok(())
}

/// The driver closes its socket's fd and opens /dev/null on the same number: the shim sees
/// end of stream from a live driver, a protocol error, and kills it within its 1 s grace.
#[test]
fn closing_and_reopening_the_fd_is_a_protocol_error() -> Result<()> {
    let mut sup = Setup::new(one_mode())
        .flag("--ping-interval", "0")
        .driver_cmd([hostile(), "reopen-fd"])
        .start()?;
    let pid = sup.expect_up(1)?;
    let (exited, _, _) = sup.expect_exited()?;
    ensure!(
        exited.pid == pid && exited.reason == "protocol_error",
        "{exited:?}\n{}",
        sup.context()
    );
    sup.expect_started(2)?;
    responsive(&mut sup, 5, Duration::from_secs(1))?;
    Ok(())
}

/// A driver writing `log` events as fast as it can for 4 s while the control plane does not
/// acknowledge: the buffer bound holds (the shim stops reading the driver), status stays
/// prompt and the shim's RSS stays under 64 MiB.
#[test]
fn an_event_flood_keeps_rss_bounded_and_status_prompt() -> Result<()> {
    let mut sup = Setup::new(one_mode())
        .flag("--ping-interval", "0")
        .driver_cmd([hostile(), "flood", "4"])
        .start()?;
    sup.expect_up(1)?;
    let start = Instant::now();
    let (mut max_rss, mut slowest, mut max_buffered) = (0u64, Duration::ZERO, 0u64);
    while start.elapsed() < Duration::from_secs(5) {
        let asked = Instant::now();
        let s = sup.ctl.status_within(Duration::from_secs(2))?;
        slowest = slowest.max(asked.elapsed());
        max_rss = max_rss.max(s.rss_bytes);
        max_buffered = max_buffered.max(s.buffered_bytes);
        ensure!(s.state == DriverState::Ready, "{s:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "MEASURED: event flood: shim rss max {} KiB, buffered max {} KiB, slowest status {slowest:?}",
        max_rss >> 10,
        max_buffered >> 10
    );
    ensure!(max_rss < 64 << 20, "rss {max_rss}");
    ensure!(
        max_buffered <= 8 << 20,
        "buffered {max_buffered} over --event-buffer-bytes"
    );
    ensure!(slowest < Duration::from_secs(2), "status took {slowest:?}");
    Ok(())
}

/// A non-root driver sends TERM, INT, HUP, USR1, QUIT, KILL and STOP to PID 1: the kernel
/// refuses (PID 1 is root's) or the shim ignores them; the shim and the driver carry on.
#[test]
fn a_non_root_driver_cannot_signal_pid1() -> Result<()> {
    if !is_root() {
        return crate::support::skip(
            "root",
            "a PID namespace and --user need root",
            module_path!(),
        );
    }
    let mut sup = Setup::new(Mode::Pid1)
        .flag("--user", "65534:65534")
        .flag("--ping-interval", "0")
        .driver_cmd([hostile(), "signal-pid1"])
        .start()?;
    let pid = sup.expect_up(1)?;
    // Its first task is the go.
    sup.submit("go", "go".into())?;
    let mut lines = Vec::new();
    for sig in ["TERM", "INT", "HUP", "USR1", "QUIT", "KILL", "STOP"] {
        lines.push(stderr_line(&mut sup, &format!("kill 1 {sig}:"))?);
    }
    stderr_line(&mut sup, "done signal-pid1")?;
    std::thread::sleep(Duration::from_millis(300));
    ensure!(
        sup.shim.alive(),
        "the shim died: {lines:?}\n{}",
        sup.context()
    );
    let s = sup.ctl.status_within(Duration::from_secs(2))?;
    ensure!(
        s.state == DriverState::Ready && s.driver_pid == Some(pid),
        "{s:?} after {lines:?}"
    );
    eprintln!("MEASURED: {lines:?}");
    Ok(())
}

/// A non-root driver tries to connect to the shim's control socket and to read the token file
/// and the control socket: every attempt is refused.
#[test]
fn a_non_root_driver_cannot_reach_the_control_socket_or_the_token() -> Result<()> {
    if !is_root() {
        return crate::support::skip("root", "--user needs root", module_path!());
    }
    let dir = TempDir::new("peek")?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret-token-of-the-control-plane\n")?;
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600))?;
    let list = dir.path().join("list");
    let list_arg = list.to_str().context("utf-8 path")?.to_owned();
    let token_arg = token.to_str().context("utf-8 path")?.to_owned();
    let mut sup = Setup::new(Mode::Pid1)
        .flag("--user", "65534:65534")
        .flag("--control-token-file", &token_arg)
        .flag("--ping-interval", "0")
        .driver_cmd([hostile(), "peek", list_arg.as_str()])
        .start()?;
    sup.expect_up(1)?;
    let sock = sup.sock.to_str().context("utf-8 path")?.to_owned();
    let tmp = dir.path().join("list.tmp");
    std::fs::write(&tmp, format!("{sock}\n{token_arg}\n"))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
    std::fs::rename(&tmp, &list)?;
    let mut lines = Vec::new();
    for path in [&sock, &token_arg] {
        for what in ["connect", "read"] {
            lines.push(stderr_line(&mut sup, &format!("{what} {path}:"))?);
        }
    }
    stderr_line(&mut sup, "done peek")?;
    for line in &lines {
        ensure!(line.contains("denied"), "{line}\nall: {lines:#?}");
    }
    eprintln!("MEASURED: {lines:?}");
    responsive(&mut sup, 5, Duration::from_secs(1))?;
    Ok(())
}

/// 2000 exec requests at once, each with a 64 KiB variable and absurd timeout and output
/// cap: at most `--max-execs` run, every other one is refused, each gets exactly one answer,
/// and the shim stays responsive.
#[test]
fn thousands_of_absurd_exec_requests_are_bounded() -> Result<()> {
    let mut sup = Setup::new(one_mode())
        .flag("--max-execs", "16")
        .flag("--ping-interval", "0")
        .driver_cmd([hostile(), "exec-flood", "2000", "65536"])
        .start()?;
    sup.expect_up(1)?;
    let during = responsive(&mut sup, 10, Duration::from_secs(2))?;
    let line = stderr_line(&mut sup, "done exec-flood")?;
    let count = |key: &str| -> Result<u64> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .context("a count")?
            .parse()
            .context("a number")
    };
    let (started, refused, other) = (count("started=")?, count("refused=")?, count("other=")?);
    // `other` counts the `exec_exit`s of those that ended within the window.
    ensure!(started + refused == 2000 && other <= started, "{line}");
    ensure!((1..=16).contains(&started), "{line}");
    let s = sup.ctl.status_within(Duration::from_secs(2))?;
    ensure!(
        s.execs_running <= 16 && s.state == DriverState::Ready,
        "{s:?}"
    );
    ensure!(s.rss_bytes < 64 << 20, "rss {}", s.rss_bytes);
    eprintln!(
        "MEASURED: exec flood: {line}; slowest status {during:?}; rss {} KiB",
        s.rss_bytes >> 10
    );
    Ok(())
}

/// Found by fuzzing (`supervisor_core`): the driver exits 0 (no restart under `on-failure`)
/// while its exec ignores SIGTERM, so the shim has ended every task and waits up to
/// `--exec-kill-grace` for the exec before exiting. A task submitted in that window was
/// accepted and never got a `task_done`; it is refused with `shutting_down`, and the shim
/// exits with the driver's code once the exec is killed.
#[test]
fn a_task_submitted_while_the_shim_exits_is_refused() -> Result<()> {
    let mut sup = Setup::new(one_mode())
        .flag("--ping-interval", "0")
        .flag("--exec-kill-grace", "3s")
        .driver_cmd([hostile(), "exec-then-exit"])
        .start()?;
    let pid = sup.expect_up(1)?;
    // Its first task makes it start the exec and exit.
    sup.submit("go", "go".into())?;
    let (exited, at, _) = sup.expect_exited()?;
    ensure!(exited.pid == pid && exited.reason == "exited", "{exited:?}");
    let reply = sup.ctl.submit("late", "too late".into())?;
    ensure!(
        at.elapsed() < Duration::from_secs(3),
        "the submit came after the exec kill grace: the test proves nothing"
    );
    ensure!(
        matches!(&reply, ShimToControl::Error(e) if e.code == ErrorCode::ShuttingDown),
        "{reply:?}\n{}",
        sup.context()
    );
    let code = sup.shim.wait_code(crate::support::PATIENCE)?;
    ensure!(code == 0, "the shim exited {code}");
    Ok(())
}
