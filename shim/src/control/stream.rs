//! Reply streams: one request answered by many frames (`fs_read`'s `fs_data` chunks), each
//! carrying `re`, to the connection the request came on and to no other.
//!
//! A plain [`Reply`] is one frame, queued at once (a small reply never waits). A stream may
//! send gigabytes, so it waits for room instead: before each frame it waits, asynchronously,
//! until the connection's reply queue is below a watermark (half the queue's limit), and the
//! connection's writer wakes it as it drains the queue. Nothing is ever buffered without
//! bound, nothing blocks the loop, and a client that stops reading stalls its own stream
//! only. When the connection is closed (the client left, or a newer one replaced it), the
//! waiting send returns [`Gone`] and the stream's owner stops its work; the client resumes
//! by offset on its next connection.
//!
//! ```text
//!   owner ── send(frame) ──► wait while queued > watermark ──► Conn's reply queue ──► writer
//!                  ▲                                                         │
//!                  └──────────────── drained (writer took frames) ◄──────────┘
//! ```
//!
//! A stream's request id is not recorded for retries: a retry of a stream (the same `id`
//! again) is executed again, which is what a resumable read wants; the protocol's resumption
//! is by offset, never by replaying a recorded stream.

use std::fmt;
use std::rc::Rc;

use driver_protocol::message::{RequestId, ShimToControl};
use tracing::{debug, error};

use super::conn::Conn;
use super::{encode_frame, Inner, Reply};

/// The connection a reply stream belongs to is closed: nothing more can be sent on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gone;

impl fmt::Display for Gone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the control connection is gone")
    }
}

impl std::error::Error for Gone {}

/// Many reply frames to one request, flow-controlled by the connection's reply queue.
pub struct ReplyStream {
    inner: Rc<Inner>,
    /// The connection, while it is open; `None` once it is known to be gone.
    conn: Option<Rc<Conn>>,
    id: Option<RequestId>,
}

impl Reply {
    /// The id of the request this answers.
    pub fn id(&self) -> Option<RequestId> {
        self.id
    }

    /// Sends a reply already encoded (a MessagePack body whose `re` is this request's id),
    /// as [`Reply::send`] does, without decoding it again.
    pub fn send_encoded(mut self, body: &[u8]) {
        self.sent = true;
        if body.len() > self.inner.max_frame {
            error!(id = ?self.id, len = body.len(), "an encoded reply over the frame limit dropped");
            return;
        }
        let mut frame = bytes::BytesMut::with_capacity(body.len() + 4);
        frame.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
        frame.extend_from_slice(body);
        self.deliver(frame.freeze());
    }

    /// Turns this reply into a stream of frames to the request's connection. The request's
    /// id is forgotten by the retry cache (a retry is executed again).
    pub fn into_stream(mut self) -> ReplyStream {
        self.sent = true;
        let conn = {
            match self.inner.state.try_borrow_mut() {
                Ok(mut st) => {
                    if let Some(id) = self.id {
                        st.ids.abandon(id);
                    }
                    st.session(self.conn)
                }
                Err(_) => {
                    error!(id = ?self.id, "control state busy; reply stream has no connection");
                    None
                }
            }
        };
        ReplyStream {
            inner: Rc::clone(&self.inner),
            conn,
            id: self.id,
        }
    }
}

impl ReplyStream {
    /// The connection is closed (or was never found): frames would go nowhere.
    pub fn is_gone(&self) -> bool {
        !self.conn.as_ref().is_some_and(|c| c.is_open())
    }

    /// Resolves once the connection is closed. Cancel-safe.
    pub async fn gone(&self) {
        if let Some(conn) = &self.conn {
            conn.closed().await;
        }
    }

    /// Sends one frame, first waiting (without bound in time, but bounded by the
    /// connection's life) until the connection's reply queue has room: below half its limit,
    /// or empty. Cancel-safe: a cancelled send sent nothing.
    pub async fn send(&mut self, msg: &ShimToControl) -> Result<(), Gone> {
        let frame = match encode_frame(msg, self.inner.max_frame) {
            Ok(frame) => frame,
            Err(err) => {
                // Only a message over the frame limit fails to encode; the owner sizes its
                // frames, so this is a bug, not input. The stream cannot go on.
                error!(re = ?self.id, error = %err, "cannot encode a reply stream frame");
                self.conn = None;
                return Err(Gone);
            }
        };
        self.send_frame(frame).await
    }

    /// Sends one frame already encoded (its 4-byte length header included), as
    /// [`ReplyStream::send`] does. A frame over the connection's frame limit ends the stream.
    /// Cancel-safe: a cancelled send sent nothing.
    pub async fn send_frame(&mut self, frame: bytes::Bytes) -> Result<(), Gone> {
        if frame.len() > self.inner.max_frame.saturating_add(4) {
            error!(re = ?self.id, len = frame.len(), "a reply stream frame over the frame limit");
            self.conn = None;
            return Err(Gone);
        }
        loop {
            let Some(conn) = self.conn.clone().filter(|c| c.is_open()) else {
                self.conn = None;
                debug!(re = ?self.id, "reply stream ends: its connection is gone");
                return Err(Gone);
            };
            let drained = conn.drained.notified();
            tokio::pin!(drained);
            // Registered before the check, so a drain between the two is not missed.
            drained.as_mut().enable();
            let queued = conn.queued();
            let watermark = conn.queue_max() / 2;
            if queued == 0 || queued.saturating_add(frame.len()) <= watermark {
                conn.send(frame);
                return Ok(());
            }
            tokio::select! {
                () = &mut drained => {}
                () = conn.closed() => {}
            }
        }
    }
}

impl fmt::Debug for ReplyStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplyStream")
            .field("conn", &self.conn.as_ref().map(|c| c.id))
            .field("id", &self.id)
            .finish()
    }
}

#[cfg(test)]
#[path = "stream_tests.rs"]
mod tests;
