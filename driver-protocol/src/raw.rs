//! Reading a message's envelope without decoding its fields.
//!
//! Dispatch needs the `type` (and the `id`, so a rejection can carry `re`) before it knows
//! which struct to decode the fields into; the shim's relay needs the byte range of a nested
//! value so that it can forward it without decoding and re-encoding it.

use serde::Deserialize;

use crate::message::{Event, EventEnvelope, Head, Message, RequestId};
use crate::DecodeError;

#[derive(Deserialize)]
struct HeadFields<'a> {
    #[serde(rename = "type", borrow)]
    type_name: &'a str,
    #[serde(default)]
    id: Option<RequestId>,
}

/// Reads `type` and `id` of a message body.
pub(crate) fn peek(body: &[u8]) -> Result<Head<'_>, DecodeError> {
    let h: HeadFields<'_> =
        rmp_serde::from_slice(body).map_err(|e| DecodeError::malformed(None, None, e))?;
    Ok(Head {
        type_name: h.type_name,
        id: h.id,
    })
}

#[derive(Deserialize)]
struct EnvelopeFields {
    seq: u64,
    event: rmpv::Value,
}

/// Decodes an `event` envelope, dispatching on the nested event's own `type`.
pub(crate) fn decode_envelope(body: &[u8], head: &Head<'_>) -> Result<EventEnvelope, DecodeError> {
    let f: EnvelopeFields = crate::message::decode_fields(body, head)?;
    let mut inner = Vec::new();
    rmpv::encode::write_value(&mut inner, &f.event)
        .map_err(|e| DecodeError::malformed(Some(head.type_name), head.id, e))?;
    Ok(EventEnvelope {
        seq: f.seq,
        event: Event::decode(&inner)?,
    })
}
