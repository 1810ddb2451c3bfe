//! Reading a message's envelope without decoding its fields, and relaying events as raw bytes.
//!
//! Dispatch needs the `type` (and the `id`, so that a rejection can carry `re`) before it
//! knows which struct to decode the fields into. The shim's relay needs more: it stamps every
//! driver event with a `seq` and forwards it to the control plane, and at a million events a
//! second it cannot afford to decode and re-encode each one. This module is a small
//! hand-written MessagePack walker for both jobs. It never allocates, and it checks a body's
//! structure completely before serde is allowed to see it:
//!
//! - the body is exactly one map (no trailing bytes) whose keys are all strings;
//! - `type` is present once, and is a string;
//! - arrays and maps nest at most [`MAX_DEPTH`] levels (the message's map is level 1);
//! - every length fits in the body, so no later reader can be tricked into reserving memory
//!   for elements that are not there.
//!
//! [`read_head`] returns the `type` and `id`; [`split_envelope`] finds the `seq` and the raw
//! bytes of the event inside an `event` envelope; [`encode_event_envelope`] writes an
//! envelope around an event body without touching it, byte-identical to what
//! [`ShimToControl::Event`](crate::message::ShimToControl::Event) encodes to.
//!
//! ```
//! use driver_protocol::message::{Event, Message, Progress};
//! use driver_protocol::raw;
//!
//! let event = Event::Progress(Progress {
//!     task_id: Some("t1".into()),
//!     message: Some("halfway".into()),
//!     done: Some(1),
//!     total: Some(2),
//! });
//! let body = event.to_body()?;
//! assert_eq!(raw::read_head(&body)?.type_name, "progress");
//!
//! let mut envelope = Vec::new();
//! raw::encode_event_envelope(7, &body, &mut envelope);
//! let split = raw::split_envelope(&envelope)?;
//! assert_eq!((split.seq, split.event), (7, &body[..]));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::ops::Range;
use std::str;

use bytes::BufMut;

use crate::message::{self, Event, EventEnvelope, Message, RequestId, Seq};
use crate::{DecodeError, MAX_DEPTH};

/// The `type` and `id` of a message, read without decoding its other fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head<'a> {
    /// The message's `type`.
    pub type_name: &'a str,
    /// The message's `id`, when it has one that is an unsigned integer. An `id` of any other
    /// type is not an error here: it reads as `None`, and the message's own decoder decides.
    pub id: Option<RequestId>,
}

/// Checks the structure of a message body and reads its `type` and `id`.
///
/// Fails with [`DecodeError::Malformed`] unless the body is exactly one MessagePack map with
/// string keys, one string `type`, nesting no deeper than [`MAX_DEPTH`], and every length
/// within the body. Other fields are skipped without being decoded. Never allocates, except
/// for the error's text.
pub fn read_head(body: &[u8]) -> Result<Head<'_>, DecodeError> {
    let top = walk(body)?;
    Ok(Head {
        type_name: top.type_name,
        id: top.id,
    })
}

/// [`read_head`] in the shape the message decoders use.
pub(crate) fn peek(body: &[u8]) -> Result<message::Head<'_>, DecodeError> {
    let top = walk(body)?;
    // An envelope's parts come from the same walk: decoding it does not walk it again.
    let envelope = match top.type_name {
        "event" => envelope_parts(&top)
            .ok()
            .map(|range| (top.seq.unwrap_or_default(), range)),
        _ => None,
    };
    Ok(message::Head {
        type_name: top.type_name,
        id: top.id,
        envelope,
    })
}

/// An `event` envelope with its event still encoded: what the relay forwards and what
/// [`split_envelope`] finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawEvent<'a> {
    /// The envelope's sequence number.
    pub seq: Seq,
    /// The MessagePack body of the event (a map with its own `type`), e.g. a driver's event
    /// exactly as it arrived.
    pub event: &'a [u8],
}

/// Finds the `seq` and the raw event inside the body of an `event` envelope.
///
/// The whole body is checked as by [`read_head`]; the event's own fields are not decoded.
pub fn split_envelope(body: &[u8]) -> Result<RawEvent<'_>, DecodeError> {
    let top = walk(body)?;
    let range = envelope_parts(&top)?;
    let seq = top.seq.unwrap_or_default();
    Ok(RawEvent {
        seq,
        event: body.get(range).unwrap_or_default(),
    })
}

