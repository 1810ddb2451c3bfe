//! The encoder of the message structs: a small MessagePack writer over one `dyn Write`.
//!
//! It writes every message exactly as `rmp_serde::encode::write_named` writes the derived
//! `Serialize` of the message enums (the golden vectors and the tests hold it to that, byte
//! for byte): a map with `type` first and then the fields in declaration order, those with
//! `skip_serializing_if` left out when empty; integers, strings, binaries, arrays and maps in
//! their shortest form; unit enums as their names. What is per message type is only a list
//! of calls, written by `message::fields!` (the [`Put`] of a struct); the writing itself is
//! one copy for every type, and one for every output (`dyn Write`), which keeps the shim's
//! binary small.

use std::collections::BTreeMap;
use std::io::Write;

use bytes::Bytes;

use crate::EncodeError;

/// A MessagePack writer.
pub(crate) struct Enc<'a> {
    out: &'a mut dyn Write,
}

/// What `rmp_serde` reports when its output fails.
#[cold]
#[inline(never)]
fn write_failed(_: std::io::Error) -> EncodeError {
    EncodeError::Unencodable(
        "invalid value write: error while writing multi-byte MessagePack value".to_owned(),
    )
}

impl<'a> Enc<'a> {
    /// A writer appending to `out`.
    pub(crate) fn new(out: &'a mut dyn Write) -> Self {
        Self { out }
    }

    fn raw(&mut self, bytes: &[u8]) -> Result<(), EncodeError> {
        self.out.write_all(bytes).map_err(write_failed)
    }

    /// `marker` and the low `n` bytes of `v`, big-endian.
    #[inline(never)]
    fn marker_be(&mut self, marker: u8, v: u64, n: usize) -> Result<(), EncodeError> {
        let mut buf = [0u8; 9];
        buf[0] = marker;
        let be = v.to_be_bytes();
        let n = n.min(8);
        buf[1..=n].copy_from_slice(&be[8 - n..]);
        self.raw(&buf[..=n])
    }

    /// nil.
    pub(crate) fn nil(&mut self) -> Result<(), EncodeError> {
        self.raw(&[0xc0])
    }

    /// An unsigned integer in its shortest form.
    #[inline(never)]
    pub(crate) fn uint(&mut self, v: u64) -> Result<(), EncodeError> {
        match v {
            0..=0x7f => self.raw(&[v as u8]),
            0x80..=0xff => self.marker_be(0xcc, v, 1),
            0x100..=0xffff => self.marker_be(0xcd, v, 2),
            0x1_0000..=0xffff_ffff => self.marker_be(0xce, v, 4),
            _ => self.marker_be(0xcf, v, 8),
        }
    }

    /// A signed integer in its shortest form (a non-negative one as unsigned).
    #[inline(never)]
    pub(crate) fn sint(&mut self, v: i64) -> Result<(), EncodeError> {
        match v {
            0.. => self.uint(v as u64),
            -32..=-1 => self.raw(&[v as u8]),
            -128..=-33 => self.marker_be(0xd0, v as u64, 1),
            -32768..=-129 => self.marker_be(0xd1, v as u64, 2),
            -2_147_483_648..=-32769 => self.marker_be(0xd2, v as u64, 4),
            _ => self.marker_be(0xd3, v as u64, 8),
        }
    }

    /// A length head: `fix | len` below `fix_limit`, else the 8-bit (if any), 16-bit or
    /// 32-bit marker (lengths past `u32::MAX` wrap, as `rmp` writes them).
    #[inline(never)]
    fn len_head(
        &mut self,
        len: usize,
        fix: Option<(u8, u32)>,
        m8: Option<u8>,
        m16: u8,
        m32: u8,
    ) -> Result<(), EncodeError> {
        let len = len as u32;
        match (fix, m8) {
            (Some((fix, limit)), _) if len < limit => self.raw(&[fix | len as u8]),
            (_, Some(m8)) if len < 256 => self.marker_be(m8, len.into(), 1),
            _ if len < 0x1_0000 => self.marker_be(m16, len.into(), 2),
            _ => self.marker_be(m32, len.into(), 4),
        }
    }

    /// A string.
    #[inline(never)]
    pub(crate) fn str(&mut self, s: &[u8]) -> Result<(), EncodeError> {
        self.len_head(s.len(), Some((0xa0, 32)), Some(0xd9), 0xda, 0xdb)?;
        self.raw(s)
    }

    /// A binary.
    #[inline(never)]
    pub(crate) fn bin(&mut self, b: &[u8]) -> Result<(), EncodeError> {
        self.len_head(b.len(), None, Some(0xc4), 0xc5, 0xc6)?;
        self.raw(b)
    }

    /// The head of an array of `len` elements.
    pub(crate) fn array_len(&mut self, len: usize) -> Result<(), EncodeError> {
        self.len_head(len, Some((0x90, 16)), None, 0xdc, 0xdd)
    }

    /// The head of a map of `len` entries.
    pub(crate) fn map_len(&mut self, len: usize) -> Result<(), EncodeError> {
        self.len_head(len, Some((0x80, 16)), None, 0xde, 0xdf)
    }

