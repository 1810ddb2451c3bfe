//! [`EventStream`]: a client's events, each once, in seq order, across reconnects; and
//! [`RawEventStream`]: the same events as [`RawEvent`]s, still encoded, for a control plane
//! that archives or forwards them rather than reading each one.
//!
//! Also where a session's events go (its `Sink`): the client's own stream, or a fleet's
//! aggregated one, whose items name their [`AgentId`]. The session hands events to the sink
//! and knows nothing of fleets.

use std::borrow::Borrow;
use std::fmt;
use std::future::poll_fn;
use std::ops::{Deref, Range};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use driver_protocol::message::{Event, Message as _, Seq, Unknown};
use driver_protocol::{raw, DecodeError};
use futures_core::Stream;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::shared::{AckBatch, Shared};
use crate::Client;

/// An agent's id, as its shim names it (`hello.agent_id`) or as given to
/// [`Fleet::connect`](crate::Fleet::connect). Cheap to clone.
///
/// ```
/// use control_link::AgentId;
/// let id = AgentId::from("agent-7");
/// assert_eq!(&*id, "agent-7");
/// assert_eq!(id.to_string(), "agent-7");
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentId(Arc<str>);

impl Deref for AgentId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for AgentId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl From<&str> for AgentId {
    fn from(s: &str) -> Self {
        Self(Arc::from(s))
    }
}

impl From<String> for AgentId {
    fn from(s: String) -> Self {
        Self(Arc::from(s))
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// One event on its way to the fleet's stream.
#[derive(Debug)]
pub(crate) struct FleetItem {
    pub(crate) agent: AgentId,
    pub(crate) seq: Seq,
    pub(crate) event: Event,
    /// The bytes the event took on the wire.
    pub(crate) len: usize,
    pub(crate) shared: Arc<Shared>,
}

/// Where events go.
#[derive(Debug)]
pub(crate) enum Sink {
    /// The client's own [`EventStream`](crate::EventStream) or
    /// [`RawEventStream`](crate::RawEventStream).
    Own(mpsc::Sender<Item>),
    /// A fleet's aggregated stream.
    Fleet {
        /// The agent whose events these are.
        agent: AgentId,
        /// The fleet's channel.
        tx: mpsc::Sender<FleetItem>,
    },
}

/// What became of an event offered to the sink without waiting.
pub(crate) enum Offer {
    /// Handed out (or dropped: nobody takes events any more).
    Taken,
    /// The channel is full: the event is given back.
    Full(Item),
}

/// A raw event for a fleet's stream, which hands out decoded events. (A fleet's clients
/// never read events raw.)
fn decoded(raw: &RawEvent) -> Event {
    raw.decode().unwrap_or_else(|e| {
        warn!(seq = raw.seq(), error = %e, "an event that does not decode");
        Event::Unknown(driver_protocol::message::Unknown {
            type_name: raw.type_name().to_owned(),
            id: None,
        })
    })
}

impl Sink {
    /// Hands `item` out if the channel has room now.
    pub(crate) fn try_send(&self, shared: &Arc<Shared>, item: Item) -> Offer {
        use mpsc::error::TrySendError;
        match self {
            Sink::Own(tx) => match tx.try_send(item) {
                Ok(()) => Offer::Taken,
                Err(TrySendError::Full(item)) => Offer::Full(item),
                Err(TrySendError::Closed(item)) => {
                    debug!(
                        seq = item.seq(),
                        "nobody takes events; event dropped (not acked)"
                    );
                    Offer::Taken
                }
            },
            Sink::Fleet { agent, tx } => {
                let len = item.wire_len();
                let (seq, event) = match item {
                    Item::Typed(seq, event, _) => (seq, *event),
                    Item::Raw(raw) => (raw.seq(), decoded(&raw)),
                };
                let item = FleetItem {
                    agent: agent.clone(),
                    seq,
                    event,
                    len,
                    shared: Arc::clone(shared),
                };
                match tx.try_send(item) {
                    Ok(()) => Offer::Taken,
                    Err(TrySendError::Full(item)) => {
                        Offer::Full(Item::Typed(item.seq, Box::new(item.event), item.len))
                    }
                    Err(TrySendError::Closed(_)) => {
                        debug!(seq, "nobody takes events; event dropped (not acked)");
                        Offer::Taken
                    }
                }
            }
        }
    }
}

/// Room for one event in a sink.
pub(crate) enum Permit {
    Own(mpsc::OwnedPermit<Item>),
    Fleet(mpsc::OwnedPermit<FleetItem>, AgentId),
}

impl Sink {
    /// Room for one event; `Err` when nobody receives events any more. The future owns what
    /// it needs, so it borrows nothing from the session.
    pub(crate) fn reserve(
        &self,
    ) -> impl std::future::Future<Output = Result<Permit, ()>> + 'static {
        let sink = match self {
            Sink::Own(tx) => Ok(tx.clone()),
            Sink::Fleet { agent, tx } => Err((agent.clone(), tx.clone())),
        };
        async move {
            match sink {
                Ok(tx) => tx.reserve_owned().await.map(Permit::Own).map_err(drop),
                Err((agent, tx)) => tx
                    .reserve_owned()
                    .await
                    .map(|p| Permit::Fleet(p, agent))
                    .map_err(drop),
            }
        }
    }
}

impl Permit {
    /// Hands `item` out in the room reserved (decoded, for a fleet's stream).
    pub(crate) fn send(self, item: Item, shared: &Arc<Shared>) {
        match self {
            Permit::Own(p) => {
                p.send(item);
            }
            Permit::Fleet(p, agent) => {
                let seq = item.seq();
                let len = item.wire_len();
                let event = match item {
                    Item::Typed(_, event, _) => *event,
                    Item::Raw(raw) => decoded(&raw),
                };
                p.send(FleetItem {
                    agent,
                    seq,
                    event,
                    len,
                    shared: Arc::clone(shared),
                });
            }
        }
    }
}

/// Items taken off the session's channel a batch at a time: one wake-up and one release of
/// the channel's room per batch rather than per event, the items then handed out one by one
/// (and counted as taken, for acknowledgements, only then).
#[derive(Debug)]
struct Batches {
    rx: mpsc::Receiver<Item>,
    /// Received, not handed out yet, in reverse order (the next one last): each is moved
    /// once more, by the `pop` that hands it out.
    ready: Vec<Item>,
}

/// Items taken off the channel at once.
const RECV_BATCH: usize = 64;

impl Batches {
    fn new(rx: mpsc::Receiver<Item>) -> Self {
        Self {
            rx,
            ready: Vec::new(),
        }
    }

