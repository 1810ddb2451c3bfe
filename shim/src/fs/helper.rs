//! The operation's process: forked from the shim for a file operation, it drops to the
//! sandbox user and does the blocking work, answering on a socket the shim reads without
//! ever blocking. A process forked to serve takes further operations ([`TAG_OP`] records)
//! on that socket, one at a time, until the shim closes it or kills it (`mod.rs`, the pool).
//!
//! ```text
//!   shim (PID 1, its loop)                         operation process (uid of --user)
//!   fork ─────────────────────────────────────────► setgroups(0), setgid, setuid,
//!   pidfd_open(pid)                                 no_new_privs, not dumpable, no core,
//!   read records (async, bounded) ◄── socket ────── every fd but the socket closed;
//!   SIGKILL through the pidfd when the request      open the root, run the operation,
//!   is abandoned (its connection is gone)           write its records, _exit (or, serving,
//!   send the next operation (TAG_OP) ────────────►  read the next operation, open the root…)
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
use crate::spare;
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

/// A record tag (shim to a serving process): the next operation follows ([`encode_op`]).
pub const TAG_OP: u8 = b'O';

/// Forks the process for `op`; with `serve`, the process then serves further operations
/// sent to it ([`encode_op`]) until its socket is closed. Must be called on the shim's
/// (single) thread.
pub fn start(op: &Op, settings: &Settings, serve: bool) -> io::Result<Helper> {
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
        child(op, settings, theirs, serve);
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

    /// Whether this process, which gave its final answer and serves, may take another
    /// operation: it is neither gone nor stopped (`waitid` through the pidfd, the status
    /// left for the reaper) and said nothing since. A process without a pidfd is never
    /// reused (it could not be killed safely).
    pub fn idle_ok(&mut self) -> bool {
        // From here on it is killed on drop, as any process that may be busy.
        self.done = false;
        let Some(fd) = &self.pidfd else {
            return false;
        };
        if !self.rd.buf.is_empty() {
            return false;
        }
        // SAFETY: an all-zero `siginfo_t` is a valid value; `waitid` writes it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: a plain syscall on our pidfd with a writable `siginfo_t`.
        let r = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                fd.as_raw_fd() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WSTOPPED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // SAFETY: `si_pid` is valid for the child statuses `waitid` reports, zero if none.
        if r != 0 || unsafe { info.si_pid() } != 0 {
            return false;
        }
        let mut byte = 0u8;
        // SAFETY: a non-blocking peek of one byte into `byte`.
        let n = unsafe {
            libc::recv(
                self.rd.sock.as_ref().as_raw_fd(),
                std::ptr::from_mut(&mut byte).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        // Nothing to read and not closed: idle, as it should be.
        n < 0 && Errno::last() == Errno::EAGAIN
    }
}

/// An operation as a [`TAG_OP`] record's payload, for a serving process; `None` for an
/// upload or a watch (a process of their own), or one too large for a record.
pub fn encode_op(op: &Op) -> Option<Vec<u8>> {
    fn s(w: &mut Vec<u8>, v: &str) {
        w.extend_from_slice(&u32::try_from(v.len()).unwrap_or(u32::MAX).to_be_bytes());
        w.extend_from_slice(v.as_bytes());
    }
    fn o(w: &mut Vec<u8>, v: Option<u64>) {
        w.push(u8::from(v.is_some()));
        w.extend_from_slice(&v.unwrap_or_default().to_be_bytes());
    }
    let mut w = Vec::with_capacity(64);
    let (kind, id) = match op {
        Op::Stat(m) => (b's', m.id),
        Op::List(m) => (b'l', m.id),
        Op::Read(m) => (b'r', m.id),
        Op::Mkdir(m) => (b'm', m.id),
        Op::Remove(m) => (b'x', m.id),
        Op::Rename(m) => (b'n', m.id),
        Op::Write(_) | Op::Watch(_) => return None,
    };
    w.push(kind);
    w.extend_from_slice(&id.to_be_bytes());
    match op {
        Op::Stat(m) => {
            s(&mut w, &m.path);
            w.push(u8::from(m.follow));
        }
        Op::List(m) => {
            s(&mut w, &m.path);
            w.push(u8::from(m.after.is_some()));
            s(&mut w, m.after.as_deref().unwrap_or_default());
            o(&mut w, m.limit.map(u64::from));
        }
        Op::Read(m) => {
            s(&mut w, &m.path);
            w.extend_from_slice(&m.offset.to_be_bytes());
            o(&mut w, m.length);
        }
        Op::Mkdir(m) => {
            s(&mut w, &m.path);
            w.push(u8::from(m.parents));
            o(&mut w, m.mode.map(u64::from));
        }
        Op::Remove(m) => {
            s(&mut w, &m.path);
            w.push(u8::from(m.recursive));
        }
        Op::Rename(m) => {
            s(&mut w, &m.from);
            s(&mut w, &m.to);
        }
        Op::Write(_) | Op::Watch(_) => return None,
    }
    (w.len() <= MSG_MAX).then_some(w)
}

/// The operation of a [`TAG_OP`] record's payload; `None` if it is not one.
pub fn decode_op(b: &[u8]) -> Option<Op> {
    use driver_protocol::message::{FsList, FsMkdir, FsRead, FsRemove, FsRename, FsStat};
    struct R<'a>(&'a [u8]);
    impl R<'_> {
        fn take(&mut self, n: usize) -> Option<&[u8]> {
            let (a, b) = (self.0.get(..n)?, self.0.get(n..)?);
            self.0 = b;
            Some(a)
        }
        fn u8(&mut self) -> Option<u8> {
            self.take(1)?.first().copied()
        }
        fn flag(&mut self) -> Option<bool> {
            self.u8().map(|b| b != 0)
        }
        fn u64(&mut self) -> Option<u64> {
            Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
        }
        fn s(&mut self) -> Option<String> {
            let n = u32::from_be_bytes(self.take(4)?.try_into().ok()?) as usize;
            String::from_utf8(self.take(n)?.to_vec()).ok()
        }
        fn o(&mut self) -> Option<Option<u64>> {
            let some = self.flag()?;
            let v = self.u64()?;
            Some(some.then_some(v))
        }
    }
    let mut r = R(b);
    let kind = r.u8()?;
    let id = r.u64()?;
    let op = match kind {
        b's' => Op::Stat(FsStat {
            id,
            path: r.s()?,
            follow: r.flag()?,
        }),
        b'l' => {
            let path = r.s()?;
            let some = r.flag()?;
            let after = r.s()?;
            let limit = r.o()?.map(|v| u32::try_from(v).unwrap_or(u32::MAX));
            Op::List(FsList {
                id,
                path,
                after: some.then_some(after),
                limit,
            })
        }
        b'r' => Op::Read(FsRead {
            id,
            path: r.s()?,
            offset: r.u64()?,
            length: r.o()?,
        }),
        b'm' => Op::Mkdir(FsMkdir {
            id,
            path: r.s()?,
            parents: r.flag()?,
            mode: r.o()?.map(|v| u32::try_from(v).unwrap_or(u32::MAX)),
        }),
        b'x' => Op::Remove(FsRemove {
            id,
            path: r.s()?,
            recursive: r.flag()?,
        }),
        b'n' => Op::Rename(FsRename {
            id,
            from: r.s()?,
            to: r.s()?,
        }),
        _ => return None,
    };
    r.0.is_empty().then_some(op)
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
                self.room(5 + len - self.buf.len());
            } else {
                self.room(CHUNK + DATA_HEAD);
            }
            if self.sock.read_buf(&mut self.buf).await? == 0 {
                return Ok(None);
            }
        }
    }
}

