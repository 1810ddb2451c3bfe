//! Per-exec cgroups on cgroup v1, for real: the shim as root PID 1 in cgroup v1 hierarchies
//! of the test's own, which it may write, so every exec gets a cgroup of its own below them.
//! A root tenant that mounts a tmpfs of forged files and FIFOs over `/sys/fs/cgroup` changes
//! nothing: the shim works through the directories it opened at start.

use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Result};
use driver_protocol::message::{
    Event, Exec, ExecLimits, ExecSignal, ProcRole, Signal, SignalTarget,
};

use super::{expect_oom_killed, metrics, tenant, V1Cgroup};
use crate::supervisor::{Setup, Sup};
use crate::support::control::{exec_of, ExecRun};
use crate::support::{poll_until, probe, Mode, PATIENCE};

const MIB: u64 = 1 << 20;

/// The shim in `cg`, with the mode it reports checked.
fn start_in(cg: &V1Cgroup) -> Result<Sup> {
    let mut sup = cg.start(Setup::new(Mode::Pid1))?;
    sup.expect_up(1)?;
    let status = sup.status()?;
    ensure!(
        status.cgroups.as_deref() == Some("v1"),
        "cgroups {:?}\n{}",
        status.cgroups,
        sup.context()
    );
    Ok(sup)
}

fn limited(id: u64, argv: &[&str], timeout_ms: u64, limits: ExecLimits) -> Exec {
    Exec {
        timeout_ms: Some(timeout_ms),
        limits: Some(limits),
        ..Exec::new(id, argv.iter().copied())
    }
}

/// Runs an exec that takes 512 MiB under a limit of 64 MiB: it must be OOM-killed, and told.
fn hog_past_its_limit(sup: &mut Sup) -> Result<()> {
    let p = probe();
    let hog = sup.ctl.exec_started(|id| {
        limited(
            id,
            &[p, "hog", "0", "512"],
            60_000,
            ExecLimits {
                memory_bytes: Some(64 * MIB),
                ..ExecLimits::default()
            },
        )
    })?;
    let run = run_of(sup, hog.exec_id, PATIENCE)?;
    expect_oom_killed(sup, &run)
}

/// Waits for exec `id`'s end; its run.
fn run_of(sup: &mut Sup, id: u64, timeout: Duration) -> Result<ExecRun> {
    let (last, skipped) = sup.wait_within(
        "exec_exit",
        |e| matches!(e, Event::ExecExit(x) if x.exec_id == id),
        timeout,
    )?;
    let mut run = ExecRun::default();
    for s in skipped.iter().chain([&last]) {
        if exec_of(&s.event) == Some(id) {
            run.take(&s.event)?;
        }
    }
    sup.ctl.ack(sup.ctl.last_seq())?;
    Ok(run)
}

#[test]
fn a_per_exec_memory_limit_kills_only_that_exec() -> Result<()> {
    let cg = v1_cgroup!("exec-mem");
    cg.limit_memory(1024 * MIB)?;
    let mut sup = start_in(&cg)?;
    let bystander = sup.ctl.exec_started(|id| Exec {
        timeout_ms: Some(60_000),
        ..Exec::new(id, ["sleep", "60"])
    })?;
    hog_past_its_limit(&mut sup)?;
    // The sandbox's limit was far away: the bystander and the driver live on.
    let r = metrics(&mut sup)?;
    ensure!(
        r.procs.iter().any(|p| p.exec_id == Some(bystander.exec_id)),
        "the bystander exec is gone: {r:#?}"
    );
    ensure!(r.procs.iter().any(|p| p.role == ProcRole::Driver), "{r:#?}");
    ensure!(sup.shim.alive(), "{}", sup.context());
    sup.ctl.send(ExecSignal {
        exec_id: bystander.exec_id,
        signal: "KILL".into(),
    })?;
    run_of(&mut sup, bystander.exec_id, PATIENCE)?;
    Ok(())
}