/// [`split_envelope`] and [`read_head`] of the event in one pass over the body: the `seq`,
/// the event, and the event's `type`.
///
/// Accepts and rejects exactly what `split_envelope` followed by `read_head` of the event
/// do. What a control plane that hands events on without decoding them needs of each.
///
/// ```
/// use driver_protocol::message::{Event, Message, Progress};
/// use driver_protocol::raw;
///
/// let body = Event::Progress(Progress { task_id: None, message: None, done: None, total: None })
///     .to_body()?;
/// let mut envelope = Vec::new();
/// raw::encode_event_envelope(9, &body, &mut envelope);
/// let (split, type_name) = raw::split_envelope_head(&envelope)?;
/// assert_eq!((split.seq, split.event, type_name), (9, &body[..], "progress"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn split_envelope_head(body: &[u8]) -> Result<(RawEvent<'_>, &str), DecodeError> {
    let mut cur = Cursor { buf: body, pos: 0 };
    let walked = walk_map(&mut cur, true);
    let (top, event_type) = match walked {
        Ok((top, Some(event_type))) if cur.pos == body.len() && event_type != "event" => {
            (top, event_type)
        }
        // Trailing bytes, an error, an envelope whose `type` came after its `event`, or an
        // event whose own `type` is "event" (whose nested `event` the two walks check at
        // another depth): the two walks, which also give the error.
        _ => {
            let split = split_envelope(body)?;
            let type_name = read_head(split.event)?.type_name;
            return Ok((split, type_name));
        }
    };
    let range = envelope_parts(&top)?;
    let seq = top.seq.unwrap_or_default();
    let split = RawEvent {
        seq,
        event: body.get(range).unwrap_or_default(),
    };
    Ok((split, event_type))
}

/// The byte range of the event inside the body of an `event` envelope (see
/// [`split_envelope`]).
pub fn event_body_range(body: &[u8]) -> Result<Range<usize>, DecodeError> {
    let top = walk(body)?;
    envelope_parts(&top)
}

/// Appends the body of `{type: "event", seq, event}` to `out`, with `event_body` copied in
/// as it is.
///
/// The output is byte-identical to the body of
/// [`ShimToControl::Event`](crate::message::ShimToControl::Event) when `event_body` is what
/// [`Event::to_body`](crate::message::Message::to_body) gives. `event_body` is not checked:
/// pass only a body that decoded as an event (as the shim does with a driver's events), or
/// the receiver will reject the envelope.
pub fn encode_event_envelope<B: BufMut + ?Sized>(seq: Seq, event_body: &[u8], out: &mut B) {
    // fixmap(3), "type": "event", "seq": <uint>, "event": <raw>
    out.put_slice(b"\x83\xa4type\xa5event\xa3seq");
    write_uint(out, seq);
    out.put_slice(b"\xa5event");
    out.put_slice(event_body);
}

/// The length of the MessagePack value at the start of `buf`.
///
/// Arrays and maps may nest at most [`MAX_DEPTH`] levels, counting a container at the start
/// of `buf` as level 1. Bytes after the value are not looked at.
pub fn skip_value(buf: &[u8]) -> Result<usize, DecodeError> {
    let mut cur = Cursor { buf, pos: 0 };
    cur.skip_value(1)
        .map_err(|fail| DecodeError::malformed(None, None, fail.detail()))?;
    Ok(cur.pos)
}

