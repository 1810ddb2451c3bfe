//! The README's main job, `fleet-demo`, run as the README runs it (with fewer agents): it must
//! end `OK` with zero duplicates and zero lost events, and leave no process behind.

use std::io::Read as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, ensure, Result};

use crate::support::{kill_marked, poll_until, shim_bin, workspace_bin, MARKER_VAR};

fn demo_bin() -> Result<PathBuf> {
    workspace_bin(
        "FLEET_DEMO_BIN",
        &["debug/fleet-demo"],
        "`cargo build -p agent-shim-examples`",
    )
}

#[test]
fn fleet_demo_ends_ok_with_nothing_lost_or_duplicated() -> Result<()> {
    let marker = format!("fleet-demo-{}", std::process::id());
    let mut child = Command::new(demo_bin()?)
        .args(["--agents", "6", "--tasks", "2", "--no-view", "--shim"])
        .arg(shim_bin()?)
        .arg("--driver")
        .arg(crate::drivers::echo_driver_bin()?)
        .env(MARKER_VAR, &marker)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut out = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let status = poll_until(Duration::from_secs(90), || child.try_wait().ok().flatten());
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let leftovers = kill_marked(&marker);
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let out = reader.join().unwrap_or_default();
    let status = status.ok_or_else(|| anyhow!("fleet-demo did not end in 90 s\n{out}\n{err}"))?;
    ensure!(status.success(), "fleet-demo: {status}\n{out}\n{err}");
    for line in [
        "agents            6 (6 exited cleanly after shutdown)",
        "tasks             13 submitted, 12 succeeded, 1 failed (the crash)",
        "idle / wake       6 went idle; agent-5 paused, woken by a new task (1 wake)",
        "driver restarts   1",
        "connection cut    1 (resumed)",
        "duplicates        0",
        "lost              0",
    ] {
        ensure!(out.contains(line), "missing {line:?} in\n{out}\n{err}");
    }
    // The operator tailed agent 0 beside the fleet, as an observer, and the fleet still lost
    // and duplicated nothing (above).
    let tailed = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("operator tail"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok());
    ensure!(tailed.is_some_and(|n| n > 0), "no operator tail in\n{out}");
    ensure!(out.trim_end().ends_with("OK"), "{out}");
    ensure!(leftovers == 0, "{leftovers} processes outlived the demo");
    Ok(())
}