    /// The next item, from the batch at hand or the channel; `None` once it is closed.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        if let Some(item) = self.ready.pop() {
            return Poll::Ready(Some(item));
        }
        if std::task::ready!(self.rx.poll_recv_many(cx, &mut self.ready, RECV_BATCH)) == 0 {
            return Poll::Ready(None);
        }
        self.ready.reverse();
        Poll::Ready(self.ready.pop())
    }
}

/// What the session hands to a client's own stream: decoded for an [`EventStream`], still
/// encoded for a [`RawEventStream`] (the session learns which when the stream is taken).
#[derive(Debug)]
pub(crate) enum Item {
    /// A decoded event and the length of the frame it came in. (Boxed: a raw event, the
    /// bulk of a relay, then moves through the channel and the stream at its own size,
    /// 56 bytes rather than 128.)
    Typed(Seq, Box<Event>, usize),
    /// An event as it came.
    Raw(RawEvent),
}

impl Item {
    pub(crate) fn seq(&self) -> Seq {
        match self {
            Item::Typed(seq, ..) => *seq,
            Item::Raw(raw) => raw.seq,
        }
    }

    /// About the bytes the event took on the wire (what acknowledging it frees in the
    /// shim's buffer).
    pub(crate) fn wire_len(&self) -> usize {
        match self {
            Item::Typed(_, _, len) => *len,
            Item::Raw(raw) => raw.body.len(),
        }
    }

    /// The item as a decoded event. (A session delivers raw items only to a raw stream; an
    /// event that does not decode reads as an `Unknown` event of its type.)
    fn into_typed(self) -> (Seq, Event) {
        match self {
            Item::Typed(seq, event, _) => (seq, *event),
            Item::Raw(raw) => {
                let event = raw.decode().unwrap_or_else(|e| {
                    warn!(seq = raw.seq, error = %e, "an event that does not decode");
                    Event::Unknown(Unknown {
                        type_name: raw.type_name().to_owned(),
                        id: None,
                    })
                });
                (raw.seq, event)
            }
        }
    }

