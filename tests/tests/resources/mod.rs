//! Resources: the `metrics` reading against what the kernel and the container engine were
//! told, end to end.
//!
//! - `metrics`: the shim as real PID 1 in cgroup v1 hierarchies of the test's own (root, no
//!   Docker; this machine's engine is cgroup v1): the reading has the limits written there, a
//!   tool holding 50 MiB shows in the cgroup's memory and in its own reading, an OOM-killed
//!   exec is reported and the cgroup's OOM-kill count rises, `--metrics-interval` sends
//!   periodic events and nothing is read on a timer without it; a tenant's hostile process
//!   names do not confuse the per-process readings.
//! - `docker`: with `--memory`, `--pids-limit` and `--cpus`, the reported limits are the
//!   container's (through control-link's typed `metrics`).
//!
//! cgroup v2 is read by the same code; its parsing is unit-tested on recorded v2 files
//! (`shim/src/metrics/fixtures/v2`).

/// Returns from the test, through `skip`, without root or without the cgroup v1 hierarchies
/// of [`CONTROLLERS`]; else a [`V1Cgroup`] made with `$tag`.
macro_rules! v1_cgroup {
    ($tag:expr) => {{
        crate::support::require_root!();
        match crate::resources::V1Cgroup::new($tag)? {
            Some(cg) => cg,
            None => return crate::support::skip(
                "cgroup-v1",
                "no cgroup v1 memory, pids, cpu, cpuacct and freezer hierarchies at /sys/fs/cgroup",
                module_path!(),
            ),
        }
    }};
}

mod cgroups;
mod docker;
mod metrics;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use driver_protocol::message::{Exec, Metrics, Reading, ShimToControl};

use crate::supervisor::{Setup, Sup};
use crate::support::control::ExecRun;

/// Where this machine mounts the cgroup v1 hierarchies.
const V1_ROOT: &str = "/sys/fs/cgroup";

/// The v1 hierarchies a test cgroup is made in (`cpu` and `cpuacct` may be one mount with
/// two names; each is joined on its own all the same; `freezer` for the shim's per-exec
/// cgroups, which it creates below its own).
const CONTROLLERS: &[&str] = &["memory", "pids", "cpu", "cpuacct", "freezer"];

/// A cgroup of this test in every v1 hierarchy of [`CONTROLLERS`], removed on drop (after
/// the shim it holds is gone: declare it before the [`Sup`]).
pub struct V1Cgroup {
    dirs: Vec<PathBuf>,
}

impl V1Cgroup {
    /// Creates it (`None`: no cgroup v1 hierarchies here).
    pub fn new(tag: &str) -> Result<Option<V1Cgroup>> {
        let root = PathBuf::from(V1_ROOT);
        if !CONTROLLERS
            .iter()
            .all(|c| root.join(c).join("cgroup.procs").exists())
        {
            return Ok(None);
        }
        let name = format!("agent-shim-res-{tag}-{}", std::process::id());
        let mut cg = V1Cgroup { dirs: Vec::new() };
        for c in CONTROLLERS {
            let dir = root.join(c).join(&name);
            let _ = std::fs::remove_dir(&dir);
            std::fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
            cg.dirs.push(dir);
        }
        Ok(Some(cg))
    }

    fn dir(&self, controller: &str) -> Result<&PathBuf> {
        CONTROLLERS
            .iter()
            .position(|c| *c == controller)
            .and_then(|i| self.dirs.get(i))
            .ok_or_else(|| anyhow!("no {controller} cgroup"))
    }

    /// Writes `value` to `controller`'s `file`.
    pub fn write(&self, controller: &str, file: &str, value: &str) -> Result<()> {
        let path = self.dir(controller)?.join(file);
        std::fs::write(&path, value).with_context(|| format!("write {value} to {}", path.display()))
    }

