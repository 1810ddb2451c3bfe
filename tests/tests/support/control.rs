//! A blocking client of the shim's control link (`docs/PROTOCOL.md` §8): over a unix socket or
//! TCP, insecure or with a token (§8.2: nonces in the `hello`s, `auth` both ways, the shim's
//! proof checked), connecting or over a stream it is handed (when the shim dials out).
//!
//! It keeps every read bounded (a read timeout on the socket), checks that events arrive
//! with seqs increasing by exactly 1, and stamps each event with the instant it was read, so
//! tests can measure the shim's timing from outside. Events that arrive while a request waits
//! for its reply are kept, in order, for the next [`ControlClient::next_event`].

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, ErrorKind, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use driver_protocol::blocking::{FrameReader, FrameWriter};
use driver_protocol::handshake::{self, NONCE_LEN};
use driver_protocol::message::{
    Ack, Auth, ControlToShim, ErrorMsg, Event, EventEnvelope, Exec, ExecExit, ExecStarted, Hello,
    OutputStream, RequestId, ResumeFrom, Role, Seq, ShimToControl, Status, StatusReply, SubmitTask,
};
use driver_protocol::DecodeError;
use rmpv::Value;

/// How many events a client remembers for failure messages.
const HISTORY: usize = 64;

/// An event and the instant the client read it.
#[derive(Debug, Clone)]
pub struct Stamped {
    /// When the client read it off the socket.
    pub at: Instant,
    /// Its seq.
    pub seq: Seq,
    /// The event.
    pub event: Event,
}

/// What one control-initiated exec produced, from its `exec_output` and `exec_exit` events.
#[derive(Debug, Default, Clone)]
pub struct ExecRun {
    /// Its `stdout` bytes, in order.
    pub stdout: Vec<u8>,
    /// Its `stderr` bytes.
    pub stderr: Vec<u8>,
    /// Its terminal output (`pty`).
    pub pty: Vec<u8>,
    /// Its `exec_output` events.
    pub chunks: usize,
    /// The `exec_exit`, once seen.
    pub exit: Option<ExecExit>,
}

impl ExecRun {
    /// Takes one event about this exec; fails on output after the exit or a second exit.
    pub fn take(&mut self, event: &Event) -> Result<()> {
        match event {
            Event::ExecOutput(o) => {
                ensure!(self.exit.is_none(), "exec_output after exec_exit: {o:?}");
                self.chunks += 1;
                let sink = match o.stream {
                    OutputStream::Stdout => &mut self.stdout,
                    OutputStream::Stderr => &mut self.stderr,
                    OutputStream::Pty => &mut self.pty,
                };
                sink.extend_from_slice(&o.data);
            }
            Event::ExecExit(x) => {
                ensure!(self.exit.is_none(), "a second exec_exit: {x:?}");
                self.exit = Some(x.clone());
            }
            _ => {}
        }
        Ok(())
    }

    /// Its stdout as (lossy) text.
    pub fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// The exec an event is about, if it is one of an exec's.
pub fn exec_of(event: &Event) -> Option<u64> {
    match event {
        Event::ExecOutput(o) => Some(o.exec_id),
        Event::ExecExit(x) => Some(x.exec_id),
        _ => None,
    }
}

/// A connected stream: unix or TCP.
#[derive(Debug)]
pub enum Stream {
    /// A unix stream socket.
    Unix(UnixStream),
    /// A TCP connection.
    Tcp(TcpStream),
}

impl Stream {
    /// Connects to `target`, retrying until it accepts or `deadline` passes.
    pub fn connect(target: &Target, deadline: Duration) -> Result<Stream> {
        let until = Instant::now() + deadline;
        loop {
            let attempt = match target {
                Target::Unix(path) => UnixStream::connect(path).map(Stream::Unix),
                Target::Tcp(addr) => TcpStream::connect(addr.as_str()).map(Stream::Tcp),
            };
            match attempt {
                Ok(s) => return Ok(s),
                Err(_) if Instant::now() < until => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("the control link {target:?} did not accept within {deadline:?}")
                    })
                }
            }
        }
    }

    /// Another handle on the same stream.
    pub fn try_clone(&self) -> std::io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    /// Sets the read timeout.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }

    /// Shuts both directions down (the peer sees the end of the stream at once, even while
    /// another handle keeps the socket open).
    pub fn shutdown(&self) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
        }
    }
}

