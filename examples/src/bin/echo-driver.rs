//! echo-driver: a complete agent-shim driver whose "agent" echoes its task back.
//!
//! It speaks the whole driver side of the protocol (`docs/PROTOCOL.md` §7) on
//! `driver-protocol`'s blocking API, and its behaviour is steered by the task's `input`, as
//! `examples/README.md` specifies — which makes it the driver the end-to-end tests run, and a
//! template for real drivers.
//!
//! Structure: a reader thread decodes every message from the shim into a channel
//! ([`agent_shim_examples::spawn_reader`]); the main thread owns the writer, runs the current
//! task, and looks at the channel only where it can act on what it reads: whenever it waits
//! (for an exec's output, or before each chunk). `ping` is answered at every look; `cancel`,
//! `pause` and `shutdown` take effect at the task's *safe points*, the waits before each
//! chunk. Nothing the shim sends can make it panic: every field of the input is checked, and
//! every way out — end of stream, a bad frame, `shutdown`, `crash` — is an exit code carried
//! up as a [`Stop`].

use std::collections::VecDeque;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use agent_shim_examples::{is_closed_io, shim_socket, spawn_reader, Inbound};
use driver_protocol::blocking::{FrameReader, FrameWriter};
use driver_protocol::handshake::negotiate;
use driver_protocol::message::OutputStream;
use driver_protocol::message::{
    DriverToShim, ErrorMsg, Exec, ExecExit, Hello, Log, LogStream, MessageChunk, OkReply, Paused,
    Pong, Progress, Ready, RequestId, Role, ShimToDriver, Task, TaskDone, TaskStatus, ToolCall,
    ToolResult,
};
use driver_protocol::{DecodeError, EncodeError, ErrorCode, Message};
use rmpv::Value;

/// The name in our `hello`.
const SOFTWARE: &str = "echo-driver";

/// Exit code: `AGENT_SHIM_FD` is missing or not a socket.
const EXIT_NO_SOCKET: i32 = 2;

/// Exit code: the shim's `hello` is unacceptable, or it sent a bad frame.
const EXIT_PROTOCOL: i32 = 3;

/// Exit code: the driver itself failed (a message it cannot encode).
const EXIT_INTERNAL: i32 = 1;

/// The variable holding the exit code after `shutdown`.
const EXIT_CODE_VAR: &str = "ECHO_EXIT_CODE";

/// What the `garbage` flag writes: a 4 GiB length prefix, then junk.
const GARBAGE: [u8; 16] = [
    0xff, 0xff, 0xff, 0xff, 0xde, 0xad, 0xbe, 0xef, 0xde, 0xad, 0xbe, 0xef, 0xde, 0xad, 0xbe, 0xef,
];

fn main() {
    let code = match run() {
        Ok(()) => 0,
        Err(Stop(code)) => code,
    };
    std::process::exit(code);
}

/// The driver stops, exiting with this code.
#[derive(Debug)]
struct Stop(i32);

fn run() -> Result<(), Stop> {
    let stream = shim_socket().map_err(|e| {
        eprintln!("echo-driver: {e}");
        Stop(EXIT_NO_SOCKET)
    })?;
    println!("echo-driver: started");
    eprintln!("echo-driver: started");
    let shutdown_code = std::env::var(EXIT_CODE_VAR)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let reading = stream.try_clone().map_err(|e| {
        eprintln!("echo-driver: cannot clone the socket: {e}");
        Stop(EXIT_INTERNAL)
    })?;
    let mut driver = Driver {
        out: FrameWriter::new(stream),
        inbox: None,
        held: VecDeque::new(),
        next_id: 1,
        shutdown_code,
    };
    let mut reader = FrameReader::new(reading);
    driver.handshake(&mut reader)?;
    driver.inbox = Some(spawn_reader(reader).map_err(|e| {
        eprintln!("echo-driver: cannot start the reader thread: {e}");
        Stop(EXIT_INTERNAL)
    })?);
    driver.send(Ready { re: None })?;
    loop {
        let msg = driver.next(None)?.ok_or(Stop(0))?;
        driver.answer(msg, None)?;
    }
}

