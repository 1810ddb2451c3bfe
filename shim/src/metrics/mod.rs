//! Resource readings for `metrics` and the periodic `metrics` event: the sandbox's cgroup
//! ([`cgroup`]), its workspace filesystem, and the driver's and each exec's processes
//! ([`procs`]).
//!
//! Everything that names a path is resolved once, when the supervisor starts and before any
//! child of ours runs: the cgroup files are opened then, and so is the workspace directory
//! (`O_PATH`), whose filesystem each reading asks with `fstatfs` on that descriptor, and so is
//! `/proc`, which each reading walks from its descriptor. A tenant that later mounts something
//! over the workspace, the cgroup tree or `/proc` (a FUSE filesystem that never answers) is
//! never asked. Nothing is read unless a reading is asked for: by a
//! `metrics` request or by `--metrics-interval`.

pub mod cgroup;
pub mod procs;

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use driver_protocol::message::{FsReading, Reading};
use tracing::debug;

use self::cgroup::Cgroup;
use self::procs::Leader;

/// Where cgroup filesystems are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// What a reading is taken from, opened once.
#[derive(Debug)]
pub struct Sampler {
    cgroup: Option<Cgroup>,
    workspace: Option<File>,
    /// `/proc`, opened before any child runs.
    proc: Option<procs::ProcDir>,
    /// Where cgroup files are read into.
    buf: Vec<u8>,
    page: u64,
    tck: u64,
}

impl Sampler {
    /// Finds and opens the cgroup `proc_cgroup` names (the sandbox's: `/proc/self/cgroup`'s
    /// contents) and the workspace directory `workdir` (the driver's working directory:
    /// `--workdir`, or the shim's own).
    pub fn open(workdir: &Path, proc_cgroup: &str) -> Self {
        let cgroup = Cgroup::open(Path::new(CGROUP_ROOT), proc_cgroup);
        let workspace = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(workdir)
            .ok();
        debug!(
            cgroup = cgroup.is_some(),
            workspace = workspace.is_some(),
            "metrics sources"
        );
        Sampler {
            cgroup,
            workspace,
            proc: procs::ProcDir::open(),
            buf: Vec::new(),
            page: u64::try_from(crate::sys::proc::page_size()).unwrap_or(4096),
            tck: clock_ticks(),
        }
    }

    /// The live children of `parent`, read from the `/proc` opened at start (`None` where it
    /// was not mounted then). For `status`.
    pub fn children_of(&self, parent: u32) -> Option<u32> {
        self.proc.as_ref().map(|p| p.children_of(parent))
    }

    /// The shim's own resident set in bytes, read from the `/proc` opened at start (`0` if
    /// unreadable). For `status`.
    pub fn own_rss_bytes(&self) -> u64 {
        self.proc
            .as_ref()
            .and_then(|p| p.rss_pages(std::process::id()))
            .map_or(0, |pages| pages.saturating_mul(self.page))
    }

    /// Takes a reading now, of the sandbox and of `leaders`.
    pub fn read(&mut self, leaders: &[Leader]) -> Reading {
        Reading {
            time_ms: now_ms(),
            cgroup: self
                .cgroup
                .as_ref()
                .map(|c| Box::new(c.read(&mut self.buf))),
            workspace: self.workspace.as_ref().and_then(fs_reading),
            procs: self
                .proc
                .as_ref()
                .map(|p| procs::read(p, leaders, self.page, self.tck))
                .unwrap_or_default(),
        }
    }
}

/// `fstatfs` of the workspace.
#[allow(
    clippy::useless_conversion,
    reason = "fsblkcnt_t and fsfilcnt_t are u32 on some 32-bit targets"
)]
fn fs_reading(dir: &File) -> Option<FsReading> {
    let st = nix::sys::statfs::fstatfs(dir).ok()?;
    // `f_frsize` is what `f_blocks` counts in; nix exposes `block_size` (`f_bsize`), equal on
    // every Linux filesystem but a few network ones.
    let unit = u64::try_from(st.block_size()).ok()?;
    let blocks = u64::from(st.blocks());
    let free = u64::from(st.blocks_free());
    let avail = u64::from(st.blocks_available());
    let files = u64::from(st.files());
    let ffree = u64::from(st.files_free());
    Some(FsReading {
        size_bytes: blocks.saturating_mul(unit),
        used_bytes: blocks.saturating_sub(free).saturating_mul(unit),
        avail_bytes: avail.saturating_mul(unit),
        inodes: files,
        inodes_used: files.saturating_sub(ffree),
    })
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`; 100 if it cannot tell).
fn clock_ticks() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|n| u64::try_from(n).ok())
        .filter(|&n| n > 0)
        .unwrap_or(100)
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workspace_and_the_time_are_read() {
        let mut s = Sampler::open(&std::env::temp_dir(), "");
        let r = s.read(&[]);
        let ws = r.workspace.expect("statfs of the temp dir");
        assert!(ws.size_bytes > 0 && ws.used_bytes <= ws.size_bytes);
        assert!(r.time_ms > 1_700_000_000_000);
        assert!(r.procs.is_empty());
        let none = Sampler::open(Path::new("/nonexistent/agent-shim"), "").read(&[]);
        assert_eq!(none.workspace, None);
    }
}
