//! The `event` envelope (`{type: "event", seq, event}`), read and written without decoding
//! the event inside: what the shim's relay writes around each driver event, and what a
//! control plane that hands events on splits apart.
//!
//! [`split_envelope`] finds the `seq` and the raw bytes of the event inside an envelope (with
//! [`split_envelope_head`], also the event's `type`, in the same pass);
//! [`encode_event_envelope`] writes an envelope around an event body without touching it,
//! byte-identical to what [`ShimToControl::Event`](crate::message::ShimToControl::Event)
//! encodes to. The body is checked by [`raw`](crate::raw)'s walker exactly as
//! [`read_head`] checks any message. The typed decoders of `message` learn an envelope's
//! parts from the same walk, so decoding one does not walk it twice.
//!
//! ```
//! use driver_protocol::envelope;
//! use driver_protocol::message::{Event, Message, Progress};
//!
//! let event = Event::Progress(Progress {
//!     task_id: Some("t1".into()),
//!     message: Some("halfway".into()),
//!     done: Some(1),
//!     total: Some(2),
//! });
//! let body = event.to_body()?;
//! let mut out = Vec::new();
//! envelope::encode_event_envelope(7, &body, &mut out);
//! let split = envelope::split_envelope(&out)?;
//! assert_eq!((split.seq, split.event), (7, &body[..]));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::ops::Range;

use bytes::BufMut;

use crate::mpack::{is, Cursor, Token};
use crate::raw::{read_head, walk, walk_map, TopLevel};
use crate::DecodeError;

/// The `type` and `id` of a message, read before its fields so that the fields can be decoded
/// into the right struct and an error reply can carry `re`; for an envelope, its parts too.
#[derive(Debug)]
pub(crate) struct Head<'a> {
    pub(crate) type_name: &'a str,
    pub(crate) id: Option<u64>,
    /// For a valid `event` envelope: its `seq` and the range of its event in the body (found
    /// by the same walk, so that decoding the envelope does not walk it again).
    pub(crate) envelope: Option<(u64, Range<usize>)>,
}

/// [`read_head`] in the shape the message decoders use.
pub(crate) fn peek(body: &[u8]) -> Result<Head<'_>, DecodeError> {
    let top = walk(body)?;
    // An envelope's parts come from the same walk: decoding it does not walk it again.
    let envelope = match top.type_name {
        "event" => envelope_parts(&top)
            .ok()
            .map(|range| (top.seq.unwrap_or_default(), range)),
        _ => None,
    };
    Ok(Head {
        type_name: top.type_name,
        id: top.id,
        envelope,
    })
}

/// An `event` envelope with its event still encoded: what the relay forwards and what
/// [`split_envelope`] finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawEvent<'a> {
    /// The envelope's sequence number (a [`Seq`](crate::message::Seq)).
    pub seq: u64,
    /// The MessagePack body of the event (a map with its own `type`), e.g. a driver's event
    /// exactly as it arrived.
    pub event: &'a [u8],
}

/// Finds the `seq` and the raw event inside the body of an `event` envelope.
///
/// The whole body is checked as by [`read_head`]; the event's own fields are not decoded.
pub fn split_envelope(body: &[u8]) -> Result<RawEvent<'_>, DecodeError> {
    let top = walk(body)?;
    let range = envelope_parts(&top)?;
    let seq = top.seq.unwrap_or_default();
    Ok(RawEvent {
        seq,
        event: body.get(range).unwrap_or_default(),
    })
}

