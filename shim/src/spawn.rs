//! Starting a child: `fork` + `execve`, with everything prepared before the `fork`.
//!
//! Between `fork` and `execve` the child may only make async-signal-safe calls: no allocation
//! (another thread of the parent may have held the allocator's lock at the `fork`), no
//! logging, no panicking. So [`Prepared::new`] resolves the program in `PATH` and builds
//! every C string and pointer array in the parent, and the child half of [`start`] is a
//! straight line of raw syscalls:
//!
//! 1. `setpgid(0, 0)` (or `setsid()`), so signals can address the child's whole group;
//! 2. `tcsetpgrp(0, getpid())` when stdin is a terminal whose foreground group is the shim's,
//!    handing the terminal to the child (every signal is still blocked here, so the SIGTTOU
//!    this raises cannot stop it);
//! 3. `dup2` every fd of [`Spec::fds`] to its number in the child;
//! 4. close every other fd above them if [`Spec::close_other_fds`] (`close_range`, or a
//!    `close` loop where the kernel or a seccomp filter refuses it);
//! 5. make the terminal on fd 0 the controlling terminal if [`Spec::ctty`] (a PTY exec); apply
//!    [`Spec::limits`]: rlimits (`prlimit64`), the umask, `no_new_privs`, and the
//!    `oom_score_adj` (an `open`/`write` of `/proc/self/oom_score_adj`, still with the shim's
//!    credentials, so that with `CAP_SYS_RESOURCE` it also sets the floor the tenant cannot go
//!    below; a failure is tolerated, see [`crate::oom`]);
//! 6. drop to [`Spec::user`] if asked: `setgroups(0)`, `setgid`, `setuid`, in that order;
//! 7. `chdir` if asked (after 6, so the directory is entered with the child's credentials);
//! 8. reset to SIG_DFL the dispositions the shim changed (Rust ignores SIGPIPE);
//! 9. restore the signal mask the shim started with;
//! 10. `execve`.
//!
//! A failure in the child is written as `(step, errno)` to a `CLOEXEC` pipe and the child
//! `_exit(127)`s; a successful `execve` closes the pipe, so the parent reads EOF. The parent
//! turns an errno into [`SpawnError::NotFound`] (exit 127) or [`SpawnError::NotExecutable`]
//! (126), like a shell.
//!
//! **Fork now, learn the outcome later.** Between the credential drop and `execve` the child
//! runs as the tenant's uid, which may `SIGSTOP` it there for good; `chdir` and `execve` on a
//! slow file system also take their time. So the parent never waits on the report pipe:
//! [`start`] forks and returns a [`Pending`] (the pid and the pipe's non-blocking read end),
//! the caller registers the pid with the reaper at once and calls [`Pending::poll`] when the
//! pipe is readable (or the child was reaped); past its deadline it [`Pending::kill`]s the
//! child (SIGKILL works on a stopped process) and fails the launch with
//! [`SpawnError::Timeout`]. Plain init mode, which has nothing else to do meanwhile, waits
//! with [`Pending::wait`] (`poll(2)` with the deadline).
//!
//! **Fd mapping without collisions.** A `(source, target)` pair can only clobber another
//! pair's source if that source's number is some pair's target. So [`Prepared::new`] first
//! duplicates every source (`F_DUPFD_CLOEXEC`) to a number above every target; the child's
//! `dup2`s then never overwrite a source, and `dup2` clears `CLOEXEC` on the target. The report
//! pipe's write end is likewise moved above every target, and the close step skips it (it is
//! `CLOEXEC`, so `execve` still closes it).
//!
//! **Reaping.** Nothing here waits for the child: the caller registers [`Pending::pid`] with
//! the [`Reaper`](crate::reaper::Reaper) before its next drain, which collects the child
//! whether it exec'd, failed (it `_exit`ed with 127) or was killed at the deadline.

use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::SigSet;
use thiserror::Error;

use crate::limits::Limits;

/// How the child is placed among process groups and sessions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(dead_code, reason = "NewSession and Inherit are for supervisor mode")]
pub enum Grouping {
    /// A new process group led by the child (`setpgid(0, 0)`), like tini.
    #[default]
    NewGroup,
    /// A new session (`setsid()`): no controlling terminal.
    NewSession,
    /// Stay in the shim's group.
    Inherit,
}

/// What to run and how. Built by the caller, turned into [`Prepared`] before forking.
#[derive(Clone, Debug)]
pub struct Spec {
    /// `argv`; `argv[0]` is the program, resolved in `PATH` unless it contains a `/`.
    pub argv: Vec<OsString>,
    /// The complete environment of the child.
    pub env: Vec<(OsString, OsString)>,
    /// Working directory; `None` keeps the shim's.
    pub cwd: Option<PathBuf>,
    /// Process group / session placement.
    pub grouping: Grouping,
    /// Make the child's group the foreground group of the terminal on stdin, if stdin is one
    /// (only meaningful with [`Grouping::NewGroup`]).
    pub foreground: bool,
    /// The signal mask the child starts with (the shim's original mask).
    pub mask: SigSet,
    /// Signals to reset to SIG_DFL in the child.
    pub reset_signals: Vec<i32>,
    /// Fds the child gets: `(source in the parent, number in the child)`. The sources stay
    /// open in the parent (the caller owns them).
    pub fds: Vec<(RawFd, RawFd)>,
    /// Close every fd above the highest target of [`Spec::fds`] (at least every fd ≥ 3) in
    /// the child, including ones the parent opened without `CLOEXEC`.
    pub close_other_fds: bool,
    /// `(uid, gid)` to run as, with every supplementary group dropped; `None` keeps the
    /// shim's credentials.
    pub user: Option<(u32, u32)>,
    /// Make fd 0 (a terminal) the controlling terminal (`TIOCSCTTY`); only meaningful with
    /// [`Grouping::NewSession`].
    pub ctty: bool,
    /// Resource limits, umask and `no_new_privs` ([`crate::limits`]).
    pub limits: Limits,
    /// How the child enters its cgroup, before anything of it runs ([`crate::cgroups`]).
    pub cgroup_join: CgroupJoin,
}

