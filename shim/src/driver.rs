//! Launching the agent driver: its socket, its output pipes, its credentials and environment.
//!
//! The driver is the one child of supervisor mode that speaks driver-protocol. It gets:
//!
//! ```text
//!   fd 0  /dev/null
//!   fd 1  pipe ──► shim (Launched::stdout)     copied to the shim's stderr, `log` events
//!   fd 2  pipe ──► shim (Launched::stderr)
//!   fd 3  socketpair end ◄──► shim (Launched::socket)   AGENT_SHIM_FD=3
//!   nothing else: every fd ≥ 4 is closed in the child
//! ```
//!
//! Every descriptor made here is `CLOEXEC` from birth, so no other child of the shim (a tool
//! process, a later driver) inherits the driver's socket or pipes even if it is forked while
//! a launch is under way; the driver's own ends reach it only through the `dup2`s of
//! [`spawn`], which also closes whatever the shim may have opened without
//! `CLOEXEC`. The shim's ends are non-blocking: the supervisor polls them and must never
//! block on a driver.
//!
//! The environment is the shim's, scrubbed ([`driver_env`]): the control token never reaches
//! the driver, and `AGENT_SHIM_FD` always names the socket. The driver may run as another
//! uid/gid with no supplementary groups, in its own session and so its own process group
//! (`setsid`: it has no terminal), so the supervisor can signal or kill it and every tool it
//! started at once. Not in the shim's session: the kernel lets any process of a session send
//! SIGCONT to any other, whatever its uid, and the driver must not be able to signal PID 1.
//! A side effect: the driver's group has no parent in its session (it is "orphaned"), so a
//! forwarded SIGTSTP/SIGTTIN/SIGTTOU reaches it but does not stop it by default; `pause`
//! and the container freezer are how a driver is stopped.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use nix::errno::Errno;
use nix::sys::signal::SigSet;

use crate::spawn::{self, Grouping, Prepared, SpawnError, Spec};
use crate::sys::fd;

/// The driver's end of the socket pair, as numbered in the driver.
pub const DRIVER_FD: RawFd = 3;

/// The variable that tells the driver which fd is its socket.
pub const FD_VAR: &str = driver_protocol::FD_ENV;

/// The control-link token variable: never passed to the driver (always denied, whatever
/// `--env-allow` says).
pub const TOKEN_VAR: &str = driver_protocol::token::TOKEN_ENV;

/// How to start the driver (from the command line: the command, `--user`, `--workdir`, and
/// the environment computed by [`driver_env`]).
#[derive(Clone, Debug, Default)]
pub struct DriverConfig {
    /// The driver's `argv`; `argv[0]` is resolved in the driver's `PATH`.
    pub argv: Vec<OsString>,
    /// `(uid, gid)` to run as (supplementary groups dropped); `None` keeps the shim's.
    pub user: Option<(u32, u32)>,
    /// Working directory; `None` keeps the shim's.
    pub workdir: Option<PathBuf>,
    /// The driver's complete environment (see [`driver_env`]); [`launch`] adds
    /// `AGENT_SHIM_FD=3` if it is missing.
    pub env: Vec<(OsString, OsString)>,
    /// Rlimits, umask, `no_new_privs`.
    pub limits: crate::limits::Limits,
    /// How it enters its own cgroup ([`crate::cgroups`]).
    pub cgroup_join: crate::spawn::CgroupJoin,
}

/// The driver's environment from the shim's: `AGENT_SHIM_TOKEN` and any inherited
/// `AGENT_SHIM_FD` always removed; with `allow` only those names kept; `deny` names removed;
/// then `AGENT_SHIM_FD=3` appended.
///
/// `set_driver`'s variables go on top with [`overlay_env`].
pub fn driver_env(
    vars: impl IntoIterator<Item = (OsString, OsString)>,
    allow: Option<&[String]>,
    deny: &[String],
) -> Vec<(OsString, OsString)> {
    let listed = |names: &[String], k: &OsStr| names.iter().any(|n| OsStr::new(n) == k);
    let mut env: Vec<(OsString, OsString)> = vars
        .into_iter()
        .filter(|(k, _)| k != TOKEN_VAR && k != FD_VAR)
        .filter(|(k, _)| allow.is_none_or(|allow| listed(allow, k)))
        .filter(|(k, _)| !listed(deny, k))
        .collect();
    env.push((FD_VAR.into(), DRIVER_FD.to_string().into()));
    env
}

