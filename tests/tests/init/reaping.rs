//! Reaping: orphan storms leave no zombie; as PID 1 the leftovers are terminated after the
//! child exits, within `--cleanup-grace`; as a subreaper they are left alone.

use std::ffi::OsStr;
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use crate::support::{
    in_both_modes, poll_until, require_root, state_of, Mode, PidFd, Shim, TempDir, PATIENCE,
};

/// Forking 10,000 processes on a busy 2-core machine: minutes would be absurd, seconds normal.
const STORM_PATIENCE: Duration = Duration::from_secs(90);

in_both_modes! {
    fn orphan_storm_leaves_no_zombie(mode: Mode) -> Result<()> {
        let mut shim = Shim::new().mode(mode).probe(["orphans", "5000", "--stay"]).start()?;
        // Orphans are adopted by the shim (PID 1, or the subreaper), not by someone outside.
        shim.expect_line("adopted_by=shim", PATIENCE)?;
        let forked = shim.expect_prefix("forked=", STORM_PATIENCE)?;
        // The probe polls for up to 30s itself before reporting.
        shim.expect_line("zombies=0", Duration::from_secs(45))?;
        shim.expect_line("ready", PATIENCE)?;
        // The shim keeps running, and is not itself stuck as a zombie or stopped.
        ensure!(shim.alive(), "the shim died during the storm\n{}", shim.context());
        let state = state_of(shim.pid());
        ensure!(matches!(state, Some('S' | 'R')), "shim state {state:?}\n{}", shim.context());
        // From the outside too: no child of the shim stays a zombie. (A snapshot may catch
        // one between its exit and its reaping, so a zombie must persist to count.)
        let mut zombies = Vec::new();
        let clear = poll_until(Duration::from_secs(5), || {
            zombies = shim
                .shim_children()
                .into_iter()
                .filter(|p| state_of(*p) == Some('Z'))
                .collect();
            zombies.is_empty().then_some(())
        });
        ensure!(clear.is_some(), "zombie children of the shim for 5 s: {zombies:?}");
        eprintln!("{mode:?}: orphan storm: forked {forked}");
        // And it still forwards signals and exits with the child's status.
        shim.signal(libc::SIGTERM)?;
        shim.expect_exit(143, PATIENCE)?;
        Ok(())
    }
}

fn grandchild_cmd(file: &std::path::Path, extra: &[&str]) -> Vec<std::ffi::OsString> {
    let mut cmd = vec!["grandchild".into(), file.as_os_str().to_owned()];
    cmd.extend(extra.iter().map(|s| OsStr::new(s).to_owned()));
    cmd
}

#[test]
fn pid1_terminates_leftovers_after_the_child_exits() -> Result<()> {
    require_root!();
    let dir = TempDir::new("leftover")?;
    let file = dir.path().join("log");
    let mut shim = Shim::new()
        .pidns()
        .probe(grandchild_cmd(&file, &[]))
        .start()?;
    shim.expect_prefix("ready gc=", PATIENCE)?;
    // The child exits 0 right away; PID 1 SIGTERMs the grandchild, which logs and exits.
    shim.expect_exit(0, PATIENCE)?;
    ensure!(
        std::fs::read_to_string(&file)?.contains("term"),
        "the grandchild did not get SIGTERM\n{}",
        shim.context()
    );
    Ok(())
}

#[test]
fn pid1_cleanup_wait_is_bounded_by_cleanup_grace() -> Result<()> {
    require_root!();
    let dir = TempDir::new("cleanup")?;
    let file = dir.path().join("log");
    let mut shim = Shim::new()
        .pidns()
        .args(["--cleanup-grace", "1s"])
        .probe(grandchild_cmd(&file, &["--ignore-term"]))
        .start()?;
    shim.expect_prefix("ready gc=", PATIENCE)?;
    // The grandchild ignores SIGTERM and would sleep 120s: only SIGKILL ends it, and the
    // shim may exit only once it is reaped. 1s + generous slack, far below 120s.
    let took = shim.expect_exit(0, Duration::from_secs(15))?;
    eprintln!("--cleanup-grace 1s with a TERM-ignoring grandchild: exited after {took:?}");
    ensure!(
        !std::fs::read_to_string(&file)?.contains("term"),
        "TERM was not ignored?"
    );
    Ok(())
}

#[test]
fn pid1_cleanup_grace_from_variable() -> Result<()> {
    require_root!();
    let dir = TempDir::new("cleanup-env")?;
    let file = dir.path().join("log");
    let mut shim = Shim::new()
        .pidns()
        .env("AGENT_SHIM_CLEANUP_GRACE", "4s")
        .probe(grandchild_cmd(&file, &["--ignore-term"]))
        .start()?;
    shim.expect_prefix("ready gc=", PATIENCE)?;
    let took = shim.expect_exit(0, PATIENCE)?;
    // A lower bound is safe on a noisy machine (noise only adds time): the leftover ignores
    // SIGTERM, so it lives out the 4s (well past the 2s default) before the SIGKILL.
    ensure!(
        took >= Duration::from_secs(3),
        "exited after {took:?}: AGENT_SHIM_CLEANUP_GRACE=4s not honoured"
    );
    Ok(())
}

#[test]
fn pid1_cleanup_stops_at_the_grace_deadline() -> Result<()> {
    require_root!();
    // A child ignoring TERM with a grandchild ignoring TERM: after --grace both are
    // SIGKILLed and the shim exits 137 (the child's status).
    let dir = TempDir::new("grace-all")?;
    let file = dir.path().join("log");
    let mut shim = Shim::new()
        .pidns()
        .args(["--grace", "1s", "--cleanup-grace", "60s"])
        .probe(grandchild_cmd(&file, &["--ignore-term", "--stay"]))
        .start()?;
    shim.expect_prefix("ready gc=", PATIENCE)?;
    // The --stay child dies of TERM (default disposition): the child exits 143 and then the
    // cleanup begins; it must not wait past the 1s grace deadline although
    // --cleanup-grace is 60s.
    shim.signal(libc::SIGTERM)?;
    let code = shim.wait_code(Duration::from_secs(20))?;
    ensure!(code == 143, "expected the child's 143: {}", shim.context());
    Ok(())
}

#[test]
fn subreaper_leaves_leftovers_alone() -> Result<()> {
    let dir = TempDir::new("subreaper-leftover")?;
    let file = dir.path().join("log");
    let mut shim = Shim::new()
        .subreaper()
        .probe(grandchild_cmd(&file, &[]))
        .start()?;
    let gc: libc::pid_t = shim
        .expect_prefix("ready gc=", PATIENCE)?
        .parse()
        .context("gc pid")?;
    // Take a handle on the grandchild while the shim (its subreaper) may still hold it.
    let handle = PidFd::open(gc);
    shim.expect_exit(0, PATIENCE)?;
    let handle = handle?;
    let survived = handle.alive();
    // Clean up before asserting: the grandchild is ours to kill.
    let cmdline = std::fs::read(format!("/proc/{gc}/cmdline")).unwrap_or_default();
    if String::from_utf8_lossy(&cmdline).contains("grandchild") {
        handle.signal(libc::SIGKILL)?;
    }
    ensure!(
        survived,
        "the subreaper killed a leftover process (tini semantics: leave it)"
    );
    ensure!(
        !std::fs::read_to_string(&file)?.contains("term"),
        "the leftover got SIGTERM"
    );
    let gone = poll_until(PATIENCE, || (!handle.alive()).then_some(()));
    ensure!(
        gone.is_some(),
        "the leftover grandchild {gc} did not die of SIGKILL"
    );
    Ok(())
}
