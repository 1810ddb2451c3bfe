//! Per-process readings: the driver and each exec, with every process of its session.
//!
//! The driver and every exec are session leaders (`setsid` in the child), so what they start
//! stays in their session unless it calls `setsid` itself. One pass over `/proc` reads each
//! process's `/proc/PID/stat` (a kernel-generated file of a process of the sandbox: opened
//! non-blocking, read once, never followed anywhere) and adds its resident set and CPU time to
//! the leader whose session it is in.
//!
//! `/proc` is opened once, when the supervisor starts ([`ProcDir::open`]), and every pass
//! walks that descriptor, never the path: a tenant allowed to mount (root in a microVM) that
//! mounts a filesystem over `/proc`, or over one `/proc/PID`, is never read. Each `PID/stat`
//! is opened with `openat2(RESOLVE_NO_XDEV | RESOLVE_NO_SYMLINKS)`, so a mount inside `/proc`
//! is refused rather than entered; a kernel without `openat2` falls back to `O_NOFOLLOW`.

use std::ffi::CStr;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use driver_protocol::message::{ProcReading, ProcRole};

/// A `/proc/PID/stat` line is far shorter (comm is at most 16 bytes).
const STAT_MAX: usize = 1024;

/// At most this many `/proc` entries are read per reading, so a tenant's fork bomb makes a
/// reading incomplete rather than long.
const SCAN_MAX: usize = 65_536;

/// One session leader to report on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leader {
    /// The driver or an exec.
    pub role: ProcRole,
    /// The exec, for an exec.
    pub exec_id: Option<u64>,
    /// Its pid (and session id).
    pub pid: i32,
}

/// What one `/proc/PID/stat` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stat {
    session: i32,
    /// utime + stime + cutime + cstime, in clock ticks.
    ticks: u64,
    /// Resident pages.
    rss_pages: u64,
}

/// `/proc`, opened once: what every pass walks.
#[derive(Debug)]
pub struct ProcDir(OwnedFd);

impl ProcDir {
    /// Opens `/proc`; `None` where it is not mounted (then no process is read).
    pub fn open() -> Option<Self> {
        // SAFETY: a NUL-terminated literal path; the result is checked and owned below.
        let fd = unsafe {
            libc::open(
                c"/proc".as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        // SAFETY: a fresh descriptor of ours, owned by nothing else.
        (fd >= 0).then(|| ProcDir(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// The names of `/proc`'s entries that are pids, at most `max` entries read.
    fn pids(&self, max: usize) -> Vec<u32> {
        let mut pids = Vec::new();
        // A descriptor of its own for the listing (readdir moves its offset; closedir closes
        // it). SAFETY: `self.0` is an open directory; "." names it.
        let fd = unsafe {
            libc::openat(
                self.0.as_raw_fd(),
                c".".as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return pids;
        }
        // SAFETY: `fd` is ours and open; on success the DIR owns it, on failure we close it.
        let dir = unsafe { libc::fdopendir(fd) };
        if dir.is_null() {
            // SAFETY: `fd` is still ours (fdopendir failed).
            unsafe { libc::close(fd) };
            return pids;
        }
        for _ in 0..max {
            // SAFETY: `dir` is an open DIR used by this thread only.
            let ent = unsafe { libc::readdir(dir) };
            if ent.is_null() {
                break;
            }
            // SAFETY: readdir returned an entry whose d_name is NUL-terminated, valid until
            // the next readdir on `dir`; it is copied out before that.
            let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) };
            if let Some(pid) = std::str::from_utf8(name.to_bytes())
                .ok()
                .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|n| n.parse().ok())
            {
                pids.push(pid);
            }
        }
        // SAFETY: `dir` is open; closedir closes it and its descriptor.
        unsafe { libc::closedir(dir) };
        pids
    }

    /// `PID/stat`, opened beneath this `/proc` without crossing a mount or following a link.
    fn open_stat(&self, pid: u32) -> Option<File> {
        let path = std::ffi::CString::new(format!("{pid}/stat")).ok()?;
        let flags = libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;
        /// `struct open_how` (linux/openat2.h).
        #[repr(C)]
        struct OpenHow {
            flags: u64,
            mode: u64,
            resolve: u64,
        }
        let how = OpenHow {
            flags: u64::try_from(flags).unwrap_or(0),
            mode: 0,
            resolve: libc::RESOLVE_NO_XDEV | libc::RESOLVE_NO_SYMLINKS,
        };
        // SAFETY: openat2 reads `how` (its size passed) and the NUL-terminated `path`; the
        // directory descriptor is open. The result is checked before use.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                self.0.as_raw_fd(),
                path.as_ptr(),
                std::ptr::from_ref(&how),
                std::mem::size_of::<OpenHow>(),
            )
        };
        let fd = if fd < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
            // SAFETY: as above, with plain openat; O_NOFOLLOW refuses a final link.
            libc::c_long::from(unsafe {
                libc::openat(self.0.as_raw_fd(), path.as_ptr(), flags | libc::O_NOFOLLOW)
            })
        } else {
            fd
        };
        let fd = i32::try_from(fd).ok().filter(|&fd| fd >= 0)?;
        // SAFETY: a fresh descriptor of ours, owned by nothing else.
        Some(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
    }
}

impl ProcDir {
    /// The live child processes of `parent` (adopted orphans and zombies not yet reaped
    /// included): the `PID/stat` entries whose parent it is, at most [`SCAN_MAX`] read. This
    /// reads every process's `stat`: only for a PID namespace of our own.
    pub fn children_of(&self, parent: u32) -> u32 {
        let mut buf = [0u8; STAT_MAX];
        let mut n = 0u32;
        for pid in self.pids(SCAN_MAX) {
            let Some(f) = self.open_stat(pid) else {
                continue; // gone meanwhile
            };
            let mut f = f;
            let Some(len) = read_once(&mut f, &mut buf) else {
                continue;
            };
            let stat = buf.get(..len).and_then(|b| std::str::from_utf8(b).ok());
            if stat.and_then(parent_in_stat) == Some(parent) {
                n = n.saturating_add(1);
            }
        }
        n
    }

