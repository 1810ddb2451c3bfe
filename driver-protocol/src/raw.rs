//! Reading a message's `type` and `id` without decoding its fields, and checking a body's
//! structure before anything else reads it.
//!
//! Dispatch needs the `type` (and the `id`, so that a rejection can carry `re`) before it
//! knows which struct to decode the fields into. The shim's relay needs more: it stamps every
//! driver event with a `seq` and forwards it to the control plane, and at a million events a
//! second it cannot afford to decode and re-encode each one. This module is the walker for
//! both jobs (over the crate's one MessagePack reader; the [`envelope`](crate::envelope) module
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

use crate::mpack::{is, is_ascii, same, utf8_str, Cursor, Fail, Token};
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
    let mut cur = Cursor::new(buf);
    cur.skip_value(1)
        .map_err(|fail| DecodeError::malformed(None, None, fail.detail()))?;
    Ok(cur.pos)
}

/// A large message's `data` binary taken out of its body, so that the message is decoded
/// from a few bytes and its `data` is a slice of the frame that carried it, not a copy.
///
/// Returns the body with that binary made empty (`bin 8` of length 0), and the range of the
/// binary's bytes in `body`. `None` (nothing taken) unless `body` is one map with string keys
/// holding one `data` key whose value is a binary; the caller then decodes the body as it
/// is. Decoding the returned body gives the message the whole body gives, but for an empty
/// `data`, which the caller sets to `body[range]`.
pub fn take_data(body: &[u8]) -> Option<(Vec<u8>, Range<usize>)> {
    let mut cur = Cursor::new(body);
    let entries = cur.map_len().ok()?;
    let mut found = None;
    for _ in 0..entries {
        let key = cur.key().ok()?;
        if key == b"data" {
            let at = cur.pos;
            let Ok(Token::Bin(data)) = cur.token() else {
                return None;
            };
            if found.is_some() {
                return None;
            }
            let start = cur.pos.checked_sub(data.len())?;
            found = Some((at, start..cur.pos));
        } else {
            cur.skip_value(2).ok()?;
        }
    }
    let (at, range) = found?;
    if cur.pos != body.len() {
        return None;
    }
    let mut small = Vec::with_capacity(body.len() - range.len() + 2);
    small.extend_from_slice(body.get(..at)?);
    small.extend_from_slice(&[0xc4, 0]);
    small.extend_from_slice(body.get(range.end..)?);
    Some((small, range))
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
    let mut cur = Cursor::new(body);
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
        if event_head
            && event.is_none()
            && is(key, b"event")
            && type_name.is_some_and(|t| is(t.as_bytes(), b"event"))
        {
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
            // (Compared with `is`, not matched: a match on byte strings calls `memcmp`.)
            if is(key, b"type") {
                if type_name.is_some() {
                    return Err(Fail::DuplicateType);
                }
                type_name = Some(cur.type_str()?);
            } else if id.is_none() && is(key, b"id") {
                id = cur.uint_or_skip()?;
            } else if !seq_seen && is(key, b"seq") {
                seq_seen = true;
                seq = cur.uint_or_skip()?;
            } else if is(key, b"event") {
                if event.is_some() {
                    return Err(Fail::DuplicateEvent);
                }
                // An envelope's event is a message of its own: it counts its depth from
                // its own map, so relaying never makes an event too deep. Any other
                // message's `event` field is re-checked at its true depth below.
                let start = cur.pos;
                cur.skip_value(1)?;
                event = Some(start..cur.pos);
            } else {
                cur.skip_value(2)?;
            }
            Ok(())
        })();
        step.map_err(|f| fail(f, type_name, id))?;
    }
    let Some(type_name) = type_name else {
        return Err(fail(Fail::MissingType, None, id));
    };
    if !is(type_name.as_bytes(), b"event") {
        if let Some(range) = &event {
            let inner = cur.buf.get(range.clone()).unwrap_or_default();
            Cursor::new(inner)
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

/// What a field of a relayable event holds in the plain shapes [`plain_fields`] accepts:
/// each one a shape its typed decoder takes (see [`crate::check`]).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Field {
    /// A UTF-8 string.
    Str,
    /// Nil or a UTF-8 string.
    OptStr,
    /// Nil or a UTF-8 string: the task the event names, which the scan hands back.
    TaskId,
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
/// `task_id` gets the value of a [`Field::TaskId`] that is a string (its UTF-8 bytes).
pub(crate) fn plain_fields<'a>(
    body: &'a [u8],
    fields: Fields,
    task_id: &mut Option<&'a [u8]>,
) -> bool {
    let mut cur = Cursor::new(body);
    let scanned = cur
        .map_len()
        .and_then(|n| cur.scan_fields(n, fields, false, task_id));
    matches!(scanned, Ok(true)) && cur.pos == body.len()
}

/// [`read_head`] and then [`plain_fields`] in one pass, for the usual body whose first key
/// is its `type` (a fixstr): the type, when `fields_of` knows that type (its name, equal to
/// the body's, and its fields), the body is well formed and every field is in its plain
/// shape. `None` means "not sure": the caller then takes the two passes (which also handle
/// a `type` that is not the first key).
///
/// Neither the `type` key nor the name needs a UTF-8 check: the key is compared with its
/// bytes, and a name `fields_of` knows is one of its own `&'static str`s.
pub(crate) fn plain_event<'a>(
    body: &'a [u8],
    fields_of: impl Fn(&[u8]) -> Option<(&'static str, Fields)>,
    task_id: &mut Option<&'a [u8]>,
) -> Option<&'static str> {
    let mut cur = Cursor::new(body);
    let entries = cur.map_len().ok()?;
    if entries == 0 || !is(cur.take(5).ok()?, b"\xa4type") {
        return None;
    }
    let (type_name, fields) = fields_of(cur.str_bytes().ok()??)?;
    let plain = cur.scan_fields(entries - 1, fields, true, task_id).ok()? && cur.pos == body.len();
    plain.then_some(type_name)
}

