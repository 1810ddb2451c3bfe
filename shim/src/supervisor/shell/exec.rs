//! The execs' I/O as the shell does it: starting one, reading its output into bounded
//! `exec_output` chunks, writing `exec_input` to its stdin or terminal, resizing it, and
//! closing it when the core says so.
//!
//! All execs are polled by one branch of the loop's `select!` ([`exec_ready`]), round robin,
//! so a chatty exec cannot starve the others. **Backpressure:** an exec's output is not read
//! while its consumer is behind — the control server's replay buffer is full (control-owned),
//! or more than [`DRIVER_QUEUE_HIGH`] bytes wait for the driver (driver-owned) — so the
//! process blocks on its own pipe and nothing is buffered without bound or lost below the cap.
//! After its process exited, what is left is read regardless (bounded: one pipe's content)
//! when the drain ends.

use std::collections::BTreeMap;
use std::future::poll_fn;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::task::Poll;
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use driver_protocol::message::{
    ErrorMsg, Event, Exec, ExecInput, ExecOutput, OutputStream, ShimToControl, ShimToDriver,
    TtySize,
};
use driver_protocol::ErrorCode;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tracing::{debug, warn};

use crate::cgroups::ExecCgroup;
use crate::control::ControlServer;
use crate::exec::{self, ExecConfig, ExecIo};
use crate::limits::Limits;
use crate::spawn::SpawnError;

use super::super::core::{ExecOwner, Refusal};
use super::super::Owner;
use super::spawning::{ReplyTo, SpawnFor};
use super::Shell;

/// Largest `exec_output` chunk: large enough that a fast writer costs few events and
/// syscalls, far below the 16 MiB frame limit (PROTOCOL.md §4).
const CHUNK: usize = 128 * 1024;

/// Chunks read from one descriptor per turn of the loop.
const READS_PER_TURN: usize = 4;

/// Over this many bytes queued for the driver, its execs' output is not read.
pub(super) const DRIVER_QUEUE_HIGH: usize = 1024 * 1024;

/// Bytes of `exec_input` that may wait for one exec's stdin; more is refused (`limit`).
const INPUT_QUEUE_MAX: usize = 16 * 1024 * 1024;

/// Bytes of `exec_input` that may wait for all execs together: with `--max-execs` slots
/// full, the per-exec bound alone would let a peer park gigabytes in PID 1.
const INPUT_TOTAL_MAX: usize = 64 * 1024 * 1024;

/// The byte a terminal reads as end of file (VEOF, Ctrl-D, in canonical mode).
const TTY_EOF: u8 = 0x04;

/// One output descriptor of an exec.
pub(super) struct OutFd {
    fd: AsyncFd<OwnedFd>,
    stream: OutputStream,
}

/// The shell's side of one exec.
pub(super) struct ExecIoState {
    owner: ExecOwner,
    /// stdout and stderr, or the terminal; closed ones are `None`.
    outs: Vec<Option<OutFd>>,
    /// The stdin pipe (pipes mode).
    stdin: Option<AsyncFd<OwnedFd>>,
    /// The terminal's master, for input and resizes (PTY mode); shared with `outs[0]`'s
    /// descriptor number but owned separately (a duplicate).
    pty: Option<AsyncFd<OwnedFd>>,
    /// Input waiting for the process.
    inq: BytesMut,
    /// Close stdin (or send EOF on the terminal) once `inq` is written.
    in_eof: bool,
}

impl ExecIoState {
    fn input_fd(&self) -> Option<&AsyncFd<OwnedFd>> {
        self.pty.as_ref().or(self.stdin.as_ref())
    }

    fn input_pending(&self) -> bool {
        self.input_fd().is_some() && (!self.inq.is_empty() || self.in_eof)
    }
}

/// Which consumers can take exec output now (see the module docs).
#[derive(Clone, Copy, Debug)]
pub(super) struct Gate {
    pub control_full: bool,
    pub driver_pid: i32,
    pub driver_ok: bool,
}

impl Gate {
    fn open(self, owner: ExecOwner) -> bool {
        match owner {
            ExecOwner::Control => !self.control_full,
            // The output of a driver that is gone is read and dropped.
            ExecOwner::Driver(pid) => pid != self.driver_pid || self.driver_ok,
        }
    }
}