/// Sets each of `vars` in `env`, replacing a variable of the same name.
pub fn overlay_env<'a>(
    env: &mut Vec<(OsString, OsString)>,
    vars: impl IntoIterator<Item = (&'a String, &'a String)>,
) {
    for (k, v) in vars {
        env.retain(|(name, _)| name.as_os_str() != OsStr::new(k));
        env.push((k.into(), v.into()));
    }
}

/// `"UID"` or `"UID:GID"` (numeric; GID defaults to UID) for `--user`.
pub fn parse_user(s: &str) -> Result<(u32, u32), String> {
    let (uid, gid) = match s.split_once(':') {
        Some((uid, gid)) => (uid, Some(gid)),
        None => (s, None),
    };
    let id = |what: &str, v: &str| -> Result<u32, String> {
        let bad = || format!("invalid {what} {v:?} in {s:?}: expected UID or UID:GID (numeric)");
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        // -1 (u32::MAX) means "unchanged" to the set*id calls: not a real id.
        v.parse::<u32>()
            .ok()
            .filter(|&n| n != u32::MAX)
            .ok_or_else(bad)
    };
    let uid = id("uid", uid)?;
    let gid = match gid {
        Some(gid) => id("gid", gid)?,
        None => uid,
    };
    Ok((uid, gid))
}

/// A started driver: its pid and the shim's ends of its socket and output pipes.
#[derive(Debug)]
pub struct Launched {
    /// The driver's pid, which is also its process group id.
    pub pid: i32,
    /// Its `execve`'s outcome, still to be learnt (see [`spawn::Pending`]).
    pub spawn: spawn::Pending,
    /// The shim's end of the socket pair: `CLOEXEC`, non-blocking.
    pub socket: UnixStream,
    /// The read end of the driver's stdout: `CLOEXEC`, non-blocking.
    pub stdout: OwnedFd,
    /// The read end of the driver's stderr: `CLOEXEC`, non-blocking.
    pub stderr: OwnedFd,
}

/// `socketpair(AF_UNIX, SOCK_STREAM|SOCK_CLOEXEC)`, pipes for stdout/stderr (`O_CLOEXEC`),
/// `/dev/null` for stdin; spawns with fds {null→0, out→1, err→2, sock→3}, every other fd
/// closed, a new process group (not foreground), `mask` restored in the child, cwd/user/env
/// from `cfg`; closes the child's ends in the parent. Returns once the child is forked: the
/// caller registers `pid` with the reaper before anything can reap, then learns from
/// [`Launched::spawn`] whether its `execve` succeeded, without blocking.
///
/// Errors are those of [`spawn::start`] (nothing forked); a failure in the child
/// (`NotFound`, `NotExecutable`, `Chdir`, `Credentials`, `ChildSetup`) comes later from
/// [`spawn::Pending::poll`].
pub fn launch(cfg: &DriverConfig, mask: &SigSet) -> Result<Launched, SpawnError> {
    // std creates both with SOCK_CLOEXEC / O_CLOEXEC.
    let (socket, theirs) = UnixStream::pair().map_err(|e| io_error("socketpair", &e))?;
    let null = dev_null()?;
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    socket
        .set_nonblocking(true)
        .map_err(|e| io_error("fcntl(O_NONBLOCK)", &e))?;
    set_nonblocking(&out_r)?;
    set_nonblocking(&err_r)?;

    let mut env = cfg.env.clone();
    if !env.iter().any(|(k, _)| k == FD_VAR) {
        env.push((FD_VAR.into(), DRIVER_FD.to_string().into()));
    }
    let mut spec = Spec::new(cfg.argv.clone(), env);
    spec.cwd = cfg.workdir.clone();
    spec.grouping = Grouping::NewSession;
    spec.foreground = false;
    spec.mask = *mask;
    spec.user = cfg.user;
    spec.limits = cfg.limits.clone();
    spec.close_other_fds = true;
    spec.cgroup_join = cfg.cgroup_join.clone();
    spec.fds = vec![
        (null.as_raw_fd(), libc::STDIN_FILENO),
        (out_w.as_raw_fd(), libc::STDOUT_FILENO),
        (err_w.as_raw_fd(), libc::STDERR_FILENO),
        (theirs.as_raw_fd(), DRIVER_FD),
    ];
    let prepared = Prepared::new(&spec)?;
    let pending = spawn::start(&prepared)?;
    // The child's ends (and Prepared's duplicates of them) are closed here, so the shim sees
    // EOF on the pipes and the socket once the driver and its descendants are gone.
    drop(prepared);
    drop((null, out_w, err_w, theirs));
    Ok(Launched {
        pid: pending.pid(),
        spawn: pending,
        socket,
        stdout: out_r,
        stderr: err_r,
    })
}

