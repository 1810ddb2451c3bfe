//! A small serde deserializer over a message body that [`crate::raw`] has already checked,
//! reading through the crate's one MessagePack reader ([`crate::mpack`]).
//!
//! It reads MessagePack exactly as `rmp_serde::from_slice` does for the message structs (the
//! same visits for the same bytes: structs from maps or arrays, enums from a variant name or
//! a one-entry map, nil as `None`, invalid UTF-8 strings offered as bytes, ext values as a
//! `(tag, data)` newtype), but the reading itself is one non-generic function: only a thin
//! dispatch on the decoded token is instantiated per visitor, which keeps the shim's binary
//! small. The body's structure (lengths within bounds, nesting depth, no reserved marker) is
//! checked before this runs; every read is still bounds-checked and fails cleanly.

use std::fmt;
use std::str;

use serde::de::{self, DeserializeSeed, IntoDeserializer, Visitor};

use crate::mpack::{Cursor, Fail, Token};

/// Why the fields of a message did not decode.
#[derive(Debug)]
pub(crate) struct Error(String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl de::Error for Error {
    #[cold]
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Self(msg.to_string())
    }
}

#[cold]
fn fail(detail: &str) -> Error {
    Error(detail.to_owned())
}

/// A failed read of the body (which the walk has checked, so only a bug gets here).
#[cold]
fn read_fail(fail_: Fail) -> Error {
    match fail_ {
        Fail::Reserved => fail("invalid MessagePack marker 0xc1"),
        _ => fail("unexpected end of MessagePack data"),
    }
}

/// Deserializes `T` from a MessagePack body.
pub(crate) fn from_slice<'de, T: de::Deserialize<'de>>(body: &'de [u8]) -> Result<T, Error> {
    T::deserialize(&mut Deserializer {
        cur: Cursor::new(body),
        byte: false,
    })
}

struct Deserializer<'de> {
    cur: Cursor<'de>,
    /// Reading one byte of a binary offered as a sequence: rmp_serde offers it to every
    /// `deserialize_*` as a plain integer (no option, enum or newtype).
    byte: bool,
}

impl<'de> Deserializer<'de> {
    fn peek_byte(&self) -> Option<u8> {
        self.cur.peek_byte().ok()
    }

    /// Reads the next value's head (and, for strings, binaries and exts, its data).
    #[inline(never)]
    fn next(&mut self) -> Result<Token<'de>, Error> {
        self.cur.token().map_err(read_fail)
    }

    /// What `rmp_serde` does for `deserialize_any` (`allow_bytes`) and for sequences, tuples
    /// and structs (a binary is then offered as a sequence of bytes).
    fn any<V: Visitor<'de>>(&mut self, visitor: V, allow_bytes: bool) -> Result<V::Value, Error> {
        match self.next()? {
            Token::Nil => visitor.visit_unit(),
            Token::Bool(b) => visitor.visit_bool(b),
            Token::Uint(n) => visitor.visit_u64(n),
            Token::Int(n) => visitor.visit_i64(n),
            Token::F32(x) => visitor.visit_f32(x),
            Token::F64(x) => visitor.visit_f64(x),
            Token::Str(bytes) => match str::from_utf8(bytes) {
                Ok(s) => visitor.visit_borrowed_str(s),
                // Like rmp_serde: invalid UTF-8 may still be read as bytes.
                Err(e) => visitor
                    .visit_borrowed_bytes::<Error>(bytes)
                    .map_err(|_| de::Error::custom(e)),
            },
            Token::Bin(bytes) if allow_bytes => visitor.visit_borrowed_bytes(bytes),
            Token::Bin(bytes) => self.bytes_as_seq(bytes, visitor),
            Token::Array(len) => self.seq(len, visitor),
            Token::Map(len) => self.map(len, visitor),
            Token::Ext(tag, data) => visitor.visit_newtype_struct(Ext {
                tag: Some(tag),
                data: Some(data),
            }),
        }
    }

    fn seq<V: Visitor<'de>>(&mut self, len: u32, visitor: V) -> Result<V::Value, Error> {
        let mut access = Compound {
            de: self,
            left: len,
            bytes: None,
        };
        let value = visitor.visit_seq(&mut access)?;
        access.finish(len, value)
    }

    fn map<V: Visitor<'de>>(&mut self, len: u32, visitor: V) -> Result<V::Value, Error> {
        let mut access = Compound {
            de: self,
            left: len,
            bytes: None,
        };
        let value = visitor.visit_map(&mut access)?;
        access.finish(len, value)
    }

    /// A binary where a sequence is expected: its bytes as unsigned integers, as rmp_serde
    /// offers them. Each byte is read through a deserializer of this same type (from its
    /// MessagePack encoding in [`BYTES`]), so no second copy of the visitor's code is needed.
    fn bytes_as_seq<V: Visitor<'de>>(
        &mut self,
        bytes: &'de [u8],
        visitor: V,
    ) -> Result<V::Value, Error> {
        let mut encoded = Deserializer {
            cur: Cursor::new(&[]),
            byte: true,
        };
        let mut access = Compound {
            de: &mut encoded,
            left: 0,
            bytes: Some(bytes.iter()),
        };
        // Unlike arrays, rmp_serde does not check that every byte was read (`left` stays 0).
        let value = visitor.visit_seq(&mut access)?;
        access.finish(0, value)
    }

    /// A byte of a binary offered as a sequence, to an option, enum or newtype visitor:
    /// rmp_serde offers it as an integer, which such visitors refuse.
    #[cold]
    fn refuse_byte<V: Visitor<'de>>(&mut self, visitor: &V) -> Error {
        match self.next() {
            Ok(token) => Self::refuse(token, visitor),
            Err(e) => e,
        }
    }

    /// For visitors that accept only a few kinds of value: anything else is refused exactly
    /// as the visitor's default `visit_*` method would refuse it, without instantiating them.
    #[cold]
    fn refuse<V: Visitor<'de>>(token: Token<'de>, visitor: &V) -> Error {
        de::Error::invalid_type(token.unexpected(), visitor)
    }
}

