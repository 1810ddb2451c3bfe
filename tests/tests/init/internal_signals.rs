//! As PID 1, signals from non-root processes inside the namespace are ignored unless
//! `--allow-internal-signals`.
//!
//! With the shim running as root, the kernel already refuses an unprivileged `kill(1, ...)`
//! (EPERM); the shim's own filter matters when the shim and the agent share a non-root uid
//! (`docker run --user`), so most of these tests run the shim as uid 65534 via `setpriv`.

use anyhow::{ensure, Result};

use crate::support::{require_root, Shim, PATIENCE};

const NOBODY: u32 = 65534;

#[test]
fn nonroot_sigterm_to_pid1_is_ignored() -> Result<()> {
    require_root!();
    let mut shim = Shim::new()
        .pidns()
        .user(NOBODY)
        .probe(["kill-init"])
        .start()?;
    shim.expect_line("sent ok", PATIENCE)?;
    shim.expect_line("alive", PATIENCE)?;
    shim.expect_exit(7, PATIENCE)?;
    ensure!(
        !shim.stderr().is_empty(),
        "the ignored signal was not logged at warn"
    );
    Ok(())
}

#[test]
fn nonroot_sigterm_to_pid1_is_honoured_when_allowed() -> Result<()> {
    require_root!();
    for builder in [
        Shim::new().arg("--allow-internal-signals"),
        Shim::new().env("AGENT_SHIM_ALLOW_INTERNAL_SIGNALS", "true"),
    ] {
        let mut shim = builder.pidns().user(NOBODY).probe(["kill-init"]).start()?;
        // Forwarded to the probe, whose TERM disposition is the default: 128 + 15 (it may
        // die before it prints `sent ok`; nobody else sends TERM here).
        shim.expect_exit(143, PATIENCE)?;
    }
    Ok(())
}

#[test]
fn nonroot_sigterm_to_root_pid1_is_refused() -> Result<()> {
    require_root!();
    let mut shim = Shim::new().pidns().probe(["kill-init"]).start()?;
    let sent = shim.expect_prefix("sent ", PATIENCE)?;
    shim.expect_line("alive", PATIENCE)?;
    shim.expect_exit(7, PATIENCE)?;
    eprintln!("kill(1, SIGTERM) by uid 65534 to a root PID 1: {sent}");
    Ok(())
}

#[test]
fn sigterm_from_outside_is_honoured_when_unprivileged() -> Result<()> {
    require_root!();
    // The shim runs as 65534, the test as root outside the namespace: si_pid is 0.
    let mut shim = Shim::new()
        .pidns()
        .user(NOBODY)
        .probe(["signals", "--exit-on", "TERM"])
        .start()?;
    shim.expect_line("ready", PATIENCE)?;
    shim.signal(libc::SIGTERM)?;
    shim.expect_line("got SIGTERM", PATIENCE)?;
    shim.expect_exit(0, PATIENCE)?;
    Ok(())
}
