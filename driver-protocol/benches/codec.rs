//! Encode and decode cost of one ~200-byte event, per message.
//!
//! ```text
//! cargo bench -p driver-protocol --bench codec --target x86_64-unknown-linux-musl \
//!     -- --sample-size 64 --sample-count 300
//! ```
//!
//! Every benchmark handles one message per iteration and counts it, so divan prints the time
//! per message and the throughput in messages per second. `reused_buffer` is how the codecs
//! encode; `to_vec_named` is the allocate-per-message way they avoid; `relay_*` is the shim's
//! per-event work when it forwards a driver's event to the control plane.

use std::hint::black_box;

use bytes::BytesMut;
use divan::counter::ItemsCount;
use divan::Bencher;
use driver_protocol::codec::MessageCodec;
use driver_protocol::frame::{self, HEADER_LEN};
use driver_protocol::message::{
    DriverToShim, Event, EventEnvelope, Message, MessageChunk, ShimToControl,
};
use driver_protocol::{envelope, raw};
use tokio_util::codec::{Decoder, Encoder};

const MAX: usize = driver_protocol::DEFAULT_MAX_FRAME;

fn chunk() -> MessageChunk {
    MessageChunk {
        task_id: Some("task-7f3a9c1e".into()),
        text: "The tests pass now. I changed the parser to reject trailing bytes and added a \
               regression test for the empty-input case; next I will look at the CLI flags."
            .into(),
        role: Some("assistant".into()),
        is_final: false,
    }
}

fn driver_event() -> DriverToShim {
    DriverToShim::MessageChunk(chunk())
}

fn body() -> Vec<u8> {
    driver_event().to_body().unwrap()
}

fn main() {
    println!(
        "event body: {} bytes; envelope body: {} bytes",
        body().len(),
        ShimToControl::Event(EventEnvelope {
            seq: 123_456,
            event: Event::MessageChunk(chunk())
        })
        .to_body()
        .unwrap()
        .len()
    );
    divan::main();
}

fn one() -> ItemsCount {
    ItemsCount::new(1usize)
}

/// `Message::encode_to` behind a frame header, into a reused buffer.
#[divan::bench]
fn encode_reused_buffer(bencher: Bencher) {
    let msg = driver_event();
    let mut buf = Vec::with_capacity(4096);
    bencher.counter(one()).bench_local(|| {
        buf.clear();
        frame::write_message(&mut buf, MAX, black_box(&msg)).unwrap();
        black_box(buf.len())
    });
}

/// The tokio `Encoder`, into a reused `BytesMut` as `Framed` does.
#[divan::bench]
fn encode_codec(bencher: Bencher) {
    let msg = driver_event();
    let mut codec = MessageCodec::<DriverToShim, DriverToShim>::new();
    let mut buf = BytesMut::with_capacity(4096);
    bencher.counter(one()).bench_local(|| {
        buf.clear();
        codec.encode(black_box(&msg), &mut buf).unwrap();
        black_box(buf.len())
    });
}

/// For comparison: a fresh vector per message.
#[divan::bench]
fn encode_to_vec_named(bencher: Bencher) {
    let msg = driver_event();
    bencher
        .counter(one())
        .bench_local(|| rmp_serde::to_vec_named(black_box(&msg)).unwrap());
}

/// `Message::decode` of a body.
#[divan::bench]
fn decode_body(bencher: Bencher) {
    let body = body();
    bencher
        .counter(one())
        .bench_local(|| DriverToShim::decode(black_box(&body)).unwrap());
}

/// Encode and decode through the tokio codec, as two ends of a link do.
#[divan::bench]
fn round_trip_codec(bencher: Bencher) {
    let msg = driver_event();
    let mut codec = MessageCodec::<DriverToShim, DriverToShim>::new();
    let mut buf = BytesMut::with_capacity(4096);
    bencher.counter(one()).bench_local(|| {
        codec.encode(black_box(&msg), &mut buf).unwrap();
        codec.decode(&mut buf).unwrap().unwrap()
    });
}

/// The relay without re-encoding: check the driver's frame (header and `raw::read_head`),
/// then splice its body into an `event` envelope frame.
#[divan::bench]
fn relay_splice(bencher: Bencher) {
    let mut wire = Vec::new();
    frame::write_message(&mut wire, MAX, &driver_event()).unwrap();
    let mut out = BytesMut::with_capacity(4096);
    let mut seq = 0;
    bencher.counter(one()).bench_local(|| {
        let wire = black_box(&wire[..]);
        let len = frame::parse_header(wire, MAX).unwrap().unwrap();
        let body = &wire[HEADER_LEN..HEADER_LEN + len];
        let head = raw::read_head(body).unwrap();
        assert!(Event::TYPES.contains(&head.type_name));
        seq += 1;
        out.clear();
        frame::write_event_envelope(&mut out, MAX, seq, body).unwrap();
        black_box(out.len())
    });
}

/// The relay as the shim must do it: decode the driver's event to validate every field, then
/// forward its original bytes in an envelope (no re-encoding).
#[divan::bench]
fn relay_validate_splice(bencher: Bencher) {
    let body = body();
    let mut out = BytesMut::with_capacity(4096);
    let mut seq = 0;
    bencher.counter(one()).bench_local(|| {
        let body = black_box(&body[..]);
        let msg = DriverToShim::decode(body).unwrap();
        assert!(Event::TYPES.contains(&msg.type_name()));
        seq += 1;
        out.clear();
        frame::write_event_envelope(&mut out, MAX, seq, body).unwrap();
        black_box(out.len())
    });
}

/// The relay the slow way: decode the driver's message, re-encode it in an envelope.
#[divan::bench]
fn relay_decode_reencode(bencher: Bencher) {
    let body = body();
    let mut out = BytesMut::with_capacity(4096);
    let mut seq = 0;
    bencher.counter(one()).bench_local(|| {
        let DriverToShim::MessageChunk(c) = DriverToShim::decode(black_box(&body)).unwrap() else {
            unreachable!()
        };
        seq += 1;
        let msg = ShimToControl::Event(EventEnvelope {
            seq,
            event: Event::MessageChunk(c),
        });
        out.clear();
        frame::write_message(&mut out, MAX, &msg).unwrap();
        black_box(out.len())
    });
}

/// What control-link does with each event: decode the envelope and the event in it.
#[divan::bench]
fn decode_envelope(bencher: Bencher) {
    let mut env = Vec::new();
    envelope::encode_event_envelope(123_456, &body(), &mut env);
    bencher
        .counter(one())
        .bench_local(|| ShimToControl::decode(black_box(&env)).unwrap());
}
