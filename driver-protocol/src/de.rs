//! A small serde deserializer over a message body that [`crate::raw`] has already checked,
//! reading through the crate's one MessagePack reader ([`crate::mpack`]).
//!
//! It reads MessagePack exactly as `rmp_serde::from_slice` does for the message structs (the
//! same visits for the same bytes: structs from maps or arrays, enums from a variant name or
//! a one-entry map, nil as `None`, invalid UTF-8 strings offered as bytes, ext values as a
//! `(tag, data)` newtype), but the reading itself is one non-generic function: only a thin
//! dispatch on the decoded token is instantiated per visitor, which keeps the shim's binary
//! small. The message structs themselves are not read through their derived visitors but
//! through [`Deserializer::read_struct`], one loop over a table of field names for every
//! struct ([`Fields`], implemented by `message::fields!`); only the fields' values go through
//! serde. The body's structure (lengths within bounds, nesting depth, no reserved marker) is
//! checked before this runs; every read is still bounds-checked and fails cleanly.

use std::fmt;
use std::str;

use serde::de::{self, Deserialize as _, DeserializeSeed, IntoDeserializer, Visitor};

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
#[cfg(test)]
pub(crate) fn from_slice<'de, T: de::Deserialize<'de>>(body: &'de [u8]) -> Result<T, Error> {
    T::deserialize(&mut Deserializer::new(body))
}

/// Reads a message struct ([`Fields`]) from a MessagePack body.
pub(crate) fn read_fields<T: Fields>(body: &[u8]) -> Result<T, Error> {
    T::read(&mut Deserializer::new(body))
}

/// A struct read by one shared loop ([`Deserializer::read_struct`]) over a table of its field
/// names, instead of the visitor `#[derive(Deserialize)]` generates for each struct: the
/// message decoders' code is then one small function per message type. Implemented with the
/// [`fields!`](crate::message) macro, which reads exactly as the derive does (the struct's
/// serde attributes and its `fields!` line must say the same; the tests hold every message
/// type to `rmp_serde` with the derive).
pub(crate) trait Fields: Sized {
    /// Reads the struct (a map, an array or a binary, as the derive accepts) from `de`.
    fn read(de: &mut Deserializer<'_>) -> Result<Self, Error>;
}

/// A struct's name and its fields' wire names, in declaration (and array) order.
#[derive(Debug)]
pub(crate) struct Shape {
    /// The struct's name, for errors (`expected struct Hello`).
    pub(crate) name: &'static str,
    /// The fields' names on the wire; at most 64.
    pub(crate) fields: &'static [&'static str],
}

/// How [`Deserializer::read_struct`] found a struct written: what a field it lacks is.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Found {
    shape: &'static Shape,
    /// Written as an array (or a binary): a lacking field is a short array, not a missing key.
    seq: bool,
}

impl Found {
    /// A field the derive requires: its value, or the derive's error when it was not read.
    #[inline]
    pub(crate) fn required<T>(self, slot: Option<T>, index: usize) -> Result<T, Error> {
        match slot {
            Some(v) => Ok(v),
            None => Err(self.missing(index)),
        }
    }

    #[cold]
    #[inline(never)]
    fn missing(self, index: usize) -> Error {
        let name = self.shape.fields.get(index).copied().unwrap_or_default();
        if self.seq {
            de::Error::invalid_length(index, &self.shape.expecting_len())
        } else {
            de::Error::missing_field(name)
        }
    }
}

impl Shape {
    /// What the derive's sequence visitor expects: `struct Hello with 10 elements` (`1 element`).
    fn expecting_len(&'static self) -> impl de::Expected {
        struct WithLen(&'static Shape);
        impl de::Expected for WithLen {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let n = self.0.fields.len();
                let s = if n == 1 { "" } else { "s" };
                write!(f, "struct {} with {n} element{s}", self.0.name)
            }
        }
        WithLen(self)
    }
}

/// What the derive's visitor expects: `struct Hello`.
impl de::Expected for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "struct {}", self.name)
    }
}

/// The derive's field visitor, for errors: a key that is neither a string, a binary nor an
/// index.
struct FieldIdentifier;

impl de::Expected for FieldIdentifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("field identifier")
    }
}

/// A field's value into its slot: `field(index, de)` reads the value of field `index` from
/// `de` (see [`Deserializer::read_struct`]).
pub(crate) type FieldFn<'f, 'de> =
    dyn FnMut(usize, &mut Deserializer<'de>) -> Result<(), Error> + 'f;

pub(crate) struct Deserializer<'de> {
    cur: Cursor<'de>,
    /// Reading one byte of a binary offered as a sequence: rmp_serde offers it to every
    /// `deserialize_*` as a plain integer (no option, enum or newtype).
    byte: bool,
}

