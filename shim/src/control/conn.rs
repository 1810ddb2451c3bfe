//! One control connection: its reader task (handshake, then requests) and its writer task
//! (replies from a bounded queue, then events straight from the replay buffer).
//!
//! ```text
//!            ┌──────── reader task ────────┐            ┌──────── writer task ────────┐
//!   socket ─►│ hello · ping · ack ·        │  Out queue │ replies first, then events  │─► socket
//!            │ resume_from · retried ids   ├──────────► │ after the cursor, read from │
//!            │ everything else ─► mpsc ─► supervisor    │ the replay buffer (writev)  │
//!            └─────────────────────────────┘            └─────────────────────────────┘
//! ```
//!
//! Nothing the supervisor does waits for a socket: replies are queued, events are only
//! buffered (the writer picks them up by cursor). The reply queue is bounded; a client that
//! sends requests but never reads its replies is disconnected when the queue overflows, and
//! loses nothing by it, since events leave the buffer only when acknowledged.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::rc::{Rc, Weak};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use driver_protocol::codec::MessageCodec;
use driver_protocol::message::{
    ControlToShim, ErrorMsg, ForgetConsumer, Lagged, OkReply, Pong, RequestId, ResumeFrom, Seq,
    ShimToControl,
};
use driver_protocol::{frame, DecodeError, ErrorCode};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::Notify;
use tokio::task::AbortHandle;
use tokio_util::codec::Decoder as _;
use tracing::{debug, error, info, warn};

use super::auth::{self, Handshake, Step};
use super::consumers::{self, Refusal};
use super::gate::Source;
use super::ids::{body_hash, Seen};
use super::transport::{Halves, ReadHalf, WriteHalf};
use super::{encode_frame, Command, Inner, Origin, Reply};
use crate::spare;

/// Bytes the writer gathers into one `write`.
const WRITE_BATCH: usize = 64 * 1024;

/// Room made in the read buffer before each read.
const READ_CHUNK: usize = 16 * 1024;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading and writing.
    Open,
    /// The writer sends what is queued (an `error`, typically), then closes.
    Closing,
    /// Gone; its tasks are aborted.
    Closed,
}

/// The replies waiting to be written.
#[derive(Debug)]
struct Out {
    frames: VecDeque<Bytes>,
    bytes: usize,
    state: State,
}

/// The shared half of a connection, held by its two tasks and, while it is the live one, by
/// the server.
#[derive(Debug)]
pub(super) struct Conn {
    /// Unique per server, for logs and to match replies to the connection a request came on.
    pub(super) id: u64,
    out: RefCell<Out>,
    /// Bytes of queued replies over which the connection is closed.
    out_max: usize,
    /// `Some(last seq written)` once the client sent `resume_from`: events stream.
    pub(super) cursor: Cell<Option<Seq>>,
    /// The durable consumer this connection is; `None`: an observer.
    consumer: RefCell<Option<String>>,
    /// Wakes the writer: a reply was queued, an event published, or the state changed.
    wake: Notify,
    /// The reader and writer tasks, aborted by [`Conn::close_now`].
    tasks: RefCell<Vec<AbortHandle>>,
    /// The reader task alone, aborted by [`Conn::evict`].
    reader: RefCell<Option<AbortHandle>>,
    /// The handshake completed (the connection became the live one, at least for a while).
    authenticated: Cell<bool>,
    /// Woken (all waiters) when the connection is closed.
    closed: Notify,
    /// The execs this connection follows (`attach_exec`).
    pub(super) attached: super::attach::Attached,
    /// Woken (all waiters) when the writer took queued replies: a reply stream waiting for
    /// room looks again (`stream.rs`).
    pub(super) drained: Notify,
}

impl Conn {
    fn new(id: u64, out_max: usize) -> Self {
        Self {
            id,
            out: RefCell::new(Out {
                frames: VecDeque::new(),
                bytes: 0,
                state: State::Open,
            }),
            out_max,
            cursor: Cell::new(None),
            consumer: RefCell::new(None),
            wake: Notify::new(),
            tasks: RefCell::new(Vec::new()),
            reader: RefCell::new(None),
            authenticated: Cell::new(false),
            closed: Notify::new(),
            attached: super::attach::Attached::default(),
            drained: Notify::new(),
        }
    }

    /// The durable consumer this connection is, if it is one.
    pub(super) fn consumer(&self) -> Option<String> {
        self.consumer.borrow().clone()
    }

    /// Whether the handshake completed.
    pub(super) fn authenticated(&self) -> bool {
        self.authenticated.get()
    }

    /// Resolves once the connection is closed. Cancel-safe.
    pub(super) async fn closed(&self) {
        loop {
            let notified = self.closed.notified();
            tokio::pin!(notified);
            // Registered before the check, so a close between the two is not missed.
            notified.as_mut().enable();
            if self.out.borrow().state == State::Closed {
                return;
            }
            notified.await;
        }
    }

    /// Neither closing nor closed.
    pub(super) fn is_open(&self) -> bool {
        self.out.borrow().state == State::Open
    }

    /// Open and streaming events (the client sent `resume_from`).
    pub(super) fn is_streaming(&self) -> bool {
        self.is_open() && self.cursor.get().is_some()
    }

    /// Wakes the writer (an event was published).
    pub(super) fn wake(&self) {
        self.wake.notify_one();
    }

    /// Bytes of replies queued and not yet taken by the writer.
    pub(super) fn queued(&self) -> usize {
        self.out.borrow().bytes
    }

    /// The limit of [`Self::queued`] over which the connection is closed.
    pub(super) fn queue_max(&self) -> usize {
        self.out_max
    }

