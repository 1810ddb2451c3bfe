//! The one MessagePack reader of the crate: a bounds-checked cursor over a body and the
//! tokens it reads.
//!
//! [`raw`](crate::raw)'s walker (which checks a body's structure and finds its `type`, `id`
//! and envelope parts, on the relay's per-event path) and [`de`](crate::de)'s serde
//! deserializer (which decodes a checked body into the message structs) both read through
//! [`Cursor`]: one place knows the MessagePack markers. Every read checks the remaining
//! length and fails cleanly with [`Fail::Eof`]; the reserved marker `0xc1` is
//! [`Fail::Reserved`]. Nothing here allocates.

/// One MessagePack value's head: a scalar, the data of a string, binary or ext, or the
/// element count of an array or a map (whose elements follow).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Token<'a> {
    /// nil
    Nil,
    /// false, true
    Bool(bool),
    /// positive fixint, uint 8/16/32/64
    Uint(u64),
    /// negative fixint, int 8/16/32/64
    Int(i64),
    /// float 32
    F32(f32),
    /// float 64
    F64(f64),
    /// str (its bytes, not checked for UTF-8)
    Str(&'a [u8]),
    /// bin
    Bin(&'a [u8]),
    /// array: the number of elements
    Array(u32),
    /// map: the number of entries
    Map(u32),
    /// ext, fixext: the type and the data
    Ext(i8, &'a [u8]),
}

/// Why a body is malformed; turned into [`DecodeError::Malformed`](crate::DecodeError::Malformed)
/// text. The reader itself fails only with `Eof` and `Reserved`; the others are the walker's.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Fail {
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
    /// The text of a [`DecodeError::Malformed`](crate::DecodeError::Malformed).
    pub(crate) fn detail(self) -> &'static str {
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

/// Whether every byte of `b` is ASCII. A plain loop that folds the bytes together: the
/// size-optimised shim keeps it inline, where an iterator's `all` stays a call per string,
/// and keys and names are a few bytes long, shorter than what `is_ascii`'s word-at-a-time
/// walk needs to pay for its set-up.
#[inline(always)]
pub(crate) fn is_ascii(b: &[u8]) -> bool {
    let mut acc = 0u8;
    for &c in b {
        acc |= c;
    }
    acc < 0x80
}

/// `b` as a `&str` when it is UTF-8; ASCII, the usual case for keys and names, without
/// `str::from_utf8`'s set-up (about 80 instructions for a short name).
#[inline(always)]
pub(crate) fn utf8_str(b: &[u8]) -> Option<&str> {
    if is_ascii(b) {
        // SAFETY: every byte of `b` is below 0x80, and ASCII is valid UTF-8.
        Some(unsafe { std::str::from_utf8_unchecked(b) })
    } else {
        std::str::from_utf8(b).ok()
    }
}

/// Whether `a` and `b` hold the same bytes: for keys and names, which are short, a plain
/// loop rather than a call to `memcmp` (a byte loop of its own in musl, behind a call).
#[inline(always)]
pub(crate) fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    diff == 0
}

/// Whether `a` is the short constant `b` (at most 8 bytes): both are put in a `u64`, the
/// constant's at compile time, and compared as numbers; no loop, no call.
#[inline(always)]
pub(crate) fn is<const N: usize>(a: &[u8], b: &[u8; N]) -> bool {
    const { assert!(N <= 8) };
    let Ok(a) = <&[u8; N]>::try_from(a) else {
        return false;
    };
    let (mut x, mut y) = ([0u8; 8], [0u8; 8]);
    if let (Some(x), Some(y)) = (x.get_mut(..N), y.get_mut(..N)) {
        x.copy_from_slice(a);
        y.copy_from_slice(b);
    }
    u64::from_ne_bytes(x) == u64::from_ne_bytes(y)
}

/// A read position in a body. Every read checks the remaining length; nothing allocates.
#[derive(Debug, Clone)]
pub(crate) struct Cursor<'a> {
    /// The body.
    pub(crate) buf: &'a [u8],
    /// The next byte to read.
    pub(crate) pos: usize,
}

// The readers are `inline(always)`: the shim is built for size (opt-level "z"), which
// otherwise leaves these one-liners (and `token`, which each caller matches on) as calls on
// its per-event path; inlined, the unused parts of a token fold away at each call site.
impl<'a> Cursor<'a> {
    /// A cursor at the start of `buf`.
    #[inline(always)]
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Whether every byte was read.
    #[inline(always)]
    pub(crate) fn at_end(&self) -> bool {
        self.pos == self.buf.len()
    }

    #[inline(always)]
    pub(crate) fn byte(&mut self) -> Result<u8, Fail> {
        let b = *self.buf.get(self.pos).ok_or(Fail::Eof)?;
        self.pos += 1;
        Ok(b)
    }

    #[inline(always)]
    pub(crate) fn peek_byte(&self) -> Result<u8, Fail> {
        self.buf.get(self.pos).copied().ok_or(Fail::Eof)
    }