impl io::Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
        }
    }
}

/// Where a control link is.
#[derive(Debug, Clone)]
pub enum Target {
    /// A unix socket path.
    Unix(PathBuf),
    /// A TCP address, `host:port`.
    Tcp(String),
}

/// The frames our side of a handshake sent (for replay tests).
#[derive(Debug, Clone)]
pub struct SentHandshake {
    /// Our `hello`.
    pub hello: Hello,
    /// Our `auth`, when a token was used.
    pub auth: Option<Auth>,
}

/// A fresh random nonce (from /dev/urandom).
pub fn random_nonce() -> Result<[u8; NONCE_LEN]> {
    let mut n = [0u8; NONCE_LEN];
    io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut n)?;
    Ok(n)
}

/// One connection to the shim's control link.
pub struct ControlClient {
    reader: FrameReader<Stream>,
    writer: FrameWriter<Stream>,
    /// The shim's `hello`.
    hello: Hello,
    /// What we sent in the handshake.
    sent: SentHandshake,
    /// Events read while waiting for something else, oldest first.
    pending: VecDeque<Stamped>,
    /// The seq of the last event read off the socket (pending or not).
    last_seq: Seq,
    /// Whether `resume_from` was sent (no events come before it).
    resumed: bool,
    next_id: RequestId,
    /// The last [`HISTORY`] events handed out, for failure messages.
    history: VecDeque<String>,
}

impl std::fmt::Debug for ControlClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlClient")
            .field("last_seq", &self.last_seq)
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

/// What one bounded read gave. (Short-lived, one at a time: its size does not matter.)
#[allow(clippy::large_enum_variant)]
enum Read {
    Msg(ShimToControl),
    Timeout,
}

impl ControlClient {
    /// Connects to the socket at `path`, retrying until it accepts or `deadline` passes,
    /// then exchanges `hello`s and checks the shim's (role `shim`, no nonce: insecure).
    pub fn connect(path: &Path, deadline: Duration) -> Result<ControlClient> {
        Self::connect_to(&Target::Unix(path.to_owned()), None, deadline)
    }

    /// Connects to `target` (retrying until `deadline`) and runs the handshake, with `token`
    /// if given.
    pub fn connect_to(
        target: &Target,
        token: Option<&[u8]>,
        deadline: Duration,
    ) -> Result<ControlClient> {
        let until = Instant::now() + deadline;
        let stream = Stream::connect(target, deadline)?;
        Self::over(
            stream,
            token,
            until.saturating_duration_since(Instant::now()),
        )
    }

    /// Runs the handshake on a connected `stream` (e.g. one the shim dialed and the test
    /// accepted): `hello` with a fresh nonce when there is a `token`, then `auth` both ways,
    /// the shim's proof checked. Without a token the shim's `hello` must have no nonce.
    ///
    /// The client is the durable consumer `control`, as control-link's clients are by
    /// default (PROTOCOL.md §8.7); [`Self::over_as`] names another, or none (an observer).
    pub fn over(stream: Stream, token: Option<&[u8]>, deadline: Duration) -> Result<ControlClient> {
        Self::over_as(stream, token, deadline, Some("control"))
    }

    /// Connects to `target` as the durable consumer `consumer` (`None`: an observer).
    pub fn connect_as(
        target: &Target,
        token: Option<&[u8]>,
        deadline: Duration,
        consumer: Option<&str>,
    ) -> Result<ControlClient> {
        let until = Instant::now() + deadline;
        let stream = Stream::connect(target, deadline)?;
        Self::over_as(
            stream,
            token,
            until.saturating_duration_since(Instant::now()),
            consumer,
        )
    }

