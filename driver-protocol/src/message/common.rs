//! Messages every link speaks: the handshake, request correlation, liveness and errors.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::ErrorCode;

use crate::enc::put_names;

use super::{fields, nil_as_default};

/// A request id, chosen by the sender of a request and echoed in the reply's `re`.
pub type RequestId = u64;

/// The sequence number the shim gives every event it sends to the control plane.
pub type Seq = u64;

/// Which end of a link a peer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The agent's driver process, speaking over the inherited socket.
    Driver,
    /// agent-shim itself (PID 1 of the sandbox).
    Shim,
    /// A control plane, speaking over the control socket.
    Control,
}

put_names!(Role { Driver = "driver", Shim = "shim", Control = "control" });

/// `hello`: the first frame each way on every connection.
///
/// Both sides send it without waiting for the other's; each then computes the highest common
/// version and the intersection of capabilities (see [`crate::handshake`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol name; must be [`crate::PROTOCOL_NAME`].
    pub protocol: String,
    /// Every protocol version this peer speaks.
    pub versions: Vec<u32>,
    /// The sender's role.
    pub role: Role,
    /// Name of the sending software, e.g. `agent-shim` or `echo-driver`.
    pub software: String,
    /// Version of the sending software.
    pub software_version: String,
    /// Optional features the sender supports; the effective set is the intersection.
    #[serde(default, deserialize_with = "nil_as_default")]
    pub capabilities: Vec<String>,
    /// The agent this shim serves (shim → control only), for fleets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    /// A fresh random challenge for the control link's mutual authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<Bytes>,
    /// The durable consumer this control connection is (control → shim only); absent: an
    /// observer (PROTOCOL.md §8.7).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer: Option<String>,
    /// The shim's limits (shim → control only), advertised before authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Box<super::Limits>>,
    /// Which per-child cgroups the shim creates (shim → control only): `none`, `v1` or
    /// `v2-delegated`, as in `status_reply` (PROTOCOL.md §8.8). Sent before authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroups: Option<String>,
    /// A random number the shim draws once at start (shim → control only): a client that
    /// sees another one after a reconnect talks to a new shim behind the same address, whose
    /// event seqs start again (PROTOCOL.md §8.3). Sent before authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<u64>,
}

fields!(Hello { protocol: req, versions: req, role: req, software: req, software_version: req, capabilities: nil, agent_id: opt skip, nonce: opt skip, consumer: opt skip, limits: opt skip, cgroups: opt skip, instance: opt skip });

/// `auth`: proof of the shared token on the control link, sent after both `hello`s.
///
/// `mac` is HMAC-SHA256 over the sender's role, the peer's nonce and the sender's own nonce;
/// the token itself never crosses the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Auth {
    /// The HMAC-SHA256 proof (32 bytes).
    pub mac: Bytes,
}

fields!(Auth { mac: req });

/// `ok`: the generic success reply to a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OkReply {
    /// The `id` of the request this answers.
    pub re: RequestId,
    /// `submit_task` only: a task with this `task_id` was already known, nothing was queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicate: Option<bool>,
}

fields!(OkReply { re: req, duplicate: opt skip });

impl OkReply {
    /// `ok{re}`.
    pub fn new(re: RequestId) -> Self {
        Self {
            re,
            duplicate: None,
        }
    }
}

/// `error`: a failed request, a rejected frame, or (from a driver) an error worth reporting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorMsg {
    /// The `id` of the request this answers, if it answers one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub re: Option<RequestId>,
    /// The stable error code.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub message: String,
    /// The task concerned, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// `gap` only: the oldest seq still buffered for the consumer or observer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_available: Option<u64>,
}

fields!(ErrorMsg { re: opt skip, code: req, message: req, task_id: opt skip, first_available: opt skip });

impl ErrorMsg {
    /// `error{re, code, message}`.
    pub fn new(re: Option<RequestId>, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            re,
            code,
            message: message.into(),
            task_id: None,
            first_available: None,
        }
    }
}

/// `ping`: a liveness probe; the peer answers `pong` with `re` = `id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ping {
    /// The request id.
    pub id: RequestId,
}

fields!(Ping { id: req });

/// `pong`: the answer to `ping`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pong {
    /// The `id` of the `ping` this answers.
    pub re: RequestId,
}

fields!(Pong { re: req });

/// `ready`: the driver can take tasks (sent once at start, and as the reply to `resume`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ready {
    /// The `id` of the `resume` this answers, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub re: Option<RequestId>,
}

fields!(Ready { re: opt skip });

/// `pause`: reach a safe point and report `paused`, so the sandbox can be frozen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pause {
    /// The request id.
    pub id: RequestId,
    /// How long the receiver has to reach its safe point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

fields!(Pause { id: req, timeout_ms: opt skip });

/// `paused`: the driver (or, towards the control plane, the shim) is at a safe point.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Paused {
    /// The `id` of the `pause` this answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub re: Option<RequestId>,
}

fields!(Paused { re: opt skip });

/// `resume`: continue after a pause.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resume {
    /// The request id.
    pub id: RequestId,
    /// Wall-clock milliseconds between `paused` and this `resume` (shim → driver only): the
    /// driver learns how long it slept, e.g. to refresh expired credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slept_ms: Option<u64>,
    /// The time to set the wall clock to first, in milliseconds since the Unix epoch (control
    /// plane → shim only): as `set_clock`, but in the same step, before the driver is woken
    /// (its `slept_ms` is then measured on the corrected clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unix_ms: Option<u64>,
}

impl Resume {
    /// A `resume` with request id `id` and no optional field.
    pub fn new(id: RequestId) -> Self {
        Resume {
            id,
            slept_ms: None,
            unix_ms: None,
        }
    }
}

fields!(Resume { id: req, slept_ms: opt skip, unix_ms: opt skip });

/// `shutdown`: stop gracefully within the grace period.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Shutdown {
    /// The request id.
    pub id: RequestId,
    /// How long the receiver has before it is killed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_ms: Option<u64>,
    /// Why, for logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

fields!(Shutdown { id: req, grace_ms: opt skip, reason: opt skip });