/// Decodes an `event` envelope, dispatching on the nested event's own `type`.
pub(crate) fn decode_envelope(
    body: &[u8],
    head: &message::Head<'_>,
) -> Result<EventEnvelope, DecodeError> {
    let split = match &head.envelope {
        Some((seq, range)) => RawEvent {
            seq: *seq,
            event: body.get(range.clone()).unwrap_or_default(),
        },
        // Not a valid envelope: the walk again, for its error.
        None => split_envelope(body).map_err(|e| match e {
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

fn write_uint<B: BufMut + ?Sized>(out: &mut B, v: u64) {
    // The most compact form, as rmp-serde (and every MessagePack encoder) writes it.
    if v < 0x80 {
        out.put_u8(v as u8);
    } else if let Ok(v) = u8::try_from(v) {
        out.put_u8(0xcc);
        out.put_u8(v);
    } else if let Ok(v) = u16::try_from(v) {
        out.put_u8(0xcd);
        out.put_u16(v);
    } else if let Ok(v) = u32::try_from(v) {
        out.put_u8(0xce);
        out.put_u32(v);
    } else {
        out.put_u8(0xcf);
        out.put_u64(v);
    }
}

/// What [`walk`] learned about a body's top-level map.
struct TopLevel<'a> {
    type_name: &'a str,
    id: Option<RequestId>,
    /// `Some` when a `seq` key was seen; the inner `None` when its value is not a uint.
    seq: Option<Seq>,
    seq_seen: bool,
    event: Option<Range<usize>>,
}

fn envelope_parts(top: &TopLevel<'_>) -> Result<Range<usize>, DecodeError> {
    let malformed = |detail: &str| DecodeError::malformed(Some(top.type_name), top.id, detail);
    if top.type_name != "event" {
        return Err(malformed("not an `event` envelope"));
    }
    if !top.seq_seen {
        return Err(malformed("missing field `seq`"));
    }
    if top.seq.is_none() {
        return Err(malformed("`seq` is not an unsigned integer"));
    }
    let Some(event) = &top.event else {
        return Err(malformed("missing field `event`"));
    };
    Ok(event.clone())
}

/// Checks a whole body and reads the fields the envelope logic needs.
fn walk(body: &[u8]) -> Result<TopLevel<'_>, DecodeError> {
    let mut cur = Cursor { buf: body, pos: 0 };
    let (top, _) = walk_map(&mut cur, false)?;
    if cur.pos != body.len() {
        return Err(DecodeError::malformed(
            Some(top.type_name),
            top.id,
            Fail::Trailing.detail(),
        ));
    }
    Ok(top)
}

/// Checks the map at the cursor, as [`walk`] checks a body, leaving the cursor after it.
/// With `event_head`, the map's `event` field, when the map's `type` came before it and is
/// `"event"`, is walked as a message of its own in the same pass, and its `type` returned.
fn walk_map<'a>(
    cur: &mut Cursor<'a>,
    event_head: bool,
) -> Result<(TopLevel<'a>, Option<&'a str>), DecodeError> {
    let mut type_name = None;
    let mut id = None;
    let fail = |fail: Fail, type_name: Option<&str>, id: Option<RequestId>| {
        DecodeError::malformed(type_name, id, fail.detail())
    };
    let mut seq = None;
    let mut seq_seen = false;
    let mut event: Option<Range<usize>> = None;
    let mut event_type = None;

    let entries = cur.map_len().map_err(|f| fail(f, None, None))?;
    for _ in 0..entries {
        let key = cur.key().map_err(|f| fail(f, type_name, id))?;
        if key == b"event" && event_head && event.is_none() && type_name == Some("event") {
            // The event is a message of its own, walked here rather than skipped and
            // walked again; its errors read as the envelope's.
            let start = cur.pos;
            let (inner, _) = walk_map(cur, false).map_err(|e| match e {
                DecodeError::Malformed { detail, .. } => {
                    DecodeError::malformed(type_name, id, detail)
                }
                other => other,
            })?;
            event_type = Some(inner.type_name);
            event = Some(start..cur.pos);
            continue;
        }
        let step = (|| {
            match key {
                b"type" => {
                    if type_name.is_some() {
                        return Err(Fail::DuplicateType);
                    }
                    type_name = Some(cur.type_str()?);
                }
                b"id" if id.is_none() => id = cur.uint_or_skip()?,
                b"seq" if !seq_seen => {
                    seq_seen = true;
                    seq = cur.uint_or_skip()?;
                }
                b"event" => {
                    if event.is_some() {
                        return Err(Fail::DuplicateEvent);
                    }
                    // An envelope's event is a message of its own: it counts its depth from
                    // its own map, so relaying never makes an event too deep. Any other
                    // message's `event` field is re-checked at its true depth below.
                    let start = cur.pos;
                    cur.skip_value(1)?;
                    event = Some(start..cur.pos);
                }
                _ => cur.skip_value(2)?,
            }
            Ok(())
        })();
        step.map_err(|f| fail(f, type_name, id))?;
    }
    let Some(type_name) = type_name else {
        return Err(fail(Fail::MissingType, None, id));
    };
    if type_name != "event" {
        if let Some(range) = &event {
            let inner = cur.buf.get(range.clone()).unwrap_or_default();
            Cursor { buf: inner, pos: 0 }
                .skip_value(2)
                .map_err(|f| fail(f, Some(type_name), id))?;
        }
    }
    let top = TopLevel {
        type_name,
        id,
        seq,
        seq_seen,
        event,
    };
    Ok((top, event_type))
}

/// Why a body is malformed; turned into [`DecodeError::Malformed`] text.
#[derive(Debug, Clone, Copy)]
enum Fail {
    Eof,
    Reserved,
    TooDeep,
    NotMap,
    KeyNotStr,
    KeyNotUtf8,
    TypeNotStr,
    TypeNotUtf8,
    DuplicateType,
    DuplicateEvent,
    MissingType,
    Trailing,
}

impl Fail {
    fn detail(self) -> &'static str {
        match self {
            Self::Eof => "a value runs past the end of the body",
            Self::Reserved => "invalid MessagePack marker 0xc1",
            Self::TooDeep => "arrays and maps nest deeper than 64 levels",
            Self::NotMap => "the body is not a MessagePack map",
            Self::KeyNotStr => "a key of the message map is not a string",
            Self::KeyNotUtf8 => "a key of the message map is not valid UTF-8",
            Self::TypeNotStr => "`type` is not a string",
            Self::TypeNotUtf8 => "`type` is not valid UTF-8",
            Self::DuplicateType => "duplicate field `type`",
            Self::DuplicateEvent => "duplicate field `event`",
            Self::MissingType => "missing field `type`",
            Self::Trailing => "bytes after the end of the message map",
        }
    }
}

/// A read position in a body. Every read checks the remaining length; nothing allocates.
/// What a field of a relayable event holds in the plain shapes [`plain_fields`] accepts:
/// each one a shape its typed decoder takes (see [`crate::check`]).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Field {
    /// A UTF-8 string.
    Str,
    /// Nil or a UTF-8 string.
    OptStr,
    /// Nil or a boolean.
    Flag,
    /// Nil or an unsigned integer in an unsigned encoding.
    OptUint,
    /// One of these strings (a unit enum variant).
    OneOf(&'static [&'static str]),
    /// Any value made of nil, booleans, integers, floats, binaries, UTF-8 strings, arrays
    /// and maps (no ext).
    Any,
}

/// The plain shapes of a relayable event's fields: `(name, shape, required)`.
pub(crate) type Fields = &'static [(&'static str, Field, bool)];

