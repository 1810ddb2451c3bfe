//! Per-exec and driver cgroups, where the sandbox's cgroup is delegated to the shim.
//!
//! When the shim can create child cgroups, each exec runs in one of its own, below the
//! shim's cgroup: its `limits` are written there, its timeout or cancel kills every process
//! in it (a `setsid` daemon included), and its OOM kills are counted there. Each launch of
//! the driver gets one too (`driver-<n>`), without limits: its usage is apart from the
//! execs', its `oom_killed` comes from its own counter, and when it exits everything left
//! in it is killed before the next launch, so a restart leaves nothing of the old driver.
//!
//! - **cgroup v2** ("v2-delegated"): the shim's cgroup directory is writable (PID 1 of a
//!   microVM, or a container given its subtree). The "no internal processes" rule: the shim
//!   first moves itself into the leaf `<cgroup>/shim`, then enables `memory`, `pids` and `cpu`
//!   in `<cgroup>/cgroup.subtree_control`; each exec gets `<cgroup>/exec-<id>`, killed with
//!   `cgroup.kill`.
//! - **cgroup v1** ("v1", as root): the shim's directories in the `memory`, `pids`, `cpu`
//!   and `freezer` hierarchies are writable; each exec gets `agent-shim-exec-<id>-<tag>` in
//!   each (in `memory` only with a memory limit: v1 counts an OOM kill only in the victim's
//!   own memory cgroup, so the sandbox's counter must keep seeing the others), killed by
//!   freezing it, sending `SIGKILL` to every pid in it, and thawing it.
//!
//! Everything is decided once at start ([`Delegation::detect`]), before any child runs. The
//! directories are created by the shim (root) with mode 0755: a tenant running as another
//! user cannot write their files. A tenant cannot leave its exec's cgroup: moving a process
//! needs write access to the target's `cgroup.procs` and to the common ancestor's. A child
//! never runs outside its cgroup, and enters it without the kernel's global cgroup write
//! lock, whose first taking waits out an RCU grace period (a `cgroup.procs` write: 7-40 ms
//! measured on a v1 host, against 0.1 ms for the ways below):
//! - on v2 it is created in it (`clone3` with `CLONE_INTO_CGROUP`, Linux 5.7);
//! - on v1, or where the kernel refuses `clone3`, it joins between `fork` and `execve` by
//!   writing `0` to each join file, opened before the fork (no allocation after it): `tasks`
//!   on v1, where the forked child's one thread moves alone and without the lock, so the
//!   process moves; `cgroup.procs` on v2.
//!
//! **Trust.** A root tenant may mount over `/sys/fs/cgroup` or any directory below it. The
//! cgroup directories the shim uses are therefore opened once, at start, before any child
//! runs, as directory descriptors ([`Dir`]); from then on every cgroup is made (`mkdirat`),
//! written, read and removed (`unlinkat`) relative to those descriptors, each file opened
//! beneath its directory without crossing a mount or following a link, non-blocking, and
//! kept only if it is a regular file. What the tenant mounts or makes afterwards (a FIFO, a
//! forged file, a FUSE filesystem) is never opened by PID 1.

use std::fs::File;
use std::io::Read as _;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::sync::Arc;

use driver_protocol::message::ExecLimits;
use tracing::info;

use crate::spawn::CgroupJoin;
use crate::sys::dir::Dir;

/// Where cgroup filesystems are mounted.
const ROOT: &str = "/sys/fs/cgroup";

/// The v1 hierarchies an exec's cgroup is made in (`freezer` for the kill).
const V1_CONTROLLERS: &[&str] = &["memory", "pids", "cpu", "freezer"];

/// The cgroup made for the sandbox when the shim starts at the root of a v2 hierarchy.
const SANDBOX: &str = "agent-shim";

/// The CFS period the `cpu` limit is written with, microseconds.
const CPU_PERIOD_US: u64 = 100_000;

