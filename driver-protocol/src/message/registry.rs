//! Messages of the exec registry (PROTOCOL.md §8.10): the execs running and recently exited
//! (`list_execs`), and attaching to one exec's output (`attach_exec`): its retained tail
//! replayed by byte offset, then followed live until its exit.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{fields, ExecExit, OutputStream, RequestId};

/// `list_execs`: ask for an [`ExecList`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListExecs {
    /// The request id.
    pub id: RequestId,
}

fields!(ListExecs { id: req });

/// How an exec in an [`ExecList`] ended (the fields of its `exec_exit`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecEnd {
    /// Its exit code, if it exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// The signal that killed it, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// True when its timeout killed it.
    #[serde(default)]
    pub timed_out: bool,
    /// Whether the OOM killer killed it, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_killed: Option<bool>,
    /// When it ended, in ms since the Unix epoch.
    pub ended_ms: u64,
}

fields!(ExecEnd { code: opt skip, signal: opt skip, timed_out: opt, oom_killed: opt skip, ended_ms: req });

/// One exec in an [`ExecList`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecInfo {
    /// The shim's id for it.
    pub exec_id: u64,
    /// Its program and arguments (cut to a bounded size: see `argv_truncated`).
    pub argv: Vec<String>,
    /// True when `argv` was cut.
    #[serde(default)]
    pub argv_truncated: bool,
    /// Its pid (its process group's id).
    pub pid: u32,
    /// The uid it runs as.
    pub uid: u32,
    /// The `user` its request named, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The `tag` its request carried, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Who started it: `driver` or `control`.
    pub owner: String,
    /// When it started, in ms since the Unix epoch.
    pub started_ms: u64,
    /// Bytes of output so far: the end offset of its output stream.
    pub output_bytes: u64,
    /// How it ended; absent while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<ExecEnd>,
}

fields!(ExecInfo { exec_id: req, argv: req, argv_truncated: opt, pid: req, uid: req, user: opt skip, tag: opt skip, owner: req, started_ms: req, output_bytes: req, exit: opt skip });

/// `exec_list`: the reply to `list_execs`, running execs first, then exited ones, each in
/// the order they started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecList {
    /// The `id` of the `list_execs` request.
    pub re: RequestId,
    /// The execs.
    pub execs: Vec<ExecInfo>,
}

fields!(ExecList {
    re: req,
    execs: req
});

/// `attach_exec`: replay exec `exec_id`'s retained output from `from_offset`, then follow it
/// live until it exits (then `attach_exit`). Read-only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachExec {
    /// The request id; the reply is `exec_attached` (or `error`: `not_found`, `gap`, …).
    pub id: RequestId,
    /// The exec.
    pub exec_id: u64,
    /// The first byte wanted; absent: the oldest retained byte.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_offset: Option<u64>,
}

fields!(AttachExec { id: req, exec_id: req, from_offset: opt skip });

/// `exec_attached`: the reply to `attach_exec`; `attach_output` frames follow from
/// `from_offset`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecAttached {
    /// The `id` of the `attach_exec` request.
    pub re: RequestId,
    /// The exec.
    pub exec_id: u64,
    /// Where the replay starts.
    pub from_offset: u64,
    /// The oldest byte still retained.
    pub first_offset: u64,
    /// The end of the output so far.
    pub end_offset: u64,
    /// False when the exec has ended already (its `attach_exit` follows the replay).
    pub running: bool,
}

fields!(ExecAttached {
    re: req,
    exec_id: req,
    from_offset: req,
    first_offset: req,
    end_offset: req,
    running: req
});

/// `detach_exec`: stop following exec `exec_id` on this connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DetachExec {
    /// The request id; the reply is `ok` (or `error{code:"not_found"}`).
    pub id: RequestId,
    /// The exec.
    pub exec_id: u64,
}

fields!(DetachExec {
    id: req,
    exec_id: req
});

/// `attach_output`: bytes of an attached exec's output, at `offset` in its output stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachOutput {
    /// The exec.
    pub exec_id: u64,
    /// Which stream the bytes came from.
    pub stream: OutputStream,
    /// The offset of the first byte.
    pub offset: u64,
    /// The bytes.
    pub data: Bytes,
}

fields!(AttachOutput {
    exec_id: req,
    stream: req,
    offset: req,
    data: req
});

/// `attach_lagged`: the attached connection read slower than the exec wrote; bytes
/// `next_offset - missed .. next_offset` were no longer retained and are skipped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachLagged {
    /// The exec.
    pub exec_id: u64,
    /// Bytes skipped.
    pub missed: u64,
    /// Where the stream goes on.
    pub next_offset: u64,
}

fields!(AttachLagged {
    exec_id: req,
    missed: req,
    next_offset: req
});

/// `attach_exit`: the attached exec ended (the fields of its `exec_exit`); the last frame of
/// the attachment.
pub type AttachExit = ExecExit;