/// The MessagePack encoding of every byte value as an unsigned integer: `[b]` below 0x80,
/// `[0xcc, b]` above.
static BYTES: [[u8; 2]; 256] = {
    let mut table = [[0u8; 2]; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = if b < 0x80 {
            [b as u8, 0]
        } else {
            [0xcc, b as u8]
        };
        b += 1;
    }
    table
};

// How serde names a token's kind in an "invalid type" error.
impl Token<'_> {
    fn unexpected(&self) -> de::Unexpected<'_> {
        use de::Unexpected as U;
        match *self {
            Token::Nil => U::Unit,
            Token::Bool(b) => U::Bool(b),
            Token::Uint(n) => U::Unsigned(n),
            Token::Int(n) => U::Signed(n),
            Token::F32(x) => U::Float(x.into()),
            Token::F64(x) => U::Float(x),
            Token::Str(b) => match str::from_utf8(b) {
                Ok(s) => U::Str(s),
                Err(_) => U::Bytes(b),
            },
            Token::Bin(b) => U::Bytes(b),
            Token::Array(_) => U::Seq,
            Token::Map(_) => U::Map,
            Token::Ext(..) => U::NewtypeStruct,
        }
    }
}

/// The elements of an array, or the entries of a map.
struct Compound<'a, 'de> {
    de: &'a mut Deserializer<'de>,
    left: u32,
    /// The bytes of a binary read as a sequence; `de` then reads each one's encoding.
    bytes: Option<std::slice::Iter<'de, u8>>,
}

impl Compound<'_, '_> {
    fn finish<T>(&self, len: u32, value: T) -> Result<T, Error> {
        match self.left {
            0 => Ok(value),
            left => Err(de::Error::custom(format_args!(
                "array or map had {len} elements but only {} were read",
                len - left
            ))),
        }
    }
}

impl<'de> de::SeqAccess<'de> for Compound<'_, 'de> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        if let Some(bytes) = &mut self.bytes {
            let Some(&b) = bytes.next() else {
                return Ok(None);
            };
            let encoded: &'static [u8; 2] = &BYTES[usize::from(b)];
            self.de.cur = Cursor::new(&encoded[..if b < 0x80 { 1 } else { 2 }]);
        } else if self.left == 0 {
            return Ok(None);
        } else {
            self.left -= 1;
        }
        seed.deserialize(&mut *self.de).map(Some)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(match &self.bytes {
            Some(bytes) => bytes.len(),
            None => self.left as usize,
        })
    }
}

impl<'de> de::MapAccess<'de> for Compound<'_, 'de> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        seed.deserialize(&mut *self.de).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        seed.deserialize(&mut *self.de)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.left as usize)
    }
}

/// An ext value, offered as rmp_serde offers it: a newtype whose content is the sequence
/// `(tag: i8, data: bytes)`.
struct Ext<'de> {
    tag: Option<i8>,
    data: Option<&'de [u8]>,
}