    /// The item as a raw event; `None` (logged) for a decoded event that cannot be encoded
    /// again (a session hands decoded items only to a typed stream).
    fn into_raw(self) -> Option<RawEvent> {
        match self {
            Item::Raw(raw) => Some(raw),
            Item::Typed(seq, event, _) => match event.to_body() {
                Ok(body) => RawEvent::new(seq, Bytes::from(body)).ok(),
                Err(e) => {
                    warn!(seq, error = %e, "an event that cannot be encoded again");
                    None
                }
            },
        }
    }
}

/// One event as the shim sent it: its seq, its `type`, and its MessagePack body (a map with
/// its own `type` key: for a driver's event, the bytes the driver wrote), not decoded.
///
/// What a control plane that archives or forwards events needs: the body can be stored or
/// sent on as it is, and [`RawEvent::decode`] makes the typed [`Event`] of the ones it
/// reads. The body is a reference-counted slice of the bytes read from the socket: taking
/// it ([`RawEvent::into_body`]) copies nothing.
///
/// The MessagePack structure of the body (lengths, nesting, a string `type`) was checked
/// when it was read; its fields were not: [`RawEvent::decode`] can still fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEvent {
    seq: Seq,
    body: Bytes,
    /// Where the event's `type` is in `body`.
    type_at: Range<usize>,
}

impl RawEvent {
    /// The event of seq `seq` whose MessagePack body is `body`; fails unless `body` is a
    /// MessagePack map with a string `type` (see [`raw::read_head`]).
    ///
    /// ```
    /// use control_link::protocol::message::{Custom, Event, Message};
    /// use control_link::RawEvent;
    ///
    /// let custom = Event::Custom(Custom {
    ///     task_id: None,
    ///     kind: "note".into(),
    ///     data: rmpv::Value::Nil,
    /// });
    /// let raw = RawEvent::new(7, custom.to_body()?.into())?;
    /// assert_eq!((raw.seq(), raw.type_name()), (7, "custom"));
    /// assert_eq!(raw.decode()?, custom);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn new(seq: Seq, body: Bytes) -> Result<Self, DecodeError> {
        let type_name = raw::read_head(&body)?.type_name;
        // The offset of a slice of `body` within it.
        let start = (type_name.as_ptr() as usize).saturating_sub(body.as_ptr() as usize);
        let type_at = start..start.saturating_add(type_name.len());
        Ok(Self { seq, body, type_at })
    }

    /// An event whose body `raw::read_head` accepted, its `type` at `type_at` in `body`.
    pub(crate) fn checked(seq: Seq, body: Bytes, type_at: Range<usize>) -> Self {
        Self { seq, body, type_at }
    }

    /// The event's sequence number.
    pub fn seq(&self) -> Seq {
        self.seq
    }

    /// The event's `type` (e.g. `"custom"`, `"task_done"`).
    pub fn type_name(&self) -> &str {
        let Some(b) = self.body.get(self.type_at.clone()) else {
            return "";
        };
        // Type names are ASCII: checked so, they skip `from_utf8`'s set-up (about 80
        // instructions a name, asked for at least once per event).
        if b.is_ascii() {
            // SAFETY: every byte of `b` is below 0x80, and ASCII is valid UTF-8.
            unsafe { std::str::from_utf8_unchecked(b) }
        } else {
            std::str::from_utf8(b).unwrap_or_default()
        }
    }

    /// The event's MessagePack body.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The event's MessagePack body, without a copy.
    pub fn into_body(self) -> Bytes {
        self.body
    }

    /// Decodes the event, as an [`EventStream`] hands it out (an unknown `type` decodes to
    /// [`Event::Unknown`]).
    pub fn decode(&self) -> Result<Event, DecodeError> {
        Event::decode(&self.body)
    }
}

/// The events of one shim as `(seq, event)`, from [`Client::events`]. A
/// [`futures_core::Stream`], and [`EventStream::next`] for plain `async` code.
///
/// In [`AckMode::Auto`](crate::AckMode::Auto) every event handed out counts as processed
/// and is acknowledged (batched); in manual mode call [`Client::ack`]. The stream ends when
/// the client closes; [`Client::close_reason`] then says whether it closed because the shim
/// refuses it for good (a changed token, another agent). Up to the client's event buffer is read ahead; a consumer that stops
/// taking events stops the reading of the socket (the shim buffers, then back-pressures its
/// driver).
///
/// ```no_run
/// # async fn demo(client: control_link::Client) -> Result<(), control_link::Error> {
/// use control_link::protocol::message::Event;
/// let mut events = client.events()?;
/// while let Some((seq, event)) = events.next().await {
///     if let Event::TaskDone(done) = event {
///         println!("{seq}: task {} {:?}", done.task_id, done.status);
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct EventStream {
    rx: Batches,
    client: Client,
    since_flush: AckBatch,
}