/// The driver's side of the link, owned by the main thread.
struct Driver {
    out: FrameWriter<UnixStream>,
    /// Messages from the reader thread (set after the handshake).
    inbox: Option<Receiver<Inbound<ShimToDriver>>>,
    /// Messages received while paused that wait until `resume`, oldest first.
    held: VecDeque<ShimToDriver>,
    next_id: RequestId,
    shutdown_code: i32,
}

/// The task being run, and what the shim asked of it that waits for a safe point.
struct Running {
    task_id: String,
    ignore_cancel: bool,
    cancel: bool,
    shutdown: bool,
    pause: Option<RequestId>,
}

/// What a safe point decided.
enum Flow {
    /// Go on with the task.
    Continue,
    /// The task was cancelled and its `task_done` sent.
    Cancelled,
}

impl Driver {
    /// Sends our `hello`, reads and checks the shim's.
    fn handshake(&mut self, reader: &mut FrameReader<UnixStream>) -> Result<(), Stop> {
        let ours = Hello::new(Role::Driver, SOFTWARE, env!("CARGO_PKG_VERSION"));
        self.send(ours.clone())?;
        let theirs = match reader.read_message::<ShimToDriver>() {
            Ok(Some(ShimToDriver::Hello(hello))) => hello,
            Ok(Some(other)) => {
                let message = format!("expected hello, got {}", other.type_name());
                return Err(self.fatal(ErrorCode::InvalidState, message));
            }
            Ok(None) => return Err(Stop(0)),
            Err(DecodeError::Io(e)) if is_closed_io(&e) => return Err(Stop(0)),
            Err(e) => return Err(self.fatal(e.code(), e.to_string())),
        };
        match negotiate(&ours, &theirs) {
            Ok(_) => Ok(()),
            Err(e) => Err(self.fatal(e.code(), e.to_string())),
        }
    }

    /// Reports a protocol failure to the shim and returns the exit it calls for.
    fn fatal(&mut self, code: ErrorCode, message: String) -> Stop {
        eprintln!("echo-driver: {code}: {message}");
        // The link is being closed because of this error; a failure to report it changes
        // nothing.
        let _ = self.send(ErrorMsg {
            re: None,
            code,
            message,
            task_id: None,
            first_available: None,
        });
        Stop(EXIT_PROTOCOL)
    }

    /// Sends one message. A closed link ends the driver like end of stream does.
    fn send(&mut self, msg: impl Into<DriverToShim>) -> Result<(), Stop> {
        self.out.send(&msg.into()).map_err(|e| match e {
            EncodeError::Io(io) if is_closed_io(&io) => Stop(0),
            other => {
                eprintln!("echo-driver: cannot send: {other}");
                Stop(EXIT_INTERNAL)
            }
        })
    }

    fn reply_error(
        &mut self,
        re: Option<RequestId>,
        code: ErrorCode,
        message: &str,
    ) -> Result<(), Stop> {
        self.send(ErrorMsg {
            re,
            code,
            message: message.to_owned(),
            task_id: None,
            first_available: None,
        })
    }

