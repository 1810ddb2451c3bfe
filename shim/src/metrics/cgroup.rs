//! The sandbox cgroup's files: found once, opened once, read with `pread` per reading.
//!
//! The sandbox's cgroup is the shim's own, found from `/proc/self/cgroup` below
//! `/sys/fs/cgroup` when the shim starts, before any child of ours runs. Under a private
//! cgroup namespace, or when the runtime mounts the container's own cgroup at the root (Docker
//! on cgroup v1), the path in `/proc/self/cgroup` does not exist below the mount and the
//! mount's root is the sandbox's cgroup.
//!
//! **Trust.** The files are opened once, at start, as the per-exec cgroups' are (through a
//! [`Dir`]: beneath the directory, no mount crossed, no link followed, non-blocking, a regular
//! file only), and kept only if `fstatfs` says they are on a cgroup filesystem: a later reading never resolves a path, so nothing the
//! tenant mounts or creates afterwards (a FIFO, a FUSE file) is ever opened by PID 1, and a
//! read of a kernel-generated cgroup file does not block. Each reading is one `pread` per
//! file into one reused buffer, parsed without allocating.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use driver_protocol::message::CgroupReading;

use crate::sys::dir::Dir;

/// `statfs` `f_type` of cgroup v1.
const CGROUP_SUPER_MAGIC: i64 = 0x0027_e0eb;
/// `statfs` `f_type` of cgroup v2.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// A limit at or above this is "no limit" (v1 writes `PAGE_COUNTER_MAX` pages, about 2^63).
const UNLIMITED: u64 = 1 << 62;

/// Largest file read (`io.stat` and `blkio` grow with the number of devices).
const READ_MAX: usize = 16 * 1024;

/// One file the reading is made of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Key {
    MemCurrent,
    MemMax,
    MemPeak,
    MemStat,
    SwapCurrent,
    SwapMax,
    MemEvents,
    CpuStat,
    CpuMax,
    PidsCurrent,
    PidsMax,
    IoStat,
    V1MemUsage,
    V1MemLimit,
    V1MemMaxUsage,
    V1MemStat,
    V1MemswUsage,
    V1MemswLimit,
    V1OomControl,
    V1CpuacctUsage,
    V1CpuStat,
    V1CfsQuota,
    V1CfsPeriod,
    V1Blkio,
}

/// cgroup v2: the files of the sandbox's directory.
const V2_FILES: &[(Key, &str)] = &[
    (Key::MemCurrent, "memory.current"),
    (Key::MemMax, "memory.max"),
    (Key::MemPeak, "memory.peak"),
    (Key::MemStat, "memory.stat"),
    (Key::SwapCurrent, "memory.swap.current"),
    (Key::SwapMax, "memory.swap.max"),
    (Key::MemEvents, "memory.events"),
    (Key::CpuStat, "cpu.stat"),
    (Key::CpuMax, "cpu.max"),
    (Key::PidsCurrent, "pids.current"),
    (Key::PidsMax, "pids.max"),
    (Key::IoStat, "io.stat"),
];

/// cgroup v1: the controller and file of each figure.
const V1_FILES: &[(Key, &str, &str)] = &[
    (Key::V1MemUsage, "memory", "memory.usage_in_bytes"),
    (Key::V1MemLimit, "memory", "memory.limit_in_bytes"),
    (Key::V1MemMaxUsage, "memory", "memory.max_usage_in_bytes"),
    (Key::V1MemStat, "memory", "memory.stat"),
    (Key::V1MemswUsage, "memory", "memory.memsw.usage_in_bytes"),
    (Key::V1MemswLimit, "memory", "memory.memsw.limit_in_bytes"),
    (Key::V1OomControl, "memory", "memory.oom_control"),
    (Key::V1CpuacctUsage, "cpuacct", "cpuacct.usage"),
    (Key::V1CpuStat, "cpu", "cpu.stat"),
    (Key::V1CfsQuota, "cpu", "cpu.cfs_quota_us"),
    (Key::V1CfsPeriod, "cpu", "cpu.cfs_period_us"),
    (Key::PidsCurrent, "pids", "pids.current"),
    (Key::PidsMax, "pids", "pids.max"),
    (Key::V1Blkio, "blkio", "blkio.throttle.io_service_bytes"),
];

