//! Supervisor mode: the shim as the supervisor of an agent driver.
//!
//! [`run`] blocks signals exactly like plain mode, then runs a tokio current-thread runtime
//! whose one loop (the *shell*, in this file) does all the I/O — signals from a `signalfd`,
//! the driver's socket and its stdout/stderr, the control server, the nearest timer — and
//! hands every input to the synchronous [`core::Core`], which decides. The pure pieces live in
//! [`lifecycle`], [`restart`], [`tasks`] and [`loglines`].
//!
//! ```text
//!  block signals ─► runtime + LocalSet ─► control server ─► launch driver
//!  loop select! { signalfd | control command | driver socket (unless the event buffer is
//!                 full) | driver socket writable | driver stdout/stderr | nearest deadline }
//!  core says exit ─► deliver buffered events (≤ 2 s) ─► (PID 1) cleanup ─► exit code
//! ```

pub mod core;
pub mod lifecycle;
pub mod loglines;
pub mod restart;
pub mod tasks;

use std::io::Write as _;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use driver_protocol::frame::{self, HEADER_LEN};
use driver_protocol::message::{DriverToShim, Event, Log, LogStream, Message, ShimToControl};
use driver_protocol::DEFAULT_MAX_FRAME;
use nix::errno::Errno;
use nix::sys::signal::SigSet;
use nix::sys::signalfd::{SfdFlags, SignalFd};
use thiserror::Error;
use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;
use tokio::net::UnixStream;
use tracing::{debug, info, info_span, warn, Instrument as _};

use crate::cli::Config;
use crate::control::{ControlAddr, ControlConfig, ControlServer};
use crate::driver::{self, DriverConfig};
use crate::reaper::Reaper;
use crate::signals;
use crate::sys::{Real, SigInfo, Sys};

use self::core::{Core, Output};
use self::loglines::{LineSplitter, RateLimiter};

/// Over this many bytes queued for the driver, it counts as hung (it does not read).
const MAX_DRIVER_QUEUE: usize = 1024 * 1024;

/// After the driver's final exit, how long buffered events may take to be acknowledged.
const FINAL_DRAIN: Duration = Duration::from_secs(2);

/// While the event buffer is full, how often waiting control requests are taken.
const FULL_RECHECK: Duration = Duration::from_millis(20);

/// Read chunk for the driver's socket and pipes.
const READ_CHUNK: usize = 64 * 1024;