    /// The next message: a held one first, else from the link, waiting until `deadline`
    /// (`None`: forever). `Ok(None)` when the deadline passes; end of stream and bad frames
    /// stop the driver.
    fn next(&mut self, deadline: Option<Instant>) -> Result<Option<ShimToDriver>, Stop> {
        if let Some(msg) = self.held.pop_front() {
            return Ok(Some(msg));
        }
        let Some(inbox) = &self.inbox else {
            return Err(Stop(EXIT_INTERNAL));
        };
        let item = match deadline {
            None => inbox.recv().map_err(|_| Stop(0))?,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                let got = if left.is_zero() {
                    inbox
                        .try_recv()
                        .map_err(|e| e == TryRecvError::Disconnected)
                } else {
                    inbox
                        .recv_timeout(left)
                        .map_err(|e| e == RecvTimeoutError::Disconnected)
                };
                match got {
                    Ok(item) => item,
                    Err(true) => return Err(Stop(0)),
                    Err(false) => return Ok(None),
                }
            }
        };
        match item {
            Inbound::Message(msg) => Ok(Some(msg)),
            Inbound::Closed => Err(Stop(0)),
            Inbound::Bad(e) => {
                let code = e.code();
                let re = e.request_id();
                eprintln!("echo-driver: bad frame from the shim: {e}");
                let _ = self.send(ErrorMsg {
                    re,
                    code,
                    message: e.to_string(),
                    task_id: None,
                    first_available: None,
                });
                Err(Stop(EXIT_PROTOCOL))
            }
        }
    }

    /// Handles a message read while idle (`task` is `None`) or during a task, outside the
    /// paused state: replies at once where the reply does not wait for a safe point, and
    /// records in `task` what does.
    fn answer(&mut self, msg: ShimToDriver, task: Option<&mut Running>) -> Result<(), Stop> {
        match (msg, task) {
            (ShimToDriver::Ping(p), _) => self.send(Pong { re: p.id }),
            (ShimToDriver::Task(t), None) => self.run_task(t),
            (ShimToDriver::Task(t), Some(_)) => self.send(ErrorMsg {
                re: None,
                code: ErrorCode::Limit,
                message: "a task is already running".into(),
                task_id: Some(t.task_id),
                first_available: None,
            }),
            (ShimToDriver::Cancel(c), Some(run)) if run.task_id == c.task_id => {
                self.send(OkReply {
                    re: c.id,
                    duplicate: None,
                })?;
                if !run.ignore_cancel {
                    run.cancel = true;
                }
                Ok(())
            }
            (ShimToDriver::Cancel(c), _) => self.reply_error(
                Some(c.id),
                ErrorCode::NotFound,
                &format!("no running task {:?}", c.task_id),
            ),
            (ShimToDriver::Pause(p), Some(run)) => {
                run.pause = Some(p.id);
                Ok(())
            }
            (ShimToDriver::Pause(p), None) => {
                self.send(Paused { re: Some(p.id) })?;
                self.paused(None)
            }
            (ShimToDriver::Resume(r), _) => {
                self.reply_error(Some(r.id), ErrorCode::InvalidState, "not paused")
            }
            (ShimToDriver::Shutdown(s), Some(run)) => {
                self.send(OkReply {
                    re: s.id,
                    duplicate: None,
                })?;
                run.shutdown = true;
                Ok(())
            }
            (ShimToDriver::Shutdown(s), None) => {
                self.send(OkReply {
                    re: s.id,
                    duplicate: None,
                })?;
                Err(Stop(self.shutdown_code))
            }
            (ShimToDriver::Unknown(u), _) => match u.id {
                Some(id) => self.reply_error(
                    Some(id),
                    ErrorCode::Unsupported,
                    &format!("unsupported message type {:?}", u.type_name),
                ),
                None => Ok(()),
            },
            // Replies and exec messages nobody waits for, a second hello: nothing to answer.
            _ => Ok(()),
        }
    }

    /// The paused state, entered after `paused` was sent: answers `ping`, ends with `resume`
    /// (or `shutdown`), and holds every other message until then.
    fn paused(&mut self, mut task: Option<&mut Running>) -> Result<(), Stop> {
        let mut held = VecDeque::new();
        loop {
            let msg = self.next(None)?.ok_or(Stop(0))?;
            match msg {
                ShimToDriver::Ping(p) => self.send(Pong { re: p.id })?,
                ShimToDriver::Resume(r) => {
                    let slept = r.slept_ms.unwrap_or(0);
                    self.send(Log {
                        task_id: None,
                        stream: LogStream::Driver,
                        level: Some("info".into()),
                        text: format!("resumed after {slept} ms"),
                        truncated: false,
                    })?;
                    self.send(Ready { re: Some(r.id) })?;
                    // What was held comes before what was held earlier and not yet read.
                    held.append(&mut self.held);
                    self.held = held;
                    return Ok(());
                }
                ShimToDriver::Shutdown(s) => {
                    self.send(OkReply {
                        re: s.id,
                        duplicate: None,
                    })?;
                    if let Some(run) = task.as_deref_mut() {
                        self.end_task(run, TaskStatus::Cancelled, Some("shutdown"), None)?;
                    }
                    return Err(Stop(self.shutdown_code));
                }
                other => held.push_back(other),
            }
        }
    }

    fn end_task(
        &mut self,
        run: &Running,
        status: TaskStatus,
        error: Option<&str>,
        output: Option<Value>,
    ) -> Result<(), Stop> {
        self.send(TaskDone {
            task_id: run.task_id.clone(),
            status,
            output,
            error: error.map(str::to_owned),
        })
    }

    /// A safe point: acts on a pending `shutdown`, `cancel` or `pause`, then waits `delay`
    /// while answering what arrives (acting on those at once, too).
    fn safe_point(&mut self, run: &mut Running, delay: Duration) -> Result<Flow, Stop> {
        // A delay too long to represent is a wait without end (cancel still ends it).
        let deadline = Instant::now().checked_add(delay);
        loop {
            if run.shutdown {
                self.end_task(run, TaskStatus::Cancelled, Some("shutdown"), None)?;
                return Err(Stop(self.shutdown_code));
            }
            if run.cancel {
                self.end_task(run, TaskStatus::Cancelled, None, None)?;
                return Ok(Flow::Cancelled);
            }
            if let Some(id) = run.pause.take() {
                self.send(Paused { re: Some(id) })?;
                self.paused(Some(run))?;
                continue;
            }
            match self.next(deadline)? {
                Some(msg) => self.answer(msg, Some(run))?,
                None => return Ok(Flow::Continue),
            }
        }
    }

    fn run_task(&mut self, task: Task) -> Result<(), Stop> {
        let mut run = Running {
            task_id: task.task_id,
            ignore_cancel: false,
            cancel: false,
            shutdown: false,
            pause: None,
        };
        let spec = match Spec::parse(&task.input) {
            Ok(spec) => spec,
            Err(why) => return self.end_task(&run, TaskStatus::Failed, Some(&why), None),
        };
        run.ignore_cancel = spec.ignore_cancel;
        if let Some(code) = spec.crash {
            return Err(Stop(code));
        }
        if spec.hang {
            eprintln!("echo-driver: hanging as asked");
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        if spec.garbage {
            // Every frame so far was flushed by `send`, so the junk lands between frames.
            let written = self.out.get_mut().write_all(&GARBAGE);
            if let Err(e) = written {
                return Err(if is_closed_io(&e) {
                    Stop(0)
                } else {
                    Stop(EXIT_INTERNAL)
                });
            }
        }
        if let Some(argv) = &spec.exec {
            self.exec_tool(&mut run, argv)?;
        }
        let words: Vec<&str> = spec.text.split_whitespace().collect();
        let chunks: Vec<&str> = if words.is_empty() { vec![""] } else { words };
        let total = chunks.len() as u64;
        for (i, word) in chunks.iter().enumerate() {
            if let Flow::Cancelled = self.safe_point(&mut run, spec.delay)? {
                return Ok(());
            }
            let done = i as u64 + 1;
            self.send(MessageChunk {
                task_id: Some(run.task_id.clone()),
                text: (*word).to_owned(),
                role: Some("assistant".into()),
                is_final: done == total,
            })?;
            self.send(Progress {
                task_id: Some(run.task_id.clone()),
                message: None,
                done: Some(done),
                total: Some(total),
            })?;
        }
        match spec.fail {
            Some(why) => self.end_task(&run, TaskStatus::Failed, Some(&why), None),
            None => {
                let output = spec.output.unwrap_or(Value::from(spec.text));
                self.end_task(&run, TaskStatus::Succeeded, None, Some(output))
            }
        }
    }

    /// Runs `argv` through the shim as a tool call: `tool_call`, `exec`, the output until
    /// `exec_exit`, `tool_result`.
    fn exec_tool(&mut self, run: &mut Running, argv: &[String]) -> Result<(), Stop> {
        let call_id = format!("{}-exec", run.task_id);
        let argv_value = Value::Array(argv.iter().map(|a| Value::from(a.as_str())).collect());
        self.send(ToolCall {
            task_id: Some(run.task_id.clone()),
            call_id: call_id.clone(),
            name: "exec".into(),
            input: Value::Map(vec![(Value::from("argv"), argv_value)]),
        })?;
        let id = self.next_id;
        self.next_id += 1;
        self.send(Exec {
            task_id: Some(run.task_id.clone()),
            ..Exec::new(id, argv.to_vec())
        })?;
        let (output, is_error) = match self.wait_exec(run, id)? {
            Ok((exit, stdout)) => {
                let output = Value::Map(vec![
                    (
                        Value::from("code"),
                        exit.code.map_or(Value::Nil, Value::from),
                    ),
                    (
                        Value::from("signal"),
                        exit.signal.map_or(Value::Nil, Value::from),
                    ),
                    (
                        Value::from("stdout"),
                        Value::from(String::from_utf8_lossy(&stdout).into_owned()),
                    ),
                    (Value::from("timed_out"), Value::from(exit.timed_out)),
                    (Value::from("truncated"), Value::from(exit.truncated)),
                ]);
                (output, exit.code != Some(0))
            }
            Err(message) => (
                Value::Map(vec![(Value::from("error"), Value::from(message))]),
                true,
            ),
        };
        self.send(ToolResult {
            task_id: Some(run.task_id.clone()),
            call_id,
            output,
            is_error,
        })
    }

    /// Waits for the reply to exec `id` and, once started, its output and exit; answers
    /// everything else meanwhile. `Ok(Err(message))` when the shim refused the exec.
    #[allow(clippy::type_complexity)]
    fn wait_exec(
        &mut self,
        run: &mut Running,
        id: RequestId,
    ) -> Result<Result<(ExecExit, Vec<u8>), String>, Stop> {
        let mut exec_id = None;
        let mut stdout = Vec::new();
        loop {
            let msg = self.next(None)?.ok_or(Stop(0))?;
            match msg {
                ShimToDriver::ExecStarted(s) if s.re == id => exec_id = Some(s.exec_id),
                ShimToDriver::Error(e) if e.re == Some(id) && exec_id.is_none() => {
                    return Ok(Err(e.message));
                }
                ShimToDriver::ExecOutput(o) if Some(o.exec_id) == exec_id => {
                    if matches!(o.stream, OutputStream::Stdout | OutputStream::Pty) {
                        stdout.extend_from_slice(&o.data);
                    }
                }
                ShimToDriver::ExecExit(x) if Some(x.exec_id) == exec_id => {
                    return Ok(Ok((x, stdout)));
                }
                other => self.answer(other, Some(run))?,
            }
        }
    }
}