    /// The resident set of process `pid`, in pages, from its `stat` (`None` if unreadable).
    pub fn rss_pages(&self, pid: u32) -> Option<u64> {
        let mut buf = [0u8; STAT_MAX];
        let stat = self.open_stat(pid).and_then(|f| read_stat(f, &mut buf))?;
        Some(stat.rss_pages)
    }
}

/// The parent pid in a `/proc/PID/stat` line: `pid (comm) state ppid …`, where comm may hold
/// spaces and parentheses.
fn parent_in_stat(stat: &str) -> Option<u32> {
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_ascii_whitespace().nth(1))
        .and_then(|p| p.parse::<u32>().ok())
}

/// Reads `proc` once for `leaders`: one reading per leader still found. `page` is the page
/// size, `tck` the clock ticks per second.
pub fn read(proc: &ProcDir, leaders: &[Leader], page: u64, tck: u64) -> Vec<ProcReading> {
    let mut out: Vec<ProcReading> = Vec::with_capacity(leaders.len());
    let mut found = vec![false; leaders.len()];
    let mut acc = vec![(0u32, 0u64, 0u64); leaders.len()];
    if leaders.is_empty() {
        return out;
    }
    let mut buf = [0u8; STAT_MAX];
    for pid in proc.pids(SCAN_MAX) {
        let Some(stat) = proc.open_stat(pid).and_then(|f| read_stat(f, &mut buf)) else {
            continue; // gone meanwhile, or not this /proc's
        };
        let Some(i) = leaders.iter().position(|l| l.pid == stat.session) else {
            continue;
        };
        if let (Some(a), Some(f)) = (acc.get_mut(i), found.get_mut(i)) {
            a.0 = a.0.saturating_add(1);
            a.1 = a.1.saturating_add(stat.rss_pages);
            a.2 = a.2.saturating_add(stat.ticks);
            // The leader itself must be among them: a session whose leader is gone is not
            // the exec's any more (its pid may be reused).
            *f |= i32::try_from(pid).ok() == Some(stat.session);
        }
    }
    for ((l, (pids, pages, ticks)), f) in leaders.iter().zip(acc).zip(found) {
        if !f {
            continue;
        }
        out.push(ProcReading {
            role: l.role,
            exec_id: l.exec_id,
            pid: l.pid.unsigned_abs(),
            pids,
            rss_bytes: pages.saturating_mul(page),
            cpu_us: ticks.saturating_mul(1_000_000) / tck.max(1),
        });
    }
    out
}