    /// [`Self::over`] as the durable consumer `consumer` (`None`: an observer).
    pub fn over_as(
        stream: Stream,
        token: Option<&[u8]>,
        deadline: Duration,
        consumer: Option<&str>,
    ) -> Result<ControlClient> {
        let until = Instant::now() + deadline;
        let writer = FrameWriter::new(stream.try_clone().context("clone the control stream")?);
        let mut ours = Hello::new(Role::Control, "e2e-control", "0");
        ours.consumer = consumer.map(str::to_owned);
        if token.is_some() {
            ours = ours.with_nonce(random_nonce()?);
        }
        let mut client = ControlClient {
            reader: FrameReader::new(stream),
            writer,
            hello: Hello::new(Role::Shim, "", ""),
            sent: SentHandshake {
                hello: ours.clone(),
                auth: None,
            },
            pending: VecDeque::new(),
            last_seq: 0,
            resumed: false,
            // Ids unique across connections (PROTOCOL.md §6): random high 32 bits, so a
            // reconnected client's requests are never taken for retries of earlier ones.
            next_id: u64::from(u32::from_le_bytes(
                random_nonce()?[..4].try_into().unwrap_or_default(),
            )) << 32,
            history: VecDeque::new(),
        };
        client.send(ours.clone())?;
        let hello = match client.read(until.saturating_duration_since(Instant::now()))? {
            Read::Msg(ShimToControl::Hello(h)) => h,
            Read::Msg(other) => bail!("the shim's first frame is not hello: {other:?}"),
            Read::Timeout => bail!("no hello from the shim within {deadline:?}"),
        };
        ensure!(
            hello.protocol == driver_protocol::PROTOCOL_NAME
                && hello.role == Role::Shim
                && hello.versions.contains(&1)
                && hello.nonce.is_some() == token.is_some(),
            "unexpected shim hello {hello:?}"
        );
        if let Some(token) = token {
            let shim_nonce = handshake::hello_nonce(&hello).context("the shim's nonce")?;
            let own = handshake::hello_nonce(&ours).context("our nonce")?;
            let mac = handshake::auth_proof(token, Role::Control, &shim_nonce, &own);
            let auth = Auth {
                mac: bytes::Bytes::copy_from_slice(&mac),
            };
            client.send(auth.clone())?;
            client.sent.auth = Some(auth);
            match client.read(until.saturating_duration_since(Instant::now()))? {
                Read::Msg(ShimToControl::Auth(a)) => ensure!(
                    handshake::verify_proof(token, Role::Shim, &own, &shim_nonce, &a.mac),
                    "the shim's auth proof is wrong"
                ),
                Read::Msg(other) => bail!("the shim answered auth with {other:?}"),
                Read::Timeout => bail!("no auth from the shim within {deadline:?}"),
            }
        }
        client.hello = hello;
        Ok(client)
    }

    /// The frames our side of the handshake sent.
    pub fn sent_handshake(&self) -> &SentHandshake {
        &self.sent
    }

    /// Ends the connection at once (both directions), as a crashed control plane would.
    pub fn kill(&self) {
        let _ = self.reader.get_ref().shutdown();
    }

    /// The shim's `hello`.
    pub fn shim_hello(&self) -> &Hello {
        &self.hello
    }

    /// A fresh request id.
    pub fn id(&mut self) -> RequestId {
        self.next_id += 1;
        self.next_id
    }

    /// Continues the request ids of `other` (ids must be unique across connections: the
    /// shim answers a known id with its recorded reply).
    pub fn continue_ids(&mut self, other: &ControlClient) {
        self.next_id = self.next_id.max(other.next_id);
    }

    /// The seq of the last event read.
    pub fn last_seq(&self) -> Seq {
        self.last_seq
    }

    /// Sends one message.
    pub fn send(&mut self, msg: impl Into<ControlToShim>) -> Result<()> {
        self.writer
            .send(&msg.into())
            .context("send on the control link")
    }

    /// Sends `resume_from{seq}`: the shim replays the buffered events after `seq`, then
    /// continues live. The next event must have seq `seq + 1`.
    pub fn resume_from(&mut self, seq: Seq) -> Result<()> {
        self.send(ResumeFrom::after(seq))?;
        self.last_seq = seq;
        self.resumed = true;
        Ok(())
    }

    /// The next message of any kind, unchecked (`None`: nothing within `timeout`); for tests
    /// of the link itself (`lagged`, `gap`, `replaced`). Events read earlier and kept are
    /// not returned here.
    pub fn next_msg(&mut self, timeout: Duration) -> Result<Option<ShimToControl>> {
        match self.read(timeout)? {
            Read::Msg(msg) => Ok(Some(msg)),
            Read::Timeout => Ok(None),
        }
    }

    /// Sends `ack{seq}`.
    pub fn ack(&mut self, seq: Seq) -> Result<()> {
        self.send(Ack { seq })
    }