/// The sandbox cgroup's open files.
#[derive(Debug)]
pub struct Cgroup {
    version: u8,
    files: Vec<(Key, File)>,
}

impl Cgroup {
    /// Finds the shim's own cgroup below `root` (normally `/sys/fs/cgroup`) from
    /// `proc_cgroup` (the text of `/proc/self/cgroup`) and opens its files; `None` when no
    /// file could be opened.
    pub fn open(root: &Path, proc_cgroup: &str) -> Option<Cgroup> {
        let v2 = on_cgroupfs(root) == Some(2);
        let mut files = Vec::new();
        if v2 {
            let rel = proc_cgroup
                .lines()
                .find_map(|l| l.strip_prefix("0::"))
                .unwrap_or("/");
            let dir = pick_dir(&[root.join(rel.trim_start_matches('/')), root.to_owned()]);
            let dir = Dir::open(&dir).ok();
            for &(key, name) in V2_FILES {
                if let Some(f) = dir.as_ref().and_then(|d| open_cgroup_file(d, name)) {
                    files.push((key, f));
                }
            }
        } else {
            for &(key, controller, name) in V1_FILES {
                let dir = v1_dir(root, proc_cgroup, controller).and_then(|d| Dir::open(&d).ok());
                if let Some(f) = dir.and_then(|d| open_cgroup_file(&d, name)) {
                    files.push((key, f));
                }
            }
        }
        (!files.is_empty()).then_some(Cgroup {
            version: if v2 { 2 } else { 1 },
            files,
        })
    }

    /// Reads every file into a new reading; `buf` is reused between readings.
    pub fn read(&self, buf: &mut Vec<u8>) -> CgroupReading {
        let mut r = CgroupReading {
            version: self.version,
            ..CgroupReading::default()
        };
        let mut memsw = None;
        buf.resize(READ_MAX, 0);
        for (key, file) in &self.files {
            let Ok(n) = file.read_at(buf, 0) else {
                continue;
            };
            let Some(text) = buf.get(..n).and_then(|b| std::str::from_utf8(b).ok()) else {
                continue;
            };
            apply(&mut r, *key, text, &mut memsw);
        }
        if let (Some(total), Some(mem)) = (memsw, r.memory_bytes) {
            r.swap_bytes = Some(u64::saturating_sub(total, mem));
        }
        r
    }
}

/// Puts what `text` (the content of `key`'s file) says into `r`. `memsw` keeps the v1
/// memory+swap usage, turned into swap once the memory usage is known too.
fn apply(r: &mut CgroupReading, key: Key, text: &str, memsw: &mut Option<u64>) {
    match key {
        Key::MemCurrent | Key::V1MemUsage => r.memory_bytes = number(text),
        Key::MemMax | Key::V1MemLimit => r.memory_limit_bytes = limit(text),
        Key::MemPeak | Key::V1MemMaxUsage => r.memory_peak_bytes = number(text),
        Key::MemStat => {
            r.memory_anon_bytes = field(text, "anon");
            r.memory_file_bytes = field(text, "file");
        }
        Key::V1MemStat => {
            r.memory_anon_bytes = field(text, "total_rss");
            r.memory_file_bytes = field(text, "total_cache");
        }
        Key::SwapCurrent => r.swap_bytes = number(text),
        Key::SwapMax | Key::V1MemswLimit => r.swap_limit_bytes = limit(text),
        Key::V1MemswUsage => *memsw = number(text),
        Key::MemEvents => {
            r.oom = field(text, "oom");
            r.oom_kills = field(text, "oom_kill");
        }
        Key::V1OomControl => r.oom_kills = field(text, "oom_kill"),
        Key::CpuStat => {
            r.cpu_usage_us = field(text, "usage_usec");
            r.cpu_periods = field(text, "nr_periods");
            r.cpu_throttled_periods = field(text, "nr_throttled");
            r.cpu_throttled_us = field(text, "throttled_usec");
        }
        Key::V1CpuStat => {
            r.cpu_periods = field(text, "nr_periods");
            r.cpu_throttled_periods = field(text, "nr_throttled");
            r.cpu_throttled_us = field(text, "throttled_time").map(|ns| ns / 1000);
        }
        Key::V1CpuacctUsage => r.cpu_usage_us = number(text).map(|ns| ns / 1000),
        Key::CpuMax => {
            let mut it = text.split_ascii_whitespace();
            r.cpu_quota_us = it.next().and_then(|q| q.parse().ok());
            r.cpu_period_us = it.next().and_then(|p| p.parse().ok());
        }
        // -1: no quota.
        Key::V1CfsQuota => r.cpu_quota_us = number(text),
        Key::V1CfsPeriod => r.cpu_period_us = number(text),
        Key::PidsCurrent => r.pids = number(text),
        Key::PidsMax => r.pids_limit = limit(text),
        Key::IoStat => (r.io_read_bytes, r.io_write_bytes) = io_stat(text),
        Key::V1Blkio => (r.io_read_bytes, r.io_write_bytes) = blkio(text),
    }
}

