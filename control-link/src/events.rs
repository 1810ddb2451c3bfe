//! [`EventStream`]: a client's events, each once, in seq order, across reconnects.

use std::future::poll_fn;
use std::pin::Pin;
use std::task::{Context, Poll};

use driver_protocol::message::{Event, Seq};
use futures_core::Stream;
use tokio::sync::mpsc;

use crate::Client;

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
    rx: mpsc::Receiver<(Seq, Event)>,
    client: Client,
    since_flush: u32,
}

impl EventStream {
    pub(crate) fn new(rx: mpsc::Receiver<(Seq, Event)>, client: Client) -> Self {
        Self {
            rx,
            client,
            since_flush: 0,
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
        let item = std::task::ready!(self.rx.poll_recv(cx));
        if let Some((seq, _)) = &item {
            self.client.shared().taken(*seq, &mut self.since_flush);
        }
        Poll::Ready(item)
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