    /// An ext value.
    fn ext(&mut self, tag: i8, data: &[u8]) -> Result<(), EncodeError> {
        let len = data.len() as u32;
        let fixed = match len {
            1 => Some(0xd4),
            2 => Some(0xd5),
            4 => Some(0xd6),
            8 => Some(0xd7),
            16 => Some(0xd8),
            _ => None,
        };
        match fixed {
            Some(m) => self.raw(&[m])?,
            None => self.len_head(len as usize, None, Some(0xc7), 0xc8, 0xc9)?,
        }
        self.raw(&[tag as u8])?;
        self.raw(data)
    }

    /// The head of a message struct's map: its entry count (`type` included, when tagged)
    /// and its `type`.
    #[inline(never)]
    pub(crate) fn struct_head(
        &mut self,
        tag: Option<&str>,
        fields: usize,
    ) -> Result<(), EncodeError> {
        self.map_len(fields + usize::from(tag.is_some()))?;
        if let Some(tag) = tag {
            self.str(b"type")?;
            self.str(tag.as_bytes())?;
        }
        Ok(())
    }

    /// One field: its name and its value.
    pub(crate) fn field<T: Put + ?Sized>(&mut self, name: &str, v: &T) -> Result<(), EncodeError> {
        self.str(name.as_bytes())?;
        v.put(self)
    }
}

/// A value the encoder writes as `rmp_serde` writes its `Serialize`.
pub(crate) trait Put {
    /// Appends the value to `e`.
    fn put(&self, e: &mut Enc<'_>) -> Result<(), EncodeError>;
}

/// A struct written as a map of its fields (by `message::fields!`): untagged as a field's
/// value, tagged with its `type` as a message.
pub(crate) trait PutFields {
    /// Appends the map of the fields to `e`, with `type` = `tag` first when tagged.
    fn put_fields(&self, e: &mut Enc<'_>, tag: Option<&str>) -> Result<(), EncodeError>;
}

/// A field that `#[serde(skip_serializing_if = "…")]` leaves out when it is `None` or empty.
pub(crate) trait Skip {
    /// Whether the field is left out.
    fn skipped(&self) -> bool;
}

impl<T> Skip for Option<T> {
    fn skipped(&self) -> bool {
        self.is_none()
    }
}

impl<T> Skip for Vec<T> {
    fn skipped(&self) -> bool {
        self.is_empty()
    }
}

impl<K, V> Skip for BTreeMap<K, V> {
    fn skipped(&self) -> bool {
        self.is_empty()
    }
}

macro_rules! put_uint {
    ($($ty:ty),*) => {$(
        impl Put for $ty {
            fn put(&self, e: &mut Enc<'_>) -> Result<(), EncodeError> {
                e.uint(u64::from(*self))
            }
        }
    )*};
}
put_uint!(u8, u16, u32, u64);

macro_rules! put_sint {
    ($($ty:ty),*) => {$(
        impl Put for $ty {
            fn put(&self, e: &mut Enc<'_>) -> Result<(), EncodeError> {
                e.sint(i64::from(*self))
            }
        }
    )*};
}
put_sint!(i32, i64);

impl Put for bool {
    fn put(&self, e: &mut Enc<'_>) -> Result<(), EncodeError> {
        e.raw(&[if *self { 0xc3 } else { 0xc2 }])
    }
}

impl Put for str {
    fn put(&self, e: &mut Enc<'_>) -> Result<(), EncodeError> {
        e.str(self.as_bytes())
    }
}

impl Put for String {
    fn put(&self, e: &mut Enc<'_>) -> Result<(), EncodeError> {
        e.str(self.as_bytes())
    }
}

impl Put for Bytes {
    fn put(&self, e: &mut Enc<'_>) -> Result<(), EncodeError> {
        e.bin(self)
    }
}

impl<T: Put> Put for Option<T> {
    fn put(&self, e: &mut Enc<'_>) -> Result<(), EncodeError> {
        match self {
            Some(v) => v.put(e),
            None => e.nil(),
        }
    }
}

impl<T: Put + ?Sized> Put for Box<T> {
    fn put(&self, e: &mut Enc<'_>) -> Result<(), EncodeError> {
        (**self).put(e)
    }
}

impl<T: Put> Put for Vec<T> {
    fn put(&self, e: &mut Enc<'_>) -> Result<(), EncodeError> {
        e.array_len(self.len())?;
        self.iter().try_for_each(|v| v.put(e))
    }
}

impl<K: Put, V: Put> Put for BTreeMap<K, V> {
    fn put(&self, e: &mut Enc<'_>) -> Result<(), EncodeError> {
        e.map_len(self.len())?;
        self.iter().try_for_each(|(k, v)| {
            k.put(e)?;
            v.put(e)
        })
    }
}

/// As rmpv's `Serialize` (not `rmpv::encode`, which writes a string of invalid UTF-8 as a
/// string; the serde path writes it as a binary).
impl Put for rmpv::Value {
    fn put(&self, e: &mut Enc<'_>) -> Result<(), EncodeError> {
        use rmpv::Value as V;
        match self {
            V::Nil => e.nil(),
            V::Boolean(b) => b.put(e),
            V::Integer(n) => match (n.as_u64(), n.as_i64()) {
                (Some(u), _) => e.uint(u),
                (None, Some(i)) => e.sint(i),
                // Every integer is one or the other.
                (None, None) => e.nil(),
            },
            V::F32(x) => e.marker_be(0xca, x.to_bits().into(), 4),
            V::F64(x) => e.marker_be(0xcb, x.to_bits(), 8),
            V::String(s) => match s.as_str() {
                Some(s) => e.str(s.as_bytes()),
                None => e.bin(s.as_bytes()),
            },
            V::Binary(b) => e.bin(b),
            V::Array(items) => {
                e.array_len(items.len())?;
                items.iter().try_for_each(|v| v.put(e))
            }
            V::Map(entries) => {
                e.map_len(entries.len())?;
                entries.iter().try_for_each(|(k, v)| {
                    k.put(e)?;
                    v.put(e)
                })
            }
            V::Ext(tag, data) => e.ext(*tag, data),
        }
    }
}

/// Implements [`Put`] for a unit-only enum: each variant as its wire name.
///
/// ```text
/// put_names!(Role { Driver = "driver", Shim = "shim", Control = "control" });
/// ```
macro_rules! put_names {
    ($ty:ident { $($variant:ident = $wire:literal),* $(,)? }) => {
        impl crate::enc::Put for $ty {
            fn put(&self, e: &mut crate::enc::Enc<'_>) -> Result<(), crate::EncodeError> {
                e.str(match self {
                    $(Self::$variant => $wire,)*
                }.as_bytes())
            }
        }
    };
}
pub(crate) use put_names;

#[cfg(test)]
mod tests {
    use rmpv::Value;

