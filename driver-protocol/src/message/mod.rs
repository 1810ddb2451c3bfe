//! Every message of the protocol, grouped by direction.
//!
//! A message is a MessagePack map with a string `type` key and named fields. Each direction
//! of each link has its own enum, so a receiver's `match` names exactly what it may receive:
//!
//! | enum              | sent by  | received by |
//! |-------------------|----------|-------------|
//! | [`DriverToShim`]  | driver   | shim        |
//! | [`ShimToDriver`]  | shim     | driver      |
//! | [`ControlToShim`] | control  | shim        |
//! | [`ShimToControl`] | shim     | control     |
//! | [`Event`]         | shim     | control, inside an `event` envelope |
//!
//! The field structs are shared where a message means the same on both links (`hello`,
//! `pause`, `exec`…). Decoding never fails on an unknown `type`: it yields the enum's
//! `Unknown` variant, which the receiver answers with `error{code:"unsupported"}` while the
//! connection stays up. Unknown fields are ignored.

mod clock;
mod common;
mod control;
mod event;
mod exec;
mod metrics;
// sessions
mod session;
// files
mod fs;
mod task;

use std::io::Write;

use serde::{Deserialize, Serialize};

pub use clock::*;
pub use common::*;
pub use control::*;
pub use event::*;
pub use exec::*;
pub use metrics::*;
// sessions
pub use session::*;
// files
pub use fs::*;
pub use task::*;

use crate::envelope::{self, Head};
use crate::{DecodeError, EncodeError};

/// A message type this version does not know, or one not valid in this direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unknown {
    /// The `type` the peer sent.
    pub type_name: String,
    /// The request `id` it carried, if any, so an `error` reply can carry `re`.
    pub id: Option<RequestId>,
}

/// One direction's set of messages: how to name, decode and encode them.
pub trait Message: Sized {
    /// Every `type` name of this set, in wire form.
    const TYPES: &'static [&'static str];

    /// The `type` of this message, in wire form.
    fn type_name(&self) -> &str;

    /// Decodes one message from the MessagePack body of a frame (the bytes after the length
    /// prefix). An unknown `type` is not an error: it decodes to the `Unknown` variant.
    fn decode(body: &[u8]) -> Result<Self, DecodeError>;

    /// Appends the MessagePack body of this message to `out` (no length prefix).
    fn encode_to<W: Write>(&self, out: &mut W) -> Result<(), EncodeError>;

    /// The MessagePack body of this message as a new vector. Convenient, but allocates: hot
    /// paths use [`Message::encode_to`] with a reused buffer, or the codecs.
    fn to_body(&self) -> Result<Vec<u8>, EncodeError> {
        let mut out = Vec::with_capacity(128);
        self.encode_to(&mut out)?;
        Ok(out)
    }
}

/// Deserializes a field that has a default, treating nil like an absent field: the spec lets
/// senders write nil for any optional field, and a Python driver's `None` must not be
/// `malformed`.
pub(crate) fn nil_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[inline(never)]
pub(crate) fn decode_fields<'a, T: Deserialize<'a>>(
    body: &'a [u8],
    head: &Head<'_>,
) -> Result<T, DecodeError> {
    crate::de::from_slice(body).map_err(|e| fields_error(head, e))
}

/// The error of [`decode_fields`], out of line: one copy for every message type.
#[cold]
#[inline(never)]
fn fields_error(head: &Head<'_>, e: crate::de::Error) -> DecodeError {
    DecodeError::malformed(Some(head.type_name), head.id, e)
}

pub(crate) fn encode_named<W: Write, T: Serialize + ?Sized>(
    value: &T,
    out: &mut W,
) -> Result<(), EncodeError> {
    rmp_serde::encode::write_named(out, value).map_err(|e| EncodeError::Unencodable(e.to_string()))
}