/// Which kind of delegation is in effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// No cgroup can be created: execs run in the shim's cgroup, as without this module.
    None,
    /// cgroup v1 hierarchies, written as root.
    V1,
    /// A delegated cgroup v2 subtree.
    V2,
}

impl Mode {
    /// The name `status` gives: `none`, `v1` or `v2-delegated`.
    pub fn name(self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::V1 => "v1",
            Mode::V2 => "v2-delegated",
        }
    }
}

/// Where exec cgroups are created.
#[derive(Debug)]
pub struct Delegation {
    mode: Mode,
    /// Makes this shim's cgroup names its own (v1 hierarchies may be shared with other
    /// sandboxes on the host): the start time in nanoseconds.
    tag: u64,
    /// v2: one directory; v1: `(controller, directory)` per hierarchy; opened at start.
    parents: Vec<(&'static str, Arc<Dir>)>,
    /// v2 at the root of the hierarchy: the sandbox's cgroup made below it, as a line of
    /// `/proc/self/cgroup` (`0::/agent-shim`).
    sandbox: Option<String>,
}

/// One exec's cgroup, or one launch of the driver's.
#[derive(Debug)]
pub struct ExecCgroup {
    mode: Mode,
    /// Its name in each parent.
    name: String,
    /// Its directories (`(controller, parent, dir)`; one with controller `""` on v2).
    dirs: Vec<(&'static str, Arc<Dir>, Dir)>,
    /// Its join files (`cgroup.procs` on v2, `tasks` on v1), open for writing: the child
    /// writes `0` to each.
    procs: Vec<File>,
}

impl Delegation {
    /// A delegation that creates nothing.
    pub fn none() -> Self {
        Delegation {
            mode: Mode::None,
            tag: 0,
            parents: Vec::new(),
            sandbox: None,
        }
    }

    /// Finds out whether the shim can create child cgroups (`proc_cgroup`: the contents of
    /// `/proc/self/cgroup`), and on v2 moves the shim into its leaf and enables the
    /// controllers. Call before any child is started.
    pub fn detect(proc_cgroup: &str) -> Self {
        let root = Path::new(ROOT);
        let d = if is_cgroup2(root) {
            detect_v2(root, proc_cgroup)
        } else {
            detect_v1(root, proc_cgroup)
        };
        let d = d.unwrap_or_else(Delegation::none);
        info!(cgroups = d.mode.name(), "per-exec cgroups");
        d
    }

    /// The mode in effect.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Where the shim was at the root of a v2 hierarchy (PID 1 of a microVM), whose root
    /// cgroup has no usage files of its own: the sandbox's cgroup the delegation made below
    /// it, as a line of `/proc/self/cgroup`, to read the sandbox's usage from.
    pub fn sandbox(&self) -> Option<&str> {
        self.sandbox.as_deref()
    }

    /// Creates exec `id`'s cgroup with `limits` written; `None` without delegation.
    pub fn create(
        &self,
        id: u64,
        limits: Option<&ExecLimits>,
    ) -> Option<std::io::Result<ExecCgroup>> {
        if self.mode == Mode::None {
            return None;
        }
        Some(self.create_in("exec", id, limits))
    }

    /// Creates the cgroup of the driver's `n`th launch (no limits); `None` without
    /// delegation.
    pub fn create_driver(&self, n: u64) -> Option<std::io::Result<ExecCgroup>> {
        if self.mode == Mode::None {
            return None;
        }
        Some(self.create_in("driver", n, None))
    }

