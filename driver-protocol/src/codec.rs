//! tokio-util codecs: frames ([`FrameCodec`]) and typed messages ([`MessageCodec`]).
//!
//! Both read and write the [`frame`] format, with a configurable maximum body
//! length (default [`DEFAULT_MAX_FRAME`]). Decoding checks a header against the maximum
//! before it reserves room for the body, and then reserves exactly the announced length, so a
//! peer cannot make the receiver allocate more than the maximum. Encoding writes straight
//! into the `Framed` write buffer: no per-message allocation once that buffer has grown.
//!
//! # Errors end the connection
//!
//! A decoding error means the peer is broken or hostile. After
//! [`DecodeError::FrameTooLarge`] the stream cannot be resynchronised (the next header is
//! somewhere inside bytes that will not be read), and after [`DecodeError::Malformed`] the
//! peer's state is unknown, so the caller sends an `error` message with
//! [`DecodeError::code`] (and `re` = [`DecodeError::request_id`]) and closes the connection;
//! `Framed` itself yields nothing more after an error. A message of an unknown `type` is
//! *not* an error: it decodes to the direction's `Unknown` variant, which the caller answers
//! with `error{code:"unsupported"}` while the connection stays up.
//!
//! With `tokio_util::codec::Framed` the codec turns a socket into a `Stream` of messages and a
//! `Sink` for them; here it is driven by hand:
//!
//! ```
//! use bytes::BytesMut;
//! use driver_protocol::codec::MessageCodec;
//! use driver_protocol::message::{DriverToShim, Pong, ShimToDriver};
//! use tokio_util::codec::{Decoder, Encoder};
//!
//! // A driver's end of the driver link writes what drivers send…
//! let mut driver = MessageCodec::<ShimToDriver, DriverToShim>::new();
//! // …and the shim's end reads it.
//! let mut shim = MessageCodec::<DriverToShim, ShimToDriver>::with_max_frame(1 << 20);
//!
//! let mut wire = BytesMut::new();
//! driver.encode(DriverToShim::Pong(Pong { re: 1 }), &mut wire)?;
//! let mut half = wire.split_to(3); // a partial read: no message yet
//! assert!(shim.decode(&mut half)?.is_none());
//! half.unsplit(wire);
//! assert_eq!(shim.decode(&mut half)?, Some(DriverToShim::Pong(Pong { re: 1 })));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::marker::PhantomData;

use bytes::{Buf, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::envelope::RawEvent;
use crate::frame::{self, HEADER_LEN};
use crate::message::{Message, ShimToControl};
use crate::{DecodeError, EncodeError, DEFAULT_MAX_FRAME};

/// Frames as raw bodies: decodes to the body bytes of each frame, encodes bodies.
///
/// For relays and for peers that dispatch on [`raw::read_head`](crate::raw::read_head)
/// themselves. See the [module docs](self) for what an error means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameCodec {
    max: usize,
}

impl FrameCodec {
    /// A codec with the default maximum body length, [`DEFAULT_MAX_FRAME`].
    pub fn new() -> Self {
        Self::with_max_frame(DEFAULT_MAX_FRAME)
    }

    /// A codec with a maximum body length of `max` bytes (at most `u32::MAX`), enforced when
    /// decoding and when encoding.
    pub fn with_max_frame(max: usize) -> Self {
        Self {
            max: frame::clamp_max(max),
        }
    }

    /// The maximum body length.
    pub fn max_frame(&self) -> usize {
        self.max
    }

    /// The body length of the complete frame at the start of `src`, or `None` after
    /// reserving room for the rest of it.
    fn complete_frame(&self, src: &mut BytesMut) -> Result<Option<usize>, DecodeError> {
        let Some(len) = frame::parse_header(src, self.max)? else {
            src.reserve(HEADER_LEN - src.len());
            return Ok(None);
        };
        // `len <= max`: this reserves at most one maximal frame.
        let want = HEADER_LEN + len;
        if src.len() < want {
            src.reserve(want - src.len());
            return Ok(None);
        }
        Ok(Some(len))
    }