/// How a child enters its cgroup before anything of it runs ([`crate::cgroups`]). The
/// caller owns the descriptors.
#[derive(Debug, Clone, Default)]
pub struct CgroupJoin {
    /// A cgroup v2 directory to create the child in (`clone3` with `CLONE_INTO_CGROUP`): no
    /// migration, so none of the kernel's global lock, whose first taking waits out an RCU
    /// grace period. Where the kernel refuses `clone3`, the child joins through `files`.
    pub dir: Option<RawFd>,
    /// Join files open for writing: the child writes `0` to each first of all.
    pub files: Vec<RawFd>,
}

impl Spec {
    /// A spec for `argv` with the given environment, in a new group, foreground on a tty,
    /// an empty signal mask and SIGPIPE reset.
    pub fn new(argv: Vec<OsString>, env: Vec<(OsString, OsString)>) -> Self {
        Spec {
            argv,
            env,
            cwd: None,
            grouping: Grouping::NewGroup,
            foreground: true,
            mask: SigSet::empty(),
            reset_signals: crate::signals::CHANGED_DISPOSITIONS.to_vec(),
            fds: Vec::new(),
            close_other_fds: false,
            user: None,
            ctty: false,
            limits: Limits::default(),
            cgroup_join: CgroupJoin::default(),
        }
    }
}

/// Why a child could not be started.
#[derive(Debug, Error)]
pub enum SpawnError {
    /// No argv.
    #[error("no command given")]
    Empty,
    /// The program was not found (ENOENT/ENOTDIR).
    #[error("{}: command not found", .program.to_string_lossy())]
    NotFound {
        /// The program as given.
        program: OsString,
        /// The child's pid, if one was forked (already exited, reaped as an orphan).
        pid: Option<i32>,
    },
    /// The program exists but could not be executed (EACCES, ENOEXEC, …).
    #[error("{}: not executable: {errno}", .program.to_string_lossy())]
    NotExecutable {
        /// The program as given.
        program: OsString,
        /// Why `execve` refused it.
        errno: Errno,
        /// The child's pid (already exited, reaped as an orphan).
        pid: Option<i32>,
    },
    /// An argument, variable or path contains a NUL byte.
    #[error("argument or environment contains a NUL byte")]
    Nul,
    /// `chdir` in the child failed.
    #[error("cannot change directory to {}: {errno}", .dir.display())]
    Chdir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        errno: Errno,
        /// The child's pid (already exited, reaped as an orphan).
        pid: Option<i32>,
    },
    /// Dropping to [`Spec::user`] failed in the child (`setgroups`, `setgid` or `setuid`).
    /// Callers treat it like [`SpawnError::NotExecutable`].
    #[error("cannot run as {uid}:{gid}: {call} failed: {errno}")]
    Credentials {
        /// Which call.
        call: &'static str,
        /// The uid asked for.
        uid: u32,
        /// The gid asked for.
        gid: u32,
        /// Why.
        errno: Errno,
        /// The child's pid (already exited, reaped as an orphan).
        pid: Option<i32>,
    },
    /// Applying [`Spec::limits`] (or the controlling terminal) failed in the child.
    #[error("{call} failed in the child: {errno}")]
    Limits {
        /// Which call.
        call: &'static str,
        /// Why.
        errno: Errno,
        /// The child's pid (already exited, reaped as an orphan).
        pid: Option<i32>,
    },
    /// Setting up the child's fds failed in the child (`dup2`).
    #[error("{call} failed in the child: {errno}")]
    ChildSetup {
        /// Which call.
        call: &'static str,
        /// Why.
        errno: Errno,
        /// The child's pid (already exited, reaped as an orphan).
        pid: Option<i32>,
    },
    /// The child neither exec'd nor reported a failure in time (stopped between `fork` and
    /// `execve`, or stuck in `chdir`/`execve`); it was SIGKILLed.
    #[error("{}: not started within {after:?} (stopped or stuck before execve): killed", .program.to_string_lossy())]
    Timeout {
        /// The program as given.
        program: OsString,
        /// The deadline that passed.
        after: Duration,
        /// The child's pid (killed; the reaper collects it).
        pid: Option<i32>,
    },
    /// A syscall in the parent failed (`pipe`, `fork`, …).
    #[error("{call} failed: {errno}")]
    Os {
        /// Which call.
        call: &'static str,
        /// Why.
        errno: Errno,
    },
}

impl SpawnError {
    /// The pid of a child that was forked but failed before or at `execve` (it has already
    /// `_exit`ed with 127, or was killed after [`SpawnError::Timeout`]; the reaper collects
    /// it), if any.
    #[allow(dead_code, reason = "used by supervisor mode")]
    pub fn pid(&self) -> Option<i32> {
        match self {
            SpawnError::NotFound { pid, .. }
            | SpawnError::NotExecutable { pid, .. }
            | SpawnError::Chdir { pid, .. }
            | SpawnError::Credentials { pid, .. }
            | SpawnError::Limits { pid, .. }
            | SpawnError::ChildSetup { pid, .. }
            | SpawnError::Timeout { pid, .. } => *pid,
            SpawnError::Empty | SpawnError::Nul | SpawnError::Os { .. } => None,
        }
    }
}

/// The steps of the child half that can fail, as reported through the pipe.
const STEP_CHDIR: i32 = 1;
const STEP_EXEC: i32 = 2;
const STEP_DUP2: i32 = 3;
const STEP_SETGROUPS: i32 = 4;
const STEP_SETGID: i32 = 5;
const STEP_SETUID: i32 = 6;
const STEP_CTTY: i32 = 7;
const STEP_RLIMIT: i32 = 8;
const STEP_NO_NEW_PRIVS: i32 = 9;
const STEP_CGROUP: i32 = 10;

/// Lowest number the sources of [`Spec::fds`] and the report pipe are moved to (when above
/// every target anyway).
const FD_FLOOR: RawFd = 10;

/// Cap on the `close` loop used when `close_range` is unavailable.
const CLOSE_LOOP_MAX: u64 = 1 << 20;