/// What a task's `input` asks of the echo driver (see `examples/README.md`).
#[derive(Debug, Default)]
struct Spec {
    text: String,
    delay: Duration,
    exec: Option<Vec<String>>,
    output: Option<Value>,
    fail: Option<String>,
    crash: Option<i32>,
    hang: bool,
    ignore_cancel: bool,
    garbage: bool,
}

impl Spec {
    /// Reads an input: a string is `{"text": S}`; a map's known keys must have their types.
    fn parse(input: &Value) -> Result<Spec, String> {
        let mut spec = Spec::default();
        let pairs = match input {
            Value::String(s) => {
                spec.text = s.as_str().ok_or("input is not valid UTF-8")?.to_owned();
                return Ok(spec);
            }
            Value::Map(pairs) => pairs,
            _ => return Err("input must be a string or a map".into()),
        };
        for (key, value) in pairs {
            let Some(key) = key.as_str() else { continue };
            let wrong = |what: &str| format!("input key {key:?} must be {what}");
            match key {
                "text" => spec.text = value.as_str().ok_or_else(|| wrong("a string"))?.into(),
                "delay_ms" => {
                    let ms = value.as_u64().ok_or_else(|| wrong("an unsigned integer"))?;
                    spec.delay = Duration::from_millis(ms);
                }
                "exec" => {
                    let items = value
                        .as_array()
                        .ok_or_else(|| wrong("an array of strings"))?;
                    let argv = items
                        .iter()
                        .map(|a| a.as_str().map(str::to_owned))
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| wrong("an array of strings"))?;
                    spec.exec = Some(argv);
                }
                "output" => spec.output = Some(value.clone()),
                "fail" => spec.fail = Some(value.as_str().ok_or_else(|| wrong("a string"))?.into()),
                "crash" => {
                    let code = value
                        .as_i64()
                        .and_then(|c| i32::try_from(c).ok())
                        .ok_or_else(|| wrong("an integer"))?;
                    spec.crash = Some(code);
                }
                "hang" => spec.hang = value.as_bool().ok_or_else(|| wrong("a bool"))?,
                "ignore_cancel" => {
                    spec.ignore_cancel = value.as_bool().ok_or_else(|| wrong("a bool"))?;
                }
                "garbage" => spec.garbage = value.as_bool().ok_or_else(|| wrong("a bool"))?,
                _ => {}
            }
        }
        Ok(spec)
    }
}
