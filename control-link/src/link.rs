//! One connection to a shim: framing over any transport, and the control side of the
//! handshake (PROTOCOL.md §5, §8.1, §8.2).
//!
//! ```text
//!  us (control)                                   shim
//!   hello{role:"control", nonce: Nc}  ───►  ◄───  hello{role:"shim", agent_id, nonce: Ns}
//!   auth{mac: proof(control, Ns, Nc)} ───►  ◄───  auth{mac: proof(shim, Nc, Ns)}  (token only)
//! ```
//!
//! With a token, a shim `hello` without a nonce is a downgrade and is refused, and nothing the
//! shim sends is trusted before its proof verified.
//!
//! Before the handshake completes a peer is unauthenticated (a listener accepts anyone), so
//! its frames are limited to [`HANDSHAKE_MAX_FRAME`] (as the shim limits ours) and the whole
//! handshake to a timeout: a peer that never authenticates holds at most one small frame for
//! a bounded time. The configured `max_frame` applies from the first message after it.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::pin::Pin;

use bytes::{Buf as _, BytesMut};
use driver_protocol::codec::{FrameCodec, MessageCodec};
use driver_protocol::frame::HEADER_LEN;
use driver_protocol::handshake::{self, auth_proof, hello_nonce, verify_proof, NONCE_LEN};
use driver_protocol::message::{Auth, ControlToShim, FsWriteData, Hello, Role, ShimToControl};
use driver_protocol::{envelope, frame, DecodeError, ErrorCode, Message as _};
use futures_core::Stream;
use tokio::io::{AsyncWriteExt as _, ReadHalf, WriteHalf};
use tokio_util::codec::{Decoder, FramedRead};

use crate::addr::BoxIo;
use crate::events::RawEvent;
use crate::output;
use crate::{random, ConnectOptions, Error, Token};

/// The read buffer's largest usual size: a burst of events (or a large `exec_output`) is
/// read in few syscalls (tokio-util's default is 8 KiB).
const READ_BUF: usize = 64 * 1024;

/// The read buffer a connection starts with, and goes back to when idle: a fleet holds
/// thousands of connections that carry a few small frames a minute, and their read buffers
/// would otherwise be most of its memory. A read that fills the buffer doubles it for the
/// next one, up to [`READ_BUF`] (see [`InCodec::grow`]); [`Link::shrink_idle`] gives it
/// back.
const INITIAL_READ: usize = 2 * 1024;

/// The write buffer is given back at [`Link::shrink_idle`] once it has grown past this.
const IDLE_WRITE_BUF: usize = 4 * 1024;

/// Below this much room left in the read buffer, the next read goes to a buffer with room
/// (see [`InCodec::make_room`]).
const MIN_READ: usize = 8 * 1024;

/// Read buffers kept for reuse while raw events still hold slices of them.
const SPARE_BUFS: usize = 8;

/// The software name in our `hello`.
const SOFTWARE: &str = "control-link";

/// The largest frame read before the handshake completes (`hello` and `auth` are a few
/// hundred bytes; the shim uses the same limit for ours).
pub(crate) const HANDSHAKE_MAX_FRAME: usize = 64 * 1024;

/// What a link reads: a message, or an event left encoded (once events are read raw).
#[derive(Debug)]
pub(crate) enum Incoming {
    /// A decoded message (every message while events are decoded) and the length of its
    /// frame. Boxed: a raw event, the bulk of a raw stream, is a quarter of a message's size,
    /// and every item is moved through several layers of `Poll`s and `Option`s.
    Msg(Box<ShimToControl>, usize),
    /// The event of an `event` envelope, not decoded.
    Event(RawEvent),
}

