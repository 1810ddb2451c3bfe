//! `metrics` from the shim as real PID 1 in cgroup v1 hierarchies of the test's own.

use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Result};
use driver_protocol::message::{Event, Exec, ExecSignal, ProcRole, Reading};

use super::{expect_oom_killed, metrics, tenant};
use crate::supervisor::{Setup, Sup};
use crate::support::{probe, Mode, PATIENCE};

const MIB: u64 = 1 << 20;

/// An exec of the probe with a generous timeout.
fn probe_exec(id: u64, args: &[&str]) -> Exec {
    let mut argv = vec![probe()];
    argv.extend_from_slice(args);
    Exec {
        timeout_ms: Some(60_000),
        ..Exec::new(id, argv)
    }
}

/// Asks for readings until `check` accepts one (at most [`PATIENCE`]).
fn reading_until(
    sup: &mut Sup,
    what: &str,
    mut check: impl FnMut(&Reading) -> bool,
) -> Result<Reading> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let r = metrics(sup)?;
        if check(&r) {
            return Ok(r);
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "{what}: not within {PATIENCE:?}; last reading {r:#?}\n{}",
                sup.context()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_reading_has_the_cgroup_limits_and_a_tool_holding_50_mib() -> Result<()> {
    let cg = v1_cgroup!("limits");
    cg.limit_memory(512 * MIB)?;
    cg.write("pids", "pids.max", "300")?;
    cg.write("cpu", "cpu.cfs_period_us", "100000")?;
    cg.write("cpu", "cpu.cfs_quota_us", "150000")?;
    let mut sup = cg.start(Setup::new(Mode::Pid1))?;
    let driver = sup.expect_up(1)?;

    let first = metrics(&mut sup)?;
    let c = first
        .cgroup
        .as_deref()
        .ok_or_else(|| anyhow!("no cgroup in {first:#?}"))?;
    ensure!(c.version == 1, "{c:#?}");
    ensure!(c.memory_limit_bytes == Some(512 * MIB), "{c:#?}");
    ensure!(c.swap_limit_bytes.is_none_or(|l| l == 512 * MIB), "{c:#?}");
    ensure!(c.pids_limit == Some(300), "{c:#?}");
    ensure!(
        (c.cpu_quota_us, c.cpu_period_us) == (Some(150_000), Some(100_000)),
        "{c:#?}"
    );
    // The shim and the driver at least; a fresh cgroup has no OOM kill.
    ensure!(c.pids.is_some_and(|n| n >= 2), "{c:#?}");
    ensure!(c.oom_kills == Some(0), "{c:#?}");
    let base = c
        .memory_bytes
        .ok_or_else(|| anyhow!("no memory in {c:#?}"))?;
    let usage = |r: &Reading| r.cgroup.as_ref().and_then(|c| c.cpu_usage_us);
    let cpu0 = usage(&first).ok_or_else(|| anyhow!("no cpu usage in {c:#?}"))?;
    ensure!(
        first.workspace.as_ref().is_some_and(|w| w.size_bytes > 0),
        "{first:#?}"
    );
    ensure!(first.time_ms > 1_700_000_000_000, "{first:#?}");
    let d = first
        .procs
        .iter()
        .find(|p| p.role == ProcRole::Driver)
        .ok_or_else(|| anyhow!("no driver in {first:#?}"))?;
    ensure!(d.pid == driver && d.pids >= 1 && d.rss_bytes > 0, "{d:#?}");

    // A tool that holds 50 MiB (touched, so charged to the cgroup).
    let started = sup
        .ctl
        .exec_started(|id| probe_exec(id, &["hog", "0", "50"]))?;
    let exec_id = started.exec_id;
    let held = reading_until(&mut sup, "50 MiB in the exec's reading", |r| {
        r.procs
            .iter()
            .any(|p| p.exec_id == Some(exec_id) && p.rss_bytes >= 50 * MIB)
    })?;
    let c = held.cgroup.as_deref().ok_or_else(|| anyhow!("{held:#?}"))?;
    let now = c.memory_bytes.ok_or_else(|| anyhow!("{c:#?}"))?;
    eprintln!(
        "MEASURED cgroup memory {} KiB -> {} KiB with a 50 MiB tool",
        base / 1024,
        now / 1024
    );
    ensure!(
        now >= base + 48 * MIB,
        "memory {base} -> {now}: the tool's 50 MiB do not show\n{held:#?}"
    );
    ensure!(c.memory_peak_bytes.is_some_and(|p| p >= now), "{c:#?}");
    let e = held
        .procs
        .iter()
        .find(|p| p.exec_id == Some(exec_id))
        .ok_or_else(|| anyhow!("{held:#?}"))?;
    ensure!(
        e.role == ProcRole::Exec && e.pid == started.pid && e.pids == 1,
        "{e:#?}"
    );
    ensure!(usage(&held).is_some_and(|u| u >= cpu0), "{held:#?}");

    sup.ctl.send(ExecSignal {
        exec_id,
        signal: "KILL".into(),
    })?;
    sup.wait(
        "exec_exit",
        |e| matches!(e, Event::ExecExit(x) if x.exec_id == exec_id),
    )?;
    // Gone: no reading of it, nothing carried over.
    let after = metrics(&mut sup)?;
    ensure!(
        !after.procs.iter().any(|p| p.exec_id == Some(exec_id)),
        "{after:#?}"
    );
    ensure!(sup.shim.alive(), "{}", sup.context());
    Ok(())
}

#[test]
fn an_oom_killed_exec_is_reported_and_the_oom_kill_count_rises() -> Result<()> {
    let cg = v1_cgroup!("oom");
    cg.limit_memory(128 * MIB)?;
    let mut sup = cg.start(Setup::new(Mode::Pid1))?;
    sup.expect_up(1)?;
    let before = metrics(&mut sup)?
        .cgroup
        .and_then(|c| c.oom_kills)
        .ok_or_else(|| anyhow!("no oom_kills"))?;
    let (run, _) = sup.run_to_end(|id| probe_exec(id, &["hog", "0", "512"]))?;
    expect_oom_killed(&sup, &run)?;
    let r = metrics(&mut sup)?;
    let c = r.cgroup.as_deref().ok_or_else(|| anyhow!("{r:#?}"))?;
    let after = c.oom_kills.ok_or_else(|| anyhow!("{c:#?}"))?;
    ensure!(after > before, "oom_kills {before} -> {after}");
    ensure!(after == cg.oom_kills()?, "{after} vs {}", cg.oom_kills()?);
    ensure!(
        c.memory_peak_bytes.is_some_and(|p| p >= 120 * MIB),
        "{c:#?}"
    );
    ensure!(sup.shim.alive(), "{}", sup.context());
    Ok(())
}

#[test]
fn metrics_events_come_every_interval_and_never_without_it() -> Result<()> {
    crate::support::require_root!();
    // Without the flag: no reading on a timer.
    let mut quiet = Setup::new(Mode::Pid1).start()?;
    quiet.expect_up(1)?;
    let deadline = Instant::now() + Duration::from_millis(1500);
    while let Some(s) = quiet
        .ctl
        .try_next_stamped(deadline.saturating_duration_since(Instant::now()))?
    {
        ensure!(
            !matches!(s.event, Event::Metrics(_)),
            "a metrics event without --metrics-interval: {s:?}"
        );
    }
    drop(quiet);

    let mut sup = Setup::new(Mode::Pid1)
        .flag("--metrics-interval", "200ms")
        .start()?;
    let driver = sup.expect_up(1)?;
    let mut times = Vec::new();
    while times.len() < 3 {
        let (ev, _) = sup.wait("a metrics event", |e| matches!(e, Event::Metrics(_)))?;
        let Event::Metrics(r) = ev.event else {
            unreachable!("matched above")
        };
        ensure!(
            r.procs
                .iter()
                .any(|p| p.role == ProcRole::Driver && p.pid == driver),
            "{r:#?}"
        );
        times.push(r.time_ms);
        sup.ctl.ack(ev.seq)?;
    }
    for w in times.windows(2) {
        let gap = w[1].saturating_sub(w[0]);
        ensure!((150..2000).contains(&gap), "readings {times:?}");
    }
    Ok(())
}

#[test]
fn a_tenant_process_named_to_fool_the_parser_is_counted_right() -> Result<()> {
    crate::support::require_root!();
    let dir = crate::support::TempDir::new("comm")?;
    // comm is the file name (15 bytes at most): a closing parenthesis and fake fields.
    let fake = dir.path().join(") R 1 1 1 0 0");
    std::fs::copy(probe(), &fake)?;
    let mut sup = Setup::new(Mode::Pid1).start()?;
    sup.expect_up(1)?;
    let fake = fake.display().to_string();
    let started = sup.ctl.exec_started(|id| Exec {
        timeout_ms: Some(30_000),
        ..Exec::new(id, [fake.as_str(), "hog", "2", "8"])
    })?;
    let exec_id = started.exec_id;
    // It forks first, then allocates.
    let r = reading_until(&mut sup, "the exec, its two children and 8 MiB", |r| {
        r.procs
            .iter()
            .any(|p| p.exec_id == Some(exec_id) && p.pids == 3 && p.rss_bytes >= 8 * MIB)
    })?;
    let e = r
        .procs
        .iter()
        .find(|p| p.exec_id == Some(exec_id))
        .ok_or_else(|| anyhow!("{r:#?}"))?;
    ensure!(e.pid == started.pid, "{e:#?}");
    // The driver's reading is its own: none of the exec's processes.
    let d = r
        .procs
        .iter()
        .find(|p| p.role == ProcRole::Driver)
        .ok_or_else(|| anyhow!("{r:#?}"))?;
    ensure!(d.pids == 1, "{d:#?}");
    sup.ctl.send(ExecSignal {
        exec_id,
        signal: "KILL".into(),
    })?;
    ensure!(sup.shim.alive(), "{}", sup.context());
    Ok(())
}

#[test]
fn a_tenant_mount_over_the_workspace_or_the_cgroup_tree_is_not_read() -> Result<()> {
    let cg = v1_cgroup!("mounts");
    cg.limit_memory(384 * MIB)?;
    let ws = crate::support::TempDir::new("ws")?;
    let ws_path = ws.path().display().to_string();
    // PID 1 of its own PID and mount namespaces (`unshare --mount-proc`, private
    // propagation): what the tenant mounts stays inside.
    let mut sup = cg.start(Setup::new(Mode::Pid1).flag("--workdir", &ws_path))?;
    sup.expect_up(1)?;
    let before = metrics(&mut sup)?;
    let size = before
        .workspace
        .as_ref()
        .map(|w| w.size_bytes)
        .ok_or_else(|| anyhow!("{before:#?}"))?;
    ensure!(size > 64 * MIB, "{before:#?}");

    // The tenant (root in the sandbox) mounts a 1 MiB tmpfs over the workspace and a tmpfs
    // with a forged limit over the memory hierarchy.
    let script = format!(
        "mount -t tmpfs -o size=1m none '{ws_path}' && \
         mount -t tmpfs none /sys/fs/cgroup/memory && \
         echo 1048576 > /sys/fs/cgroup/memory/memory.limit_in_bytes && \
         echo 1 > /sys/fs/cgroup/memory/memory.usage_in_bytes && \
         df -k '{ws_path}' && echo mounted"
    );
    tenant(&mut sup, &script)?;

    let after = metrics(&mut sup)?;
    let w = after
        .workspace
        .as_ref()
        .ok_or_else(|| anyhow!("{after:#?}"))?;
    ensure!(
        w.size_bytes == size,
        "the workspace read through the tenant's mount: {size} -> {}",
        w.size_bytes
    );
    let c = after
        .cgroup
        .as_deref()
        .ok_or_else(|| anyhow!("{after:#?}"))?;
    ensure!(c.memory_limit_bytes == Some(384 * MIB), "{c:#?}");
    ensure!(c.memory_bytes.is_some_and(|m| m > 1), "{c:#?}");
    ensure!(sup.shim.alive(), "{}", sup.context());
    Ok(())
}

/// The tenant (root, allowed to mount) mounts a tmpfs over `/proc` holding a forged
/// `PID/stat` for the driver, with a gigantic resident set: the shim walks the `/proc` it
/// opened at start, so the reading stays the kernel's.
#[test]
fn a_tenant_mount_over_proc_is_not_read() -> Result<()> {
    crate::support::require_root!();
    let mut sup = Setup::new(Mode::Pid1).start()?;
    sup.expect_up(1)?;
    let before = metrics(&mut sup)?;
    let driver = before
        .procs
        .iter()
        .find(|p| p.role == ProcRole::Driver)
        .ok_or_else(|| anyhow!("{before:#?}"))?
        .pid;
    let forged =
        format!("{driver} (x) S 1 {driver} {driver} 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 1 1 999999999");
    // Over the tenant's /proc: a forged driver, a forged PID 1 (the shim) with a huge
    // resident set, 100 forged children of PID 1, and a `self` whose `statm` is a FIFO that
    // no one writes (a read of it by path would never return).
    let script = format!(
        "mount -t tmpfs none /proc && mkdir /proc/{driver} /proc/1 /proc/self && \
         echo '{forged}' > /proc/{driver}/stat && \
         echo '1 (x) S 0 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 1 1 999999999' > /proc/1/stat && \
         for i in $(seq 1000 1099); do mkdir /proc/$i && \
           echo \"$i (x) S 1 $i $i 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 1 1 1\" > /proc/$i/stat; done && \
         mkfifo /proc/self/statm && echo mounted"
    );
    let status_before = sup.ctl.status()?;
    tenant(&mut sup, &script)?;
    let after = metrics(&mut sup)?;
    let d = after
        .procs
        .iter()
        .find(|p| p.role == ProcRole::Driver)
        .ok_or_else(|| anyhow!("the driver's reading is gone: {after:#?}"))?;
    ensure!(
        d.pid == driver && d.pids == 1 && d.rss_bytes < 1024 * MIB,
        "the reading went through the tenant's /proc: {d:#?}"
    );
    // `status` reads the same /proc, from the descriptor opened at start: it answers, and
    // neither the forged resident set nor the forged children reach it.
    let status = sup.ctl.status_within(PATIENCE)?;
    ensure!(
        status.rss_bytes > 0 && status.rss_bytes < 1024 * MIB,
        "status read the tenant's /proc: {status:#?}"
    );
    ensure!(
        status.children < 100 && status.children + 5 >= status_before.children,
        "status counted the tenant's forged children: {status:#?} (before: {status_before:#?})"
    );
    ensure!(sup.shim.alive(), "{}", sup.context());
    Ok(())
}

#[test]
fn a_stopped_tenant_process_does_not_hold_a_reading() -> Result<()> {
    crate::support::require_root!();
    let mut sup = Setup::new(Mode::Pid1).start()?;
    sup.expect_up(1)?;
    let started = sup.ctl.exec_started(|id| Exec {
        timeout_ms: Some(30_000),
        ..Exec::new(id, ["/bin/sh", "-c", "sleep 30 & kill -STOP $! $$"])
    })?;
    let exec_id = started.exec_id;
    let t0 = Instant::now();
    let r = reading_until(&mut sup, "the stopped exec and its stopped child", |r| {
        r.procs
            .iter()
            .any(|p| p.exec_id == Some(exec_id) && p.pids == 2)
    })?;
    ensure!(
        t0.elapsed() < Duration::from_secs(5),
        "{:?} for {r:#?}",
        t0.elapsed()
    );
    sup.ctl.send(ExecSignal {
        exec_id,
        signal: "KILL".into(),
    })?;
    ensure!(sup.shim.alive(), "{}", sup.context());
    Ok(())
}

#[test]
fn polling_metrics_is_not_activity() -> Result<()> {
    crate::support::require_root!();
    // A control plane polling every 100 ms (E2B's polls every 5 s), an agent idle after 400 ms.
    let mut sup = Setup::new(Mode::Pid1)
        .flag("--idle-after", "400ms")
        .flag("--metrics-interval", "150ms")
        .start()?;
    sup.expect_up(1)?;
    let deadline = Instant::now() + PATIENCE;
    loop {
        metrics(&mut sup)?;
        let mut idle = false;
        while let Some(s) = sup.ctl.try_next_stamped(Duration::from_millis(100))? {
            idle |= matches!(s.event, Event::Idle(_));
            ensure!(
                !matches!(s.event, Event::Busy(_)),
                "busy after a reading: {s:?}"
            );
            sup.ctl.ack(s.seq)?;
        }
        if idle {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "no idle event while polling metrics\n{}",
            sup.context()
        );
    }
}