/// A [`Spec`] turned into C strings and pointer arrays, ready for the child to use without
/// allocating.
#[derive(Debug)]
pub struct Prepared {
    program: OsString,
    path: CString,
    cwd: Option<(PathBuf, CString)>,
    // Owners of the strings `argv_ptrs`/`envp_ptrs` point into; never modified.
    _argv: Vec<CString>,
    _envp: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    envp_ptrs: Vec<*const libc::c_char>,
    grouping: Grouping,
    foreground: bool,
    mask: SigSet,
    reset_signals: Vec<i32>,
    /// `(duplicate of the source, target)`: every duplicate is `CLOEXEC` and numbered ≥
    /// `fd_floor`, above every target.
    fd_map: Vec<(OwnedFd, RawFd)>,
    /// The report pipe's write end must be at least this (above every target).
    fd_floor: RawFd,
    /// First fd the child closes, when it closes the others.
    close_from: Option<RawFd>,
    /// Soft `RLIMIT_NOFILE` (capped), the bound of the fallback `close` loop.
    nofile: RawFd,
    user: Option<(u32, u32)>,
    ctty: bool,
    /// `(resource, [soft, hard])` for `prlimit64`.
    rlimits: Vec<(libc::c_int, [u64; 2])>,
    umask: Option<libc::mode_t>,
    no_new_privs: bool,
    /// The decimal `oom_score_adj` to write, and its length.
    oom_score_adj: Option<([u8; 8], usize)>,
    /// See [`Spec::cgroup_join`].
    cgroup_join: CgroupJoin,
}

