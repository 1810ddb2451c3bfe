//! Per-exec and driver cgroups, `metrics` and the OOM report on a real cgroup v2 hierarchy:
//! the one the shim mounts as the VM's init (the container engine here is cgroup v1, tested
//! in `resources::cgroups`). One boot runs every check, in order, so the VM group stays short:
//!
//! - `hello` and `status` say `v2-delegated`; the shim sits in `agent-shim/shim`, the driver in
//!   `agent-shim/driver-1-*` (with the `setsid` daemon it left), each exec in `agent-shim/exec-*`;
//! - an exec's `limits` (memory, pids, CPU) are in its cgroup's files as the kernel reads them;
//! - an exec past its `memory_bytes` is OOM-killed, `oom_killed` is exact for it, the `oom`
//!   event comes, and a sibling exec and the driver live on;
//! - a `setsid` daemon started by an exec is dead after the exec's timeout (`cgroup.kill`);
//! - a fork bomb under a `pids` limit is contained, the shim answers meanwhile, and nothing
//!   of it is left;
//! - `metrics` reads the sandbox's cgroup from the real kernel: memory current and peak, the
//!   OOM kills, CPU, pids, io bytes (a read of a virtio disk);
//! - the driver's exit kills its whole cgroup: after a restart its `setsid` daemon is gone,
//!   and the new launch has a cgroup of its own.
//!
//! With `AGENT_SHIM_VM_RECORD=DIR`, the sandbox cgroup's v2 files are also written to `DIR`
//! (how `shim/src/metrics/fixtures/v2-vm` was recorded).

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use driver_protocol::message::{
    CgroupReading, DriverState, Event, Exec, ExecLimits, Log, Metrics, ProcRole, Reading,
    ShimToControl, Signal, SignalTarget,
};

use super::{exec, require_vm, shutdown, Boot, Vm, LISTEN, VM_PATIENCE};
use crate::support::control::{ControlClient, ExecRun};
use crate::support::TempDir;

const MIB: u64 = 1 << 20;

/// The size of the disk read for the io figures.
const DISK_BYTES: usize = 2 << 20;

/// The v2 files of the sandbox's cgroup worth keeping for the parsing tests.
const RECORDED: &[&str] = &[
    "memory.current",
    "memory.peak",
    "memory.max",
    "memory.events",
    "memory.stat",
    "memory.swap.current",
    "memory.swap.max",
    "cpu.stat",
    "cpu.max",
    "pids.current",
    "pids.max",
    "io.stat",
];

/// A `metrics` reading.
fn metrics(ctl: &mut ControlClient) -> Result<Reading> {
    let id = ctl.id();
    match ctl.request_within(id, Metrics { id }, VM_PATIENCE)? {
        ShimToControl::MetricsReply(m) => Ok(m.into_reading()),
        other => bail!("metrics answered {other:?}"),
    }
}

/// The cgroup part of a reading.
fn cgroup(r: &Reading) -> Result<CgroupReading> {
    r.cgroup
        .as_deref()
        .cloned()
        .ok_or_else(|| anyhow!("no cgroup reading: {r:#?}"))
}

/// Starts an exec with `limits` and `timeout_ms`; its id.
fn start(
    ctl: &mut ControlClient,
    argv: &[&str],
    timeout_ms: u64,
    limits: Option<ExecLimits>,
) -> Result<u64> {
    let started = ctl.exec_started(|id| Exec {
        timeout_ms: Some(timeout_ms),
        limits,
        ..Exec::new(id, argv.iter().copied())
    })?;
    Ok(started.exec_id)
}

/// The first `key=N` on a line of `out`.
fn number(out: &str, key: &str) -> Result<u64> {
    out.lines()
        .find_map(|l| l.strip_prefix(key)?.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow!("no {key}N line in {out:?}"))
}