/// Why supervisor mode could not run at all.
#[derive(Debug, Error)]
pub enum SupervisorError {
    /// Blocking the signals failed.
    #[error("cannot block signals")]
    Signals(#[source] Errno),
    /// The signalfd could not be created or registered.
    #[error("cannot create a signalfd")]
    Signalfd(#[source] std::io::Error),
    /// The async runtime could not be built.
    #[error("cannot start the runtime")]
    Runtime(#[source] std::io::Error),
    /// The control socket could not be bound.
    #[error("cannot listen on the control socket")]
    Control(#[source] std::io::Error),
}

impl SupervisorError {
    /// The shim's exit code for this error (125, like any failure of the shim itself).
    pub fn exit_code(&self) -> i32 {
        125
    }
}

/// Who a tracked pid belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owner {
    /// The agent driver.
    Driver,
}

/// Runs supervisor mode on the real kernel; returns the exit code.
pub fn run(cfg: &Config) -> Result<i32, SupervisorError> {
    let sys = Real;
    let span = info_span!("supervisor");
    let _enter = span.enter();
    let own_pid = sys.getpid();
    let pid1 = own_pid == 1;
    if !pid1 {
        if let Err(err) = sys.set_child_subreaper() {
            warn!(%err, "cannot become a child subreaper: orphans will not be reaped by us");
        }
    }
    let original_mask = signals::block_all(&sys).map_err(SupervisorError::Signals)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(SupervisorError::Runtime)?;
    let local = tokio::task::LocalSet::new();
    let mut reaper = Reaper::new();
    let outcome = local.block_on(
        &rt,
        shell(cfg, original_mask, &mut reaper).instrument(info_span!("loop")),
    );
    drop(local);
    drop(rt);
    let (code, kill_deadline) = outcome?;
    if let Some(path) = &cfg.sup.control_listen {
        let _ = std::fs::remove_file(path);
    }
    let set = signals::handled_set();
    let mut drain = || reaper.drain(&sys, |_, _, _| {}).no_children;
    if pid1 {
        crate::init::cleanup_after_child(&sys, cfg, &set, kill_deadline, &mut drain);
    } else {
        drain();
    }
    info!(code, "exiting");
    Ok(code)
}

/// The driver's socket and what is queued both ways.
struct Link {
    sock: UnixStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    reading: bool,
}

/// One of the driver's output pipes.
struct OutPipe {
    rx: pipe::Receiver,
    stream: LogStream,
    split: LineSplitter,
}

/// Everything the loop owns besides the core.
struct Shell<'a> {
    cfg: &'a Config,
    mask: SigSet,
    core: Core<Real>,
    reaper: &'a mut Reaper<Owner>,
    control: Option<ControlServer>,
    link: Option<Link>,
    outs: [Option<OutPipe>; 2],
    driver_pid: i32,
    rate: RateLimiter,
    /// The stream of the last line the rate limit refused (for the "suppressed" event).
    suppressed_stream: LogStream,
    reaped: u64,
}

async fn shell(
    cfg: &Config,
    mask: SigSet,
    reaper: &mut Reaper<Owner>,
) -> Result<(i32, Option<Instant>), SupervisorError> {
    let sfd = SignalFd::with_flags(
        &signals::handled_set(),
        SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC,
    )
    .map_err(|e| SupervisorError::Signalfd(e.into()))?;
    // SAFETY: the SignalFd owns a valid fd, which is neither replaced nor closed while the
    // AsyncFd owns it (it is closed when the AsyncFd drops it).
    let sfd = unsafe { AsyncFd::register(sfd) }
        .map_err(|e| SupervisorError::Signalfd(e.into_parts().1))?;
    let control = match &cfg.sup.control_listen {
        Some(path) => {
            let ccfg = ControlConfig {
                max_events: cfg.sup.event_buffer,
                max_bytes: cfg.sup.event_buffer_bytes,
                max_frame: DEFAULT_MAX_FRAME,
                agent_id: None,
            };
            let server = ControlServer::bind(&ControlAddr::Unix(path.clone()), ccfg)
                .map_err(SupervisorError::Control)?;
            info!(path = %path.display(), "control socket listening (insecure)");
            Some(server)
        }
        None => None,
    };
    let now = Instant::now();
    let seed = seed();
    let mut sh = Shell {
        cfg,
        mask,
        core: Core::new(Real, cfg, now, seed),
        reaper,
        control,
        link: None,
        outs: [None, None],
        driver_pid: 0,
        rate: RateLimiter::new(cfg.sup.log_rate),
        suppressed_stream: LogStream::Stderr,
        reaped: 0,
    };
    sh.core.start();
    loop {
        // Frames left in the read buffer while the event buffer was full (a no-op if none).
        sh.decode_frames(false);
        sh.apply_outputs();
        if let Some(code) = sh.core.exit_code() {
            let kill_deadline = sh.core.kill_deadline();
            sh.final_drain().await;
            return Ok((code, kill_deadline));
        }
        let deadline = sh.core.next_deadline();
        let full = sh.control.as_ref().is_some_and(ControlServer::is_full);
        let reading = sh.link.as_ref().is_some_and(|l| l.reading) && !full;
        let writing = sh.link.as_ref().is_some_and(|l| !l.wbuf.is_empty());
        // Not `biased`: a driver that always has something to say must not starve the
        // timers (cancel grace, pings) or the control connection.
        tokio::select! {
            r = sfd.readable() => match r {
                Ok(mut guard) => {
                    let mut infos = Vec::new();
                    loop {
                        match guard.get_inner().read_signal() {
                            Ok(Some(si)) => infos.push(sig_info(&si)),
                            Ok(None) => {
                                guard.clear_ready();
                                break;
                            }
                            Err(err) => {
                                warn!(%err, "reading the signalfd failed");
                                guard.clear_ready();
                                break;
                            }
                        }
                    }
                    drop(guard);
                    for info in infos {
                        if info.signo != libc::SIGCHLD {
                            sh.core.on_signal(&info, Instant::now());
                        }
                        // After every signal, not only SIGCHLD (see init.rs).
                        sh.reap();
                    }
                }
                Err(err) => {
                    warn!(%err, "waiting for signals failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    sh.reap();
                }
            },
            step = control_step(&mut sh.control, full) => {
                if let Some(cmd) = step {
                    sh.on_command(cmd);
                }
            }
            r = link_readable(&sh.link), if reading => {
                if let Err(err) = r {
                    debug!(%err, "driver socket");
                }
                sh.read_link();
            }
            r = link_writable(&sh.link), if writing => {
                if let Err(err) = r {
                    debug!(%err, "driver socket");
                }
                sh.write_link();
            }
            r = pipe_readable(&sh.outs[0]) => {
                if let Err(err) = r {
                    debug!(%err, "driver stdout");
                }
                sh.read_pipe(0);
            }
            r = pipe_readable(&sh.outs[1]) => {
                if let Err(err) = r {
                    debug!(%err, "driver stderr");
                }
                sh.read_pipe(1);
            }
            () = sleep_until(deadline) => {
                sh.core.on_timer(Instant::now());
            }
            () = sleep_until(sh.rate.suppressed_due()) => {
                sh.flush_suppressed(Instant::now());
            }
        }
    }
}

/// A PRNG seed for the backoff jitter: the wall clock's nanoseconds and our pid.
fn seed() -> u64 {
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    u64::from(wall) ^ (u64::from(std::process::id()) << 32)
}

fn sig_info(si: &libc::signalfd_siginfo) -> SigInfo {
    SigInfo {
        signo: i32::try_from(si.ssi_signo).unwrap_or_default(),
        code: si.ssi_code,
        pid: i32::try_from(si.ssi_pid).unwrap_or_default(),
        uid: si.ssi_uid,
    }
}

/// The next request; while the event buffer is `full`, also returns `None` when it has room
/// again (so reading the driver resumes at once), taking waiting requests at least every
/// [`FULL_RECHECK`].
async fn control_step(
    control: &mut Option<ControlServer>,
    full: bool,
) -> Option<crate::control::Command> {
    let Some(c) = control else {
        return std::future::pending().await;
    };
    if !full {
        return Some(c.next_command().await);
    }
    // Polls the request queue once without waiting (next_command is cancel-safe).
    if let Ok(cmd) = tokio::time::timeout(Duration::ZERO, c.next_command()).await {
        return Some(cmd);
    }
    let _ = tokio::time::timeout(FULL_RECHECK, c.not_full()).await;
    None
}

async fn link_readable(link: &Option<Link>) -> std::io::Result<()> {
    match link {
        Some(l) => l.sock.readable().await,
        None => std::future::pending().await,
    }
}

async fn link_writable(link: &Option<Link>) -> std::io::Result<()> {
    match link {
        Some(l) => l.sock.writable().await,
        None => std::future::pending().await,
    }
}

async fn pipe_readable(p: &Option<OutPipe>) -> std::io::Result<()> {
    match p {
        Some(p) => p.rx.readable().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Resident set size from `/proc/self/statm`, in bytes.
fn rss_bytes() -> u64 {
    let Ok(statm) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages.saturating_mul(u64::try_from(page).unwrap_or(4096))
}

impl Shell<'_> {
    /// Carries out what the core asked for, until it asks for nothing more.
    fn apply_outputs(&mut self) {
        loop {
            let outs = self.core.take_outputs();
            if outs.is_empty() {
                break;
            }
            for out in outs {
                match out {
                    Output::ToDriver(msg) => {
                        if let Some(link) = self.link.as_mut() {
                            if let Err(err) =
                                frame::write_message(&mut link.wbuf, DEFAULT_MAX_FRAME, &msg)
                            {
                                warn!(%err, "cannot encode a message for the driver");
                            }
                        }
                    }
                    Output::Event(ev) => self.publish(&ev),
                    Output::Relay(body) => match self.control.as_mut() {
                        Some(c) => {
                            c.publish_raw(&body);
                        }
                        None => debug!(bytes = body.len(), "driver event"),
                    },
                    Output::Launch => self.launch(),
                    Output::StopReading => {
                        if let Some(link) = self.link.as_mut() {
                            link.reading = false;
                        }
                    }
                }
            }
        }
        // Try to send at once; what does not fit waits for writability.
        self.write_link();
    }

    fn publish(&mut self, ev: &Event) {
        match self.control.as_mut() {
            Some(c) => {
                c.publish(ev);
            }
            None => debug!(event = ev.type_name(), "event (no control socket)"),
        }
    }

    fn launch(&mut self) {
        let sup = &self.cfg.sup;
        let dcfg = DriverConfig {
            argv: self.cfg.command.clone(),
            user: sup.user,
            workdir: sup.workdir.clone(),
            env: driver::driver_env(std::env::vars_os(), sup.env_allow.as_deref(), &sup.env_deny),
        };
        let now = Instant::now();
        match driver::launch(&dcfg, &self.mask) {
            Ok(l) => {
                // Registered before anything can reap (single thread, no drain in between).
                self.reaper.register(l.pid, Owner::Driver);
                self.driver_pid = l.pid;
                self.link = match UnixStream::from_std(l.socket) {
                    Ok(sock) => Some(Link {
                        sock,
                        rbuf: BytesMut::with_capacity(READ_CHUNK),
                        wbuf: BytesMut::new(),
                        reading: true,
                    }),
                    Err(err) => {
                        warn!(%err, "cannot register the driver socket");
                        None
                    }
                };
                let max = self.cfg.sup.log_line_max;
                let pipe = |fd: OwnedFd, stream| match pipe::Receiver::from_owned_fd(fd) {
                    Ok(rx) => Some(OutPipe {
                        rx,
                        stream,
                        split: LineSplitter::new(max),
                    }),
                    Err(err) => {
                        warn!(%err, "cannot register a driver output pipe");
                        None
                    }
                };
                self.outs = [
                    pipe(l.stdout, LogStream::Stdout),
                    pipe(l.stderr, LogStream::Stderr),
                ];
                self.core.on_launched(l.pid, now);
                if self.link.is_none() {
                    self.core.on_driver_unwritable();
                }
            }
            Err(err) => {
                warn!(%err, "cannot start the driver");
                match err.pid() {
                    Some(pid) => {
                        self.reaper.register(pid, Owner::Driver);
                        self.driver_pid = pid;
                        self.core.on_exec_failed(pid, now);
                    }
                    None => self.core.on_launch_error(now),
                }
            }
        }
    }

    /// Reaps whatever exited; the driver's exit goes to the core once its last output has
    /// been read.
    fn reap(&mut self) {
        let mut exits = Vec::new();
        let d = self
            .reaper
            .drain(&Real, |pid, owner, status| exits.push((pid, owner, status)));
        self.reaped = self.reaped.saturating_add(d.reaped);
        for (pid, Owner::Driver, status) in exits {
            if pid == self.driver_pid {
                // Whatever it wrote before dying is already in the socket and pipes.
                self.read_link_to_end();
                for i in 0..2 {
                    self.read_pipe(i);
                }
                self.link = None;
                for i in 0..2 {
                    if let Some(mut p) = self.outs.get_mut(i).and_then(Option::take) {
                        let mut lines = Vec::new();
                        p.split.finish(&mut lines);
                        let stream = p.stream;
                        self.emit_lines(stream, lines);
                    }
                }
            }
            self.core.on_driver_exit(pid, status, Instant::now());
            self.apply_outputs();
        }
    }

    fn on_command(&mut self, cmd: crate::control::Command) {
        let now = Instant::now();
        let reply = self.core.on_command(cmd.request, now);
        let reply = match reply {
            ShimToControl::StatusReply(mut s) => {
                s.reaped = self.reaped;
                s.rss_bytes = rss_bytes();
                if let Some(c) = self.control.as_ref() {
                    let st = c.stats();
                    s.buffered_events = st.events;
                    s.buffered_bytes = st.bytes;
                    s.last_seq = st.last_seq;
                }
                ShimToControl::StatusReply(s)
            }
            other => other,
        };
        cmd.reply.send(reply);
    }

    /// Reads what the driver's socket has now, decoding every complete frame; false when
    /// nothing more is to be had for now (would block, end of stream, error).
    fn read_link(&mut self) -> bool {
        let Some(link) = self.link.as_mut() else {
            return false;
        };
        if link.rbuf.capacity() - link.rbuf.len() < 4096 {
            link.rbuf.reserve(READ_CHUNK);
        }
        let more = match link.sock.try_read_buf(&mut link.rbuf) {
            Ok(0) => {
                debug!("driver closed its socket");
                link.reading = false;
                false
            }
            Ok(_) => true,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(err) => {
                debug!(%err, "reading the driver socket failed");
                link.reading = false;
                false
            }
        };
        self.decode_frames(false);
        more
    }

    /// After the driver died: read what is left in its socket (bounded: a tool that
    /// inherited the socket could keep writing).
    fn read_link_to_end(&mut self) {
        for _ in 0..256 {
            self.decode_frames(true);
            if !self.link.as_ref().is_some_and(|l| l.reading) || !self.read_link() {
                break;
            }
        }
        self.decode_frames(true);
    }

    /// Decodes the complete frames in the read buffer and hands them to the core; unless
    /// `force`, stops while the event buffer is full (backpressure: the rest waits here, and
    /// nothing more is read from the socket meanwhile).
    fn decode_frames(&mut self, force: bool) {
        loop {
            if !force && self.control.as_ref().is_some_and(ControlServer::is_full) {
                return;
            }
            let Some(link) = self.link.as_mut() else {
                return;
            };
            if !link.reading && link.rbuf.is_empty() {
                return;
            }
            let len = match frame::parse_header(&link.rbuf, DEFAULT_MAX_FRAME) {
                Ok(Some(len)) => len,
                Ok(None) => return,
                Err(err) => {
                    link.rbuf.clear();
                    link.reading = false;
                    self.core.on_driver_decode_error(&err);
                    self.apply_outputs();
                    return;
                }
            };
            let want = HEADER_LEN.saturating_add(len);
            if link.rbuf.len() < want {
                link.rbuf.reserve(want - link.rbuf.len());
                return;
            }
            link.rbuf.advance(HEADER_LEN);
            let body = link.rbuf.split_to(len).freeze();
            match DriverToShim::decode(&body) {
                Ok(msg) => {
                    self.core.on_driver_msg(msg, body, Instant::now());
                    self.apply_outputs();
                }
                Err(err) => {
                    link.rbuf.clear();
                    link.reading = false;
                    self.core.on_driver_decode_error(&err);
                    self.apply_outputs();
                    return;
                }
            }
        }
    }

    /// Writes what the driver's socket takes now; kills a driver that does not read.
    fn write_link(&mut self) {
        let Some(link) = self.link.as_mut() else {
            return;
        };
        while !link.wbuf.is_empty() {
            match link.sock.try_write(&link.wbuf) {
                Ok(n) => link.wbuf.advance(n),
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(err) => {
                    debug!(%err, "writing to the driver failed");
                    link.wbuf.clear();
                    break;
                }
            }
        }
        if link.wbuf.len() > MAX_DRIVER_QUEUE {
            warn!(
                queued = link.wbuf.len(),
                "the driver does not read its socket"
            );
            link.wbuf.clear();
            self.core.on_driver_unwritable();
        }
    }

    /// Reads what one of the driver's pipes has now (bounded per call).
    fn read_pipe(&mut self, i: usize) {
        let mut buf = [0u8; 16 * 1024];
        let mut lines = Vec::new();
        let mut eof = false;
        let Some(p) = self.outs.get_mut(i).and_then(Option::as_mut) else {
            return;
        };
        let stream = p.stream;
        for _ in 0..4 {
            match p.rx.try_read(&mut buf) {
                Ok(0) => {
                    eof = true;
                    p.split.finish(&mut lines);
                    break;
                }
                Ok(n) => p.split.push(buf.get(..n).unwrap_or_default(), &mut lines),
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(err) => {
                    debug!(%err, "reading a driver pipe failed");
                    eof = true;
                    break;
                }
            }
        }
        if eof {
            if let Some(slot) = self.outs.get_mut(i) {
                *slot = None;
            }
        }
        self.emit_lines(stream, lines);
    }

    fn emit_lines(&mut self, stream: LogStream, lines: Vec<loglines::Line>) {
        if lines.is_empty() {
            return;
        }
        let name = match stream {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
            LogStream::Driver => "driver",
        };
        let now = Instant::now();
        let mut err = std::io::stderr().lock();
        for line in lines {
            let _ = writeln!(err, "driver[{}] {name}: {}", self.driver_pid, line.text);
            if self.rate.allow(now) {
                self.publish(&Event::Log(Log {
                    task_id: None,
                    stream,
                    level: None,
                    text: line.text,
                    truncated: line.truncated,
                }));
            } else {
                self.suppressed_stream = stream;
            }
        }
        drop(err);
        self.flush_suppressed(now);
    }

    fn flush_suppressed(&mut self, now: Instant) {
        if let Some(n) = self.rate.take_suppressed(now) {
            self.publish(&Event::Log(Log {
                task_id: None,
                stream: self.suppressed_stream,
                level: Some("warn".to_owned()),
                text: format!("{n} lines suppressed"),
                truncated: false,
            }));
        }
    }

    /// Delivers buffered events before exiting: at most [`FINAL_DRAIN`], and only while a
    /// control connection is live.
    async fn final_drain(&mut self) {
        let Some(c) = self.control.as_ref() else {
            return;
        };
        if c.connected() && c.stats().events > 0 && !c.drain(FINAL_DRAIN).await {
            warn!("exiting with unacknowledged events");
        }
    }
}