/// Decodes an `event` envelope, dispatching on the nested event's own `type`.
fn decode_envelope(body: &[u8], head: &Head<'_>) -> Result<EventEnvelope, DecodeError> {
    let split = match &head.envelope {
        Some((seq, range)) => envelope::RawEvent {
            seq: *seq,
            event: body.get(range.clone()).unwrap_or_default(),
        },
        // Not a valid envelope: the walk again, for its error.
        None => envelope::split_envelope(body).map_err(|e| match e {
            DecodeError::Malformed { detail, .. } => {
                DecodeError::malformed(Some(head.type_name), head.id, detail)
            }
            other => other,
        })?,
    };
    let event = Event::decode(split.event).map_err(|e| match e {
        DecodeError::Malformed {
            type_name, detail, ..
        } => DecodeError::malformed(
            Some(head.type_name),
            head.id,
            format_args!(
                "event {}: {detail}",
                type_name.as_deref().unwrap_or("of unknown type")
            ),
        ),
        other => other,
    })?;
    Ok(EventEnvelope {
        seq: split.seq,
        event,
    })
}

macro_rules! decode_variant {
    ($body:expr, $head:expr, $ty:ty) => {
        decode_fields::<$ty>($body, $head)
    };
    ($body:expr, $head:expr, $ty:ty, $decode:path) => {
        $decode($body, $head)
    };
}

/// Defines one direction's message enum: the serde tag, `Unknown`, the [`Message`] impl and
/// `From` conversions, from one table of `"type" => Variant(Struct)` rows.
macro_rules! message_set {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $(
                $(#[$vmeta:meta])*
                $tag:literal => $variant:ident($ty:ty) $(decoded_by $decode:path)?
            ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Serialize)]
        #[serde(tag = "type")]
        pub enum $name {
            $(
                $(#[$vmeta])*
                #[serde(rename = $tag)]
                $variant($ty),
            )*
            /// A `type` this version does not know or that is not valid in this direction.
            /// Cannot be encoded.
            #[serde(skip_serializing)]
            Unknown(Unknown),
        }

        impl Message for $name {
            const TYPES: &'static [&'static str] = &[$($tag),*];

            fn type_name(&self) -> &str {
                match self {
                    $(Self::$variant(_) => $tag,)*
                    Self::Unknown(u) => &u.type_name,
                }
            }

            fn decode(body: &[u8]) -> Result<Self, DecodeError> {
                let head = envelope::peek(body)?;
                match head.type_name {
                    $($tag => decode_variant!(body, &head, $ty $(, $decode)?).map(Self::$variant),)*
                    _ => Ok(Self::Unknown(Unknown {
                        type_name: head.type_name.to_owned(),
                        id: head.id,
                    })),
                }
            }

            fn encode_to<W: Write>(&self, out: &mut W) -> Result<(), EncodeError> {
                if let Self::Unknown(u) = self {
                    return Err(EncodeError::Unencodable(format!(
                        "unknown message type {:?}",
                        u.type_name
                    )));
                }
                encode_named(self, out)
            }
        }

        $(
            impl From<$ty> for $name {
                fn from(m: $ty) -> Self {
                    Self::$variant(m)
                }
            }
        )*
    };
}