/// Whether `b` is UTF-8; ASCII, the usual case for keys and names, without a full decode.
#[inline(always)]
fn is_utf8(b: &[u8]) -> bool {
    is_ascii(b) || str::from_utf8(b).is_ok()
}

/// A container's element count as a `usize` (a count that does not fit cannot fit in the
/// body either: the walk ends with `Eof`).
#[inline(always)]
fn count(n: u32) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

// The walker's readers, on the shared MessagePack cursor.
impl<'a> Cursor<'a> {
    /// Skips one value; `level` is the nesting level it has if it is an array or a map.
    fn skip_value(&mut self, level: usize) -> Result<(), Fail> {
        match self.token()? {
            Token::Array(n) => self.skip_array(count(n), level),
            Token::Map(n) => self.skip_map(count(n), level),
            _ => Ok(()),
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

    /// Reads a value of shape `kind` (see [`Field`]): `Ok(false)` when it has another one.
    fn plain(&mut self, kind: Field) -> Result<bool, Fail> {
        let nil = self.peek_byte()? == 0xc0;
        match kind {
            Field::OptStr | Field::TaskId | Field::Flag | Field::OptUint if nil => {
                self.pos += 1;
                Ok(true)
            }
            Field::Str | Field::OptStr | Field::TaskId => self.utf8(),
            // Equal bytes: the string is one of the names, and so UTF-8.
            Field::OneOf(names) => Ok(self
                .str_bytes()?
                .is_some_and(|b| names.iter().any(|n| same(n.as_bytes(), b)))),
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

    /// Reads a [`Field::TaskId`]: whether it is nil or a UTF-8 string, which `task_id` gets.
    #[inline(always)]
    fn task_id(&mut self, task_id: &mut Option<&'a [u8]>) -> Result<bool, Fail> {
        if self.peek_byte()? == 0xc0 {
            self.pos += 1;
            return Ok(true);
        }
        match self.str_bytes()? {
            Some(b) if is_utf8(b) => {
                *task_id = Some(b);
                Ok(true)
            }
            _ => Ok(false),
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
        // Values per entry: 2 in a map, 1 in an array.
        let (n, per) = match self.token()? {
            Token::Str(b) => return Ok(is_utf8(b)),
            Token::Ext(..) => return Ok(false),
            Token::Array(n) => (count(n), 1),
            Token::Map(n) => (count(n), 2),
            _ => return Ok(true),
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
        task_id: &mut Option<&'a [u8]>,
    ) -> Result<bool, Fail> {
        let mut seen = 0u32;
        for _ in 0..entries {
            let key = self.str_bytes()?.ok_or(Fail::KeyNotStr)?;
            if is(key, b"type") {
                if checking_keys {
                    return Ok(false);
                }
                self.skip_value(2)?;
                continue;
            }
            let index = fields
                .iter()
                .position(|(name, ..)| same(name.as_bytes(), key));
            // A key equal to a field's name is UTF-8 (and neither `type` nor `event`).
            if checking_keys && index.is_none() && (is(key, b"event") || !is_utf8(key)) {
                return Ok(false);
            }
            let plain = match index {
                Some(i) => {
                    let bit = 1u32.checked_shl(i as u32).unwrap_or(0);
                    if bit == 0 || seen & bit != 0 {
                        return Ok(false);
                    }
                    seen |= bit;
                    match fields.get(i) {
                        Some(&(_, Field::TaskId, _)) => self.task_id(task_id)?,
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
        utf8_str(bytes).ok_or(Fail::TypeNotUtf8)
    }

    /// Reads a top-level field's value as a non-negative integer; any other value is skipped
    /// and reads as `None`.
    fn uint_or_skip(&mut self) -> Result<Option<u64>, Fail> {
        Ok(match self.token()? {
            Token::Uint(n) => Some(n),
            Token::Int(n) => u64::try_from(n).ok(),
            Token::Array(n) => self.skip_array(count(n), 2).map(|()| None)?,
            Token::Map(n) => self.skip_map(count(n), 2).map(|()| None)?,
            _ => None,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `levels` nested one-element arrays around `leaf`.
    pub(crate) fn nested(levels: usize, leaf: u8) -> Vec<u8> {
        let mut v = vec![0x91; levels];
        v.push(leaf);
        v
    }

    /// A message decoded from the body [`take_data`] leaves, its `data` set to the range it
    /// gives, is the message the whole body decodes to; bodies it cannot take apart are left.
    #[test]
    fn data_taken_out_decodes_to_the_same_message() {
        use crate::message::{ControlToShim, FsData, FsWriteData, ShimToControl};
        use crate::Message as _;
        let data = bytes::Bytes::from((0..70_000u32).map(|i| i as u8).collect::<Vec<_>>());
        let up = ControlToShim::FsWriteData(FsWriteData {
            id: 7,
            handle: 1 << 40,
            offset: 3,
            data: data.clone(),
        });
        let body = up.to_body().unwrap();
        let (small, range) = take_data(&body).unwrap();
        assert!(small.len() < 100);
        let mut back = ControlToShim::decode(&small).unwrap();
        if let ControlToShim::FsWriteData(m) = &mut back {
            assert!(m.data.is_empty());
            m.data = bytes::Bytes::copy_from_slice(&body[range]);
        }
        assert_eq!(format!("{back:?}"), format!("{up:?}"));
        let down = ShimToControl::FsData(FsData {
            re: 9,
            offset: 1 << 33,
            data,
            eof: true,
        });
        let body = down.to_body().unwrap();
        let (small, range) = take_data(&body).unwrap();
        let mut back = ShimToControl::decode(&small).unwrap();
        if let ShimToControl::FsData(m) = &mut back {
            m.data = bytes::Bytes::copy_from_slice(&body[range]);
        }
        assert_eq!(format!("{back:?}"), format!("{down:?}"));
        // An unknown field after `data` stays; nil, a string, two `data`s, trailing bytes, a
        // cut body: nothing taken.
        let mut extra = b"\x83\xa4type\xa1x\xa4data\xc4\x02ab\xa1z\x91\x01".to_vec();
        let (small, range) = take_data(&extra).unwrap();
        assert_eq!(small, b"\x83\xa4type\xa1x\xa4data\xc4\x00\xa1z\x91\x01");
        assert_eq!(&extra[range], b"ab");
        extra.push(0);
        assert!(take_data(&extra).is_none());
        assert!(take_data(b"\x82\xa4type\xa1x\xa4data\xc0").is_none());
        assert!(take_data(b"\x82\xa4type\xa1x\xa4data\xa2ab").is_none());
        assert!(take_data(b"\x83\xa4type\xa1x\xa4data\xc4\x00\xa4data\xc4\x00").is_none());
        assert!(take_data(b"\x82\xa4type\xa1x\xa4data\xc4\x05ab").is_none());
        assert!(take_data(b"\x81\xa4type\xa1x").is_none());
    }

    /// `{type: "x", deep: <value>}`
    fn with_field(value: &[u8]) -> Vec<u8> {
        let mut body = b"\x82\xa4type\xa1x\xa4deep".to_vec();
        body.extend_from_slice(value);
        body
    }

    /// The text of a malformed error.
    pub(crate) fn detail(e: DecodeError) -> String {
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
