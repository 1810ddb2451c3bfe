//! Events: what the driver reports while it works, and what the shim reports about the driver.
//!
//! Driver events travel driver → shim as top-level messages; the shim stamps each with a `seq`
//! and relays it to the control plane inside an `event` envelope, next to its own lifecycle
//! events (see [`crate::message::Event`]).

use rmpv::Value;
use serde::{Deserialize, Serialize};

use crate::enc::put_names;

use super::{fields, nil_as_default};

/// `message_chunk`: a piece of the agent's output text, streamed as it is produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageChunk {
    /// The task this belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// The text.
    pub text: String,
    /// Who speaks (`assistant`, `thinking`…), if the driver distinguishes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// True on the last chunk of a message.
    #[serde(default, rename = "final", deserialize_with = "nil_as_default")]
    pub is_final: bool,
}

fields!(MessageChunk { task_id: opt skip, text: req, role: opt skip, is_final as "final": nil });

/// `tool_call`: the agent decided to call a tool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The task this belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// Correlates the call with its `tool_result`.
    pub call_id: String,
    /// The tool's name.
    pub name: String,
    /// The tool's arguments.
    pub input: Value,
}

fields!(ToolCall { task_id: opt skip, call_id: req, name: req, input: req });

/// `tool_result`: a tool call finished.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolResult {
    /// The task this belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// The `call_id` of the `tool_call`.
    pub call_id: String,
    /// The tool's result.
    pub output: Value,
    /// True when the tool failed.
    #[serde(default, deserialize_with = "nil_as_default")]
    pub is_error: bool,
}

fields!(ToolResult { task_id: opt skip, call_id: req, output: req, is_error: nil });

/// What happened to a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileChangeKind {
    /// The file was created.
    Created,
    /// The file's content changed.
    Modified,
    /// The file was removed.
    Deleted,
    /// The file was renamed from `from`.
    Renamed,
}

put_names!(FileChangeKind { Created = "created", Modified = "modified", Deleted = "deleted", Renamed = "renamed" });

/// `file_change`: the agent changed a file in the workspace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileChange {
    /// The task this belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// The file's path.
    pub path: String,
    /// What happened.
    pub change: FileChangeKind,
    /// The old path, for a rename.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
}

fields!(FileChange { task_id: opt skip, path: req, change: req, from: opt skip });

/// `progress`: how far along a task is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// The task this belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// What is happening now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Units done so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done: Option<u64>,
    /// Units in all, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
}

fields!(Progress { task_id: opt skip, message: opt skip, done: opt skip, total: opt skip });

/// Where a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogStream {
    /// Sent by the driver as a `log` message.
    Driver,
    /// A line the driver wrote to its stdout (captured by the shim).
    Stdout,
    /// A line the driver wrote to its stderr (captured by the shim).
    Stderr,
}

put_names!(LogStream { Driver = "driver", Stdout = "stdout", Stderr = "stderr" });

/// `log`: a log line, sent by the driver or captured by the shim from its stdout/stderr.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Log {
    /// The task this belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// Where the line came from.
    pub stream: LogStream,
    /// `error`, `warn`, `info`, `debug` or `trace`, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    /// The line, without its newline.
    pub text: String,
    /// True when the line was cut to the length limit.
    #[serde(default, deserialize_with = "nil_as_default")]
    pub truncated: bool,
}

fields!(Log { task_id: opt skip, stream: req, level: opt skip, text: req, truncated: nil });

/// `custom`: an event of the driver's own kind, carrying any value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Custom {
    /// The task this belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// The driver's name for this kind of event.
    pub kind: String,
    /// Anything.
    pub data: Value,
}

fields!(Custom { task_id: opt skip, kind: req, data: req });

/// The driver's lifecycle state, as the shim sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriverState {
    /// Launched; waiting for `hello` and `ready`.
    Starting,
    /// Taking tasks.
    Ready,
    /// Asked to pause; waiting for `paused`.
    Pausing,
    /// At a safe point; the sandbox may be frozen.
    Paused,
    /// Asked to shut down; waiting for it to exit.
    Stopping,
    /// Not running (between restarts, or for good).
    Exited,
    /// Crash loop detected: no more restarts until `restart_driver`.
    Error,
}

put_names!(DriverState { Starting = "starting", Ready = "ready", Pausing = "pausing", Paused = "paused", Stopping = "stopping", Exited = "exited", Error = "error" });

