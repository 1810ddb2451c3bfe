//! Starting a tool process (`exec`): its pipes or pseudo-terminal, its environment, its user.
//!
//! Every exec runs in a new session (so in its own process group, which is what
//! `exec_signal`, the timeout and the kill after a drain address), with every descriptor but
//! 0–2 closed and the sandbox [`Limits`]:
//!
//! ```text
//!   pipes:  fd 0 /dev/null, or a pipe ◄── exec_input      (stdin: true)
//!           fd 1 pipe ──► exec_output{stream: stdout}
//!           fd 2 pipe ──► exec_output{stream: stderr}
//!   tty:    fd 0, 1, 2 the PTY's slave, its controlling terminal (setsid + TIOCSCTTY)
//!           master ◄──► exec_input / exec_output{stream: pty} / exec_resize (TIOCSWINSZ)
//! ```
//!
//! The PTY exists, with its initial size, before the process is forked, so a resize that
//! follows `exec_started` at once always finds it. Every descriptor made here is `CLOEXEC`
//! from birth and the shim's ends are non-blocking, as for the driver ([`crate::driver`]).
//! Users are numeric (`UID[:GID]`) or names looked up in `/etc/passwd` and `/etc/group` —
//! never through NSS, which a static binary does not have.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;

use driver_protocol::message::TtySize;
use nix::errno::Errno;
use nix::sys::signal::SigSet;

use crate::driver::{self, pipe, set_nonblocking};
use crate::limits::Limits;
use crate::spawn::{self, Grouping, Prepared, SpawnError, Spec};
use crate::sys::{fd, pty};

/// How to start one exec.
#[derive(Clone, Debug, Default)]
pub struct ExecConfig {
    /// `argv`; `argv[0]` is resolved in the exec's `PATH`.
    pub argv: Vec<OsString>,
    /// The complete environment (see [`exec_env`]).
    pub env: Vec<(OsString, OsString)>,
    /// Working directory; `None` keeps the shim's.
    pub cwd: Option<PathBuf>,
    /// `(uid, gid)`, supplementary groups dropped; `None` keeps the shim's.
    pub user: Option<(u32, u32)>,
    /// Run on a PTY of this size.
    pub tty: Option<TtySize>,
    /// Keep stdin open (a pipe) for `exec_input`; ignored with a PTY (always writable).
    pub stdin: bool,
    /// Rlimits, umask, `no_new_privs`.
    pub limits: Limits,
    /// How it enters its own cgroup ([`crate::cgroups`]).
    pub cgroup_join: crate::spawn::CgroupJoin,
}

/// The shim's ends of an exec's I/O: `CLOEXEC`, non-blocking.
#[derive(Debug)]
pub enum ExecIo {
    /// Plain pipes.
    Pipes {
        /// The write end of its stdin, with `stdin: true`.
        stdin: Option<OwnedFd>,
        /// The read end of its stdout.
        stdout: OwnedFd,
        /// The read end of its stderr.
        stderr: OwnedFd,
    },
    /// The PTY's master: input, output and size.
    Pty(OwnedFd),
}

/// A started exec.
#[derive(Debug)]
pub struct Started {
    /// Its pid, which is also its session and process group id.
    pub pid: i32,
    /// Its `execve`'s outcome, still to be learnt (see [`spawn::Pending`]).
    pub spawn: spawn::Pending,
    /// The shim's ends of its I/O.
    pub io: ExecIo,
}