impl Records {
    /// Room for `need` more bytes. A frame taken off the buffer is a slice of it until it is
    /// written to the client, so a buffer still shared is given up for a spare one whose
    /// frames are gone (or a fresh one), not grown in a fresh allocation every chunk.
    fn room(&mut self, need: usize) {
        if self.buf.capacity() - self.buf.len() >= need || self.buf.try_reclaim(need) {
            return;
        }
        // Room for a whole record with its head (what is held and needed never exceeds
        // it): every spare fits any later need.
        spare::keep(spare::renew(&mut self.buf, need, 5 + CHUNK + DATA_HEAD));
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

/// Runs `op` beneath `root`; data goes to `out` as it is read, the final message is returned.
fn run<R: io::Read, W: io::Write>(
    op: &Op,
    root: RawFd,
    walk: bool,
    input: &mut R,
    out: &mut Out<W>,
) -> Result<ShimToControl, Failure> {
    match op {
        Op::Write(m) => ops::write(m, root, walk, input, out),
        Op::Watch(m) => super::watch::run(m, root, walk, out),
        Op::Stat(m) => ops::stat(m, root, walk),
        Op::List(m) => ops::list(m, root, walk),
        Op::Read(m) => ops::read(m, root, walk, out),
        Op::Mkdir(m) => ops::mkdir(m, root, walk),
        Op::Remove(m) => ops::remove(m, root, walk),
        Op::Rename(m) => ops::rename(m, root, walk),
    }
}

/// The child: never returns. With `serve`, after `op` it reads further operations
/// ([`TAG_OP`] records) and runs each in turn, until the shim closes its end.
fn child(op: &Op, settings: &Settings, sock: OwnedFd, serve: bool) -> ! {
    let code = match prepare(settings, &sock) {
        Ok(()) => {
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
            let mut next: Option<Op> = None;
            loop {
                let op = next.as_ref().unwrap_or(op);
                let run = open_root(settings).and_then(|root| {
                    run(
                        op,
                        root.as_raw_fd(),
                        settings.force_walk,
                        &mut input,
                        &mut out,
                    )
                });
                let sent = match run {
                    Ok(ShimToControl::Ok(_)) => out.done(),
                    Ok(msg) => out.msg(&msg),
                    Err(f) => out.fail(&f),
                };
                if sent.and_then(|()| out.flush()).is_err() {
                    break 1;
                }
                if !serve {
                    break 0;
                }
                match next_op(&mut input) {
                    Some(Some(op)) => next = Some(op),
                    Some(None) => break 1,
                    None => break 0,
                }
            }
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

/// The next operation for a serving child: `None` when the shim closed its end,
/// `Some(None)` for anything else than an operation.
fn next_op(input: &mut impl io::Read) -> Option<Option<Op>> {
    let mut head = [0u8; 5];
    input.read_exact(&mut head).ok()?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if head[0] != TAG_OP || len > MSG_MAX {
        return Some(None);
    }
    let mut payload = vec![0u8; len];
    if input.read_exact(&mut payload).is_err() {
        return Some(None);
    }
    Some(decode_op(&payload))
}

/// The file root, opened as the user (again for each operation: a root replaced since the
/// last one is the one used).
fn open_root(settings: &Settings) -> Result<OwnedFd, Failure> {
    // SAFETY: a NUL-terminated path; the result is a new descriptor or -1.
    let fd = unsafe {
        libc::open(
            settings.root.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(Failure::errno(Errno::last(), "the file root"));
    }
    // SAFETY: a fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The child's setup: descriptors and credentials.
fn prepare(settings: &Settings, sock: &OwnedFd) -> Result<(), Failure> {
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
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use driver_protocol::message::{FsList, FsMkdir, FsRead, FsRemove, FsRename, FsStat};

    use super::*;

    /// Every one-shot operation goes to a serving process and back as it was, options
    /// present or not; uploads and watches are not sent; a cut or padded record is refused.
    #[test]
    fn operations_go_to_a_serving_process_exactly() {
        let ops = [
            Op::Stat(FsStat {
                id: 1,
                path: "a/b".into(),
                follow: true,
            }),
            Op::List(FsList {
                id: u64::MAX,
                path: String::new(),
                after: Some("ü".into()),
                limit: Some(7),
            }),
            Op::List(FsList {
                id: 3,
                path: "d".into(),
                after: None,
                limit: None,
            }),
            Op::Read(FsRead {
                id: 4,
                path: "f".into(),
                offset: 1 << 40,
                length: Some(0),
            }),
            Op::Read(FsRead {
                id: 5,
                path: "f".into(),
                offset: 0,
                length: None,
            }),
            Op::Mkdir(FsMkdir {
                id: 6,
                path: "m".into(),
                parents: true,
                mode: Some(0o700),
            }),
            Op::Remove(FsRemove {
                id: 7,
                path: "r".into(),
                recursive: true,
            }),
            Op::Rename(FsRename {
                id: 8,
                from: "x".into(),
                to: "y/z".into(),
            }),
        ];
        for op in ops {
            let payload = encode_op(&op).expect("a one-shot operation");
            let back = decode_op(&payload).expect("decodes");
            assert_eq!(format!("{back:?}"), format!("{op:?}"));
            for cut in 0..payload.len() {
                assert!(decode_op(&payload[..cut]).is_none(), "{op:?} cut at {cut}");
            }
            let mut padded = payload.clone();
            padded.push(0);
            assert!(decode_op(&padded).is_none());
        }
        let write = Op::Write(driver_protocol::message::FsWriteOpen {
            id: 9,
            path: "w".into(),
            mode: None,
            parents: false,
            append: false,
            handle: None,
        });
        assert!(encode_op(&write).is_none());
        assert!(decode_op(b"q\0\0\0\0\0\0\0\x01").is_none());
    }
}