/// What [`exec_ready`] found.
#[derive(Clone, Copy, Debug)]
pub(super) enum Ready {
    /// Output descriptor `n` of the exec is readable.
    Read(u64, usize),
    /// Its input descriptor is writable.
    Write(u64),
}

/// Waits until an exec has output to read (if its gate is open) or input that can be
/// written; starts looking after `cursor` (round robin).
pub(super) async fn exec_ready(
    execs: &BTreeMap<u64, ExecIoState>,
    gate: Gate,
    cursor: u64,
) -> Ready {
    if execs.is_empty() {
        return std::future::pending().await;
    }
    poll_fn(|cx| {
        let order = execs.range(cursor..).chain(execs.range(..cursor));
        for (&id, io) in order {
            if gate.open(io.owner) {
                for (n, out) in io.outs.iter().enumerate() {
                    if let Some(out) = out {
                        if out.fd.poll_read_ready(cx).is_ready() {
                            return Poll::Ready(Ready::Read(id, n));
                        }
                    }
                }
            }
            if io.input_pending() {
                if let Some(fd) = io.input_fd() {
                    if fd.poll_write_ready(cx).is_ready() {
                        return Poll::Ready(Ready::Write(id));
                    }
                }
            }
        }
        Poll::Pending
    })
    .await
}

fn register(fd: OwnedFd, what: &str) -> Option<AsyncFd<OwnedFd>> {
    // `new` is deprecated for types that do not own their descriptor; an `OwnedFd` moved
    // into the `AsyncFd` is owned by it alone and closed only when it is dropped, which is
    // the condition `register` asks for (and `new` also exists in older tokios).
    #[allow(deprecated, reason = "an OwnedFd owned by the AsyncFd alone: sound")]
    let registered = AsyncFd::new(fd);
    match registered {
        Ok(fd) => Some(fd),
        Err(err) => {
            warn!(%err, what, "cannot register an exec descriptor");
            None
        }
    }
}

pub(super) fn refusal_of(err: &SpawnError) -> Refusal {
    let code = match err {
        SpawnError::Timeout { .. } => ErrorCode::Timeout,
        SpawnError::NotFound { .. } => ErrorCode::NotFound,
        SpawnError::Empty
        | SpawnError::Nul
        | SpawnError::NotExecutable { .. }
        | SpawnError::Chdir { .. }
        | SpawnError::Credentials { .. }
        | SpawnError::Limits { .. } => ErrorCode::Invalid,
        SpawnError::ChildSetup { .. } | SpawnError::Os { .. } => ErrorCode::Internal,
    };
    (code, err.to_string())
}

