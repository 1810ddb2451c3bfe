//! `exec_output` events (and `fs_data` replies) taken off the read buffer
//! without a copy: the chunk's bytes are a slice of the frame that carried them.
//!
//! An exec writing fast sends frames of up to 128 KiB, nearly all of it the chunk. Decoded
//! as any other event, each chunk would be copied out of the read buffer into a buffer of
//! its own; here the frame is split off the read buffer and `data` is a [`Bytes`] slice of
//! it. Only a well-formed `exec_output` in its plain form (string keys, `exec_id` a uint,
//! `stream` one of its names, `data` a bin, no key twice) takes this path; anything else
//! returns `None` and is decoded as usual, which gives the same event or the error.

use std::ops::Range;

use bytes::{Bytes, BytesMut};
use driver_protocol::frame::{self, HEADER_LEN};
use driver_protocol::message::{Event, EventEnvelope, ExecOutput, OutputStream, ShimToControl};
use driver_protocol::{envelope, raw};

/// Frames below this size are decoded as usual: copying a small chunk costs less than
/// sharing the read buffer with it (a shared buffer is not reused in place).
pub(crate) const SHARED_MIN: usize = 16 * 1024;

/// The fields of an `exec_output` event, `data` as a range of the event's body.
struct Fields {
    exec_id: u64,
    stream: OutputStream,
    data: Range<usize>,
}

/// The large `exec_output` event or `fs_data` reply whose whole frame is at the front of
/// `src`, with its data a slice of the frame, and the frame's length; `None` (and `src`
/// untouched) for any other frame, a frame not complete yet, or a small one.
pub(crate) fn take(src: &mut BytesMut, max_frame: usize) -> Option<(ShimToControl, usize)> {
    // Most frames are small: their length is all that is read.
    let head: [u8; HEADER_LEN] = src.get(..HEADER_LEN)?.try_into().ok()?;
    if (u32::from_be_bytes(head) as usize) < SHARED_MIN {
        return None;
    }
    take_large(src, max_frame)
}

/// [`take`] for a frame of at least [`SHARED_MIN`] bytes. Kept out of line: the read path
/// of small frames stays as it was.
#[inline(never)]
fn take_large(src: &mut BytesMut, max_frame: usize) -> Option<(ShimToControl, usize)> {
    let total = whole_large(src, max_frame)?;
    let msg = exec_output(src, total).or_else(|| fs_data(src, total))?;
    Some((msg, total))
}

/// The length, head included, of the frame of at least [`SHARED_MIN`] bytes that is whole
/// at the front of `src`; `None` for a small frame, or one not complete yet.
fn whole_large(src: &[u8], max_frame: usize) -> Option<usize> {
    let len = frame::parse_header(src, max_frame).ok()??;
    let total = HEADER_LEN.checked_add(len)?;
    (len >= SHARED_MIN && src.len() >= total).then_some(total)
}

