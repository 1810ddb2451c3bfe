//! Reading a message's `type` and `id` without decoding its fields, and checking a body's
//! structure before anything else reads it.
//!
//! Dispatch needs the `type` (and the `id`, so that a rejection can carry `re`) before it
//! knows which struct to decode the fields into. The shim's relay needs more: it stamps every
//! driver event with a `seq` and forwards it to the control plane, and at a million events a
//! second it cannot afford to decode and re-encode each one. This module is the walker for
//! both jobs (over [`mpack`](crate::mpack)'s reader; the [`envelope`](crate::envelope) module
//! builds on it). It never allocates, and it checks a body's structure completely before
//! serde is allowed to see it:
//!
//! - the body is exactly one map (no trailing bytes) whose keys are all strings;
//! - `type` is present once, and is a string;
//! - arrays and maps nest at most [`MAX_DEPTH`] levels (the message's map is level 1);
//! - every length fits in the body, so no later reader can be tricked into reserving memory
//!   for elements that are not there.
//!
//! [`read_head`] returns the `type` and `id`; [`skip_value`] measures one value.
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
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::ops::Range;
use std::str;

use crate::{DecodeError, MAX_DEPTH};

/// The `type` and `id` of a message, read without decoding its other fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head<'a> {
    /// The message's `type`.
    pub type_name: &'a str,
    /// The message's `id` (a [`RequestId`](crate::message::RequestId)), when it has one that
    /// is an unsigned integer. An `id` of any other
    /// type is not an error here: it reads as `None`, and the message's own decoder decides.
    pub id: Option<u64>,
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

/// What [`walk`] learned about a body's top-level map.
pub(crate) struct TopLevel<'a> {
    pub(crate) type_name: &'a str,
    pub(crate) id: Option<u64>,
    /// The `seq`, when there is one and it is a uint.
    pub(crate) seq: Option<u64>,
    /// Whether a `seq` key was seen.
    pub(crate) seq_seen: bool,
    /// Where the `event` field's value is.
    pub(crate) event: Option<Range<usize>>,
}

/// Checks a whole body and reads the fields the envelope logic needs.
pub(crate) fn walk(body: &[u8]) -> Result<TopLevel<'_>, DecodeError> {
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
pub(crate) fn walk_map<'a>(
    cur: &mut Cursor<'a>,
    event_head: bool,
) -> Result<(TopLevel<'a>, Option<&'a str>), DecodeError> {
    let mut type_name = None;
    let mut id = None;
    let fail = |fail: Fail, type_name: Option<&str>, id: Option<u64>| {
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

pub(crate) struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

// The small readers are `inline(always)`: the shim is built for size (opt-level "z"), which
// otherwise leaves these one-liners as calls on its per-event path; inlined, they leave the
// static binary's size as it was (886,408 bytes either way).
impl<'a> Cursor<'a> {
    /// A cursor at the start of `buf`.
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Whether every byte was read.
    pub(crate) fn at_end(&self) -> bool {
        self.pos == self.buf.len()
    }

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
}