/// `driver_started`: the shim launched the driver.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriverStarted {
    /// The driver's pid (in the sandbox's PID namespace).
    pub pid: u32,
    /// 1 for the first launch, counting up with each restart.
    pub attempt: u32,
}

fields!(DriverStarted {
    pid: req,
    attempt: req
});

/// `driver_ready`: the driver finished its handshake and sent `ready`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriverReady {
    /// The driver's pid.
    pub pid: u32,
    /// Milliseconds from launch to `ready`.
    pub startup_ms: u64,
}

fields!(DriverReady {
    pid: req,
    startup_ms: req
});

/// `driver_exited`: the driver process ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriverExited {
    /// The driver's pid.
    pub pid: u32,
    /// Its exit code, if it exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// The signal that killed it (`SIGKILL`…), if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// How long it ran.
    pub uptime_ms: u64,
    /// Why the shim thinks it ended (`exited`, `crashed`, `hung`, `protocol_error`,
    /// `not_ready`, `shutdown`…).
    pub reason: String,
    /// Whether the kernel's OOM killer sent the `SIGKILL`: present only when the driver died
    /// of `SIGKILL` and the sandbox cgroup's OOM-kill counter could be read (`true` when it
    /// rose with this death); absent when it cannot be known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_killed: Option<bool>,
}

fields!(DriverExited { pid: req, code: opt skip, signal: opt skip, uptime_ms: req, reason: req, oom_killed: opt skip });

/// `driver_restarting`: the restart policy will launch the driver again after `delay_ms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriverRestarting {
    /// The attempt number of the coming launch.
    pub attempt: u32,
    /// The backoff before it.
    pub delay_ms: u64,
}

fields!(DriverRestarting {
    attempt: req,
    delay_ms: req
});

/// `crash_loop`: too many restarts in the window; the driver stays down (state `error`) until
/// `restart_driver`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CrashLoop {
    /// Restarts counted in the window.
    pub restarts: u32,
    /// The window.
    pub window_ms: u64,
}

fields!(CrashLoop {
    restarts: req,
    window_ms: req
});

/// `state_changed`: the driver's lifecycle state changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateChanged {
    /// The previous state.
    pub from: DriverState,
    /// The new state.
    pub to: DriverState,
}

fields!(StateChanged { from: req, to: req });

/// `task_accepted`: the shim queued a submitted task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskAccepted {
    /// The task.
    pub task_id: String,
    /// Tasks ahead of it in the queue.
    pub position: u32,
}

fields!(TaskAccepted {
    task_id: req,
    position: req
});

/// `idle`: no task, no exec and no driver event for the configured stretch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Idle {
    /// When the agent became idle, in milliseconds since the Unix epoch.
    pub idle_since_ms: u64,
}

fields!(Idle { idle_since_ms: req });

/// `oom`: the kernel's OOM killer killed processes in the sandbox's cgroup since the last
/// reading. The shim reads the counter when one of its children (the driver, an exec) ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Oom {
    /// The sandbox cgroup's OOM-kill counter: kills since the cgroup was created (cgroup v2
    /// `memory.events` `oom_kill`, v1 `memory.oom_control` `oom_kill`).
    pub kills: u64,
    /// Kills since the previous `oom` event (or since the shim started).
    pub new_kills: u64,
}

fields!(Oom {
    kills: req,
    new_kills: req
});

/// `busy`: work arrived after `idle`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Busy {}

impl super::DriverToShim {
    /// The task a driver event names (`message_chunk`, `tool_call`, `tool_result`,
    /// `file_change`, `progress`, `log`, `custom`, and `error`), if any; `None` for every other
    /// message.
    pub fn event_task_id(&self) -> Option<&str> {
        use super::DriverToShim as D;
        match self {
            D::Error(e) => e.task_id.as_deref(),
            D::MessageChunk(m) => m.task_id.as_deref(),
            D::ToolCall(m) => m.task_id.as_deref(),
            D::ToolResult(m) => m.task_id.as_deref(),
            D::FileChange(m) => m.task_id.as_deref(),
            D::Progress(m) => m.task_id.as_deref(),
            D::Log(m) => m.task_id.as_deref(),
            D::Custom(m) => m.task_id.as_deref(),
            _ => None,
        }
    }
}

fields!(Busy {});