    /// Queues one frame; over the queue's limit the connection is closed instead.
    pub(super) fn send(&self, frame: Bytes) {
        let overflow = {
            let mut out = self.out.borrow_mut();
            if out.state != State::Open {
                return;
            }
            let bytes = out.bytes.saturating_add(frame.len());
            if bytes > self.out_max {
                true
            } else {
                out.bytes = bytes;
                out.frames.push_back(frame);
                false
            }
        };
        if overflow {
            warn!(
                conn = self.id,
                limit = self.out_max,
                "control client does not read its replies; closing the connection"
            );
            self.close_now();
        } else {
            self.wake.notify_one();
        }
    }

    /// Closes at once: queued replies are dropped, both tasks are aborted (which drops, and
    /// so closes, the socket).
    pub(super) fn close_now(&self) {
        {
            let mut out = self.out.borrow_mut();
            out.state = State::Closed;
            out.frames.clear();
            out.bytes = 0;
        }
        self.wake.notify_one();
        self.closed.notify_waiters();
        self.drained.notify_waiters();
        let tasks = std::mem::take(&mut *self.tasks.borrow_mut());
        for task in tasks {
            task.abort();
        }
    }

    /// Stops taking replies, lets the writer send what is queued, then closes; after
    /// `grace` the connection is closed whatever the writer managed.
    fn close_after_flush(self: &Rc<Self>, grace: std::time::Duration) {
        {
            let mut out = self.out.borrow_mut();
            if out.state != State::Open {
                return;
            }
            out.state = State::Closing;
        }
        self.wake.notify_one();
        let weak: Weak<Self> = Rc::downgrade(self);
        tokio::task::spawn_local(async move {
            tokio::time::sleep(grace).await;
            if let Some(conn) = weak.upgrade() {
                conn.close_now();
            }
        });
    }

    /// Turns a connection still in its handshake away to make room for another source's:
    /// `error{code:"busy"}`, written within `grace` or not at all, then the close. Nothing
    /// more is read from it.
    pub(super) fn evict(self: &Rc<Self>, inner: &Inner) {
        if let Some(reader) = self.reader.borrow_mut().take() {
            reader.abort();
        }
        let msg = "too many handshakes pending from this source; retry later".to_owned();
        reject(self, inner, None, ErrorCode::Busy, msg);
    }

    /// Moves queued replies into `batch` (up to about `limit` bytes); returns the state.
    /// The next queued reply, if it is a frame of `min` bytes or more (written as it is).
    fn take_large(&self, min: usize) -> Option<Bytes> {
        let frame = {
            let mut out = self.out.borrow_mut();
            if out.frames.front().is_none_or(|f| f.len() < min) {
                return None;
            }
            let frame = out.frames.pop_front()?;
            out.bytes = out.bytes.saturating_sub(frame.len());
            frame
        };
        self.drained.notify_waiters();
        Some(frame)
    }

    fn take_replies(&self, batch: &mut Vec<u8>, limit: usize) -> State {
        let mut out = self.out.borrow_mut();
        let mut took = false;
        while batch.is_empty() || batch.len() < limit {
            // A large frame (a file's chunk) is written on its own, not copied into the batch.
            if out.frames.front().is_some_and(|f| f.len() >= limit / 2) {
                break;
            }
            let Some(frame) = out.frames.pop_front() else {
                break;
            };
            out.bytes = out.bytes.saturating_sub(frame.len());
            batch.extend_from_slice(&frame);
            took = true;
        }
        let state = out.state;
        drop(out);
        if took {
            self.drained.notify_waiters();
        }
        state
    }
}

/// Starts serving connection `id`, accepted or dialed: queues our `hello` (with a fresh nonce
/// when there is a token) and spawns both tasks. `None` when no nonce could be made (the
/// connection is dropped, and so closed).
pub(super) fn start(
    halves: Halves,
    inner: &Rc<Inner>,
    origin: Origin,
    id: u64,
) -> Option<Rc<Conn>> {
    let nonce = match inner.token {
        Some(_) => match auth::nonce() {
            Ok(nonce) => nonce,
            Err(err) => {
                error!(error = %err, "no random bytes for a handshake nonce; connection closed");
                return None;
            }
        },
        None => [0; driver_protocol::handshake::NONCE_LEN],
    };
    let handshake = Handshake::new(&inner.hello, inner.token.clone(), nonce);
    let hello = match encode_frame(&handshake.hello().clone().into(), inner.max_frame) {
        Ok(frame) => frame,
        Err(err) => {
            error!(error = %err, "cannot encode our hello; connection closed");
            return None;
        }
    };
    debug!(conn = id, %origin, "control connection opened");
    let (rd, wr) = halves;
    let origin_kind = match origin {
        Origin::Accepted(..) => Kind::Accepted,
        Origin::Dialed(_) => Kind::Dialed,
    };
    let conn = Rc::new(Conn::new(id, inner.tuning.out_queue_max));
    conn.send(hello);
    let writer = tokio::task::spawn_local(write_loop(wr, Rc::clone(&conn), Rc::clone(inner)));
    // Made here, not in the reader: a reader aborted before it first runs (the writer
    // failed at once on a reset socket) still gives its place in the gate back.
    let pending = match &origin {
        Origin::Accepted(_, source) => Some(Pending {
            inner: Rc::clone(inner),
            conn: Rc::clone(&conn),
            source: *source,
            failed: false,
        }),
        Origin::Dialed(_) => None,
    };
    let reader = tokio::task::spawn_local(read_loop(
        rd,
        Rc::clone(&conn),
        Rc::clone(inner),
        handshake,
        origin,
        pending,
    ));
    conn.tasks
        .borrow_mut()
        .extend([writer.abort_handle(), reader.abort_handle()]);
    *conn.reader.borrow_mut() = Some(reader.abort_handle());
    if matches!(origin_kind, Kind::Accepted) {
        inner
            .state
            .borrow_mut()
            .handshaking
            .insert(id, Rc::downgrade(&conn));
    }
    Some(conn)
}