#[test]
fn a_setsid_daemon_started_by_an_exec_is_dead_after_its_timeout() -> Result<()> {
    let cg = v1_cgroup!("daemon");
    let mut sup = start_in(&cg)?;
    let daemon = ["sleep", "301"];
    let started = sup.ctl.exec_started(|id| Exec {
        timeout_ms: Some(1_000),
        ..Exec::new(id, ["/bin/sh", "-c", "setsid sleep 301 & exec sleep 302"])
    })?;
    // It runs, out of the exec's session and process group.
    let seen = poll_until(PATIENCE, || {
        cg.running(&daemon).ok().filter(|p| !p.is_empty())
    });
    ensure!(seen.is_some(), "the daemon never ran\n{}", sup.context());
    let run = run_of(&mut sup, started.exec_id, PATIENCE)?;
    ensure!(run.exit.as_ref().is_some_and(|e| e.timed_out), "{run:?}");
    let gone = poll_until(Duration::from_secs(5), || {
        cg.running(&daemon).ok().filter(Vec::is_empty)
    });
    ensure!(
        gone.is_some(),
        "the setsid daemon outlived its exec: {:?}\n{}",
        cg.running(&daemon),
        sup.context()
    );
    ensure!(sup.shim.alive(), "{}", sup.context());
    Ok(())
}

#[test]
fn a_fork_bomb_in_an_exec_with_a_pids_limit_is_contained() -> Result<()> {
    let cg = v1_cgroup!("bomb");
    let mut sup = start_in(&cg)?;
    let p = probe();
    let base = metrics(&mut sup)?
        .cgroup
        .and_then(|c| c.pids)
        .ok_or_else(|| anyhow!("no pids count"))?;
    let t0 = Instant::now();
    let started = sup.ctl.exec_started(|id| {
        limited(
            id,
            &[p, "hog", "5000", "0"],
            3_000,
            ExecLimits {
                pids: Some(40),
                ..ExecLimits::default()
            },
        )
    })?;
    // The shim answers while the exec is at its limit.
    let status = sup.status()?;
    ensure!(status.execs_running == 1, "{status:?}");
    let run = run_of(&mut sup, started.exec_id, PATIENCE)?;
    let forked: u32 = run
        .out()
        .lines()
        .find_map(|l| l.strip_prefix("forked="))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow!("no forked= line: {run:?}"))?;
    ensure!(forked < 40, "forked {forked} under a limit of 40");
    ensure!(run.exit.as_ref().is_some_and(|e| e.timed_out), "{run:?}");
    // Everything it forked died with it.
    let left = poll_until(Duration::from_secs(5), || {
        let r = metrics(&mut sup).ok()?;
        let pids = r.cgroup.as_ref()?.pids?;
        (pids <= base).then_some(pids)
    });
    ensure!(
        left.is_some(),
        "processes left after the exec: {:?} (before it: {base})\n{}",
        metrics(&mut sup)?.cgroup.and_then(|c| c.pids),
        sup.context()
    );
    eprintln!(
        "MEASURED fork bomb under pids 40: forked {forked}, contained and killed in {:?}",
        t0.elapsed()
    );
    ensure!(sup.shim.alive(), "{}", sup.context());
    Ok(())
}