/// `/dev/null` as a child's stdin: a duplicate of one descriptor opened the first time (before
/// any tenant code runs), never blocking: a tenant that replaces `/dev/null` with a FIFO (root
/// in the sandbox can) would otherwise hang the shim in `open()` at every spawn. The open is
/// non-blocking and must yield a character device; failing that, the read end of an empty
/// pipe whose write end is closed stands in (it reads EOF, as `/dev/null` does).
pub(crate) fn dev_null() -> Result<OwnedFd, SpawnError> {
    static NULL: std::sync::OnceLock<Option<OwnedFd>> = std::sync::OnceLock::new();
    let cached = NULL.get_or_init(|| {
        let flags = libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY;
        // SAFETY: a valid NUL-terminated path; the result is checked.
        let fd = unsafe { libc::open(c"/dev/null".as_ptr(), flags) };
        if fd < 0 {
            tracing::warn!(err = %Errno::last(), "cannot open /dev/null: children get an empty pipe");
            return None;
        }
        // SAFETY: open succeeded: a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: fstat fills `st` on success.
        let ok = unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) } == 0;
        // SAFETY: initialized when fstat succeeded.
        let chr = ok && unsafe { st.assume_init() }.st_mode & libc::S_IFMT == libc::S_IFCHR;
        if !chr {
            tracing::warn!("/dev/null is not a character device: children get an empty pipe");
            return None;
        }
        // Children share this open file description: leave it blocking, like theirs.
        if let Err(err) = fd::set_status_flags(&fd, nix::fcntl::OFlag::O_RDONLY) {
            tracing::debug!(%err, "/dev/null keeps its flags");
        }
        Some(fd)
    });
    match cached {
        Some(fd) => fd.try_clone().map_err(|e| io_error("dup(/dev/null)", &e)),
        None => pipe().map(|(r, _closed)| r),
    }
}

/// `pipe2(O_CLOEXEC)`: `(read end, write end)`.
pub(crate) fn pipe() -> Result<(OwnedFd, OwnedFd), SpawnError> {
    fd::pipe().map_err(|errno| SpawnError::Os {
        call: "pipe2",
        errno,
    })
}

pub(crate) fn set_nonblocking(fd: &OwnedFd) -> Result<(), SpawnError> {
    fd::set_nonblocking(fd).map_err(|errno| SpawnError::Os {
        call: "fcntl(O_NONBLOCK)",
        errno,
    })
}