impl<'de> de::Deserializer<'de> for Ext<'de> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(mut self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_seq(&mut self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum
        identifier ignored_any
    }
}

impl<'de> de::SeqAccess<'de> for Ext<'de> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        if let Some(tag) = self.tag.take() {
            return seed.deserialize(tag.into_deserializer()).map(Some);
        }
        match self.data.take() {
            Some(data) => seed
                .deserialize(de::value::BorrowedBytesDeserializer::new(data))
                .map(Some),
            None => Ok(None),
        }
    }
}

/// An enum: written as a one-entry map (or array), the variant then its content
/// (`wrapped`); or written as just its variant.
struct Variant<'a, 'de> {
    de: &'a mut Deserializer<'de>,
    wrapped: bool,
}

impl<'de> de::EnumAccess<'de> for Variant<'_, 'de> {
    type Error = Error;
    type Variant = Self;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Self), Error> {
        Ok((seed.deserialize(&mut *self.de)?, self))
    }
}

impl<'de> de::VariantAccess<'de> for Variant<'_, 'de> {
    type Error = Error;

    fn unit_variant(self) -> Result<(), Error> {
        if !self.wrapped {
            return Ok(());
        }
        match self.de.next()? {
            Token::Nil => Ok(()),
            _ => Err(fail("expected nil for a unit variant")),
        }
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, Error> {
        seed.deserialize(self.de)
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, Error> {
        self.de.any(visitor, false)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.de.any(visitor, false)
    }
}

impl<'de> de::Deserializer<'de> for &mut Deserializer<'de> {
    type Error = Error;

    fn is_human_readable(&self) -> bool {
        false
    }

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.any(visitor, true)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        if self.byte {
            Err(self.refuse_byte(&visitor))
        } else if self.peek_byte() == Some(0xc0) {
            self.cur.pos += 1;
            visitor.visit_none()
        } else {
            visitor.visit_some(self)
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        match self.peek_byte() {
            _ if self.byte => Err(self.refuse_byte(&visitor)),
            Some(0x80..=0x9f | 0xdc..=0xdf) => match self.next()? {
                Token::Array(1) | Token::Map(1) => visitor.visit_enum(Variant {
                    de: self,
                    wrapped: true,
                }),
                Token::Array(n) | Token::Map(n) => Err(de::Error::custom(format_args!(
                    "enum: expected one entry, got {n}"
                ))),
                _ => Err(fail("enum: unexpected token")),
            },
            _ => visitor.visit_enum(Variant {
                de: self,
                wrapped: false,
            }),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        if self.byte {
            return Err(self.refuse_byte(&visitor));
        }
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        match self.peek_byte() {
            Some(0xc0 | 0x90) => {
                self.cur.pos += 1;
                visitor.visit_unit()
            }
            _ => self.any(visitor, true),
        }
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.any(visitor, false)
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.any(visitor, false)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.any(visitor, false)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        // A derived struct visitor accepts only sequences and maps.
        match self.next()? {
            Token::Array(len) => self.seq(len, visitor),
            Token::Map(len) => self.map(len, visitor),
            Token::Bin(bytes) => self.bytes_as_seq(bytes, visitor),
            token => Err(Deserializer::refuse(token, &visitor)),
        }
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        // A derived field or variant visitor accepts only strings, bytes and indices.
        match self.next()? {
            Token::Str(bytes) => match str::from_utf8(bytes) {
                Ok(s) => visitor.visit_borrowed_str(s),
                Err(e) => visitor
                    .visit_borrowed_bytes::<Error>(bytes)
                    .map_err(|_| de::Error::custom(e)),
            },
            Token::Bin(bytes) => visitor.visit_borrowed_bytes(bytes),
            Token::Uint(n) => visitor.visit_u64(n),
            token => Err(Deserializer::refuse(token, &visitor)),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit map ignored_any
    }
}

#[cfg(test)]
mod tests {
    use std::fmt::Debug;

    use serde::de::DeserializeOwned;

    use crate::message::*;

    /// Odd but well-formed MessagePack values, raw.
    const VALUES: &[&[u8]] = &[
        b"\xc0",
        b"\xc2",
        b"\xc3",
        b"\x05",
        b"\xcc\xc8",
        b"\xcd\x01\x2c",
        b"\xce\x00\x01\x00\x00",
        b"\xcf\x00\x00\x00\x01\x00\x00\x00\x00",
        b"\xfb",
        b"\xd0\x05",
        b"\xd0\xfb",
        b"\xd1\xfe\xd4",
        b"\xd3\xff\xff\xff\xff\xff\xff\xff\xff",
        b"\xca\x3f\xc0\x00\x00",
        b"\xcb\x40\x04\x00\x00\x00\x00\x00\x00",
        b"\xa0",
        b"\xa1x",
        b"\xa6driver",
        b"\xa4exec",
        b"\xa3TERM",
        b"\xd9\x02\xff\xfe",
        b"\xa2\xc3\x28",
        b"\xc4\x00",
        b"\xc4\x02\x01\x02",
        b"\xc4\x01\xc8",
        b"\xc4\x03\x01\x02\x03",
        b"\xc5\x00\x01\x07",
        b"\x90",
        b"\x91\x01",
        b"\x92\x01\x02",
        b"\x93\x01\x02\x03",
        b"\x92\xa1a\xa1b",
        b"\x91\xa6driver",
        b"\xdc\x00\x02\x18\x50",
        b"\x80",
        b"\x81\xa6driver\xc0",
        b"\x81\xa6stdout\x01",
        b"\x82\xa4rows\x18\xa4cols\x50",
        b"\x82\xa4rows\x18\xa4cols\xc0",
        b"\x81\xa1A\xa1b",
        b"\x81\xa1A\x01",
        b"\x81\x01\x02",
        b"\x82\xa1k\x01\xa1k\x02",
        b"\xde\x00\x01\xa1k\x01",
        b"\xd4\x05\x01",
        b"\xd5\xff\x01\x02",
        b"\xc7\x03\x07\x01\x02\x03",
        b"\x92\xd4\x05\x01\x81\xa1a\x90",
    ];

    /// A map body with `fields` (raw key and value bytes).
    fn body(fields: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = vec![0xde];
        out.extend_from_slice(&(fields.len() as u16).to_be_bytes());
        for (k, v) in fields {
            out.push(0xd9);
            out.push(k.len() as u8);
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(v);
        }
        out
    }

    /// Every field of `base` replaced in turn by every value of [`VALUES`], and dropped: this
    /// deserializer and rmp_serde must agree on each (same value, or both an error).
    fn agrees<T: DeserializeOwned + PartialEq + Debug>(base: &[(&str, &[u8])]) {
        let mut cases = vec![body(base)];
        for i in 0..base.len() {
            for v in VALUES {
                let mut fields = base.to_vec();
                fields[i].1 = v;
                cases.push(body(&fields));
            }
            let mut fields = base.to_vec();
            fields.remove(i);
            cases.push(body(&fields));
        }
        for v in VALUES {
            let mut fields = base.to_vec();
            fields.push(("extra", v));
            cases.push(body(&fields));
            cases.push(v.to_vec());
        }
        for case in cases {
            let ours = super::from_slice::<T>(&case);
            let theirs = rmp_serde::from_slice::<T>(&case);
            match (&ours, &theirs) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "{case:02x?}"),
                (Err(_), Err(_)) => {}
                _ => panic!("{case:02x?}: ours {ours:?}, rmp_serde {theirs:?}"),
            }
        }
    }

    #[test]
    fn agrees_with_rmp_serde_on_every_incoming_struct() {
        let any = b"\x81\xa1a\x92\x01\xa1b".as_slice();
        agrees::<Hello>(&[
            ("type", b"\xa5hello"),
            ("protocol", b"\xa1p"),
            ("versions", b"\x91\x01"),
            ("role", b"\xa6driver"),
            ("software", b"\xa1s"),
            ("software_version", b"\xa11"),
            ("capabilities", b"\x91\xa1c"),
            ("agent_id", b"\xa1a"),
            ("nonce", b"\xc4\x01\x09"),
        ]);
        agrees::<Auth>(&[("mac", b"\xc4\x01\x09")]);
        agrees::<Ready>(&[("re", b"\x01")]);
        agrees::<Paused>(&[("re", b"\x01")]);
        agrees::<Busy>(&[]);
        agrees::<Ping>(&[("id", b"\x01")]);
        agrees::<Pong>(&[("re", b"\x01")]);
        agrees::<OkReply>(&[("re", b"\x01")]);
        agrees::<ErrorMsg>(&[
            ("re", b"\x01"),
            ("code", b"\xa7invalid"),
            ("message", b"\xa1m"),
            ("task_id", b"\xa1t"),
        ]);
        agrees::<TaskDone>(&[
            ("task_id", b"\xa1t"),
            ("status", b"\xa6failed"),
            ("output", any),
            ("error", b"\xa1e"),
        ]);
        agrees::<MessageChunk>(&[
            ("task_id", b"\xa1t"),
            ("text", b"\xa1x"),
            ("role", b"\xa1r"),
            ("final", b"\xc3"),
        ]);
        agrees::<ToolCall>(&[
            ("task_id", b"\xa1t"),
            ("call_id", b"\xa1c"),
            ("name", b"\xa1n"),
            ("input", any),
        ]);
        agrees::<ToolResult>(&[
            ("task_id", b"\xa1t"),
            ("call_id", b"\xa1c"),
            ("output", any),
            ("is_error", b"\xc3"),
        ]);
        agrees::<FileChange>(&[
            ("path", b"\xa1p"),
            ("change", b"\xa7renamed"),
            ("from", b"\xa1f"),
        ]);
        agrees::<Progress>(&[("message", b"\xa1m"), ("done", b"\x01"), ("total", b"\x02")]);
        agrees::<Log>(&[
            ("stream", b"\xa6stderr"),
            ("level", b"\xa4warn"),
            ("text", b"\xa1x"),
            ("truncated", b"\xc3"),
        ]);
        agrees::<Custom>(&[("kind", b"\xa1k"), ("data", any)]);
        agrees::<Exec>(&[
            ("id", b"\x03"),
            ("argv", b"\x92\xa2sh\xa2-c"),
            ("env", b"\x81\xa1A\xa1b"),
            ("cwd", b"\xa1/"),
            ("user", b"\xa10"),
            ("tty", b"\x82\xa4rows\x18\xa4cols\x50"),
            ("stdin", b"\xc3"),
            ("timeout_ms", b"\xcd\x03\xe8"),
            ("output_cap", b"\x10"),
            ("task_id", b"\xa1t"),
        ]);
        agrees::<ExecInput>(&[
            ("exec_id", b"\x01"),
            ("data", b"\xc4\x02\x01\x02"),
            ("eof", b"\xc3"),
        ]);
        agrees::<ExecResize>(&[("exec_id", b"\x01"), ("rows", b"\x18"), ("cols", b"\x50")]);
        agrees::<ExecSignal>(&[("exec_id", b"\x01"), ("signal", b"\xa3INT")]);
        agrees::<SubmitTask>(&[
            ("id", b"\x01"),
            ("task_id", b"\xa1t"),
            ("input", any),
            ("output_schema", any),
            ("timeout_ms", b"\x01"),
            ("redeliver", b"\xc3"),
        ]);
        agrees::<CancelTask>(&[
            ("id", b"\x01"),
            ("task_id", b"\xa1t"),
            ("grace_ms", b"\x01"),
        ]);
        agrees::<Pause>(&[("id", b"\x01"), ("timeout_ms", b"\x01")]);
        agrees::<Resume>(&[("id", b"\x01"), ("slept_ms", b"\x01")]);
        agrees::<Signal>(&[
            ("id", b"\x01"),
            ("signal", b"\xa3INT"),
            ("target", b"\xa4exec"),
            ("exec_id", b"\x01"),
        ]);
        agrees::<RestartDriver>(&[("id", b"\x01")]);
        agrees::<SetDriver>(&[
            ("id", b"\x01"),
            ("argv", b"\x91\xa2sh"),
            ("env", b"\x81\xa1A\xa1b"),
        ]);
        agrees::<Status>(&[("id", b"\x01")]);
        agrees::<Shutdown>(&[("id", b"\x01"), ("grace_ms", b"\x01"), ("reason", b"\xa1r")]);
        agrees::<Ack>(&[("seq", b"\x01")]);
        agrees::<ResumeFrom>(&[("seq", b"\x01")]);
        agrees::<Task>(&[
            ("task_id", b"\xa1t"),
            ("input", any),
            ("output_schema", any),
            ("timeout_ms", b"\x01"),
            ("attempt", b"\x02"),
        ]);
        agrees::<StateChanged>(&[("from", b"\xa5ready"), ("to", b"\xa6paused")]);
        agrees::<ExecExit>(&[
            ("exec_id", b"\x01"),
            ("code", b"\xff"),
            ("signal", b"\xa4KILL"),
            ("timed_out", b"\xc3"),
            ("truncated", b"\xc2"),
            ("duration_ms", b"\x05"),
        ]);
    }
}