/// A file holding one number.
fn number(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// A limit: a number, or `max` / a huge number for none.
fn limit(text: &str) -> Option<u64> {
    number(text).filter(|&n| n < UNLIMITED)
}

/// The value of the `name value` line of a flat-keyed file.
fn field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == name).then(|| v.trim().parse().ok()).flatten()
    })
}

/// v2 `io.stat`: `MAJ:MIN rbytes=N wbytes=N rios=N …` per device, summed.
fn io_stat(text: &str) -> (Option<u64>, Option<u64>) {
    let (mut rd, mut wr) = (None::<u64>, None::<u64>);
    for word in text.split_ascii_whitespace() {
        let Some((k, v)) = word.split_once('=') else {
            continue;
        };
        let Ok(v) = v.parse::<u64>() else { continue };
        match k {
            "rbytes" => rd = Some(rd.unwrap_or(0).saturating_add(v)),
            "wbytes" => wr = Some(wr.unwrap_or(0).saturating_add(v)),
            _ => {}
        }
    }
    // A cgroup that has done no I/O has an empty io.stat: zero, not unknown.
    (rd.or(Some(0)), wr.or(Some(0)))
}

/// v1 `blkio.throttle.io_service_bytes`: `MAJ:MIN Read N`, `… Write N` per device, then
/// `Total N`; summed over devices.
fn blkio(text: &str) -> (Option<u64>, Option<u64>) {
    let (mut rd, mut wr) = (0u64, 0u64);
    for line in text.lines() {
        let mut it = line.split_ascii_whitespace();
        let (Some(_dev), Some(op), Some(n)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        match op {
            "Read" => rd = rd.saturating_add(n),
            "Write" => wr = wr.saturating_add(n),
            _ => {}
        }
    }
    // The file of a cgroup without I/O holds only `Total 0`: zero, not unknown.
    (Some(rd), Some(wr))
}

/// The v1 directory of `controller` for this process.
fn v1_dir(root: &Path, proc_cgroup: &str, controller: &str) -> Option<PathBuf> {
    proc_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if !controllers.split(',').any(|c| c == controller) {
            return None;
        }
        let rel = path.trim_start_matches('/');
        let base = root.join(controller);
        Some(pick_dir(&[base.join(rel), base]))
    })
}

/// The first of `dirs` that exists (the last one otherwise).
fn pick_dir(dirs: &[PathBuf]) -> PathBuf {
    dirs.iter()
        .find(|d| d.is_dir())
        .or(dirs.last())
        .cloned()
        .unwrap_or_default()
}

/// 1 or 2 when `path` is on a cgroup filesystem of that version.
fn on_cgroupfs(path: &Path) -> Option<u8> {
    let st = nix::sys::statfs::statfs(path).ok()?;
    version_of(st.filesystem_type().0 as i64)
}