/// The `exec_output` envelope in the `total` bytes of whole frame at the front of `src`,
/// split off it, its data a slice of the frame.
fn exec_output(src: &mut BytesMut, total: usize) -> Option<ShimToControl> {
    let body = src.get(HEADER_LEN..total)?;
    let (split, type_name) = envelope::split_envelope_head(body).ok()?;
    if type_name != "exec_output" {
        return None;
    }
    let event_at = (split.event.as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
    let fields = fields(split.event)?;
    let seq = split.seq;
    let start = HEADER_LEN
        .checked_add(event_at)?
        .checked_add(fields.data.start)?;
    let end = start.checked_add(fields.data.len())?;
    if end > total {
        return None;
    }
    let frame = src.split_to(total).freeze();
    let data: Bytes = frame.slice(start..end);
    let event = Event::ExecOutput(ExecOutput {
        exec_id: fields.exec_id,
        stream: fields.stream,
        data,
    });
    Some(ShimToControl::Event(EventEnvelope { seq, event }))
}

/// The `fs_data` reply in the `total` bytes of whole frame at the front of `src`, split off
/// it, its data a slice of the frame. The reply is decoded from its body with `data` left
/// out ([`raw::take_data`]): the same checks, the same message.
fn fs_data(src: &mut BytesMut, total: usize) -> Option<ShimToControl> {
    use driver_protocol::Message as _;
    let (small, range) = raw::take_data(src.get(HEADER_LEN..total)?)?;
    let Ok(ShimToControl::FsData(mut m)) = ShimToControl::decode(&small) else {
        // Another message with a `data`, or an error: the usual decoder says which.
        return None;
    };
    let start = HEADER_LEN.checked_add(range.start)?;
    let end = HEADER_LEN.checked_add(range.end)?;
    if end > total {
        return None;
    }
    let frame = src.split_to(total).freeze();
    m.data = frame.slice(start..end);
    Some(ShimToControl::FsData(m))
}

/// Reads `n` big-endian bytes at `at`.
fn be(body: &[u8], at: usize, n: usize) -> Option<u64> {
    let bytes = body.get(at..at.checked_add(n)?)?;
    Some(bytes.iter().fold(0u64, |v, &b| (v << 8) | u64::from(b)))
}

/// The string at `at`: its bytes and the position after it.
fn str_at(body: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let marker = *body.get(at)?;
    let (len, head) = match marker {
        0xa0..=0xbf => (usize::from(marker & 0x1f), 1),
        0xd9 => (usize::try_from(be(body, at + 1, 1)?).ok()?, 2),
        0xda => (usize::try_from(be(body, at + 1, 2)?).ok()?, 3),
        0xdb => (usize::try_from(be(body, at + 1, 4)?).ok()?, 5),
        _ => return None,
    };
    let start = at.checked_add(head)?;
    let end = start.checked_add(len)?;
    Some((body.get(start..end)?, end))
}

/// The fields of an `exec_output` event body in its plain form; `None` for anything else.
fn fields(body: &[u8]) -> Option<Fields> {
    let marker = *body.first()?;
    let (pairs, mut at) = match marker {
        0x80..=0x8f => (u64::from(marker & 0x0f), 1),
        0xde => (be(body, 1, 2)?, 3),
        0xdf => (be(body, 1, 4)?, 5),
        _ => return None,
    };
    let (mut exec_id, mut stream, mut data) = (None, None, None);
    let mut seen_type = false;
    for _ in 0..pairs {
        let (key, next) = str_at(body, at)?;
        at = next;
        let marker = *body.get(at)?;
        match key {
            b"type" if !seen_type => {
                seen_type = true;
                at = at.checked_add(raw::skip_value(body.get(at..)?).ok()?)?;
            }
            b"exec_id" if exec_id.is_none() => {
                let (v, n) = match marker {
                    0x00..=0x7f => (u64::from(marker), 0),
                    0xcc => (be(body, at + 1, 1)?, 1),
                    0xcd => (be(body, at + 1, 2)?, 2),
                    0xce => (be(body, at + 1, 4)?, 4),
                    0xcf => (be(body, at + 1, 8)?, 8),
                    _ => return None,
                };
                exec_id = Some(v);
                at = at.checked_add(1 + n)?;
            }
            b"stream" if stream.is_none() => {
                let (name, next) = str_at(body, at)?;
                stream = Some(match name {
                    b"stdout" => OutputStream::Stdout,
                    b"stderr" => OutputStream::Stderr,
                    b"pty" => OutputStream::Pty,
                    _ => return None,
                });
                at = next;
            }
            b"data" if data.is_none() => {
                let (len, head) = match marker {
                    0xc4 => (be(body, at + 1, 1)?, 2),
                    0xc5 => (be(body, at + 1, 2)?, 3),
                    0xc6 => (be(body, at + 1, 4)?, 5),
                    _ => return None,
                };
                let start = at.checked_add(head)?;
                let end = start.checked_add(usize::try_from(len).ok()?)?;
                body.get(start..end)?;
                data = Some(start..end);
                at = end;
            }
            b"type" | b"exec_id" | b"stream" | b"data" => return None,
            // Unknown fields are ignored, as the decoder does.
            _ => at = at.checked_add(raw::skip_value(body.get(at..)?).ok()?)?,
        }
    }
    if at != body.len() || !seen_type {
        return None;
    }
    Some(Fields {
        exec_id: exec_id?,
        stream: stream?,
        data: data?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use driver_protocol::Message as _;

    /// [`take`]'s `fs_data` path alone.
    fn take_fs_data(src: &mut BytesMut, max_frame: usize) -> Option<(ShimToControl, usize)> {
        let total = whole_large(src, max_frame)?;
        fs_data(src, total).map(|m| (m, total))
    }

    /// The frame of an `event` envelope around `event`'s body.
    fn frame_of(seq: u64, event: &[u8]) -> BytesMut {
        let mut body = Vec::new();
        envelope::encode_event_envelope(seq, event, &mut body);
        let mut out = Vec::new();
        frame::write_body(&mut out, usize::MAX, &body).expect("frame");
        BytesMut::from(&out[..])
    }

    /// What the usual decoder makes of the frame at the front of `src`.
    fn decoded(src: &BytesMut) -> ShimToControl {
        ShimToControl::decode(&src[HEADER_LEN..]).expect("decodes")
    }

    #[test]
    fn an_exec_output_is_the_decoders_event_with_its_data_in_the_frame() {
        for (len, stream) in [
            (SHARED_MIN, OutputStream::Stdout),
            (128 * 1024, OutputStream::Stderr),
            (70_000, OutputStream::Pty),
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let event = Event::ExecOutput(ExecOutput {
                exec_id: 1 << 40,
                stream,
                data: Bytes::from(data),
            });
            let body = event.to_body().expect("encodes");
            let mut src = frame_of(77, &body);
            let want = decoded(&src);
            src.extend_from_slice(b"\0\0\0\x05next!");
            let frame_start = src.as_ptr() as usize;
            let (got, taken) = take(&mut src, 1 << 24).expect("taken without a copy");
            assert_eq!(got, want);
            assert_eq!(&src[..], b"\0\0\0\x05next!", "only the frame is taken");
            assert!(taken > SHARED_MIN);
            let ShimToControl::Event(EventEnvelope {
                event: Event::ExecOutput(out),
                ..
            }) = got
            else {
                panic!("not an exec_output");
            };
            let at = (out.data.as_ptr() as usize).wrapping_sub(frame_start);
            assert!(
                at + out.data.len() <= taken,
                "the data is a slice of the frame (at {at})"
            );
        }
    }

    /// An `fs_data` reply is the decoder's, its data a slice of the frame; a small one, or
    /// another message with a `data`, is left to the decoder.
    #[test]
    fn an_fs_data_is_the_decoders_reply_with_its_data_in_the_frame() {
        use driver_protocol::message::FsData;
        let frame_of_msg = |msg: &ShimToControl| {
            let mut out = Vec::new();
            frame::write_body(&mut out, usize::MAX, &msg.to_body().expect("encodes"))
                .expect("frame");
            BytesMut::from(&out[..])
        };
        for (len, eof) in [(SHARED_MIN, false), (256 * 1024, true)] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let msg = ShimToControl::FsData(FsData {
                re: 5,
                offset: 1 << 35,
                data: Bytes::from(data),
                eof,
            });
            let mut src = frame_of_msg(&msg);
            src.extend_from_slice(b"\0\0\0\x05next!");
            let frame_start = src.as_ptr() as usize;
            let (got, taken) = take_fs_data(&mut src, 1 << 24).expect("taken without a copy");
            assert_eq!(got, msg);
            assert_eq!(&src[..], b"\0\0\0\x05next!", "only the frame is taken");
            let ShimToControl::FsData(d) = got else {
                panic!("not an fs_data");
            };
            let at = (d.data.as_ptr() as usize).wrapping_sub(frame_start);
            assert!(
                at + d.data.len() <= taken,
                "the data is a slice of the frame"
            );
        }
        let small = ShimToControl::FsData(FsData {
            re: 5,
            offset: 0,
            data: Bytes::from(vec![1u8; 100]),
            eof: false,
        });
        assert!(take_fs_data(&mut frame_of_msg(&small), 1 << 24).is_none());
        let output = Event::ExecOutput(ExecOutput {
            exec_id: 3,
            stream: OutputStream::Stdout,
            data: Bytes::from(vec![1u8; 20_000]),
        })
        .to_body()
        .expect("encodes");
        let mut other = frame_of(1, &output);
        assert!(take_fs_data(&mut other, 1 << 24).is_none());
        assert_eq!(
            other.len(),
            HEADER_LEN + u32::from_be_bytes(other[..4].try_into().unwrap()) as usize
        );
    }

    #[test]
    fn anything_else_is_left_to_the_decoder() {
        let big = vec![1u8; 20_000];
        let output = |data: Vec<u8>| {
            Event::ExecOutput(ExecOutput {
                exec_id: 3,
                stream: OutputStream::Stdout,
                data: Bytes::from(data),
            })
            .to_body()
            .expect("encodes")
        };
        // Small: decoded as usual.
        let mut small = frame_of(1, &output(vec![0; 100]));
        assert!(take(&mut small, 1 << 24).is_none());
        // Another event.
        let custom = rmpv::Value::Map(vec![
            ("type".into(), "custom".into()),
            ("kind".into(), "x".into()),
            ("data".into(), rmpv::Value::Binary(big.clone())),
        ]);
        let mut body = Vec::new();
        rmpv::encode::write_value(&mut body, &custom).expect("encodes");
        let mut other = frame_of(2, &body);
        assert!(take(&mut other, 1 << 24).is_none());
        // Incomplete.
        let whole = frame_of(3, &output(big.clone()));
        let mut part = BytesMut::from(&whole[..whole.len() - 1]);
        assert!(take(&mut part, 1 << 24).is_none());
        assert_eq!(part.len(), whole.len() - 1);
        // Over the frame limit.
        let mut whole2 = whole.clone();
        assert!(take(&mut whole2, 1000).is_none());
        // Not in its plain form: a field twice, a stream by another name, data as a string.
        let forms = [
            vec![
                ("type", rmpv::Value::from("exec_output")),
                ("exec_id", 1.into()),
                ("exec_id", 2.into()),
                ("stream", "stdout".into()),
                ("data", rmpv::Value::Binary(big.clone())),
            ],
            vec![
                ("type", rmpv::Value::from("exec_output")),
                ("exec_id", 1.into()),
                ("stream", "STDOUT".into()),
                ("data", rmpv::Value::Binary(big.clone())),
            ],
            vec![
                ("type", rmpv::Value::from("exec_output")),
                ("exec_id", 1.into()),
                ("stream", "stdout".into()),
                ("data", rmpv::Value::from("x".repeat(20_000))),
            ],
        ];
        for form in forms {
            let map = rmpv::Value::Map(form.into_iter().map(|(k, v)| (k.into(), v)).collect());
            let mut body = Vec::new();
            rmpv::encode::write_value(&mut body, &map).expect("encodes");
            let mut src = frame_of(4, &body);
            assert!(take(&mut src, 1 << 24).is_none(), "{map}");
        }
    }

    #[test]
    fn unknown_fields_and_any_order_are_read_as_the_decoder_reads_them() {
        let map = rmpv::Value::Map(vec![
            ("data".into(), rmpv::Value::Binary(vec![9; 40_000])),
            (
                "extra".into(),
                rmpv::Value::Array(vec![1.into(), "two".into()]),
            ),
            ("stream".into(), "stderr".into()),
            ("exec_id".into(), 300.into()),
            ("type".into(), "exec_output".into()),
        ]);
        let mut body = Vec::new();
        rmpv::encode::write_value(&mut body, &map).expect("encodes");
        let mut src = frame_of(5, &body);
        let want = decoded(&src);
        let (got, _) = take(&mut src, 1 << 24).expect("taken");
        assert_eq!(got, want);
        assert!(src.is_empty());
    }
}