    /// Sends a request (its `id` is the caller's) and waits at most [`super::PATIENCE`] for
    /// the reply whose `re` is `id`; events read meanwhile are kept for
    /// [`next_event`](Self::next_event).
    pub fn request(
        &mut self,
        id: RequestId,
        msg: impl Into<ControlToShim>,
    ) -> Result<ShimToControl> {
        self.request_within(id, msg, super::PATIENCE)
    }

    /// [`request`](Self::request) with its own timeout.
    pub fn request_within(
        &mut self,
        id: RequestId,
        msg: impl Into<ControlToShim>,
        timeout: Duration,
    ) -> Result<ShimToControl> {
        let msg = msg.into();
        let what = format!("{msg:?}");
        self.send(msg)?;
        self.reply_to(id, timeout)
            .with_context(|| format!("waiting for the reply to {what}"))
    }

    /// Waits at most `timeout` for the reply whose `re` is `id`.
    pub fn reply_to(&mut self, id: RequestId, timeout: Duration) -> Result<ShimToControl> {
        let reply = self.next_reply(timeout)?;
        if re_of(&reply) == Some(id) {
            return Ok(reply);
        }
        bail!(
            "a reply to another request while waiting for {id}: {reply:?}\n{}",
            self.context()
        );
    }

    /// The next message that is not an event (a reply, or an `error` without `re`), at most
    /// `timeout`; events read meanwhile are kept.
    pub fn next_reply(&mut self, timeout: Duration) -> Result<ShimToControl> {
        self.next_non_event(timeout, "reply")
    }