impl Prepared {
    /// Resolves the program and builds the C strings. Fails with `NotFound` when `PATH` has no
    /// such program (nothing is forked then).
    pub fn new(spec: &Spec) -> Result<Self, SpawnError> {
        let program = spec.argv.first().ok_or(SpawnError::Empty)?.clone();
        let search_path = spec
            .env
            .iter()
            // The child's PATH decides, like a shell running `env PATH=… cmd`.
            .find(|(k, _)| k.as_bytes() == b"PATH")
            .map(|(_, v)| v.as_os_str())
            .unwrap_or(OsStr::new(DEFAULT_PATH));
        let resolved = resolve(&program, search_path).ok_or_else(|| SpawnError::NotFound {
            program: program.clone(),
            pid: None,
        })?;
        let cstr = |s: &OsStr| CString::new(s.as_bytes()).map_err(|_| SpawnError::Nul);
        let path = cstr(resolved.as_os_str())?;
        let argv = spec
            .argv
            .iter()
            .map(|a| cstr(a))
            .collect::<Result<Vec<_>, _>>()?;
        let envp = spec
            .env
            .iter()
            .map(|(k, v)| {
                let mut kv = Vec::with_capacity(k.len() + v.len() + 1);
                kv.extend_from_slice(k.as_bytes());
                kv.push(b'=');
                kv.extend_from_slice(v.as_bytes());
                CString::new(kv).map_err(|_| SpawnError::Nul)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let cwd = match &spec.cwd {
            Some(dir) => Some((dir.clone(), cstr(dir.as_os_str())?)),
            None => None,
        };
        let argv_ptrs = argv
            .iter()
            .map(|s| s.as_ptr())
            .chain([std::ptr::null()])
            .collect();
        let envp_ptrs = envp
            .iter()
            .map(|s| s.as_ptr())
            .chain([std::ptr::null()])
            .collect();
        let max_target = spec
            .fds
            .iter()
            .map(|&(_, dst)| dst)
            .max()
            .unwrap_or(2)
            .max(2);
        let fd_floor = max_target.saturating_add(1).max(FD_FLOOR);
        let fd_map = spec
            .fds
            .iter()
            .map(|&(src, dst)| Ok((dup_at_least(src, fd_floor)?, dst)))
            .collect::<Result<Vec<_>, SpawnError>>()?;
        let close_from = spec.close_other_fds.then(|| max_target.saturating_add(1));
        Ok(Prepared {
            program,
            path,
            cwd,
            _argv: argv,
            _envp: envp,
            argv_ptrs,
            envp_ptrs,
            grouping: spec.grouping,
            foreground: spec.foreground && spec.grouping == Grouping::NewGroup,
            mask: spec.mask,
            reset_signals: spec.reset_signals.clone(),
            fd_map,
            fd_floor,
            close_from,
            nofile: nofile_limit(),
            user: spec.user.filter(|&creds| !already_running_as(creds)),
            ctty: spec.ctty,
            rlimits: spec
                .limits
                .rlimits
                .iter()
                .map(|r| (r.resource.raw(), [r.soft, r.hard]))
                .collect(),
            umask: spec.limits.umask.map(|m| m as libc::mode_t),
            no_new_privs: spec.limits.no_new_privs,
            oom_score_adj: spec.limits.oom_score_adj.map(decimal),
            cgroup_join: spec.cgroup_join.clone(),
        })
    }
}

/// Whether the shim already runs as exactly `(uid, gid)` and is not root: then there is
/// nothing to drop, and a non-root shim (a container run with `--user`) could not call
/// `setgroups` anyway.
fn already_running_as((uid, gid): (u32, u32)) -> bool {
    // SAFETY: these calls only read the calling process's credentials.
    let (ruid, euid, rgid, egid) = unsafe {
        (
            libc::getuid(),
            libc::geteuid(),
            libc::getgid(),
            libc::getegid(),
        )
    };
    uid != 0 && ruid == uid && euid == uid && rgid == gid && egid == gid
}

/// `v` in decimal ASCII (at most 6 bytes: `-32768`), for the child to write without
/// formatting.
fn decimal(v: i16) -> ([u8; 8], usize) {
    let mut buf = [0u8; 8];
    let text = v.to_string();
    let len = text.len().min(buf.len());
    if let (Some(dst), Some(src)) = (buf.get_mut(..len), text.as_bytes().get(..len)) {
        dst.copy_from_slice(src);
    }
    (buf, len)
}

/// `fcntl(fd, F_DUPFD_CLOEXEC, min)`: a `CLOEXEC` duplicate of `fd` numbered ≥ `min`.
fn dup_at_least(fd: RawFd, min: RawFd) -> Result<OwnedFd, SpawnError> {
    // SAFETY: F_DUPFD_CLOEXEC only reads `fd` and allocates a new descriptor.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, min) };
    if new < 0 {
        return Err(SpawnError::Os {
            call: "fcntl(F_DUPFD_CLOEXEC)",
            errno: Errno::last(),
        });
    }
    // SAFETY: `new` was just returned by fcntl and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// The soft `RLIMIT_NOFILE`, capped at [`CLOSE_LOOP_MAX`] (also when unlimited or unknown).
fn nofile_limit() -> RawFd {
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(CLOSE_LOOP_MAX);
    RawFd::try_from(soft.min(CLOSE_LOOP_MAX)).unwrap_or(RawFd::MAX)
}

/// `PATH` when the child's environment has none (the `execvp` defaults plus the sbin
/// directories a root container expects).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Resolves `program` like `execvp`: with a `/` it is used as is; otherwise the first
/// executable regular file named `program` in `search_path` wins, else the first
/// non-executable candidate (so `execve` reports why: 126), else `None` (127).
pub fn resolve(program: &OsStr, search_path: &OsStr) -> Option<PathBuf> {
    if program.as_bytes().contains(&b'/') {
        return Some(PathBuf::from(program));
    }
    if program.is_empty() {
        return None;
    }
    let mut fallback = None;
    for dir in search_path.as_bytes().split(|b| *b == b':') {
        // An empty entry means the current directory, as in execvp.
        let dir = if dir.is_empty() {
            Path::new(".")
        } else {
            Path::new(OsStr::from_bytes(dir))
        };
        let candidate = dir.join(program);
        let Ok(meta) = std::fs::metadata(&candidate) else {
            continue;
        };
        if meta.is_file() && is_executable(&candidate) {
            return Some(candidate);
        }
        if fallback.is_none() {
            fallback = Some(candidate);
        }
    }
    fallback
}

fn is_executable(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    unsafe { libc::access(c.as_ptr(), libc::X_OK) == 0 }
}

/// Whether stdin is a terminal whose foreground process group is ours, i.e. whether we have a
/// terminal to hand over. A shim started in the background (`agent-shim … &` from an
/// interactive shell) must not steal the terminal from the shell.
pub fn we_own_stdin_tty() -> bool {
    // SAFETY: isatty, tcgetpgrp and getpgrp only inspect the descriptor and our own process.
    unsafe {
        libc::isatty(libc::STDIN_FILENO) == 1
            && libc::tcgetpgrp(libc::STDIN_FILENO) == libc::getpgrp()
    }
}

/// Forks `prep` and returns at once: the child's pid and the read end of its report pipe
/// (non-blocking, `CLOEXEC`). Whether the `execve` succeeded is learnt later, without
/// blocking, from [`Pending::poll`]. The caller registers [`Pending::pid`] with the reaper
/// before its next drain.
pub fn start(prep: &Prepared) -> Result<Pending, SpawnError> {
    let mut fds = [0 as libc::c_int; 2];
    // Both ends non-blocking: the parent polls its end; the child writes 8 bytes into an
    // empty pipe, which never blocks anyway.
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(SpawnError::Os {
            call: "pipe2",
            errno: Errno::last(),
        });
    }
    let [read_fd, mut write_fd] = fds;
    // SAFETY: pipe2 succeeded: `read_fd` is a fresh descriptor owned by nobody else.
    let report = unsafe { OwnedFd::from_raw_fd(read_fd) };
    if write_fd < prep.fd_floor && (prep.close_from.is_some() || !prep.fd_map.is_empty()) {
        // Above every target, so no `dup2` of the child overwrites it.
        match dup_at_least(write_fd, prep.fd_floor) {
            Ok(moved) => {
                close(write_fd);
                write_fd = std::os::fd::IntoRawFd::into_raw_fd(moved);
            }
            Err(err) => {
                close(write_fd);
                return Err(err);
            }
        }
    }
    let foreground = prep.foreground && we_own_stdin_tty();

    let created_in = prep.cgroup_join.dir.map(|dir| {
        // SAFETY: the child half only calls async-signal-safe functions on data prepared
        // before the clone (see `child`), and never returns.
        unsafe { clone_into(dir) }
    });
    let (pid, joined) = match created_in {
        Some(pid) if pid >= 0 => (pid, true),
        // No `clone3` or no `CLONE_INTO_CGROUP` here (an older kernel, a seccomp filter), or
        // a cgroup that takes no process: the fork's child joins through the files, and
        // reports why if it cannot.
        _ => {
            // SAFETY: as above, for the fork.
            (unsafe { libc::fork() }, false)
        }
    };
    if pid < 0 {
        let errno = Errno::last();
        close(write_fd);
        return Err(SpawnError::Os {
            call: "fork",
            errno,
        });
    }
    if pid == 0 {
        // SAFETY: we are the freshly forked child; `write_fd` is the pipe's write end.
        unsafe { child(prep, write_fd, foreground, joined) }
    }
    // From here on only the child holds the write end: the pipe reads EOF once it has
    // exec'd or died.
    close(write_fd);
    Ok(Pending {
        pid,
        report,
        buf: [0; REPORT_LEN],
        got: 0,
        program: prep.program.clone(),
        cwd: prep.cwd.as_ref().map(|(d, _)| d.clone()),
        user: prep.user,
    })
}

/// Length of the child's `(step, errno)` report.
const REPORT_LEN: usize = 8;

/// A forked child whose `execve` has neither succeeded nor failed yet, as far as the parent
/// knows: its pid and the read end of its report pipe.
///
/// A child can be kept in that state for as long as someone wants: the tenant's own uid may
/// `SIGSTOP` it between the credential drop and `execve`, and `chdir` or `execve` on a slow
/// file system take their time. So the parent never blocks on it: it [`poll`](Self::poll)s
/// when the pipe is readable (or the child was reaped), and past its own deadline
/// [`kill`](Self::kill)s the child, which works on a stopped process.
#[derive(Debug)]
pub struct Pending {
    pid: i32,
    report: OwnedFd,
    /// What has arrived of the report so far (a pipe may hand it over in pieces).
    buf: [u8; REPORT_LEN],
    got: usize,
    program: OsString,
    cwd: Option<PathBuf>,
    user: Option<(u32, u32)>,
}

impl AsRawFd for Pending {
    /// The report pipe's read end.
    fn as_raw_fd(&self) -> RawFd {
        self.report.as_raw_fd()
    }
}

impl Pending {
    /// The child's pid (its process group with [`Grouping::NewGroup`] or
    /// [`Grouping::NewSession`], once it got that far).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Reads what the pipe has, without blocking. `None`: nothing decided yet (poll again
    /// when the pipe is readable). `Some(Ok(pid))`: the pipe reached EOF with no report, so
    /// `execve` succeeded (or the child died before it: its exit tells). `Some(Err(_))`: the
    /// child reported a failed step and has `_exit`ed with 127.
    pub fn poll(&mut self) -> Option<Result<i32, SpawnError>> {
        loop {
            let rest = self.buf.get_mut(self.got..)?;
            if rest.is_empty() {
                return Some(Err(self.decode()));
            }
            // SAFETY: `rest` is a valid writable buffer of `rest.len()` bytes.
            let n = unsafe {
                libc::read(
                    self.report.as_raw_fd(),
                    rest.as_mut_ptr().cast(),
                    rest.len(),
                )
            };
            match n {
                0 if self.got == 0 => return Some(Ok(self.pid)),
                0 => {
                    // A report cut short (8 bytes into an empty pipe are written at once,
                    // so this is not the child of `child`): failed all the same.
                    return Some(Err(SpawnError::ChildSetup {
                        call: "report",
                        errno: Errno::EPROTO,
                        pid: Some(self.pid),
                    }));
                }
                n if n > 0 => {
                    let n = usize::try_from(n).unwrap_or(0);
                    self.got = self.got.saturating_add(n).min(REPORT_LEN);
                }
                _ => match Errno::last() {
                    Errno::EINTR => {}
                    Errno::EAGAIN => return None,
                    errno => {
                        // Cannot happen on a pipe we own; never leave a child we cannot
                        // follow.
                        self.kill();
                        return Some(Err(SpawnError::ChildSetup {
                            call: "read(report)",
                            errno,
                            pid: Some(self.pid),
                        }));
                    }
                },
            }
        }
    }

    /// SIGKILLs the child (stopped or not; it is ours and not reaped, so the pid is still
    /// its own). Its exit is collected by the reaper as usual.
    pub fn kill(&self) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
    }

    /// The error for a child that was still pending after `after` (and was killed).
    pub fn timed_out(&self, after: Duration) -> SpawnError {
        SpawnError::Timeout {
            program: self.program.clone(),
            after,
            pid: Some(self.pid),
        }
    }

    /// Waits for the outcome at most `timeout`, blocking this thread in `poll(2)` (for plain
    /// init mode's one child, which nothing else is waiting on). Past the deadline the child
    /// is SIGKILLed and [`SpawnError::Timeout`] returned; the caller reaps it.
    pub fn wait(&mut self, timeout: Duration) -> Result<i32, SpawnError> {
        let deadline = std::time::Instant::now().checked_add(timeout);
        loop {
            if let Some(outcome) = self.poll() {
                return outcome;
            }
            let left = deadline.map_or(Duration::from_secs(1), |d| {
                d.saturating_duration_since(std::time::Instant::now())
            });
            if left.is_zero() {
                self.kill();
                return Err(self.timed_out(timeout));
            }
            let mut pfd = libc::pollfd {
                fd: self.report.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // Rounded up, so the loop does not spin through the last millisecond.
            let ms = left
                .as_micros()
                .div_ceil(1000)
                .min(i32::MAX as u128)
                .try_into()
                .unwrap_or(i32::MAX);
            // SAFETY: one valid pollfd. EINTR and errors just go round again: the deadline
            // bounds the loop.
            unsafe { libc::poll(&mut pfd, 1, ms) };
        }
    }

    /// The error the complete report stands for.
    fn decode(&self) -> SpawnError {
        let pid = Some(self.pid);
        let (step, errno) = self.buf.split_at(4);
        let word = |b: &[u8]| b.try_into().map(i32::from_ne_bytes).unwrap_or(0);
        let (step, errno) = (word(step), Errno::from_raw(word(errno)));
        match step {
            STEP_CHDIR => SpawnError::Chdir {
                dir: self.cwd.clone().unwrap_or_default(),
                errno,
                pid,
            },
            STEP_SETGROUPS | STEP_SETGID | STEP_SETUID => {
                let (uid, gid) = self.user.unwrap_or_default();
                SpawnError::Credentials {
                    call: match step {
                        STEP_SETGROUPS => "setgroups",
                        STEP_SETGID => "setgid",
                        _ => "setuid",
                    },
                    uid,
                    gid,
                    errno,
                    pid,
                }
            }
            STEP_CTTY | STEP_RLIMIT | STEP_NO_NEW_PRIVS => SpawnError::Limits {
                call: match step {
                    STEP_CTTY => "ioctl(TIOCSCTTY)",
                    STEP_RLIMIT => "prlimit",
                    _ => "prctl(PR_SET_NO_NEW_PRIVS)",
                },
                errno,
                pid,
            },
            STEP_DUP2 => SpawnError::ChildSetup {
                call: "dup2",
                errno,
                pid,
            },
            STEP_CGROUP => SpawnError::ChildSetup {
                call: "write(cgroup join file)",
                errno,
                pid,
            },
            _ => match errno {
                Errno::ENOENT | Errno::ENOTDIR => SpawnError::NotFound {
                    program: self.program.clone(),
                    pid,
                },
                _ => SpawnError::NotExecutable {
                    program: self.program.clone(),
                    errno,
                    pid,
                },
            },
        }
    }
}

/// `clone3`'s `struct clone_args`, up to `cgroup` (`CLONE_ARGS_SIZE_VER2`).
#[repr(C)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// `CLONE_INTO_CGROUP` (Linux 5.7).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// A `fork` whose child starts in the cgroup v2 directory `dir`: like `fork`, 0 in the
/// child, the child's pid in the parent, -1 (and `errno`) on failure.
///
/// # Safety
///
/// As `fork` in a single-threaded process: the child may only make async-signal-safe calls.
/// No `atfork` handler runs (the shim registers none).
unsafe fn clone_into(dir: RawFd) -> libc::pid_t {
    let args = CloneArgs {
        flags: CLONE_INTO_CGROUP,
        pidfd: 0,
        child_tid: 0,
        parent_tid: 0,
        exit_signal: libc::SIGCHLD as u64,
        stack: 0,
        stack_size: 0,
        tls: 0,
        set_tid: 0,
        set_tid_size: 0,
        cgroup: dir as u64,
    };
    // SAFETY: `args` is a valid `clone_args` of the size given; without `CLONE_VM` the child
    // gets a copy of this address space, as with `fork`.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            std::ptr::from_ref(&args),
            std::mem::size_of::<CloneArgs>(),
        )
    };
    libc::pid_t::try_from(r).unwrap_or(-1)
}