/// Which way a connection came.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Accepted,
    Dialed,
}

/// Holds an accepted connection's place in the gate's count of pending handshakes, and
/// reports the outcome when the handshake ends (also when the task is aborted).
struct Pending {
    inner: Rc<Inner>,
    conn: Rc<Conn>,
    source: Source,
    /// The handshake failed: a bad frame, a refused `hello` or `auth`, a deadline missed, or
    /// a peer that left after sending something. (A client that connects and closes without
    /// a byte, like a TCP health check, did not fail; nor did one that vanished before its
    /// reader ran, or that was evicted.)
    failed: bool,
}

impl Drop for Pending {
    fn drop(&mut self) {
        let failed = self.failed && !self.conn.authenticated();
        match self.inner.state.try_borrow_mut() {
            Ok(mut st) => {
                st.handshaking.remove(&self.conn.id);
                st.gate
                    .finished(self.source, self.conn.id, failed, Instant::now());
            }
            Err(_) => error!(conn = self.conn.id, "control state busy; gate not updated"),
        }
    }
}
/// Writes queued replies, then (while streaming) the events after the cursor, in batches:
/// the replies are copied into one, the events are written from the replay buffer as they
/// are, behind it, with one `writev` (a transport that cannot write vectored gets them
/// copied into the batch instead).
async fn write_loop(mut wr: WriteHalf, conn: Rc<Conn>, inner: Rc<Inner>) {
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    let vectored = wr.is_write_vectored();
    // The end of an event frame a `writev` wrote only in part: it goes before anything else.
    let mut rest: Option<Bytes> = None;
    loop {
        if let Some(frame) = rest.take() {
            if let Err(err) = wr.write_all(&frame).await {
                debug!(conn = conn.id, error = %err, "control connection write failed");
                conn.close_now();
                return;
            }
        }
        batch.clear();
        let state = conn.take_replies(&mut batch, WRITE_BATCH);
        if state == State::Closed {
            return;
        }
        if batch.is_empty() {
            if let Some(frame) = conn.take_large(WRITE_BATCH / 2) {
                if let Err(err) = wr.write_all(&frame).await {
                    debug!(conn = conn.id, error = %err, "control connection write failed");
                    conn.close_now();
                    return;
                }
                continue;
            }
        }
        if state == State::Open && batch.is_empty() {
            lag_check(&conn, &inner, &mut batch);
        }
        if state == State::Open && batch.len() < WRITE_BATCH / 2 {
            // At most half a batch: the events behind are never held back.
            conn.attached
                .fill(conn.id, &inner, &mut batch, WRITE_BATCH / 2);
        }
        if state == State::Open && batch.is_empty() {
            // A large event (exec output) is written from the buffer as it is, not copied.
            let large = conn.cursor.get().and_then(|cursor| {
                inner
                    .state
                    .borrow()
                    .buffer
                    .next_large(cursor, WRITE_BATCH / 2)
            });
            if let Some((seq, frame)) = large {
                conn.cursor.set(Some(seq));
                if let Err(err) = wr.write_all(&frame).await {
                    debug!(conn = conn.id, error = %err, "control connection write failed");
                    conn.close_now();
                    return;
                }
                continue;
            }
        }
        let streaming = state == State::Open && conn.cursor.get().is_some();
        if streaming && vectored {
            match write_events(&mut wr, &conn, &inner, &batch, &mut rest).await {
                Ok(true) => continue,
                Ok(false) => {} // nothing to write: wait below
                Err(err) => {
                    debug!(conn = conn.id, error = %err, "control connection write failed");
                    conn.close_now();
                    return;
                }
            }
        } else if streaming && batch.len() < WRITE_BATCH {
            if let Some(cursor) = conn.cursor.get() {
                let last = inner
                    .state
                    .borrow()
                    .buffer
                    .fill(cursor, &mut batch, WRITE_BATCH);
                conn.cursor.set(Some(last));
            }
        }
        if batch.is_empty() {
            if state == State::Closing {
                // Dropping the write half shuts the socket down for writing; the read half is
                // already gone, so the socket is closed.
                debug!(conn = conn.id, "control connection closed after flushing");
                conn.close_now();
                return;
            }
            conn.wake.notified().await;
            continue;
        }
        if let Err(err) = wr.write_all(&batch).await {
            debug!(conn = conn.id, error = %err, "control connection write failed");
            conn.close_now();
            return;
        }
    }
}

/// Slices of one `writev`: a batch's worth of 200-byte events.
const MAX_IOV: usize = 320;

/// Slices of one `writev` when only a few events wait: the slices are set up on the stack
/// for every attempt, and a connection that writes a reply or an event at a time (an exec's
/// life, a round trip) should not pay for a batch's worth each time.
const FEW_IOV: usize = 8;