    use super::*;

    fn ours<T: Put + ?Sized>(v: &T) -> Vec<u8> {
        let mut out = Vec::new();
        v.put(&mut Enc::new(&mut out)).expect("encodes");
        out
    }

    /// Every length and integer boundary of every MessagePack form, ext values, f32 and a
    /// string of invalid UTF-8: written as rmp_serde writes them.
    #[test]
    fn writes_every_form_as_rmp_serde_does() {
        let mut values = vec![
            Value::Nil,
            Value::Boolean(true),
            Value::Boolean(false),
            Value::F32(1.5),
            Value::F64(-0.25),
            // rmpv keeps a string's invalid UTF-8 as it is.
            rmpv::decode::read_value(&mut &b"\xa2\xff\xfe"[..]).expect("a string"),
        ];
        assert!(matches!(&values[5], Value::String(s) if s.as_str().is_none()));
        for n in [
            0u64,
            127,
            128,
            255,
            256,
            65535,
            65536,
            u64::from(u32::MAX),
            u64::from(u32::MAX) + 1,
            u64::MAX,
        ] {
            values.push(Value::from(n));
        }
        for n in [
            -1i64,
            -32,
            -33,
            -128,
            -129,
            -32768,
            -32769,
            i64::from(i32::MIN),
            i64::from(i32::MIN) - 1,
            i64::MIN,
        ] {
            values.push(Value::from(n));
        }
        for len in [
            0usize, 1, 2, 3, 4, 8, 15, 16, 17, 31, 32, 255, 256, 65535, 65536,
        ] {
            values.push(Value::String("x".repeat(len).into()));
            values.push(Value::Binary(vec![7; len]));
            values.push(Value::Ext(-3, vec![1; len]));
            values.push(Value::Array(vec![Value::Nil; len]));
            values.push(Value::Map(vec![(Value::Nil, Value::from(1)); len]));
        }
        for v in &values {
            assert_eq!(ours(v), rmp_serde::to_vec(v).expect("rmp_serde"), "{v:?}");
        }
        let bytes = Bytes::from(vec![9u8; 300]);
        assert_eq!(ours(&bytes), rmp_serde::to_vec(&bytes).expect("rmp_serde"));
        for n in [0i32, -1, i32::MIN, i32::MAX] {
            assert_eq!(ours(&n), rmp_serde::to_vec(&n).expect("rmp_serde"));
        }
        let map: BTreeMap<String, String> = [("a".into(), "b".into())].into();
        assert_eq!(ours(&map), rmp_serde::to_vec(&map).expect("rmp_serde"));
        let seq: Vec<u32> = (0..20).collect();
        assert_eq!(ours(&seq), rmp_serde::to_vec(&seq).expect("rmp_serde"));
    }

    /// A failing output is an error, as with rmp_serde, and nothing panics.
    #[test]
    fn a_failing_output_is_an_error() {
        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::WriteZero.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let err = Value::from(1).put(&mut Enc::new(&mut Full)).unwrap_err();
        let theirs = rmp_serde::encode::write(&mut Full, &Value::from(1)).unwrap_err();
        assert_eq!(
            err.to_string(),
            EncodeError::Unencodable(theirs.to_string()).to_string()
        );
    }
}
