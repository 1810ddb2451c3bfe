//! Messages of the control link's sessions: many clients at once, durable consumers and
//! observers (PROTOCOL.md §8.7).

use std::fmt;

use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use super::fields;
use super::{RequestId, Seq};

/// The shim's limits, in its `hello` (`limits`): what a client may send and how the shim
/// buffers, known before authentication.
///
/// Decoded by a hand-written [`Deserialize`] (the shim decodes every `hello`, yet never needs
/// this field): one loop over a table of names instead of a derived body per field, with the
/// derive's behaviour (a map or an array, unknown fields ignored, the same errors).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Limits {
    /// Unacknowledged events the replay buffer holds before the driver is slowed.
    pub max_events: u64,
    /// Bytes of unacknowledged events the replay buffer holds before the driver is slowed.
    pub max_bytes: u64,
    /// The largest frame read from, or sent to, an authenticated client.
    pub max_frame: u64,
    /// The largest frame read before the handshake is complete.
    pub handshake_max_frame: u64,
    /// How many recent request ids are remembered (and so answered, not executed, again).
    pub ids_window: u64,
    /// How long a new connection may take to send its `hello`.
    pub hello_timeout_ms: u64,
    /// How long a new connection may take to complete its handshake.
    pub handshake_timeout_ms: u64,
    /// Authenticated sessions at once.
    pub max_sessions: u64,
    /// Durable consumers known at once.
    pub max_consumers: u64,
    /// A consumer should acknowledge at least every this many events …
    pub ack_every: u64,
    /// … and at most this long after the last event it has not acknowledged.
    pub ack_delay_ms: u64,
}

fields!(Limits {
    max_events: req,
    max_bytes: req,
    max_frame: req,
    handshake_max_frame: req,
    ids_window: req,
    hello_timeout_ms: req,
    handshake_timeout_ms: req,
    max_sessions: req,
    max_consumers: req,
    ack_every: req,
    ack_delay_ms: req
});

/// The fields of [`Limits`], in declaration (and array) order.
const LIMITS_FIELDS: &[&str] = &[
    "max_events",
    "max_bytes",
    "max_frame",
    "handshake_max_frame",
    "ids_window",
    "hello_timeout_ms",
    "handshake_timeout_ms",
    "max_sessions",
    "max_consumers",
    "ack_every",
    "ack_delay_ms",
];

impl Limits {
    fn from_fields(v: [u64; 11]) -> Self {
        let [max_events, max_bytes, max_frame, handshake_max_frame, ids_window, hello_timeout_ms, handshake_timeout_ms, max_sessions, max_consumers, ack_every, ack_delay_ms] =
            v;
        Self {
            max_events,
            max_bytes,
            max_frame,
            handshake_max_frame,
            ids_window,
            hello_timeout_ms,
            handshake_timeout_ms,
            max_sessions,
            max_consumers,
            ack_every,
            ack_delay_ms,
        }
    }
}

impl<'de> Deserialize<'de> for Limits {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_struct("Limits", LIMITS_FIELDS, LimitsVisitor)
    }
}

struct LimitsVisitor;

impl<'de> Visitor<'de> for LimitsVisitor {
    type Value = Limits;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("struct Limits")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Limits, A::Error> {
        let mut v = [0u64; 11];
        for (i, slot) in v.iter_mut().enumerate() {
            *slot = seq
                .next_element()?
                .ok_or_else(|| de::Error::invalid_length(i, &"struct Limits with 11 elements"))?;
        }
        Ok(Limits::from_fields(v))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Limits, A::Error> {
        let mut v = [None::<u64>; 11];
        while let Some(LimitsField(i)) = map.next_key()? {
            match v.get_mut(i) {
                Some(Some(_)) => {
                    return Err(de::Error::duplicate_field(
                        LIMITS_FIELDS.get(i).copied().unwrap_or_default(),
                    ))
                }
                Some(slot) => *slot = Some(map.next_value()?),
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let mut out = [0u64; 11];
        for (i, (o, x)) in out.iter_mut().zip(v).enumerate() {
            *o = x.ok_or_else(|| {
                de::Error::missing_field(LIMITS_FIELDS.get(i).copied().unwrap_or_default())
            })?;
        }
        Ok(Limits::from_fields(out))
    }
}

/// A key of a [`Limits`] map: the field's index, or any index past the end for one to ignore.
struct LimitsField(usize);

impl<'de> Deserialize<'de> for LimitsField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_identifier(LimitsFieldVisitor)
    }
}

struct LimitsFieldVisitor;

impl Visitor<'_> for LimitsFieldVisitor {
    type Value = LimitsField;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("field identifier")
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<LimitsField, E> {
        Ok(LimitsField(usize::try_from(n).unwrap_or(usize::MAX)))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<LimitsField, E> {
        self.visit_bytes(s.as_bytes())
    }

    fn visit_bytes<E: de::Error>(self, b: &[u8]) -> Result<LimitsField, E> {
        Ok(LimitsField(
            LIMITS_FIELDS
                .iter()
                .position(|n| n.as_bytes() == b)
                .unwrap_or(usize::MAX),
        ))
    }
}

/// `lagged`: an observer fell behind the replay buffer; `missed` events were freed before it
/// was sent them, and it continues from `next_seq`. Not an event: it has no seq.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lagged {
    /// Events this observer will never get.
    pub missed: u64,
    /// The next seq it gets.
    pub next_seq: Seq,
}

fields!(Lagged {
    missed: req,
    next_seq: req
});

/// `forget_consumer`: retire a durable consumer; the buffer no longer keeps events for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForgetConsumer {
    /// The request id.
    pub id: RequestId,
    /// The consumer's name.
    pub consumer: String,
}

fields!(ForgetConsumer {
    id: req,
    consumer: req
});

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn decode(body: &[u8]) -> Result<Limits, String> {
        crate::de::from_slice(body).map_err(|e| e.to_string())
    }

    #[test]
    fn limits_decode_as_the_derive_did() {
        let all: Vec<u64> = (1..=11).collect();
        let want = Limits::from_fields(std::array::from_fn(|i| i as u64 + 1));
        // A map, in any order, with unknown keys ignored.
        let mut map: BTreeMap<&str, u64> = LIMITS_FIELDS.iter().copied().zip(all.clone()).collect();
        map.insert("later", 99);
        assert_eq!(decode(&rmp_serde::to_vec(&map).unwrap()), Ok(want.clone()));
        // An array in declaration order.
        assert_eq!(decode(&rmp_serde::to_vec(&all).unwrap()), Ok(want));
        assert_eq!(
            decode(&rmp_serde::to_vec(&all[..3]).unwrap()),
            Err("invalid length 3, expected struct Limits with 11 elements".to_owned())
        );
        map.remove("max_events");
        assert_eq!(
            decode(&rmp_serde::to_vec(&map).unwrap()),
            Err("missing field `max_events`".to_owned())
        );
        // Two `max_bytes` keys.
        let mut body = vec![0x82];
        for _ in 0..2 {
            body.push(0xa9);
            body.extend_from_slice(b"max_bytes");
            body.push(1);
        }
        assert_eq!(decode(&body), Err("duplicate field `max_bytes`".to_owned()));
        assert!(decode(&rmp_serde::to_vec(&"x").unwrap()).is_err());
    }
}
