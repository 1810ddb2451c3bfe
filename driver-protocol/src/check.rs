//! Validating a driver's event without decoding it into owned values: the shim's relay path.
//!
//! A driver event (`message_chunk`, `tool_call`, `tool_result`, `file_change`, `progress`,
//! `log`, `custom`) is relayed to the control plane as the bytes the driver sent; the shim
//! only has to know that they decode. Decoding into [`DriverToShim`](crate::message::DriverToShim)
//! answers that, but allocates every string and every [`rmpv::Value`] of the event only to
//! drop them again, which at a million events a second is most of the relay's cost.
//!
//! [`relayable_event`] reads the same fields without decoding them: one pass over the body
//! checks its structure (as [`raw::read_head`](crate::raw::read_head) does) and each field in
//! a plain shape its typed decoder takes (a string, an optional string, a flag, an unsigned
//! count, one of a unit enum's names, or any value made of the usual MessagePack kinds). It is
//! never laxer than the typed decoder: a body it accepts decodes as the typed message (the
//! tests hold it to that). A body in any other shape (an ext value, a count in a signed
//! encoding, a struct written as an array…) is left to the typed decoder, which the shim's
//! relay falls back to anyway: it either accepts the body after all, at the cost of a decode,
//! or gives the authoritative error.
//!
//! ```
//! use driver_protocol::check::relayable_event;
//! use driver_protocol::message::{Custom, DriverToShim, Message, Ready};
//!
//! let custom = DriverToShim::Custom(Custom {
//!     task_id: None,
//!     kind: "note".into(),
//!     data: rmpv::Value::Binary(vec![1, 2, 3]),
//! });
//! assert_eq!(relayable_event(&custom.to_body()?), Some("custom"));
//! let ready = DriverToShim::Ready(Ready { re: None });
//! assert_eq!(relayable_event(&ready.to_body()?), None, "not an event");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::mpack::{is, same};
use crate::raw::{plain_event, plain_fields, Field, Fields};

/// The `type` of `body` when it is a driver event the shim relays as it is and it decodes
/// as its typed message would; `None` for any other message, and for a body that must be
/// left to the typed decoder (it may still decode, or it gives the error to report).
///
/// Allocates nothing.
pub fn relayable_event(body: &[u8]) -> Option<&str> {
    relayable_event_task(body).map(|e| e.type_name)
}

/// A driver event [`relayable_event`] accepts: its `type` and the task it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Relayable<'a> {
    /// The event's `type`.
    pub type_name: &'a str,
    /// Its `task_id`, if it names a task: the bytes of a UTF-8 string (checked; handed back
    /// as bytes, so that the relay path does not validate them twice).
    pub task_id: Option<&'a [u8]>,
}

/// [`relayable_event`], with the `task_id` the event names. Allocates nothing.
pub fn relayable_event_task(body: &[u8]) -> Option<Relayable<'_>> {
    let mut task_id = None;
    // The usual body, its `type` first and every field in its plain shape: one pass.
    if let Some(type_name) = plain_event(body, plain_entry, &mut task_id) {
        return Some(Relayable { type_name, task_id });
    }
    // Its `type` elsewhere (or a key the one pass leaves to the head): two passes.
    let head = crate::raw::read_head(body).ok()?;
    let fields = plain_table(head.type_name)?;
    task_id = None;
    plain_fields(body, fields, &mut task_id).then_some(Relayable {
        type_name: head.type_name,
        task_id,
    })
}

/// The fields of a relayable event type in their plain shapes.
///
/// The candidate is picked by the name's length (and first byte), then compared once: a
/// `match` on the names compares them one after the other, seven string comparisons for a
/// `custom` event.
fn plain_table(type_name: &str) -> Option<Fields> {
    plain_entry(type_name.as_bytes()).map(|(_, fields)| fields)
}

/// [`plain_table`] of a name as bytes, with the name itself (so that a name it knows needs
/// no UTF-8 check).
fn plain_entry(name: &[u8]) -> Option<(&'static str, Fields)> {
    // The short names compared as numbers (`is`), the long ones byte by byte.
    let (known, want, fields): (bool, &'static str, Fields) = match (name.len(), name.first()) {
        (13, _) => (false, "message_chunk", MESSAGE_CHUNK),
        (9, _) => (false, "tool_call", TOOL_CALL),
        (11, Some(b't')) => (false, "tool_result", TOOL_RESULT),
        (11, _) => (false, "file_change", FILE_CHANGE),
        (8, _) => (is(name, b"progress"), "progress", PROGRESS),
        (3, _) => (is(name, b"log"), "log", LOG),
        (6, _) => (is(name, b"custom"), "custom", CUSTOM),
        _ => return None,
    };
    (known || same(name, want.as_bytes())).then_some((want, fields))
}

