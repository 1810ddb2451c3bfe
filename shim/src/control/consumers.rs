//! The durable consumers of the event stream (PROTOCOL.md §8.7): each named consumer has its
//! own acknowledged position, which outlives its connections, and the replay buffer keeps an
//! event until every known consumer has acknowledged it.
//!
//! ```text
//!   buffer:   … 40 │ 41  42  43  44  45  46  47 │ 48 (next)
//!   floor = min(acked) = 40 ─┘        ▲           ▲
//!   "control"  acked 40 ──────────────┘ (cursor 45)
//!   "shipper"  acked 46 ──────────────────────────┘
//! ```
//!
//! The table is bounded (`--max-consumers`): a client can name a new consumer only while
//! there is room, and a consumer is retired only by `forget_consumer`, never by time, so an
//! absent consumer never loses an event (its events slow the driver instead, as one
//! consumer's always did).

use driver_protocol::message::Seq;

/// The longest consumer name.
pub(super) const MAX_NAME: usize = 64;

/// One durable consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Consumer {
    /// Every event up to this seq is acknowledged by this consumer.
    pub(super) acked: Seq,
    /// The connection that is this consumer now, if any.
    pub(super) conn: Option<u64>,
}

/// Why a consumer could not be joined or forgotten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// `--max-consumers` are known already.
    Full,
    /// No consumer of that name.
    NotFound,
    /// The consumer has a connection (it must go first).
    Connected,
}

/// The known consumers, by name: a few (`--max-consumers`), so a list is enough (and smaller
/// in the static binary than a map).
#[derive(Debug)]
pub(super) struct Consumers {
    by_name: Vec<(String, Consumer)>,
    max: usize,
}

/// Whether `name` is a valid consumer name: 1 to [`MAX_NAME`] bytes of `[A-Za-z0-9._-]`.
pub(super) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl Consumers {
    /// An empty table of at most `max` consumers (at least 1).
    pub(super) fn new(max: usize) -> Self {
        Self {
            by_name: Vec::new(),
            max: max.max(1),
        }
    }

    fn find(&mut self, name: &str) -> Option<&mut Consumer> {
        self.by_name
            .iter_mut()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c)
    }

    /// The lowest acknowledged position of all consumers: the buffer may free up to it.
    /// `None` while no consumer is known: then nothing is freed.
    pub(super) fn floor(&self) -> Option<Seq> {
        self.by_name.iter().map(|(_, c)| c.acked).min()
    }

    /// The consumer `name`, if known.
    pub(super) fn get(&self, name: &str) -> Option<&Consumer> {
        self.by_name.iter().find(|(n, _)| n == name).map(|(_, c)| c)
    }

    /// Connection `conn` becomes consumer `name`; a consumer not known yet starts at
    /// `start` (what the buffer has freed already). Returns the connection it replaces.
    pub(super) fn join(
        &mut self,
        name: &str,
        conn: u64,
        start: Seq,
    ) -> Result<Option<u64>, Refusal> {
        if let Some(c) = self.find(name) {
            return Ok(c.conn.replace(conn));
        }
        if self.by_name.len() >= self.max {
            return Err(Refusal::Full);
        }
        let consumer = Consumer {
            acked: start,
            conn: Some(conn),
        };
        self.by_name.push((name.to_owned(), consumer));
        Ok(None)
    }

    /// Whether `name` could join now (known, or room for one more).
    pub(super) fn has_room_for(&self, name: &str) -> bool {
        self.get(name).is_some() || self.by_name.len() < self.max
    }

    /// Consumer `name` acknowledged every event up to `seq`; true if its position moved.
    pub(super) fn ack(&mut self, name: &str, seq: Seq) -> bool {
        match self.find(name) {
            Some(c) if seq > c.acked => {
                c.acked = seq;
                true
            }
            _ => false,
        }
    }

    /// Connection `conn` ended: the consumer it was (if it still is) has none.
    pub(super) fn leave(&mut self, name: &str, conn: u64) {
        if let Some(c) = self.find(name) {
            if c.conn == Some(conn) {
                c.conn = None;
            }
        }
    }

    /// Retires consumer `name`.
    pub(super) fn forget(&mut self, name: &str) -> Result<(), Refusal> {
        match self.get(name) {
            None => Err(Refusal::NotFound),
            Some(c) if c.conn.is_some() => Err(Refusal::Connected),
            Some(_) => {
                self.by_name.retain(|(n, _)| n != name);
                Ok(())
            }
        }
    }

    /// How many consumers are known.
    pub(super) fn len(&self) -> usize {
        self.by_name.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_bounded_and_plain() {
        assert!(valid_name("control"));
        assert!(valid_name("a.b_c-9"));
        assert!(valid_name(&"x".repeat(MAX_NAME)));
        assert!(!valid_name(""));
        assert!(!valid_name(&"x".repeat(MAX_NAME + 1)));
        assert!(!valid_name("a b"));
        assert!(!valid_name("é"));
        assert!(!valid_name("a/b"));
    }

    #[test]
    fn floor_is_the_slowest_consumer_and_positions_outlive_connections() {
        let mut c = Consumers::new(2);
        assert_eq!(c.floor(), None, "no consumer: nothing may be freed");
        assert_eq!(c.join("a", 1, 0), Ok(None));
        assert_eq!(c.join("b", 2, 0), Ok(None));
        assert_eq!(c.join("c", 3, 0), Err(Refusal::Full));
        assert!(c.has_room_for("a") && !c.has_room_for("c"));
        assert!(c.ack("a", 10));
        assert!(!c.ack("a", 5), "positions never go back");
        assert_eq!(c.floor(), Some(0));
        assert!(c.ack("b", 7));
        assert_eq!(c.floor(), Some(7));
        c.leave("a", 1);
        assert_eq!(c.get("a").map(|x| (x.acked, x.conn)), Some((10, None)));
        assert_eq!(c.join("a", 4, 99), Ok(None), "back where it was");
        assert_eq!(c.get("a").map(|x| x.acked), Some(10));
        assert_eq!(
            c.join("a", 5, 0),
            Ok(Some(4)),
            "a newer connection replaces"
        );
        c.leave("a", 4);
        assert_eq!(
            c.get("a").and_then(|x| x.conn),
            Some(5),
            "the old one's end changes nothing"
        );
        assert_eq!(c.forget("a"), Err(Refusal::Connected));
        c.leave("a", 5);
        assert_eq!(c.forget("a"), Ok(()));
        assert_eq!(c.forget("a"), Err(Refusal::NotFound));
        assert_eq!(c.floor(), Some(7));
        assert_eq!(c.len(), 1);
    }
}