/// [`split_envelope`] and [`read_head`] of the event in one pass over the body: the `seq`,
/// the event, and the event's `type`.
///
/// Accepts and rejects exactly what `split_envelope` followed by `read_head` of the event
/// do. What a control plane that hands events on without decoding them needs of each.
///
/// ```
/// use driver_protocol::message::{Event, Message, Progress};
/// use driver_protocol::envelope;
///
/// let body = Event::Progress(Progress { task_id: None, message: None, done: None, total: None })
///     .to_body()?;
/// let mut out = Vec::new();
/// envelope::encode_event_envelope(9, &body, &mut out);
/// let (split, type_name) = envelope::split_envelope_head(&out)?;
/// assert_eq!((split.seq, split.event, type_name), (9, &body[..], "progress"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn split_envelope_head(body: &[u8]) -> Result<(RawEvent<'_>, &str), DecodeError> {
    if let Some(found) = as_written(body) {
        return Ok(found);
    }
    let mut cur = Cursor::new(body);
    let walked = walk_map(&mut cur, true);
    let (top, event_type) = match walked {
        Ok((top, Some(event_type))) if cur.at_end() && event_type != "event" => (top, event_type),
        // Trailing bytes, an error, an envelope whose `type` came after its `event`, or an
        // event whose own `type` is "event" (whose nested `event` the two walks check at
        // another depth): the two walks, which also give the error.
        _ => {
            let split = split_envelope(body)?;
            let type_name = read_head(split.event)?.type_name;
            return Ok((split, type_name));
        }
    };
    let range = envelope_parts(&top)?;
    let seq = top.seq.unwrap_or_default();
    let split = RawEvent {
        seq,
        event: body.get(range).unwrap_or_default(),
    };
    Ok((split, event_type))
}

/// [`split_envelope_head`] of an envelope as [`encode_event_envelope`] writes it (what the
/// shim sends): its `type`, its `seq` as an unsigned integer and its `event`, in that order,
/// read at their places; only the event is walked. `None` for an envelope in any other
/// shape, and for one whose event does not check or is itself of type `"event"`: the
/// general walk reads those, and gives the error.
///
/// What it accepts, the general walk accepts with the same answer: a map of these three
/// keys, once each, `type` "event" first (so the event is walked as a message of its own),
/// and nothing after the event.
fn as_written(body: &[u8]) -> Option<(RawEvent<'_>, &str)> {
    let (prefix, rest) = body.split_first_chunk::<16>()?;
    // Sixteen bytes compared as one number.
    if u128::from_ne_bytes(*prefix) != u128::from_ne_bytes(*ENVELOPE_PREFIX) {
        return None;
    }
    let mut cur = Cursor::new(rest);
    let Ok(Token::Uint(seq)) = cur.token() else {
        return None;
    };
    if !is(cur.take(EVENT_KEY.len()).ok()?, EVENT_KEY) {
        return None;
    }
    let event = rest.get(cur.pos..)?;
    let mut cur = Cursor::new(event);
    let (top, _) = walk_map(&mut cur, false).ok()?;
    if !cur.at_end() || is(top.type_name.as_bytes(), b"event") {
        return None;
    }
    Some((RawEvent { seq, event }, top.type_name))
}

/// The byte range of the event inside the body of an `event` envelope (see
/// [`split_envelope`]).
pub fn event_body_range(body: &[u8]) -> Result<Range<usize>, DecodeError> {
    let top = walk(body)?;
    envelope_parts(&top)
}

/// The most bytes the `event` envelope adds to the event body it carries: the map, its
/// `type`, `seq` (at its largest, a `u64` over `u32::MAX`) and `event` keys and values.
pub const EVENT_ENVELOPE_OVERHEAD: usize = 31;

/// The largest event body the shim accepts to relay (from the driver): whatever its `seq`,
/// its `event` envelope fits a frame of [`DEFAULT_MAX_FRAME`](crate::DEFAULT_MAX_FRAME).
pub const MAX_EVENT_BODY: usize = crate::DEFAULT_MAX_FRAME - EVENT_ENVELOPE_OVERHEAD;

/// Appends the body of `{type: "event", seq, event}` to `out`, with `event_body` copied in
/// as it is.
///
/// The output is byte-identical to the body of
/// [`ShimToControl::Event`](crate::message::ShimToControl::Event) when `event_body` is what
/// [`Event::to_body`](crate::message::Message::to_body) gives. `event_body` is not checked:
/// pass only a body that decoded as an event (as the shim does with a driver's events), or
/// the receiver will reject the envelope.
pub fn encode_event_envelope<B: BufMut + ?Sized>(seq: u64, event_body: &[u8], out: &mut B) {
    let (head, len) = envelope_head(seq);
    out.put_slice(head.get(..len).unwrap_or_default());
    out.put_slice(event_body);
}

