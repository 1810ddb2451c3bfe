//! The driver's I/O as the shell does it: launching the driver, its socket (frames both
//! ways, with the outgoing queue and its bound) and its stdout/stderr pipes (split into lines,
//! echoed to our stderr and published as rate-limited `log` events).
//!
//! Backpressure lives here too: while the control server's event buffer is full, complete
//! frames wait in the read buffer and nothing more is read from the socket.

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use driver_protocol::check;
use driver_protocol::frame::{self, HEADER_LEN};
use driver_protocol::message::{DriverToShim, Event, Log, LogStream, Message, ShimToDriver};
use driver_protocol::{DecodeError, DEFAULT_MAX_FRAME};
use tokio::net::unix::pipe;
use tokio::net::UnixStream;
use tracing::{debug, warn};

use crate::control::ControlServer;
use crate::driver::{self, DriverConfig};
use crate::limits::Limits;

use super::super::loglines::{self, LineSplitter};
use super::super::Owner;
use super::exec::DRIVER_QUEUE_HIGH;
use super::spawning::SpawnFor;
use super::Shell;

/// Over this many bytes queued for the driver, it counts as hung whatever its progress: a
/// memory bound well above what legal traffic needs (two maximal frames and then some).
const MAX_DRIVER_QUEUE: usize = 2 * DEFAULT_MAX_FRAME + 1024 * 1024;

/// Read chunk for the driver's socket and pipes.
const READ_CHUNK: usize = 64 * 1024;

/// Relays a driver event's body to the control server, if there is one.
pub(super) fn relay(control: &mut Option<ControlServer>, body: &[u8]) {
    match control.as_mut() {
        Some(c) => {
            c.publish_raw(body);
        }
        None => debug!(bytes = body.len(), "driver event"),
    }
}

/// The driver's socket and what is queued both ways.
pub(super) struct Link {
    sock: UnixStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    reading: bool,
    /// Since when something waits in `wbuf` without a byte having been written.
    stalled_since: Option<Instant>,
}

/// One of the driver's output pipes.
pub(super) struct OutPipe {
    rx: pipe::Receiver,
    stream: LogStream,
    split: LineSplitter,
}

pub(super) async fn link_readable(link: &Option<Link>) -> std::io::Result<()> {
    match link {
        Some(l) => l.sock.readable().await,
        None => std::future::pending().await,
    }
}

pub(super) async fn link_writable(link: &Option<Link>) -> std::io::Result<()> {
    match link {
        Some(l) => l.sock.writable().await,
        None => std::future::pending().await,
    }
}

pub(super) async fn pipe_readable(p: &Option<OutPipe>) -> std::io::Result<()> {
    match p {
        Some(p) => p.rx.readable().await,
        None => std::future::pending().await,
    }
}