/// Forks `cfg` (see the module docs) and returns at once. The caller registers `pid` with
/// the reaper before anything can reap, then learns from [`Started::spawn`] whether the
/// `execve` succeeded, as for [`driver::launch`].
pub fn start(cfg: &ExecConfig, mask: &SigSet) -> Result<Started, SpawnError> {
    let mut spec = Spec::new(cfg.argv.clone(), cfg.env.clone());
    spec.cwd = cfg.cwd.clone();
    spec.grouping = Grouping::NewSession;
    spec.foreground = false;
    spec.mask = *mask;
    spec.user = cfg.user;
    spec.limits = cfg.limits.clone();
    spec.cgroup_join = cfg.cgroup_join.clone();
    spec.close_other_fds = true;
    match cfg.tty {
        Some(size) => {
            let (master, slave) = openpty(size)?;
            set_nonblocking(&master)?;
            spec.ctty = true;
            spec.fds = (0..3).map(|fd| (slave.as_raw_fd(), fd)).collect();
            let prepared = Prepared::new(&spec)?;
            let pending = spawn::start(&prepared)?;
            // Our copies of the slave go: the master reads EIO once every process holding
            // the terminal is gone.
            drop(prepared);
            drop(slave);
            Ok(Started {
                pid: pending.pid(),
                spawn: pending,
                io: ExecIo::Pty(master),
            })
        }
        None => {
            let (stdin_r, stdin_w) = if cfg.stdin {
                let (r, w) = pipe()?;
                set_nonblocking(&w)?;
                (r, Some(w))
            } else {
                (driver::dev_null()?, None)
            };
            let (out_r, out_w) = pipe()?;
            let (err_r, err_w) = pipe()?;
            grow_pipe(&out_r);
            set_nonblocking(&out_r)?;
            set_nonblocking(&err_r)?;
            spec.fds = vec![
                (stdin_r.as_raw_fd(), libc::STDIN_FILENO),
                (out_w.as_raw_fd(), libc::STDOUT_FILENO),
                (err_w.as_raw_fd(), libc::STDERR_FILENO),
            ];
            let prepared = Prepared::new(&spec)?;
            let pending = spawn::start(&prepared)?;
            drop(prepared);
            drop((stdin_r, out_w, err_w));
            Ok(Started {
                pid: pending.pid(),
                spawn: pending,
                io: ExecIo::Pipes {
                    stdin: stdin_w,
                    stdout: out_r,
                    stderr: err_r,
                },
            })
        }
    }
}

/// `openpty` with the initial size; both ends `CLOEXEC` (see [`crate::sys::pty::open`]).
fn openpty(size: TtySize) -> Result<(OwnedFd, OwnedFd), SpawnError> {
    pty::open(size.rows, size.cols).map_err(|errno| SpawnError::Os {
        call: "openpty",
        errno,
    })
}

/// Sets the terminal size of the PTY whose master is `master` (the kernel sends SIGWINCH to
/// its foreground process group).
pub fn resize(master: &OwnedFd, size: TtySize) -> Result<(), Errno> {
    pty::resize(master, size.rows, size.cols)
}

/// An exec's environment: the driver's scrubbed base ([`driver::driver_env`]) without
/// `AGENT_SHIM_FD`, then `extra` on top (replacing variables of the same name). The token
/// never gets in, not even through `extra`.
pub fn exec_env(
    vars: impl IntoIterator<Item = (OsString, OsString)>,
    allow: Option<&[String]>,
    deny: &[String],
    extra: &BTreeMap<String, String>,
) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = driver::driver_env(vars, allow, deny)
        .into_iter()
        .filter(|(k, _)| k != driver::FD_VAR && !extra.contains_key(&*k.to_string_lossy()))
        .collect();
    env.extend(
        extra
            .iter()
            .filter(|(k, _)| k.as_str() != driver::TOKEN_VAR)
            .map(|(k, v)| (k.into(), v.into())),
    );
    env
}

/// Resolves an exec's `user`: `UID[:GID]` (numeric), or `NAME[:GROUP]` looked up in the
/// text of `/etc/passwd` (`passwd`) and `/etc/group` (`group`); a name without a group runs
/// with the user's primary group.
pub fn resolve_user(spec: &str, passwd: &str, group: &str) -> Result<(u32, u32), String> {
    if let Ok(ids) = driver::parse_user(spec) {
        return Ok(ids);
    }
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let numeric = |s: &str| s.bytes().all(|b| b.is_ascii_digit()) && !s.is_empty();
    let (uid, primary) = if numeric(user) {
        let uid = user
            .parse::<u32>()
            .map_err(|_| format!("invalid uid {user:?}"))?;
        (uid, uid)
    } else {
        lookup(passwd, user)
            .and_then(|f| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))
            .ok_or_else(|| format!("unknown user {user:?}"))?
    };
    let gid = match grp {
        None => primary,
        Some(g) if numeric(g) => g.parse().map_err(|_| format!("invalid gid {g:?}"))?,
        Some(g) => lookup(group, g)
            .and_then(|f| f.get(2)?.parse().ok())
            .ok_or_else(|| format!("unknown group {g:?}"))?,
    };
    if uid == u32::MAX || gid == u32::MAX {
        return Err(format!("invalid user {spec:?}"));
    }
    Ok((uid, gid))
}