impl<'de> Deserializer<'de> {
    fn new(body: &'de [u8]) -> Self {
        Self {
            cur: Cursor::new(body),
            byte: false,
        }
    }

    /// Reads the next value as `T`, as a derived struct reads a field's value.
    #[inline]
    pub(crate) fn value<T: de::Deserialize<'de>>(&mut self) -> Result<T, Error> {
        T::deserialize(self)
    }

    /// Reads a struct of `shape` as `#[derive(Deserialize)]` reads it, calling `field` with
    /// each field's index for its value; what the caller did not get is then decided by
    /// [`Found::required`] (or the field's default).
    ///
    /// A map: each key is a field's name (a string or a binary) or its index; other keys are
    /// skipped, a field twice is an error. An array: the fields in order, a longer array is an
    /// error. A binary: its bytes as the fields in order, as integers (the rest ignored).
    #[inline(never)]
    pub(crate) fn read_struct(
        &mut self,
        shape: &'static Shape,
        field: &mut FieldFn<'_, 'de>,
    ) -> Result<Found, Error> {
        let n = shape.fields.len();
        match self.next()? {
            Token::Map(len) => {
                let mut seen = 0u64;
                for _ in 0..len {
                    let index = match self.next()? {
                        Token::Str(key) | Token::Bin(key) => {
                            shape.fields.iter().position(|f| f.as_bytes() == key)
                        }
                        Token::Uint(i) => usize::try_from(i).ok().filter(|&i| i < n),
                        token => {
                            return Err(de::Error::invalid_type(
                                token.unexpected(),
                                &FieldIdentifier,
                            ))
                        }
                    };
                    let Some(index) = index else {
                        de::IgnoredAny::deserialize(&mut *self)?;
                        continue;
                    };
                    let bit = 1u64.checked_shl(index as u32).unwrap_or(0);
                    if seen & bit != 0 {
                        let name = shape.fields.get(index).copied().unwrap_or_default();
                        return Err(de::Error::duplicate_field(name));
                    }
                    seen |= bit;
                    field(index, self)?;
                }
                Ok(Found { shape, seq: false })
            }
            Token::Array(len) => {
                let len = len as usize;
                for index in 0..len.min(n) {
                    field(index, self)?;
                }
                if len > n {
                    return Err(de::Error::custom(format_args!(
                        "array or map had {len} elements but only {n} were read"
                    )));
                }
                Ok(Found { shape, seq: true })
            }
            Token::Bin(bytes) => {
                // As `bytes_as_seq`: each byte through a deserializer of its own encoding.
                for (index, &b) in bytes.iter().take(n).enumerate() {
                    let encoded: &'static [u8; 2] = &BYTES[usize::from(b)];
                    let mut byte = Deserializer {
                        cur: Cursor::new(&encoded[..if b < 0x80 { 1 } else { 2 }]),
                        byte: true,
                    };
                    field(index, &mut byte)?;
                }
                Ok(Found { shape, seq: true })
            }
            token => Err(de::Error::invalid_type(token.unexpected(), shape)),
        }
    }

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

    /// An array body of the values of `fields`, in their order.
    fn array(fields: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = vec![0xdc];
        out.extend_from_slice(&(fields.len() as u16).to_be_bytes());
        for (_, v) in fields {
            out.extend_from_slice(v);
        }
        out
    }

    /// A map body of `fields` keyed by their position in `fields` (the derive takes an
    /// integer key as the index of a field) or by their names as binaries.
    fn keyed_otherwise(fields: &[(&str, &[u8])], by_index: bool) -> Vec<u8> {
        let mut out = vec![0xde];
        out.extend_from_slice(&(fields.len() as u16).to_be_bytes());
        for (i, (k, v)) in fields.iter().enumerate() {
            if by_index {
                out.push(i as u8);
            } else {
                out.push(0xc4);
                out.push(k.len() as u8);
                out.extend_from_slice(k.as_bytes());
            }
            out.extend_from_slice(v);
        }
        out
    }

    /// Every field of `base` replaced in turn by every value of [`VALUES`], and dropped; the
    /// fields as an array (every prefix of it), keyed by index or by binary names; every
    /// value as a whole body. The table-driven reader ([`super::Fields`]) and the derive
    /// through this deserializer must read each alike, to the text of the error; the derive
    /// through this deserializer and through rmp_serde must agree on each (same value, or
    /// both an error).
    fn agrees<T: DeserializeOwned + super::Fields + PartialEq + Debug>(base: &[(&str, &[u8])]) {
        let mut cases = vec![body(base)];
        for i in 0..base.len() {
            for v in VALUES {
                let mut fields = base.to_vec();
                fields[i].1 = v;
                cases.push(body(&fields));
                cases.push(array(&fields));
            }
            let mut fields = base.to_vec();
            fields.remove(i);
            cases.push(body(&fields));
        }
        for n in 0..=base.len() {
            cases.push(array(&base[..n]));
        }
        cases.push(keyed_otherwise(base, true));
        cases.push(keyed_otherwise(base, false));
        for v in VALUES {
            let mut fields = base.to_vec();
            fields.push(("extra", v));
            cases.push(body(&fields));
            cases.push(array(&fields));
            cases.push(v.to_vec());
        }
        // Twice the first field.
        if let Some(first) = base.first() {
            let mut fields = base.to_vec();
            fields.push(*first);
            cases.push(body(&fields));
        }
        for case in cases {
            let table = super::read_fields::<T>(&case);
            let ours = super::from_slice::<T>(&case);
            match (&table, &ours) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "{case:02x?}"),
                (Err(a), Err(b)) => assert_eq!(a.0, b.0, "{case:02x?}"),
                _ => panic!("{case:02x?}: table {table:?}, derive {ours:?}"),
            }
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
            ("consumer", b"\xa1c"),
            ("cgroups", b"\xa2v1"),
            (
                "limits",
                b"\x9b\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b",
            ),
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
            ("limits", b"\x82\xa4pids\x01\xaacpu_millis\xcd\x05\xdc"),
            ("tag", b"\xa1t"),
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
        agrees::<Resume>(&[("id", b"\x01"), ("slept_ms", b"\x01"), ("unix_ms", b"\x02")]);
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
        agrees::<Cancel>(&[
            ("id", b"\x01"),
            ("task_id", b"\xa1t"),
            ("grace_ms", b"\x01"),
        ]);
        agrees::<ExecStarted>(&[("re", b"\x01"), ("exec_id", b"\x02"), ("pid", b"\x03")]);
        agrees::<ExecOutput>(&[
            ("exec_id", b"\x01"),
            ("stream", b"\xa3pty"),
            ("data", b"\xc4\x01\x02"),
        ]);
        agrees::<StatusReply>(&[
            ("re", b"\x01"),
            ("state", b"\xa5ready"),
            ("driver_pid", b"\x02"),
            ("restarts", b"\x03"),
            ("uptime_ms", b"\x04"),
            ("last_exit", b"\x81\xa4code\x01"),
            ("children", b"\x05"),
            ("reaped", b"\x06"),
            ("tasks_queued", b"\x07"),
            ("task_running", b"\xa1t"),
            ("execs_running", b"\x08"),
            ("buffered_events", b"\x09"),
            ("buffered_bytes", b"\x0a"),
            ("last_seq", b"\x0b"),
            ("rss_bytes", b"\x0c"),
            ("idle_since_ms", b"\x0d"),
            ("cgroups", b"\xa4none"),
        ]);
        agrees::<Lagged>(&[("missed", b"\x01"), ("next_seq", b"\x02")]);
        // exec registry
        agrees::<ListExecs>(&[("id", b"\x01")]);
        agrees::<AttachExec>(&[
            ("id", b"\x01"),
            ("exec_id", b"\x02"),
            ("from_offset", b"\x03"),
        ]);
        agrees::<DetachExec>(&[("id", b"\x01"), ("exec_id", b"\x02")]);
        agrees::<ExecAttached>(&[
            ("re", b"\x01"),
            ("exec_id", b"\x02"),
            ("from_offset", b"\x03"),
            ("first_offset", b"\x04"),
            ("end_offset", b"\x05"),
            ("running", b"\xc3"),
        ]);
        agrees::<AttachOutput>(&[
            ("exec_id", b"\x01"),
            ("stream", b"\xa6stdout"),
            ("offset", b"\x02"),
            ("data", b"\xc4\x01\x09"),
        ]);
        agrees::<AttachLagged>(&[
            ("exec_id", b"\x01"),
            ("missed", b"\x02"),
            ("next_offset", b"\x03"),
        ]);
        // files
        agrees::<FsStat>(&[("id", b"\x01"), ("path", b"\xa1p"), ("follow", b"\xc3")]);
        agrees::<FsList>(&[
            ("id", b"\x01"),
            ("path", b"\xa1p"),
            ("after", b"\xa1a"),
            ("limit", b"\x02"),
        ]);
        agrees::<FsRead>(&[
            ("id", b"\x01"),
            ("path", b"\xa1p"),
            ("offset", b"\x02"),
            ("length", b"\x03"),
        ]);
        agrees::<FsData>(&[
            ("re", b"\x01"),
            ("offset", b"\x02"),
            ("data", b"\xc4\x01\x09"),
            ("eof", b"\xc3"),
        ]);
        agrees::<FsMkdir>(&[
            ("id", b"\x01"),
            ("path", b"\xa1p"),
            ("parents", b"\xc3"),
            ("mode", b"\xcd\x01\xed"),
        ]);
        agrees::<FsRemove>(&[("id", b"\x01"), ("path", b"\xa1p"), ("recursive", b"\xc3")]);
        agrees::<FsRename>(&[("id", b"\x01"), ("from", b"\xa1a"), ("to", b"\xa1b")]);
        agrees::<FsWriteOpen>(&[
            ("id", b"\x01"),
            ("path", b"\xa1p"),
            ("mode", b"\xcd\x01\xa4"),
            ("parents", b"\xc3"),
            ("append", b"\xc2"),
            ("handle", b"\x02"),
        ]);
        agrees::<FsWriteReady>(&[("re", b"\x01"), ("handle", b"\x02"), ("offset", b"\x03")]);
        agrees::<FsWriteData>(&[
            ("id", b"\x01"),
            ("handle", b"\x02"),
            ("offset", b"\x03"),
            ("data", b"\xc4\x01\x09"),
        ]);
        agrees::<FsWriteClose>(&[("id", b"\x01"), ("handle", b"\x02"), ("abort", b"\xc3")]);
        agrees::<FsWatch>(&[("id", b"\x01"), ("path", b"\xa1p"), ("recursive", b"\xc3")]);
        agrees::<FsUnwatch>(&[("id", b"\x01"), ("watch", b"\x02")]);
        agrees::<FsEvent>(&[
            ("watch", b"\x01"),
            ("change", b"\xa7renamed"),
            ("path", b"\xa1a"),
            ("to", b"\xa1b"),
            ("dropped", b"\x02"),
        ]);
        agrees::<ForgetConsumer>(&[("id", b"\x01"), ("consumer", b"\xa1c")]);
        agrees::<SetClock>(&[("id", b"\x01"), ("unix_ms", b"\x02")]);
        agrees::<ClockSet>(&[("unix_ms", b"\x01"), ("jump_ms", b"\xff")]);
        agrees::<ShimExiting>(&[("code", b"\x01")]);
        agrees::<Metrics>(&[("id", b"\x01")]);
        let cgroup = b"\x83\xa7version\x02\xa4pids\x03\xa3oom\xc0".as_slice();
        let fs = b"\x95\x01\x02\x03\x04\x05".as_slice();
        let procs = b"\x91\x86\xa4role\xa6driver\xa3pid\x01\xa4pids\x02\xa9rss_bytes\x03\xa6cpu_us\x04\xa7exec_id\x05".as_slice();
        agrees::<MetricsReply>(&[
            ("re", b"\x01"),
            ("time_ms", b"\x02"),
            ("cgroup", cgroup),
            ("workspace", fs),
            ("procs", procs),
        ]);
        agrees::<Reading>(&[
            ("time_ms", b"\x02"),
            ("cgroup", cgroup),
            ("workspace", fs),
            ("procs", procs),
        ]);
        agrees::<DriverStarted>(&[("pid", b"\x01"), ("attempt", b"\x02")]);
        agrees::<DriverReady>(&[("pid", b"\x01"), ("startup_ms", b"\x02")]);
        agrees::<DriverExited>(&[
            ("pid", b"\x01"),
            ("code", b"\x02"),
            ("signal", b"\xa4KILL"),
            ("uptime_ms", b"\x03"),
            ("reason", b"\xa1r"),
            ("oom_killed", b"\xc3"),
        ]);
        agrees::<DriverRestarting>(&[("attempt", b"\x01"), ("delay_ms", b"\x02")]);
        agrees::<CrashLoop>(&[("restarts", b"\x01"), ("window_ms", b"\x02")]);
        agrees::<TaskAccepted>(&[("task_id", b"\xa1t"), ("position", b"\x02")]);
        agrees::<Idle>(&[("idle_since_ms", b"\x01")]);
        agrees::<Oom>(&[("kills", b"\x01"), ("new_kills", b"\x02")]);
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
