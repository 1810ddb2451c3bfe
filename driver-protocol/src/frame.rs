//! The frame: how one message is delimited on a byte stream.
//!
//! ```text
//!  0        1        2        3        4
//! +--------+--------+--------+--------+================================+
//! |  length of the body, u32 big-endian |  body: `length` bytes, one     |
//! |                                     |  MessagePack map (a message)   |
//! +--------+--------+--------+--------+================================+
//! ```
//!
//! The length counts the body only, not the 4 header bytes. A receiver has a maximum body
//! length ([`DEFAULT_MAX_FRAME`](crate::DEFAULT_MAX_FRAME) unless configured) and checks the
//! header against it *before* it reserves any memory for the body, so a hostile length of
//! `u32::MAX` costs nothing. A frame over the limit cannot be skipped safely (the stream has
//! no resynchronisation point), so the receiver answers `error{code:"frame_too_large"}` and
//! closes the connection. A sender checks the same limit when it encodes, so it never
//! produces a frame its peer must reject.
//!
//! The helpers here are shared by the tokio `codec` and the
//! [`blocking`](crate::blocking) reader and writer; they are public for transports of one's
//! own. The writers reserve the 4 header bytes, encode the body in place behind them and then
//! patch in the length, so a message is encoded straight into the output buffer with no
//! intermediate copy.

use std::io;

use bytes::{BufMut, BytesMut};

use crate::message::{Message, Seq};
use crate::{DecodeError, EncodeError};

/// The length of a frame header.
pub const HEADER_LEN: usize = 4;

/// The largest body length a header can express (`u32::MAX`); larger limits are lowered to it.
pub const MAX_FRAME_LIMIT: usize = u32::MAX as usize;

/// Lowers a configured limit to what a header can express.
pub(crate) fn clamp_max(max: usize) -> usize {
    max.min(MAX_FRAME_LIMIT)
}

/// The body length announced by a header, checked against `max`.
///
/// Fails with [`DecodeError::FrameTooLarge`] when the length exceeds `max`; nothing has been
/// allocated at that point.
pub fn body_len(header: [u8; HEADER_LEN], max: usize) -> Result<usize, DecodeError> {
    let len = u32::from_be_bytes(header);
    match usize::try_from(len) {
        Ok(n) if n <= max => Ok(n),
        _ => Err(DecodeError::FrameTooLarge {
            len: u64::from(len),
            max,
        }),
    }
}

/// The body length of the frame at the start of `buf`, or `None` while fewer than
/// [`HEADER_LEN`] bytes are there (see [`body_len`]).
pub fn parse_header(buf: &[u8], max: usize) -> Result<Option<usize>, DecodeError> {
    match buf.first_chunk::<HEADER_LEN>() {
        Some(header) => body_len(*header, max).map(Some),
        None => Ok(None),
    }
}

/// A growable byte buffer frames can be written into: `Vec<u8>` or [`BytesMut`].
///
/// Sealed: the writers need to truncate a partly written frame after an error.
pub trait FrameBuf: BufMut + sealed::Sealed {
    /// The number of bytes in the buffer.
    fn filled(&self) -> usize;
    /// Shortens the buffer to `len` bytes.
    fn truncate_to(&mut self, len: usize);
    /// The bytes in the buffer.
    fn filled_mut(&mut self) -> &mut [u8];
}

impl FrameBuf for Vec<u8> {
    fn filled(&self) -> usize {
        self.len()
    }
    fn truncate_to(&mut self, len: usize) {
        self.truncate(len);
    }
    fn filled_mut(&mut self) -> &mut [u8] {
        self
    }
}