    /// [`next_reply`](Self::next_reply), `what` was expected if none comes.
    fn next_non_event(&mut self, timeout: Duration, what: &str) -> Result<ShimToControl> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read(left)? {
                Read::Timeout => bail!("no {what} within {timeout:?}\n{}", self.context()),
                Read::Msg(ShimToControl::Event(env)) => self.keep(env)?,
                Read::Msg(reply) => return Ok(reply),
            }
        }
    }

    /// Sends `submit_task` with a fresh id; the reply (`ok`, or `error`).
    pub fn submit(&mut self, task_id: &str, input: Value) -> Result<ShimToControl> {
        let id = self.id();
        self.submit_with_id(id, task_id, input)
    }

    /// Sends `submit_task` with the given request id.
    pub fn submit_with_id(
        &mut self,
        id: RequestId,
        task_id: &str,
        input: Value,
    ) -> Result<ShimToControl> {
        self.request(
            id,
            SubmitTask {
                id,
                task_id: task_id.into(),
                input,
                output_schema: None,
                timeout_ms: None,
                redeliver: false,
                max_attempts: None,
            },
        )
    }

    /// Sends `submit_task` and requires `ok`.
    pub fn submit_ok(&mut self, task_id: &str, input: Value) -> Result<()> {
        let reply = self.submit(task_id, input)?;
        ensure!(
            matches!(reply, ShimToControl::Ok(_)),
            "submit_task {task_id:?} answered {reply:?}"
        );
        Ok(())
    }

    /// Asks for `status`.
    pub fn status(&mut self) -> Result<StatusReply> {
        self.status_within(super::PATIENCE)
    }

    /// Asks for `status`, waiting at most `timeout` for the reply.
    pub fn status_within(&mut self, timeout: Duration) -> Result<StatusReply> {
        let id = self.id();
        match self.request_within(id, Status { id }, timeout)? {
            ShimToControl::StatusReply(s) => Ok(s),
            other => bail!("status answered {other:?}"),
        }
    }

    /// Sends a request with a fresh id and requires `ok`.
    pub fn expect_ok(&mut self, make: impl FnOnce(RequestId) -> ControlToShim) -> Result<()> {
        let id = self.id();
        let msg = make(id);
        match self.request(id, msg)? {
            ShimToControl::Ok(_) => Ok(()),
            other => bail!("expected ok, got {other:?}\n{}", self.context()),
        }
    }

    /// Sends `exec` (built from a fresh id) and returns the reply (`exec_started`, or
    /// `error`).
    pub fn exec(&mut self, make: impl FnOnce(RequestId) -> Exec) -> Result<ShimToControl> {
        let id = self.id();
        let req = make(id);
        self.request(id, req)
    }

    /// Sends `exec` and requires `exec_started`.
    pub fn exec_started(&mut self, make: impl FnOnce(RequestId) -> Exec) -> Result<ExecStarted> {
        match self.exec(make)? {
            ShimToControl::ExecStarted(s) => Ok(s),
            other => bail!("exec answered {other:?}\n{}", self.context()),
        }
    }

    /// Reads events (acknowledging them) until every exec in `ids` has sent its `exec_exit`,
    /// at most `timeout` in all; returns what each produced.
    pub fn exec_runs(&mut self, ids: &[u64], timeout: Duration) -> Result<BTreeMap<u64, ExecRun>> {
        let deadline = Instant::now() + timeout;
        let mut runs: BTreeMap<u64, ExecRun> =
            ids.iter().map(|&id| (id, ExecRun::default())).collect();
        let mut unacked = 0;
        while runs.values().any(|r| r.exit.is_none()) {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(s) = self.try_next_stamped(left)? else {
                let done = runs.values().filter(|r| r.exit.is_some()).count();
                bail!(
                    "only {done} of {} execs exited within {timeout:?}\n{}",
                    ids.len(),
                    self.context()
                );
            };
            if let Some(run) = exec_of(&s.event).and_then(|id| runs.get_mut(&id)) {
                run.take(&s.event)?;
            }
            unacked += 1;
            if unacked >= 64 {
                self.ack(s.seq)?;
                unacked = 0;
            }
        }
        self.ack(self.last_seq)?;
        Ok(runs)
    }

    /// [`exec_runs`](Self::exec_runs) for one exec.
    pub fn exec_run(&mut self, id: u64, timeout: Duration) -> Result<ExecRun> {
        let mut runs = self.exec_runs(&[id], timeout)?;
        runs.remove(&id).ok_or_else(|| anyhow!("exec {id} missing"))
    }

    /// Waits at most `timeout` for an `error` without `re` (the answer to a bad
    /// `exec_input`, `exec_resize` or `exec_signal`); events read meanwhile are kept.
    pub fn error_without_re(&mut self, timeout: Duration) -> Result<ErrorMsg> {
        match self.next_non_event(timeout, "error")? {
            ShimToControl::Error(e) if e.re.is_none() => Ok(e),
            other => bail!("expected an error without re, got {other:?}"),
        }
    }

    /// Takes the events already read but not yet handed out.
    pub fn take_pending(&mut self) -> Vec<Stamped> {
        self.pending.drain(..).collect()
    }

    /// The next event, waiting at most `timeout`.
    pub fn next_event(&mut self, timeout: Duration) -> Result<EventEnvelope> {
        let s = self.next_stamped(timeout)?;
        Ok(EventEnvelope {
            seq: s.seq,
            event: s.event,
        })
    }

    /// The next event with the instant it was read, waiting at most `timeout`.
    pub fn next_stamped(&mut self, timeout: Duration) -> Result<Stamped> {
        match self.try_next_stamped(timeout)? {
            Some(s) => Ok(s),
            None => bail!("no event within {timeout:?}\n{}", self.context()),
        }
    }

    /// The next event, or `None` if none comes within `timeout`.
    pub fn try_next_stamped(&mut self, timeout: Duration) -> Result<Option<Stamped>> {
        if let Some(s) = self.pending.pop_front() {
            self.remember(&s);
            return Ok(Some(s));
        }
        match self.read(timeout)? {
            Read::Timeout => Ok(None),
            Read::Msg(ShimToControl::Event(env)) => {
                let s = self.stamp(env)?;
                self.remember(&s);
                Ok(Some(s))
            }
            Read::Msg(other) => bail!(
                "unexpected message between events: {other:?}\n{}",
                self.context()
            ),
        }
    }

    /// Reads events until one satisfies `pred` (at most `timeout` in all); returns it and
    /// the events skipped before it.
    pub fn wait_event(
        &mut self,
        mut pred: impl FnMut(&Event) -> bool,
        timeout: Duration,
    ) -> Result<(Stamped, Vec<Stamped>)> {
        let deadline = Instant::now() + timeout;
        let mut skipped = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.try_next_stamped(left)? {
                Some(s) if pred(&s.event) => return Ok((s, skipped)),
                Some(s) => skipped.push(s),
                None => bail!(
                    "no matching event within {timeout:?}; skipped: {:#?}\n{}",
                    skipped
                        .iter()
                        .map(|s| (s.seq, &s.event))
                        .collect::<Vec<_>>(),
                    self.context()
                ),
            }
        }
    }

    /// Every event that arrives within `window` (read until `window` has passed in all).
    pub fn events_for(&mut self, window: Duration) -> Result<Vec<Stamped>> {
        let deadline = Instant::now() + window;
        let mut out = Vec::new();
        while let Some(s) =
            self.try_next_stamped(deadline.saturating_duration_since(Instant::now()))?
        {
            out.push(s);
        }
        Ok(out)
    }

    /// Waits at most `timeout` for the shim to close the connection; events read meanwhile
    /// are returned (and kept in order).
    pub fn until_closed(&mut self, timeout: Duration) -> Result<Vec<Stamped>> {
        let deadline = Instant::now() + timeout;
        let mut out: Vec<Stamped> = self.pending.drain(..).collect();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "the shim kept the control connection open for {timeout:?}\n{}",
                    self.context()
                );
            }
            self.reader.get_ref().set_read_timeout(Some(left))?;
            match self.reader.read_message::<ShimToControl>() {
                Ok(None) => return Ok(out),
                Ok(Some(ShimToControl::Event(env))) => {
                    let s = self.stamp(env)?;
                    self.remember(&s);
                    let seq = s.seq;
                    out.push(s);
                    self.ack(seq).ok();
                }
                // A consumer's older connection is told why it is closed.
                Ok(Some(ShimToControl::Error(e)))
                    if e.re.is_none() && e.code == driver_protocol::ErrorCode::Replaced => {}
                Ok(Some(other)) => bail!("unexpected {other:?} before the close"),
                Err(DecodeError::Io(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(DecodeError::Io(e))
                    if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) =>
                {
                    return Ok(out)
                }
                Err(e) => return Err(anyhow!(e).context("reading the control link")),
            }
        }
    }

    /// The last events handed out, for failure messages.
    pub fn context(&self) -> String {
        let mut s = format!(
            "  control: last seq {}, {} pending; last events:\n",
            self.last_seq,
            self.pending.len()
        );
        for line in &self.history {
            s.push_str("    ");
            s.push_str(line);
            s.push('\n');
        }
        s
    }

    fn remember(&mut self, s: &Stamped) {
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(format!("{}: {:?}", s.seq, s.event));
    }

    fn keep(&mut self, env: EventEnvelope) -> Result<()> {
        let s = self.stamp(env)?;
        self.pending.push_back(s);
        Ok(())
    }

    /// Checks the seq (exactly one more than the last) and stamps the event.
    fn stamp(&mut self, env: EventEnvelope) -> Result<Stamped> {
        let at = Instant::now();
        ensure!(
            self.resumed,
            "event {} before resume_from: {:?}",
            env.seq,
            env.event
        );
        ensure!(
            env.seq == self.last_seq + 1,
            "event seq {} after {} (must increase by exactly 1): {:?}\n{}",
            env.seq,
            self.last_seq,
            env.event,
            self.context()
        );
        self.last_seq = env.seq;
        Ok(Stamped {
            at,
            seq: env.seq,
            event: env.event,
        })
    }

    /// One message, or a timeout; end of stream is an error.
    fn read(&mut self, timeout: Duration) -> Result<Read> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Read::Timeout);
            }
            self.reader.get_ref().set_read_timeout(Some(left))?;
            match self.reader.read_message::<ShimToControl>() {
                Ok(Some(msg)) => return Ok(Read::Msg(msg)),
                Ok(None) => bail!("the shim closed the control connection\n{}", self.context()),
                Err(DecodeError::Io(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => {
                    return Err(
                        anyhow!(e).context(format!("reading the control link\n{}", self.context()))
                    )
                }
            }
        }
    }
}

/// The `re` of a reply.
fn re_of(msg: &ShimToControl) -> Option<RequestId> {
    match msg {
        ShimToControl::Ok(ok) => Some(ok.re),
        ShimToControl::Error(e) => e.re,
        ShimToControl::StatusReply(s) => Some(s.re),
        ShimToControl::ExecStarted(e) => Some(e.re),
        ShimToControl::Pong(p) => Some(p.re),
        ShimToControl::FsStatReply(r) => Some(r.re),
        ShimToControl::FsListReply(r) => Some(r.re),
        ShimToControl::FsData(d) => Some(d.re),
        ShimToControl::FsWriteReady(r) => Some(r.re),
        ShimToControl::MetricsReply(m) => Some(m.re),
        ShimToControl::ExecList(l) => Some(l.re),
        ShimToControl::ExecAttached(a) => Some(a.re),
        _ => None,
    }
}
