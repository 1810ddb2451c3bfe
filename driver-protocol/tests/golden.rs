//! Golden test vectors: the wire bytes of every message, checked in both directions.
//!
//! `tests/vectors/<direction>/<type>.json` holds one message per `type` per direction: the
//! whole frame as hex and the body as JSON (MessagePack `bin` written `{"$bin": "<hex>"}`,
//! map keys in wire order). Each sample is built here in Rust, and the test checks that
//!
//! - encoding the sample gives the file's frame, byte for byte;
//! - decoding the file's frame with the direction's enum gives the sample;
//! - the file's `value` is the body decoded generically (by `rmpv`, not by our structs);
//! - every `type` of every direction has a file, and every file a sample.
//!
//! `tests/vectors/invalid/*.json` are frames a receiver must reject, with the error code it
//! must report. The same files are read by `tests/python/test_vectors.py` with the `msgpack`
//! package from PyPI, an independent MessagePack implementation.
//!
//! Run with `UPDATE_GOLDEN=1` to (re)write the files from the samples instead of comparing.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use driver_protocol::blocking::FrameReader;
use driver_protocol::message::*;
use driver_protocol::{DecodeError, ErrorCode, Message, DEFAULT_MAX_FRAME, PROTOCOL_NAME};
use hmac::{Hmac, Mac};
use rmpv::Value;
use sha2::Sha256;

// ---------------------------------------------------------------------------------------------
// Directions

/// The five directions, with their folder names and `TYPES`.
const DIRECTIONS: &[(&str, &[&str])] = &[
    ("driver_to_shim", DriverToShim::TYPES),
    ("shim_to_driver", ShimToDriver::TYPES),
    ("control_to_shim", ControlToShim::TYPES),
    ("shim_to_control", ShimToControl::TYPES),
    ("event", Event::TYPES),
];

/// A message of any direction.
#[derive(Debug, Clone, PartialEq)]
enum Any {
    DriverToShim(DriverToShim),
    ShimToDriver(ShimToDriver),
    ControlToShim(ControlToShim),
    ShimToControl(ShimToControl),
    Event(Event),
}

impl Any {
    fn direction(&self) -> &'static str {
        match self {
            Self::DriverToShim(_) => "driver_to_shim",
            Self::ShimToDriver(_) => "shim_to_driver",
            Self::ControlToShim(_) => "control_to_shim",
            Self::ShimToControl(_) => "shim_to_control",
            Self::Event(_) => "event",
        }
    }

    fn type_name(&self) -> &str {
        match self {
            Self::DriverToShim(m) => m.type_name(),
            Self::ShimToDriver(m) => m.type_name(),
            Self::ControlToShim(m) => m.type_name(),
            Self::ShimToControl(m) => m.type_name(),
            Self::Event(m) => m.type_name(),
        }
    }

    fn to_body(&self) -> Vec<u8> {
        let body = match self {
            Self::DriverToShim(m) => m.to_body(),
            Self::ShimToDriver(m) => m.to_body(),
            Self::ControlToShim(m) => m.to_body(),
            Self::ShimToControl(m) => m.to_body(),
            Self::Event(m) => m.to_body(),
        };
        body.unwrap_or_else(|e| panic!("encoding {self:?}: {e}"))
    }
}

/// Decodes `body` as a message of `direction`.
fn decode(direction: &str, body: &[u8]) -> Result<Any, DecodeError> {
    Ok(match direction {
        "driver_to_shim" => Any::DriverToShim(DriverToShim::decode(body)?),
        "shim_to_driver" => Any::ShimToDriver(ShimToDriver::decode(body)?),
        "control_to_shim" => Any::ControlToShim(ControlToShim::decode(body)?),
        "shim_to_control" => Any::ShimToControl(ShimToControl::decode(body)?),
        "event" => Any::Event(Event::decode(body)?),
        other => panic!("unknown direction {other:?}"),
    })
}

/// Reads one frame of `direction` the way a receiver does: header checked against
/// [`DEFAULT_MAX_FRAME`] first, then the body decoded.
fn receive(direction: &str, frame: &[u8]) -> Result<Option<Any>, DecodeError> {
    let mut reader = FrameReader::new(frame);
    match reader.read_frame()? {
        Some(body) => decode(direction, body).map(Some),
        None => Ok(None),
    }
}

// ---------------------------------------------------------------------------------------------
// Samples

/// One golden message.
struct Sample {
    description: &'static str,
    msg: Any,
    /// A second sample of a type (an optional field in use) is in `<type>.<variant>.json`.
    variant: Option<&'static str>,
}

fn s(description: &'static str, msg: impl Into<Any>) -> Sample {
    Sample {
        description,
        msg: msg.into(),
        variant: None,
    }
}

/// Another sample of a type that already has one, showing optional fields.
fn v(variant: &'static str, description: &'static str, msg: impl Into<Any>) -> Sample {
    Sample {
        variant: Some(variant),
        ..s(description, msg)
    }
}

/// More samples of types that [`samples`] has already, each in its own file.
fn variant_samples() -> Vec<Sample> {
    use ControlToShim as C;
    vec![
        v(
            "clock",
            "Set the wall clock to 2025-01-01T00:00:00Z, then resume the agent (after a \
             snapshot restore).",
            C::Resume(Resume {
                id: 0x5eed_0000_0000_0043,
                slept_ms: None,
                unix_ms: Some(1_735_689_600_000),
            }),
        ),
        Sample {
            variant: Some("max_attempts"),
            ..s(
                "Queue a task; redeliver it after a driver crash, delivering it at most 5 times.",
                C::SubmitTask(SubmitTask {
                    id: 0x5eed_0000_0000_0011,
                    task_id: "task-poison".to_owned(),
                    input: Value::from("parse the attached file"),
                    output_schema: None,
                    timeout_ms: None,
                    redeliver: true,
                    max_attempts: Some(5),
                }),
            )
        },
    ]
}

impl From<DriverToShim> for Any {
    fn from(m: DriverToShim) -> Self {
        Self::DriverToShim(m)
    }
}
impl From<ShimToDriver> for Any {
    fn from(m: ShimToDriver) -> Self {
        Self::ShimToDriver(m)
    }
}
impl From<ControlToShim> for Any {
    fn from(m: ControlToShim) -> Self {
        Self::ControlToShim(m)
    }
}
impl From<ShimToControl> for Any {
    fn from(m: ShimToControl) -> Self {
        Self::ShimToControl(m)
    }
}
impl From<Event> for Any {
    fn from(m: Event) -> Self {
        Self::Event(m)
    }
}