/// Writes `head` whole, then, behind it in the same `writev`s, the events after the
/// connection's cursor (about a batch of them), straight from the replay buffer: no copy.
/// The cursor moves past each event handed to the socket; the end of one written in part
/// is left in `rest`. Returns whether anything was written.
///
/// The buffer is borrowed only within each poll, never across a wait.
async fn write_events(
    wr: &mut WriteHalf,
    conn: &Conn,
    inner: &Inner,
    head: &[u8],
    rest: &mut Option<Bytes>,
) -> std::io::Result<bool> {
    let mut head_off = 0;
    let mut wrote = false;
    std::future::poll_fn(|cx| {
        let waiting = conn
            .cursor
            .get()
            .map_or(0, |c| inner.state.borrow().buffer.count_after(c));
        let mut out = Gathered {
            head,
            head_off: &mut head_off,
            rest: &mut *rest,
            wrote: &mut wrote,
        };
        if waiting < FEW_IOV {
            out.poll::<FEW_IOV>(cx, &mut *wr, conn, inner)
        } else {
            out.poll::<MAX_IOV>(cx, &mut *wr, conn, inner)
        }
    })
    .await
}

/// What [`write_events`] carries from one poll to the next.
struct Gathered<'h, 'r> {
    head: &'h [u8],
    head_off: &'r mut usize,
    rest: &'r mut Option<Bytes>,
    wrote: &'r mut bool,
}

impl Gathered<'_, '_> {
    /// One poll of [`write_events`], with at most `N` slices per `writev`.
    fn poll<const N: usize>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        wr: &mut WriteHalf,
        conn: &Conn,
        inner: &Inner,
    ) -> std::task::Poll<std::io::Result<bool>> {
        use std::io::IoSlice;
        use std::pin::Pin;
        use std::task::Poll;
        use tokio::io::AsyncWrite as _;
        loop {
            let st = inner.state.borrow();
            let mut iov = [IoSlice::new(&[]); N];
            let head_left = self.head.get(*self.head_off..).unwrap_or_default();
            let h = usize::from(!head_left.is_empty());
            if let Some(slot) = iov.first_mut() {
                *slot = IoSlice::new(head_left);
            }
            // An observer whose next event was freed while it waited is told so (`lagged`,
            // by the writer's loop) before anything after it: nothing is skipped silently.
            let lagged = conn
                .cursor
                .get()
                .is_some_and(|c| c < st.buffer.acked() && conn.consumer.borrow().is_none());
            let (n, first) = match (conn.cursor.get(), iov.get_mut(h..)) {
                (Some(cursor), Some(slots)) if !lagged => {
                    let limit = WRITE_BATCH.saturating_sub(head_left.len());
                    st.buffer.gather(cursor, slots, limit)
                }
                _ => (0, 0),
            };
            let slices = iov.get(..h + n).unwrap_or_default();
            if slices.is_empty() {
                return Poll::Ready(Ok(*self.wrote || lagged));
            }
            let mut left = match Pin::new(&mut *wr).poll_write_vectored(cx, slices) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()))
                }
                Poll::Ready(Ok(w)) => w,
            };
            *self.wrote = true;
            let took = left.min(head_left.len());
            *self.head_off += took;
            left -= took;
            // The events written: whole ones, then perhaps the start of one more.
            let mut last = None;
            for (i, slice) in iov.iter().skip(h).take(n).enumerate() {
                if left == 0 {
                    break;
                }
                let seq = first.saturating_add(i as u64);
                last = Some(seq);
                if left < slice.len() {
                    *self.rest = st
                        .buffer
                        .frame(seq)
                        .filter(|f| left <= f.len())
                        .map(|f| f.slice(left..));
                    break;
                }
                left -= slice.len();
            }
            if let Some(seq) = last {
                conn.cursor.set(Some(seq));
            }
            if *self.head_off >= self.head.len() {
                return Poll::Ready(Ok(true));
            }
        }
    }
}