    fn truncated(&self, src: &BytesMut) -> DecodeError {
        let want = match frame::parse_header(src, self.max) {
            Ok(Some(len)) => HEADER_LEN + len,
            _ => HEADER_LEN,
        };
        DecodeError::Truncated {
            have: src.len(),
            want,
        }
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder for FrameCodec {
    type Item = BytesMut;
    type Error = DecodeError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, DecodeError> {
        let Some(len) = self.complete_frame(src)? else {
            return Ok(None);
        };
        src.advance(HEADER_LEN);
        Ok(Some(src.split_to(len)))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, DecodeError> {
        match self.decode(src)? {
            Some(body) => Ok(Some(body)),
            None if src.is_empty() => Ok(None),
            None => Err(self.truncated(src)),
        }
    }
}

impl Encoder<&[u8]> for FrameCodec {
    type Error = EncodeError;

    fn encode(&mut self, body: &[u8], dst: &mut BytesMut) -> Result<(), EncodeError> {
        frame::write_body(dst, self.max, body)
    }
}

impl Encoder<Bytes> for FrameCodec {
    type Error = EncodeError;

    fn encode(&mut self, body: Bytes, dst: &mut BytesMut) -> Result<(), EncodeError> {
        frame::write_body(dst, self.max, &body)
    }
}

/// Typed messages: decodes frames into `In`, encodes `Out` into frames.
///
/// Each end of a link names its directions, e.g. the shim's end of the driver link is
/// `MessageCodec<DriverToShim, ShimToDriver>` and a driver's is
/// `MessageCodec<ShimToDriver, DriverToShim>`. See the [module docs](self) for what an error
/// means.
pub struct MessageCodec<In, Out> {
    frames: FrameCodec,
    _types: Directions<In, Out>,
}

/// Reads `In`, writes `Out`: `Send`, `Sync` and `Unpin` whatever the message types are.
type Directions<In, Out> = PhantomData<(fn() -> In, fn(Out))>;

impl<In, Out> MessageCodec<In, Out> {
    /// A codec with the default maximum body length, [`DEFAULT_MAX_FRAME`].
    pub fn new() -> Self {
        Self::with_max_frame(DEFAULT_MAX_FRAME)
    }

    /// A codec with a maximum body length of `max` bytes (at most `u32::MAX`), enforced when
    /// decoding and when encoding.
    pub fn with_max_frame(max: usize) -> Self {
        Self {
            frames: FrameCodec::with_max_frame(max),
            _types: PhantomData,
        }
    }

    /// The maximum body length.
    pub fn max_frame(&self) -> usize {
        self.frames.max
    }
}

impl<In, Out> Default for MessageCodec<In, Out> {
    fn default() -> Self {
        Self::new()
    }
}

impl<In, Out> Clone for MessageCodec<In, Out> {
    fn clone(&self) -> Self {
        Self {
            frames: self.frames,
            _types: PhantomData,
        }
    }
}

impl<In, Out> fmt::Debug for MessageCodec<In, Out> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MessageCodec")
            .field("in", &std::any::type_name::<In>())
            .field("out", &std::any::type_name::<Out>())
            .field("max", &self.frames.max)
            .finish()
    }
}

impl<In: Message, Out> Decoder for MessageCodec<In, Out> {
    type Item = In;
    type Error = DecodeError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, DecodeError> {
        let Some(len) = self.frames.complete_frame(src)? else {
            return Ok(None);
        };
        // Decoded from the buffer in place; the frame is consumed even when it is malformed.
        let msg = In::decode(&src[HEADER_LEN..HEADER_LEN + len]);
        src.advance(HEADER_LEN + len);
        msg.map(Some)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<In>, DecodeError> {
        match self.decode(src)? {
            Some(msg) => Ok(Some(msg)),
            None if src.is_empty() => Ok(None),
            None => Err(self.frames.truncated(src)),
        }
    }
}

impl<In, Out: Message> Encoder<&Out> for MessageCodec<In, Out> {
    type Error = EncodeError;

    fn encode(&mut self, msg: &Out, dst: &mut BytesMut) -> Result<(), EncodeError> {
        frame::write_message(dst, self.frames.max, msg)
    }
}

impl<In, Out: Message> Encoder<Out> for MessageCodec<In, Out> {
    type Error = EncodeError;

    fn encode(&mut self, msg: Out, dst: &mut BytesMut) -> Result<(), EncodeError> {
        frame::write_message(dst, self.frames.max, &msg)
    }
}

/// The relay path: an `event` envelope around an event body that is forwarded as it arrived
/// (see [`envelope::encode_event_envelope`](crate::envelope::encode_event_envelope)).
impl<In> Encoder<RawEvent<'_>> for MessageCodec<In, ShimToControl> {
    type Error = EncodeError;