/// The reading side's codec: [`MessageCodec`]'s decoding, or, when `raw`, the events of
/// `event` envelopes split off the read buffer as they are (checked, not decoded).
struct InCodec {
    typed: MessageCodec<ShimToControl, ControlToShim>,
    frames: FrameCodec,
    raw: bool,
    max_frame: usize,
    /// Read buffers of at most [`READ_BUF`] given up while raw events held slices of them,
    /// oldest first.
    spare: VecDeque<BytesMut>,
    /// The size of the read buffer, when [`InCodec::make_room`] gave it (`None`: the
    /// buffer it started with, which may have grown for a large frame).
    size: Option<usize>,
    /// The capacity of the read buffer when a read had filled it, until the buffer grows.
    filled: Option<usize>,
}

impl InCodec {
    fn new(max_frame: usize, raw: bool) -> Self {
        Self {
            typed: MessageCodec::with_max_frame(max_frame),
            frames: FrameCodec::with_max_frame(max_frame),
            raw,
            max_frame,
            spare: VecDeque::new(),
            size: None,
            filled: None,
        }
    }

    /// [`Decoder::decode`] of typed messages: a large `exec_output` or `fs_data` without a
    /// copy ([`output::take`]), any other message decoded; the buffer grows while reads fill it.
    /// Out of line, so that the raw path's code stays as it is.
    #[inline(never)]
    fn decode_typed(&mut self, src: &mut BytesMut) -> Result<Option<Incoming>, DecodeError> {
        self.note_fill(src);
        if let Some((msg, len)) = output::take(src, self.max_frame) {
            return Ok(Some(Incoming::Msg(Box::new(msg), len)));
        }
        let got = typed(src, |src| self.typed.decode(src))?;
        if got.is_none() {
            self.grow(src);
        }
        Ok(got)
    }

    /// Notes a read buffer that a read filled: more was probably waiting. (Taking frames
    /// off a full buffer leaves it full, shorter from the front: the first, largest, size
    /// seen is the one the read filled.)
    fn note_fill(&mut self, src: &BytesMut) {
        if src.len() == src.capacity() && src.capacity() < READ_BUF {
            self.filled = self.filled.max(Some(src.capacity()));
        }
    }

    /// Once the frames in `src` are taken, doubles it (up to [`READ_BUF`]) if the last read
    /// filled it, so that a stream of frames is read in fewer, larger reads. The rest of a
    /// frame it holds moves to the new buffer.
    fn grow(&mut self, src: &mut BytesMut) {
        let Some(full) = self.filled.take() else {
            return;
        };
        let target = full.saturating_mul(2).min(READ_BUF).max(src.len());
        if src.capacity() < target && !src.try_reclaim(target.saturating_sub(src.len())) {
            let mut next = BytesMut::with_capacity(target);
            next.extend_from_slice(src);
            *src = next;
        }
    }

    /// Gives the next read a buffer with room for the rest of the frame it holds the start
    /// of (`frame`: its whole length, when its header is in) and at least [`MIN_READ`],
    /// without a fresh allocation where it can.
    ///
    /// Raw events are slices of the read buffer, so while the consumer holds some, the
    /// buffer is shared: left to itself, a full buffer would be replaced by a freshly
    /// allocated one (whose pages the allocator often has to fault in again) every 64 KiB.
    /// Instead a full buffer of the usual size waits here until its events are gone, and
    /// the oldest spare one whose events are gone is taken back (a larger one, made for a
    /// large frame, is let go). `frame` is within the frame limit: the caller checked.
    fn make_room(&mut self, src: &mut BytesMut, frame: Option<usize>) {
        let need = frame.unwrap_or(0).saturating_sub(src.len()).max(MIN_READ);
        if src.capacity() - src.len() >= need || src.try_reclaim(need) {
            return;
        }
        let total = src.len().saturating_add(need);
        let reusable = self.spare.iter_mut().position(|b| b.try_reclaim(total));
        let mut next = match reusable.and_then(|i| self.spare.remove(i)) {
            Some(b) => b,
            None => BytesMut::with_capacity(READ_BUF.max(total)),
        };
        let size = next.capacity();
        next.extend_from_slice(src);
        let mut used = std::mem::replace(src, next);
        used.clear();
        let usual = self.size.is_some_and(|s| s <= READ_BUF);
        if usual && self.spare.len() < SPARE_BUFS {
            self.spare.push_back(used);
        }
        self.size = Some(size);
    }
}