#[test]
fn the_driver_runs_in_a_cgroup_of_its_own_and_its_exit_kills_it_whole() -> Result<()> {
    let cg = v1_cgroup!("driver");
    let echo = crate::drivers::echo_driver_bin()?;
    // The driver leaves a daemon behind, out of its session and process group.
    let script = format!("setsid sleep 304 & exec {}", echo.display());
    let daemon = ["sleep", "304"];
    let mut sup = cg.start(Setup::new(Mode::Pid1).driver_cmd(["/bin/sh", "-c", &script]))?;
    sup.expect_up(1)?;
    ensure!(
        sup.ctl.shim_hello().cgroups.as_deref() == Some("v1"),
        "hello: {:?}",
        sup.ctl.shim_hello()
    );
    let first = poll_until(PATIENCE, || {
        cg.running(&daemon).ok().filter(|p| p.len() == 1)
    })
    .ok_or_else(|| anyhow!("the daemon never ran\n{}", sup.context()))?;
    // In the driver's own cgroup, in each hierarchy but memory (the sandbox's, so that its
    // OOM kills are counted there).
    let own = std::fs::read_to_string(format!("/proc/{}/cgroup", first[0]))?;
    for c in ["pids", "cpu", "freezer"] {
        ensure!(
            own.lines()
                .any(|l| l.contains(c) && l.contains("/agent-shim-driver-1-")),
            "the daemon's cgroups: {own}"
        );
    }
    // A SIGKILL to the driver's group misses the daemon; the driver's end takes it.
    sup.ctl.expect_ok(|id| {
        Signal {
            id,
            signal: "KILL".into(),
            target: SignalTarget::Driver,
            exec_id: None,
        }
        .into()
    })?;
    sup.expect_exited()?;
    sup.expect_up(2)?;
    let gone = poll_until(Duration::from_secs(5), || {
        cg.running(&daemon).ok().filter(|p| !p.contains(&first[0]))
    });
    ensure!(
        gone.is_some(),
        "the old driver's daemon outlived it: {:?}\n{}",
        cg.running(&daemon),
        sup.context()
    );
    // The new launch has a cgroup of its own.
    let second = poll_until(PATIENCE, || {
        cg.running(&daemon).ok().filter(|p| p.len() == 1)
    })
    .ok_or_else(|| anyhow!("the new driver's daemon never ran\n{}", sup.context()))?;
    let own = std::fs::read_to_string(format!("/proc/{}/cgroup", second[0]))?;
    ensure!(own.contains("/agent-shim-driver-2-"), "{own}");
    ensure!(sup.shim.alive(), "{}", sup.context());
    Ok(())
}

#[test]
fn an_execs_limits_are_written_in_its_own_v1_cgroups() -> Result<()> {
    let cg = v1_cgroup!("limits");
    let mut sup = start_in(&cg)?;
    let started = sup.ctl.exec_started(|id| {
        limited(
            id,
            &["sleep", "60"],
            60_000,
            ExecLimits {
                memory_bytes: Some(48 * MIB),
                pids: Some(16),
                cpu_millis: Some(250),
            },
        )
    })?;
    let pid = sup.host_pid(started.pid)?;
    let read = |controller: &str, file: &str| own_v1_file(pid, controller, file);
    ensure!(read("memory", "memory.limit_in_bytes")? == (48 * MIB).to_string());
    ensure!(read("pids", "pids.max")? == "16");
    ensure!(read("cpu", "cpu.cfs_period_us")? == "100000");
    ensure!(read("cpu", "cpu.cfs_quota_us")? == "25000");
    ensure!(read("freezer", "freezer.state")? == "THAWED");
    sup.ctl.send(ExecSignal {
        exec_id: started.exec_id,
        signal: "KILL".into(),
    })?;
    run_of(&mut sup, started.exec_id, PATIENCE)?;
    Ok(())
}