impl FrameBuf for BytesMut {
    fn filled(&self) -> usize {
        self.len()
    }
    fn truncate_to(&mut self, len: usize) {
        self.truncate(len);
    }
    fn filled_mut(&mut self) -> &mut [u8] {
        self
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for Vec<u8> {}
    impl Sealed for bytes::BytesMut {}
}

/// Appends one frame holding `msg` to `out`, encoding it in place.
///
/// Fails with [`EncodeError::FrameTooLarge`] when the body is longer than `max`, and with
/// [`EncodeError::Unencodable`] for an `Unknown` message; `out` is left as it was on error
/// (its capacity may have grown).
pub fn write_message<M: Message, B: FrameBuf>(
    out: &mut B,
    max: usize,
    msg: &M,
) -> Result<(), EncodeError> {
    write_with(out, max, |w| msg.encode_to(w))
}

/// Appends one frame holding an already encoded `body` to `out`.
pub fn write_body<B: FrameBuf>(out: &mut B, max: usize, body: &[u8]) -> Result<(), EncodeError> {
    let max = clamp_max(max);
    if body.len() > max {
        return Err(EncodeError::FrameTooLarge {
            len: body.len(),
            max,
        });
    }
    out.put_u32(body.len() as u32);
    out.put_slice(body);
    Ok(())
}

/// Appends one frame holding an `event` envelope around the raw `event_body` (see
/// [`envelope::encode_event_envelope`](crate::envelope::encode_event_envelope)).
pub fn write_event_envelope<B: FrameBuf>(
    out: &mut B,
    max: usize,
    seq: Seq,
    event_body: &[u8],
) -> Result<(), EncodeError> {
    // The header and the envelope's head (at most 31 bytes: fixmap, "type": "event", "seq":
    // a uint of at most 9 bytes, "event") are put together first, so the frame is written
    // in two appends, the body's the only large one.
    use crate::envelope::{envelope_head, EVENT_ENVELOPE_OVERHEAD};
    let (envelope, envelope_len) = envelope_head(seq);
    let len = envelope_len.saturating_add(event_body.len());
    let max = clamp_max(max);
    if len > max {
        return Err(EncodeError::FrameTooLarge { len, max });
    }
    let mut head = [0u8; HEADER_LEN + EVENT_ENVELOPE_OVERHEAD];
    let (header, rest) = head.split_at_mut(HEADER_LEN);
    // `len <= max <= u32::MAX`, checked above.
    header.copy_from_slice(&(len as u32).to_be_bytes());
    rest.copy_from_slice(&envelope);
    out.put_slice(head.get(..HEADER_LEN + envelope_len).unwrap_or_default());
    out.put_slice(event_body);
    Ok(())
}

/// Appends one frame holding the `event` envelope `{seq, event}`, encoding the event in
/// place: byte-identical to writing
/// [`ShimToControl::Event`](crate::message::ShimToControl::Event), without building it.
pub fn write_event<B: FrameBuf>(
    out: &mut B,
    max: usize,
    seq: Seq,
    event: &crate::message::Event,
) -> Result<(), EncodeError> {
    write_with(out, max, |w| {
        crate::envelope::encode_event_envelope(seq, &[], &mut *w.0);
        event.encode_to(w)
    })
}

/// The room [`exec_output_head`] needs: the frame header, the envelope's head (at most 31
/// bytes) and the event's up to its data (at most 59 bytes), with room to spare.
pub const EXEC_OUTPUT_HEAD_MAX: usize = 128;

/// The start of the frame [`write_event`] writes for `exec_output{exec_id, stream, data}` with
/// `data_len` bytes of data: everything up to the data, the frame's last bytes. A sender that
/// reads the output straight into its buffer behind a room of [`EXEC_OUTPUT_HEAD_MAX`] bytes
/// writes this head just before it once the length is known, and has the frame with no copy
/// of the data (the head followed by the data is byte-identical to [`write_event`]'s frame).
///
/// Writes the head at the end of `room` and returns its length. Fails with
/// [`EncodeError::FrameTooLarge`] when the frame's body would be longer than `max`.
pub fn exec_output_head(
    room: &mut [u8; EXEC_OUTPUT_HEAD_MAX],
    max: usize,
    seq: Seq,
    exec_id: u64,
    stream: crate::message::OutputStream,
    data_len: usize,
) -> Result<usize, EncodeError> {
    use crate::message::{Event, ExecOutput};
    let mut head = [0u8; EXEC_OUTPUT_HEAD_MAX];
    let left = {
        let mut w: &mut [u8] = &mut head[HEADER_LEN..];
        crate::envelope::encode_event_envelope(seq, &[], &mut w);
        let event = Event::ExecOutput(ExecOutput {
            exec_id,
            stream,
            data: bytes::Bytes::new(),
        });
        event.encode_to(&mut w)?;
        w.len()
    };
    // The empty data was encoded last, as the two bytes of an empty bin 8: replaced by the
    // head of a bin of `data_len` bytes, in its most compact form (as the encoder writes it).
    let end = (EXEC_OUTPUT_HEAD_MAX - left).saturating_sub(2);
    let too_large = |len| EncodeError::FrameTooLarge {
        len,
        max: clamp_max(max),
    };
    let mut bin = [0u8; 5];
    let bin: &[u8] = if let Ok(n) = u8::try_from(data_len) {
        bin[..2].copy_from_slice(&[0xc4, n]);
        &bin[..2]
    } else if let Ok(n) = u16::try_from(data_len) {
        bin[0] = 0xc5;
        bin[1..3].copy_from_slice(&n.to_be_bytes());
        &bin[..3]
    } else {
        let n = u32::try_from(data_len).map_err(|_| too_large(data_len))?;
        bin[0] = 0xc6;
        bin[1..].copy_from_slice(&n.to_be_bytes());
        &bin[..]
    };
    let head_len = end + bin.len();
    let len = (head_len - HEADER_LEN).saturating_add(data_len);
    if len > clamp_max(max) {
        return Err(too_large(len));
    }
    // The head is at most 94 bytes (see EXEC_OUTPUT_HEAD_MAX): these always hold.
    let (Some(dst), Some(at)) = (
        head.get_mut(end..head_len),
        EXEC_OUTPUT_HEAD_MAX.checked_sub(head_len),
    ) else {
        return Err(EncodeError::Unencodable(
            "exec_output head over its room".into(),
        ));
    };
    dst.copy_from_slice(bin);
    // `len <= max <= u32::MAX`, checked above.
    head[..HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    room[at..].copy_from_slice(&head[..head_len]);
    Ok(head_len)
}

/// Reserves the header, runs `encode` on the buffer, checks the length and patches it in.
///
/// The limit is checked after encoding: a writer that checks every write makes rmp-serde's
/// encoder about twice as slow (measured under musl), and the bytes of an oversized message
/// are no more than its sender already holds. They are removed again at once.
fn write_with<B: FrameBuf>(
    out: &mut B,
    max: usize,
    encode: impl FnOnce(&mut Body<'_, B>) -> Result<(), EncodeError>,
) -> Result<(), EncodeError> {
    let max = clamp_max(max);
    let start = out.filled();
    out.put_u32(0);
    let res = encode(&mut Body(out));
    let len = out.filled() - start - HEADER_LEN;
    if let Err(e) = res {
        out.truncate_to(start);
        return Err(e);
    }
    if len > max {
        out.truncate_to(start);
        return Err(EncodeError::FrameTooLarge { len, max });
    }
    // `len <= max <= u32::MAX`, checked above.
    out.filled_mut()[start..start + HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// An [`io::Write`] that appends to a frame's body and never fails.
struct Body<'a, B>(&'a mut B);

impl<B: FrameBuf> io::Write for Body<'_, B> {
    #[inline]
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.put_slice(buf);
        Ok(buf.len())
    }

    #[inline]
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.put_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{DriverToShim, Log, LogStream, Ping, Unknown};

    fn log(len: usize) -> DriverToShim {
        DriverToShim::Log(Log {
            task_id: None,
            stream: LogStream::Driver,
            level: None,
            text: "x".repeat(len),
            truncated: false,
        })
    }

    #[test]
    fn an_exec_output_head_followed_by_its_data_is_the_event_frame() {
        use crate::message::{Event, ExecOutput, OutputStream};
        for seq in [1, 127, 200, 70_000, u64::MAX] {
            for len in [0, 1, 255, 256, 65_535, 65_536, 131_072] {
                for (exec_id, stream) in [(3, OutputStream::Stdout), (u64::MAX, OutputStream::Pty)]
                {
                    let data = bytes::Bytes::from(vec![5u8; len]);
                    let event = Event::ExecOutput(ExecOutput {
                        exec_id,
                        stream,
                        data: data.clone(),
                    });
                    let mut want = Vec::new();
                    write_event(&mut want, crate::DEFAULT_MAX_FRAME, seq, &event).expect("write");
                    let mut room = [0u8; EXEC_OUTPUT_HEAD_MAX];
                    let n = exec_output_head(
                        &mut room,
                        crate::DEFAULT_MAX_FRAME,
                        seq,
                        exec_id,
                        stream,
                        len,
                    )
                    .expect("head");
                    let mut got = room[EXEC_OUTPUT_HEAD_MAX - n..].to_vec();
                    got.extend_from_slice(&data);
                    assert_eq!(got, want, "seq {seq}, {len} bytes");
                }
            }
        }
        let mut room = [0u8; EXEC_OUTPUT_HEAD_MAX];
        let over = exec_output_head(&mut room, 1000, 1, 1, OutputStream::Stderr, 1000);
        assert!(matches!(over, Err(EncodeError::FrameTooLarge { .. })));
    }

    #[test]
    fn an_event_written_in_place_is_the_envelope_message() {
        use crate::message::{Event, EventEnvelope, ExecOutput, OutputStream, ShimToControl};
        let event = Event::ExecOutput(ExecOutput {
            exec_id: 9,
            stream: OutputStream::Stdout,
            data: bytes::Bytes::from(vec![7u8; 70_000]),
        });
        let mut ours = Vec::new();
        write_event(&mut ours, crate::DEFAULT_MAX_FRAME, 300, &event).expect("write");
        let mut theirs = Vec::new();
        let msg = ShimToControl::Event(EventEnvelope { seq: 300, event });
        write_message(&mut theirs, crate::DEFAULT_MAX_FRAME, &msg).expect("write");
        assert_eq!(ours, theirs);
        let mut small = Vec::new();
        let event = Event::ExecOutput(ExecOutput {
            exec_id: 9,
            stream: OutputStream::Stdout,
            data: bytes::Bytes::from(vec![7u8; 100]),
        });
        assert!(matches!(
            write_event(&mut small, 50, 1, &event),
            Err(EncodeError::FrameTooLarge { .. })
        ));
        assert!(small.is_empty());
    }

    #[test]
    fn header_is_checked_against_the_limit() {
        assert_eq!(body_len([0, 0, 1, 0], 256).unwrap(), 256);
        assert!(matches!(
            body_len([0, 0, 1, 1], 256),
            Err(DecodeError::FrameTooLarge { len: 257, max: 256 })
        ));
        assert!(matches!(
            body_len([0xff; 4], MAX_FRAME_LIMIT - 1),
            Err(DecodeError::FrameTooLarge { len, .. }) if len == u64::from(u32::MAX)
        ));
        assert_eq!(body_len([0xff; 4], usize::MAX).unwrap(), MAX_FRAME_LIMIT);
        assert_eq!(parse_header(&[0, 0, 0], 10).unwrap(), None);
        assert_eq!(parse_header(&[0, 0, 0, 3, 9], 10).unwrap(), Some(3));
    }

    #[test]
    fn writes_length_then_body() {
        let msg = DriverToShim::Ping(Ping { id: 1 });
        let body = msg.to_body().unwrap();
        let mut v = b"prefix".to_vec();
        write_message(&mut v, 1024, &msg).unwrap();
        let mut b = BytesMut::new();
        write_body(&mut b, 1024, &body).unwrap();
        assert_eq!(&v[6..], &b[..]);
        assert_eq!(&v[6..10], &(body.len() as u32).to_be_bytes());
        assert_eq!(&v[10..], &body[..]);
    }

    #[test]
    fn limit_is_enforced_on_encode_and_leaves_the_buffer_alone() {
        let msg = log(100);
        let exact = msg.to_body().unwrap().len();
        let mut out = b"keep".to_vec();
        write_message(&mut out, exact, &msg).unwrap();
        assert_eq!(out.len(), 4 + HEADER_LEN + exact);

        let mut out = b"keep".to_vec();
        let err = write_message(&mut out, exact - 1, &msg).unwrap_err();
        assert!(
            matches!(err, EncodeError::FrameTooLarge { len, max } if len == exact && max == exact - 1)
        );
        assert_eq!(out, b"keep");

        let mut out = Vec::new();
        assert!(write_message(&mut out, 1000, &log(1 << 20)).is_err());
        assert!(out.is_empty());

        let mut out = Vec::new();
        assert!(write_body(&mut out, 3, b"four").is_err());
        assert!(write_event_envelope(&mut out, 10, 1, &[0x80; 10]).is_err());
        assert!(out.is_empty());
    }

    #[test]
    fn unknown_is_unencodable_and_leaves_the_buffer_alone() {
        let msg = DriverToShim::Unknown(Unknown {
            type_name: "x".into(),
            id: None,
        });
        let mut out = b"keep".to_vec();
        assert!(matches!(
            write_message(&mut out, 100, &msg),
            Err(EncodeError::Unencodable(_))
        ));
        assert_eq!(out, b"keep");
    }
}