/// Whether `body`, which [`read_head`] accepted, holds every `required` field of `fields`
/// (at most 32) once, each in its plain shape, and any other field in the shape of
/// [`Field::Any`]. `false` means "not sure", never "malformed": the caller then asks the
/// decoder. Allocates nothing.
pub(crate) fn plain_fields(body: &[u8], fields: Fields) -> bool {
    let mut cur = Cursor { buf: body, pos: 0 };
    let scanned = cur
        .map_len()
        .and_then(|n| cur.scan_fields(n, fields, false));
    matches!(scanned, Ok(true)) && cur.pos == body.len()
}

/// [`read_head`] and then [`plain_fields`] in one pass, for the usual body whose first key
/// is its `type`: the type, when `fields_of` has the fields of that type, the body is well
/// formed and every field is in its plain shape. `None` means "not sure": the caller then
/// takes the two passes (which also handle a `type` that is not the first key).
pub(crate) fn plain_event(body: &[u8], fields_of: impl Fn(&str) -> Option<Fields>) -> Option<&str> {
    let mut cur = Cursor { buf: body, pos: 0 };
    let entries = cur.map_len().ok()?;
    if entries == 0 || cur.key().ok()? != b"type" {
        return None;
    }
    let type_name = cur.type_str().ok()?;
    let fields = fields_of(type_name)?;
    let plain = cur.scan_fields(entries - 1, fields, true).ok()? && cur.pos == body.len();
    plain.then_some(type_name)
}