    fn create_in(
        &self,
        what: &str,
        id: u64,
        limits: Option<&ExecLimits>,
    ) -> std::io::Result<ExecCgroup> {
        let name = match self.mode {
            Mode::V2 => format!("{what}-{id}-{:x}", self.tag),
            _ => format!("agent-shim-{what}-{id}-{:x}", self.tag),
        };
        let mut cg = ExecCgroup {
            mode: self.mode,
            name,
            dirs: Vec::new(),
            procs: Vec::new(),
        };
        for (controller, parent) in &self.parents {
            // v1 counts an OOM kill only in the victim's own memory cgroup: an exec without a
            // memory limit stays in the sandbox's, whose counter then keeps counting it.
            if *controller == "memory" && limits.is_none_or(|l| l.memory_bytes.is_none()) {
                continue;
            }
            // Never shared: a directory that exists is another's.
            let made = parent.mkdir(&cg.name).and_then(|()| {
                parent.dir(&cg.name).inspect_err(|_| {
                    let _ = parent.rmdir(&cg.name);
                })
            });
            match made {
                Ok(dir) => cg.dirs.push((controller, Arc::clone(parent), dir)),
                Err(e) => {
                    cg.remove();
                    return Err(e);
                }
            }
        }
        if let Some(l) = limits {
            if let Err(e) = cg.apply(l) {
                cg.remove();
                return Err(e);
            }
        }
        // See the module's notes: on v1 a lone thread joins without the global lock.
        let join = match self.mode {
            Mode::V1 => "tasks",
            Mode::V2 | Mode::None => "cgroup.procs",
        };
        for (_, _, dir) in &cg.dirs {
            match dir.file(join, true) {
                Ok(f) => cg.procs.push(f),
                Err(e) => {
                    cg.remove();
                    return Err(e);
                }
            }
        }
        Ok(cg)
    }
}

impl ExecCgroup {
    /// How a child enters this cgroup: on v2 created in its directory, else (or where the
    /// kernel cannot) by writing `0` to its join files (`cgroup.procs` or `tasks`).
    pub fn join(&self) -> CgroupJoin {
        CgroupJoin {
            dir: match self.mode {
                Mode::V2 => self.dirs.first().map(|(_, _, dir)| dir.as_raw_fd()),
                Mode::V1 | Mode::None => None,
            },
            files: self.procs.iter().map(AsRawFd::as_raw_fd).collect(),
        }
    }

    fn dir(&self, controller: &str) -> Option<&Dir> {
        self.dirs
            .iter()
            .find(|(c, _, _)| *c == controller || self.mode == Mode::V2)
            .map(|(_, _, d)| d)
    }

    fn write(&self, controller: &str, file: &str, value: &str) -> std::io::Result<()> {
        self.dir(controller)
            .ok_or_else(|| std::io::Error::other(format!("no {controller} cgroup")))?
            .write(file, value.as_bytes())
    }