/// The `0::` line of each `/proc/PID/cgroup` read by `probe read` (`error` if unreadable).
fn cgroups_of(ctl: &mut ControlClient, pids: &[u32]) -> Result<Vec<String>> {
    let paths: Vec<String> = pids.iter().map(|p| format!("/proc/{p}/cgroup")).collect();
    let argv: Vec<&str> = ["/probe", "read"]
        .into_iter()
        .chain(paths.iter().map(String::as_str))
        .collect();
    let out = exec(ctl, &argv)?.out();
    paths
        .iter()
        .map(|p| {
            out.split(&format!("== {p}\n"))
                .nth(1)
                .and_then(|s| s.lines().next())
                .map(str::to_owned)
                .ok_or_else(|| anyhow!("{p} not in {out}"))
        })
        .collect()
}

/// Whether process `pid` of the VM is gone (its `/proc` entry unreadable), asked until
/// `within` has passed.
fn gone(ctl: &mut ControlClient, pid: u32, within: Duration) -> Result<bool> {
    let until = Instant::now() + within;
    loop {
        let line = cgroups_of(ctl, &[pid])?.remove(0);
        if line.starts_with("error") {
            return Ok(true);
        }
        if Instant::now() > until {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits for the driver's `daemon=PID` log line and its `driver_ready`; the daemon's pid.
fn driver_up(ctl: &mut ControlClient) -> Result<u32> {
    let (mut daemon, mut ready) = (None, false);
    let until = Instant::now() + VM_PATIENCE;
    while daemon.is_none() || !ready {
        let left = until.saturating_duration_since(Instant::now());
        let s = ctl
            .try_next_stamped(left)?
            .ok_or_else(|| anyhow!("the driver did not come up: {}", ctl.context()))?;
        match &s.event {
            Event::DriverReady(_) => ready = true,
            Event::Log(Log { text, .. }) if text.starts_with("daemon=") => {
                daemon = Some(u32::try_from(number(text, "daemon=")?)?);
            }
            _ => {}
        }
    }
    daemon.ok_or_else(|| anyhow!("no daemon"))
}

fn run_of(ctl: &mut ControlClient, id: u64) -> Result<ExecRun> {
    ctl.exec_run(id, VM_PATIENCE)
}

#[test]
fn per_exec_limits_cgroup_kills_and_metrics_on_a_real_cgroup_v2() -> Result<()> {
    require_vm!();
    let dir = TempDir::new("vm-disk")?;
    let disk = dir.path().join("disk.raw");
    std::fs::write(&disk, vec![b'a'; DISK_BYTES])?;
    let args: Vec<&str> = LISTEN
        .iter()
        .copied()
        .chain(["--restart", "on-failure"])
        .chain(["/probe", "daemon", "/echo-driver"])
        .collect();
    let mut vm = Vm::boot(&Boot {
        shim_args: &args,
        disk: Some(&disk),
        ..Boot::default()
    })?;
    let mut ctl = vm.control()?;
    let daemon = driver_up(&mut ctl)?;

    // The mode, before authentication and in `status`.
    ensure!(
        ctl.shim_hello().cgroups.as_deref() == Some("v2-delegated"),
        "hello: {:?}",
        ctl.shim_hello()
    );
    let st = ctl.status_within(VM_PATIENCE)?;
    ensure!(st.cgroups.as_deref() == Some("v2-delegated"), "{st:?}");
    let driver = st.driver_pid.context("no driver pid")?;

    // Where everything runs.
    let lines = cgroups_of(&mut ctl, &[1, driver, daemon])?;
    ensure!(lines[0] == "0::/agent-shim/shim", "the shim: {lines:?}");
    ensure!(
        lines[1].starts_with("0::/agent-shim/driver-1-") && lines[2] == lines[1],
        "the driver and its daemon: {lines:?}"
    );
    let own = exec(&mut ctl, &["/probe", "read", "/proc/self/cgroup"])?.out();
    ensure!(own.contains("\n0::/agent-shim/exec-"), "an exec: {own}");

    // Every limit is written in the exec's own cgroup, as the kernel reads it back.
    let limited = ctl.exec_started(|id| Exec {
        timeout_ms: Some(60_000),
        limits: Some(ExecLimits {
            memory_bytes: Some(48 * MIB),
            pids: Some(16),
            cpu_millis: Some(250),
        }),
        ..Exec::new(id, ["/probe", "sleep", "60"])
    })?;
    let line = cgroups_of(&mut ctl, &[limited.pid])?.remove(0);
    let dir = line
        .strip_prefix("0::")
        .filter(|d| d.starts_with("/agent-shim/exec-"))
        .ok_or_else(|| anyhow!("the limited exec's cgroup: {line}"))?;
    let files = ["cpu.max", "memory.max", "memory.swap.max", "pids.max"];
    let paths: Vec<String> = files
        .iter()
        .map(|f| format!("/sys/fs/cgroup{dir}/{f}"))
        .collect();
    let argv: Vec<&str> = ["/probe", "read"]
        .into_iter()
        .chain(paths.iter().map(String::as_str))
        .collect();
    let out = exec(&mut ctl, &argv)?.out();
    for (p, want) in paths.iter().zip(["25000 100000", "50331648", "0", "16"]) {
        let got = out
            .split(&format!("== {p}\n"))
            .nth(1)
            .and_then(|s| s.lines().next());
        ensure!(got == Some(want), "{p}: {got:?}, want {want:?}\n{out}");
    }
    ctl.send(driver_protocol::message::ExecSignal {
        exec_id: limited.exec_id,
        signal: "KILL".into(),
    })?;
    run_of(&mut ctl, limited.exec_id)?;

    // A memory limit kills only its exec, and says so exactly.
    // Outlives the test (killed by the shutdown).
    let bystander = start(&mut ctl, &["/probe", "sleep", "900"], 900_000, None)?;
    let hog = start(
        &mut ctl,
        &["/probe", "hog", "0", "256"],
        60_000,
        Some(ExecLimits {
            memory_bytes: Some(32 * MIB),
            ..ExecLimits::default()
        }),
    )?;
    // The `oom` event is published before the exec's end.
    let (last, skipped) = ctl.wait_event(
        |e| matches!(e, Event::ExecExit(x) if x.exec_id == hog),
        VM_PATIENCE,
    )?;
    let Event::ExecExit(exit) = &last.event else {
        unreachable!("matched above")
    };
    ensure!(
        exit.signal.as_deref() == Some("SIGKILL") && exit.oom_killed == Some(true),
        "the hog: {exit:?}"
    );
    ensure!(
        skipped
            .iter()
            .any(|s| matches!(s.event, Event::Oom(ref o) if o.kills >= 1)),
        "no oom event before the hog's end: {skipped:?}"
    );
    let st = ctl.status_within(VM_PATIENCE)?;
    ensure!(
        st.driver_pid == Some(driver) && st.state == DriverState::Ready,
        "the driver after the OOM kill: {st:?}"
    );
    let r = metrics(&mut ctl)?;
    ensure!(
        r.procs.iter().any(|p| p.exec_id == Some(bystander)),
        "the bystander is gone: {r:#?}"
    );
    ensure!(r.procs.iter().any(|p| p.role == ProcRole::Driver), "{r:#?}");

    // A setsid daemon started by an exec dies with it.
    let id = start(&mut ctl, &["/probe", "daemon"], 2_000, None)?;
    let run = run_of(&mut ctl, id)?;
    ensure!(run.exit.as_ref().is_some_and(|e| e.timed_out), "{run:?}");
    let exec_daemon = u32::try_from(number(&run.out(), "daemon=")?)?;
    ensure!(
        gone(&mut ctl, exec_daemon, Duration::from_secs(5))?,
        "the setsid daemon {exec_daemon} outlived its exec"
    );

    // A fork bomb under a pids limit is contained; the shim answers meanwhile.
    let base = cgroup(&metrics(&mut ctl)?)?.pids.context("no pids")?;
    let t0 = Instant::now();
    let id = start(
        &mut ctl,
        &["/probe", "hog", "5000", "0"],
        3_000,
        Some(ExecLimits {
            pids: Some(40),
            ..ExecLimits::default()
        }),
    )?;
    let st = ctl.status_within(VM_PATIENCE)?;
    ensure!(st.execs_running >= 1, "{st:?}");
    let run = run_of(&mut ctl, id)?;
    let forked = number(&run.out(), "forked=")?;
    ensure!(forked < 40, "forked {forked} under a limit of 40");
    ensure!(run.exit.as_ref().is_some_and(|e| e.timed_out), "{run:?}");
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = cgroup(&metrics(&mut ctl)?)?.pids.context("no pids")?;
        if pids <= base {
            break;
        }
        ensure!(
            Instant::now() < until,
            "{pids} processes left after the fork bomb (before it: {base})"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "MEASURED fork bomb under pids 40 in the VM: forked {forked}, contained and killed in {:?}",
        t0.elapsed()
    );

    // Readings from the real kernel, with the disk read for io.
    let read = exec(&mut ctl, &["/probe", "read", "/dev/vda"])?;
    ensure!(
        read.stdout.len() >= DISK_BYTES,
        "read {} bytes",
        read.stdout.len()
    );
    let r = metrics(&mut ctl)?;
    let c = cgroup(&r)?;
    ensure!(c.version == 2, "{c:?}");
    let current = c.memory_bytes.context("memory current")?;
    let peak = c.memory_peak_bytes.context("memory peak")?;
    ensure!(current > 0 && peak >= current, "{c:?}");
    ensure!(peak >= 32 * MIB, "the peak missed the hog: {c:?}");
    ensure!(c.oom_kills.is_some_and(|n| n >= 1), "{c:?}");
    ensure!(c.cpu_usage_us.is_some_and(|n| n > 0), "{c:?}");
    // The shim, the driver, its daemon, the bystander.
    ensure!(c.pids.is_some_and(|n| n >= 4), "{c:?}");
    ensure!(
        c.io_read_bytes.is_some_and(|n| n >= DISK_BYTES as u64),
        "{c:?}"
    );
    ensure!(c.memory_limit_bytes.is_none(), "no limit was set: {c:?}");

    // After all of the above, so that every counter has moved.
    if let Ok(to) = std::env::var("AGENT_SHIM_VM_RECORD") {
        let paths: Vec<String> = RECORDED
            .iter()
            .map(|f| format!("/sys/fs/cgroup/agent-shim/{f}"))
            .collect();
        let argv: Vec<&str> = ["/probe", "read"]
            .into_iter()
            .chain(paths.iter().map(String::as_str))
            .collect();
        let out = exec(&mut ctl, &argv)?.out();
        std::fs::create_dir_all(&to)?;
        for (f, p) in RECORDED.iter().zip(&paths) {
            if let Some(body) = out.split(&format!("== {p}\n")).nth(1) {
                let body = body.split("\n== ").next().unwrap_or_default();
                std::fs::write(
                    std::path::Path::new(&to).join(f),
                    body.strip_suffix('\n').unwrap_or(body),
                )?;
            }
        }
    }

    // The driver's exit kills its whole cgroup; the next launch gets a new one.
    let id = ctl.id();
    let reply = ctl.request_within(
        id,
        Signal {
            id,
            signal: "KILL".into(),
            target: SignalTarget::Driver,
            exec_id: None,
        },
        VM_PATIENCE,
    )?;
    ensure!(matches!(reply, ShimToControl::Ok(_)), "{reply:?}");
    ctl.wait_event(|e| matches!(e, Event::DriverExited(_)), VM_PATIENCE)?;
    let new_daemon = driver_up(&mut ctl)?;
    ensure!(
        gone(&mut ctl, daemon, Duration::from_secs(5))?,
        "the old driver's setsid daemon {daemon} outlived its driver"
    );
    let st = ctl.status_within(VM_PATIENCE)?;
    let new_driver = st.driver_pid.context("no driver pid")?;
    let lines = cgroups_of(&mut ctl, &[new_driver, new_daemon])?;
    ensure!(
        lines[0].starts_with("0::/agent-shim/driver-2-") && lines[1] == lines[0],
        "the new launch: {lines:?}"
    );
    let r = metrics(&mut ctl)?;
    ensure!(
        r.procs.iter().any(|p| p.exec_id == Some(bystander)),
        "the bystander died with the driver: {r:#?}"
    );

    shutdown(&mut ctl)?;
    let (_, console) = vm.wait_power_off()?;
    ensure!(!console.contains("Kernel panic"));
    Ok(())
}