/// A MessagePack map with string keys, in the given order.
fn map(entries: &[(&str, Value)]) -> Value {
    Value::Map(
        entries
            .iter()
            .map(|(k, v)| (Value::from(*k), v.clone()))
            .collect(),
    )
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

fn some(s: &str) -> Option<String> {
    Some(s.to_owned())
}

/// The worked authentication example of docs/PROTOCOL.md: token `secret`, the shim's nonce
/// 32 × 0x01, the control plane's 32 × 0x02.
const TOKEN: &[u8] = b"secret";
const SHIM_NONCE: [u8; 32] = [0x01; 32];
const CONTROL_NONCE: [u8; 32] = [0x02; 32];
const SHIM_MAC: &str = "0c7c2ee196f3a6c05bcbba0af9e438e3b73d9ddbb8e87c3841c9d2a72457691f";
const CONTROL_MAC: &str = "9816c203fe7f74f7ccd3e2156de97605a22f24f8ad0b134dc1d5b1bedac39056";

fn mac_bytes(hex_mac: &str) -> Bytes {
    Bytes::from(hex::decode(hex_mac).expect("valid hex"))
}

fn hello(role: Role, software: &str, version: &str, capabilities: &[&str]) -> Hello {
    Hello {
        protocol: PROTOCOL_NAME.to_owned(),
        versions: vec![1],
        role,
        software: software.to_owned(),
        software_version: version.to_owned(),
        capabilities: strings(capabilities),
        agent_id: None,
        nonce: None,
        consumer: None,
        limits: None,
        cgroups: None,
        instance: None,
    }
}

fn task_input() -> Value {
    map(&[
        ("prompt", Value::from("Fix the failing test in src/lib.rs")),
        ("repo", Value::from("/workspace")),
        ("max_turns", Value::from(20)),
    ])
}

fn output_schema() -> Value {
    map(&[
        ("type", Value::from("object")),
        (
            "properties",
            map(&[("summary", map(&[("type", Value::from("string"))]))]),
        ),
        ("required", Value::Array(vec![Value::from("summary")])),
    ])
}

fn exec_request(id: u64, task_id: Option<String>) -> Exec {
    Exec {
        id,
        argv: strings(&["cargo", "test", "--quiet"]),
        env: BTreeMap::from([
            ("CARGO_TERM_COLOR".to_owned(), "never".to_owned()),
            ("RUST_BACKTRACE".to_owned(), "1".to_owned()),
        ]),
        cwd: some("/workspace"),
        user: some("1000:1000"),
        tty: None,
        stdin: true,
        timeout_ms: Some(600_000),
        output_cap: Some(1_048_576),
        task_id,
        limits: None,
        tag: None,
    }
}

fn tool_call() -> ToolCall {
    ToolCall {
        task_id: some("task-7f3a"),
        call_id: "call_01".to_owned(),
        name: "bash".to_owned(),
        input: map(&[
            ("command", Value::from("cargo test --quiet")),
            ("timeout", Value::from(120)),
        ]),
    }
}

fn tool_result() -> ToolResult {
    ToolResult {
        task_id: some("task-7f3a"),
        call_id: "call_01".to_owned(),
        output: map(&[
            ("exit_code", Value::from(101)),
            (
                "stdout",
                Value::from("test result: FAILED. 11 passed; 1 failed"),
            ),
        ]),
        is_error: true,
    }
}

fn message_chunk() -> MessageChunk {
    MessageChunk {
        task_id: some("task-7f3a"),
        text: "The test fails because ".to_owned(),
        role: some("assistant"),
        is_final: false,
    }
}

fn file_change() -> FileChange {
    FileChange {
        task_id: some("task-7f3a"),
        path: "src/parser.rs".to_owned(),
        change: FileChangeKind::Renamed,
        from: some("src/parse.rs"),
    }
}

fn progress() -> Progress {
    Progress {
        task_id: some("task-7f3a"),
        message: some("running tests"),
        done: Some(3),
        total: Some(5),
    }
}

fn log(stream: LogStream) -> Log {
    Log {
        task_id: some("task-7f3a"),
        stream,
        level: some("warn"),
        text: "rate limited, retrying in 2s".to_owned(),
        truncated: false,
    }
}

fn custom() -> Custom {
    Custom {
        task_id: some("task-7f3a"),
        kind: "token_usage".to_owned(),
        data: map(&[
            ("input_tokens", Value::from(15_230)),
            ("output_tokens", Value::from(812)),
            ("cost_usd", Value::from(0.0625)),
            ("cached", Value::from(true)),
            ("model", Value::Nil),
        ]),
    }
}

fn driver_error() -> ErrorMsg {
    ErrorMsg {
        re: None,
        code: ErrorCode::Timeout,
        message: "model API did not answer within 60s".to_owned(),
        task_id: some("task-7f3a"),
        first_available: None,
    }
}

fn task_done() -> TaskDone {
    TaskDone {
        task_id: "task-7f3a".to_owned(),
        status: TaskStatus::Succeeded,
        output: Some(map(&[(
            "summary",
            Value::from("Fixed an off-by-one in the tokenizer; all 12 tests pass."),
        )])),
        error: None,
    }
}

fn exec_output(exec_id: u64) -> ExecOutput {
    ExecOutput {
        exec_id,
        stream: OutputStream::Stdout,
        data: Bytes::from_static(b"running 12 tests\n"),
    }
}

fn exec_exit(exec_id: u64) -> ExecExit {
    ExecExit {
        exec_id,
        code: Some(101),
        signal: None,
        timed_out: false,
        truncated: false,
        duration_ms: 4_210,
        oom_killed: None,
    }
}

/// A file's metadata for the files samples.
fn fs_entry(name: &str, kind: FsKind, target: Option<String>) -> FsEntry {
    FsEntry {
        name: name.to_owned(),
        kind,
        size: 48_213,
        mode: 0o644,
        uid: 1000,
        gid: 1000,
        mtime_ms: 1_796_000_000_000,
        target,
    }
}

fn samples() -> Vec<Sample> {
    use ControlToShim as C;
    use DriverToShim as D;
    use Event as E;
    use ShimToControl as SC;
    use ShimToDriver as SD;

    vec![
        // ----- driver → shim
        s(
            "The driver's handshake: the first frame it sends, without waiting for the shim's.",
            D::Hello(hello(Role::Driver, "echo-driver", "1.2.0", &["exec"])),
        ),
        s(
            "The driver can take tasks (first time: no re).",
            D::Ready(Ready::default()),
        ),
        s(
            "The driver finished a task successfully, with its output.",
            D::TaskDone(task_done()),
        ),
        s(
            "The driver reached a safe point, answering the shim's pause with id 9.",
            D::Paused(Paused { re: Some(9) }),
        ),
        s("The driver probes the shim.", D::Ping(Ping { id: 1 })),
        s(
            "The driver answers the shim's ping with id 5.",
            D::Pong(Pong { re: 5 }),
        ),
        s(
            "The driver acknowledges the shim's shutdown with id 12.",
            D::Ok(OkReply {
                re: 12,
                duplicate: None,
            }),
        ),
        s(
            "An error the driver reports (no re): relayed to the control plane as an event.",
            D::Error(driver_error()),
        ),
        s(
            "A piece of the agent's output text.",
            D::MessageChunk(message_chunk()),
        ),
        s("The agent calls a tool.", D::ToolCall(tool_call())),
        s(
            "A tool call ended with an error.",
            D::ToolResult(tool_result()),
        ),
        s("The agent renamed a file.", D::FileChange(file_change())),
        s("Task progress, 3 of 5 steps.", D::Progress(progress())),
        s(
            "A log line the driver sends.",
            D::Log(log(LogStream::Driver)),
        ),
        s("The driver's own kind of event.", D::Custom(custom())),
        s(
            "The driver asks the shim to run a tool process (reply: exec_started or error).",
            D::Exec(exec_request(3, some("task-7f3a"))),
        ),
        s(
            "Bytes for the stdin of exec 1, then close it.",
            D::ExecInput(ExecInput {
                exec_id: 1,
                data: Bytes::from_static(b"yes\n"),
                eof: true,
            }),
        ),
        s(
            "The terminal of exec 1 changed size.",
            D::ExecResize(ExecResize {
                exec_id: 1,
                rows: 40,
                cols: 120,
            }),
        ),
        s(
            "Interrupt exec 1's process group.",
            D::ExecSignal(ExecSignal {
                exec_id: 1,
                signal: "INT".to_owned(),
            }),
        ),
        // ----- shim → driver
        s(
            "The shim's handshake to the driver.",
            SD::Hello(hello(Role::Shim, "agent-shim", "0.1.0", &["exec", "pty"])),
        ),
        s(
            "A task for the driver, with an output schema, on its second attempt.",
            SD::Task(Task {
                task_id: "task-7f3a".to_owned(),
                input: task_input(),
                output_schema: Some(output_schema()),
                timeout_ms: Some(900_000),
                attempt: 2,
            }),
        ),
        s(
            "Stop working on a task within 5 s.",
            SD::Cancel(Cancel {
                id: 8,
                task_id: "task-7f3a".to_owned(),
                grace_ms: Some(5_000),
            }),
        ),
        s(
            "Reach a safe point within 10 s (answer: paused with re 9).",
            SD::Pause(Pause {
                id: 9,
                timeout_ms: Some(10_000),
            }),
        ),
        s(
            "Continue after a pause that lasted 5 minutes (answer: ready with re 10).",
            SD::Resume(Resume {
                id: 10,
                slept_ms: Some(300_000),
                unix_ms: None,
            }),
        ),
        s(
            "Stop gracefully within 8 s.",
            SD::Shutdown(Shutdown {
                id: 12,
                grace_ms: Some(8_000),
                reason: some("sandbox stopping"),
            }),
        ),
        s("The shim's liveness probe.", SD::Ping(Ping { id: 5 })),
        s(
            "The shim answers the driver's ping with id 1.",
            SD::Pong(Pong { re: 1 }),
        ),
        s(
            "A generic success reply to request 4.",
            SD::Ok(OkReply {
                re: 4,
                duplicate: None,
            }),
        ),
        s(
            "The shim could not start the driver's exec with id 3.",
            SD::Error(ErrorMsg {
                re: Some(3),
                code: ErrorCode::Invalid,
                message: "argv[0] \"carg\" not found in PATH".to_owned(),
                task_id: some("task-7f3a"),
                first_available: None,
            }),
        ),
        s(
            "The driver's exec with id 3 started as exec 1.",
            SD::ExecStarted(ExecStarted {
                re: 3,
                exec_id: 1,
                pid: 4242,
            }),
        ),
        s(
            "A chunk of exec 1's stdout.",
            SD::ExecOutput(exec_output(1)),
        ),
        s("Exec 1 exited with code 101.", SD::ExecExit(exec_exit(1))),
        // ----- control → shim
        s(
            "The control plane's handshake, with its authentication nonce (32 × 0x02).",
            C::Hello(Hello {
                nonce: Some(Bytes::copy_from_slice(&CONTROL_NONCE)),
                ..hello(Role::Control, "control-link", "0.1.0", &[])
            }),
        ),
        s(
            "The control plane's proof of the token \"secret\" (shim nonce 32 × 0x01).",
            C::Auth(Auth {
                mac: mac_bytes(CONTROL_MAC),
            }),
        ),
        s(
            "Queue a task; redeliver it if the driver crashes while running it.",
            C::SubmitTask(SubmitTask {
                id: 0x5eed_0000_0000_0001,
                task_id: "task-7f3a".to_owned(),
                input: task_input(),
                output_schema: Some(output_schema()),
                timeout_ms: Some(900_000),
                redeliver: true,
                max_attempts: None,
            }),
        ),
        s(
            "Cancel a task, giving the driver 5 s.",
            C::CancelTask(CancelTask {
                id: 0x5eed_0000_0000_0002,
                task_id: "task-7f3a".to_owned(),
                grace_ms: Some(5_000),
            }),
        ),
        s(
            "Pause the agent; the driver has 10 s to reach a safe point.",
            C::Pause(Pause {
                id: 0x5eed_0000_0000_0003,
                timeout_ms: Some(10_000),
            }),
        ),
        s(
            "Set the wall clock to 2025-01-01T00:00:00Z.",
            C::SetClock(SetClock {
                id: 0x5eed_0000_0000_0042,
                unix_ms: 1_735_689_600_000,
            }),
        ),
        s(
            "Resume the agent (slept_ms is only sent to drivers).",
            C::Resume(Resume::new(0x5eed_0000_0000_0004)),
        ),
        s(
            "Send SIGTERM to the process group of exec 17.",
            C::Signal(Signal {
                id: 0x5eed_0000_0000_0005,
                signal: "SIGTERM".to_owned(),
                target: SignalTarget::Exec,
                exec_id: Some(17),
            }),
        ),
        s(
            "Relaunch the driver, also out of state error.",
            C::RestartDriver(RestartDriver {
                id: 0x5eed_0000_0000_0006,
            }),
        ),
        s(
            "Replace the driver command.",
            C::SetDriver(SetDriver {
                id: 0x5eed_0000_0000_0007,
                argv: strings(&["python3", "/opt/agent/driver.py", "--model", "large"]),
                env: BTreeMap::from([("AGENT_MODE".to_owned(), "review".to_owned())]),
            }),
        ),
        s(
            "Run a tool process on a terminal for the control plane.",
            C::Exec(Exec {
                tty: Some(TtySize { rows: 24, cols: 80 }),
                user: None,
                ..exec_request(0x5eed_0000_0000_0008, None)
            }),
        ),
        s(
            "Bytes for the terminal of exec 17.",
            C::ExecInput(ExecInput {
                exec_id: 17,
                data: Bytes::from_static(b"ls -la\r"),
                eof: false,
            }),
        ),
        s(
            "The terminal of exec 17 changed size.",
            C::ExecResize(ExecResize {
                exec_id: 17,
                rows: 50,
                cols: 200,
            }),
        ),
        s(
            "Send signal 9 to exec 17's process group.",
            C::ExecSignal(ExecSignal {
                exec_id: 17,
                signal: "9".to_owned(),
            }),
        ),
        s(
            "Ask for the shim's status.",
            C::Status(Status {
                id: 0x5eed_0000_0000_0009,
            }),
        ),
        s(
            "Stop the agent and the shim within 8 s.",
            C::Shutdown(Shutdown {
                id: 0x5eed_0000_0000_000a,
                grace_ms: Some(8_000),
                reason: some("scale down"),
            }),
        ),
        s(
            "Every event up to seq 41 is processed.",
            C::Ack(Ack { seq: 41 }),
        ),
        s(
            "After the handshake: the control plane processed events up to seq 41.",
            C::ResumeFrom(ResumeFrom::after(41)),
        ),
        s(
            "The control plane's liveness probe.",
            C::Ping(Ping {
                id: 0x5eed_0000_0000_000b,
            }),
        ),
        // files
        s(
            "The metadata of a file under the file root.",
            C::FsStat(FsStat {
                id: 0x5eed_0000_0000_0010,
                path: "/work/report.pdf".to_owned(),
                follow: false,
            }),
        ),
        s(
            "The second page of a directory: at most 2 entries after \"a.txt\".",
            C::FsList(FsList {
                id: 0x5eed_0000_0000_0011,
                path: "/work".to_owned(),
                after: some("a.txt"),
                limit: Some(2),
            }),
        ),
        s(
            "Stream a file from offset 4096 (a read resumed after a reconnect).",
            C::FsRead(FsRead {
                id: 0x5eed_0000_0000_0012,
                path: "/work/report.pdf".to_owned(),
                offset: 4096,
                length: None,
            }),
        ),
        s(
            "Create a directory and its missing parents, mode 0700.",
            C::FsMkdir(FsMkdir {
                id: 0x5eed_0000_0000_0013,
                path: "/work/out/logs".to_owned(),
                parents: true,
                mode: Some(0o700),
            }),
        ),
        s(
            "Remove a directory tree.",
            C::FsRemove(FsRemove {
                id: 0x5eed_0000_0000_0014,
                path: "/work/out".to_owned(),
                recursive: true,
            }),
        ),
        s(
            "Move a file, replacing the target.",
            C::FsRename(FsRename {
                id: 0x5eed_0000_0000_0015,
                from: "/work/draft.md".to_owned(),
                to: "/work/final.md".to_owned(),
            }),
        ),
        s(
            "Start an upload that atomically replaces a file, creating its parents.",
            C::FsWriteOpen(FsWriteOpen {
                id: 0x5eed_0000_0000_0016,
                path: "/work/in/data.bin".to_owned(),
                mode: Some(0o640),
                parents: true,
                append: false,
                handle: None,
            }),
        ),
        s(
            "Bytes 65536.. of upload 3.",
            C::FsWriteData(FsWriteData {
                id: 0x5eed_0000_0000_0017,
                handle: 3,
                offset: 65_536,
                data: Bytes::from_static(b"\x7fELF"),
            }),
        ),
        s(
            "Finish upload 3: fsync, then rename over the target.",
            C::FsWriteClose(FsWriteClose {
                id: 0x5eed_0000_0000_0018,
                handle: 3,
                abort: false,
            }),
        ),
        s(
            "Watch a tree for changes.",
            C::FsWatch(FsWatch {
                id: 0x5eed_0000_0000_0019,
                path: "/work".to_owned(),
                recursive: true,
            }),
        ),
        s(
            "End the watch started by request 0x5eed000000000019.",
            C::FsUnwatch(FsUnwatch {
                id: 0x5eed_0000_0000_001a,
                watch: 0x5eed_0000_0000_0019,
            }),
        ),
        s(
            "Ask for a resource reading.",
            C::Metrics(Metrics {
                id: 0x5eed_0000_0000_000c,
            }),
        ),
        // ----- shim → control
        s(
            "The shim's handshake to the control plane, with its agent id and nonce (32 × 0x01).",
            SC::Hello(Hello {
                agent_id: some("agent-0192"),
                nonce: Some(Bytes::copy_from_slice(&SHIM_NONCE)),
                ..hello(Role::Shim, "agent-shim", "0.1.0", &[])
            }),
        ),
        s(
            "The shim's proof of the token \"secret\" (control nonce 32 × 0x02).",
            SC::Auth(Auth {
                mac: mac_bytes(SHIM_MAC),
            }),
        ),
        s(
            "The task was queued (reply to submit_task).",
            SC::Ok(OkReply {
                re: 0x5eed_0000_0000_0001,
                duplicate: None,
            }),
        ),
        s(
            "The task queue is full (reply to submit_task).",
            SC::Error(ErrorMsg {
                re: Some(0x5eed_0000_0000_0001),
                code: ErrorCode::Limit,
                message: "task queue is full (64 tasks)".to_owned(),
                task_id: some("task-7f3a"),
                first_available: None,
            }),
        ),
        s(
            "The shim's status, answering status.",
            SC::StatusReply(StatusReply {
                re: 0x5eed_0000_0000_0009,
                state: DriverState::Ready,
                driver_pid: Some(7),
                restarts: 1,
                uptime_ms: 3_600_000,
                last_exit: Some(ExitInfo {
                    code: None,
                    signal: some("SIGKILL"),
                }),
                children: 3,
                reaped: 118,
                tasks_queued: 2,
                task_running: some("task-7f3a"),
                execs_running: 1,
                buffered_events: 12,
                buffered_bytes: 4_096,
                last_seq: 53,
                rss_bytes: 1_572_864,
                idle_since_ms: None,
                cgroups: None,
            }),
        ),
        s(
            "A resource reading, answering metrics: the sandbox's cgroup (v2), its workspace, the driver and exec 17.",
            SC::MetricsReply(MetricsReply::new(0x5eed_0000_0000_000c, metrics_reading())),
        ),
        s(
            "The control plane's exec started as exec 17.",
            SC::ExecStarted(ExecStarted {
                re: 0x5eed_0000_0000_0008,
                exec_id: 17,
                pid: 311,
            }),
        ),
        s(
            "Event 42: a tool call the driver reported, relayed with its seq.",
            SC::Event(EventEnvelope {
                seq: 42,
                event: E::ToolCall(tool_call()),
            }),
        ),
        s(
            "The shim answers the control plane's ping.",
            SC::Pong(Pong {
                re: 0x5eed_0000_0000_000b,
            }),
        ),
        // sessions
        v(
            "consumer",
            "A control plane's hello naming its durable consumer (absent: an observer).",
            C::Hello(Hello {
                consumer: some("control"),
                ..hello(Role::Control, "control-link", "0.1.0", &[])
            }),
        ),
        v(
            "now",
            "An observer follows live events only.",
            C::ResumeFrom(ResumeFrom::now()),
        ),
        s(
            "Retire the durable consumer \"shipper\".",
            C::ForgetConsumer(ForgetConsumer {
                id: 0x5eed_0000_0000_000c,
                consumer: "shipper".to_owned(),
            }),
        ),
        v(
            "limits",
            "The shim's hello advertising its limits, its cgroup mode and its instance before authentication.",
            SC::Hello(Hello {
                agent_id: some("agent-0192"),
                cgroups: some("v2-delegated"),
                instance: Some(0x9e37_79b9_7f4a_7c15),
                limits: Some(Box::new(Limits {
                    max_events: 4096,
                    max_bytes: 8_388_608,
                    max_frame: 16_777_216,
                    handshake_max_frame: 16_384,
                    ids_window: 1024,
                    hello_timeout_ms: 1000,
                    handshake_timeout_ms: 3000,
                    max_sessions: 16,
                    max_consumers: 4,
                    ack_every: 64,
                    ack_delay_ms: 100,
                })),
                ..hello(Role::Shim, "agent-shim", "0.1.0", &[])
            }),
        ),
        v(
            "duplicate",
            "submit_task of a task_id the shim already knows: nothing was queued.",
            SC::Ok(OkReply {
                re: 0x5eed_0000_0000_0001,
                duplicate: Some(true),
            }),
        ),
        v(
            "gap",
            "resume_from names a seq older than what is still buffered for this client.",
            SC::Error(ErrorMsg {
                first_available: Some(1042),
                ..ErrorMsg::new(
                    None,
                    ErrorCode::Gap,
                    "events 1..=1041 are no longer buffered for this client",
                )
            }),
        ),
        v(
            "replaced",
            "A newer connection of the same consumer took this one's place; it is closed.",
            SC::Error(ErrorMsg::new(
                None,
                ErrorCode::Replaced,
                "a newer connection of this consumer replaced this one",
            )),
        ),
        v(
            "conflict",
            "A request id was reused for another request.",
            SC::Error(ErrorMsg::new(
                Some(0x5eed_0000_0000_0001),
                ErrorCode::Conflict,
                "this request id was used for another request",
            )),
        ),
        s(
            "An observer fell behind: 128 events were freed before it was sent them.",
            SC::Lagged(Lagged {
                missed: 128,
                next_seq: 1170,
            }),
        ),
        // exec registry
        v(
            "tag",
            "Run a tool process labelled for list_execs.",
            C::Exec(Exec {
                tag: some("build:web"),
                ..Exec::new(0x5eed_0000_0000_0020, ["make", "-j4"])
            }),
        ),
        s(
            "List the running and recently exited execs.",
            C::ListExecs(ListExecs {
                id: 0x5eed_0000_0000_0021,
            }),
        ),
        s(
            "Replay exec 17's retained output from byte 4096, then follow it.",
            C::AttachExec(AttachExec {
                id: 0x5eed_0000_0000_0022,
                exec_id: 17,
                from_offset: Some(4096),
            }),
        ),
        s(
            "Stop following exec 17 on this connection.",
            C::DetachExec(DetachExec {
                id: 0x5eed_0000_0000_0023,
                exec_id: 17,
            }),
        ),
        s(
            "The execs: one running (the control plane's, tagged), one exited (the driver's).",
            SC::ExecList(ExecList {
                re: 0x5eed_0000_0000_0021,
                execs: vec![
                    ExecInfo {
                        exec_id: 17,
                        argv: strings(&["make", "-j4"]),
                        argv_truncated: false,
                        pid: 311,
                        uid: 1000,
                        user: some("1000:1000"),
                        tag: some("build:web"),
                        owner: "control".to_owned(),
                        started_ms: 1_767_225_600_000,
                        output_bytes: 81_920,
                        exit: None,
                    },
                    ExecInfo {
                        exec_id: 16,
                        argv: strings(&["cargo", "test"]),
                        argv_truncated: false,
                        pid: 290,
                        uid: 0,
                        user: None,
                        tag: None,
                        owner: "driver".to_owned(),
                        started_ms: 1_767_225_590_000,
                        output_bytes: 512,
                        exit: Some(ExecEnd {
                            code: Some(0),
                            signal: None,
                            timed_out: false,
                            oom_killed: None,
                            ended_ms: 1_767_225_598_500,
                        }),
                    },
                ],
            }),
        ),
        s(
            "Attached to exec 17 from byte 16384, the oldest still retained; 81920 written so far.",
            SC::ExecAttached(ExecAttached {
                re: 0x5eed_0000_0000_0022,
                exec_id: 17,
                from_offset: 16_384,
                first_offset: 16_384,
                end_offset: 81_920,
                running: true,
            }),
        ),
        s(
            "Output of attached exec 17 at byte 16384 of its output.",
            SC::AttachOutput(AttachOutput {
                exec_id: 17,
                stream: OutputStream::Stdout,
                offset: 16_384,
                data: Bytes::from_static(b"Compiling web v0.1.0\n"),
            }),
        ),
        s(
            "An attached connection fell behind exec 17: 65536 bytes are skipped.",
            SC::AttachLagged(AttachLagged {
                exec_id: 17,
                missed: 65_536,
                next_offset: 147_456,
            }),
        ),
        s(
            "Attached exec 17 ended: the last frame of the attachment.",
            SC::AttachExit(exec_exit(17)),
        ),
        v(
            "attach_gap",
            "attach_exec from an offset no longer retained: the first retained offset.",
            SC::Error(ErrorMsg {
                first_available: Some(16_384),
                ..ErrorMsg::new(
                    Some(0x5eed_0000_0000_0022),
                    ErrorCode::Gap,
                    "exec 17: bytes before 16384 are no longer retained",
                )
            }),
        ),
        // files
        s(
            "A file's metadata, answering fs_stat.",
            SC::FsStatReply(FsStatReply {
                re: 0x5eed_0000_0000_0010,
                entry: fs_entry("report.pdf", FsKind::File, None),
            }),
        ),
        s(
            "A page of two entries, more to come, answering fs_list.",
            SC::FsListReply(FsListReply {
                re: 0x5eed_0000_0000_0011,
                entries: vec![
                    fs_entry("b.txt", FsKind::File, None),
                    fs_entry("latest", FsKind::Symlink, some("runs/42")),
                ],
                more: true,
            }),
        ),
        s(
            "The last chunk of an fs_read stream: 5 bytes at offset 4096, then the end.",
            SC::FsData(FsData {
                re: 0x5eed_0000_0000_0012,
                offset: 4096,
                data: Bytes::from_static(b"\x00\x01%PD"),
                eof: true,
            }),
        ),
        s(
            "Upload 3 is open and has 65536 bytes (answering a resumed fs_write_open).",
            SC::FsWriteReady(FsWriteReady {
                re: 0x5eed_0000_0000_0016,
                handle: 3,
                offset: 65_536,
            }),
        ),
        // ----- events (the body inside an `event` envelope)
        s(
            "A piece of the agent's output text, relayed.",
            E::MessageChunk(message_chunk()),
        ),
        s("A tool call, relayed.", E::ToolCall(tool_call())),
        s("A tool result, relayed.", E::ToolResult(tool_result())),
        s("A file change, relayed.", E::FileChange(file_change())),
        s("Task progress, relayed.", E::Progress(progress())),
        s(
            "A line the driver wrote to its stderr, captured by the shim.",
            E::Log(Log {
                level: None,
                ..log(LogStream::Stderr)
            }),
        ),
        s(
            "The driver's own kind of event, relayed.",
            E::Custom(custom()),
        ),
        s(
            "An error the driver reported, relayed.",
            E::Error(driver_error()),
        ),
        s(
            "A task failed: the shim reports it when the driver crashed while running it.",
            E::TaskDone(TaskDone {
                task_id: "task-7f3a".to_owned(),
                status: TaskStatus::Failed,
                output: None,
                error: some("driver crashed (signal SIGSEGV)"),
            }),
        ),
        s(
            "A submitted task was queued behind one other.",
            E::TaskAccepted(TaskAccepted {
                task_id: "task-7f3a".to_owned(),
                position: 1,
            }),
        ),
        s(
            "A file moved within a watched tree.",
            E::FsEvent(FsEvent {
                watch: 0x5eed_0000_0000_0019,
                change: FsChange::Renamed,
                path: "/work/draft.md".to_owned(),
                to: some("/work/final.md"),
                dropped: None,
            }),
        ),
        s(
            "The driver was launched (second launch).",
            E::DriverStarted(DriverStarted { pid: 7, attempt: 2 }),
        ),
        s(
            "The driver sent ready 180 ms after launch.",
            E::DriverReady(DriverReady {
                pid: 7,
                startup_ms: 180,
            }),
        ),
        s(
            "The driver exited with code 1 after 93 s.",
            E::DriverExited(DriverExited {
                pid: 7,
                code: Some(1),
                signal: None,
                uptime_ms: 93_000,
                reason: "crashed".to_owned(),
                oom_killed: None,
            }),
        ),
        s(
            "The driver will be relaunched in 400 ms.",
            E::DriverRestarting(DriverRestarting {
                attempt: 3,
                delay_ms: 400,
            }),
        ),
        s(
            "5 restarts within 60 s: the driver stays down (state error).",
            E::CrashLoop(CrashLoop {
                restarts: 5,
                window_ms: 60_000,
            }),
        ),
        s(
            "The driver went from pausing to paused.",
            E::StateChanged(StateChanged {
                from: DriverState::Pausing,
                to: DriverState::Paused,
            }),
        ),
        s(
            "The agent is at a safe point, answering the control plane's pause.",
            E::Paused(Paused {
                re: Some(0x5eed_0000_0000_0003),
            }),
        ),
        s(
            "Output of the control plane's exec 17 (PTY mode).",
            E::ExecOutput(ExecOutput {
                exec_id: 17,
                stream: OutputStream::Pty,
                data: Bytes::from_static(b"\x1b[1mtotal 8\x1b[0m\r\n"),
            }),
        ),
        s(
            "The control plane's exec 17 was killed by its timeout.",
            E::ExecExit(ExecExit {
                exec_id: 17,
                code: None,
                signal: some("SIGKILL"),
                timed_out: true,
                truncated: true,
                duration_ms: 600_000,
                oom_killed: Some(false),
            }),
        ),
        s(
            "The agent has been idle since 2025-01-01T00:00:00Z.",
            E::Idle(Idle {
                idle_since_ms: 1_735_689_600_000,
            }),
        ),
        s("Work arrived after idle.", E::Busy(Busy {})),
        s(
            "The OOM killer killed 2 processes in the sandbox since the last reading, 3 in all.",
            E::Oom(Oom {
                kills: 3,
                new_kills: 2,
            }),
        ),
        s(
            "The shim set the clock to 2025-01-01T00:00:00Z; it was 90 s behind.",
            E::ClockSet(ClockSet {
                unix_ms: 1_735_689_600_000,
                jump_ms: 90_000,
            }),
        ),
        s(
            "The shim is about to exit with code 7: its last event.",
            E::ShimExiting(ShimExiting { code: 7 }),
        ),
        s(
            "A periodic resource reading (--metrics-interval).",
            E::Metrics(metrics_reading()),
        ),
    ]
}

/// The reading of the `metrics_reply` and `metrics` samples.
fn metrics_reading() -> Reading {
    Reading {
        time_ms: 1_735_689_600_000,
        cgroup: Some(Box::new(CgroupReading {
            version: 2,
            memory_bytes: Some(52_428_800),
            memory_limit_bytes: Some(536_870_912),
            memory_peak_bytes: Some(104_857_600),
            memory_anon_bytes: Some(41_943_040),
            memory_file_bytes: Some(8_388_608),
            swap_bytes: Some(0),
            swap_limit_bytes: None,
            oom: Some(1),
            oom_kills: Some(1),
            cpu_usage_us: Some(12_500_000),
            cpu_periods: Some(240),
            cpu_throttled_periods: Some(12),
            cpu_throttled_us: Some(350_000),
            cpu_quota_us: Some(150_000),
            cpu_period_us: Some(100_000),
            pids: Some(9),
            pids_limit: Some(256),
            io_read_bytes: Some(4_096_000),
            io_write_bytes: Some(1_048_576),
        })),
        workspace: Some(FsReading {
            size_bytes: 10_737_418_240,
            used_bytes: 2_147_483_648,
            avail_bytes: 8_589_934_592,
            inodes: 655_360,
            inodes_used: 41_000,
        }),
        procs: vec![
            ProcReading {
                role: ProcRole::Driver,
                exec_id: None,
                pid: 7,
                pids: 2,
                rss_bytes: 31_457_280,
                cpu_us: 2_000_000,
            },
            ProcReading {
                role: ProcRole::Exec,
                exec_id: Some(17),
                pid: 311,
                pids: 5,
                rss_bytes: 20_971_520,
                cpu_us: 9_000_000,
            },
        ],
    }
}

// ---------------------------------------------------------------------------------------------
// Invalid frames

/// A frame a receiver must reject (or, for `unknown`, flag as unsupported).
struct Invalid {
    name: &'static str,
    description: &'static str,
    direction: &'static str,
    frame: Vec<u8>,
    /// The `DecodeError::code()` expected, or `unknown` for a frame that decodes to the
    /// `Unknown` variant.
    error: &'static str,
    /// Extra keys of the file, after the standard ones.
    extra: Vec<(&'static str, J)>,
}

fn framed(body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(body.len()).expect("small body");
    let mut frame = len.to_be_bytes().to_vec();
    frame.extend_from_slice(body);
    frame
}

fn packed(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, value).expect("encode to a vec");
    out
}

fn invalid_samples() -> Vec<Invalid> {
    // 64 nested arrays inside the message map: 65 levels counting the map, one too many.
    let mut deep = Value::Array(vec![]);
    for _ in 0..63 {
        deep = Value::Array(vec![deep]);
    }
    let mut trailing = packed(&map(&[
        ("type", Value::from("ping")),
        ("id", Value::from(7)),
    ]));
    trailing.push(0xc0);
    let mut too_large = (DEFAULT_MAX_FRAME as u32 + 1).to_be_bytes().to_vec();
    too_large.extend_from_slice(b"\x82\xa4type");

    vec![
        Invalid {
            name: "unknown_type",
            description: "A type this version does not know. Not an error: it decodes to \
                          Unknown with its id, the receiver answers \
                          error{code:\"unsupported\", re:42} and the connection stays up.",
            direction: "driver_to_shim",
            frame: framed(&packed(&map(&[
                ("type", Value::from("teleport")),
                ("id", Value::from(42)),
                ("destination", Value::from("mars")),
            ]))),
            error: "unknown",
            extra: vec![("type", J::Str("teleport".into())), ("id", J::U(42))],
        },
        Invalid {
            name: "wrong_direction",
            description: "A valid type that is not valid in this direction (a driver sending \
                          task): decodes to Unknown, answered error{code:\"unsupported\"}.",
            direction: "driver_to_shim",
            frame: framed(&packed(&map(&[
                ("type", Value::from("task")),
                ("task_id", Value::from("t1")),
                ("input", Value::from("hi")),
            ]))),
            error: "unknown",
            extra: vec![("type", J::Str("task".into())), ("id", J::Null)],
        },
        Invalid {
            name: "not_a_map",
            description: "The body is an array, not a map.",
            direction: "driver_to_shim",
            frame: framed(&packed(&Value::Array(vec![
                Value::from("ping"),
                Value::from(1),
            ]))),
            error: "malformed",
            extra: vec![],
        },
        Invalid {
            name: "missing_type",
            description: "A map without a type key.",
            direction: "driver_to_shim",
            frame: framed(&packed(&map(&[
                ("id", Value::from(1)),
                ("text", Value::from("hello")),
            ]))),
            error: "malformed",
            extra: vec![],
        },
        Invalid {
            name: "type_not_string",
            description: "The type key holds an integer, not a string.",
            direction: "shim_to_driver",
            frame: framed(&packed(&map(&[
                ("type", Value::from(5)),
                ("id", Value::from(1)),
            ]))),
            error: "malformed",
            extra: vec![],
        },
        Invalid {
            name: "wrong_field_type",
            description: "A ping whose id is a string, not an unsigned integer.",
            direction: "shim_to_driver",
            frame: framed(&packed(&map(&[
                ("type", Value::from("ping")),
                ("id", Value::from("seven")),
            ]))),
            error: "malformed",
            extra: vec![("field", J::Str("id".into()))],
        },
        Invalid {
            name: "missing_field",
            description: "A task_done without its required status.",
            direction: "driver_to_shim",
            frame: framed(&packed(&map(&[
                ("type", Value::from("task_done")),
                ("task_id", Value::from("task-7f3a")),
            ]))),
            error: "malformed",
            extra: vec![("field", J::Str("status".into()))],
        },
        Invalid {
            name: "trailing_bytes",
            description: "A ping followed by a stray nil inside the same frame.",
            direction: "driver_to_shim",
            frame: framed(&trailing),
            error: "malformed",
            extra: vec![],
        },
        Invalid {
            name: "too_deep",
            description: "A custom event whose data nests 64 arrays: 65 levels with the \
                          message's map, one over the limit of 64.",
            direction: "driver_to_shim",
            frame: framed(&packed(&map(&[
                ("type", Value::from("custom")),
                ("kind", Value::from("deep")),
                ("data", deep),
            ]))),
            error: "malformed",
            extra: vec![],
        },
        Invalid {
            name: "zero_length",
            description: "A frame with an empty body.",
            direction: "driver_to_shim",
            frame: vec![0, 0, 0, 0],
            error: "malformed",
            extra: vec![],
        },
        Invalid {
            name: "too_large",
            description: "A length prefix of 16 MiB + 1, one byte over the default maximum: \
                          rejected from the 4 header bytes alone, before any body is read \
                          (only its first bytes are here).",
            direction: "driver_to_shim",
            frame: too_large,
            error: "frame_too_large",
            extra: vec![],
        },
    ]
}

// ---------------------------------------------------------------------------------------------
// JSON with keys in wire order

/// A JSON value whose objects keep their key order (serde_json's `Map` sorts them).
#[derive(Debug, Clone, PartialEq)]
enum J {
    Null,
    Bool(bool),
    U(u64),
    I(i64),
    F(f64),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

impl J {
    /// A MessagePack value as JSON; `bin` becomes `{"$bin": "<hex>"}`.
    fn from_msgpack(v: &Value) -> Result<J, String> {
        Ok(match v {
            Value::Nil => J::Null,
            Value::Boolean(b) => J::Bool(*b),
            Value::Integer(i) => match (i.as_u64(), i.as_i64()) {
                (Some(u), _) => J::U(u),
                (None, Some(n)) => J::I(n),
                (None, None) => return Err(format!("integer {i} out of range")),
            },
            Value::F64(f) => J::F(*f),
            Value::F32(_) => return Err("float32 has no JSON form here; use float64".into()),
            Value::String(s) => match s.as_str() {
                Some(s) => J::Str(s.to_owned()),
                None => return Err("string is not UTF-8".into()),
            },
            Value::Binary(b) => J::Obj(vec![("$bin".into(), J::Str(hex::encode(b)))]),
            Value::Array(items) => J::Arr(
                items
                    .iter()
                    .map(J::from_msgpack)
                    .collect::<Result<_, _>>()?,
            ),
            Value::Map(entries) => J::Obj(
                entries
                    .iter()
                    .map(|(k, v)| match k.as_str() {
                        Some(k) => Ok((k.to_owned(), J::from_msgpack(v)?)),
                        None => Err(format!("map key {k} is not a string")),
                    })
                    .collect::<Result<_, _>>()?,
            ),
            Value::Ext(..) => return Err("ext values have no JSON form".into()),
        })
    }

    /// The same value as serde_json's (key order lost), to compare with a parsed file.
    fn to_serde(&self) -> serde_json::Value {
        use serde_json::Value as S;
        match self {
            J::Null => S::Null,
            J::Bool(b) => S::Bool(*b),
            J::U(u) => S::from(*u),
            J::I(i) => S::from(*i),
            J::F(f) => S::from(*f),
            J::Str(s) => S::from(s.as_str()),
            J::Arr(items) => S::Array(items.iter().map(J::to_serde).collect()),
            J::Obj(entries) => S::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_serde()))
                    .collect(),
            ),
        }
    }

    /// Pretty JSON in serde_json's style (two-space indent), keys in order.
    fn render(&self, out: &mut String, indent: usize) {
        let pad = |out: &mut String, n: usize| out.extend(std::iter::repeat_n(' ', n));
        match self {
            J::Null => out.push_str("null"),
            J::Bool(b) => write!(out, "{b}").unwrap(),
            J::U(u) => write!(out, "{u}").unwrap(),
            J::I(i) => write!(out, "{i}").unwrap(),
            J::F(f) => out.push_str(&serde_json::to_string(f).unwrap()),
            J::Str(s) => out.push_str(&serde_json::to_string(s).unwrap()),
            J::Arr(items) if items.is_empty() => out.push_str("[]"),
            J::Obj(entries) if entries.is_empty() => out.push_str("{}"),
            J::Arr(items) => {
                out.push_str("[\n");
                for (i, item) in items.iter().enumerate() {
                    pad(out, indent + 2);
                    item.render(out, indent + 2);
                    out.push_str(if i + 1 < items.len() { ",\n" } else { "\n" });
                }
                pad(out, indent);
                out.push(']');
            }
            J::Obj(entries) => {
                out.push_str("{\n");
                for (i, (k, v)) in entries.iter().enumerate() {
                    pad(out, indent + 2);
                    out.push_str(&serde_json::to_string(k).unwrap());
                    out.push_str(": ");
                    v.render(out, indent + 2);
                    out.push_str(if i + 1 < entries.len() { ",\n" } else { "\n" });
                }
                pad(out, indent);
                out.push('}');
            }
        }
    }

    fn to_file_text(&self) -> String {
        let mut out = String::new();
        self.render(&mut out, 0);
        out.push('\n');
        out
    }
}