/// Whether `b` is UTF-8; ASCII, the usual case for keys and names, without a full decode.
#[inline(always)]
fn is_utf8(b: &[u8]) -> bool {
    b.is_ascii() || str::from_utf8(b).is_ok()
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

// The small readers are `inline(always)`: the shim is built for size (opt-level "z"), which
// otherwise leaves these one-liners as calls on its per-event path; inlined, they leave the
// static binary's size as it was (886,408 bytes either way).
impl<'a> Cursor<'a> {
    #[inline(always)]
    fn byte(&mut self) -> Result<u8, Fail> {
        let b = *self.buf.get(self.pos).ok_or(Fail::Eof)?;
        self.pos += 1;
        Ok(b)
    }

    #[inline(always)]
    fn peek_byte(&self) -> Result<u8, Fail> {
        self.buf.get(self.pos).copied().ok_or(Fail::Eof)
    }

    #[inline(always)]
    fn take(&mut self, n: usize) -> Result<&'a [u8], Fail> {
        let end = self.pos.checked_add(n).ok_or(Fail::Eof)?;
        let bytes = self.buf.get(self.pos..end).ok_or(Fail::Eof)?;
        self.pos = end;
        Ok(bytes)
    }

    #[inline(always)]
    fn array<const N: usize>(&mut self) -> Result<[u8; N], Fail> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    #[inline(always)]
    fn u8_len(&mut self) -> Result<usize, Fail> {
        self.byte().map(usize::from)
    }

    #[inline(always)]
    fn u16_len(&mut self) -> Result<usize, Fail> {
        self.array().map(|b| usize::from(u16::from_be_bytes(b)))
    }

    #[inline(always)]
    fn u32_len(&mut self) -> Result<usize, Fail> {
        // A u32 length larger than the address space cannot fit in the body anyway.
        self.array()
            .map(|b| usize::try_from(u32::from_be_bytes(b)).unwrap_or(usize::MAX))
    }

    #[inline(always)]
    fn skip(&mut self, n: usize) -> Result<(), Fail> {
        self.take(n).map(drop)
    }

    /// Skips one value; `level` is the nesting level it has if it is an array or a map.
    fn skip_value(&mut self, level: usize) -> Result<(), Fail> {
        let marker = self.byte()?;
        match marker {
            // positive and negative fixint, nil, false, true
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => Ok(()),
            0x80..=0x8f => self.skip_map(usize::from(marker & 0x0f), level),
            0x90..=0x9f => self.skip_array(usize::from(marker & 0x0f), level),
            0xa0..=0xbf => self.skip(usize::from(marker & 0x1f)),
            0xc1 => Err(Fail::Reserved),
            // bin 8/16/32, str 8/16/32
            0xc4 | 0xd9 => {
                let n = self.u8_len()?;
                self.skip(n)
            }
            0xc5 | 0xda => {
                let n = self.u16_len()?;
                self.skip(n)
            }
            0xc6 | 0xdb => {
                let n = self.u32_len()?;
                self.skip(n)
            }
            // ext 8/16/32: length, then a type byte and the data
            0xc7 => {
                let n = self.u8_len()?;
                self.skip(n.saturating_add(1))
            }
            0xc8 => {
                let n = self.u16_len()?;
                self.skip(n.saturating_add(1))
            }
            0xc9 => {
                let n = self.u32_len()?;
                self.skip(n.saturating_add(1))
            }
            // uint/int 8, 16, 32, 64 and float 32, 64
            0xcc | 0xd0 => self.skip(1),
            0xcd | 0xd1 => self.skip(2),
            0xca | 0xce | 0xd2 => self.skip(4),
            0xcb | 0xcf | 0xd3 => self.skip(8),
            // fixext 1, 2, 4, 8, 16 (a type byte, then the data)
            0xd4 => self.skip(2),
            0xd5 => self.skip(3),
            0xd6 => self.skip(5),
            0xd7 => self.skip(9),
            0xd8 => self.skip(17),
            0xdc => {
                let n = self.u16_len()?;
                self.skip_array(n, level)
            }
            0xdd => {
                let n = self.u32_len()?;
                self.skip_array(n, level)
            }
            0xde => {
                let n = self.u16_len()?;
                self.skip_map(n, level)
            }
            0xdf => {
                let n = self.u32_len()?;
                self.skip_map(n, level)
            }
        }
    }

    // A hostile count is harmless: every element takes at least one byte, so the loop ends
    // with `Eof` after at most the body's length.
    fn skip_array(&mut self, n: usize, level: usize) -> Result<(), Fail> {
        if level > MAX_DEPTH {
            return Err(Fail::TooDeep);
        }
        for _ in 0..n {
            self.skip_value(level + 1)?;
        }
        Ok(())
    }

    fn skip_map(&mut self, n: usize, level: usize) -> Result<(), Fail> {
        if level > MAX_DEPTH {
            return Err(Fail::TooDeep);
        }
        for _ in 0..n {
            self.skip_value(level + 1)?;
            self.skip_value(level + 1)?;
        }
        Ok(())
    }

    /// Reads the header of the top-level map.
    fn map_len(&mut self) -> Result<usize, Fail> {
        match self.byte()? {
            m @ 0x80..=0x8f => Ok(usize::from(m & 0x0f)),
            0xde => self.u16_len(),
            0xdf => self.u32_len(),
            _ => Err(Fail::NotMap),
        }
    }

    /// Reads a string's bytes, or `None` (consuming only the marker) if the value is not one.
    #[inline(always)]
    fn str_bytes(&mut self) -> Result<Option<&'a [u8]>, Fail> {
        let n = match self.peek_byte()? {
            m @ 0xa0..=0xbf => {
                self.pos += 1;
                usize::from(m & 0x1f)
            }
            0xd9 => {
                self.pos += 1;
                self.u8_len()?
            }
            0xda => {
                self.pos += 1;
                self.u16_len()?
            }
            0xdb => {
                self.pos += 1;
                self.u32_len()?
            }
            _ => return Ok(None),
        };
        self.take(n).map(Some)
    }

    /// Reads a value of shape `kind` (see [`Field`]): `Ok(false)` when it has another one.
    fn plain(&mut self, kind: Field) -> Result<bool, Fail> {
        let nil = self.peek_byte()? == 0xc0;
        match kind {
            Field::OptStr | Field::Flag | Field::OptUint if nil => {
                self.pos += 1;
                Ok(true)
            }
            Field::Str | Field::OptStr => self.utf8(),
            // Equal bytes: the string is one of the names, and so UTF-8.
            Field::OneOf(names) => Ok(self
                .str_bytes()?
                .is_some_and(|b| names.iter().any(|n| n.as_bytes() == b))),
            Field::Flag => Ok(matches!(self.byte()?, 0xc2 | 0xc3)),
            Field::OptUint => match self.byte()? {
                0x00..=0x7f => Ok(true),
                0xcc => self.skip(1).map(|()| true),
                0xcd => self.skip(2).map(|()| true),
                0xce => self.skip(4).map(|()| true),
                0xcf => self.skip(8).map(|()| true),
                _ => Ok(false),
            },
            Field::Any => self.plain_any(2),
        }
    }

    /// Reads a value: whether it is a UTF-8 string.
    #[inline(always)]
    fn utf8(&mut self) -> Result<bool, Fail> {
        Ok(self.str_bytes()?.is_some_and(is_utf8))
    }

    /// Reads a value of the shape of [`Field::Any`] at nesting `level`: `Ok(false)` when it
    /// has another one.
    fn plain_any(&mut self, level: usize) -> Result<bool, Fail> {
        let marker = self.peek_byte()?;
        // Values per entry: 2 in a map, 1 in an array.
        let (n, per) = match marker {
            0xa0..=0xbf | 0xd9..=0xdb => return self.utf8(),
            // ext, reserved
            0xc1 | 0xc7..=0xc9 | 0xd4..=0xd8 => return Ok(false),
            0x80..=0x9f => {
                self.pos += 1;
                (
                    usize::from(marker & 0x0f),
                    if marker < 0x90 { 2 } else { 1 },
                )
            }
            // array 16, array 32, map 16, map 32
            0xdc..=0xdf => {
                self.pos += 1;
                let n = if marker & 1 == 0 {
                    self.u16_len()?
                } else {
                    self.u32_len()?
                };
                (n, if marker >= 0xde { 2 } else { 1 })
            }
            _ => return self.skip_value(level).map(|()| true),
        };
        if level > MAX_DEPTH {
            return Ok(false);
        }
        // A hostile count ends with `Eof`: every value takes at least one byte.
        for _ in 0..n.saturating_mul(per) {
            if !self.plain_any(level + 1)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Reads `entries` map entries: whether each key is a field of `fields` (at most 32)
    /// once in its plain shape, or any other key with a value of the shape of
    /// [`Field::Any`], and every required field is there. A `type` key is skipped, unless
    /// `checking_keys`: then the `type` was read already and what [`read_head`] checks of
    /// keys is checked here, every doubt "not sure": another `type`, a key that is not
    /// UTF-8, an `event` key (which `read_head` refuses twice).
    fn scan_fields(
        &mut self,
        entries: usize,
        fields: Fields,
        checking_keys: bool,
    ) -> Result<bool, Fail> {
        let mut seen = 0u32;
        for _ in 0..entries {
            let key = self.str_bytes()?.ok_or(Fail::KeyNotStr)?;
            if checking_keys && (key == b"type" || key == b"event" || !is_utf8(key)) {
                return Ok(false);
            }
            if key == b"type" {
                self.skip_value(2)?;
                continue;
            }
            let plain = match fields.iter().position(|(name, ..)| name.as_bytes() == key) {
                Some(i) => {
                    let bit = 1u32.checked_shl(i as u32).unwrap_or(0);
                    if bit == 0 || seen & bit != 0 {
                        return Ok(false);
                    }
                    seen |= bit;
                    match fields.get(i) {
                        Some(&(_, kind, _)) => self.plain(kind)?,
                        None => false,
                    }
                }
                None => self.plain_any(2)?,
            };
            if !plain {
                return Ok(false);
            }
        }
        Ok(fields
            .iter()
            .enumerate()
            .all(|(i, &(_, _, req))| !req || (seen >> i) & 1 == 1))
    }

    fn key(&mut self) -> Result<&'a [u8], Fail> {
        let key = self.str_bytes()?.ok_or(Fail::KeyNotStr)?;
        if !is_utf8(key) {
            return Err(Fail::KeyNotUtf8);
        }
        Ok(key)
    }

    fn type_str(&mut self) -> Result<&'a str, Fail> {
        let bytes = self.str_bytes()?.ok_or(Fail::TypeNotStr)?;
        str::from_utf8(bytes).map_err(|_| Fail::TypeNotUtf8)
    }

    /// Reads a top-level field's value as a non-negative integer; any other value is skipped
    /// and reads as `None`.
    fn uint_or_skip(&mut self) -> Result<Option<u64>, Fail> {
        let v = match self.peek_byte()? {
            m @ 0x00..=0x7f => {
                self.pos += 1;
                Some(u64::from(m))
            }
            0xcc => {
                self.pos += 1;
                Some(u64::from(self.byte()?))
            }
            0xd0 => {
                self.pos += 1;
                u64::try_from(i8::from_be_bytes(self.array()?)).ok()
            }
            0xcd => {
                self.pos += 1;
                Some(u64::from(u16::from_be_bytes(self.array()?)))
            }
            0xce => {
                self.pos += 1;
                Some(u64::from(u32::from_be_bytes(self.array()?)))
            }
            0xcf => {
                self.pos += 1;
                Some(u64::from_be_bytes(self.array()?))
            }
            0xd1 => {
                self.pos += 1;
                u64::try_from(i16::from_be_bytes(self.array()?)).ok()
            }
            0xd2 => {
                self.pos += 1;
                u64::try_from(i32::from_be_bytes(self.array()?)).ok()
            }
            0xd3 => {
                self.pos += 1;
                u64::try_from(i64::from_be_bytes(self.array()?)).ok()
            }
            _ => {
                self.skip_value(2)?;
                None
            }
        };
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{
        EventEnvelope, ExecOutput, MessageChunk, OutputStream, ShimToControl, SubmitTask,
    };

    fn nested(levels: usize, leaf: u8) -> Vec<u8> {
        let mut v = vec![0x91; levels];
        v.push(leaf);
        v
    }

    /// `{type: "x", deep: <value>}`
    fn with_field(value: &[u8]) -> Vec<u8> {
        let mut body = b"\x82\xa4type\xa1x\xa4deep".to_vec();
        body.extend_from_slice(value);
        body
    }

    fn detail(e: DecodeError) -> String {
        match e {
            DecodeError::Malformed { detail, .. } => detail,
            other => panic!("expected malformed, got {other:?}"),
        }
    }

    #[test]
    fn reads_type_and_id_in_any_order() {
        let body = b"\x83\xa2id\x05\xa1z\x90\xa4type\xa4ping";
        let head = read_head(body).unwrap();
        assert_eq!(head.type_name, "ping");
        assert_eq!(head.id, Some(5));
    }

    #[test]
    fn id_of_another_type_is_none() {
        for id in [
            &b"\xa1x"[..],
            b"\xff",
            b"\xc0",
            b"\xcb\0\0\0\0\0\0\0\0",
            b"\xd0\xfe",
        ] {
            let mut body = b"\x82\xa4type\xa4ping\xa2id".to_vec();
            body.extend_from_slice(id);
            assert_eq!(read_head(&body).unwrap().id, None, "{id:?}");
        }
        let body = b"\x82\xa4type\xa4ping\xa2id\xd3\0\0\0\0\0\0\x01\x00";
        assert_eq!(read_head(body).unwrap().id, Some(256));
        let body = b"\x82\xa4type\xa4ping\xa2id\xcf\xff\xff\xff\xff\xff\xff\xff\xff";
        assert_eq!(read_head(body).unwrap().id, Some(u64::MAX));
    }

    #[test]
    fn rejects_what_is_not_a_message() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "past the end"),
            (b"\x91\xa4type", "not a MessagePack map"),
            (b"\x81\x01\xa1x", "key of the message map is not a string"),
            (b"\x81\xa4type\x01", "`type` is not a string"),
            (b"\x81\xa4type\xa2\xff\xfe", "not valid UTF-8"),
            (b"\x81\xa1x\x01", "missing field `type`"),
            (b"\x82\xa4type\xa1x\xa4type\xa1y", "duplicate field `type`"),
            (b"\x81\xa4type\xa1x\x00", "bytes after the end"),
            (b"\x82\xa4type\xa1x\xa1y\xc1", "0xc1"),
            (
                b"\x82\xa4type\xa1x\xa1y\xdd\xff\xff\xff\xff",
                "past the end",
            ),
            (
                b"\x82\xa4type\xa1x\xa1y\xdb\xff\xff\xff\xff",
                "past the end",
            ),
            (
                b"\x82\xa4type\xa1x\xa1y\xc9\xff\xff\xff\xff",
                "past the end",
            ),
        ];
        for (body, want) in cases {
            let got = detail(read_head(body).unwrap_err());
            assert!(got.contains(want), "{body:?}: {got}");
        }
    }

    #[test]
    fn malformed_keeps_what_was_read() {
        let err = read_head(b"\x83\xa2id\x07\xa4type\xa4ping\xa1y\xc1").unwrap_err();
        match err {
            DecodeError::Malformed { type_name, id, .. } => {
                assert_eq!(type_name.as_deref(), Some("ping"));
                assert_eq!(id, Some(7));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn depth_limit_counts_the_message_map() {
        // The message map is level 1, so a field may nest 63 levels.
        assert!(read_head(&with_field(&nested(MAX_DEPTH - 1, 1))).is_ok());
        let err = read_head(&with_field(&nested(MAX_DEPTH, 1))).unwrap_err();
        assert!(detail(err).contains("deeper than 64"));
        // Far beyond the limit: an error, not a stack overflow.
        assert!(read_head(&with_field(&nested(1_000_000, 1))).is_err());
        assert_eq!(skip_value(&nested(MAX_DEPTH, 1)).unwrap(), MAX_DEPTH + 1);
        assert!(skip_value(&nested(MAX_DEPTH + 1, 1)).is_err());
    }

    #[test]
    fn an_envelope_does_not_deepen_its_event() {
        // An event as deep as allowed on its own…
        let mut event = b"\x82\xa4type\xa6custom\xa4data".to_vec();
        event.extend_from_slice(&nested(MAX_DEPTH - 1, 1));
        assert!(read_head(&event).is_ok());
        // …is still fine inside an envelope,
        let mut env = Vec::new();
        encode_event_envelope(1, &event, &mut env);
        assert!(read_head(&env).is_ok());
        assert_eq!(split_envelope(&env).unwrap().event, &event[..]);
        // but an `event` field of any other message counts at its true depth.
        let mut other = b"\x82\xa4type\xa4ping\xa5event".to_vec();
        other.extend_from_slice(&nested(MAX_DEPTH, 1));
        assert!(read_head(&other).is_err());
        let mut other = b"\x82\xa4type\xa4ping\xa5event".to_vec();
        other.extend_from_slice(&nested(MAX_DEPTH - 1, 1));
        assert!(read_head(&other).is_ok());
    }

    /// `split_envelope` and then `read_head` of its event, as one result.
    fn two_walks(body: &[u8]) -> Option<(RawEvent<'_>, &str)> {
        let split = split_envelope(body).ok()?;
        Some((split, read_head(split.event).ok()?.type_name))
    }

    #[test]
    fn one_pass_split_is_the_two_walks() {
        let event = b"\x82\xa4type\xa6custom\xa4data\xc0".to_vec();
        let mut env = Vec::new();
        encode_event_envelope(300, &event, &mut env);
        let (split, type_name) = split_envelope_head(&env).unwrap();
        assert_eq!(
            (split.seq, split.event, type_name),
            (300, &event[..], "custom")
        );

        // The event before the `type`: the two walks, same answer.
        let mut late = b"\x83\xa5event".to_vec();
        late.extend_from_slice(&event);
        late.extend_from_slice(b"\xa3seq\x07\xa4type\xa5event");
        assert_eq!(split_envelope_head(&late).unwrap().1, "custom");

        // An event as deep as allowed, and one level deeper; an event of type "event"
        // whose own `event` is deep; trailing bytes; a key that is not a string; a `type`
        // twice; the envelope cut short anywhere.
        let deep = |levels| {
            let mut e = b"\x82\xa4type\xa6custom\xa4data".to_vec();
            e.extend_from_slice(&nested(levels, 1));
            e
        };
        let mut inner_event = b"\x82\xa4type\xa5event\xa5event".to_vec();
        inner_event.extend_from_slice(&nested(MAX_DEPTH - 1, 1));
        let events = [
            deep(MAX_DEPTH - 1),
            deep(MAX_DEPTH),
            inner_event,
            b"\x81\x01\x02".to_vec(),
            b"\x82\xa4type\xa1a\xa4type\xa1b".to_vec(),
        ];
        let mut bodies = Vec::new();
        for e in &events {
            let mut env = Vec::new();
            encode_event_envelope(1, e, &mut env);
            bodies.push(env);
        }
        let mut trailing = env.clone();
        trailing.push(0xc0);
        bodies.push(trailing);
        for cut in 0..env.len() {
            bodies.push(env[..cut].to_vec());
        }
        for body in &bodies {
            assert_eq!(
                split_envelope_head(body).ok(),
                two_walks(body),
                "{body:02x?}"
            );
        }
        assert!(split_envelope_head(&bodies[0]).is_ok());
        assert!(split_envelope_head(&bodies[1]).is_err());
    }

    #[test]
    fn serde_never_sees_an_over_deep_body() {
        // rmp-serde's own limit (1024) would let this through to a recursive decoder.
        let mut body = b"\x84\xa4type\xabsubmit_task\xa2id\x01\xa7task_id\xa1t\xa5input".to_vec();
        body.extend_from_slice(&nested(500, 1));
        let err = crate::message::ControlToShim::decode(&body).unwrap_err();
        assert!(detail(err).contains("deeper than 64"));
    }

    #[test]
    fn envelope_splice_matches_the_encoder() {
        let events = [
            Event::MessageChunk(MessageChunk {
                task_id: Some("task-1".into()),
                text: "x".repeat(150),
                role: Some("assistant".into()),
                is_final: false,
            }),
            Event::ExecOutput(ExecOutput {
                exec_id: 3,
                stream: OutputStream::Stdout,
                data: bytes::Bytes::from_static(b"\x00\x01binary"),
            }),
        ];
        let seqs = [
            0,
            1,
            0x7f,
            0x80,
            0xff,
            0x100,
            0xffff,
            0x1_0000,
            0xffff_ffff,
            0x1_0000_0000,
            u64::MAX,
        ];
        for event in &events {
            let body = event.to_body().unwrap();
            for seq in seqs {
                let msg = ShimToControl::Event(EventEnvelope {
                    seq,
                    event: event.clone(),
                });
                let mut spliced = bytes::BytesMut::new();
                encode_event_envelope(seq, &body, &mut spliced);
                assert_eq!(&spliced[..], &msg.to_body().unwrap()[..], "seq {seq}");
                assert_eq!(ShimToControl::decode(&spliced).unwrap(), msg);
                assert_eq!(
                    split_envelope(&spliced).unwrap(),
                    RawEvent { seq, event: &body }
                );
                let range = event_body_range(&spliced).unwrap();
                assert_eq!(&spliced[range], &body[..]);
            }
        }
    }

    #[test]
    fn envelope_errors() {
        let ping = b"\x82\xa4type\xa4ping\xa2id\x01";
        assert!(detail(split_envelope(ping).unwrap_err()).contains("not an `event`"));
        let no_seq = b"\x82\xa4type\xa5event\xa5event\x81\xa4type\xa4busy";
        assert!(detail(split_envelope(no_seq).unwrap_err()).contains("missing field `seq`"));
        let bad_seq = b"\x83\xa4type\xa5event\xa3seq\xa1x\xa5event\x81\xa4type\xa4busy";
        assert!(detail(split_envelope(bad_seq).unwrap_err()).contains("`seq`"));
        let no_event = b"\x82\xa4type\xa5event\xa3seq\x01";
        assert!(detail(split_envelope(no_event).unwrap_err()).contains("`event`"));
        // A broken event inside a good envelope is reported against the envelope.
        let bad_inner = b"\x83\xa4type\xa5event\xa3seq\x01\xa5event\x81\xa4type\xa8progress\x80";
        assert!(ShimToControl::decode(bad_inner).is_err());
        let bad_inner = b"\x83\xa4type\xa5event\xa3seq\x01\xa5event\x82\xa4type\xa3log\xa4text\x01";
        match ShimToControl::decode(bad_inner).unwrap_err() {
            DecodeError::Malformed {
                type_name, detail, ..
            } => {
                assert_eq!(type_name.as_deref(), Some("event"));
                assert!(detail.starts_with("event log:"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
        // An unknown event type inside an envelope is not an error.
        let unknown = b"\x83\xa4type\xa5event\xa3seq\x02\xa5event\x81\xa4type\xa3new";
        match ShimToControl::decode(unknown).unwrap() {
            ShimToControl::Event(env) => {
                assert_eq!(env.seq, 2);
                assert!(matches!(env.event, Event::Unknown(u) if u.type_name == "new"));
            }
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
        };
        let mut bytes = crate::message::ControlToShim::SubmitTask(body)
            .to_body()
            .unwrap();
        // One more entry in the fixmap: a `timeout_ms` that is a string.
        bytes[0] += 1;
        bytes.extend_from_slice(b"\xaatimeout_ms\xa2no");
        match crate::message::ControlToShim::decode(&bytes).unwrap_err() {
            DecodeError::Malformed { type_name, id, .. } => {
                assert_eq!(type_name.as_deref(), Some("submit_task"));
                assert_eq!(id, Some(9));
            }
            other => panic!("{other:?}"),
        }
    }
}
