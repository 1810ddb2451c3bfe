//! Arbitrary bytes as a stream of frames, through every decoder of driver-protocol.
//!
//! Run from `driver-protocol/` (cargo-fuzz and the nightly toolchain are needed):
//!
//! ```text
//! cargo install cargo-fuzz
//! cargo +nightly fuzz run decode_frame -- -max_total_time=20
//! ```
//!
//! The first input byte sets how many bytes each simulated read delivers; the rest is the
//! stream. It goes to `FrameCodec`, to `MessageCodec` for every direction and to the blocking
//! `FrameReader`; each frame body, and the whole input as a body, goes to `raw::read_head`,
//! `envelope::split_envelope` and `Message::decode` of every direction. Besides never panicking,
//! whatever decodes must encode and decode again to the same bytes, and
//! `envelope::split_envelope_head` must agree with `split_envelope` followed by `read_head`, and
//! whatever `check::relayable_event` accepts must decode as a driver message of that type.

#![no_main]

use bytes::BytesMut;
use driver_protocol::blocking::FrameReader;
use driver_protocol::codec::{FrameCodec, MessageCodec};
use driver_protocol::message::{
    ControlToShim, DriverToShim, Event, Message, ShimToControl, ShimToDriver,
};
use driver_protocol::{check, envelope, raw, EncodeError};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

/// Small enough that a hostile header can never make the fuzzer reserve much.
const MAX: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let Some((&step, wire)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);

    bodies(wire);
    for body in drain(FrameCodec::with_max_frame(MAX), wire, step) {
        bodies(&body);
    }
    drain(
        MessageCodec::<DriverToShim, ShimToDriver>::with_max_frame(MAX),
        wire,
        step,
    );
    drain(
        MessageCodec::<ShimToDriver, DriverToShim>::with_max_frame(MAX),
        wire,
        step,
    );
    drain(
        MessageCodec::<ControlToShim, ShimToControl>::with_max_frame(MAX),
        wire,
        step,
    );
    drain(
        MessageCodec::<ShimToControl, ControlToShim>::with_max_frame(MAX),
        wire,
        step,
    );

    let mut reader = FrameReader::with_max_frame(wire, MAX);
    while let Ok(Some(body)) = reader.read_frame() {
        let _ = raw::read_head(body);
    }
});

/// Feeds `wire` to `codec` `step` bytes at a time; returns what it decoded before an error.
fn drain<D: Decoder>(mut codec: D, wire: &[u8], step: usize) -> Vec<D::Item> {
    let mut src = BytesMut::new();
    let mut items = Vec::new();
    for chunk in wire.chunks(step) {
        src.extend_from_slice(chunk);
        loop {
            match codec.decode(&mut src) {
                Ok(Some(item)) => items.push(item),
                Ok(None) => break,
                Err(_) => return items,
            }
        }
    }
    while let Ok(Some(item)) = codec.decode_eof(&mut src) {
        items.push(item);
    }
    items
}

fn bodies(body: &[u8]) {
    let _ = raw::read_head(body);
    let _ = envelope::split_envelope(body);
    // The one-pass split is the two walks, in success and in failure.
    let two = envelope::split_envelope(body)
        .and_then(|s| raw::read_head(s.event).map(|h| (s, h.type_name)));
    assert_eq!(envelope::split_envelope_head(body).ok(), two.ok());
    // The relay's check is never laxer than the decoder.
    if let Some(type_name) = check::relayable_event(body) {
        let decoded = DriverToShim::decode(body).map(|m| m.type_name().to_owned());
        assert_eq!(decoded.ok().as_deref(), Some(type_name));
    }
    let _ = raw::skip_value(body);
    stable::<DriverToShim>(body);
    stable::<ShimToDriver>(body);
    stable::<ControlToShim>(body);
    stable::<ShimToControl>(body);
    stable::<Event>(body);
}

/// Whatever decodes re-encodes, and decodes again to the same encoding.
fn stable<M: Message>(body: &[u8]) {
    let Ok(msg) = M::decode(body) else {
        return;
    };
    if !M::TYPES.contains(&msg.type_name()) {
        return; // Unknown: not encodable by design
    }
    let once = match msg.to_body() {
        Ok(b) => b,
        // An `event` envelope around an unknown event decodes but cannot be encoded.
        Err(EncodeError::Unencodable(_)) => return,
        Err(e) => panic!("decoded message does not encode: {e}"),
    };
    let again = M::decode(&once).expect("re-encoded message decodes");
    assert_eq!(again.to_body().expect("encodes twice"), once);
}