fn read_stat(mut f: File, buf: &mut [u8; STAT_MAX]) -> Option<Stat> {
    let n = read_once(&mut f, buf)?;
    parse_stat(std::str::from_utf8(buf.get(..n)?).ok()?)
}

fn read_once(f: &mut File, buf: &mut [u8]) -> Option<usize> {
    f.read(buf).ok()
}

/// `pid (comm) state ppid pgrp session … utime stime cutime cstime … rss …`, where comm may
/// hold spaces and parentheses: the fields are counted after the last `)`.
fn parse_stat(stat: &str) -> Option<Stat> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut f = rest.split_ascii_whitespace();
    // After ')': state(0) ppid(1) pgrp(2) session(3) … utime(11) stime(12) cutime(13)
    // cstime(14) … rss(21).
    let session = f.nth(3)?.parse().ok()?;
    let utime: u64 = f.nth(7)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    // cutime and cstime are signed in the kernel's format, never negative in practice.
    let cutime: u64 = f.next()?.parse().unwrap_or(0);
    let cstime: u64 = f.next()?.parse().unwrap_or(0);
    let rss_pages: i64 = f.nth(6)?.parse().ok()?;
    Some(Stat {
        session,
        ticks: utime
            .saturating_add(stime)
            .saturating_add(cutime)
            .saturating_add(cstime),
        rss_pages: rss_pages.max(0).unsigned_abs(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parent_is_read_past_a_hostile_comm() {
        assert_eq!(parent_in_stat("42 (a) b) c) S 7 42 42 0"), Some(7));
        assert_eq!(parent_in_stat("42 (sh) R 1 1 1"), Some(1));
        assert_eq!(parent_in_stat("garbage"), None);
    }

    #[test]
    fn a_child_is_counted_and_the_rss_is_read() {
        let proc = ProcDir::open().expect("/proc");
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .expect("sleep");
        let n = proc.children_of(std::process::id());
        let _ = child.kill();
        let _ = child.wait();
        assert!(n >= 1, "{n}");
        assert!(proc.rss_pages(std::process::id()).is_some_and(|p| p > 0));
    }

    #[test]
    fn stat_lines_parse_past_a_hostile_comm() {
        let line = "311 (a) b) 1 2 3) S 1 311 311 0 -1 4194560 120 0 0 0 250 50 7 3 20 0 1 0 \
                    12345 10485760 2560 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                session: 311,
                ticks: 310,
                rss_pages: 2560
            })
        );
        assert_eq!(parse_stat("311 (x) S 1 311"), None);
        assert_eq!(parse_stat(""), None);
    }

    #[test]
    fn a_session_is_read_from_proc() {
        // A child in a session of its own, with a grandchild in it.
        let mut child = std::process::Command::new("setsid")
            .args(["sh", "-c", "sleep 5 & exec sleep 5"])
            .spawn()
            .expect("setsid");
        let pid = i32::try_from(child.id()).unwrap();
        let leader = Leader {
            role: ProcRole::Exec,
            exec_id: Some(4),
            pid,
        };
        let proc = ProcDir::open().expect("/proc");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut got = Vec::new();
        while std::time::Instant::now() < deadline {
            got = read(&proc, &[leader], 4096, 100);
            if got.first().is_some_and(|r| r.pids == 2) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // SAFETY: kill(2) with a negative pid signals our own child's group; no memory.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
        let _ = child.kill();
        let _ = child.wait();
        let r = got.first().expect("a reading");
        assert_eq!(
            (r.role, r.exec_id, r.pid, r.pids),
            (ProcRole::Exec, Some(4), child.id(), 2)
        );
        assert!(r.rss_bytes > 0);
        // Gone: no reading, nothing guessed.
        let gone = Leader {
            pid: 0x3fff_fff0,
            ..leader
        };
        assert!(read(&proc, &[gone], 4096, 100).is_empty());
    }
}