    /// Reads `controller`'s `file`.
    pub fn read(&self, controller: &str, file: &str) -> Result<String> {
        let path = self.dir(controller)?.join(file);
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))
    }

    /// A memory limit (memory and swap together, so that a tool over it is killed rather
    /// than swapped out).
    pub fn limit_memory(&self, bytes: u64) -> Result<()> {
        self.write("memory", "memory.limit_in_bytes", &bytes.to_string())?;
        if self
            .dir("memory")?
            .join("memory.memsw.limit_in_bytes")
            .exists()
        {
            self.write("memory", "memory.memsw.limit_in_bytes", &bytes.to_string())?;
        }
        Ok(())
    }

    /// Starts `setup` with the shim (and so everything it forks) in this cgroup: the calling
    /// thread joins it (v1 moves single threads through `tasks`) for the fork, then goes back.
    pub fn start(&self, setup: Setup) -> Result<Sup> {
        let own = std::fs::read_to_string("/proc/thread-self/cgroup")?;
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() }.to_string();
        let mut back = Vec::new();
        for c in CONTROLLERS {
            let path = own
                .lines()
                .find_map(|l| {
                    let mut p = l.splitn(3, ':');
                    let (_, cs, path) = (p.next()?, p.next()?, p.next()?);
                    cs.split(',').any(|x| x == *c).then(|| path.to_owned())
                })
                .ok_or_else(|| anyhow!("no {c} line in /proc/thread-self/cgroup"))?;
            back.push(
                PathBuf::from(V1_ROOT)
                    .join(c)
                    .join(path.trim_start_matches('/'))
                    .join("tasks"),
            );
            self.write(c, "tasks", &tid)?;
        }
        let started = setup.start();
        for path in back {
            std::fs::write(&path, &tid).with_context(|| format!("back to {}", path.display()))?;
        }
        started
    }

    /// The pids in it or below it (host pids) whose command line is `argv`.
    pub fn running(&self, argv: &[&str]) -> Result<Vec<i32>> {
        let want: Vec<u8> = argv
            .iter()
            .flat_map(|a| [a.as_bytes(), b"\0"].concat())
            .collect();
        let mut pids = Vec::new();
        let mut dirs = vec![self.dir("memory")?.clone()];
        while let Some(dir) = dirs.pop() {
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            pids.extend(procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            for e in std::fs::read_dir(&dir)?.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs.push(e.path());
                }
            }
        }
        Ok(pids
            .into_iter()
            .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == want))
            .collect())
    }

    /// The `oom_kill` count of `memory.oom_control`.
    pub fn oom_kills(&self) -> Result<u64> {
        let text = self.read("memory", "memory.oom_control")?;
        text.lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
            .ok_or_else(|| anyhow!("no oom_kill in memory.oom_control: {text}"))
    }
}

impl Drop for V1Cgroup {
    fn drop(&mut self) {
        // rmdir fails only while a process is still in it (the shim's last children are being
        // reaped): retry briefly.
        let deadline = Instant::now() + Duration::from_secs(10);
        for dir in &self.dirs {
            while std::fs::remove_dir(dir).is_err() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Checks that `run` ended killed by the OOM killer, and was told so.
pub fn expect_oom_killed(sup: &Sup, run: &ExecRun) -> Result<()> {
    let exit = run.exit.as_ref().ok_or_else(|| anyhow!("{run:?}"))?;
    ensure!(
        exit.signal.as_deref() == Some("SIGKILL") && exit.oom_killed == Some(true),
        "{exit:?}\n{}",
        sup.context()
    );
    Ok(())
}

/// Runs `script` as a root tenant would (`/bin/sh -c`, in the shim's namespaces) to its end;
/// it must print `mounted` last, once its mounts are made.
pub fn tenant(sup: &mut Sup, script: &str) -> Result<ExecRun> {
    let (run, _) = sup.run_to_end(|id| Exec {
        timeout_ms: Some(30_000),
        ..Exec::new(id, ["/bin/sh", "-c", script])
    })?;
    ensure!(
        run.out().contains("mounted"),
        "the tenant's mounts failed: {run:?}"
    );
    Ok(run)
}

/// One `metrics` request.
pub fn metrics(sup: &mut Sup) -> Result<Reading> {
    let id = sup.ctl.id();
    match sup.ctl.request(id, Metrics { id })? {
        ShimToControl::MetricsReply(m) => {
            if m.re != id {
                bail!("metrics_reply for {} to request {id}", m.re);
            }
            Ok(m.into_reading())
        }
        other => bail!("metrics answered {other:?}\n{}", sup.context()),
    }
}
