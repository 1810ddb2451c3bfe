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
// exec registry
mod registry;
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
// exec registry
pub use registry::*;
// sessions
pub use session::*;
// files
pub use fs::*;
pub use task::*;

use crate::de::Fields;
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
pub(crate) fn decode_fields<T: Fields>(body: &[u8], head: &Head<'_>) -> Result<T, DecodeError> {
    crate::de::read_fields(body).map_err(|e| fields_error(head, e))
}

/// Implements the table-driven decoder ([`Fields`]) and the encoder ([`Put`]) of a message
/// struct: one line naming its fields in declaration order, each with what its serde
/// attributes say.
///
/// ```text
/// fields!(Exec { id: req, argv: req, env: nil skip, cwd: opt skip, ... });
/// ```
///
/// - `req`: no `#[serde(default)]`: the field must be present.
/// - `opt`: `#[serde(default)]`: absent, it is `Default::default()` (`opt(path)`:
///   `#[serde(default = "path")]`, absent it is `path()`).
/// - `nil`: `#[serde(default, deserialize_with = "nil_as_default")]`: absent or nil, it is
///   `Default::default()` (`nil(path)`: absent or nil, it is `path()`).
/// - `skip` after the kind: `#[serde(skip_serializing_if = "Option::is_none")]` (or
///   `Vec::is_empty`, `BTreeMap::is_empty`): not written when `None` or empty.
/// - `name as "wire"`: `#[serde(rename = "wire")]`.
///
/// The derived `Deserialize` and `Serialize` stay (for peers that use serde directly); the
/// tests hold the two paths to the same result for every message type.
macro_rules! fields {
    ($ty:ident {
        $($field:ident $(as $wire:literal)?: $kind:ident $(($default:path))? $($skip:ident)?),*
        $(,)?
    }) => {
        impl crate::de::Fields for $ty {
            fn read(de: &mut crate::de::Deserializer<'_>) -> Result<Self, crate::de::Error> {
                #[allow(non_camel_case_types)]
                enum Field {
                    $($field,)*
                }
                const ORDER: &[Field] = &[$(Field::$field),*];
                static SHAPE: crate::de::Shape = crate::de::Shape {
                    name: stringify!($ty),
                    fields: &[$(fields!(@wire $field $($wire)?)),*],
                };
                const _: () = assert!(ORDER.len() <= 64);
                $(let mut $field = None;)*
                #[allow(unused_variables)] // no required field
                let found = de.read_struct(&SHAPE, &mut |index, de| {
                    match ORDER.get(index) {
                        $(Some(Field::$field) => $field = fields!(@read $kind de),)*
                        _ => {}
                    }
                    Ok(())
                })?;
                Ok(Self {
                    $($field: fields!(@finish found $field Field::$field, $kind $(($default))?),)*
                })
            }
        }

        impl crate::enc::PutFields for $ty {
            fn put_fields(
                &self,
                e: &mut crate::enc::Enc<'_>,
                tag: Option<&str>,
            ) -> Result<(), crate::EncodeError> {
                let n = 0 $(+ fields!(@count $($skip)? self.$field))*;
                e.struct_head(tag, n)?;
                $(fields!(@put $($skip)? e self.$field, fields!(@wire $field $($wire)?));)*
                Ok(())
            }
        }

        impl crate::enc::Put for $ty {
            fn put(&self, e: &mut crate::enc::Enc<'_>) -> Result<(), crate::EncodeError> {
                crate::enc::PutFields::put_fields(self, e, None)
            }
        }
    };
    (@wire $field:ident) => { stringify!($field) };
    (@wire $field:ident $wire:literal) => { $wire };
    (@read req $de:ident) => { Some($de.value()?) };
    (@read opt $de:ident) => { Some($de.value()?) };
    // `nil_as_default`: an `Option` of the field's type, nil read as `None`.
    (@read nil $de:ident) => { $de.value()? };
    (@finish $found:ident $slot:ident $index:expr, req) => {
        $found.required($slot, $index as usize)?
    };
    (@finish $found:ident $slot:ident $index:expr, opt) => { $slot.unwrap_or_default() };
    (@finish $found:ident $slot:ident $index:expr, nil) => { $slot.unwrap_or_default() };
    (@finish $found:ident $slot:ident $index:expr, $kind:ident ($default:path)) => {
        $slot.unwrap_or_else($default)
    };
    (@count $value:expr) => { 1 };
    (@count skip $value:expr) => { usize::from(!crate::enc::Skip::skipped(&$value)) };
    (@put $e:ident $value:expr, $name:expr) => { $e.field($name, &$value)? };
    (@put skip $e:ident $value:expr, $name:expr) => {
        if !crate::enc::Skip::skipped(&$value) {
            $e.field($name, &$value)?;
        }
    };
}
pub(crate) use fields;

/// The error of [`decode_fields`], out of line: one copy for every message type.
#[cold]
#[inline(never)]
fn fields_error(head: &Head<'_>, e: crate::de::Error) -> DecodeError {
    DecodeError::malformed(Some(head.type_name), head.id, e)
}

/// The error of encoding an [`Unknown`] message.
#[cold]
#[inline(never)]
fn unknown_type(u: &Unknown) -> EncodeError {
    EncodeError::Unencodable(format!("unknown message type {:?}", u.type_name))
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
                crate::enc::Put::put(self, &mut crate::enc::Enc::new(out))
            }
        }

        /// The message as its map, `type` first.
        impl crate::enc::Put for $name {
            fn put(&self, e: &mut crate::enc::Enc<'_>) -> Result<(), EncodeError> {
                match self {
                    $(Self::$variant(m) => crate::enc::PutFields::put_fields(m, e, Some($tag)),)*
                    Self::Unknown(u) => Err(unknown_type(u)),
                }
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
        // exec registry
        /// List the running and recently exited execs.
        "list_execs" => ListExecs(ListExecs),
        /// Replay an exec's retained output, then follow it.
        "attach_exec" => AttachExec(AttachExec),
        /// Stop following an exec.
        "detach_exec" => DetachExec(DetachExec),
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
        // exec registry
        /// Answer to `list_execs`.
        "exec_list" => ExecList(ExecList),
        /// Answer to `attach_exec`.
        "exec_attached" => ExecAttached(ExecAttached),
        /// Output of an attached exec.
        "attach_output" => AttachOutput(AttachOutput),
        /// An attached connection skipped output it was too slow for.
        "attach_lagged" => AttachLagged(AttachLagged),
        /// An attached exec ended.
        "attach_exit" => AttachExit(AttachExit),
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