#[test]
fn a_tenant_mount_over_the_cgroup_tree_is_never_used() -> Result<()> {
    let cg = v1_cgroup!("tenant-mount");
    cg.limit_memory(1024 * MIB)?;
    let name = cg
        .dir("memory")?
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("no cgroup name"))?
        .to_owned();
    let mut sup = start_in(&cg)?;
    // A root tenant, in the shim's mount namespace: a tmpfs over /sys/fs/cgroup with the
    // shim's directories in it, forged figures in them, a FIFO (which no one opens for
    // reading: an open by path would never return) for every file the shim writes, and the
    // next execs' cgroups made beforehand, FIFOs inside (the shim's tag is in the tenant's own
    // /proc/self/cgroup).
    let fifos = "cgroup.procs tasks memory.limit_in_bytes memory.memsw.limit_in_bytes \
                 pids.max cpu.cfs_period_us cpu.cfs_quota_us freezer.state";
    let script = format!(
        "set -e; tag=$(grep -o 'agent-shim-exec-[0-9]*-[0-9a-f]*' /proc/self/cgroup | head -n1 \
           | sed 's/.*-//'); test -n \"$tag\"; \
         mount -t tmpfs none /sys/fs/cgroup; \
         for c in memory pids cpu cpuacct freezer blkio; do \
           d=/sys/fs/cgroup/$c/{name}; mkdir -p $d; \
           for f in {fifos}; do mkfifo $d/$f; done; \
           echo 999999999999 > $d/memory.usage_in_bytes; echo 99999 > $d/pids.current; \
           printf 'oom_kill_disable 0\\nunder_oom 0\\noom_kill 77\\n' > $d/memory.oom_control; \
           for i in $(seq 1 40); do e=$d/agent-shim-exec-$i-$tag; mkdir $e; \
             for f in {fifos}; do mkfifo $e/$f; done; done; \
         done; echo mounted"
    );
    tenant(&mut sup, &script)?;
    // An exec with limits still runs, limited in its real cgroups.
    let limits = ExecLimits {
        memory_bytes: Some(48 * MIB),
        pids: Some(16),
        cpu_millis: Some(250),
    };
    let sleeper = sup
        .ctl
        .exec_started(|id| limited(id, &["sleep", "60"], 60_000, limits))?;
    let pid = sup.host_pid(sleeper.pid)?;
    ensure!(own_v1_file(pid, "memory", "memory.limit_in_bytes")? == (48 * MIB).to_string());
    ensure!(own_v1_file(pid, "pids", "pids.max")? == "16");
    ensure!(own_v1_file(pid, "cpu", "cpu.cfs_quota_us")? == "25000");
    ensure!(own_v1_file(pid, "freezer", "freezer.state")? == "THAWED");
    // One over its memory limit is killed, and told OOM-killed, as before.
    hog_past_its_limit(&mut sup)?;
    // The reading has the true figures, not the forged ones.
    let r = metrics(&mut sup)?;
    let c = r
        .cgroup
        .as_ref()
        .ok_or_else(|| anyhow!("no cgroup: {r:#?}"))?;
    ensure!(
        c.pids.is_some_and(|n| n < 1000)
            && c.memory_bytes.is_some_and(|b| b < 1024 * MIB)
            && c.memory_limit_bytes == Some(1024 * MIB)
            && c.oom_kills == Some(cg.oom_kills()?),
        "the reading went through the tenant's files: {c:#?}"
    );
    // A kill and the removal go through the real tree too: nothing of the execs is left.
    sup.ctl.send(ExecSignal {
        exec_id: sleeper.exec_id,
        signal: "KILL".into(),
    })?;
    run_of(&mut sup, sleeper.exec_id, PATIENCE)?;
    let left = || -> Result<Vec<String>> {
        let mut v = Vec::new();
        for c in ["memory", "pids", "cpu", "freezer"] {
            for e in std::fs::read_dir(cg.dir(c)?)?.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with("agent-shim-exec-") {
                    v.push(format!("{c}/{n}"));
                }
            }
        }
        Ok(v)
    };
    ensure!(
        poll_until(PATIENCE, || left().ok().filter(Vec::is_empty)).is_some(),
        "exec cgroups left: {:?}\n{}",
        left(),
        sup.context()
    );
    ensure!(sup.status()?.execs_running == 0);
    ensure!(sup.shim.alive(), "{}", sup.context());
    Ok(())
}

/// What `file` of host process `pid`'s own (`agent-shim-exec-`) cgroup in `controller` holds,
/// read through the host's cgroup tree.
fn own_v1_file(pid: i32, controller: &str, file: &str) -> Result<String> {
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let path = own
        .lines()
        .find_map(|l| {
            let mut p = l.splitn(3, ':');
            let (_, cs, path) = (p.next()?, p.next()?, p.next()?);
            cs.split(',').any(|c| c == controller).then_some(path)
        })
        .filter(|p| p.contains("/agent-shim-exec-"))
        .ok_or_else(|| anyhow!("the exec has no {controller} cgroup of its own: {own}"))?;
    let full = format!("/sys/fs/cgroup/{controller}{path}/{file}");
    Ok(std::fs::read_to_string(&full)?.trim().to_owned())
}
