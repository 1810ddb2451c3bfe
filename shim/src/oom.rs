//! Keeping PID 1 out of the OOM killer's reach, and telling an OOM kill from any `SIGKILL`.
//!
//! When the sandbox's memory cgroup is full, the kernel kills the process with the highest
//! `oom_score_adj`-weighted badness. PID 1 of a container is not exempt (only the host's init
//! is), and if the OOM killer picks it, the whole sandbox exits 137. So:
//!
//! - **The shim** lowers its own `/proc/self/oom_score_adj` to -1000 (never killed) at start.
//!   That needs `CAP_SYS_RESOURCE` (docker `--cap-add SYS_RESOURCE`; root of a microVM has it).
//!   Without it the kernel only lets a process go down to its `oom_score_adj_min` (the value
//!   last written by a privileged writer, e.g. the container runtime), so the shim looks for
//!   the lowest value it may write and warns once, naming what to grant.
//! - **Children** get a higher value, written in the child between `fork` and `execve` while it
//!   still has the shim's credentials ([`crate::spawn`]): `--oom-score-adj DRIVER[:EXEC]`,
//!   [`ChildScores::default`] 500 for the driver and 1000 for every exec, so tools die first,
//!   then the driver, never PID 1. A write made with `CAP_SYS_RESOURCE` also sets
//!   `oom_score_adj_min`, so the tenant (after the drop to `--user`) cannot lower it again;
//!   without the capability the tenant may lower it back to the shim's own floor, no further.
//!   A plain-mode child gets the value the shim started with (tini's behaviour: the shim's -1000
//!   must not leak into the command).
//! - **Reporting.** The sandbox cgroup's OOM-kill counter (cgroup v2 `memory.events`, v1
//!   `memory.oom_control`, line `oom_kill N`) is read when a child of ours ends — a `pread` of
//!   a kernel-generated file opened once, no timer. A `SIGKILL` death that comes with a rise of
//!   the counter is an OOM kill ([`OomCounter::check`]).

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tracing::{debug, info, warn};

/// Where a process's OOM adjustment lives.
const SCORE_PATH: &str = "/proc/self/oom_score_adj";

/// The lowest adjustment: the OOM killer never picks the process.
pub const MIN_SCORE: i16 = -1000;

/// The highest adjustment: the OOM killer picks the process first.
pub const MAX_SCORE: i16 = 1000;

/// `--oom-score-adj`: what the driver and every exec get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChildScores {
    /// The driver's `oom_score_adj`.
    pub driver: i16,
    /// Every exec's `oom_score_adj`.
    pub exec: i16,
}

impl Default for ChildScores {
    /// Tools first (1000), then the driver (500); the shim itself is at -1000.
    fn default() -> Self {
        ChildScores {
            driver: 500,
            exec: MAX_SCORE,
        }
    }
}

/// Parses `DRIVER[:EXEC]`, each in -1000..=1000; EXEC defaults to DRIVER.
pub fn parse_child_scores(s: &str) -> Result<ChildScores, String> {
    let bad = |why: &str| format!("invalid oom-score-adj {s:?}: {why} (expected DRIVER[:EXEC])");
    let one = |v: &str| -> Result<i16, String> {
        v.trim()
            .parse::<i16>()
            .ok()
            .filter(|n| (MIN_SCORE..=MAX_SCORE).contains(n))
            .ok_or_else(|| bad("each value is a number from -1000 to 1000"))
    };
    let (driver, exec) = match s.split_once(':') {
        Some((d, e)) => (one(d)?, one(e)?),
        None => {
            let v = one(s)?;
            (v, v)
        }
    };
    Ok(ChildScores { driver, exec })
}

/// The shim's own adjustment, after [`protect_self`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwnScore {
    /// The value the shim started with (what a plain-mode child gets back).
    pub original: i16,
    /// The value it has now.
    pub now: i16,
}