/// A body decoded generically by rmpv (not by this crate), as JSON.
fn generic_json(body: &[u8]) -> Result<J, String> {
    let mut rest = body;
    let value = rmpv::decode::read_value(&mut rest).map_err(|e| e.to_string())?;
    if !rest.is_empty() {
        return Err(format!("{} trailing bytes", rest.len()));
    }
    J::from_msgpack(&value)
}

// ---------------------------------------------------------------------------------------------
// Files

fn vectors_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

fn updating() -> bool {
    std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| !v.is_empty() && v != "0")
}

fn write_file(path: &Path, text: &str) {
    fs::create_dir_all(path.parent().expect("has a parent")).expect("create vector dir");
    fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn read_json(path: &Path) -> Result<(String, serde_json::Value), String> {
    let text = fs::read_to_string(path).map_err(|e| format!("read: {e} (run UPDATE_GOLDEN=1)"))?;
    let json = serde_json::from_str(&text).map_err(|e| format!("parse: {e}"))?;
    Ok((text, json))
}

fn str_field<'a>(json: &'a serde_json::Value, key: &str) -> Result<&'a str, String> {
    json.get(key)
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| format!("no string {key:?}"))
}

fn file_frame(json: &serde_json::Value) -> Result<Vec<u8>, String> {
    hex::decode(str_field(json, "frame")?).map_err(|e| format!("frame is not hex: {e}"))
}

