//! Processes seen from outside: pidfds, `/proc`, and the marker that finds every process a
//! test started.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::PATIENCE;

/// A process handle that cannot be confused with a later process that reuses the pid.
#[derive(Debug)]
pub struct PidFd {
    fd: OwnedFd,
    pid: libc::pid_t,
}

impl PidFd {
    /// Opens a pidfd for `pid`. Race-free only for a process that cannot have been reaped
    /// yet (our own unreaped child, or a child of such a process that we then check).
    pub fn open(pid: libc::pid_t) -> Result<Self> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context(format!("pidfd_open({pid})"));
        }
        // SAFETY: the kernel just returned this descriptor to us; we are its only owner.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        Ok(PidFd { fd, pid })
    }

    /// The pid in our (the host's) PID namespace.
    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// Sends `sig`; `Ok(false)` if the process has already exited.
    pub fn signal(&self, sig: libc::c_int) -> Result<bool> {
        // SAFETY: a valid pidfd, a signal number, a null siginfo (the kernel fills in
        // SI_USER with our pid and uid) and no flags.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc == 0 {
            return Ok(true);
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ESRCH) {
            return Ok(false);
        }
        Err(err).context(format!("pidfd_send_signal({}, {sig})", self.pid))
    }

    /// Whether the process is still running (not exited; a zombie counts as exited).
    pub fn alive(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        n == 0
    }

    pub(super) fn try_clone(&self) -> Result<Self> {
        Ok(PidFd {
            fd: self.fd.try_clone()?,
            pid: self.pid,
        })
    }
}

/// The environment variable that tags every process a [`Running`] starts, so that none
/// escapes the cleanup (the shim passes the environment through to all descendants).
pub const MARKER_VAR: &str = "SHIM_E2E_RUN_ID";

pub(super) fn new_marker() -> String {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}-{n}", std::process::id())
}

/// Whether `/proc/PID/environ` holds `MARKER_VAR=marker`.
fn has_marker(pid: libc::pid_t, entry: &[u8]) -> bool {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|env| env.split(|b| *b == 0).any(|var| var == entry))
        .unwrap_or(false)
}

/// SIGKILLs every live process tagged with `marker`, until none is left or a deadline
/// passes. Each is checked again after its pidfd is opened, so a recycled pid is never hit.
pub fn kill_marked(marker: &str) -> usize {
    let entry = format!("{MARKER_VAR}={marker}").into_bytes();
    let mut killed = 0;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let mut found = 0;
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return killed;
        };
        for pid in dir
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<libc::pid_t>().ok())
        {
            if !has_marker(pid, &entry) {
                continue;
            }
            let Ok(fd) = PidFd::open(pid) else { continue };
            if has_marker(pid, &entry) && fd.signal(libc::SIGKILL).unwrap_or(false) {
                found += 1;
            }
        }
        killed += found;
        if found == 0 || Instant::now() > deadline {
            return killed;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The children of `pid` (all its threads'), from `/proc`.
pub fn children_of(pid: libc::pid_t) -> Vec<libc::pid_t> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        out.extend(
            children
                .split_whitespace()
                .filter_map(|p| p.parse::<libc::pid_t>().ok()),
        );
    }
    out
}

/// The parent of `pid`, from `/proc/PID/stat`.
pub fn parent_of(pid: libc::pid_t) -> Option<libc::pid_t> {
    proc_stat_fields(pid).and_then(|f| f.get(1).and_then(|p| p.parse().ok()))
}

/// The state letter of `pid` (`R`, `S`, `Z`, ...), or `None` if it is gone.
pub fn state_of(pid: libc::pid_t) -> Option<char> {
    proc_stat_fields(pid).and_then(|f| f.first().and_then(|s| s.chars().next()))
}

/// The fields of `/proc/PID/stat` after `(comm)`: state, ppid, pgrp, ...
fn proc_stat_fields(pid: libc::pid_t) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    Some(after.split_whitespace().map(str::to_owned).collect())
}