/// How loudly [`protect_self`] says that it could not reach -1000.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Report {
    /// A warning (supervisor mode: the sandbox's platform should grant the capability).
    Warn,
    /// An info line (plain init mode prints nothing on a normal run, like tini).
    Quiet,
}

/// Lowers the shim's own `oom_score_adj` as far as the kernel allows (-1000 with
/// `CAP_SYS_RESOURCE`), saying once (as `report` asks) when it cannot reach -1000. `None` when
/// the file cannot be read (no `/proc`): nothing was changed.
pub fn protect_self(report: Report) -> Option<OwnScore> {
    let original = match read_score(Path::new(SCORE_PATH)) {
        Ok(v) => v,
        Err(err) => {
            match report {
                Report::Warn => {
                    warn!(%err, "cannot read {SCORE_PATH}: the OOM killer may pick PID 1")
                }
                Report::Quiet => info!(%err, "cannot read {SCORE_PATH}"),
            }
            return None;
        }
    };
    if write_score(MIN_SCORE).is_ok() {
        info!(from = original, to = MIN_SCORE, "oom_score_adj lowered");
        return Some(OwnScore {
            original,
            now: MIN_SCORE,
        });
    }
    // Without CAP_SYS_RESOURCE a write below oom_score_adj_min (which /proc does not show) is
    // refused, any other succeeds: search for the floor. Every successful write leaves the
    // value at `hi`, so it ends there.
    let (mut lo, mut hi) = (MIN_SCORE, original);
    while hi.saturating_sub(lo) > 1 {
        let mid = lo + (hi - lo) / 2;
        if write_score(mid).is_ok() {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    const WHY: &str = "cannot lower oom_score_adj to -1000 (needs CAP_SYS_RESOURCE: docker run \
         --cap-add SYS_RESOURCE, or Kubernetes securityContext.capabilities.add \
         [\"SYS_RESOURCE\"]); children start above PID 1 but may lower theirs to this value";
    match report {
        Report::Warn => warn!(oom_score_adj = hi, "{WHY}"),
        Report::Quiet => info!(oom_score_adj = hi, "{WHY}"),
    }
    Some(OwnScore { original, now: hi })
}

fn read_score(path: &Path) -> std::io::Result<i16> {
    let mut s = String::new();
    File::open(path)?.read_to_string(&mut s)?;
    s.trim()
        .parse()
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidData))
}

fn write_score(v: i16) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(SCORE_PATH)?
        .write_all(v.to_string().as_bytes())
}

/// The sandbox cgroup's OOM-kill counter, read on demand.
#[derive(Debug)]
pub struct OomCounter {
    /// The open `memory.events` / `memory.oom_control`, if found.
    file: Option<File>,
    /// The last reading.
    last: u64,
}

/// A rise of the counter, for the `oom` event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rise {
    /// The counter now.
    pub kills: u64,
    /// Kills since the previous reading.
    pub new_kills: u64,
}

impl OomCounter {
    /// Finds and opens the counter of the memory cgroup `proc_cgroup` names (the shim's own:
    /// `/proc/self/cgroup`'s contents); without one, every [`OomCounter::check`] is `None`
    /// (unknown).
    pub fn open(proc_cgroup: &str) -> Self {
        for path in candidates(proc_cgroup, Path::new("/sys/fs/cgroup")) {
            let Ok(file) = File::open(&path) else {
                continue;
            };
            if let Some(last) = read_kills(&file) {
                debug!(path = %path.display(), oom_kills = last, "oom-kill counter");
                return OomCounter {
                    file: Some(file),
                    last,
                };
            }
        }
        info!("no memory cgroup oom-kill counter: OOM kills are not told from other SIGKILLs");
        OomCounter {
            file: None,
            last: 0,
        }
    }

    /// Reads the counter: `None` when it cannot be read, else whether it rose since the last
    /// reading, and by how much.
    pub fn check(&mut self) -> Option<Option<Rise>> {
        let now = read_kills(self.file.as_ref()?)?;
        let new_kills = now.saturating_sub(self.last);
        self.last = now;
        Some((new_kills > 0).then_some(Rise {
            kills: now,
            new_kills,
        }))
    }
}