fn sample_file(sample: &Sample) -> (PathBuf, String, J) {
    let body = sample.msg.to_body();
    let frame = framed(&body);
    let value = generic_json(&body).unwrap_or_else(|e| panic!("{:?}: {e}", sample.msg));
    let doc = J::Obj(vec![
        ("direction".into(), J::Str(sample.msg.direction().into())),
        ("type".into(), J::Str(sample.msg.type_name().into())),
        ("description".into(), J::Str(sample.description.into())),
        ("frame".into(), J::Str(hex::encode(&frame))),
        ("value".into(), value.clone()),
    ]);
    let name = match sample.variant {
        Some(v) => format!("{}.{v}.json", sample.msg.type_name()),
        None => format!("{}.json", sample.msg.type_name()),
    };
    let path = vectors_dir().join(sample.msg.direction()).join(name);
    (path, doc.to_file_text(), value)
}

/// Checks one valid vector file against its sample; returns what is wrong.
fn check_sample(sample: &Sample, path: &Path, want_text: &str, want_value: &J) -> Vec<String> {
    let mut errors = Vec::new();
    let (text, json) = match read_json(path) {
        Ok(x) => x,
        Err(e) => return vec![e],
    };
    let frame = match file_frame(&json) {
        Ok(f) => f,
        Err(e) => return vec![e],
    };
    // encode(sample) == vector
    let ours = framed(&sample.msg.to_body());
    if frame != ours {
        errors.push(format!(
            "encoding differs:\n  file: {}\n  ours: {}",
            hex::encode(&frame),
            hex::encode(&ours)
        ));
    }
    // decode(vector) == sample, through the real frame reader
    match receive(sample.msg.direction(), &frame) {
        Ok(Some(got)) if got == sample.msg => {}
        Ok(got) => errors.push(format!("decodes to {got:?}\n  expected {:?}", sample.msg)),
        Err(e) => errors.push(format!("does not decode: {e}")),
    }
    // value == the body decoded generically
    match frame
        .get(4..)
        .ok_or("frame shorter than its header".to_owned())
    {
        Ok(body) => match generic_json(body) {
            Ok(generic) => {
                if json.get("value") != Some(&generic.to_serde()) {
                    errors.push(format!(
                        "value differs from the frame decoded generically: {}",
                        generic.to_serde()
                    ));
                }
                if generic != *want_value {
                    errors.push("the frame's generic decoding differs from the sample's".into());
                }
            }
            Err(e) => errors.push(format!("generic decoding: {e}")),
        },
        Err(e) => errors.push(e),
    }
    if str_field(&json, "direction") != Ok(sample.msg.direction())
        || str_field(&json, "type") != Ok(sample.msg.type_name())
    {
        errors.push("direction or type differ from the file's place".into());
    }
    // key order, description, formatting: the file is exactly what UPDATE_GOLDEN writes
    if errors.is_empty() && text != want_text {
        errors.push("file is not in canonical form (key order, description or layout)".into());
    }
    errors
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn every_type_of_every_direction_has_exactly_one_sample() {
    let samples = samples();
    for (direction, types) in DIRECTIONS {
        let mut sampled: Vec<&str> = samples
            .iter()
            .filter(|s| s.msg.direction() == *direction && s.variant.is_none())
            .map(|s| s.msg.type_name())
            .collect();
        sampled.sort_unstable();
        let mut want = types.to_vec();
        want.sort_unstable();
        assert_eq!(sampled, want, "samples of {direction} vs its TYPES");
    }
}

#[test]
fn valid_vectors_match_samples_both_ways() {
    let mut failures = Vec::new();
    let mut expected_files = BTreeSet::new();
    for sample in samples().into_iter().chain(variant_samples()) {
        let (path, text, value) = sample_file(&sample);
        expected_files.insert(path.clone());
        if updating() {
            write_file(&path, &text);
        }
        for e in check_sample(&sample, &path, &text, &value) {
            failures.push(format!("{}: {e}", path.display()));
        }
    }
    // every vector file has a sample
    for (direction, _) in DIRECTIONS {
        let dir = vectors_dir().join(direction);
        for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("dir entry").path();
            if !expected_files.contains(&path) {
                failures.push(format!("{}: no sample for this file", path.display()));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn invalid_vectors_are_rejected_with_their_code() {
    let mut failures = Vec::new();
    let mut expected_files = BTreeSet::new();
    for invalid in invalid_samples() {
        let path = vectors_dir()
            .join("invalid")
            .join(format!("{}.json", invalid.name));
        expected_files.insert(path.clone());
        let mut entries = vec![
            ("description".to_owned(), J::Str(invalid.description.into())),
            ("frame".to_owned(), J::Str(hex::encode(&invalid.frame))),
            ("direction".to_owned(), J::Str(invalid.direction.into())),
            ("error".to_owned(), J::Str(invalid.error.into())),
        ];
        entries.extend(
            invalid
                .extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone())),
        );
        let text = J::Obj(entries).to_file_text();
        if updating() {
            write_file(&path, &text);
        }
        let mut fail = |e: String| failures.push(format!("{}: {e}", path.display()));
        let (file_text, json) = match read_json(&path) {
            Ok(x) => x,
            Err(e) => {
                fail(e);
                continue;
            }
        };
        if file_text != text {
            fail("file differs from its sample (run UPDATE_GOLDEN=1)".into());
        }
        let frame = match file_frame(&json) {
            Ok(f) => f,
            Err(e) => {
                fail(e);
                continue;
            }
        };
        let want_error = str_field(&json, "error").unwrap_or("?");
        let direction = str_field(&json, "direction").unwrap_or("?");
        match (want_error, receive(direction, &frame)) {
            ("unknown", Ok(Some(msg))) => {
                let unknown = match msg {
                    Any::DriverToShim(DriverToShim::Unknown(u))
                    | Any::ShimToDriver(ShimToDriver::Unknown(u))
                    | Any::ControlToShim(ControlToShim::Unknown(u))
                    | Any::ShimToControl(ShimToControl::Unknown(u))
                    | Any::Event(Event::Unknown(u)) => u,
                    other => {
                        fail(format!("decoded to a known message {other:?}"));
                        continue;
                    }
                };
                let want_type = str_field(&json, "type").unwrap_or("?");
                let want_id = json.get("id").and_then(serde_json::Value::as_u64);
                if unknown.type_name != want_type || unknown.id != want_id {
                    fail(format!("decoded to {unknown:?}"));
                }
            }
            (want, Ok(got)) => fail(format!("decoded to {got:?}, expected error {want}")),
            (want, Err(e)) if e.code().as_str() == want => {}
            (want, Err(e)) => fail(format!("error {} ({e}), expected {want}", e.code())),
        }
        // The over-long prefix is caught by the header alone.
        if want_error == "frame_too_large" {
            let header: [u8; 4] = frame[..4].try_into().expect("4 bytes");
            assert!(u32::from_be_bytes(header) as usize > DEFAULT_MAX_FRAME);
        }
    }
    let dir = vectors_dir().join("invalid");
    for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("dir entry").path();
        if !expected_files.contains(&path) {
            failures.push(format!("{}: no sample for this file", path.display()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The `auth` vectors are the worked example of docs/PROTOCOL.md; recompute their proofs
/// from the definition, independently of the crate's handshake module.
#[test]
fn auth_vectors_follow_the_proof_definition() {
    let proof = |role: &[u8], peer_nonce: &[u8], own_nonce: &[u8]| {
        let mut mac = Hmac::<Sha256>::new_from_slice(TOKEN).expect("any key length");
        for part in [
            &b"agent-shim-auth-v1\0"[..],
            role,
            b"\0",
            peer_nonce,
            own_nonce,
        ] {
            mac.update(part);
        }
        hex::encode(mac.finalize().into_bytes())
    };
    assert_eq!(proof(b"control", &SHIM_NONCE, &CONTROL_NONCE), CONTROL_MAC);
    assert_eq!(proof(b"shim", &CONTROL_NONCE, &SHIM_NONCE), SHIM_MAC);
    let doc = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/PROTOCOL.md"))
        .expect("read docs/PROTOCOL.md");
    for mac in [CONTROL_MAC, SHIM_MAC] {
        assert!(
            doc.contains(mac),
            "docs/PROTOCOL.md lacks the worked mac {mac}"
        );
    }
}

/// The two refusals of the control link's gate (PROTOCOL.md §8.1), as the shim sends them
/// instead of its `hello`: checked against a generic MessagePack encoding (`rmpv`) of the
/// documented map, and decoded back to their codes.
#[test]
fn gate_refusals_are_error_frames_with_busy_and_limit() {
    for (code, wire, message) in [
        (
            ErrorCode::Busy,
            "busy",
            "too many handshakes pending from this source; retry later",
        ),
        (
            ErrorCode::Limit,
            "limit",
            "too many failed handshakes from this source; slow down",
        ),
    ] {
        assert_eq!(code.as_str(), wire);
        assert_eq!(ErrorCode::parse(wire), code);
        assert!(ErrorCode::KNOWN.contains(&wire));
        let msg = ShimToControl::Error(ErrorMsg {
            re: None,
            code: code.clone(),
            message: message.into(),
            task_id: None,
            first_available: None,
        });
        let body = map(&[
            ("type", Value::from("error")),
            ("code", Value::from(wire)),
            ("message", Value::from(message)),
        ]);
        let want = framed(&packed(&body));
        let mut got = bytes::BytesMut::new();
        driver_protocol::frame::write_message(&mut got, DEFAULT_MAX_FRAME, &msg).unwrap();
        assert_eq!(hex::encode(&got), hex::encode(&want), "{wire}");
        match receive("shim_to_control", &want) {
            Ok(Some(Any::ShimToControl(ShimToControl::Error(e)))) => assert_eq!(e.code, code),
            other => panic!("{wire}: {other:?}"),
        }
    }
}