    /// Writes the exec's limits.
    fn apply(&self, l: &ExecLimits) -> std::io::Result<()> {
        let v2 = self.mode == Mode::V2;
        if let Some(m) = l.memory_bytes {
            let m = m.to_string();
            if v2 {
                self.write("memory", "memory.max", &m)?;
                // Killed at the limit, not swapped out.
                let _ = self.write("memory", "memory.swap.max", "0");
            } else {
                self.write("memory", "memory.limit_in_bytes", &m)?;
                let _ = self.write("memory", "memory.memsw.limit_in_bytes", &m);
            }
        }
        if let Some(p) = l.pids {
            self.write("pids", "pids.max", &p.to_string())?;
        }
        if let Some(millis) = l.cpu_millis {
            // 1000 millicpus = one CPU: that share of each period.
            let quota = (millis.saturating_mul(CPU_PERIOD_US) / 1000).max(1000);
            if v2 {
                self.write("cpu", "cpu.max", &format!("{quota} {CPU_PERIOD_US}"))?;
            } else {
                self.write("cpu", "cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
                self.write("cpu", "cpu.cfs_quota_us", &quota.to_string())?;
            }
        }
        Ok(())
    }

    /// Kills every process in the cgroup: `cgroup.kill` on v2; on v1 freeze, `SIGKILL` each
    /// pid, thaw (frozen processes cannot fork meanwhile; they die once thawed).
    pub fn kill(&self) {
        if self.mode == Mode::V2 && self.write("", "cgroup.kill", "1").is_ok() {
            return;
        }
        let frozen = self.write("freezer", "freezer.state", "FROZEN").is_ok();
        // Without a freezer a process may fork between the read and the kill: a few rounds.
        for _ in 0..if frozen { 1 } else { 8 } {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if frozen {
            let _ = self.write("freezer", "freezer.state", "THAWED");
        }
    }

    /// The pids in the cgroup (its first hierarchy's `cgroup.procs`).
    fn pids(&self) -> Vec<i32> {
        let Some((_, _, dir)) = self.dirs.first() else {
            return Vec::new();
        };
        let mut text = String::new();
        if let Ok(mut f) = dir.file("cgroup.procs", false) {
            let _ = f.read_to_string(&mut text);
        }
        text.lines()
            .filter_map(|l| l.trim().parse().ok())
            .filter(|&p: &i32| p > 0)
            .collect()
    }

    /// The cgroup's OOM-kill counter (`memory.events` / `memory.oom_control`, `oom_kill`).
    pub fn oom_kills(&self) -> Option<u64> {
        let file = match self.mode {
            Mode::V2 => "memory.events",
            _ => "memory.oom_control",
        };
        let f = self.dir("memory")?.file(file, false).ok()?;
        let mut buf = [0u8; 512];
        let n = f.read_at(&mut buf, 0).ok()?;
        std::str::from_utf8(buf.get(..n)?)
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Removes its directories; `false` while a process is still in it (try again later).
    pub fn remove(&self) -> bool {
        let mut all = true;
        for (_, parent, _) in &self.dirs {
            match parent.rmdir(&self.name) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(_) => all = false,
            }
        }
        all
    }
}

/// Whether `path` is the root of a cgroup v2 mount.
pub(crate) fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

/// The shim's own directory below `root` (the mount root when the path is not below it).
fn own_dir(root: &Path, rel: &str) -> Option<Dir> {
    let base = Dir::open(root).ok()?;
    Some(base.dir(rel).unwrap_or(base))
}

/// Makes the directory `name` in `dir` unless it is there; opens it.
fn made(dir: &Dir, name: &str) -> Option<Dir> {
    if let Err(e) = dir.mkdir(name) {
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return None;
        }
    }
    dir.dir(name).ok()
}

fn detect_v2(root: &Path, proc_cgroup: &str) -> Option<Delegation> {
    let rel = proc_cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    let mut dir = own_dir(root, rel)?;
    let mut sandbox = None;
    // The hierarchy's root (every other cgroup has a `cgroup.type`) counts nothing of its
    // own (no `memory.current`, `memory.events`, `pids.current`): the sandbox gets a cgroup
    // below it, with the controllers the root offers (a microVM's init enabled them).
    if !dir.has_file("cgroup.type") {
        let below = made(&dir, SANDBOX)?;
        for c in ["+memory", "+pids", "+cpu", "+io"] {
            let _ = dir.write("cgroup.subtree_control", c.as_bytes());
        }
        sandbox = Some(format!("0::/{}/{SANDBOX}", rel.trim_matches('/')).replace("//", "/"));
        dir = below;
    }
    let leaf = made(&dir, "shim")?;
    let me = std::process::id().to_string();
    if leaf.write("cgroup.procs", me.as_bytes()).is_err() {
        let _ = dir.rmdir("shim");
        return None;
    }
    // A controller the parent does not offer stays off (its limits then fail the exec).
    for c in ["+memory", "+pids", "+cpu"] {
        let _ = dir.write("cgroup.subtree_control", c.as_bytes());
    }
    Some(Delegation {
        mode: Mode::V2,
        tag: tag(),
        parents: vec![("", Arc::new(dir))],
        sandbox,
    })
}

fn detect_v1(root: &Path, proc_cgroup: &str) -> Option<Delegation> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let mut parents = Vec::new();
    for &c in V1_CONTROLLERS {
        let rel = proc_cgroup.lines().find_map(|l| {
            let mut p = l.splitn(3, ':');
            let (_, cs, path) = (p.next()?, p.next()?, p.next()?);
            cs.split(',').any(|x| x == c).then_some(path)
        })?;
        let dir = own_dir(&root.join(c), rel)?;
        // Writable? A probe directory says (cgroupfs ignores mode bits for root but not a
        // read-only mount).
        let probe = format!("agent-shim-probe-{}", std::process::id());
        dir.mkdir(&probe).ok()?;
        let _ = dir.rmdir(&probe);
        parents.push((c, Arc::new(dir)));
    }
    Some(Delegation {
        mode: Mode::V1,
        tag: tag(),
        parents,
        sandbox: None,
    })
}

/// Nanoseconds of the wall clock: the shim's tag in cgroup names.
fn tag() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mode_names_are_the_protocols() {
        assert_eq!(Mode::None.name(), "none");
        assert_eq!(Mode::V1.name(), "v1");
        assert_eq!(Mode::V2.name(), "v2-delegated");
    }