impl EventStream {
    pub(crate) fn new(rx: mpsc::Receiver<Item>, client: Client) -> Self {
        Self {
            rx: Batches::new(rx),
            client,
            since_flush: AckBatch::default(),
        }
    }

    /// The next event; `None` once the client is closed.
    ///
    /// ```no_run
    /// # async fn demo(mut events: control_link::EventStream) {
    /// if let Some((seq, event)) = events.next().await { println!("{seq} {event:?}"); }
    /// # }
    /// ```
    pub async fn next(&mut self) -> Option<(Seq, Event)> {
        poll_fn(|cx| self.poll_item(cx)).await
    }

    /// The client this stream belongs to.
    ///
    /// ```no_run
    /// # async fn demo(events: control_link::EventStream) {
    /// let client = events.client().clone();
    /// # }
    /// ```
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn poll_item(&mut self, cx: &mut Context<'_>) -> Poll<Option<(Seq, Event)>> {
        let item = std::task::ready!(self.rx.poll_next(cx));
        if let Some(item) = &item {
            self.client
                .shared()
                .taken(item.seq(), item.wire_len(), &mut self.since_flush);
        }
        Poll::Ready(item.map(Item::into_typed))
    }
}

impl Stream for EventStream {
    type Item = (Seq, Event);

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_item(cx)
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        self.client.shared().ack_now.notify_one();
    }
}

/// The events of one shim as [`RawEvent`]s, from [`Client::raw_events`]: the same events,
/// in the same order, with the same acknowledgements and resumption as an [`EventStream`],
/// but not decoded. A [`futures_core::Stream`], and [`RawEventStream::next`] for plain
/// `async` code.
///
/// For a control plane that stores or forwards events (an archive, a message bus) and
/// decodes only those it acts on:
///
/// ```no_run
/// # async fn demo(client: control_link::Client) -> Result<(), control_link::Error> {
/// use control_link::protocol::message::Event;
/// let mut events = client.raw_events()?;
/// while let Some(event) = events.next().await {
///     // archive(event.seq(), event.body());
///     if event.type_name() == "task_done" {
///         if let Event::TaskDone(done) = event.decode()? {
///             println!("task {} {:?}", done.task_id, done.status);
///         }
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct RawEventStream {
    rx: Batches,
    client: Client,
    since_flush: AckBatch,
}

impl RawEventStream {
    pub(crate) fn new(rx: mpsc::Receiver<Item>, client: Client) -> Self {
        Self {
            rx: Batches::new(rx),
            client,
            since_flush: AckBatch::default(),
        }
    }

    /// The next event; `None` once the client is closed.
    ///
    /// ```no_run
    /// # async fn demo(mut events: control_link::RawEventStream) {
    /// if let Some(event) = events.next().await { println!("{} {}", event.seq(), event.type_name()); }
    /// # }
    /// ```
    pub async fn next(&mut self) -> Option<RawEvent> {
        poll_fn(|cx| self.poll_item(cx)).await
    }

    /// The client this stream belongs to.
    ///
    /// ```no_run
    /// # async fn demo(events: control_link::RawEventStream) {
    /// let client = events.client().clone();
    /// # }
    /// ```
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn poll_item(&mut self, cx: &mut Context<'_>) -> Poll<Option<RawEvent>> {
        loop {
            let Some(item) = std::task::ready!(self.rx.poll_next(cx)) else {
                return Poll::Ready(None);
            };
            self.client
                .shared()
                .taken(item.seq(), item.wire_len(), &mut self.since_flush);
            if let Some(raw) = item.into_raw() {
                return Poll::Ready(Some(raw));
            }
        }
    }
}

impl Stream for RawEventStream {
    type Item = RawEvent;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_item(cx)
    }
}

impl Drop for RawEventStream {
    fn drop(&mut self) {
        self.client.shared().ack_now.notify_one();
    }
}