    #[inline(always)]
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], Fail> {
        let end = self.pos.checked_add(n).ok_or(Fail::Eof)?;
        let bytes = self.buf.get(self.pos..end).ok_or(Fail::Eof)?;
        self.pos = end;
        Ok(bytes)
    }

    #[inline(always)]
    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], Fail> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    #[inline(always)]
    pub(crate) fn u8_len(&mut self) -> Result<usize, Fail> {
        self.byte().map(usize::from)
    }

    #[inline(always)]
    pub(crate) fn u16_len(&mut self) -> Result<usize, Fail> {
        self.array().map(|b| usize::from(u16::from_be_bytes(b)))
    }

    #[inline(always)]
    pub(crate) fn u32_len(&mut self) -> Result<usize, Fail> {
        // A u32 length larger than the address space cannot fit in the body anyway.
        self.array()
            .map(|b| usize::try_from(u32::from_be_bytes(b)).unwrap_or(usize::MAX))
    }

    #[inline(always)]
    pub(crate) fn skip(&mut self, n: usize) -> Result<(), Fail> {
        self.take(n).map(drop)
    }

    /// Reads a string's bytes, or `None` (consuming nothing) if the value is not one.
    #[inline(always)]
    pub(crate) fn str_bytes(&mut self) -> Result<Option<&'a [u8]>, Fail> {
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

    /// Reads the next value's head: a scalar, a string's, binary's or ext's data, or a
    /// container's element count (its elements are the next values).
    #[inline(always)]
    pub(crate) fn token(&mut self) -> Result<Token<'a>, Fail> {
        let m = self.byte()?;
        Ok(match m {
            0x00..=0x7f => Token::Uint(u64::from(m)),
            0x80..=0x8f => Token::Map(u32::from(m & 0x0f)),
            0x90..=0x9f => Token::Array(u32::from(m & 0x0f)),
            0xa0..=0xbf => Token::Str(self.take(usize::from(m & 0x1f))?),
            0xc0 => Token::Nil,
            0xc1 => return Err(Fail::Reserved),
            0xc2 => Token::Bool(false),
            0xc3 => Token::Bool(true),
            0xc4 => {
                let n = self.u8_len()?;
                Token::Bin(self.take(n)?)
            }
            0xc5 => {
                let n = self.u16_len()?;
                Token::Bin(self.take(n)?)
            }
            0xc6 => {
                let n = self.u32_len()?;
                Token::Bin(self.take(n)?)
            }
            // ext 8/16/32: length, then a type byte and the data
            0xc7 => {
                let n = self.u8_len()?;
                self.ext(n)?
            }
            0xc8 => {
                let n = self.u16_len()?;
                self.ext(n)?
            }
            0xc9 => {
                let n = self.u32_len()?;
                self.ext(n)?
            }
            0xca => Token::F32(f32::from_be_bytes(self.array()?)),
            0xcb => Token::F64(f64::from_be_bytes(self.array()?)),
            0xcc => Token::Uint(u64::from(self.byte()?)),
            0xcd => Token::Uint(u64::from(u16::from_be_bytes(self.array()?))),
            0xce => Token::Uint(u64::from(u32::from_be_bytes(self.array()?))),
            0xcf => Token::Uint(u64::from_be_bytes(self.array()?)),
            0xd0 => Token::Int(i64::from(i8::from_be_bytes(self.array()?))),
            0xd1 => Token::Int(i64::from(i16::from_be_bytes(self.array()?))),
            0xd2 => Token::Int(i64::from(i32::from_be_bytes(self.array()?))),
            0xd3 => Token::Int(i64::from_be_bytes(self.array()?)),
            // fixext 1, 2, 4, 8, 16: a type byte, then the data
            0xd4 => self.ext(1)?,
            0xd5 => self.ext(2)?,
            0xd6 => self.ext(4)?,
            0xd7 => self.ext(8)?,
            0xd8 => self.ext(16)?,
            0xd9 => {
                let n = self.u8_len()?;
                Token::Str(self.take(n)?)
            }
            0xda => {
                let n = self.u16_len()?;
                Token::Str(self.take(n)?)
            }
            0xdb => {
                let n = self.u32_len()?;
                Token::Str(self.take(n)?)
            }
            0xdc => Token::Array(u32::from(u16::from_be_bytes(self.array()?))),
            0xdd => Token::Array(u32::from_be_bytes(self.array()?)),
            0xde => Token::Map(u32::from(u16::from_be_bytes(self.array()?))),
            0xdf => Token::Map(u32::from_be_bytes(self.array()?)),
            0xe0..=0xff => Token::Int(i64::from(m as i8)),
        })
    }

    /// An ext's type byte and its `n` bytes of data.
    #[inline(always)]
    fn ext(&mut self, n: usize) -> Result<Token<'a>, Fail> {
        let tag = i8::from_be_bytes(self.array()?);
        Ok(Token::Ext(tag, self.take(n)?))
    }
}