fn version_of(magic: i64) -> Option<u8> {
    match magic {
        CGROUP_SUPER_MAGIC => Some(1),
        CGROUP2_SUPER_MAGIC => Some(2),
        _ => None,
    }
}

/// Opens `name` in `dir` read-only and non-blocking, a regular file beneath it; only a file
/// on a cgroup filesystem is kept.
fn open_cgroup_file(dir: &Dir, name: &str) -> Option<File> {
    let f = dir.file(name, false).ok()?;
    let st = nix::sys::statfs::fstatfs(&f).ok()?;
    version_of(st.filesystem_type().0 as i64)?;
    Some(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses every recorded file of `dir` (a fixture folder) as `files` names them.
    fn parse_fixture(version: u8, dir: &str, files: &[(Key, &str)]) -> CgroupReading {
        let base = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/metrics/fixtures")
            .join(dir);
        let mut r = CgroupReading {
            version,
            ..CgroupReading::default()
        };
        let mut memsw = None;
        for &(key, name) in files {
            let text = std::fs::read_to_string(base.join(name))
                .unwrap_or_else(|e| panic!("{}: {e}", base.join(name).display()));
            apply(&mut r, key, &text, &mut memsw);
        }
        if let (Some(total), Some(mem)) = (memsw, r.memory_bytes) {
            r.swap_bytes = Some(total.saturating_sub(mem));
        }
        r
    }

    #[test]
    fn recorded_v2_files_parse() {
        let r = parse_fixture(2, "v2", V2_FILES);
        assert_eq!(
            r,
            CgroupReading {
                version: 2,
                memory_bytes: Some(56_733_696),
                memory_limit_bytes: Some(536_870_912),
                memory_peak_bytes: Some(110_366_720),
                memory_anon_bytes: Some(44_335_104),
                memory_file_bytes: Some(10_080_256),
                swap_bytes: Some(0),
                swap_limit_bytes: None,
                oom: Some(2),
                oom_kills: Some(1),
                cpu_usage_us: Some(4_312_876),
                cpu_periods: Some(331),
                cpu_throttled_periods: Some(17),
                cpu_throttled_us: Some(812_334),
                cpu_quota_us: Some(150_000),
                cpu_period_us: Some(100_000),
                pids: Some(7),
                pids_limit: Some(256),
                io_read_bytes: Some(23_068_672 + 4_096),
                io_write_bytes: Some(8_392_704),
            }
        );
    }

    /// Recorded by `vm::resources` (`AGENT_SHIM_VM_RECORD`) from the sandbox cgroup the shim
    /// makes as a microVM's init (Debian's kernel 6.1), after an exec was OOM-killed under
    /// its own limit, a fork bomb was contained and a 2 MiB disk was read: no limits set.
    #[test]
    fn v2_files_recorded_in_a_microvm_parse() {
        let r = parse_fixture(2, "v2-vm", V2_FILES);
        assert_eq!(
            r,
            CgroupReading {
                version: 2,
                memory_bytes: Some(1_372_160),
                memory_limit_bytes: None,
                memory_peak_bytes: Some(34_336_768),
                memory_anon_bytes: Some(495_616),
                memory_file_bytes: Some(0),
                swap_bytes: Some(0),
                swap_limit_bytes: None,
                oom: Some(1),
                oom_kills: Some(1),
                cpu_usage_us: Some(5_606_616),
                cpu_periods: Some(0),
                cpu_throttled_periods: Some(0),
                cpu_throttled_us: Some(0),
                cpu_quota_us: None,
                cpu_period_us: Some(100_000),
                pids: Some(6),
                pids_limit: None,
                io_read_bytes: Some(2_097_152),
                io_write_bytes: Some(0),
            }
        );
    }

    #[test]
    fn recorded_v2_files_without_limits_parse() {
        let files: &[(Key, &str)] = &[
            (Key::MemMax, "memory.max.unlimited"),
            (Key::CpuMax, "cpu.max.unlimited"),
            (Key::PidsMax, "pids.max.unlimited"),
            (Key::IoStat, "io.stat.empty"),
        ];
        let r = parse_fixture(2, "v2", files);
        assert_eq!(r.memory_limit_bytes, None);
        assert_eq!((r.cpu_quota_us, r.cpu_period_us), (None, Some(100_000)));
        assert_eq!(r.pids_limit, None);
        assert_eq!((r.io_read_bytes, r.io_write_bytes), (Some(0), Some(0)));
    }

    #[test]
    fn recorded_v1_files_parse() {
        let files: Vec<(Key, &str)> = V1_FILES.iter().map(|&(k, _, f)| (k, f)).collect();
        let r = parse_fixture(1, "v1", &files);
        assert_eq!(
            r,
            CgroupReading {
                version: 1,
                memory_bytes: Some(57_344_000),
                memory_limit_bytes: Some(268_435_456),
                memory_peak_bytes: Some(268_435_456),
                memory_anon_bytes: Some(45_142_016),
                memory_file_bytes: Some(9_732_096),
                swap_bytes: Some(1_048_576),
                swap_limit_bytes: Some(536_870_912),
                oom: None,
                oom_kills: Some(3),
                cpu_usage_us: Some(9_876_543),
                cpu_periods: Some(1_204),
                cpu_throttled_periods: Some(88),
                cpu_throttled_us: Some(2_345_678),
                cpu_quota_us: Some(50_000),
                cpu_period_us: Some(100_000),
                pids: Some(12),
                pids_limit: Some(128),
                io_read_bytes: Some(12_288 + 4_096),
                io_write_bytes: Some(40_960),
            }
        );
    }

    #[test]
    fn v1_unlimited_values_are_no_limit() {
        let mut r = CgroupReading::default();
        let mut memsw = None;
        apply(&mut r, Key::V1MemLimit, "9223372036854771712\n", &mut memsw);
        apply(&mut r, Key::V1CfsQuota, "-1\n", &mut memsw);
        apply(&mut r, Key::PidsMax, "max\n", &mut memsw);
        apply(&mut r, Key::V1Blkio, "Total 0\n", &mut memsw);
        assert_eq!(r.memory_limit_bytes, None);
        assert_eq!(r.cpu_quota_us, None);
        assert_eq!(r.pids_limit, None);
        assert_eq!((r.io_read_bytes, r.io_write_bytes), (Some(0), Some(0)));
    }

    #[test]
    fn garbage_is_unknown_never_a_guess() {
        let mut r = CgroupReading::default();
        let mut memsw = None;
        for key in [Key::MemCurrent, Key::MemMax, Key::MemEvents, Key::CpuStat] {
            apply(
                &mut r,
                key,
                "\u{0}oom_kill x\nusage_usec -3\n12a\n",
                &mut memsw,
            );
        }
        apply(&mut r, Key::CpuMax, "", &mut memsw);
        assert_eq!(r, CgroupReading::default());
    }

    #[test]
    fn v1_directories_follow_proc_self_cgroup() {
        let root = std::env::temp_dir().join(format!("agent-shim-cg-{}", std::process::id()));
        std::fs::create_dir_all(root.join("memory/docker/abc")).unwrap();
        std::fs::create_dir_all(root.join("cpu")).unwrap();
        let pc = "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n";
        assert_eq!(
            v1_dir(&root, pc, "memory"),
            Some(root.join("memory/docker/abc"))
        );
        // Not below the mount (Docker mounts the container's own cgroup at the root).
        assert_eq!(v1_dir(&root, pc, "cpu"), Some(root.join("cpu")));
        assert_eq!(v1_dir(&root, pc, "pids"), None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn files_not_on_a_cgroup_filesystem_are_not_opened() {
        let dir = std::env::temp_dir().join(format!("agent-shim-fake-cg-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("memory")).unwrap();
        std::fs::write(dir.join("memory/memory.usage_in_bytes"), "1\n").unwrap();
        let d = Dir::open(&dir).unwrap();
        assert!(open_cgroup_file(&d, "memory/memory.usage_in_bytes").is_none());
        assert!(Cgroup::open(&dir, "4:memory:/\n").is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
