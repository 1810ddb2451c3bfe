//! The control side of every figure that goes through the control link.
//!
//! `control-link` (the async client crate) is not there yet, so the figures talk to the
//! shim's control socket (`docs/PROTOCOL.md` §8, insecure unix) through this small blocking
//! client. Each figure calls exactly one function here ([`Client::wait_driver_ready`],
//! [`Client::relay`], [`Client::round_trip`], [`Client::exec_output`]); switching a figure to
//! `control-link` means re-implementing that one function on it.
//!
//! The hot paths read raw frames: an event is recognised by [`raw::split_envelope`] (which
//! checks the whole envelope's structure) and its type by [`raw::read_head`], without decoding
//! fields, and acknowledgements are cumulative, sent every [`ACK_EVERY`] events.

use std::io::ErrorKind;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use driver_protocol::blocking::{FrameReader, FrameWriter};
use driver_protocol::message::{
    Ack, ControlToShim, DriverReady, Event, Exec, Hello, Message, ResumeFrom, Role, Seq,
    ShimToControl, SubmitTask,
};
use driver_protocol::{raw, DecodeError};
use rmpv::Value;

use crate::clock::now_ns;

/// Events are acknowledged (cumulatively) at least this often.
pub const ACK_EVERY: u64 = 256;

/// How long one blocking read may take before the caller's deadline is checked again.
const READ_SLICE: Duration = Duration::from_millis(100);

/// One connection to a shim's control socket.
#[derive(Debug)]
pub struct Client {
    reader: FrameReader<UnixStream>,
    writer: FrameWriter<UnixStream>,
    next_id: u64,
    last_seq: Seq,
    acked: Seq,
    /// The body of the last event that matched the type asked about.
    kept: Vec<u8>,
    /// The type of the last event read.
    last_type: String,
}

/// What one read gave.
enum Incoming {
    /// An event, and whether it is of the type asked about.
    Event { matches: bool },
    /// A reply or other non-event message.
    Other(ShimToControl),
}

/// How an exec output run ended.
#[derive(Debug, Clone)]
pub enum ExecOutcome {
    /// The shim does not run execs for the control plane (yet): its `error` message.
    Unsupported(String),
    /// The exec ran: output bytes received and nanoseconds from request to `exec_exit`.
    Done {
        /// Bytes of `exec_output` data received.
        bytes: u64,
        /// Nanoseconds from the `exec` request to its `exec_exit`.
        elapsed_ns: u64,
    },
}

/// The result of one relay run.
#[derive(Debug, Clone, Copy)]
pub struct Relayed {
    /// Events of the burst received.
    pub events: u64,
    /// Bytes of those events' bodies.
    pub bytes: u64,
    /// Nanoseconds from the first to the last event of the burst.
    pub elapsed_ns: u64,
}

