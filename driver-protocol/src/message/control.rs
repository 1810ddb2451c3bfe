//! Messages of the control link only: commands from the control plane, status, and delivery
//! (`event`, `ack`, `resume_from`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{DriverState, Event, RequestId, Seq};

use crate::enc::put_names;

use super::{fields, nil_as_default};

/// What a `signal` request targets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SignalTarget {
    /// The driver's process group.
    #[default]
    Driver,
    /// An exec's process group (`exec_id` required).
    Exec,
}

put_names!(SignalTarget { Driver = "driver", Exec = "exec" });

/// `signal`: send a signal to the driver or to an exec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signal {
    /// The request id.
    pub id: RequestId,
    /// The signal: a name (`TERM`, `SIGTERM`) or a number (`15`).
    pub signal: String,
    /// What to signal.
    #[serde(default, deserialize_with = "nil_as_default")]
    pub target: SignalTarget,
    /// The exec, when `target` is `exec`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec_id: Option<u64>,
}

fields!(Signal { id: req, signal: req, target: nil, exec_id: opt skip });

/// `restart_driver`: launch the driver again, also out of state `error` (the "recover" action).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestartDriver {
    /// The request id.
    pub id: RequestId,
}

fields!(RestartDriver { id: req });

/// `set_driver`: replace the driver command; the old driver gets a graceful shutdown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetDriver {
    /// The request id.
    pub id: RequestId,
    /// The new driver's program and arguments.
    pub argv: Vec<String>,
    /// Variables set on top of the sandbox's scrubbed environment.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "nil_as_default"
    )]
    pub env: BTreeMap<String, String>,
}

fields!(SetDriver { id: req, argv: req, env: nil skip });

/// `status`: ask for a [`StatusReply`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The request id.
    pub id: RequestId,
}

fields!(Status { id: req });

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// Its exit code, if it exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// The signal that killed it, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
}

fields!(ExitInfo { code: opt skip, signal: opt skip });

/// `status_reply`: the shim's state, answering `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReply {
    /// The `id` of the `status` request.
    pub re: RequestId,
    /// The driver's lifecycle state.
    pub state: DriverState,
    /// The driver's pid, while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver_pid: Option<u32>,
    /// Restarts since the shim started.
    pub restarts: u32,
    /// Milliseconds since the shim started.
    pub uptime_ms: u64,
    /// How the driver last ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<ExitInfo>,
    /// Live child processes of the shim.
    pub children: u32,
    /// Processes reaped since the shim started (orphans included).
    pub reaped: u64,
    /// Tasks waiting in the queue.
    pub tasks_queued: u32,
    /// The task the driver is working on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_running: Option<String>,
    /// Execs running.
    pub execs_running: u32,
    /// Events in the replay buffer, not yet acknowledged.
    pub buffered_events: u64,
    /// Bytes in the replay buffer.
    pub buffered_bytes: u64,
    /// The last `seq` given to an event.
    pub last_seq: Seq,
    /// The shim's resident memory.
    pub rss_bytes: u64,
    /// When the agent became idle (ms since the Unix epoch); absent while busy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_since_ms: Option<u64>,
    /// Per-exec cgroups (resources): `none`, `v1` or `v2-delegated`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroups: Option<String>,
}

fields!(StatusReply { re: req, state: req, driver_pid: opt skip, restarts: req, uptime_ms: req, last_exit: opt skip, children: req, reaped: req, tasks_queued: req, task_running: opt skip, execs_running: req, buffered_events: req, buffered_bytes: req, last_seq: req, rss_bytes: req, idle_since_ms: opt skip, cgroups: opt skip });

/// `ack`: the control plane has processed every event up to and including `seq`
/// (cumulative); the shim may forget them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    /// The last processed seq.
    pub seq: Seq,
}

fields!(Ack { seq: req });

/// `resume_from`: replay every buffered event after `seq`, then continue live.
///
/// A consumer's `seq` also acknowledges every event up to it; without `seq` it resumes from
/// its own acknowledged position. An observer without `seq` (or with `from: "now"`) follows
/// live events only (PROTOCOL.md §8.7).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResumeFrom {
    /// The last seq the client processed (0 for none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<Seq>,
    /// `"now"`: live events only (observers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
}

fields!(ResumeFrom { seq: opt skip, from: opt skip });

impl ResumeFrom {
    /// `resume_from{seq}`.
    pub fn after(seq: Seq) -> Self {
        Self {
            seq: Some(seq),
            from: None,
        }
    }

    /// `resume_from{from: "now"}`: live events only.
    pub fn now() -> Self {
        Self {
            seq: None,
            from: Some("now".to_owned()),
        }
    }
}

/// `event`: one event from the shim to the control plane, with its sequence number.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventEnvelope {
    /// Strictly increasing, starting at 1, never reused within the shim's life.
    pub seq: Seq,
    /// The event.
    pub event: Event,
}

/// As its derived `Serialize`: `seq`, then the event's own map.
impl crate::enc::PutFields for EventEnvelope {
    fn put_fields(
        &self,
        e: &mut crate::enc::Enc<'_>,
        tag: Option<&str>,
    ) -> Result<(), crate::EncodeError> {
        e.struct_head(tag, 2)?;
        e.field("seq", &self.seq)?;
        e.field("event", &self.event)
    }
}