/// Largest `/etc/passwd` or `/etc/group` read for a user name.
const USER_DB_MAX: u64 = 4 * 1024 * 1024;

/// Reads `/etc/passwd` or `/etc/group` (`path`) for [`resolve_user`], on the supervisor's
/// loop, so never blocking and bounded: the tenant (root in the sandbox) may have replaced it
/// with a FIFO, a device or a huge file. A missing file reads as empty (every name is
/// unknown); anything but a regular file of at most [`USER_DB_MAX`] bytes is an error.
pub fn read_user_db(path: &std::path::Path) -> Result<String, String> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path);
    let file = match file {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let is_file = file.metadata().is_ok_and(|m| m.is_file());
    if !is_file {
        return Err(format!("{} is not a regular file", path.display()));
    }
    let mut text = Vec::new();
    file.take(USER_DB_MAX + 1)
        .read_to_end(&mut text)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if text.len() as u64 > USER_DB_MAX {
        return Err(format!("{} is over {USER_DB_MAX} bytes", path.display()));
    }
    Ok(String::from_utf8_lossy(&text).into_owned())
}

/// The `:`-separated fields of the first line of `db` whose first field is `name`.
fn lookup<'a>(db: &'a str, name: &str) -> Option<Vec<&'a str>> {
    if name.is_empty() {
        return None;
    }
    db.lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.first() == Some(&name))
}

/// The capacity asked for an exec's stdout pipe: twice the default, so that a tool writing
/// fast is read in a few large chunks rather than many small ones (best effort: over
/// `/proc/sys/fs/pipe-max-size`, or past the user's pipe quota, the default stays).
const STDOUT_PIPE_SIZE: i32 = 256 * 1024;

fn grow_pipe(fd: &OwnedFd) {
    if let Err(err) = fd::set_pipe_size(fd, STDOUT_PIPE_SIZE) {
        tracing::debug!(%err, "exec stdout pipe keeps its size");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                          nobody:x:65534:65534:nobody:/:/usr/sbin/nologin\n\
                          agent:x:1000:100::/home/agent:/bin/sh\n\
                          broken:x:abc:1::/:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nusers:x:100:agent\nnogroup:x:65534:\n";

    #[test]
    fn users_resolve_without_nss() {
        let r = |s| resolve_user(s, PASSWD, GROUP);
        assert_eq!(r("1000"), Ok((1000, 1000)));
        assert_eq!(r("1000:5"), Ok((1000, 5)));
        assert_eq!(r("agent"), Ok((1000, 100)));
        assert_eq!(r("nobody"), Ok((65534, 65534)));
        assert_eq!(r("agent:nogroup"), Ok((1000, 65534)));
        assert_eq!(r("agent:7"), Ok((1000, 7)));
        assert_eq!(r("1000:users"), Ok((1000, 100)));
        for bad in [
            "ghost",
            "agent:ghosts",
            "broken",
            "",
            ":",
            "agent:",
            "4294967295",
        ] {
            assert!(r(bad).is_err(), "{bad}: {:?}", r(bad));
        }
    }

    #[test]
    fn exec_env_is_the_scrubbed_base_plus_extra() {
        let os = |v: &[(&str, &str)]| -> Vec<(OsString, OsString)> {
            v.iter().map(|(k, v)| (k.into(), v.into())).collect()
        };
        let shim = os(&[
            ("PATH", "/bin"),
            ("AGENT_SHIM_TOKEN", "secret"),
            ("AGENT_SHIM_FD", "7"),
            ("HOME", "/root"),
        ]);
        let extra: BTreeMap<String, String> = [
            ("HOME".to_owned(), "/tmp".to_owned()),
            ("X".to_owned(), "1".to_owned()),
            ("AGENT_SHIM_TOKEN".to_owned(), "nope".to_owned()),
        ]
        .into();
        assert_eq!(
            exec_env(shim.clone(), None, &[], &extra),
            os(&[("PATH", "/bin"), ("HOME", "/tmp"), ("X", "1")])
        );
        assert_eq!(
            exec_env(shim, None, &["PATH".to_owned()], &BTreeMap::new()),
            os(&[("HOME", "/root")])
        );
    }
}