// The fields of each relayable event in the plain shapes of `raw::plain_fields`: the fields
// of the typed events in `message/event.rs`, each shape one their decoder takes; `true` for a
// required field.

const MESSAGE_CHUNK: Fields = &[
    ("task_id", Field::TaskId, false),
    ("text", Field::Str, true),
    ("role", Field::OptStr, false),
    ("final", Field::Flag, false),
];
const TOOL_CALL: Fields = &[
    ("task_id", Field::TaskId, false),
    ("call_id", Field::Str, true),
    ("name", Field::Str, true),
    ("input", Field::Any, true),
];
const TOOL_RESULT: Fields = &[
    ("task_id", Field::TaskId, false),
    ("call_id", Field::Str, true),
    ("output", Field::Any, true),
    ("is_error", Field::Flag, false),
];
const FILE_CHANGE: Fields = &[
    ("task_id", Field::TaskId, false),
    ("path", Field::Str, true),
    (
        "change",
        Field::OneOf(&["created", "modified", "deleted", "renamed"]),
        true,
    ),
    ("from", Field::OptStr, false),
];
const PROGRESS: Fields = &[
    ("task_id", Field::TaskId, false),
    ("message", Field::OptStr, false),
    ("done", Field::OptUint, false),
    ("total", Field::OptUint, false),
];
const LOG: Fields = &[
    ("task_id", Field::TaskId, false),
    (
        "stream",
        Field::OneOf(&["driver", "stdout", "stderr"]),
        true,
    ),
    ("level", Field::OptStr, false),
    ("text", Field::Str, true),
    ("truncated", Field::Flag, false),
];
const CUSTOM: Fields = &[
    ("task_id", Field::TaskId, false),
    ("kind", Field::Str, true),
    ("data", Field::Any, true),
];

#[cfg(test)]
mod tests {
    use rmpv::Value;

    use super::*;
    use crate::message::{
        Custom, DriverToShim, ErrorMsg, FileChange, Log, LogStream, Message, MessageChunk,
        Progress, Ready, ToolCall, ToolResult,
    };
    use crate::ErrorCode;