impl Shell<'_> {
    /// Whether the driver's socket is still read.
    pub(super) fn link_reading(&self) -> bool {
        self.link.as_ref().is_some_and(|l| l.reading)
    }

    /// Bytes waiting to be written to the driver (`None` without a driver socket).
    pub(super) fn link_queued(&self) -> Option<usize> {
        self.link.as_ref().map(|l| l.wbuf.len())
    }

    /// Whether something waits to be written to the driver.
    pub(super) fn link_writing(&self) -> bool {
        self.link.as_ref().is_some_and(|l| !l.wbuf.is_empty())
    }

    /// Queues a message for the driver (written by [`Shell::write_link`]).
    pub(super) fn queue_for_driver(&mut self, msg: &ShimToDriver) {
        if let Some(link) = self.link.as_mut() {
            // A notice (an `error` without `re`: a refused event or exec message) is not
            // queued past DRIVER_QUEUE_HIGH: a driver that sends refused messages without
            // reading its socket cannot make the shim queue without bound.
            let notice = matches!(msg, ShimToDriver::Error(e) if e.re.is_none());
            if notice && link.wbuf.len() >= DRIVER_QUEUE_HIGH {
                debug!("the driver does not read: a notice is dropped");
                return;
            }
            if let Err(err) = frame::write_message(&mut link.wbuf, DEFAULT_MAX_FRAME, msg) {
                warn!(%err, "cannot encode a message for the driver");
            }
            if !link.wbuf.is_empty() && link.stalled_since.is_none() {
                link.stalled_since = Some(Instant::now());
            }
        }
    }

    /// Stops reading the driver's socket.
    pub(super) fn stop_reading(&mut self) {
        if let Some(link) = self.link.as_mut() {
            link.reading = false;
        }
    }

    pub(super) fn launch(&mut self) {
        let sup = &self.cfg.sup;
        let (argv, vars) = self.core.driver_command();
        let mut env =
            driver::driver_env(std::env::vars_os(), sup.env_allow.as_deref(), &sup.env_deny);
        driver::overlay_env(&mut env, vars);
        // Its own cgroup, fresh for each launch (where the shim can create one).
        self.launches = self.launches.wrapping_add(1);
        let cgroup = match self.delegation.create_driver(self.launches) {
            Some(Ok(cg)) => Some(cg),
            Some(Err(err)) => {
                warn!(%err, "cannot create the driver's cgroup: it runs in the shim's");
                None
            }
            None => None,
        };
        let dcfg = DriverConfig {
            argv: argv.to_vec(),
            user: sup.core.user,
            workdir: sup.workdir.clone(),
            env,
            limits: Limits {
                oom_score_adj: Some(sup.oom_score_adj.driver),
                ..sup.limits.clone()
            },
            cgroup_join: cgroup
                .as_ref()
                .map(crate::cgroups::ExecCgroup::join)
                .unwrap_or_default(),
        };
        let now = Instant::now();
        let launched = driver::launch(&dcfg, &self.mask);
        if let Some(cg) = cgroup {
            if launched.is_ok() {
                self.driver_cgroup = Some(cg);
            } else {
                self.retire_cgroup(cg);
            }
        }
        match launched {
            Ok(driver::Launched {
                pid,
                spawn,
                socket,
                stdout,
                stderr,
            }) => {
                // Registered before anything can reap (single thread, no drain in between).
                self.reaper.register(pid, Owner::Driver);
                self.driver_pid = pid;
                self.link = match UnixStream::from_std(socket) {
                    Ok(sock) => Some(Link {
                        sock,
                        rbuf: BytesMut::with_capacity(READ_CHUNK),
                        wbuf: BytesMut::new(),
                        reading: true,
                        stalled_since: None,
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
                    pipe(stdout, LogStream::Stdout),
                    pipe(stderr, LogStream::Stderr),
                ];
                self.core.on_launched(pid, now);
                if self.link.is_none() {
                    self.core.on_driver_unwritable();
                }
                // Whether its execve succeeds is learnt without waiting (see `spawning`).
                self.track_spawn(spawn, SpawnFor::Driver);
            }
            Err(err) => {
                // Nothing was forked.
                warn!(%err, "cannot start the driver");
                self.core.on_launch_error(now);
            }
        }
    }

    /// The driver died: takes in what is left in its socket and pipes, then closes them.
    pub(super) fn close_driver_io(&mut self) {
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

    /// Reads what the driver's socket has now, decoding every complete frame; false when
    /// nothing more is to be had for now (would block, end of stream, error).
    pub(super) fn read_link(&mut self) -> bool {
        let Some(link) = self.link.as_mut() else {
            return false;
        };
        if link.rbuf.capacity() - link.rbuf.len() < 4096 {
            link.rbuf.reserve(READ_CHUNK);
        }
        let more = match link.sock.try_read_buf(&mut link.rbuf) {
            Ok(0) => {
                debug!("driver closed its socket");
                false
            }
            Ok(_) => true,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(err) => {
                debug!(%err, "reading the driver socket failed");
                false
            }
        };
        if !more {
            link.reading = false;
            self.core.on_driver_eof(Instant::now());
        }
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
    pub(super) fn decode_frames(&mut self, force: bool) {
        let now = Instant::now();
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
                Err(err) => return self.bad_frame(&err),
            };
            let want = HEADER_LEN.saturating_add(len);
            if link.rbuf.len() < want {
                link.rbuf.reserve(want - link.rbuf.len());
                return;
            }
            // Events, the bulk of the traffic, are checked without being decoded and
            // relayed from the read buffer as they are: no allocation, no copy but the one
            // into the replay buffer.
            let body = link.rbuf.get(HEADER_LEN..want).unwrap_or_default();
            if let Some(ev) = check::relayable_event_task(body) {
                self.core
                    .on_driver_event(ev.type_name, ev.task_id, len, now);
                // The common case: relaying it is all there is to do. It is relayed from the
                // read buffer as it is, at once.
                if self.core.take_lone_relay() {
                    relay(&mut self.control, body);
                    link.rbuf.advance(want);
                    continue;
                }
                match self.core.outputs() {
                    [] => link.rbuf.advance(want),
                    // Other outputs (a `busy` event first, or a protocol error): the body is
                    // held while they are carried out in order.
                    _ => {
                        let body = link.rbuf.split_to(want).split_off(HEADER_LEN).freeze();
                        self.held_event = Some(body);
                        self.apply_outputs();
                        self.held_event = None;
                    }
                }
                continue;
            }
            link.rbuf.advance(HEADER_LEN);
            let body = link.rbuf.split_to(len).freeze();
            match DriverToShim::decode(&body) {
                Ok(msg) => {
                    self.core.on_driver_msg(msg, body, Instant::now());
                    self.apply_outputs();
                }
                Err(err) => return self.bad_frame(&err),
            }
        }
    }

    /// The driver sent something that is not a frame of the protocol: what is buffered is
    /// dropped, its socket is no longer read, and the core answers (and kills it).
    fn bad_frame(&mut self, err: &DecodeError) {
        if let Some(link) = self.link.as_mut() {
            link.rbuf.clear();
            link.reading = false;
        }
        self.core.on_driver_decode_error(err);
        self.apply_outputs();
    }

    /// How long the driver may leave queued bytes unread before it counts as hung: the
    /// ping interval × misses, or `--ready-timeout` when pings are off.
    fn stall_limit(&self) -> Duration {
        let sup = &self.cfg.sup;
        if sup.core.ping_interval.is_zero() {
            sup.core.ready_timeout
        } else {
            sup.core
                .ping_interval
                .saturating_mul(sup.core.ping_misses.max(1))
        }
    }

    /// Reading the driver resumes: a write queue that waited meanwhile gets its full
    /// [`Shell::stall_limit`] again.
    pub(super) fn restart_stall_clock(&mut self) {
        if let Some(link) = self.link.as_mut() {
            if link.stalled_since.is_some() {
                link.stalled_since = Some(Instant::now());
            }
        }
    }

    /// When the driver counts as not reading if no byte is written before (`None` while
    /// nothing waits or while we do not read it either: backpressure).
    pub(super) fn stall_deadline(&self) -> Option<Instant> {
        if self.reading_paused {
            return None;
        }
        let since = self.link.as_ref()?.stalled_since?;
        since.checked_add(self.stall_limit())
    }

    /// Writes what the driver's socket takes now; kills a driver that does not read (no
    /// progress for [`Shell::stall_limit`], or over [`MAX_DRIVER_QUEUE`] queued).
    pub(super) fn write_link(&mut self) {
        let now = Instant::now();
        let limit = self.stall_limit();
        let paused = self.reading_paused;
        let Some(link) = self.link.as_mut() else {
            return;
        };
        let mut failed = false;
        while !link.wbuf.is_empty() {
            match link.sock.try_write(&link.wbuf) {
                Ok(n) => {
                    link.wbuf.advance(n);
                    link.stalled_since = Some(now);
                }
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(err) => {
                    debug!(%err, "writing to the driver failed");
                    link.wbuf.clear();
                    failed = true;
                    break;
                }
            }
        }
        if link.wbuf.is_empty() {
            link.stalled_since = None;
        } else if paused {
            // It may be blocked writing to us: its silence does not count meanwhile.
            link.stalled_since = Some(now);
        }
        let stalled = link
            .stalled_since
            .is_some_and(|t| now.saturating_duration_since(t) >= limit);
        if stalled || link.wbuf.len() > MAX_DRIVER_QUEUE {
            warn!(
                queued = link.wbuf.len(),
                "the driver does not read its socket"
            );
            link.wbuf.clear();
            link.stalled_since = None;
            self.core.on_driver_unwritable();
        }
        if failed {
            self.core.on_driver_eof(now);
        }
    }

    /// Reads what one of the driver's pipes has now (bounded per call).
    pub(super) fn read_pipe(&mut self, i: usize) {
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
        for line in lines {
            self.errout.line(&format!(
                "driver[{}] {name}: {}",
                self.driver_pid, line.text
            ));
            // While the event buffer is full, lines only count (the buffer must not grow
            // while the control plane is away); one "suppressed" event follows.
            if self.control.as_ref().is_some_and(ControlServer::is_full) {
                self.rate.count_suppressed();
                self.suppressed_stream = stream;
            } else if self.rate.allow(now) {
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
        self.flush_suppressed(now);
    }

    /// Publishes the "suppressed" event when it is due and the event buffer has room.
    pub(super) fn flush_suppressed(&mut self, now: Instant) {
        if self.control.as_ref().is_some_and(ControlServer::is_full) {
            return;
        }
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
}
