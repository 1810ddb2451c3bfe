//! Tool execution: run a process in the sandbox and stream its I/O.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::RequestId;

use crate::enc::put_names;

use super::{fields, nil_as_default};

/// A terminal size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TtySize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

fields!(TtySize {
    rows: req,
    cols: req
});

/// `exec.limits`: what an exec's own cgroup allows (only where the shim has delegated
/// cgroups, PROTOCOL.md §8.9).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecLimits {
    /// Memory (and swap) in bytes; over it the OOM killer kills within the exec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// Processes and threads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    /// CPU in thousandths of a CPU (1500 = one and a half).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_millis: Option<u64>,
}

fields!(ExecLimits { memory_bytes: opt skip, pids: opt skip, cpu_millis: opt skip });

/// `exec`: run a process in its own session and process group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Exec {
    /// The request id; the reply is `exec_started` (or `error`).
    pub id: RequestId,
    /// The program and its arguments; `argv[0]` is looked up in `PATH`.
    pub argv: Vec<String>,
    /// Variables set on top of the sandbox's scrubbed environment.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "nil_as_default"
    )]
    pub env: BTreeMap<String, String>,
    /// The working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// `UID[:GID]` or a user name to run as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Run on a pseudo-terminal of this initial size (stdout and stderr merge).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<TtySize>,
    /// Keep stdin open for `exec_input`; otherwise stdin is `/dev/null`.
    #[serde(default, deserialize_with = "nil_as_default")]
    pub stdin: bool,
    /// Kill the process group after this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Stop forwarding a stream's output after this many bytes (and mark it truncated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_cap: Option<u64>,
    /// The task this exec belongs to (cancelling the task kills it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// Limits of the exec's own cgroup (resources).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<ExecLimits>,
    /// A label for `list_execs` (1 to [`MAX_TAG`] bytes of `[A-Za-z0-9._:/@+=-]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

/// The longest `exec.tag`, in bytes.
pub const MAX_TAG: usize = 64;

/// Whether `tag` is a valid `exec.tag`: 1 to [`MAX_TAG`] bytes of `[A-Za-z0-9._:/@+=-]`.
///
/// ```
/// use driver_protocol::message::valid_tag;
///
/// assert!(valid_tag("build:web-1"));
/// assert!(!valid_tag("") && !valid_tag("a b") && !valid_tag(&"x".repeat(65)));
/// ```
pub fn valid_tag(tag: &str) -> bool {
    (1..=MAX_TAG).contains(&tag.len())
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:/@+=-".contains(&b))
}

fields!(Exec { id: req, argv: req, env: nil skip, cwd: opt skip, user: opt skip, tty: opt skip, stdin: nil, timeout_ms: opt skip, output_cap: opt skip, task_id: opt skip, limits: opt skip, tag: opt skip });

impl Exec {
    /// An `exec` of `argv` with every option left out: no extra variables, the default
    /// working directory and user, no terminal, stdin `/dev/null`, no timeout, no output cap,
    /// no task. Set the public fields for more.
    ///
    /// ```
    /// use driver_protocol::message::Exec;
    ///
    /// let req = Exec::new(7, ["sh", "-c", "echo hi"]);
    /// assert_eq!(req.argv, ["sh", "-c", "echo hi"]);
    /// assert!(req.env.is_empty() && req.task_id.is_none() && !req.stdin);
    /// let timed = Exec { timeout_ms: Some(500), ..Exec::new(8, ["sleep", "1"]) };
    /// assert_eq!(timed.id, 8);
    /// ```
    pub fn new<S: Into<String>>(id: RequestId, argv: impl IntoIterator<Item = S>) -> Self {
        Self {
            id,
            argv: argv.into_iter().map(Into::into).collect(),
            env: BTreeMap::new(),
            cwd: None,
            user: None,
            tty: None,
            stdin: false,
            timeout_ms: None,
            output_cap: None,
            task_id: None,
            limits: None,
            tag: None,
        }
    }
}

/// `exec_started`: the reply to `exec`; from now on `exec_input`, `exec_resize` and
/// `exec_signal` are accepted for `exec_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecStarted {
    /// The `id` of the `exec` request.
    pub re: RequestId,
    /// The shim's id for this exec.
    pub exec_id: u64,
    /// The process's pid.
    pub pid: u32,
}

fields!(ExecStarted {
    re: req,
    exec_id: req,
    pid: req
});

/// `exec_input`: bytes for the exec's stdin (or terminal); `eof` closes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecInput {
    /// The exec.
    pub exec_id: u64,
    /// The bytes.
    #[serde(default, deserialize_with = "nil_as_default")]
    pub data: Bytes,
    /// Close stdin after these bytes.
    #[serde(default, deserialize_with = "nil_as_default")]
    pub eof: bool,
}

fields!(ExecInput {
    exec_id: req,
    data: nil,
    eof: nil
});

/// `exec_resize`: the exec's terminal changed size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecResize {
    /// The exec.
    pub exec_id: u64,
    /// New rows.
    pub rows: u16,
    /// New columns.
    pub cols: u16,
}

fields!(ExecResize {
    exec_id: req,
    rows: req,
    cols: req
});

/// `exec_signal`: send a signal to the exec's whole process group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecSignal {
    /// The exec.
    pub exec_id: u64,
    /// The signal: a name (`TERM`, `SIGTERM`) or a number (`15`).
    pub signal: String,
}

fields!(ExecSignal {
    exec_id: req,
    signal: req
});

/// Which output of an exec a chunk comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
    /// The terminal (PTY mode).
    Pty,
}

put_names!(OutputStream { Stdout = "stdout", Stderr = "stderr", Pty = "pty" });

/// `exec_output`: a chunk of an exec's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecOutput {
    /// The exec.
    pub exec_id: u64,
    /// Which stream.
    pub stream: OutputStream,
    /// The bytes, exactly as written.
    pub data: Bytes,
}

fields!(ExecOutput {
    exec_id: req,
    stream: req,
    data: req
});

/// `exec_exit`: the exec ended; always the last message about it, sent exactly once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecExit {
    /// The exec.
    pub exec_id: u64,
    /// Its exit code, if it exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// The signal that killed it (`SIGKILL`…), if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// True when the timeout killed it.
    #[serde(default, deserialize_with = "nil_as_default")]
    pub timed_out: bool,
    /// True when output beyond `output_cap` was dropped.
    #[serde(default, deserialize_with = "nil_as_default")]
    pub truncated: bool,
    /// Wall-clock run time.
    pub duration_ms: u64,
    /// Whether the kernel's OOM killer sent the `SIGKILL`: present only when the exec died of
    /// `SIGKILL` and the sandbox cgroup's OOM-kill counter could be read (`true` when it rose
    /// with this death); absent when it cannot be known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_killed: Option<bool>,
}

fields!(ExecExit { exec_id: req, code: opt skip, signal: opt skip, timed_out: nil, truncated: nil, duration_ms: req, oom_killed: opt skip });
