//! The operation's process: forked from the shim for one file operation, it drops to the
//! sandbox user and does the blocking work, answering on a socket the shim reads without
//! ever blocking.
//!
//! ```text
//!   shim (PID 1, its loop)                         operation process (uid of --user)
//!   fork ─────────────────────────────────────────► setgroups(0), setgid, setuid,
//!   pidfd_open(pid)                                 no_new_privs, not dumpable, no core,
//!   read records (async, bounded) ◄── socket ────── every fd but the socket closed;
//!   SIGKILL through the pidfd when the request      open the root, run the operation,
//!   is abandoned (its connection is gone)           write its records, _exit
//! ```
//!
//! The child is a `fork` without `exec`: it runs the shim's own code, which is sound because
//! supervisor mode runs on one thread (a current-thread runtime, no blocking pool), so no
//! lock of another thread can be held at the `fork`. The credential changes are raw
//! syscalls (the libc wrappers would broadcast to threads, see `spawn.rs`). The tenant may
//! `SIGSTOP` or `SIGKILL` the child (it runs as the tenant's uid), which stalls or fails that
//! one operation and nothing else; it cannot read or change its memory (the child is not
//! dumpable, so `ptrace` and `/proc/<pid>/mem` are closed to it). The child is reaped by the
//! shim's reaper like any orphan; the pidfd makes the kill safe against pid reuse.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use bytes::{Buf as _, Bytes, BytesMut};
use nix::errno::Errno;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use super::ops::{self, Failure, Out, CHUNK, DATA_HEAD, TAG_DONE, TAG_FAIL, TAG_FRAME, TAG_MSG};
use super::Op;
use driver_protocol::message::ShimToControl;
use driver_protocol::ErrorCode;

/// The largest message record a child may send (an `fs_list` page of 1000 long names fits).
const MSG_MAX: usize = 4 * 1024 * 1024;

/// The send buffer of each end of an operation's socket: four chunks.
const SOCK_BUF: libc::c_int = 4 * CHUNK as libc::c_int;

/// What an operation's process needs besides the operation.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The file root.
    pub root: CString,
    /// Run as this `(uid, gid)`, supplementary groups dropped; `None` keeps the shim's.
    pub user: Option<(u32, u32)>,
    /// The umask of created files and directories.
    pub umask: Option<u32>,
    /// Resolve by the component walk even where `openat2` exists.
    pub force_walk: bool,
}

/// One record from the child.
#[derive(Debug)]
pub enum Record {
    /// A whole `fs_data` frame (its length header included), checked to be one frame.
    Frame(Bytes),
    /// A reply, encoded, its `re` set (`fs_stat_reply`, `fs_list_reply`).
    Reply(Bytes),
    /// Done: the operation succeeded (or, for an upload or a watch, is set up).
    Done,
    /// Failed, with this code and message.
    Fail(ErrorCode, String),
    /// An `Event` body (a watch's `fs_event`).
    Event(Bytes),
}

/// A running operation's process, killed on drop unless it [`finished`](Helper::finished).
#[derive(Debug)]
pub struct Helper {
    pid: i32,
    pidfd: Option<OwnedFd>,
    /// Records from the child.
    pub rd: Records,
    /// Records to the child (an upload's bytes).
    pub wr: OwnedWriteHalf,
    done: bool,
}

/// The reading half of the child's socket, with its buffer.
#[derive(Debug)]
pub struct Records {
    sock: OwnedReadHalf,
    buf: BytesMut,
}