    /// A body from `(key, value)` pairs, written by hand so that it can be wrong.
    fn body(fields: &[(&str, Value)]) -> Vec<u8> {
        let map = Value::Map(
            fields
                .iter()
                .map(|(k, v)| (Value::from(*k), v.clone()))
                .collect(),
        );
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, &map).expect("encode");
        out
    }

    /// The property: whatever the check accepts decodes, as the same type; and so does what
    /// the plain scan alone accepts.
    fn agrees(b: &[u8]) {
        if let Ok(head) = crate::raw::read_head(b) {
            let fields = plain_table(head.type_name).unwrap_or(CUSTOM);
            if plain_fields(b, fields, &mut None) {
                let msg = DriverToShim::decode(b).unwrap_or_else(|e| {
                    panic!("the plain scan accepted what decode rejects ({e}): {b:?}")
                });
                assert_eq!(msg.type_name(), head.type_name);
            }
        }
        // The one pass accepts what the two accept, with the same type, and only that; the
        // two accept nothing with its `type` first (and no `event` key, which the one pass
        // leaves to them) that the one pass refuses.
        let one = plain_event(b, plain_entry, &mut None);
        let two = crate::raw::read_head(b)
            .ok()
            .and_then(|h| plain_table(h.type_name).map(|f| (h.type_name, f)))
            .filter(|(_, f)| plain_fields(b, f, &mut None))
            .map(|(ty, _)| ty);
        let type_first = b.get(1..6) == Some(b"\xa4type");
        let event_key = b.windows(6).any(|w| w == b"\xa5event");
        let usual = type_first && !event_key && matches!(b.first(), Some(0x80..=0x8f));
        if one.is_some() || usual {
            assert_eq!(one, two, "one pass and two disagree: {b:?}");
        }
        if let Some(ty) = relayable_event(b) {
            let msg = DriverToShim::decode(b)
                .unwrap_or_else(|e| panic!("check accepted what decode rejects ({e}): {b:?}"));
            assert_eq!(msg.type_name(), ty);
            // The task it names is the decoded message's.
            let named = relayable_event_task(b).and_then(|r| r.task_id);
            assert_eq!(named, msg.event_task_id().map(str::as_bytes), "{b:?}");
        }
    }

    fn values() -> Vec<Value> {
        vec![
            Value::Nil,
            Value::from(true),
            Value::from(7u64),
            Value::from(-7i64),
            Value::F32(1.5),
            Value::F64(2.5),
            Value::from("text"),
            Value::Binary(vec![1, 2, 3]),
            Value::Array(vec![Value::from(1u64), Value::from("a")]),
            Value::Map(vec![(Value::from("k"), Value::Nil)]),
            Value::Map(vec![(Value::from(1u64), Value::Array(vec![]))]),
            Value::Ext(3, vec![9, 9]),
            Value::from("created"),
            Value::from("stdout"),
            Value::from("bogus_kind"),
        ]
    }

    #[test]
    fn typed_events_are_relayable() {
        let events = [
            DriverToShim::MessageChunk(MessageChunk {
                task_id: Some("t".into()),
                text: "hi".into(),
                role: Some("assistant".into()),
                is_final: true,
            }),
            DriverToShim::ToolCall(ToolCall {
                task_id: None,
                call_id: "c".into(),
                name: "ls".into(),
                input: Value::Map(vec![(Value::from("a"), Value::Array(vec![Value::Nil]))]),
            }),
            DriverToShim::ToolResult(ToolResult {
                task_id: None,
                call_id: "c".into(),
                output: Value::Binary(vec![1]),
                is_error: false,
            }),
            DriverToShim::FileChange(FileChange {
                task_id: None,
                path: "/a".into(),
                change: crate::message::FileChangeKind::Deleted,
                from: Some("/b".into()),
            }),
            DriverToShim::Progress(Progress {
                task_id: None,
                message: None,
                done: Some(1),
                total: Some(2),
            }),
            DriverToShim::Log(Log {
                task_id: None,
                stream: LogStream::Driver,
                level: Some("info".into()),
                text: "x".into(),
                truncated: true,
            }),
            DriverToShim::Custom(Custom {
                task_id: Some("t".into()),
                kind: "k".into(),
                data: Value::F64(1.0),
            }),
        ];
        for ev in events {
            let b = ev.to_body().expect("encode");
            assert_eq!(relayable_event(&b), Some(ev.type_name()));
            agrees(&b);
        }
        let others = [
            DriverToShim::Ready(Ready { re: None }),
            DriverToShim::Error(ErrorMsg {
                re: None,
                code: ErrorCode::Internal,
                message: "m".into(),
                task_id: None,
                first_available: None,
            }),
        ];
        for m in others {
            assert_eq!(relayable_event(&m.to_body().expect("encode")), None);
        }
    }

    /// Every field of every relayable type, given every kind of value (and left out): the
    /// check never accepts what the typed decoder rejects.
    #[test]
    fn never_laxer_than_the_typed_decoder() {
        // Every relayable type, with its fields from the one table the check reads.
        let types: Vec<_> = DriverToShim::TYPES
            .iter()
            .filter_map(|ty| Some((*ty, plain_table(ty)?)))
            .collect();
        assert_eq!(types.len(), 7, "the seven driver events");
        let vals = values();
        let mut accepted = 0;
        for (ty, fields) in types {
            // A base where each field holds a plausible value, then one field varied.
            let base: Vec<(&str, Value)> = fields
                .iter()
                .map(|&(name, kind, _)| {
                    let v = match kind {
                        Field::OneOf(names) => Value::from(names.first().copied().unwrap_or("")),
                        Field::Flag => Value::from(false),
                        Field::OptUint => Value::from(3u64),
                        Field::Str | Field::OptStr | Field::TaskId | Field::Any => Value::from("s"),
                    };
                    (name, v)
                })
                .collect();
            for i in 0..fields.len() {
                for v in vals.iter().cloned().map(Some).chain([None]) {
                    let mut fs = vec![("type", Value::from(ty))];
                    for (j, (k, bv)) in base.iter().enumerate() {
                        match (j == i, &v) {
                            (true, Some(v)) => fs.push((k, v.clone())),
                            (true, None) => {}
                            (false, _) => fs.push((k, bv.clone())),
                        }
                    }
                    let b = body(&fs);
                    if relayable_event(&b).is_some() {
                        accepted += 1;
                    }
                    agrees(&b);
                }
            }
        }
        assert!(
            accepted > 50,
            "the corpus exercises acceptance ({accepted})"
        );
    }

    #[test]
    fn plain_shapes_are_checked_without_serde() {
        let custom = DriverToShim::Custom(Custom {
            task_id: None,
            kind: "bench".into(),
            data: Value::Binary(vec![0x5a; 150]),
        });
        assert!(plain_fields(
            &custom.to_body().expect("encode"),
            CUSTOM,
            &mut None
        ));
        let nested = Value::Map(vec![
            (
                Value::from("argv"),
                Value::Array(vec!["ls".into(), "-l".into()]),
            ),
            (
                Value::from(1u64),
                Value::Map(vec![(Value::F64(0.5), Value::Nil)]),
            ),
        ]);
        let call = DriverToShim::ToolCall(ToolCall {
            task_id: Some("t".into()),
            call_id: "c".into(),
            name: "run".into(),
            input: nested.clone(),
        });
        let b = call.to_body().expect("encode");
        assert!(plain_fields(&b, TOOL_CALL, &mut None));
        agrees(&b);
        // Not plain (an ext; a signed encoding of a count; a field twice): left to the
        // typed decoder, which may accept it after all.
        let ext = body(&[
            ("type", Value::from("tool_result")),
            ("call_id", Value::from("c")),
            ("output", Value::Array(vec![Value::Ext(1, vec![1])])),
        ]);
        assert!(!plain_fields(&ext, TOOL_RESULT, &mut None));
        assert_eq!(relayable_event(&ext), None);
        let typed = DriverToShim::decode(&ext).expect("the typed decoder takes an ext");
        assert_eq!(typed.type_name(), "tool_result");
        let signed = b"\x82\xa4type\xa8progress\xa4done\xd0\x05";
        assert!(!plain_fields(signed, PROGRESS, &mut None));
        agrees(signed);
        let twice = body(&[
            ("type", Value::from("custom")),
            ("kind", Value::from("a")),
            ("kind", Value::from("b")),
            ("data", Value::Nil),
        ]);
        assert!(!plain_fields(&twice, CUSTOM, &mut None));
        agrees(&twice);
        // Deeper than the limit: not plain, and not relayable.
        let mut deep = nested;
        for _ in 0..crate::MAX_DEPTH {
            deep = Value::Array(vec![deep]);
        }
        let b = body(&[
            ("type", Value::from("custom")),
            ("kind", Value::from("k")),
            ("data", deep),
        ]);
        assert!(!plain_fields(&b, CUSTOM, &mut None));
        agrees(&b);
    }

    #[test]
    fn malformed_bodies_are_not_relayable() {
        assert_eq!(relayable_event(b""), None);
        assert_eq!(relayable_event(b"\x90"), None);
        let mut b = body(&[("type", Value::from("custom")), ("kind", Value::from("k"))]);
        assert_eq!(relayable_event(&b), None, "data is required");
        b.push(0xc0);
        assert_eq!(relayable_event(&b), None, "trailing bytes");
        // {type: "custom", kind: <str of invalid UTF-8>, data: nil}
        let bad = b"\x83\xa4type\xa6custom\xa4kind\xa2\xff\xfe\xa4data\xc0";
        assert_eq!(relayable_event(bad), None, "kind is not UTF-8");
        agrees(bad);
        // The same with the invalid string as `data`: a value, which may be any bytes.
        let odd = b"\x83\xa4type\xa6custom\xa4kind\xa1k\xa4data\xa2\xff\xfe";
        agrees(odd);
        // Keys the head refuses twice, `type` first: not relayable in one pass either.
        let events_twice = body(&[
            ("type", Value::from("custom")),
            ("kind", Value::from("a")),
            ("data", Value::Nil),
            ("event", Value::from(1u64)),
            ("event", Value::from(2u64)),
        ]);
        assert_eq!(relayable_event(&events_twice), None, "`event` twice");
        agrees(&events_twice);
        let types_twice = body(&[
            ("type", Value::from("custom")),
            ("kind", Value::from("a")),
            ("data", Value::Nil),
            ("type", Value::from("custom")),
        ]);
        assert_eq!(relayable_event(&types_twice), None, "`type` twice");
        agrees(&types_twice);
        // One `event` field is any other field: relayed.
        let one_event = body(&[
            ("type", Value::from("custom")),
            ("kind", Value::from("a")),
            ("data", Value::Nil),
            ("event", Value::from(1u64)),
        ]);
        assert_eq!(relayable_event(&one_event), Some("custom"));
        agrees(&one_event);
    }
}