fn close(fd: libc::c_int) {
    // SAFETY: `fd` is a descriptor this module opened and closes exactly once.
    unsafe { libc::close(fd) };
}

/// The child half. Async-signal-safe calls only; never returns.
///
/// # Safety
///
/// Must be called only in the child right after `fork`, with `write_fd` the write end of the
/// CLOEXEC report pipe.
unsafe fn child(prep: &Prepared, write_fd: libc::c_int, foreground: bool, joined: bool) -> ! {
    // SAFETY: raw syscalls on prepared, NUL-terminated data owned by `prep` (which the fork
    // copied) and on stack values; nothing here allocates, locks or unwinds.
    unsafe {
        // First of all: nothing the child does may escape its cgroup's limits (a child
        // created in its cgroup is there already).
        if !joined {
            for fd in &prep.cgroup_join.files {
                if libc::write(*fd, c"0".as_ptr().cast(), 1) != 1 {
                    report_and_exit(write_fd, STEP_CGROUP);
                }
            }
        }
        match prep.grouping {
            Grouping::NewGroup => {
                libc::setpgid(0, 0);
                if foreground {
                    // Failure (no controlling terminal, …) is not fatal: the child just
                    // does not own the terminal.
                    libc::tcsetpgrp(libc::STDIN_FILENO, libc::getpid());
                }
            }
            Grouping::NewSession => {
                libc::setsid();
            }
            Grouping::Inherit => {}
        }
        for (src, dst) in &prep.fd_map {
            // Every source is above every target (see `Prepared::new`), so no `dup2` here
            // overwrites a source still to be mapped; `dup2` clears CLOEXEC on `dst`.
            if libc::dup2(src.as_raw_fd(), *dst) < 0 {
                report_and_exit(write_fd, STEP_DUP2);
            }
        }
        if let Some(first) = prep.close_from {
            // Keep the report pipe (`write_fd` ≥ `first`, see `start`): it is CLOEXEC.
            close_fds(first, write_fd.saturating_sub(1), prep.nofile);
            close_fds(write_fd.saturating_add(1), RawFd::MAX, prep.nofile);
        }
        if prep.ctty && libc::ioctl(libc::STDIN_FILENO, libc::TIOCSCTTY as _, 0) != 0 {
            report_and_exit(write_fd, STEP_CTTY);
        }
        // Limits before the credentials: a hard limit can only be raised while still root.
        for (resource, limit) in &prep.rlimits {
            let no_old: *mut [u64; 2] = std::ptr::null_mut();
            if libc::syscall(
                libc::SYS_prlimit64,
                0 as libc::pid_t,
                *resource,
                limit as *const [u64; 2],
                no_old,
            ) != 0
            {
                report_and_exit(write_fd, STEP_RLIMIT);
            }
        }
        if let Some(mask) = prep.umask {
            libc::umask(mask);
        }
        if let Some((text, len)) = &prep.oom_score_adj {
            // Before the credentials drop: written with the shim's capabilities, the value is
            // also the floor the tenant cannot lower it below. Tolerated when it fails (no
            // /proc, or no CAP_SYS_RESOURCE for a value below the shim's floor): the child
            // keeps the shim's value, and the shim warned at start about what it can do.
            let fd = libc::open(
                c"/proc/self/oom_score_adj".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            );
            if fd >= 0 {
                libc::write(fd, text.as_ptr().cast(), *len);
                libc::close(fd);
            }
        }
        if prep.no_new_privs
            && libc::prctl(
                libc::PR_SET_NO_NEW_PRIVS,
                1 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            ) != 0
        {
            report_and_exit(write_fd, STEP_NO_NEW_PRIVS);
        }
        if let Some((uid, gid)) = prep.user {
            // Raw syscalls: the libc wrappers broadcast the change to every thread of the
            // process (musl through `__synccall`, which takes locks a fork may have left
            // held); the forked child has one thread only.
            if libc::syscall(
                libc::SYS_setgroups,
                0 as libc::size_t,
                std::ptr::null::<libc::gid_t>(),
            ) != 0
            {
                report_and_exit(write_fd, STEP_SETGROUPS);
            }
            if libc::syscall(libc::SYS_setgid, gid as libc::gid_t) != 0 {
                report_and_exit(write_fd, STEP_SETGID);
            }
            if libc::syscall(libc::SYS_setuid, uid as libc::uid_t) != 0 {
                report_and_exit(write_fd, STEP_SETUID);
            }
        }
        if let Some((_, dir)) = &prep.cwd {
            if libc::chdir(dir.as_ptr()) != 0 {
                report_and_exit(write_fd, STEP_CHDIR);
            }
        }
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        for &sig in &prep.reset_signals {
            libc::sigaction(sig, &dfl, std::ptr::null_mut());
        }
        let mask: &libc::sigset_t = prep.mask.as_ref();
        libc::pthread_sigmask(libc::SIG_SETMASK, mask, std::ptr::null_mut());
        libc::execve(
            prep.path.as_ptr(),
            prep.argv_ptrs.as_ptr(),
            prep.envp_ptrs.as_ptr(),
        );
        report_and_exit(write_fd, STEP_EXEC)
    }
}