/// Forks the process for `op`. Must be called on the shim's (single) thread.
pub fn start(op: &Op, settings: &Settings) -> io::Result<Helper> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is a writable array of two descriptors.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: two fresh descriptors the kernel just returned, owned here.
    let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // Room for a few chunks each way, so a transfer is a few wake-ups a chunk, not one a
    // page (the default is under one chunk). Forced past `wmem_max` when PID 1 may; the
    // default stays otherwise. Kernel memory, bounded by `--fs-max-ops`.
    for fd in [&ours, &theirs] {
        let size: libc::c_int = SOCK_BUF;
        for opt in [libc::SO_SNDBUFFORCE, libc::SO_SNDBUF] {
            // SAFETY: a plain setsockopt on our descriptor with an int value.
            let set = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    std::ptr::from_ref(&size).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if set == 0 {
                break;
            }
        }
    }
    // SAFETY: supervisor mode runs on one thread, so the child may run ordinary code (it
    // allocates, it uses std); it never returns from `child`.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        drop(ours);
        child(op, settings, theirs);
    }
    drop(theirs);
    // Right after the fork, before anything can reap the child: the pidfd names this
    // process and no other, ever.
    // SAFETY: a plain syscall on a pid; returns a new descriptor or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let pidfd = (pidfd >= 0).then(|| {
        // SAFETY: a fresh descriptor the kernel just returned.
        unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) }
    });
    let std = std::os::unix::net::UnixStream::from(ours);
    std.set_nonblocking(true)?;
    let (rd, wr) = UnixStream::from_std(std)?.into_split();
    Ok(Helper {
        pid,
        pidfd,
        rd: Records {
            sock: rd,
            buf: BytesMut::with_capacity(CHUNK + DATA_HEAD),
        },
        wr,
        done: false,
    })
}

impl Helper {
    /// The child's pid, for logs.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The child gave its final answer: it exits by itself, and is not killed on drop.
    pub fn finished(&mut self) {
        self.done = true;
    }
}

/// Sends the child one record (an upload's bytes, or the commit).
pub async fn send(wr: &mut OwnedWriteHalf, tag: u8, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let mut head = [0u8; 5];
    head[0] = tag;
    head[1..].copy_from_slice(&len.to_be_bytes());
    // The head and the payload in one `writev`, neither copied.
    let mut done = 0;
    while done < head.len() {
        let bufs = [
            std::io::IoSlice::new(head.get(done..).unwrap_or_default()),
            std::io::IoSlice::new(payload),
        ];
        let n = wr.write_vectored(&bufs).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        done += n;
    }
    wr.write_all(payload.get(done - head.len()..).unwrap_or_default())
        .await
}

impl Records {
    /// The next record; `None` when the child closed its end (it exited or was killed).
    /// Cancel-safe (what was read stays in the buffer).
    pub async fn next(&mut self) -> io::Result<Option<Record>> {
        loop {
            if self.buf.len() >= 5 {
                let tag = self.buf[0];
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                let max = if tag == TAG_FRAME {
                    CHUNK + DATA_HEAD
                } else {
                    MSG_MAX
                };
                let known = matches!(
                    tag,
                    TAG_FRAME | TAG_MSG | TAG_DONE | TAG_FAIL | super::watch::TAG_EVENT
                );
                if !known || len > max {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "bad record from the operation's process",
                    ));
                }
                if self.buf.len() >= 5 + len {
                    self.buf.advance(5);
                    let payload = self.buf.split_to(len).freeze();
                    return Ok(Some(match tag {
                        TAG_MSG => Record::Reply(payload),
                        TAG_DONE => Record::Done,
                        TAG_FAIL => {
                            let mut parts = payload.splitn(2, |b| *b == 0);
                            let code = parts.next().unwrap_or_default();
                            let message = parts.next().unwrap_or_default();
                            Record::Fail(
                                ErrorCode::parse(&String::from_utf8_lossy(code)),
                                String::from_utf8_lossy(message).into_owned(),
                            )
                        }
                        TAG_FRAME => {
                            let head = payload.get(..4).unwrap_or_default();
                            let said = u32::from_be_bytes(head.try_into().unwrap_or([0xff; 4]));
                            if said as usize != payload.len().saturating_sub(4) {
                                return Err(io::Error::new(
                                    io::ErrorKind::InvalidData,
                                    "a bad frame from the operation's process",
                                ));
                            }
                            Record::Frame(payload)
                        }
                        _ => Record::Event(payload),
                    }));
                }
                self.buf.reserve(5 + len - self.buf.len());
            } else {
                self.buf.reserve(CHUNK + DATA_HEAD);
            }
            if self.sock.read_buf(&mut self.buf).await? == 0 {
                return Ok(None);
            }
        }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        match &self.pidfd {
            Some(fd) => {
                // SAFETY: a plain syscall on our pidfd; a process that already exited (even
                // reaped) is not signalled, and no other process can be.
                unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        fd.as_raw_fd(),
                        libc::SIGKILL,
                        std::ptr::null::<libc::siginfo_t>(),
                        0,
                    )
                };
            }
            // Without pidfds (Linux < 5.3) a pid may have been reused by the time we kill:
            // the process is left to finish (closing our end makes its writes fail).
            None => tracing::debug!(pid = self.pid, "operation process left to finish"),
        }
    }
}