impl Decoder for InCodec {
    type Item = Incoming;
    type Error = DecodeError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Incoming>, DecodeError> {
        if !self.raw {
            return self.decode_typed(src);
        }
        // Room for an incomplete frame is made here, before the frame codec would reserve
        // it in a fresh allocation (an error is left to the codec).
        match frame::parse_header(src, self.max_frame) {
            Ok(Some(len)) if src.len() >= HEADER_LEN.saturating_add(len) => {}
            Ok(Some(len)) => self.make_room(src, Some(HEADER_LEN.saturating_add(len))),
            Ok(None) => self.make_room(src, None),
            Err(_) => {}
        }
        let Some(body) = self.frames.decode(src)? else {
            return Ok(None);
        };
        decode_raw(body).map(Some)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Incoming>, DecodeError> {
        if !self.raw {
            return typed(src, |src| self.typed.decode_eof(src));
        }
        match self.frames.decode_eof(src)? {
            Some(body) => decode_raw(body).map(Some),
            None => Ok(None),
        }
    }
}

/// The message `decode` takes off `src`, with the length of its frame.
fn typed(
    src: &mut BytesMut,
    decode: impl FnOnce(&mut BytesMut) -> Result<Option<ShimToControl>, DecodeError>,
) -> Result<Option<Incoming>, DecodeError> {
    let before = src.len();
    let msg = decode(src)?;
    let len = before.saturating_sub(src.len());
    Ok(msg.map(|msg| Incoming::Msg(Box::new(msg), len)))
}

/// An `event` envelope's event as it is (a slice of the frame, no copy); any other message,
/// or an envelope that does not check, decoded (which gives the error).
fn decode_raw(mut body: BytesMut) -> Result<Incoming, DecodeError> {
    // The envelope and the event's head in one pass.
    let Ok((split, type_name)) = envelope::split_envelope_head(&body) else {
        let len = body.len().saturating_add(frame::HEADER_LEN);
        return ShimToControl::decode(&body).map(|msg| Incoming::Msg(Box::new(msg), len));
    };
    let seq = split.seq;
    // Offsets of slices of `body` within it.
    let offset = |s: &[u8]| (s.as_ptr() as usize).saturating_sub(body.as_ptr() as usize);
    let start = offset(split.event);
    let len = split.event.len();
    let type_start = offset(type_name.as_bytes()).saturating_sub(start);
    let type_at = type_start..type_start.saturating_add(type_name.len());
    // The event is what is left of the frame once its envelope is cut away (no second
    // reference to the read buffer taken and dropped, as `slice` would).
    body.advance(start.min(body.len()));
    body.truncate(len);
    Ok(Incoming::Event(RawEvent::checked(
        seq,
        body.freeze(),
        type_at,
    )))
}

/// A framed connection: typed messages in (or events left encoded), typed messages out.
pub(crate) struct Link {
    rd: FramedRead<ReadHalf<BoxIo>, InCodec>,
    wr: WriteHalf<BoxIo>,
    out: BytesMut,
    max_frame: usize,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").finish_non_exhaustive()
    }
}

impl Link {
    pub(crate) fn new(io: BoxIo, max_frame: usize) -> Self {
        let (rd, wr) = tokio::io::split(io);
        Self {
            rd: FramedRead::with_capacity(rd, InCodec::new(max_frame, false), INITIAL_READ),
            wr,
            out: BytesMut::with_capacity(256),
            max_frame,
        }
    }

    /// Changes the largest frame read and written from now on (between frames only).
    fn set_max_frame(&mut self, max_frame: usize) {
        let raw = self.rd.decoder().raw;
        *self.rd.decoder_mut() = InCodec::new(max_frame, raw);
        self.max_frame = max_frame;
    }

    /// Reads events raw ([`Incoming::Event`]) from now on, or decoded (between frames only).
    pub(crate) fn set_raw_events(&mut self, raw: bool) {
        self.rd.decoder_mut().raw = raw;
    }