/// Runs the handshake (`hello`, and `auth` with a token), makes the connection the live one,
/// then serves requests.
async fn read_loop(
    mut rd: ReadHalf,
    conn: Rc<Conn>,
    inner: Rc<Inner>,
    mut handshake: Handshake,
    origin: Origin,
    mut pending: Option<Pending>,
) {
    let mut heard = false;
    // Small frames until the peer has proved itself: a client without the token cannot make
    // the shim buffer more than this.
    let small = inner.tuning.handshake_max_frame.min(inner.max_frame);
    let mut codec = MessageCodec::<ControlToShim, ShimToControl>::with_max_frame(small);
    let mut buf = BytesMut::with_capacity(READ_CHUNK.min(small));
    let mut hash = 0;
    // Two deadlines: the peer's `hello` soon (it sends it at once, without waiting for
    // ours), the whole handshake a little later. A peer that trickles bytes holds its place
    // in the gate no longer than that.
    let opened = tokio::time::Instant::now();
    let first = opened
        + inner
            .tuning
            .hello_timeout
            .min(inner.tuning.handshake_timeout);
    let whole = opened + inner.tuning.handshake_timeout;
    let hello = loop {
        let deadline = if heard { whole } else { first };
        let next = tokio::time::timeout_at(
            deadline,
            next_message(&mut rd, &mut codec, &mut buf, &mut hash),
        );
        let msg = match next.await {
            Ok(Ok(Some(msg))) => {
                heard = true;
                msg
            }
            Ok(Ok(None)) => {
                if let Some(p) = pending.as_mut() {
                    p.failed = heard || !buf.is_empty();
                }
                debug!(conn = conn.id, %origin, "control client left during the handshake");
                conn.close_now();
                return;
            }
            Ok(Err(err)) => {
                if let Some(p) = pending.as_mut() {
                    p.failed = !matches!(err, DecodeError::Io(_)) || heard || !buf.is_empty();
                }
                if !matches!(err, DecodeError::Io(_)) {
                    warn!(conn = conn.id, %origin, error = %err,
                        "control handshake failed: bad frame");
                }
                bad_frame(&conn, &inner, &err);
                return;
            }
            Err(_) => {
                debug!(conn = conn.id, %origin, heard,
                    "control handshake failed: not completed in time");
                if let Some(p) = pending.as_mut() {
                    p.failed = true;
                }
                let msg = "handshake not completed in time".to_owned();
                reject(&conn, &inner, None, ErrorCode::Timeout, msg);
                return;
            }
        };
        let re = request_id(&msg);
        match handshake.on_message(msg) {
            Ok(Step::Continue) => {}
            Ok(Step::Live { hello, auth }) => {
                if let Some(auth) = auth {
                    conn_reply(&conn, &inner, &auth.into());
                }
                break hello;
            }
            Err((code, msg)) => {
                if let Some(p) = pending.as_mut() {
                    p.failed = true;
                }
                warn!(conn = conn.id, %origin, %code, message = %msg,
                    "control handshake failed");
                reject(&conn, &inner, re, code, msg);
                return;
            }
        }
    };
    conn.authenticated.set(true);
    drop(pending);
    codec = MessageCodec::with_max_frame(inner.max_frame);
    if let Err((code, msg)) = join(&conn, &inner, hello.consumer.as_deref()) {
        warn!(conn = conn.id, %origin, %code, message = %msg, "control session refused");
        reject(&conn, &inner, None, code, msg);
        return;
    }
    info!(conn = conn.id, %origin, software = %hello.software, version = %hello.software_version,
        consumer = hello.consumer.as_deref().unwrap_or("-"),
        authenticated = inner.token.is_some(), "control client connected");

    loop {
        // A dialed connection is the shim's to keep alive: a peer silent for longer than
        // the idle timeout (a frozen control plane, a black-holed path) is given up, so
        // that the dialer can reach a live one. An accepted connection is replaced by the
        // next one instead, so it may be silent.
        let next = next_message(&mut rd, &mut codec, &mut buf, &mut hash);
        let read = match origin {
            Origin::Dialed(_) => match tokio::time::timeout(inner.tuning.dialed_idle, next).await {
                Ok(read) => read,
                Err(_) => {
                    warn!(conn = conn.id, %origin, idle = ?inner.tuning.dialed_idle,
                        "nothing from the control plane for too long; closing to redial");
                    break;
                }
            },
            Origin::Accepted(..) => next.await,
        };
        let msg = match read {
            Ok(Some(msg)) => msg,
            Ok(None) => {
                info!(conn = conn.id, "control client disconnected");
                break;
            }
            Err(err) => {
                leave(&inner, &conn);
                bad_frame(&conn, &inner, &err);
                return;
            }
        };
        if handle(&conn, &inner, msg, hash).await.is_break() || !conn.is_open() {
            break;
        }
    }
    leave(&inner, &conn);
    conn.close_now();
}

/// Makes an authenticated connection a session: the consumer it names (a newer connection of
/// a consumer replaces the older, which is told `replaced`), or an observer. Past
/// `--max-sessions` an observer is refused, while a consumer takes the oldest observer's
/// place (so clients that hold the token but are not the control plane can never lock it
/// out); a new consumer past `--max-consumers` is refused.
fn join(conn: &Rc<Conn>, inner: &Inner, consumer: Option<&str>) -> Result<(), (ErrorCode, String)> {
    let (replaced, evicted) = {
        let mut st = inner.state.borrow_mut();
        st.sessions.retain(|c| c.is_open());
        let Some(name) = consumer else {
            if st.sessions.len() >= st.max_sessions {
                let msg = format!("{} control sessions are open already", st.max_sessions);
                return Err((ErrorCode::Limit, msg));
            }
            st.sessions.push(Rc::clone(conn));
            return Ok(());
        };
        if !consumers::valid_name(name) {
            let msg = format!(
                "a consumer name is 1 to {} bytes of [A-Za-z0-9._-]",
                consumers::MAX_NAME
            );
            return Err((ErrorCode::Invalid, msg));
        }
        if !st.consumers.has_room_for(name) {
            let msg = format!(
                "{} consumers are known already; forget_consumer one first",
                st.consumers.len()
            );
            return Err((ErrorCode::Limit, msg));
        }
        // Room first, so that a refused connection leaves the consumers as they were.
        let old = st.consumers.get(name).and_then(|c| c.conn);
        let replaced = old.and_then(|id| st.session(id));
        let others = st.sessions.len() - usize::from(replaced.is_some());
        let victim = if others >= st.max_sessions {
            match st.sessions.iter().position(|c| c.consumer().is_none()) {
                Some(i) => Some(i),
                // Only consumers (more than --max-consumers fit, normally impossible).
                None => {
                    let msg = format!("{} control sessions are open already", st.max_sessions);
                    return Err((ErrorCode::Limit, msg));
                }
            }
        } else {
            None
        };
        let start = st.buffer.acked();
        if st.consumers.join(name, conn.id, start).is_err() {
            return Err((ErrorCode::Limit, "too many consumers".to_owned()));
        }
        let evicted = victim.map(|i| st.sessions.remove(i));
        if let Some(old) = &replaced {
            st.sessions.retain(|c| c.id != old.id);
        }
        *conn.consumer.borrow_mut() = Some(name.to_owned());
        st.sessions.push(Rc::clone(conn));
        (replaced, evicted)
    };
    if let Some(old) = replaced {
        info!(
            old = old.id,
            new = conn.id,
            "a newer connection of the consumer replaces the older"
        );
        let msg = "a newer connection of this consumer replaced this one".to_owned();
        reject(&old, inner, None, ErrorCode::Replaced, msg);
    }
    if let Some(victim) = evicted {
        info!(
            conn = victim.id,
            by = conn.id,
            "an observer gives its session to a consumer"
        );
        let msg = "the session limit is reached and a consumer needs this place".to_owned();
        reject(&victim, inner, None, ErrorCode::Limit, msg);
    }
    Ok(())
}