/// The child: never returns.
fn child(op: &Op, settings: &Settings, sock: OwnedFd) -> ! {
    let code = match prepare(settings, &sock) {
        Ok(root) => {
            let stream = std::os::unix::net::UnixStream::from(sock);
            let input = stream.try_clone();
            let mut out = Out::new(io::BufWriter::with_capacity(CHUNK + DATA_HEAD, stream));
            // Unbuffered: an upload's chunk is read straight into its buffer, not copied
            // out of a reader's.
            let mut input = match input {
                Ok(s) => s,
                // SAFETY: `_exit` ends the process without running the parent's handlers.
                Err(_) => unsafe { libc::_exit(1) },
            };
            let run = ops::run(
                op,
                root.as_raw_fd(),
                settings.force_walk,
                &mut input,
                &mut out,
            );
            let sent = match run {
                Ok(ShimToControl::Ok(_)) => out.done(),
                Ok(msg) => out.msg(&msg),
                Err(f) => out.fail(&f),
            };
            i32::from(sent.and_then(|()| out.flush()).is_err())
        }
        Err(f) => {
            let stream = std::os::unix::net::UnixStream::from(sock);
            let mut out = Out::new(stream);
            i32::from(out.fail(&f).is_err())
        }
    };
    // SAFETY: `_exit` ends the process without running the parent's exit handlers.
    unsafe { libc::_exit(code) }
}

/// The child's setup: descriptors, credentials, and the root, opened as the user.
fn prepare(settings: &Settings, sock: &OwnedFd) -> Result<OwnedFd, Failure> {
    let keep = sock.as_raw_fd();
    // SAFETY: raw syscalls on this (single-threaded) child's own state.
    unsafe {
        // Every inherited descriptor but stdio and the socket: the control sockets, the
        // driver's, the listener. CLOEXEC would not close them (there is no exec).
        for (lo, hi) in [(3, keep - 1), (keep + 1, i32::MAX)] {
            if lo <= hi && libc::syscall(libc::SYS_close_range, lo as u32, hi as u32, 0u32) != 0 {
                for fd in lo..hi.min(4096) {
                    libc::close(fd);
                }
            }
        }
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        );
        libc::prctl(libc::PR_SET_DUMPABLE, 0 as libc::c_ulong, 0, 0, 0);
        let none = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &none);
        if let Some((uid, gid)) = settings.user {
            let failed = |what: &str| Failure::errno(Errno::last(), what);
            if libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>()) != 0 {
                return Err(failed("setgroups"));
            }
            if libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0 {
                return Err(failed("setresgid"));
            }
            if libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0 {
                return Err(failed("setresuid"));
            }
            // The credential change reset it; set again for certainty.
            libc::prctl(libc::PR_SET_DUMPABLE, 0 as libc::c_ulong, 0, 0, 0);
        }
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0);
        if let Some(mask) = settings.umask {
            libc::umask(mask as libc::mode_t);
        }
        let fd = libc::open(
            settings.root.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        );
        if fd < 0 {
            return Err(Failure::errno(Errno::last(), "the file root"));
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}