    /// Gives back read and write buffers that grew, when nothing is held in them (an idle
    /// connection: the session calls this at its keepalive check).
    pub(crate) fn shrink_idle(&mut self) {
        let buf = self.rd.read_buffer_mut();
        // `capacity` counts from the read position: an empty buffer can be large and show
        // little, which `try_reclaim` (no allocation) brings back into view.
        if buf.is_empty() && (buf.capacity() > INITIAL_READ || buf.try_reclaim(INITIAL_READ + 1)) {
            *buf = BytesMut::with_capacity(INITIAL_READ);
            let codec = self.rd.decoder_mut();
            codec.spare.clear();
            codec.size = None;
            codec.filled = None;
        }
        if self.out.capacity() > IDLE_WRITE_BUF {
            self.out = BytesMut::new();
        }
    }

    /// Writes one message.
    pub(crate) async fn send(&mut self, msg: &ControlToShim) -> Result<(), Error> {
        if let ControlToShim::FsWriteData(m) = msg {
            if m.data.len() >= output::SHARED_MIN && self.send_data(m).await? {
                return Ok(());
            }
        }
        self.out.clear();
        frame::write_message(&mut self.out, self.max_frame, msg)?;
        self.wr.write_all(&self.out).await?;
        Ok(())
    }

    /// Writes an `fs_write_data` whose `data` is large without copying the data into the
    /// frame: the frame up to the data is encoded, the data is written behind it from where it
    /// is, in vectored writes. `false` (nothing written) when the encoder did not end the
    /// message with its `data` as expected, or the frame would be over the limit: the caller
    /// then encodes it whole.
    async fn send_data(&mut self, m: &FsWriteData) -> Result<bool, Error> {
        let head = FsWriteData {
            id: m.id,
            handle: m.handle,
            offset: m.offset,
            data: bytes::Bytes::new(),
        };
        self.out.clear();
        frame::write_message(
            &mut self.out,
            self.max_frame,
            &ControlToShim::FsWriteData(head),
        )?;
        // The last field, `data`, is an empty bin 8: it becomes the data's bin 32 head.
        const EMPTY: &[u8] = b"\xa4data\xc4\x00";
        let data = &m.data[..];
        let body = self.out.len() - HEADER_LEN - 2 + 5 + data.len();
        let (Ok(len), Ok(body32)) = (u32::try_from(data.len()), u32::try_from(body)) else {
            return Ok(false);
        };
        if !self.out.ends_with(EMPTY) || body > self.max_frame {
            return Ok(false);
        }
        self.out.truncate(self.out.len() - 2);
        self.out.extend_from_slice(&[0xc6]);
        self.out.extend_from_slice(&len.to_be_bytes());
        self.out[..HEADER_LEN].copy_from_slice(&body32.to_be_bytes());
        let head = &self.out[..];
        let total = head.len() + data.len();
        let mut done = 0;
        while done < total {
            let bufs = [
                std::io::IoSlice::new(head.get(done..).unwrap_or_default()),
                std::io::IoSlice::new(
                    data.get(done.saturating_sub(head.len())..)
                        .unwrap_or_default(),
                ),
            ];
            let n = self.wr.write_vectored(&bufs).await?;
            if n == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into());
            }
            done += n;
        }
        Ok(true)
    }

    /// Reads one message; `None` at a clean end of stream. Cancel-safe.
    pub(crate) async fn recv(&mut self) -> Result<Option<ShimToControl>, Error> {
        loop {
            match self.recv_any().await? {
                Some(Incoming::Msg(msg, _)) => return Ok(Some(*msg)),
                // Not in the handshake, the only place this is used: events are decoded.
                Some(Incoming::Event(event)) => {
                    tracing::debug!(
                        seq = event.seq(),
                        "event before the handshake ended ignored"
                    );
                }
                None => return Ok(None),
            }
        }
    }

    /// Reads one message or raw event; `None` at a clean end of stream. Cancel-safe.
    pub(crate) async fn recv_any(&mut self) -> Result<Option<Incoming>, Error> {
        match poll_fn(|cx| Pin::new(&mut self.rd).poll_next(cx)).await {
            Some(Ok(msg)) => Ok(Some(msg)),
            Some(Err(e)) => Err(Error::Decode(e)),
            None => Ok(None),
        }
    }

    /// [`Link::recv_any`] without waiting: `None` when nothing is ready yet.
    pub(crate) fn try_recv(&mut self) -> Option<Result<Option<Incoming>, Error>> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match Pin::new(&mut self.rd).poll_next(&mut cx) {
            std::task::Poll::Ready(Some(Ok(msg))) => Some(Ok(Some(msg))),
            std::task::Poll::Ready(Some(Err(e))) => Some(Err(Error::Decode(e))),
            std::task::Poll::Ready(None) => Some(Ok(None)),
            std::task::Poll::Pending => None,
        }
    }

    /// Closes our writing side (the shim then sees end of stream).
    pub(crate) async fn shutdown(&mut self) {
        let _ = self.wr.shutdown().await;
    }

    /// Gives up on the connection. (The control → shim direction has no `error` message:
    /// the shim learns of a refusal by the close.)
    async fn refuse(&mut self, code: ErrorCode, message: String) {
        tracing::debug!(%code, %message, "closing the control connection");
        self.shutdown().await;
    }
}