pub(crate) fn io_error(call: &'static str, err: &std::io::Error) -> SpawnError {
    SpawnError::Os {
        call,
        errno: Errno::from_raw(err.raw_os_error().unwrap_or(libc::EIO)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};
    use std::time::{Duration, Instant};

    const DEADLINE: Duration = Duration::from_secs(10);

    /// [`launch`], then the outcome of its `execve` (the child is reaped by the test).
    fn launch(cfg: &DriverConfig, mask: &SigSet) -> Result<Launched, SpawnError> {
        let mut l = super::launch(cfg, mask)?;
        l.spawn.wait(DEADLINE)?;
        Ok(l)
    }

    fn os(v: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        v.iter().map(|(k, v)| (k.into(), v.into())).collect()
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn env_is_scrubbed() {
        let shim = os(&[
            ("PATH", "/bin"),
            ("AGENT_SHIM_TOKEN", "secret"),
            ("AGENT_SHIM_FD", "7"),
            ("HOME", "/root"),
            ("API_KEY", "k"),
        ]);
        let fd = ("AGENT_SHIM_FD", "3");
        assert_eq!(
            driver_env(shim.clone(), None, &[]),
            os(&[("PATH", "/bin"), ("HOME", "/root"), ("API_KEY", "k"), fd])
        );
        assert_eq!(
            driver_env(shim.clone(), None, &names(&["API_KEY", "NOPE"])),
            os(&[("PATH", "/bin"), ("HOME", "/root"), fd])
        );
        // The allow-list cannot bring the token or a stale fd variable back.
        let allow = names(&["PATH", "API_KEY", "AGENT_SHIM_TOKEN", "AGENT_SHIM_FD"]);
        assert_eq!(
            driver_env(shim.clone(), Some(&allow), &[]),
            os(&[("PATH", "/bin"), ("API_KEY", "k"), fd])
        );
        // Deny wins over allow.
        assert_eq!(
            driver_env(shim.clone(), Some(&allow), &names(&["PATH"])),
            os(&[("API_KEY", "k"), fd])
        );
        assert_eq!(driver_env(shim, Some(&[]), &[]), os(&[fd]));
    }

    #[test]
    fn user_parsing() {
        assert_eq!(parse_user("65534"), Ok((65534, 65534)));
        assert_eq!(parse_user("1000:100"), Ok((1000, 100)));
        assert_eq!(parse_user("0:0"), Ok((0, 0)));
        assert_eq!(parse_user("4294967294"), Ok((4294967294, 4294967294)));
        for bad in [
            "",
            ":",
            "1000:",
            ":1000",
            "nobody",
            "1000:users",
            "-1",
            "+5",
            " 5",
            "5 ",
            "1:2:3",
            "4294967295",
            "1:4294967295",
            "4294967296",
            "0x10",
        ] {
            let err = parse_user(bad).expect_err(bad);
            assert!(err.contains("UID:GID"), "{bad}: {err}");
        }
    }

    /// Kills (SIGKILL, whole group) and reaps the child on drop, unless already reaped.
    struct Child(Option<i32>);

    impl Child {
        /// Waits (bounded) for the exit status.
        fn wait(&mut self) -> i32 {
            let pid = self.0.take().expect("already reaped");
            let deadline = Instant::now() + DEADLINE;
            loop {
                let mut status = 0;
                // SAFETY: waitpid on our own child with a valid status pointer.
                let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
                assert!(r >= 0, "waitpid: {}", Errno::last());
                if r == pid {
                    return status;
                }
                if Instant::now() > deadline {
                    self.0 = Some(pid);
                    panic!("child {pid} did not exit in time");
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    impl Drop for Child {
        fn drop(&mut self) {
            if let Some(pid) = self.0.take() {
                // SAFETY: signalling and reaping our own child (and its group).
                unsafe {
                    libc::kill(-pid, libc::SIGKILL);
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, std::ptr::null_mut(), 0);
                }
            }
        }
    }

    /// Reads `fd` (non-blocking) until EOF, bounded by [`DEADLINE`].
    fn read_to_eof(fd: RawFd) -> String {
        let deadline = Instant::now() + DEADLINE;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no EOF in time; got {:?}",
                String::from_utf8_lossy(&out)
            );
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, left.as_millis().try_into().unwrap_or(1000)) };
            let mut buf = [0u8; 4096];
            // SAFETY: `buf` is a valid writable buffer.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            match n {
                0 => return String::from_utf8(out).unwrap(),
                n if n > 0 => out.extend_from_slice(&buf[..n as usize]),
                _ => assert_eq!(Errno::last(), Errno::EAGAIN),
            }
        }
    }

    fn sh(script: &str) -> DriverConfig {
        DriverConfig {
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            env: driver_env(std::env::vars_os(), Some(&names(&["PATH"])), &[]),
            ..Default::default()
        }
    }

    fn is_cloexec_nonblocking(fd: RawFd) -> bool {
        // SAFETY: F_GETFD/F_GETFL only read flags.
        unsafe {
            libc::fcntl(fd, libc::F_GETFD) & libc::FD_CLOEXEC != 0
                && libc::fcntl(fd, libc::F_GETFL) & libc::O_NONBLOCK != 0
        }
    }

    #[test]
    fn launch_gives_exactly_the_promised_fds() {
        // A descriptor the shim opened without CLOEXEC must not reach the driver.
        let null = std::fs::File::open("/dev/null").unwrap();
        // SAFETY: F_DUPFD makes a fresh descriptor ≥ 200, without CLOEXEC.
        let leaked = unsafe { libc::fcntl(null.as_raw_fd(), libc::F_DUPFD, 200) };
        assert!(leaked >= 200);
        // SAFETY: F_GETFD only reads flags.
        let flags = unsafe { libc::fcntl(leaked, libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, 0);
        let cfg = sh("ls /proc/self/fd; echo \"fd=$AGENT_SHIM_FD\"; id -u; pwd; echo oops >&2");
        let launched = launch(&cfg, &SigSet::empty());
        // SAFETY: closing the descriptor made above.
        unsafe { libc::close(leaked) };
        let l = launched.unwrap();
        let mut child = Child(Some(l.pid));
        for fd in [
            l.socket.as_raw_fd(),
            l.stdout.as_raw_fd(),
            l.stderr.as_raw_fd(),
        ] {
            assert!(is_cloexec_nonblocking(fd), "fd {fd}");
        }
        let out = read_to_eof(l.stdout.as_raw_fd());
        let err = read_to_eof(l.stderr.as_raw_fd());
        assert_eq!(child.wait(), 0, "stderr: {err}");
        let mut lines = out.lines();
        let fds: Vec<i32> = lines
            .by_ref()
            .take_while(|l| !l.starts_with("fd="))
            .map(|l| l.parse().unwrap())
            .collect();
        // 0..=3 plus the directory `ls` itself opened (the lowest free number: 4).
        assert_eq!(fds, [0, 1, 2, 3, 4], "{out}");
        let rest: Vec<&str> = lines.collect();
        // SAFETY: geteuid cannot fail.
        let uid = unsafe { libc::geteuid() }.to_string();
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(rest, [uid.as_str(), cwd.to_str().unwrap()], "{out}");
        assert!(out.contains("fd=3\n"), "{out}");
        assert_eq!(err, "oops\n");
        // The parent kept no copy of the driver's end: its exit is EOF on the socket.
        let mut sock = l.socket;
        sock.set_nonblocking(false).unwrap();
        sock.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(sock.read(&mut buf).unwrap(), 0);
    }

    #[test]
    fn socket_works_both_ways() {
        let cfg = sh("read line <&3; echo \"got $line\" >&3");
        let l = launch(&cfg, &SigSet::empty()).unwrap();
        let mut child = Child(Some(l.pid));
        let mut sock = l.socket;
        sock.set_nonblocking(false).unwrap();
        sock.set_read_timeout(Some(DEADLINE)).unwrap();
        sock.set_write_timeout(Some(DEADLINE)).unwrap();
        sock.write_all(b"ping\n").unwrap();
        let mut got = String::new();
        sock.read_to_string(&mut got).unwrap();
        assert_eq!(got, "got ping\n");
        assert_eq!(child.wait(), 0);
    }

    #[test]
    fn launch_in_workdir_as_another_user() {
        let dir = std::env::temp_dir().join(format!("agent-shim-driver-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cfg = sh("id -u; id -g; grep '^Groups:' /proc/self/status; pwd");
        cfg.user = Some((65534, 65533));
        cfg.workdir = Some(dir.clone());
        let res = launch(&cfg, &SigSet::empty());
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            // Without CAP_SETUID/CAP_SETGID the very first step is refused, and reported.
            let err = res.unwrap_err();
            let _child = Child(err.pid());
            assert!(
                matches!(
                    err,
                    SpawnError::Credentials {
                        call: "setgroups",
                        errno: Errno::EPERM,
                        ..
                    }
                ),
                "{err:?}"
            );
            std::fs::remove_dir_all(&dir).unwrap();
            return;
        }
        let l = res.unwrap();
        let mut child = Child(Some(l.pid));
        let out = read_to_eof(l.stdout.as_raw_fd());
        let err = read_to_eof(l.stderr.as_raw_fd());
        assert_eq!(child.wait(), 0, "{err}");
        let lines: Vec<&str> = out.lines().map(str::trim_end).collect();
        assert_eq!(
            lines,
            ["65534", "65533", "Groups:", dir.to_str().unwrap()],
            "{out}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn launch_failures() {
        // Not in PATH: nothing is forked.
        let mut cfg = sh("");
        cfg.argv = vec!["agent-shim-no-such-driver".into()];
        let err = launch(&cfg, &SigSet::empty()).unwrap_err();
        assert!(
            matches!(err, SpawnError::NotFound { pid: None, .. }),
            "{err:?}"
        );

        // A path that does not exist: the child's execve fails.
        cfg.argv = vec!["/nonexistent/driver".into()];
        let err = launch(&cfg, &SigSet::empty()).unwrap_err();
        let mut child = Child(err.pid());
        assert!(
            matches!(err, SpawnError::NotFound { pid: Some(_), .. }),
            "{err:?}"
        );
        assert_eq!(libc::WEXITSTATUS(child.wait()), 127);

        // A workdir that does not exist.
        let mut cfg = sh("true");
        cfg.workdir = Some("/nonexistent/dir".into());
        let err = launch(&cfg, &SigSet::empty()).unwrap_err();
        let mut child = Child(err.pid());
        assert!(
            matches!(
                err,
                SpawnError::Chdir {
                    errno: Errno::ENOENT,
                    pid: Some(_),
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(libc::WEXITSTATUS(child.wait()), 127);
    }

    #[test]
    fn driver_gets_the_fd_variable_even_if_cfg_env_lacks_it() {
        let mut cfg = sh("echo \"$AGENT_SHIM_FD\"");
        cfg.env = os(&[("PATH", "/usr/bin:/bin")]);
        let l = launch(&cfg, &SigSet::empty()).unwrap();
        let mut child = Child(Some(l.pid));
        assert_eq!(read_to_eof(l.stdout.as_raw_fd()), "3\n");
        assert_eq!(child.wait(), 0);
    }
}