/// An observer whose next event was freed already: `lagged{missed, next_seq}` goes into
/// `batch`, and its cursor skips to what is still buffered.
fn lag_check(conn: &Conn, inner: &Inner, batch: &mut Vec<u8>) {
    let Some(cursor) = conn.cursor.get() else {
        return;
    };
    let acked = inner.state.borrow().buffer.acked();
    if cursor >= acked || conn.consumer.borrow().is_some() {
        return;
    }
    let lagged = Lagged {
        missed: acked - cursor,
        next_seq: acked.saturating_add(1),
    };
    debug!(conn = conn.id, missed = lagged.missed, "observer lagged");
    conn.cursor.set(Some(acked));
    match encode_frame(&lagged.into(), inner.max_frame) {
        Ok(frame) => batch.extend_from_slice(&frame),
        Err(err) => warn!(conn = conn.id, error = %err, "cannot encode lagged"),
    }
}

/// Handles one request after the handshake; `Break` ends the connection.
async fn handle(
    conn: &Rc<Conn>,
    inner: &Rc<Inner>,
    msg: ControlToShim,
    hash: u64,
) -> ControlFlow<()> {
    if !conn.is_open() {
        // Replaced or evicted: nothing more it sends counts.
        return ControlFlow::Break(());
    }
    match msg {
        ControlToShim::Ping(ping) => conn_reply(conn, inner, &Pong { re: ping.id }.into()),
        ControlToShim::Ack(ack) => {
            let last = inner.state.borrow().buffer.stats().2;
            if ack.seq > last {
                warn!(
                    conn = conn.id,
                    seq = ack.seq,
                    last,
                    "ack past the last seq ignored"
                );
            }
            // An observer's ack moves nothing (and is no error).
            if let Some(name) = conn.consumer() {
                inner.ack(&name, ack.seq);
            }
        }
        ControlToShim::ResumeFrom(resume) => resume_from(conn, inner, &resume),
        ControlToShim::Hello(_) => {
            let msg = "hello was already exchanged".to_owned();
            send_error(conn, inner, None, ErrorCode::InvalidState, msg);
        }
        ControlToShim::Auth(_) => {
            let msg = "auth was already exchanged, or is not enabled".to_owned();
            send_error(conn, inner, None, ErrorCode::InvalidState, msg);
        }
        ControlToShim::Unknown(unknown) => {
            debug!(conn = conn.id, r#type = %unknown.type_name, "unsupported control message");
            let msg = format!("unsupported message type {:?}", unknown.type_name);
            send_error(conn, inner, unknown.id, ErrorCode::Unsupported, msg);
        }
        request => return forward(conn, inner, request, hash).await,
    }
    ControlFlow::Continue(())
}

/// `resume_from`: where this connection's events start (PROTOCOL.md §8.3, §8.7). Once per
/// connection; a seq older than what is still buffered for it is `gap`, never a silent skip.
fn resume_from(conn: &Rc<Conn>, inner: &Rc<Inner>, resume: &ResumeFrom) {
    if conn.cursor.get().is_some() {
        let msg = "resume_from was already sent on this connection".to_owned();
        send_error(conn, inner, None, ErrorCode::InvalidState, msg);
        return;
    }
    let now = resume.from.as_deref() == Some("now");
    if let Some(from) = resume.from.as_deref().filter(|f| *f != "now") {
        let msg = format!("resume_from: unknown from {from:?} (only \"now\")");
        send_error(conn, inner, None, ErrorCode::Invalid, msg);
        return;
    }
    let consumer = conn.consumer();
    let (floor, last, own) = {
        let st = inner.state.borrow();
        let own = consumer
            .as_deref()
            .and_then(|name| st.consumers.get(name))
            .map(|c| c.acked);
        (st.buffer.acked(), st.buffer.stats().2, own)
    };
    // Where this client's stream may start: a consumer's own position, an observer's the
    // oldest event still buffered.
    let oldest = own.unwrap_or(floor);
    let from = match (resume.seq, &consumer) {
        (_, Some(_)) if now => {
            let msg = "a consumer resumes from a seq, or from its own position".to_owned();
            send_error(conn, inner, None, ErrorCode::Invalid, msg);
            return;
        }
        (None, Some(_)) => oldest,
        (None, None) => last,
        // Past the last seq (a client that knew an earlier shim behind this address):
        // nothing is acknowledged, and everything still buffered for it is sent.
        (Some(seq), _) if seq > last => {
            warn!(
                conn = conn.id,
                asked = seq,
                last,
                "resume_from past the last seq: replaying what is buffered"
            );
            oldest
        }
        (Some(seq), _) if seq < oldest => {
            debug!(conn = conn.id, asked = seq, oldest, "resume_from: gap");
            let mut err = ErrorMsg::new(
                None,
                ErrorCode::Gap,
                format!(
                    "events {}..={oldest} are no longer buffered for this client",
                    seq + 1
                ),
            );
            err.first_available = Some(oldest.saturating_add(1));
            conn_reply(conn, inner, &err.into());
            return;
        }
        (Some(seq), _) => seq,
    };
    if let Some(name) = &consumer {
        inner.ack(name, from);
    }
    debug!(
        conn = conn.id,
        from,
        consumer = consumer.as_deref().unwrap_or("-"),
        "control client resumes"
    );
    conn.cursor.set(Some(from));
    conn.wake();
}

/// `forget_consumer`: retires a consumer that has no connection.
fn forget_consumer(inner: &Rc<Inner>, forget: &ForgetConsumer) -> ShimToControl {
    let result = inner.state.borrow_mut().consumers.forget(&forget.consumer);
    match result {
        Ok(()) => {
            info!(consumer = %forget.consumer, "consumer forgotten");
            inner.refree();
            OkReply::new(forget.id).into()
        }
        Err(why) => {
            let (code, msg) = match why {
                Refusal::NotFound => (ErrorCode::NotFound, "no such consumer"),
                Refusal::Connected => (
                    ErrorCode::InvalidState,
                    "the consumer is connected; it must disconnect first",
                ),
                Refusal::Full => (ErrorCode::Internal, "unexpected"),
            };
            ErrorMsg::new(Some(forget.id), code, msg).into()
        }
    }
}

/// Hands a command to the supervisor, unless its id was seen recently.
async fn forward(
    conn: &Rc<Conn>,
    inner: &Rc<Inner>,
    request: ControlToShim,
    hash: u64,
) -> ControlFlow<()> {
    let id = request_id(&request);
    if let Some(id) = id {
        let mut st = inner.state.borrow_mut();
        if st.ids.hash(id).is_some_and(|h| h != hash) {
            drop(st);
            debug!(conn = conn.id, id, "request id reused for another request");
            let msg = "this request id was used for another request".to_owned();
            send_error(conn, inner, Some(id), ErrorCode::Conflict, msg);
            return ControlFlow::Continue(());
        }
        match st.ids.get(id) {
            Some(Seen::Done(frame)) => {
                let frame = frame.clone();
                drop(st);
                debug!(conn = conn.id, id, "retried request: replaying its reply");
                conn.send(frame);
                return ControlFlow::Continue(());
            }
            Some(Seen::Pending { .. }) => {
                debug!(conn = conn.id, id, "retried request still in progress");
                st.ids.redirect(id, conn.id);
                return ControlFlow::Continue(());
            }
            None => st.ids.begin(id, conn.id, hash),
        }
    }
    let reply = Reply::new(Rc::clone(inner), conn.id, id);
    let answered = match &request {
        ControlToShim::ForgetConsumer(forget) => Some(forget_consumer(inner, forget)),
        // exec registry
        ControlToShim::ListExecs(m) => Some(super::attach::list(inner, m)),
        ControlToShim::AttachExec(m) => {
            let reply = conn.attached.attach(conn.id, inner, m);
            if matches!(reply, ShimToControl::ExecAttached(_)) {
                conn.wake();
            }
            Some(reply)
        }
        ControlToShim::DetachExec(m) => Some(conn.attached.detach(m)),
        _ => None,
    };
    if let Some(msg) = answered {
        reply.send(msg);
        return ControlFlow::Continue(());
    }
    if inner
        .commands
        .send(Command { request, reply })
        .await
        .is_err()
    {
        debug!(
            conn = conn.id,
            "control server gone; closing the connection"
        );
        return ControlFlow::Break(());
    }
    ControlFlow::Continue(())
}

/// Reads the next message; `None` at a clean end of stream. With it, the hash of its body
/// as it came (for `conflict`, [`super::ids`]), taken before the codec consumes it.
async fn next_message(
    rd: &mut ReadHalf,
    codec: &mut MessageCodec<ControlToShim, ShimToControl>,
    buf: &mut BytesMut,
    hash: &mut u64,
) -> Result<Option<ControlToShim>, DecodeError> {
    loop {
        // The codec checks the length against its limit; a frame it would refuse is hashed
        // by no one.
        if let Ok(Some(len)) = frame::parse_header(buf, usize::MAX) {
            if let Some(body) = buf.get(frame::HEADER_LEN..frame::HEADER_LEN.saturating_add(len)) {
                *hash = body_hash(body);
            }
        }
        if let Some(msg) = take_shared(buf, codec.max_frame()) {
            return msg.map(Some);
        }
        // Room for the rest of a frame whose head is in, so that a large one (a file's
        // chunk) comes in a few reads, not one every READ_CHUNK; at least READ_CHUNK
        // otherwise. Made before the codec would make it in a fresh allocation (a length
        // over the limit is left to the codec, which refuses it).
        let rest = match frame::parse_header(buf, codec.max_frame()) {
            Ok(Some(len)) => frame::HEADER_LEN
                .saturating_add(len)
                .saturating_sub(buf.len()),
            _ => 0,
        };
        if rest >= SHARED_MIN && buf.capacity() - buf.len() < rest {
            // A buffer of the frame's size, no more (a spare one whose frames are gone, if
            // any): its data may be shared on ([`take_shared`]), and it then holds this
            // frame only. The small buffer the frame's start came in is let go.
            drop(spare::renew(buf, rest, 0));
        }
        if let Some(msg) = codec.decode(buf)? {
            if buf.is_empty() {
                // A small message and nothing behind it: no large frame is coming in, the
                // spare buffers go.
                spare::clear();
            }
            return Ok(Some(msg));
        }
        if buf.capacity() - buf.len() < rest.max(READ_CHUNK / 4) {
            buf.reserve(rest.max(READ_CHUNK));
        }
        if rd.read_buf(buf).await? == 0 {
            return codec.decode_eof(buf);
        }
    }
}

/// Frames of at least this many bytes may carry their `data` shared ([`take_shared`]).
const SHARED_MIN: usize = 16 * 1024;

/// A whole `fs_write_data` frame of at least [`SHARED_MIN`] bytes at the front of `buf`,
/// taken off it and decoded with its `data` a slice of the frame, not a copy (an upload's
/// chunk goes on to the file's process as it came); `None` (and `buf` untouched) for
/// anything else, which the codec decodes. The message is decoded from the body with its
/// `data` left out ([`raw::take_data`]): the same checks, the same message.
fn take_shared(buf: &mut BytesMut, max: usize) -> Option<Result<ControlToShim, DecodeError>> {
    use driver_protocol::{raw, Message as _};
    let len = frame::parse_header(buf, max).ok()??;
    let total = frame::HEADER_LEN.checked_add(len)?;
    if len < SHARED_MIN || buf.len() < total {
        return None;
    }
    let (small, range) = raw::take_data(buf.get(frame::HEADER_LEN..total)?)?;
    let frame = buf.split_to(total).freeze();
    if buf.is_empty() {
        // The next frame is read into a small buffer of its own, not into what is left of
        // this one's (which the data holds on to, and which is reused once it is gone).
        spare::keep(std::mem::take(buf));
    }
    let body = frame.slice(frame::HEADER_LEN..);
    Some(match ControlToShim::decode(&small) {
        Ok(ControlToShim::FsWriteData(mut m)) if range.end <= body.len() => {
            m.data = body.slice(range);
            Ok(ControlToShim::FsWriteData(m))
        }
        // Any other message with a `data`, or an error: from the whole body, as the
        // codec would.
        _ => ControlToShim::decode(&body),
    })
}

/// A frame could not be decoded: tell the client why (unless the socket failed) and close.
fn bad_frame(conn: &Rc<Conn>, inner: &Inner, err: &DecodeError) {
    if let DecodeError::Io(io) = err {
        debug!(conn = conn.id, error = %io, "control connection read failed");
        conn.close_now();
        return;
    }
    warn!(conn = conn.id, error = %err, "bad frame from the control client; closing");
    reject(conn, inner, err.request_id(), err.code(), err.to_string());
}

/// Sends `error` and closes the connection once it is written.
fn reject(conn: &Rc<Conn>, inner: &Inner, re: Option<RequestId>, code: ErrorCode, msg: String) {
    debug!(conn = conn.id, %code, message = %msg, "rejecting the control connection");
    send_error(conn, inner, re, code, msg);
    conn.close_after_flush(inner.tuning.close_grace);
}

fn send_error(conn: &Conn, inner: &Inner, re: Option<RequestId>, code: ErrorCode, msg: String) {
    let err = ErrorMsg {
        re,
        code,
        message: msg,
        task_id: None,
        first_available: None,
    };
    conn_reply(conn, inner, &err.into());
}

/// Queues a reply that is not recorded for retries (pong, errors about frames).
fn conn_reply(conn: &Conn, inner: &Inner, msg: &ShimToControl) {
    match encode_frame(msg, inner.max_frame) {
        Ok(frame) => conn.send(frame),
        Err(err) => warn!(conn = conn.id, error = %err, "cannot encode a control reply"),
    }
}

/// The connection is no longer a session (if it was).
fn leave(inner: &Inner, conn: &Conn) {
    let mut st = inner.state.borrow_mut();
    st.sessions.retain(|c| c.id != conn.id);
    if let Some(name) = conn.consumer.borrow().as_deref() {
        st.consumers.leave(name, conn.id);
    }
}

/// The `id` of a request, for replies and idempotency.
pub(super) fn request_id(msg: &ControlToShim) -> Option<RequestId> {
    match msg {
        ControlToShim::SubmitTask(m) => Some(m.id),
        ControlToShim::CancelTask(m) => Some(m.id),
        ControlToShim::Pause(m) => Some(m.id),
        ControlToShim::Resume(m) => Some(m.id),
        ControlToShim::Signal(m) => Some(m.id),
        ControlToShim::RestartDriver(m) => Some(m.id),
        ControlToShim::SetDriver(m) => Some(m.id),
        ControlToShim::Exec(m) => Some(m.id),
        ControlToShim::Status(m) => Some(m.id),
        ControlToShim::Shutdown(m) => Some(m.id),
        ControlToShim::Ping(m) => Some(m.id),
        ControlToShim::ForgetConsumer(m) => Some(m.id),
        ControlToShim::FsStat(m) => Some(m.id),
        ControlToShim::FsList(m) => Some(m.id),
        ControlToShim::FsRead(m) => Some(m.id),
        ControlToShim::FsMkdir(m) => Some(m.id),
        ControlToShim::FsRemove(m) => Some(m.id),
        ControlToShim::FsRename(m) => Some(m.id),
        ControlToShim::FsWriteOpen(m) => Some(m.id),
        ControlToShim::FsWriteData(m) => Some(m.id),
        ControlToShim::FsWriteClose(m) => Some(m.id),
        ControlToShim::FsWatch(m) => Some(m.id),
        ControlToShim::FsUnwatch(m) => Some(m.id),
        ControlToShim::SetClock(m) => Some(m.id),
        ControlToShim::Metrics(m) => Some(m.id),
        ControlToShim::ListExecs(m) => Some(m.id),
        ControlToShim::AttachExec(m) => Some(m.id),
        ControlToShim::DetachExec(m) => Some(m.id),
        ControlToShim::Unknown(m) => m.id,
        ControlToShim::Hello(_)
        | ControlToShim::Auth(_)
        | ControlToShim::ExecInput(_)
        | ControlToShim::ExecResize(_)
        | ControlToShim::ExecSignal(_)
        | ControlToShim::Ack(_)
        | ControlToShim::ResumeFrom(_) => None,
    }
}