/// A connection that completed its handshake.
#[derive(Debug)]
pub(crate) struct Connected {
    pub(crate) link: Link,
    pub(crate) hello: Hello,
}

/// Runs the handshake on a fresh connection, dialed or accepted, with `opts`' token and
/// within its `connect_timeout`, reading frames of at most [`HANDSHAKE_MAX_FRAME`]; the
/// connection returned reads and writes up to `opts`' `max_frame`.
pub(crate) async fn handshake(io: BoxIo, opts: &ConnectOptions) -> Result<Connected, Error> {
    let (token, max_frame, timeout) = (opts.token.as_ref(), opts.max_frame, opts.connect_timeout);
    let small = HANDSHAKE_MAX_FRAME.min(max_frame);
    let consumer = opts.consumer.as_deref();
    let mut conn = tokio::time::timeout(timeout, handshake_inner(io, token, small, consumer))
        .await
        .map_err(|_| Error::Timeout(timeout))??;
    conn.link.set_max_frame(max_frame);
    Ok(conn)
}

async fn handshake_inner(
    io: BoxIo,
    token: Option<&Token>,
    max_frame: usize,
    consumer: Option<&str>,
) -> Result<Connected, Error> {
    let mut link = Link::new(io, max_frame);
    let mut ours = Hello::new(Role::Control, SOFTWARE, env!("CARGO_PKG_VERSION"));
    ours.consumer = consumer.map(str::to_owned);
    let our_nonce: Option<[u8; NONCE_LEN]> = match token {
        Some(_) => Some(random::bytes()?),
        None => None,
    };
    if let Some(nonce) = our_nonce {
        ours = ours.with_nonce(nonce);
    }
    // Sent at once, without waiting for the shim's (both sides do).
    link.send(&ControlToShim::Hello(ours.clone())).await?;
    let theirs = match link.recv().await? {
        Some(ShimToControl::Hello(h)) => h,
        Some(ShimToControl::Error(e)) => return Err(Error::remote(e.code, e.message)),
        Some(other) => {
            let msg = format!("expected hello, got {}", other.type_name());
            link.refuse(ErrorCode::InvalidState, msg.clone()).await;
            return Err(Error::Protocol(msg));
        }
        None => return Err(Error::Protocol("the shim closed before its hello".into())),
    };
    if let Err(e) = handshake::negotiate(&ours, &theirs) {
        link.refuse(e.code(), e.to_string()).await;
        return Err(Error::Handshake(e));
    }
    let (Some(token), Some(our_nonce)) = (token, our_nonce) else {
        if theirs.nonce.is_some() {
            let reason = "the shim requires a token and none is configured".to_owned();
            link.refuse(ErrorCode::Unauthorized, reason.clone()).await;
            return Err(Error::Unauthorized { reason });
        }
        return Ok(Connected {
            link,
            hello: theirs,
        });
    };
    let shim_nonce = match hello_nonce(&theirs) {
        Ok(n) => n,
        Err(e) => {
            let reason = match e {
                handshake::HandshakeError::BadNonce { len: None } => {
                    "the shim sent no nonce although a token is configured (downgrade refused)"
                        .to_owned()
                }
                other => format!("bad shim nonce: {other}"),
            };
            link.refuse(ErrorCode::Unauthorized, reason.clone()).await;
            return Err(Error::Unauthorized { reason });
        }
    };
    let mac = auth_proof(token.secret(), Role::Control, &shim_nonce, &our_nonce);
    link.send(&ControlToShim::Auth(Auth {
        mac: bytes::Bytes::copy_from_slice(&mac),
    }))
    .await?;
    match link.recv().await? {
        Some(ShimToControl::Auth(auth)) => {
            if !verify_proof(
                token.secret(),
                Role::Shim,
                &our_nonce,
                &shim_nonce,
                &auth.mac,
            ) {
                let reason = "the shim's proof of the token is wrong".to_owned();
                link.refuse(ErrorCode::Unauthorized, reason.clone()).await;
                return Err(Error::Unauthorized { reason });
            }
        }
        Some(ShimToControl::Error(e)) => return Err(Error::remote(e.code, e.message)),
        Some(other) => {
            let reason = format!("expected auth, got {}", other.type_name());
            link.refuse(ErrorCode::Unauthorized, reason.clone()).await;
            return Err(Error::Unauthorized { reason });
        }
        None => {
            return Err(Error::Unauthorized {
                reason: "the shim closed the connection during authentication".into(),
            })
        }
    }
    Ok(Connected {
        link,
        hello: theirs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The frame of an `event` envelope around a 200-byte `custom` event.
    fn envelope(seq: u64) -> Vec<u8> {
        let mut event = b"\x83\xa4type\xa6custom\xa4kind\xa5bench\xa4data\xc4".to_vec();
        let pad = 200 - event.len() - 1;
        event.push(u8::try_from(pad).expect("bin8"));
        event.resize(200, 0x5a);
        let mut body = Vec::new();
        envelope::encode_event_envelope(seq, &event, &mut body);
        let mut frame = Vec::new();
        frame::write_body(&mut frame, usize::MAX, &body).expect("frame");
        frame
    }

    /// A reader of frames with seqs from 1: `pending` is the part of the next frame that
    /// did not fit in the last read.
    struct Wire {
        seq: u64,
        pending: Vec<u8>,
    }

    impl Wire {
        /// Reads into `src` as a socket would (the rest of a frame, then whole frames, then
        /// part of one) and decodes every complete frame.
        fn read(&mut self, codec: &mut InCodec, src: &mut BytesMut) -> Vec<RawEvent> {
            src.extend_from_slice(&std::mem::take(&mut self.pending));
            loop {
                self.seq += 1;
                let frame = envelope(self.seq);
                let room = src.capacity() - src.len();
                if room < frame.len() {
                    src.extend_from_slice(&frame[..room / 2]);
                    self.pending = frame[room / 2..].to_vec();
                    break;
                }
                src.extend_from_slice(&frame);
            }
            let mut events = Vec::new();
            while let Some(incoming) = codec.decode(src).expect("decodes") {
                match incoming {
                    Incoming::Event(e) => events.push(e),
                    Incoming::Msg(..) => panic!("an envelope decoded as a message"),
                }
            }
            events
        }
    }

    #[test]
    fn read_buffers_held_by_raw_events_are_reused_once_they_are_gone() {
        let mut codec = InCodec::new(1 << 20, true);
        let mut src = BytesMut::with_capacity(READ_BUF);
        let first = src.as_ptr() as usize;
        let mut wire = Wire {
            seq: 0,
            pending: Vec::new(),
        };
        let held = wire.read(&mut codec, &mut src);
        assert!(held.len() > 200, "{} events", held.len());
        assert_eq!(held.last().map(RawEvent::type_name), Some("custom"));
        // The events still hold the first buffer: the next read goes to another one, which
        // starts with the part of a frame the first one ended with. (The first, the
        // framing's own, is let go: it may have grown for a large frame.)
        assert!(src.capacity() - src.len() >= MIN_READ);
        assert_ne!(src.as_ptr() as usize, first);
        assert!(!src.is_empty());
        assert!(codec.spare.is_empty());
        let second_buf = src.as_ptr() as usize;
        drop(held);
        // The second is full and held by its events: kept while a third is read into.
        let second = wire.read(&mut codec, &mut src);
        let second_last = second.last().map_or(0, RawEvent::seq);
        assert_eq!(codec.spare.len(), 1);
        // Once they are gone, it is taken back when the third one is full.
        drop(second);
        let third = wire.read(&mut codec, &mut src);
        assert_eq!(
            src.as_ptr() as usize,
            second_buf,
            "the second buffer came back"
        );
        assert_eq!(third.first().map(RawEvent::seq), Some(second_last + 1));
        drop(third);
        // A reader that keeps every event gets fresh buffers, and keeps a bounded few.
        let mut kept = Vec::new();
        for _ in 0..3 * SPARE_BUFS {
            kept.extend(wire.read(&mut codec, &mut src));
        }
        assert!(codec.spare.len() <= SPARE_BUFS);
        assert!(
            kept.windows(2).all(|w| w[1].seq() == w[0].seq() + 1),
            "every event once, in order"
        );
        // Each is its frame's event, intact (the event is the frame's last 200 bytes).
        assert!(kept.iter().all(|e| e.type_name() == "custom"));
        assert!(kept.iter().all(|e| {
            let frame = envelope(e.seq());
            frame.get(frame.len() - 200..) == Some(e.body())
        }));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_read_buffer_grows_while_reads_fill_it_and_goes_back_when_idle() {
        let (ours, mut theirs) = tokio::net::UnixStream::pair().expect("socketpair");
        let mut link = Link::new(Box::new(ours), 1 << 20);
        assert_eq!(link.rd.read_buffer().capacity(), INITIAL_READ);
        // A burst of 200 typed `custom` events, 240 bytes a frame: far more than a read of
        // the first buffer takes.
        let mut burst = Vec::new();
        for seq in 1..=200 {
            burst.extend_from_slice(&envelope(seq));
        }
        tokio::io::AsyncWriteExt::write_all(&mut theirs, &burst)
            .await
            .expect("write");
        for seq in 1..=200 {
            match link.recv().await.expect("reads") {
                Some(ShimToControl::Event(env)) => assert_eq!(env.seq, seq),
                other => panic!("not event {seq}: {other:?}"),
            }
        }
        let buf = link.rd.read_buffer_mut();
        assert!(buf.is_empty());
        assert!(buf.try_reclaim(4 * INITIAL_READ), "the buffer did not grow");
        assert!(!buf.try_reclaim(2 * READ_BUF + 1), "{}", buf.capacity());
        // Nothing held: the idle connection's buffer goes back to its first size.
        link.shrink_idle();
        assert_eq!(link.rd.read_buffer().capacity(), INITIAL_READ);
        // And it still reads.
        tokio::io::AsyncWriteExt::write_all(&mut theirs, &envelope(201))
            .await
            .expect("write");
        match link.recv().await.expect("reads") {
            Some(ShimToControl::Event(env)) => assert_eq!(env.seq, 201),
            other => panic!("not event 201: {other:?}"),
        }
    }

    #[test]
    fn a_header_over_the_limit_reserves_nothing() {
        let mut codec = InCodec::new(1 << 20, true);
        let mut src = BytesMut::with_capacity(READ_BUF);
        src.extend_from_slice(&(256u32 << 20).to_be_bytes());
        assert!(matches!(
            codec.decode(&mut src),
            Err(DecodeError::FrameTooLarge { .. })
        ));
        assert!(src.capacity() <= READ_BUF, "{}", src.capacity());
    }
}