/// Closes every open fd in `first..=last`: `close_range`, or (when it fails: ENOSYS before
/// Linux 5.9, EPERM from an old seccomp profile) a `close` loop bounded by `nofile`.
/// Async-signal-safe.
///
/// # Safety
///
/// Only for the child half of [`start`]: it closes descriptors other code may think it owns.
unsafe fn close_fds(first: RawFd, last: RawFd, nofile: RawFd) {
    if first < 0 || first > last {
        return;
    }
    // SAFETY: close_range takes two unsigned ints and flags; it only closes descriptors.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            last as libc::c_uint,
            0 as libc::c_uint,
        )
    };
    if ret != 0 {
        // SAFETY: same contract as ours.
        unsafe { close_loop(first, last, nofile) };
    }
}

/// The fallback of [`close_fds`]: `close` every number in `first..=last` below `nofile`.
/// Async-signal-safe.
///
/// # Safety
///
/// As [`close_fds`].
unsafe fn close_loop(first: RawFd, last: RawFd, nofile: RawFd) {
    let mut fd = first;
    while fd <= last && fd < nofile {
        // SAFETY: closing a descriptor number, open or not, is harmless here (see above).
        unsafe { libc::close(fd) };
        fd = fd.saturating_add(1);
    }
}

/// Writes `(step, errno)` to the report pipe and `_exit(127)`s. Async-signal-safe.
///
/// # Safety
///
/// Only for the child half of [`start`].
unsafe fn report_and_exit(write_fd: libc::c_int, step: i32) -> ! {
    // SAFETY: errno is thread-local; reading it and writing a stack buffer is signal-safe.
    unsafe {
        let errno = Errno::last_raw();
        let mut buf = [0u8; 8];
        let (a, b) = buf.split_at_mut(4);
        a.copy_from_slice(&step.to_ne_bytes());
        b.copy_from_slice(&errno.to_ne_bytes());
        libc::write(write_fd, buf.as_ptr().cast(), buf.len());
        libc::_exit(127)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_like_execvp() {
        let dir = std::env::temp_dir().join(format!("agent-shim-resolve-{}", std::process::id()));
        let bin = dir.join("bin");
        let noexec = dir.join("noexec");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(&noexec).unwrap();
        std::fs::write(noexec.join("tool"), "#!/bin/sh\n").unwrap();
        std::fs::write(bin.join("tool"), "#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(bin.join("tool"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(noexec.join("tool"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        let path = |dirs: &[&Path]| {
            OsString::from(
                dirs.iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(":"),
            )
        };
        // The executable one wins even when a non-executable one comes first.
        assert_eq!(
            resolve(OsStr::new("tool"), &path(&[&noexec, &bin])),
            Some(bin.join("tool"))
        );
        // Only a non-executable candidate: returned, so that execve reports EACCES.
        assert_eq!(
            resolve(OsStr::new("tool"), &path(&[&noexec])),
            Some(noexec.join("tool"))
        );
        // A directory is not a program, but is remembered like a non-executable file.
        assert_eq!(
            resolve(OsStr::new("bin"), &path(&[&dir])),
            Some(dir.join("bin"))
        );
        assert_eq!(resolve(OsStr::new("missing"), &path(&[&bin])), None);
        assert_eq!(resolve(OsStr::new(""), &path(&[&bin])), None);
        assert_eq!(
            resolve(OsStr::new("./x/y"), &path(&[])),
            Some(PathBuf::from("./x/y"))
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn waitpid(pid: i32) -> i32 {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let mut status = 0;
            // SAFETY: waitpid on our own child with a valid status pointer.
            let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if r == pid {
                return status;
            }
            if r < 0 || std::time::Instant::now() > deadline {
                // SAFETY: killing and reaping our own child.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, std::ptr::null_mut(), 0);
                }
                panic!("child {pid} did not exit in time");
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: a valid array of two ints.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: fresh descriptors owned by nobody else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    #[test]
    fn fd_mapping_survives_crossed_numbers() {
        // Each source's number is the other pair's target: a naive dup2 sequence would
        // overwrite the second source before mapping it.
        let (r1, w1) = pipe();
        let (r2, w2) = pipe();
        let (n1, n2) = (w1.as_raw_fd(), w2.as_raw_fd());
        let script = format!("echo one >&{n2}; echo two >&{n1}");
        // bash, not sh: dash rejects fd numbers above 9 in redirections, and with other tests
        // holding descriptors in parallel the pipes often get such numbers.
        let mut spec = Spec::new(vec!["/bin/bash".into(), "-c".into(), script.into()], vec![]);
        spec.foreground = false;
        spec.fds = vec![(n1, n2), (n2, n1)];
        let prep = Prepared::new(&spec).unwrap();
        assert!(prep
            .fd_map
            .iter()
            .all(|(src, _)| src.as_raw_fd() >= FD_FLOOR.max(n1.max(n2) + 1)));
        let pid = start(&prep)
            .unwrap()
            .wait(std::time::Duration::from_secs(10))
            .unwrap();
        drop((prep, w1, w2));
        assert_eq!(waitpid(pid), 0);
        let read = |fd: OwnedFd| {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::fs::File::from(fd), &mut s).unwrap();
            s
        };
        assert_eq!(
            (read(r1), read(r2)),
            ("one\n".to_string(), "two\n".to_string())
        );
    }

    /// The child's own `/proc/self/cgroup`, read by `cat` started with `join`.
    fn cgroup_of_child(join: CgroupJoin) -> String {
        let (r, w) = pipe();
        let n = w.as_raw_fd();
        let script = format!("cat /proc/self/cgroup >&{n}");
        let mut spec = Spec::new(vec!["/bin/bash".into(), "-c".into(), script.into()], vec![]);
        spec.foreground = false;
        spec.fds = vec![(n, n)];
        spec.cgroup_join = join;
        let prep = Prepared::new(&spec).unwrap();
        let pid = start(&prep)
            .unwrap()
            .wait(std::time::Duration::from_secs(10))
            .unwrap();
        drop((prep, w));
        assert_eq!(waitpid(pid), 0);
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(r), &mut s).unwrap();
        s
    }

    #[test]
    fn a_child_is_created_in_its_cgroup_v2_directory() {
        // The v2 hierarchy: the whole tree, or the `unified` one beside v1's.
        let Some(root) = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .into_iter()
            .map(std::path::Path::new)
            .find(|p| crate::cgroups::is_cgroup2(p))
        else {
            assert!(
                std::env::var_os("CI").is_none(),
                "no cgroup v2 hierarchy on this CI machine"
            );
            eprintln!("SKIPPED: no cgroup v2 hierarchy here");
            return;
        };
        let name = format!("agent-shim-clone-{}", std::process::id());
        let path = root.join(&name);
        if let Err(e) = std::fs::create_dir(&path) {
            assert!(std::env::var_os("CI").is_none(), "mkdir {path:?}: {e}");
            eprintln!("SKIPPED: cannot make a cgroup ({e})");
            return;
        }
        let dir = std::fs::File::open(&path).unwrap();
        let join = CgroupJoin {
            dir: Some(dir.as_raw_fd()),
            files: Vec::new(),
        };
        let seen = cgroup_of_child(join);
        std::fs::remove_dir(&path).unwrap();
        assert!(
            seen.lines().any(|l| l == format!("0::/{name}")),
            "the child started in {name}: {seen}"
        );
        // A directory that is no cgroup: `clone3` refuses it, and the fork's child joins
        // through the files (none here), so it runs, in the parent's cgroup.
        let tmp = std::fs::File::open(std::env::temp_dir()).unwrap();
        let seen = cgroup_of_child(CgroupJoin {
            dir: Some(tmp.as_raw_fd()),
            files: Vec::new(),
        });
        assert!(!seen.contains(&name), "{seen}");
    }

    /// A `Pending` on a pipe of the test's (non-blocking read end), for child `pid`.
    fn pending_on(pid: i32) -> (Pending, OwnedFd) {
        let (r, w) = pipe();
        // SAFETY: F_SETFL on a descriptor we own.
        unsafe { libc::fcntl(r.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        let p = Pending {
            pid,
            report: r,
            buf: [0; REPORT_LEN],
            got: 0,
            program: "tool".into(),
            cwd: Some(PathBuf::from("/nowhere")),
            user: Some((1000, 1000)),
        };
        (p, w)
    }

    fn write_all(fd: &OwnedFd, bytes: &[u8]) {
        // SAFETY: a valid buffer of `bytes.len()` bytes.
        let n = unsafe { libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
        assert_eq!(usize::try_from(n).ok(), Some(bytes.len()));
    }

    #[test]
    fn a_report_in_pieces_is_assembled() {
        let (mut p, w) = pending_on(4242);
        assert!(p.poll().is_none(), "nothing written yet: undecided");
        let mut report = Vec::new();
        report.extend_from_slice(&STEP_CHDIR.to_ne_bytes());
        report.extend_from_slice(&libc::ENOENT.to_ne_bytes());
        for byte in &report[..7] {
            write_all(&w, std::slice::from_ref(byte));
            assert!(p.poll().is_none(), "{} bytes: undecided", p.got);
        }
        write_all(&w, &report[7..]);
        match p.poll() {
            Some(Err(SpawnError::Chdir { dir, errno, pid })) => {
                assert_eq!(dir, PathBuf::from("/nowhere"));
                assert_eq!(errno, Errno::ENOENT);
                assert_eq!(pid, Some(4242));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn eof_decides_success_and_a_cut_report_is_a_failure() {
        let (mut p, w) = pending_on(4243);
        drop(w);
        assert!(matches!(p.poll(), Some(Ok(4243))));

        let (mut p, w) = pending_on(4244);
        write_all(&w, &STEP_SETUID.to_ne_bytes());
        assert!(p.poll().is_none());
        drop(w);
        assert!(matches!(
            p.poll(),
            Some(Err(SpawnError::ChildSetup {
                call: "report",
                pid: Some(4244),
                ..
            }))
        ));

        let (mut p, w) = pending_on(4245);
        let mut report = STEP_SETUID.to_ne_bytes().to_vec();
        report.extend_from_slice(&libc::EPERM.to_ne_bytes());
        write_all(&w, &report);
        assert!(matches!(
            p.poll(),
            Some(Err(SpawnError::Credentials {
                call: "setuid",
                uid: 1000,
                ..
            }))
        ));
        let mut report = STEP_EXEC.to_ne_bytes().to_vec();
        report.extend_from_slice(&libc::EACCES.to_ne_bytes());
        let (mut p, w) = pending_on(4246);
        write_all(&w, &report);
        let err = p.poll().and_then(Result::err);
        assert!(
            matches!(err, Some(SpawnError::NotExecutable { .. })),
            "{err:?}"
        );
    }

    #[test]
    fn a_child_stopped_before_execve_is_killed_at_the_deadline() {
        let (r, w) = pipe();
        // SAFETY: the child makes only async-signal-safe calls (raise, _exit).
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: in the forked child: stop, as a tenant's SIGSTOP would, holding the
            // write end of the report pipe.
            unsafe {
                libc::raise(libc::SIGSTOP);
                libc::_exit(0)
            }
        }
        drop(w);
        // SAFETY: F_SETFL on a descriptor we own.
        unsafe { libc::fcntl(r.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        let mut p = Pending {
            pid,
            report: r,
            buf: [0; REPORT_LEN],
            got: 0,
            program: "stopped".into(),
            cwd: None,
            user: None,
        };
        let t0 = std::time::Instant::now();
        let err = p.wait(Duration::from_millis(300)).unwrap_err();
        let took = t0.elapsed();
        assert!(
            matches!(err, SpawnError::Timeout { pid: Some(p), .. } if p == pid),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("not started within 300ms"),
            "{err}"
        );
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
        let status = waitpid(pid);
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL,
            "{status:#x}"
        );
    }

    #[test]
    fn close_loop_closes_the_range_only() {
        let (r, w) = pipe();
        let (lo, hi) = (
            r.as_raw_fd().min(w.as_raw_fd()),
            r.as_raw_fd().max(w.as_raw_fd()),
        );
        // SAFETY: the child makes only async-signal-safe calls (fcntl, close, _exit).
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: in the forked child, on descriptors inherited from the parent.
            unsafe {
                close_loop(lo, lo, 1 << 20);
                let lo_closed = libc::fcntl(lo, libc::F_GETFD) < 0;
                let hi_open = libc::fcntl(hi, libc::F_GETFD) >= 0;
                close_loop(hi, RawFd::MAX, hi.saturating_add(1));
                let hi_closed = libc::fcntl(hi, libc::F_GETFD) < 0;
                libc::_exit(if lo_closed && hi_open && hi_closed {
                    0
                } else {
                    1
                })
            }
        }
        assert_eq!(waitpid(pid), 0);
    }
}