/// The driver's events, which the shim relays to the control plane as they are: one list for
/// [`DriverToShim`] and [`Event`] (and, through [`Message::TYPES`], for the relay's check).
/// Calls `message_set!` with the enum's rows, the events spliced in where `driver_events`
/// stands.
macro_rules! with_driver_events {
    (
        message_set! {
            $(#[$meta:meta])*
            pub enum $name:ident { $($before:tt)* } driver_events { $($after:tt)* }
        }
    ) => {
        message_set! {
            $(#[$meta])*
            pub enum $name {
                $($before)*
                /// Output text.
                "message_chunk" => MessageChunk(MessageChunk),
                /// A tool call began.
                "tool_call" => ToolCall(ToolCall),
                /// A tool call ended.
                "tool_result" => ToolResult(ToolResult),
                /// A file changed.
                "file_change" => FileChange(FileChange),
                /// Task progress.
                "progress" => Progress(Progress),
                /// A log line.
                "log" => Log(Log),
                /// The driver's own kind of event.
                "custom" => Custom(Custom),
                $($after)*
            }
        }
    };
}

with_driver_events! {
    message_set! {
        /// Messages a driver sends to the shim.
        pub enum DriverToShim {
            /// Handshake.
            "hello" => Hello(Hello),
            /// The driver takes tasks.
            "ready" => Ready(Ready),
            /// A task ended.
            "task_done" => TaskDone(TaskDone),
            /// The driver is at a safe point.
            "paused" => Paused(Paused),
            /// Liveness probe of the shim.
            "ping" => Ping(Ping),
            /// Answer to the shim's `ping`.
            "pong" => Pong(Pong),
            /// Success reply to a shim request.
            "ok" => Ok(OkReply),
            /// Failure reply, or an error the driver reports.
            "error" => Error(ErrorMsg),
        } driver_events {
            /// Run a tool process.
            "exec" => Exec(Exec),
            /// Stdin for an exec.
            "exec_input" => ExecInput(ExecInput),
            /// Terminal size of an exec.
            "exec_resize" => ExecResize(ExecResize),
            /// Signal an exec's process group.
            "exec_signal" => ExecSignal(ExecSignal),
        }
    }
}

message_set! {
    /// Messages the shim sends to a driver.
    pub enum ShimToDriver {
        /// Handshake.
        "hello" => Hello(Hello),
        /// Work to do.
        "task" => Task(Task),
        /// Stop working on a task.
        "cancel" => Cancel(Cancel),
        /// Reach a safe point.
        "pause" => Pause(Pause),
        /// Continue after a pause.
        "resume" => Resume(Resume),
        /// Stop gracefully.
        "shutdown" => Shutdown(Shutdown),
        /// Liveness probe; answer `pong`.
        "ping" => Ping(Ping),
        /// Answer to the driver's `ping`.
        "pong" => Pong(Pong),
        /// Success reply.
        "ok" => Ok(OkReply),
        /// Failure reply.
        "error" => Error(ErrorMsg),
        /// An exec began.
        "exec_started" => ExecStarted(ExecStarted),
        /// Exec output.
        "exec_output" => ExecOutput(ExecOutput),
        /// An exec ended.
        "exec_exit" => ExecExit(ExecExit),
    }
}

message_set! {
    /// Messages a control plane sends to the shim.
    pub enum ControlToShim {
        /// Handshake.
        "hello" => Hello(Hello),
        /// Proof of the shared token.
        "auth" => Auth(Auth),
        /// Queue a task.
        "submit_task" => SubmitTask(SubmitTask),
        /// Cancel a task.
        "cancel_task" => CancelTask(CancelTask),
        /// Pause the agent.
        "pause" => Pause(Pause),
        /// Resume the agent.
        "resume" => Resume(Resume),
        /// Signal the driver or an exec.
        "signal" => Signal(Signal),
        /// Relaunch the driver (also out of `error`).
        "restart_driver" => RestartDriver(RestartDriver),
        /// Replace the driver command.
        "set_driver" => SetDriver(SetDriver),
        /// Run a tool process.
        "exec" => Exec(Exec),
        /// Stdin for an exec.
        "exec_input" => ExecInput(ExecInput),
        /// Terminal size of an exec.
        "exec_resize" => ExecResize(ExecResize),
        /// Signal an exec's process group.
        "exec_signal" => ExecSignal(ExecSignal),
        /// Ask for the shim's status.
        "status" => Status(Status),
        /// Stop the agent and the shim.
        "shutdown" => Shutdown(Shutdown),
        /// Events up to `seq` are processed.
        "ack" => Ack(Ack),
        /// Replay events after `seq`.
        "resume_from" => ResumeFrom(ResumeFrom),
        /// Liveness probe.
        "ping" => Ping(Ping),
        // sessions
        /// Retire a durable consumer.
        "forget_consumer" => ForgetConsumer(ForgetConsumer),
        // files
        /// One path's metadata.
        "fs_stat" => FsStat(FsStat),
        /// One page of a directory.
        "fs_list" => FsList(FsList),
        /// Stream a file's bytes.
        "fs_read" => FsRead(FsRead),
        /// Create a directory.
        "fs_mkdir" => FsMkdir(FsMkdir),
        /// Remove a path.
        "fs_remove" => FsRemove(FsRemove),
        /// Move a path.
        "fs_rename" => FsRename(FsRename),
        /// Start (or find again) an upload.
        "fs_write_open" => FsWriteOpen(FsWriteOpen),
        /// Bytes of an upload.
        "fs_write_data" => FsWriteData(FsWriteData),
        /// Finish or abort an upload.
        "fs_write_close" => FsWriteClose(FsWriteClose),
        /// Watch a path.
        "fs_watch" => FsWatch(FsWatch),
        /// End a watch.
        "fs_unwatch" => FsUnwatch(FsUnwatch),
        // microVM
        /// Set the wall clock.
        "set_clock" => SetClock(SetClock),
        // Resources.
        /// Ask for a resource reading.
        "metrics" => Metrics(Metrics),
    }
}

message_set! {
    /// Messages the shim sends to a control plane.
    pub enum ShimToControl {
        /// Handshake.
        "hello" => Hello(Hello),
        /// Proof of the shared token.
        "auth" => Auth(Auth),
        /// Success reply.
        "ok" => Ok(OkReply),
        /// Failure reply.
        "error" => Error(ErrorMsg),
        /// Answer to `status`.
        "status_reply" => StatusReply(StatusReply),
        /// An exec began.
        "exec_started" => ExecStarted(ExecStarted),
        /// One sequenced event.
        "event" => Event(EventEnvelope) decoded_by decode_envelope,
        /// Answer to `ping`.
        "pong" => Pong(Pong),
        // sessions
        /// An observer fell behind and skips ahead.
        "lagged" => Lagged(Lagged),
        // files
        /// Answer to `fs_stat`.
        "fs_stat_reply" => FsStatReply(FsStatReply),
        /// Answer to `fs_list`.
        "fs_list_reply" => FsListReply(FsListReply),
        /// One chunk of an `fs_read` stream.
        "fs_data" => FsData(FsData),
        /// An upload is open, answering `fs_write_open`.
        "fs_write_ready" => FsWriteReady(FsWriteReady),
        // Resources.
        /// Answer to `metrics`.
        "metrics_reply" => MetricsReply(MetricsReply),
    }
}

with_driver_events! {
    message_set! {
        /// An event inside an `event` envelope: the driver's events relayed, and the shim's own.
        pub enum Event {} driver_events {
            /// An error the driver reported.
            "error" => Error(ErrorMsg),
            /// A task ended.
            "task_done" => TaskDone(TaskDone),
            /// A submitted task was queued.
            "task_accepted" => TaskAccepted(TaskAccepted),
            /// The driver was launched.
            "driver_started" => DriverStarted(DriverStarted),
            /// The driver is ready.
            "driver_ready" => DriverReady(DriverReady),
            /// The driver ended.
            "driver_exited" => DriverExited(DriverExited),
            /// The driver will be relaunched.
            "driver_restarting" => DriverRestarting(DriverRestarting),
            /// Too many restarts: state `error`.
            "crash_loop" => CrashLoop(CrashLoop),
            /// The driver's state changed.
            "state_changed" => StateChanged(StateChanged),
            /// The agent is at a safe point and may be frozen.
            "paused" => Paused(Paused),
            /// Output of a control-initiated exec.
            "exec_output" => ExecOutput(ExecOutput),
            /// A control-initiated exec ended.
            "exec_exit" => ExecExit(ExecExit),
            /// The agent became idle.
            "idle" => Idle(Idle),
            /// Work arrived after `idle`.
            "busy" => Busy(Busy),
            /// The OOM killer killed processes in the sandbox.
            "oom" => Oom(Oom),
            // files
            /// A change under an `fs_watch`.
            "fs_event" => FsEvent(FsEvent),
            // microVM
            /// The shim set the wall clock.
            "clock_set" => ClockSet(ClockSet),
            /// The shim is about to exit: its last event.
            "shim_exiting" => ShimExiting(ShimExiting),
            // Resources.
            /// A periodic resource reading (`--metrics-interval`).
            "metrics" => Metrics(Reading),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(pairs: &[(&str, rmpv::Value)]) -> Vec<u8> {
        let map = pairs
            .iter()
            .map(|(k, v)| (rmpv::Value::from(*k), v.clone()))
            .collect();
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, &rmpv::Value::Map(map)).unwrap();
        out
    }

    #[test]
    fn nil_reads_as_the_default_for_every_defaulted_field() {
        let nil = rmpv::Value::Nil;
        let m = DriverToShim::decode(&body(&[
            ("type", "message_chunk".into()),
            ("text", "hi".into()),
            ("final", nil.clone()),
            ("role", nil.clone()),
        ]))
        .unwrap();
        assert!(matches!(
            m,
            DriverToShim::MessageChunk(MessageChunk {
                is_final: false,
                ..
            })
        ));

        let m = ControlToShim::decode(&body(&[
            ("type", "exec_input".into()),
            ("exec_id", 3.into()),
            ("data", nil.clone()),
            ("eof", nil.clone()),
        ]))
        .unwrap();
        assert_eq!(
            m,
            ControlToShim::ExecInput(ExecInput {
                exec_id: 3,
                data: Default::default(),
                eof: false
            })
        );

        let m = ShimToDriver::decode(&body(&[
            ("type", "task".into()),
            ("task_id", "t".into()),
            ("input", nil.clone()),
            ("attempt", nil.clone()),
        ]))
        .unwrap();
        assert!(matches!(m, ShimToDriver::Task(Task { attempt: 1, .. })));

        let m = ControlToShim::decode(&body(&[
            ("type", "hello".into()),
            ("protocol", "agent-shim".into()),
            ("versions", rmpv::Value::Array(vec![1.into()])),
            ("role", "control".into()),
            ("software", "x".into()),
            ("software_version", "1".into()),
            ("capabilities", nil.clone()),
        ]))
        .unwrap();
        assert!(
            matches!(m, ControlToShim::Hello(Hello { ref capabilities, .. }) if capabilities.is_empty())
        );

        let m = ControlToShim::decode(&body(&[
            ("type", "exec".into()),
            ("id", 1.into()),
            ("argv", rmpv::Value::Array(vec!["true".into()])),
            ("env", nil.clone()),
            ("stdin", nil.clone()),
        ]))
        .unwrap();
        assert!(
            matches!(m, ControlToShim::Exec(Exec { stdin: false, ref env, .. }) if env.is_empty())
        );
    }

    #[test]
    fn serde_never_sees_an_over_deep_body() {
        // rmp-serde's own limit (1024) would let this through to a recursive decoder.
        let mut body = b"\x84\xa4type\xabsubmit_task\xa2id\x01\xa7task_id\xa1t\xa5input".to_vec();
        body.extend_from_slice(&[0x91; 500]);
        body.push(1);
        let err = ControlToShim::decode(&body).unwrap_err();
        match err {
            DecodeError::Malformed { detail, .. } => assert!(detail.contains("deeper than 64")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn wrong_typed_field_keeps_type_and_id() {
        let body = SubmitTask {
            id: 9,
            task_id: "t".into(),
            input: rmpv::Value::Nil,
            output_schema: None,
            timeout_ms: None,
            redeliver: false,
            max_attempts: None,
        };
        let mut bytes = ControlToShim::SubmitTask(body).to_body().unwrap();
        // One more entry in the fixmap: a `timeout_ms` that is a string.
        bytes[0] += 1;
        bytes.extend_from_slice(b"\xaatimeout_ms\xa2no");
        match ControlToShim::decode(&bytes).unwrap_err() {
            DecodeError::Malformed { type_name, id, .. } => {
                assert_eq!(type_name.as_deref(), Some("submit_task"));
                assert_eq!(id, Some(9));
            }
            other => panic!("{other:?}"),
        }
    }
}