/// Reads from `fd` into the spare capacity of `buf` (at most `max` bytes, and at most what
/// it has), extending it by what was read.
fn read_fd_into(fd: &OwnedFd, buf: &mut BytesMut, max: usize) -> io::Result<usize> {
    let spare = buf.spare_capacity_mut();
    let len = spare.len().min(max);
    // SAFETY: `spare` is valid for writes of `len <= spare.len()` bytes; read(2) writes at
    // most that many and initializes exactly the `n` it reports.
    let n = unsafe { libc::read(fd.as_raw_fd(), spare.as_mut_ptr().cast(), len) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = usize::try_from(n).unwrap_or(0).min(len);
    // SAFETY: the first `n` spare bytes were initialized by read(2), and `n` is within the
    // capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// Writes `buf` to `fd`.
fn write_fd(fd: &OwnedFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a valid readable buffer of `buf.len()` bytes.
    let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(n).unwrap_or(0))
}

impl Shell<'_> {
    /// The gate for [`exec_ready`] as things stand.
    pub(super) fn exec_gate(&self) -> Gate {
        let link_queue = self.link_queued();
        Gate {
            control_full: self.control.as_ref().is_some_and(ControlServer::is_full),
            driver_pid: self.driver_pid,
            driver_ok: link_queue.is_some_and(|q| q < DRIVER_QUEUE_HIGH) || link_queue.is_none(),
        }
    }

    /// Starts the exec `req` for `owner`: the core admits it ([`Shell::exec_admitted`], which
    /// forks it, and `to` is answered once its `execve` is decided: see [`super::spawning`])
    /// or refuses it ([`Shell::exec_refused`]); `to` is answered at once when its user cannot
    /// be resolved.
    pub(super) fn start_exec(&mut self, owner: ExecOwner, req: Exec, to: ReplyTo) {
        match self.exec_user(&req) {
            Ok(user) => {
                self.core.exec_admit(owner, &req, user);
                self.admitting.push_back((req, to));
            }
            Err(refusal) => self.refuse_exec(to, &req, refusal),
        }
    }

    /// `Output::ExecAdmitted`: forks the oldest request waiting for the core's verdict.
    pub(super) fn exec_admitted(&mut self, id: u64, owner: ExecOwner, user: Option<(u32, u32)>) {
        let Some((req, to)) = self.admitting.pop_front() else {
            warn!(exec_id = id, "an admitted exec without a request");
            return;
        };
        match self.fork_exec(id, owner, &req, user) {
            Ok(started) => {
                let what = SpawnFor::Exec {
                    id,
                    owner,
                    re: req.id,
                    to,
                    io: started.io,
                };
                self.track_spawn(started.spawn, what);
            }
            Err(refusal) => self.refuse_exec(to, &req, refusal),
        }
    }

    /// `Output::ExecRefused`: answers the oldest request waiting for the core's verdict.
    pub(super) fn exec_refused(&mut self, code: ErrorCode, message: String) {
        match self.admitting.pop_front() {
            Some((req, to)) => self.refuse_exec(to, &req, (code, message)),
            None => warn!(%code, message, "a refused exec without a request"),
        }
    }

    /// The uid and gid an exec request runs as: its `user`, else `--user`.
    fn exec_user(&self, req: &Exec) -> Result<Option<(u32, u32)>, Refusal> {
        let invalid = |m| (ErrorCode::Invalid, m);
        Ok(match &req.user {
            // Numeric: no file to read.
            Some(u) if crate::driver::parse_user(u).is_ok() => {
                Some(exec::resolve_user(u, "", "").map_err(invalid)?)
            }
            Some(u) => {
                // Bounded, non-blocking reads (the tenant may have replaced these files).
                let passwd = exec::read_user_db(Path::new("/etc/passwd")).map_err(invalid)?;
                let group = exec::read_user_db(Path::new("/etc/group")).map_err(invalid)?;
                Some(exec::resolve_user(u, &passwd, &group).map_err(invalid)?)
            }
            None => self.cfg.sup.core.user,
        })
    }

    /// Forks the exec `req`, admitted as `id`; registers its pid with the reaper and the core.
    fn fork_exec(
        &mut self,
        id: u64,
        owner: ExecOwner,
        req: &Exec,
        user: Option<(u32, u32)>,
    ) -> Result<exec::Started, Refusal> {
        let cgroup =
            match self.delegation.create(id, req.limits.as_ref()) {
                None if req.limits.is_some() => return Err((
                    ErrorCode::Unsupported,
                    "exec limits need a delegated cgroup, and this shim has none (cgroups: none)"
                        .into(),
                )),
                None => None,
                Some(Ok(cg)) => Some(cg),
                Some(Err(err)) => {
                    warn!(exec_id = id, %err, "cannot create the exec's cgroup");
                    return Err((
                        ErrorCode::Internal,
                        format!("cannot create the exec's cgroup: {err}"),
                    ));
                }
            };
        let sup = &self.cfg.sup;
        let cfg = ExecConfig {
            argv: req.argv.iter().map(Into::into).collect(),
            env: exec::exec_env(
                std::env::vars_os(),
                sup.env_allow.as_deref(),
                &sup.env_deny,
                &req.env,
            ),
            cwd: req
                .cwd
                .as_ref()
                .map(Into::into)
                .or_else(|| sup.workdir.clone()),
            user,
            tty: req.tty,
            stdin: req.stdin,
            limits: Limits {
                oom_score_adj: Some(sup.oom_score_adj.exec),
                ..sup.limits.clone()
            },
            cgroup_join: cgroup.as_ref().map(ExecCgroup::join).unwrap_or_default(),
        };
        let started = match exec::start(&cfg, &self.mask) {
            Ok(s) => s,
            Err(err) => {
                debug!(%err, argv = ?req.argv, "exec refused");
                if let Some(cg) = cgroup {
                    cg.kill();
                    self.retire_cgroup(cg);
                }
                return Err(refusal_of(&err));
            }
        };
        if let Some(cg) = cgroup {
            self.cgroups.push((id, started.pid, cg));
        }
        // Registered before anything can reap (single thread, no drain in between).
        self.reaper.register(started.pid, Owner::Exec(id));
        if let Some(control) = &self.control {
            // SAFETY: geteuid cannot fail.
            let uid = user.map_or_else(|| unsafe { libc::geteuid() }, |(uid, _)| uid);
            let owner = match owner {
                ExecOwner::Driver(_) => "driver",
                ExecOwner::Control => "control",
            };
            control.exec_started(id, req, started.pid, uid, owner);
        }
        self.core
            .exec_started(id, owner, started.pid, req, Instant::now());
        Ok(started)
    }

    /// An exec's process ran its `execve`: its I/O is read and written from now on.
    pub(super) fn exec_io_open(&mut self, id: u64, owner: ExecOwner, io: ExecIo) {
        let state = match io {
            ExecIo::Pipes {
                stdin,
                stdout,
                stderr,
            } => ExecIoState {
                owner,
                outs: vec![
                    register(stdout, "stdout").map(|fd| OutFd {
                        fd,
                        stream: OutputStream::Stdout,
                    }),
                    register(stderr, "stderr").map(|fd| OutFd {
                        fd,
                        stream: OutputStream::Stderr,
                    }),
                ],
                stdin: stdin.and_then(|fd| register(fd, "stdin")),
                pty: None,
                inq: BytesMut::new(),
                in_eof: false,
            },
            ExecIo::Pty(master) => {
                // Two registrations of one open file description: epoll keys them apart.
                let dup = master.try_clone().ok().and_then(|fd| register(fd, "pty"));
                ExecIoState {
                    owner,
                    outs: vec![register(master, "pty").map(|fd| OutFd {
                        fd,
                        stream: OutputStream::Pty,
                    })],
                    stdin: None,
                    pty: dup,
                    inq: BytesMut::new(),
                    in_eof: false,
                }
            }
        };
        let all_closed = state.outs.iter().all(Option::is_none);
        self.execs.insert(id, state);
        if all_closed {
            self.core.exec_io_closed(id, Instant::now());
        }
    }

    /// A driver's `exec` request (from the core): start it; the driver gets its answer.
    pub(super) fn driver_exec(&mut self, req: Exec) {
        let owner = ExecOwner::Driver(self.driver_pid);
        self.start_exec(owner, req, ReplyTo::Driver(self.driver_pid));
    }

    /// Control requests about execs: `exec`, `exec_input`, `exec_resize`, `exec_signal` are
    /// answered here; every other command is given back.
    pub(super) fn exec_command(
        &mut self,
        cmd: crate::control::Command,
    ) -> Option<crate::control::Command> {
        use driver_protocol::message::ControlToShim as C;
        let owner = ExecOwner::Control;
        let crate::control::Command { request, reply } = cmd;
        match request {
            C::Exec(req) => self.start_exec(owner, req, ReplyTo::Control(reply)),
            C::ExecInput(m) => match self.input_room(&m) {
                Ok(()) => {
                    self.replying = Some(reply);
                    self.core.exec_input(owner, m);
                }
                Err((code, message)) => reply.send(ShimToControl::Error(ErrorMsg {
                    re: None,
                    code,
                    message,
                    task_id: None,
                    first_available: None,
                })),
            },
            C::ExecResize(m) => {
                self.replying = Some(reply);
                self.core.exec_resize(owner, &m);
            }
            C::ExecSignal(m) => {
                self.replying = Some(reply);
                self.core.exec_signal(owner, &m);
            }
            request => return Some(crate::control::Command { request, reply }),
        }
        self.apply_outputs();
        // These have no reply when carried out (and no id to remember); a refusal was sent.
        self.replying = None;
        None
    }

    /// Refuses input that would take exec `m.exec_id`'s input queue over its bound.
    fn input_room(&self, m: &ExecInput) -> Result<(), Refusal> {
        let queued: usize = self.execs.values().map(|io| io.inq.len()).sum();
        if self.execs.contains_key(&m.exec_id)
            && queued.saturating_add(m.data.len()) > INPUT_TOTAL_MAX
        {
            return Err((
                ErrorCode::Limit,
                format!(
                    "exec {}: {queued} bytes of input already wait for execs that do not read",
                    m.exec_id
                ),
            ));
        }
        match self.execs.get(&m.exec_id) {
            Some(io) if io.inq.len().saturating_add(m.data.len()) > INPUT_QUEUE_MAX => Err((
                ErrorCode::Limit,
                format!("exec {}: stdin is not being read", m.exec_id),
            )),
            Some(io) if io.input_fd().is_none() => Err((
                ErrorCode::InvalidState,
                format!(
                    "exec {}: stdin is closed (start it with stdin or tty)",
                    m.exec_id
                ),
            )),
            _ => Ok(()),
        }
    }

    /// `Output::ExecInput`: queue the bytes and write what the process takes now.
    pub(super) fn exec_input(&mut self, m: ExecInput) {
        let id = m.exec_id;
        if let Err((code, message)) = self.input_room(&m) {
            // The driver's (the control plane's were checked before the core saw them).
            warn!(exec_id = id, message, "exec input refused");
            if let Some(ExecOwner::Driver(_)) = self.core.exec_owner(id) {
                self.queue_for_driver(
                    &ErrorMsg {
                        re: None,
                        code,
                        message,
                        task_id: None,
                        first_available: None,
                    }
                    .into(),
                );
            }
            return;
        }
        if let Some(io) = self.execs.get_mut(&id) {
            io.inq.extend_from_slice(&m.data);
            io.in_eof |= m.eof;
        }
        self.exec_write(id);
    }

    /// `Output::ExecResize`.
    pub(super) fn exec_resize(&mut self, id: u64, size: TtySize) {
        match self.execs.get(&id).and_then(|io| io.pty.as_ref()) {
            Some(master) => {
                if let Err(err) = exec::resize(master.get_ref(), size) {
                    debug!(%err, exec_id = id, "resize failed");
                }
            }
            None => debug!(exec_id = id, "resize of an exec without a terminal ignored"),
        }
    }

    /// Writes queued input to exec `id` while it takes it; closes stdin after an EOF.
    pub(super) fn exec_write(&mut self, id: u64) {
        let Some(io) = self.execs.get_mut(&id) else {
            return;
        };
        let is_pty = io.pty.is_some();
        let mut failed = false;
        if let Some(fd) = io.pty.as_ref().or(io.stdin.as_ref()) {
            while !io.inq.is_empty() {
                match fd.try_io(Interest::WRITABLE, |fd| write_fd(fd, &io.inq)) {
                    Ok(n) => io.inq.advance(n),
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
                    Err(err) => {
                        debug!(%err, exec_id = id, "writing an exec's input failed");
                        failed = true;
                        break;
                    }
                }
            }
            if !failed && io.in_eof && is_pty {
                match fd.try_io(Interest::WRITABLE, |fd| write_fd(fd, &[TTY_EOF])) {
                    Ok(_) => io.in_eof = false,
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
                    Err(_) => failed = true,
                }
            }
        }
        if failed {
            io.inq.clear();
            io.in_eof = false;
            io.stdin = None;
        } else if io.in_eof && !is_pty {
            // End of input: the process reads EOF.
            io.in_eof = false;
            io.stdin = None;
        }
    }

    /// Reads output descriptor `n` of exec `id` (a few chunks, while its gate stays open,
    /// unless `force`: then until it has nothing more now).
    pub(super) fn exec_read(&mut self, id: u64, n: usize, force: bool) {
        let mut reads = 0usize;
        loop {
            if !force && (reads >= READS_PER_TURN || !self.exec_gate_open(id)) {
                return;
            }
            reads = reads.saturating_add(1);
            let Some(io) = self.execs.get_mut(&id) else {
                return;
            };
            let owner = io.owner;
            let Some(slot) = io.outs.get_mut(n) else {
                return;
            };
            let Some(out) = slot.as_ref() else {
                return;
            };
            let stream = out.stream;
            self.exec_buf.clear();
            let read = match (owner, self.control.as_mut()) {
                // Read straight into the replay buffer, as the event's frame.
                (ExecOwner::Control, Some(control)) => {
                    let core = &mut self.core;
                    control.read_exec_output(
                        id,
                        stream,
                        CHUNK,
                        |buf| {
                            out.fd
                                .try_io(Interest::READABLE, |fd| read_fd_into(fd, buf, CHUNK))
                        },
                        |n| core.exec_output(id, stream, n),
                    )
                }
                _ => {
                    let buf = &mut self.exec_buf;
                    if buf.capacity() < CHUNK {
                        // Reclaims the storage when the last chunk read into it is gone (it
                        // was encoded into the driver's queue); allocates otherwise.
                        buf.reserve(CHUNK);
                    }
                    out.fd
                        .try_io(Interest::READABLE, |fd| read_fd_into(fd, buf, CHUNK))
                }
            };
            match read {
                Ok(0) => {
                    *slot = None;
                    break;
                }
                Ok(_) => {
                    if !self.exec_buf.is_empty() {
                        let data = self.exec_buf.split().freeze();
                        self.exec_chunk(id, owner, stream, data);
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
                Err(err) => {
                    // EIO: the terminal's last holder closed it (its end of file).
                    if err.raw_os_error() != Some(libc::EIO) {
                        debug!(%err, exec_id = id, "reading an exec's output failed");
                    }
                    *slot = None;
                    break;
                }
            }
            if force && reads > 64 {
                // A grandchild still writing: what the process wrote is in by now.
                return;
            }
        }
        if self
            .execs
            .get(&id)
            .is_some_and(|io| io.outs.iter().all(Option::is_none))
        {
            self.core.exec_io_closed(id, Instant::now());
            self.apply_outputs();
        }
    }

    fn exec_gate_open(&self, id: u64) -> bool {
        self.execs
            .get(&id)
            .is_some_and(|io| self.exec_gate().open(io.owner))
    }

    /// Forwards a chunk (cut to the output cap) to the exec's owner.
    fn exec_chunk(&mut self, id: u64, owner: ExecOwner, stream: OutputStream, mut data: Bytes) {
        let n = self.core.exec_output(id, stream, data.len());
        data.truncate(n);
        if data.is_empty() {
            return;
        }
        if let Some(control) = &self.control {
            control.exec_output(id, stream, &data);
        }
        let msg = ExecOutput {
            exec_id: id,
            stream,
            data,
        };
        match owner {
            ExecOwner::Control => self.publish(&Event::ExecOutput(msg)),
            ExecOwner::Driver(pid) if pid == self.driver_pid => {
                self.queue_for_driver(&ShimToDriver::ExecOutput(msg));
            }
            ExecOwner::Driver(_) => {}
        }
    }

    /// `Output::ExecStop`: read what is left (bounded), close everything, tell the core.
    pub(super) fn exec_stop(&mut self, id: u64) {
        let outs = self.execs.get(&id).map_or(0, |io| io.outs.len());
        for n in 0..outs {
            self.exec_read(id, n, true);
        }
        if let Some(io) = self.execs.get_mut(&id) {
            io.outs.clear();
            io.stdin = None;
            io.pty = None;
        }
        self.core.exec_io_closed(id, Instant::now());
    }

    /// Forgets the I/O of execs the core has reported.
    pub(super) fn forget_finished_execs(&mut self) {
        let core = &self.core;
        self.execs.retain(|id, _| core.exec_owner(*id).is_some());
        let mut i = 0;
        while let Some((id, ..)) = self.cgroups.get(i) {
            if self.core.exec_owner(*id).is_some() {
                i += 1;
                continue;
            }
            let (_, _, cg) = self.cgroups.remove(i);
            // Its group was SIGKILLed at its end: so is everything left in its cgroup.
            cg.kill();
            self.retire_cgroup(cg);
        }
    }

    /// Removes an exec's cgroup now, or once its last process is gone (retried after every
    /// reap).
    pub(super) fn retire_cgroup(&mut self, cg: ExecCgroup) {
        if !cg.remove() {
            self.stale_cgroups.push(cg);
        }
    }

    /// A `SIGKILL` to exec `pid`'s group also kills everything in its cgroup (what left the
    /// group with `setsid` included).
    pub(super) fn kill_exec_cgroup(&self, pid: i32) {
        if let Some((_, _, cg)) = self.cgroups.iter().find(|(_, p, _)| *p == pid) {
            cg.kill();
        }
    }
}
