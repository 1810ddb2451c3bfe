//! Tasks: the unit of work the control plane gives an agent, and how it ends.

use rmpv::Value;
use serde::{Deserialize, Serialize};

use super::RequestId;

use crate::enc::put_names;

use super::{fields, nil_as_default};

/// `task` (shim → driver): work for the driver. Delivered once the driver is `ready`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// The task's id, chosen by the control plane; unique per agent.
    pub task_id: String,
    /// The task itself: any MessagePack value (a prompt string, a map…).
    pub input: Value,
    /// A JSON Schema the output must match, if the submitter gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_schema: Option<Value>,
    /// How long the task may run, if limited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// 1 on first delivery; higher when the task is redelivered after a driver crash.
    #[serde(default = "first_attempt", deserialize_with = "nil_as_first_attempt")]
    pub attempt: u32,
}

fields!(Task { task_id: req, input: req, output_schema: opt skip, timeout_ms: opt skip, attempt: nil(first_attempt) });

fn first_attempt() -> u32 {
    1
}

fn nil_as_first_attempt<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    Ok(Option::<u32>::deserialize(d)?.unwrap_or_else(first_attempt))
}

/// `submit_task` (control → shim): queue a task for the driver. Idempotent by `id` and by
/// `task_id`: a retried submit runs once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubmitTask {
    /// The request id.
    pub id: RequestId,
    /// The task's id, unique per agent.
    pub task_id: String,
    /// The task itself.
    pub input: Value,
    /// A JSON Schema the output must match (checked by control-link, never by the shim).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_schema: Option<Value>,
    /// How long the task may run, if limited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Whether the shim may deliver the task again if the driver crashes while running it
    /// (otherwise the task fails with the crash as its reason).
    #[serde(default, deserialize_with = "nil_as_default")]
    pub redeliver: bool,
    /// With `redeliver`: how many times the task may be delivered in all, the first time
    /// included (at least 1); absent: the shim's `--max-attempts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
}

fields!(SubmitTask { id: req, task_id: req, input: req, output_schema: opt skip, timeout_ms: opt skip, redeliver: nil, max_attempts: opt skip });

/// `cancel` (shim → driver): stop working on a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cancel {
    /// The request id.
    pub id: RequestId,
    /// The task to cancel.
    pub task_id: String,
    /// How long the driver has before the shim kills the task's tool processes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_ms: Option<u64>,
}

fields!(Cancel { id: req, task_id: req, grace_ms: opt skip });

/// `cancel_task` (control → shim): cancel a queued or running task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelTask {
    /// The request id.
    pub id: RequestId,
    /// The task to cancel.
    pub task_id: String,
    /// How long the driver has to wind the task down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_ms: Option<u64>,
}

fields!(CancelTask { id: req, task_id: req, grace_ms: opt skip });

/// How a task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    /// The task finished and produced its output.
    Succeeded,
    /// The task failed; `error` says why.
    Failed,
    /// The task was cancelled.
    Cancelled,
}

put_names!(TaskStatus { Succeeded = "succeeded", Failed = "failed", Cancelled = "cancelled" });

/// `task_done`: the task ended. Sent by the driver, or by the shim when the driver could not
/// finish it (crash, cancel past the grace).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskDone {
    /// The task.
    pub task_id: String,
    /// How it ended.
    pub status: TaskStatus,
    /// The task's result, if it produced one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// Why it failed or was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fields!(TaskDone { task_id: req, status: req, output: opt skip, error: opt skip });