    fn encode(&mut self, ev: RawEvent<'_>, dst: &mut BytesMut) -> Result<(), EncodeError> {
        frame::write_event_envelope(dst, self.frames.max, ev.seq, ev.event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{ControlToShim, Event, EventEnvelope, Ping, Progress, Unknown};

    #[test]
    fn frames_split_across_reads() {
        let mut codec = FrameCodec::with_max_frame(16);
        let mut wire = BytesMut::new();
        codec.encode(&b"hello"[..], &mut wire).unwrap();
        codec.encode(Bytes::from_static(b""), &mut wire).unwrap();
        let mut src = BytesMut::new();
        let mut got = Vec::new();
        for b in wire {
            src.extend_from_slice(&[b]);
            while let Some(frame) = codec.decode(&mut src).unwrap() {
                got.push(frame);
            }
        }
        assert_eq!(got, [&b"hello"[..], b""]);
        assert!(codec.decode_eof(&mut src).unwrap().is_none());
    }

    #[test]
    fn oversized_header_fails_before_reserving() {
        let mut codec = FrameCodec::with_max_frame(1024);
        let mut src = BytesMut::from(&[0xff, 0xff, 0xff, 0xff][..]);
        let err = codec.decode(&mut src).unwrap_err();
        assert!(matches!(err, DecodeError::FrameTooLarge { max: 1024, .. }));
        assert!(src.capacity() < 1024);
        assert!(codec
            .encode(&[0u8; 1025][..], &mut BytesMut::new())
            .is_err());
    }

    #[test]
    fn eof_inside_a_frame_is_truncated() {
        let mut codec = FrameCodec::new();
        let mut src = BytesMut::from(&[0, 0, 0, 5, 1, 2][..]);
        assert!(codec.decode(&mut src).unwrap().is_none());
        assert!(src.capacity() >= 9);
        assert!(matches!(
            codec.decode_eof(&mut src),
            Err(DecodeError::Truncated { have: 6, want: 9 })
        ));
        let mut src = BytesMut::from(&[0, 0][..]);
        assert!(matches!(
            codec.decode_eof(&mut src),
            Err(DecodeError::Truncated { have: 2, want: 4 })
        ));
    }

    #[test]
    fn messages_round_trip_and_unknown_is_not_an_error() {
        let mut tx = MessageCodec::<ShimToControl, ControlToShim>::with_max_frame(4096);
        let mut rx = MessageCodec::<ControlToShim, ShimToControl>::with_max_frame(4096);
        let mut wire = BytesMut::new();
        tx.encode(ControlToShim::Ping(Ping { id: 3 }), &mut wire)
            .unwrap();
        frame::write_body(&mut wire, 4096, b"\x82\xa4type\xa4nope\xa2id\x04").unwrap();
        assert_eq!(
            rx.decode(&mut wire).unwrap(),
            Some(ControlToShim::Ping(Ping { id: 3 }))
        );
        assert_eq!(
            rx.decode(&mut wire).unwrap(),
            Some(ControlToShim::Unknown(Unknown {
                type_name: "nope".into(),
                id: Some(4)
            }))
        );
        assert!(wire.is_empty());
    }

    #[test]
    fn raw_event_encodes_like_the_typed_envelope() {
        let event = Event::Progress(Progress {
            task_id: Some("t".into()),
            message: None,
            done: Some(3),
            total: None,
        });
        let body = event.to_body().unwrap();
        let mut codec = MessageCodec::<ControlToShim, ShimToControl>::new();
        let (mut raw, mut typed) = (BytesMut::new(), BytesMut::new());
        codec
            .encode(
                RawEvent {
                    seq: 300,
                    event: &body,
                },
                &mut raw,
            )
            .unwrap();
        let msg = ShimToControl::Event(EventEnvelope { seq: 300, event });
        codec.encode(&msg, &mut typed).unwrap();
        assert_eq!(raw, typed);
        let mut rx = MessageCodec::<ShimToControl, ControlToShim>::new();
        assert_eq!(rx.decode(&mut raw).unwrap(), Some(msg));
    }
}