    #[test]
    fn at_the_root_of_a_v2_hierarchy_the_sandbox_gets_a_cgroup_below_it() {
        let base = std::env::temp_dir().join(format!("agent-shim-cgroot-{}", std::process::id()));
        // The root: no `cgroup.type`. The files cgroupfs would make in the new directories
        // are made here beforehand (the shim only opens existing files).
        std::fs::create_dir_all(base.join("agent-shim/shim")).unwrap();
        std::fs::write(base.join("agent-shim/shim/cgroup.procs"), "").unwrap();
        let d = detect_v2(&base, "0::/\n").unwrap();
        assert_eq!(d.sandbox(), Some("0::/agent-shim"));
        assert!(d.parents[0].1.has_file("shim/cgroup.procs"));
        let me = std::fs::read_to_string(base.join("agent-shim/shim/cgroup.procs")).unwrap();
        assert_eq!(me, std::process::id().to_string());
        std::fs::remove_dir_all(&base).unwrap();
        // Any other cgroup: its own directory, nothing made above the leaf.
        let own = base.join("box");
        std::fs::create_dir_all(own.join("shim")).unwrap();
        std::fs::write(own.join("shim/cgroup.procs"), "").unwrap();
        std::fs::write(own.join("cgroup.type"), "domain\n").unwrap();
        let d = detect_v2(&base, "0::/box\n").unwrap();
        assert_eq!(d.sandbox(), None);
        assert!(d.parents[0].1.has_file("cgroup.type"));
        assert!(!own.join("agent-shim").exists());
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn limits_are_written_in_v2_form() {
        let dir = std::env::temp_dir().join(format!("agent-shim-cg2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["memory.max", "memory.swap.max", "pids.max", "cpu.max"] {
            // Empty: a cgroup file takes one write whole; a plain file is not truncated.
            std::fs::write(dir.join(f), "").unwrap();
        }
        let parent = Arc::new(Dir::open(&std::env::temp_dir()).unwrap());
        let name = dir.file_name().unwrap().to_str().unwrap().to_owned();
        let own = parent.dir(&name).unwrap();
        let cg = ExecCgroup {
            mode: Mode::V2,
            name,
            dirs: vec![("", parent, own)],
            procs: Vec::new(),
        };
        cg.apply(&ExecLimits {
            memory_bytes: Some(64 << 20),
            pids: Some(32),
            cpu_millis: Some(500),
        })
        .unwrap();
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(read("memory.max"), "67108864");
        assert_eq!(read("memory.swap.max"), "0");
        assert_eq!(read("pids.max"), "32");
        assert_eq!(read("cpu.max"), "50000 100000");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