/// The counter files to try, best first, from `/proc/self/cgroup` (`root` is where cgroupfs
/// is mounted). Under a private cgroup namespace, or when the runtime mounts the container's
/// own cgroup at the root (Docker on cgroup v1), the path in `/proc/self/cgroup` does not
/// exist below the mount and the mount's root is the sandbox's cgroup.
fn candidates(proc_cgroup: &str, root: &Path) -> Vec<PathBuf> {
    let mut v1 = Vec::new();
    let mut v2 = Vec::new();
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        if controllers.split(',').any(|c| c == "memory") {
            let base = root.join("memory");
            v1.push(base.join(rel).join("memory.oom_control"));
            v1.push(base.join("memory.oom_control"));
        } else if id == "0" && controllers.is_empty() {
            v2.push(root.join(rel).join("memory.events"));
            v2.push(root.join("memory.events"));
        }
    }
    v1.extend(v2);
    v1
}

/// The `oom_kill N` line of a `memory.events` or `memory.oom_control` file.
fn read_kills(file: &File) -> Option<u64> {
    let mut buf = [0u8; 512];
    let n = file.read_at(&mut buf, 0).ok()?;
    parse_kills(buf.get(..n)?)
}

fn parse_kills(text: &[u8]) -> Option<u64> {
    std::str::from_utf8(text)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_parse() {
        assert_eq!(
            parse_child_scores("500:1000"),
            Ok(ChildScores {
                driver: 500,
                exec: 1000
            })
        );
        assert_eq!(
            parse_child_scores("-5"),
            Ok(ChildScores {
                driver: -5,
                exec: -5
            })
        );
        for bad in ["", "1001", "-1001", "a", "1:", ":1", "1:2:3", "99999"] {
            assert!(parse_child_scores(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn counters_parse() {
        assert_eq!(
            parse_kills(b"oom_kill_disable 0\nunder_oom 0\noom_kill 7\n"),
            Some(7)
        );
        assert_eq!(
            parse_kills(b"low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\noom_group_kill 0\n"),
            Some(2)
        );
        assert_eq!(parse_kills(b"oom_kill_disable 0\nunder_oom 0\n"), None);
    }

    #[test]
    fn a_rise_of_the_counter_is_seen_once() {
        let path = std::env::temp_dir().join(format!("agent-shim-oom-{}", std::process::id()));
        let write = |n: u64| {
            std::fs::write(
                &path,
                format!("oom_kill_disable 0\nunder_oom 0\noom_kill {n}\n"),
            )
            .unwrap()
        };
        write(1);
        let mut c = OomCounter {
            file: Some(File::open(&path).unwrap()),
            last: 1,
        };
        assert_eq!(c.check(), Some(None));
        write(3);
        assert_eq!(
            c.check(),
            Some(Some(Rise {
                kills: 3,
                new_kills: 2
            }))
        );
        assert_eq!(c.check(), Some(None));
        std::fs::remove_file(&path).unwrap();
        let mut unknown = OomCounter {
            file: None,
            last: 0,
        };
        assert_eq!(unknown.check(), None);
    }

    #[test]
    fn candidates_follow_proc_self_cgroup() {
        let root = Path::new("/cg");
        let v1 = "4:memory:/docker/abc\n1:cpu:/\n0::/\n";
        assert_eq!(
            candidates(v1, root),
            [
                "/cg/memory/docker/abc/memory.oom_control",
                "/cg/memory/memory.oom_control",
                "/cg/memory.events",
                "/cg/memory.events",
            ]
            .map(PathBuf::from)
        );
        assert_eq!(
            candidates("0::/sandbox\n", root),
            ["/cg/sandbox/memory.events", "/cg/memory.events"].map(PathBuf::from)
        );
    }
}