/// The start of an envelope (fixmap(3), `"type": "event"`, `"seq":`) up to its `seq`.
pub(crate) const ENVELOPE_PREFIX: &[u8; 16] = b"\x83\xa4type\xa5event\xa3seq";

/// The key between an envelope's `seq` and its event.
pub(crate) const EVENT_KEY: &[u8; 6] = b"\xa5event";

/// The envelope up to its event, `{type: "event", seq: <seq>, event: `, as
/// [`encode_event_envelope`] writes it: the bytes (the first `len` of the array) and `len`.
///
/// Written on the stack at fixed places (no writer, no call per field): the relay writes
/// one per event.
pub(crate) fn envelope_head(seq: u64) -> ([u8; EVENT_ENVELOPE_OVERHEAD], usize) {
    // The seq in its most compact form, as rmp-serde (and every MessagePack encoder)
    // writes it: a marker (or a positive fixint) and `width` bytes, big-endian.
    let (marker, width) = match seq {
        0..=0x7f => (seq as u8, 0),
        0x80..=0xff => (0xcc, 1),
        0x100..=0xffff => (0xcd, 2),
        0x1_0000..=0xffff_ffff => (0xce, 4),
        _ => (0xcf, 8),
    };
    let mut head = [0u8; EVENT_ENVELOPE_OVERHEAD];
    let (prefix, rest) = head.split_at_mut(ENVELOPE_PREFIX.len());
    prefix.copy_from_slice(ENVELOPE_PREFIX);
    let Some((first, uint)) = rest.split_first_mut() else {
        return (head, 0); // unreachable: the array has room for the longest head
    };
    *first = marker;
    // The low `width` bytes of the seq, as the high bytes of a shifted copy: all eight
    // are written, the event key then goes over what is not the seq's.
    let shifted = seq.checked_shl(8 * (8 - width)).unwrap_or(0);
    if let Some(dst) = uint.get_mut(..8) {
        dst.copy_from_slice(&shifted.to_be_bytes());
    }
    let at = width as usize;
    if let Some(dst) = uint.get_mut(at..at + EVENT_KEY.len()) {
        dst.copy_from_slice(EVENT_KEY);
    }
    (head, ENVELOPE_PREFIX.len() + 1 + at + EVENT_KEY.len())
}