impl Client {
    /// Connects to `path` (retrying every 100 µs until `timeout`), exchanges `hello`s and
    /// sends `resume_from{0}`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Client> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_micros(100));
                }
                Err(e) => return Err(e).context(format!("connect {}", path.display())),
            }
        };
        stream.set_read_timeout(Some(READ_SLICE))?;
        let writer = FrameWriter::new(stream.try_clone()?);
        let mut client = Client {
            reader: FrameReader::new(stream),
            writer,
            next_id: 0,
            last_seq: 0,
            acked: 0,
            kept: Vec::new(),
            last_type: String::new(),
        };
        client.send(Hello::new(
            Role::Control,
            "shim-bench",
            env!("CARGO_PKG_VERSION"),
        ))?;
        match client.read_message(deadline)? {
            ShimToControl::Hello(h) if h.role == Role::Shim => {}
            other => bail!("the shim's first frame is not its hello: {other:?}"),
        }
        client.send(ResumeFrom { seq: 0 })?;
        Ok(client)
    }

    fn send(&mut self, msg: impl Into<ControlToShim>) -> Result<()> {
        self.writer
            .send(&msg.into())
            .context("send on the control link")
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Acknowledges everything read so far when [`ACK_EVERY`] events are unacknowledged
    /// (or always, with `force`).
    fn ack(&mut self, force: bool) -> Result<()> {
        if self.last_seq > self.acked && (force || self.last_seq - self.acked >= ACK_EVERY) {
            self.acked = self.last_seq;
            self.send(Ack { seq: self.acked })?;
        }
        Ok(())
    }

    /// Reads one frame before `deadline`; events are checked and counted, `ty` says which
    /// event type the caller is looking for.
    fn read(&mut self, deadline: Instant, ty: &str) -> Result<Incoming> {
        loop {
            if Instant::now() >= deadline {
                bail!("timed out on the control link (last seq {})", self.last_seq);
            }
            match self.reader.read_frame() {
                Ok(Some(body)) => {
                    let head = raw::read_head(body)?;
                    if head.type_name == "event" {
                        let ev = raw::split_envelope(body)?;
                        if ev.seq != self.last_seq + 1 {
                            bail!("event seq {} after {}", ev.seq, self.last_seq);
                        }
                        let type_name = raw::read_head(ev.event)?.type_name;
                        let matches = type_name == ty;
                        if !matches {
                            self.last_type.clear();
                            self.last_type.push_str(type_name);
                        }
                        if matches {
                            self.kept.clear();
                            self.kept.extend_from_slice(ev.event);
                        }
                        self.last_seq = ev.seq;
                        return Ok(Incoming::Event { matches });
                    }
                    return Ok(Incoming::Other(ShimToControl::decode(body)?));
                }
                Ok(None) => bail!("the shim closed the control connection"),
                Err(DecodeError::Io(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => return Err(anyhow!(e).context("reading the control link")),
            }
        }
    }

    /// The next non-event message (events read meanwhile are acknowledged and dropped).
    fn read_message(&mut self, deadline: Instant) -> Result<ShimToControl> {
        loop {
            match self.read(deadline, "")? {
                Incoming::Event { .. } => self.ack(false)?,
                Incoming::Other(m) => return Ok(m),
            }
        }
    }

    /// Reads events until one of type `ty`, decodes it, and returns it with the instant it
    /// was read.
    fn wait_event(&mut self, ty: &str, deadline: Instant) -> Result<(Event, u64)> {
        loop {
            match self.read(deadline, ty)? {
                Incoming::Event { matches: true, .. } => {
                    let at = now_ns();
                    let event = Event::decode(&self.kept)?;
                    self.ack(true)?;
                    return Ok((event, at));
                }
                Incoming::Event { .. } => self.ack(false)?,
                Incoming::Other(ShimToControl::Error(e)) => {
                    bail!("the shim sent an error: {}: {}", e.code.as_str(), e.message)
                }
                Incoming::Other(_) => {}
            }
        }
    }

    /// Waits for the next `driver_ready` event (the driver start and crash-to-ready
    /// figures); returns it and the `CLOCK_MONOTONIC` instant it was read.
    pub fn wait_driver_ready(&mut self, timeout: Duration) -> Result<(DriverReady, u64)> {
        match self.wait_event("driver_ready", Instant::now() + timeout)? {
            (Event::DriverReady(r), at) => Ok((r, at)),
            (other, _) => bail!("expected driver_ready, got {other:?}"),
        }
    }

    /// Submits a task that makes the bench driver emit `events` events of `size` bytes, and
    /// reads them all (the event relay figure).
    pub fn relay(
        &mut self,
        task_id: &str,
        events: u64,
        size: u64,
        timeout: Duration,
    ) -> Result<Relayed> {
        let deadline = Instant::now() + timeout;
        let id = self.id();
        let input = Value::Map(vec![
            (Value::from("events"), Value::from(events)),
            (Value::from("size"), Value::from(size)),
        ]);
        self.send(SubmitTask {
            id,
            task_id: task_id.into(),
            input,
            output_schema: None,
            timeout_ms: None,
            redeliver: false,
        })?;
        let mut got = 0u64;
        let mut first = 0u64;
        let mut last = 0u64;
        loop {
            match self.read(deadline, "custom")? {
                Incoming::Event { matches: true, .. } => {
                    if got == 0 {
                        first = now_ns();
                    }
                    got += 1;
                    if got == events {
                        last = now_ns();
                    }
                    self.ack(false)?;
                }
                Incoming::Event { .. } => {
                    self.ack(false)?;
                    if got >= events && self.last_is("task_done") {
                        break;
                    }
                }
                Incoming::Other(ShimToControl::Error(e)) => {
                    bail!("submit_task answered {}: {}", e.code.as_str(), e.message)
                }
                Incoming::Other(_) => {}
            }
        }
        self.ack(true)?;
        Ok(Relayed {
            events: got,
            bytes: got * size,
            elapsed_ns: last.saturating_sub(first),
        })
    }

    /// Whether the last event read that was not of the type asked about was of type `ty`.
    fn last_is(&self, ty: &str) -> bool {
        self.last_type == ty
    }

    /// One round trip (the round trip figure): `submit_task` with `payload` as its input,
    /// the shim hands it to the bench driver, which ends the task at once with the payload
    /// as its output; returns the nanoseconds from sending to reading the `task_done` event.
    pub fn round_trip(&mut self, task_id: &str, payload: &[u8], timeout: Duration) -> Result<u64> {
        let deadline = Instant::now() + timeout;
        let id = self.id();
        let t0 = now_ns();
        self.send(SubmitTask {
            id,
            task_id: task_id.into(),
            input: Value::Binary(payload.to_vec()),
            output_schema: None,
            timeout_ms: None,
            redeliver: false,
        })?;
        let (event, at) = self.wait_event("task_done", deadline)?;
        match event {
            Event::TaskDone(done) if done.task_id == task_id => {
                if done.output.as_ref().and_then(Value::as_slice) != Some(payload) {
                    bail!("task {task_id}: the driver's output is not the payload");
                }
                Ok(at.saturating_sub(t0))
            }
            other => bail!("expected task_done of {task_id}, got {other:?}"),
        }
    }

    /// Runs `argv` as an exec for the control plane and reads all its output (the exec
    /// output figure).
    pub fn exec_output(&mut self, argv: &[&str], timeout: Duration) -> Result<ExecOutcome> {
        let deadline = Instant::now() + timeout;
        let id = self.id();
        let t0 = now_ns();
        self.send(Exec {
            id,
            argv: argv.iter().map(|a| a.to_string()).collect(),
            env: Default::default(),
            cwd: None,
            user: None,
            tty: None,
            stdin: false,
            timeout_ms: None,
            output_cap: None,
            task_id: None,
        })?;
        let exec_id = loop {
            match self.read(deadline, "")? {
                Incoming::Event { .. } => self.ack(false)?,
                Incoming::Other(ShimToControl::ExecStarted(s)) if s.re == id => break s.exec_id,
                Incoming::Other(ShimToControl::Error(e)) if e.re == Some(id) => {
                    if e.code.as_str() == "unsupported" {
                        return Ok(ExecOutcome::Unsupported(e.message));
                    }
                    bail!("exec answered {}: {}", e.code.as_str(), e.message)
                }
                Incoming::Other(_) => {}
            }
        };
        let mut bytes = 0u64;
        loop {
            match self.read(deadline, "exec_output")? {
                Incoming::Event { matches: true, .. } => {
                    // The data is a bin at the end of the map; decode the chunk to count it.
                    if let Event::ExecOutput(out) = Event::decode(&self.kept)? {
                        if out.exec_id == exec_id {
                            bytes += out.data.len() as u64;
                        }
                    }
                    self.ack(false)?;
                }
                Incoming::Event { .. } => {
                    self.ack(false)?;
                    if self.last_type == "exec_exit" {
                        break;
                    }
                }
                Incoming::Other(_) => {}
            }
        }
        let elapsed_ns = now_ns().saturating_sub(t0);
        self.ack(true)?;
        Ok(ExecOutcome::Done { bytes, elapsed_ns })
    }
}

impl Client {
    /// Reads and acknowledges every event that arrives within `window`.
    pub fn drain(&mut self, window: Duration) -> Result<()> {
        let deadline = Instant::now() + window;
        loop {
            match self.read(deadline, "") {
                Ok(Incoming::Event { .. }) => self.ack(true)?,
                Ok(Incoming::Other(_)) => {}
                Err(_) if Instant::now() >= deadline => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }
}
