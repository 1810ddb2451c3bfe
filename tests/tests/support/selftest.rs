//! The harness's own promises: nothing a test starts outlives it.

use std::ffi::OsString;

use anyhow::Result;

use super::{poll_until, PidFd, Running, Shim, TempDir, PATIENCE};

fn leftover_dies_with(running: Running, gc: &PidFd) -> Result<()> {
    ensure_alive(gc)?;
    drop(running);
    let dead = poll_until(PATIENCE, || (!gc.alive()).then_some(()));
    anyhow::ensure!(
        dead.is_some(),
        "grandchild {} outlived the harness",
        gc.pid()
    );
    Ok(())
}

fn ensure_alive(gc: &PidFd) -> Result<()> {
    anyhow::ensure!(gc.alive(), "grandchild {} is not running", gc.pid());
    Ok(())
}

fn start_with_grandchild(extra: &[&str]) -> Result<(Running, PidFd, TempDir)> {
    let dir = TempDir::new("selftest")?;
    let file = dir.path().join("log");
    let mut cmd = vec![OsString::from("grandchild"), file.into_os_string()];
    cmd.extend(extra.iter().map(OsString::from));
    let mut running = Shim::new().subreaper().probe(cmd).start()?;
    let gc: libc::pid_t = running.expect_prefix("ready gc=", PATIENCE)?.parse()?;
    // The grandchild is still the shim's descendant or already our subreaper's orphan:
    // it cannot have been reaped while it sleeps.
    let fd = PidFd::open(gc)?;
    Ok((running, fd, dir))
}

#[test]
fn drop_kills_the_tree_of_a_running_shim() -> Result<()> {
    let (running, gc, _dir) = start_with_grandchild(&["--stay", "--ignore-term"])?;
    anyhow::ensure!(
        running.alive(),
        "the shim exited early\n{}",
        running.context()
    );
    leftover_dies_with(running, &gc)
}

#[test]
fn drop_kills_leftovers_of_an_exited_shim() -> Result<()> {
    let (mut running, gc, _dir) = start_with_grandchild(&["--ignore-term"])?;
    running.expect_exit(0, PATIENCE)?;
    leftover_dies_with(running, &gc)
}