fn envelope_parts(top: &TopLevel<'_>) -> Result<Range<usize>, DecodeError> {
    let malformed = |detail: &str| DecodeError::malformed(Some(top.type_name), top.id, detail);
    if top.type_name != "event" {
        return Err(malformed("not an `event` envelope"));
    }
    if !top.seq_seen {
        return Err(malformed("missing field `seq`"));
    }
    if top.seq.is_none() {
        return Err(malformed("`seq` is not an unsigned integer"));
    }
    let Some(event) = &top.event else {
        return Err(malformed("missing field `event`"));
    };
    Ok(event.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{
        Event, EventEnvelope, ExecOutput, Message, MessageChunk, OutputStream, ShimToControl,
    };
    use crate::raw::tests::{detail, nested};
    use crate::MAX_DEPTH;

    /// Seqs at every edge of MessagePack's uint widths.
    const SEQ_EDGES: [u64; 11] = [
        0,
        1,
        0x7f,
        0x80,
        0xff,
        0x100,
        0xffff,
        0x1_0000,
        0xffff_ffff,
        0x1_0000_0000,
        u64::MAX,
    ];

    #[test]
    fn the_largest_relayed_event_fits_its_envelope_in_a_frame() {
        for seq in [0, 0x7f, 0xff, 0xffff, u64::from(u32::MAX), u64::MAX] {
            let mut out = Vec::new();
            encode_event_envelope(seq, &[], &mut out);
            assert!(
                out.len() <= EVENT_ENVELOPE_OVERHEAD,
                "seq {seq}: {}",
                out.len()
            );
            if seq == u64::MAX {
                assert_eq!(out.len(), EVENT_ENVELOPE_OVERHEAD, "the overhead is exact");
            }
        }
        assert_eq!(
            MAX_EVENT_BODY + EVENT_ENVELOPE_OVERHEAD,
            crate::DEFAULT_MAX_FRAME
        );
    }

    #[test]
    fn an_envelope_does_not_deepen_its_event() {
        // An event as deep as allowed on its own…
        let mut event = b"\x82\xa4type\xa6custom\xa4data".to_vec();
        event.extend_from_slice(&nested(MAX_DEPTH - 1, 1));
        assert!(read_head(&event).is_ok());
        // …is still fine inside an envelope,
        let mut env = Vec::new();
        encode_event_envelope(1, &event, &mut env);
        assert!(read_head(&env).is_ok());
        assert_eq!(split_envelope(&env).unwrap().event, &event[..]);
        // but an `event` field of any other message counts at its true depth.
        let mut other = b"\x82\xa4type\xa4ping\xa5event".to_vec();
        other.extend_from_slice(&nested(MAX_DEPTH, 1));
        assert!(read_head(&other).is_err());
        let mut other = b"\x82\xa4type\xa4ping\xa5event".to_vec();
        other.extend_from_slice(&nested(MAX_DEPTH - 1, 1));
        assert!(read_head(&other).is_ok());
    }

    /// `split_envelope` and then `read_head` of its event, as one result.
    fn two_walks(body: &[u8]) -> Option<(RawEvent<'_>, &str)> {
        let split = split_envelope(body).ok()?;
        Some((split, read_head(split.event).ok()?.type_name))
    }

    #[test]
    fn one_pass_split_is_the_two_walks() {
        let event = b"\x82\xa4type\xa6custom\xa4data\xc0".to_vec();
        let mut env = Vec::new();
        encode_event_envelope(300, &event, &mut env);
        let (split, type_name) = split_envelope_head(&env).unwrap();
        assert_eq!(
            (split.seq, split.event, type_name),
            (300, &event[..], "custom")
        );

        // As the shim writes it, at every width of `seq`: read at its places, the same
        // answer as the two walks.
        for seq in SEQ_EDGES {
            let mut env = Vec::new();
            encode_event_envelope(seq, &event, &mut env);
            assert!(as_written(&env).is_some(), "seq {seq}");
            assert_eq!(split_envelope_head(&env).ok(), two_walks(&env), "seq {seq}");
            assert_eq!(split_envelope_head(&env).unwrap().0.seq, seq);
        }
        // A `seq` in a signed encoding: the general walk, same answer.
        let signed = b"\x83\xa4type\xa5event\xa3seq\xd0\x05\xa5event\x81\xa4type\xa1x";
        assert!(as_written(signed).is_none());
        assert_eq!(split_envelope_head(signed).ok(), two_walks(signed));
        assert_eq!(split_envelope_head(signed).unwrap().0.seq, 5);

        // The event before the `type`: the two walks, same answer.
        let mut late = b"\x83\xa5event".to_vec();
        late.extend_from_slice(&event);
        late.extend_from_slice(b"\xa3seq\x07\xa4type\xa5event");
        assert_eq!(split_envelope_head(&late).unwrap().1, "custom");

        // An event as deep as allowed, and one level deeper; an event of type "event"
        // whose own `event` is deep; trailing bytes; a key that is not a string; a `type`
        // twice; the envelope cut short anywhere.
        let deep = |levels| {
            let mut e = b"\x82\xa4type\xa6custom\xa4data".to_vec();
            e.extend_from_slice(&nested(levels, 1));
            e
        };
        let mut inner_event = b"\x82\xa4type\xa5event\xa5event".to_vec();
        inner_event.extend_from_slice(&nested(MAX_DEPTH - 1, 1));
        let events = [
            deep(MAX_DEPTH - 1),
            deep(MAX_DEPTH),
            inner_event,
            b"\x81\x01\x02".to_vec(),
            b"\x82\xa4type\xa1a\xa4type\xa1b".to_vec(),
        ];
        let mut bodies = Vec::new();
        for e in &events {
            let mut env = Vec::new();
            encode_event_envelope(1, e, &mut env);
            bodies.push(env);
        }
        let mut trailing = env.clone();
        trailing.push(0xc0);
        bodies.push(trailing);
        for cut in 0..env.len() {
            bodies.push(env[..cut].to_vec());
        }
        for body in &bodies {
            assert_eq!(
                split_envelope_head(body).ok(),
                two_walks(body),
                "{body:02x?}"
            );
        }
        assert!(split_envelope_head(&bodies[0]).is_ok());
        assert!(split_envelope_head(&bodies[1]).is_err());
    }

    #[test]
    fn envelope_splice_matches_the_encoder() {
        let events = [
            Event::MessageChunk(MessageChunk {
                task_id: Some("task-1".into()),
                text: "x".repeat(150),
                role: Some("assistant".into()),
                is_final: false,
            }),
            Event::ExecOutput(ExecOutput {
                exec_id: 3,
                stream: OutputStream::Stdout,
                data: bytes::Bytes::from_static(b"\x00\x01binary"),
            }),
        ];
        for event in &events {
            let body = event.to_body().unwrap();
            for seq in SEQ_EDGES {
                let msg = ShimToControl::Event(EventEnvelope {
                    seq,
                    event: event.clone(),
                });
                let mut spliced = bytes::BytesMut::new();
                encode_event_envelope(seq, &body, &mut spliced);
                assert_eq!(&spliced[..], &msg.to_body().unwrap()[..], "seq {seq}");
                assert_eq!(ShimToControl::decode(&spliced).unwrap(), msg);
                assert_eq!(
                    split_envelope(&spliced).unwrap(),
                    RawEvent { seq, event: &body }
                );
                let range = event_body_range(&spliced).unwrap();
                assert_eq!(&spliced[range], &body[..]);
            }
        }
    }

    #[test]
    fn envelope_errors() {
        let ping = b"\x82\xa4type\xa4ping\xa2id\x01";
        assert!(detail(split_envelope(ping).unwrap_err()).contains("not an `event`"));
        let no_seq = b"\x82\xa4type\xa5event\xa5event\x81\xa4type\xa4busy";
        assert!(detail(split_envelope(no_seq).unwrap_err()).contains("missing field `seq`"));
        let bad_seq = b"\x83\xa4type\xa5event\xa3seq\xa1x\xa5event\x81\xa4type\xa4busy";
        assert!(detail(split_envelope(bad_seq).unwrap_err()).contains("`seq`"));
        let no_event = b"\x82\xa4type\xa5event\xa3seq\x01";
        assert!(detail(split_envelope(no_event).unwrap_err()).contains("`event`"));
        // A broken event inside a good envelope is reported against the envelope.
        let bad_inner = b"\x83\xa4type\xa5event\xa3seq\x01\xa5event\x81\xa4type\xa8progress\x80";
        assert!(ShimToControl::decode(bad_inner).is_err());
        let bad_inner = b"\x83\xa4type\xa5event\xa3seq\x01\xa5event\x82\xa4type\xa3log\xa4text\x01";
        match ShimToControl::decode(bad_inner).unwrap_err() {
            DecodeError::Malformed {
                type_name, detail, ..
            } => {
                assert_eq!(type_name.as_deref(), Some("event"));
                assert!(detail.starts_with("event log:"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
        // An unknown event type inside an envelope is not an error.
        let unknown = b"\x83\xa4type\xa5event\xa3seq\x02\xa5event\x81\xa4type\xa3new";
        match ShimToControl::decode(unknown).unwrap() {
            ShimToControl::Event(env) => {
                assert_eq!(env.seq, 2);
                assert!(matches!(env.event, Event::Unknown(u) if u.type_name == "new"));
            }
            other => panic!("{other:?}"),
        }
    }
}
