//! Blocking `std::io` framing, for drivers and tools that do not use tokio.
//!
//! [`FrameReader`] reads frames from any [`Read`] through one reused buffer: it reads as much
//! as the stream offers, hands out each complete frame's body as a borrowed slice, and grows
//! the buffer only to fit a frame whose header passed the maximum check.
//! [`FrameWriter`] encodes frames into one reused buffer and writes it out on
//! [`flush`](FrameWriter::flush), so a burst of messages costs one `write` call. In steady
//! state neither allocates; decoding a message allocates only the owned fields it has.
//!
//! Errors mean what they mean for the tokio codec: after a decoding error, send an `error`
//! message with [`DecodeError::code`] and close; an `Unknown` message is not an error.
//!
//! ```
//! use driver_protocol::blocking::{FrameReader, FrameWriter};
//! use driver_protocol::message::{DriverToShim, Ping, ShimToDriver};
//!
//! let mut wire = Vec::new();
//! let mut writer = FrameWriter::new(&mut wire);
//! writer.write_message(&ShimToDriver::Ping(Ping { id: 1 }))?;
//! writer.send(&ShimToDriver::Ping(Ping { id: 2 }))?; // write + flush
//! drop(writer);
//!
//! let mut reader = FrameReader::new(&wire[..]);
//! while let Some(msg) = reader.read_message::<ShimToDriver>()? {
//!     assert!(matches!(msg, ShimToDriver::Ping(_)));
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::io::{self, Read, Write};

use crate::frame::{self, HEADER_LEN};
use crate::message::Message;
use crate::{DecodeError, EncodeError, DEFAULT_MAX_FRAME};

/// How much a [`FrameReader`] reads at a time when frames are small.
const READ_CHUNK: usize = 8 * 1024;

/// Reads frames from a blocking stream.
///
/// Buffered: do not wrap the stream in a `BufReader`, and do not read from it directly while
/// the reader may hold bytes of the next frames.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    /// Initialized bytes; `buf[start..end]` have been read but not yet returned.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    max: usize,
}

impl<R: Read> FrameReader<R> {
    /// A reader with the default maximum body length, [`DEFAULT_MAX_FRAME`].
    pub fn new(inner: R) -> Self {
        Self::with_max_frame(inner, DEFAULT_MAX_FRAME)
    }

    /// A reader with a maximum body length of `max` bytes (at most `u32::MAX`).
    pub fn with_max_frame(inner: R, max: usize) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            start: 0,
            end: 0,
            max: frame::clamp_max(max),
        }
    }

    /// The maximum body length.
    pub fn max_frame(&self) -> usize {
        self.max
    }

    /// Reads the next frame and returns its body, valid until the next call.
    ///
    /// `Ok(None)` when the stream ends cleanly between frames; [`DecodeError::Truncated`]
    /// when it ends inside one; [`DecodeError::FrameTooLarge`] when a header announces more
    /// than the maximum (checked before any memory is reserved for the body). Interrupted
    /// reads are retried; a non-blocking stream's `WouldBlock` is returned as
    /// [`DecodeError::Io`] and loses no data, so the call can be repeated.
    pub fn read_frame(&mut self) -> Result<Option<&[u8]>, DecodeError> {
        if !self.fill_to(HEADER_LEN)? {
            return match self.end - self.start {
                0 => Ok(None),
                have => Err(DecodeError::Truncated {
                    have,
                    want: HEADER_LEN,
                }),
            };
        }
        let mut header = [0; HEADER_LEN];
        header.copy_from_slice(&self.buf[self.start..self.start + HEADER_LEN]);
        let want = HEADER_LEN + frame::body_len(header, self.max)?;
        if !self.fill_to(want)? {
            return Err(DecodeError::Truncated {
                have: self.end - self.start,
                want,
            });
        }
        let body = self.start + HEADER_LEN..self.start + want;
        self.start += want;
        Ok(Some(&self.buf[body]))
    }

    /// Reads and decodes the next message; `Ok(None)` at a clean end of stream.
    ///
    /// See [`read_frame`](Self::read_frame); a body that is not a message of `M` is
    /// [`DecodeError::Malformed`], an unknown `type` is `M`'s `Unknown` variant.
    pub fn read_message<M: Message>(&mut self) -> Result<Option<M>, DecodeError> {
        match self.read_frame()? {
            Some(body) => M::decode(body).map(Some),
            None => Ok(None),
        }
    }

    /// Reads until `want` unread bytes are buffered; `false` at end of stream.
    ///
    /// `want` is at most `HEADER_LEN + max`, checked by the caller, so the buffer never grows
    /// beyond one maximal frame (plus the read chunk).
    fn fill_to(&mut self, want: usize) -> Result<bool, DecodeError> {
        while self.end - self.start < want {
            if self.start + want > self.buf.len() {
                self.make_room(want);
            }
            match self.inner.read(&mut self.buf[self.end..]) {
                Ok(0) => return Ok(false),
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(DecodeError::Io(e)),
            }
        }
        Ok(true)
    }

    /// Moves the unread bytes to the front and makes the buffer hold at least `want` bytes.
    fn make_room(&mut self, want: usize) {
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        if self.buf.len() < want {
            // Small frames share one chunk-sized read; a big frame gets exactly its size.
            self.buf.resize(want.max(READ_CHUNK), 0);
        }
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// The underlying stream, mutably. Reading from it directly loses buffered frames.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// The underlying stream; buffered bytes not yet returned are dropped.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

/// Writes frames to a blocking stream, through one reused buffer.
///
/// [`write_message`](Self::write_message) only encodes into the buffer (which is written out
/// by itself once it holds more than 64 KiB); [`flush`](Self::flush) writes it out;
/// [`send`](Self::send) does both. Frames still buffered when the writer is dropped are
/// lost: flush first.
#[derive(Debug)]
pub struct FrameWriter<W: Write> {
    inner: W,
    buf: Vec<u8>,
    max: usize,
}

/// A [`FrameWriter`] writes its buffer out once it holds this much.
const WRITE_HIGH_WATER: usize = 64 * 1024;

impl<W: Write> FrameWriter<W> {
    /// A writer with the default maximum body length, [`DEFAULT_MAX_FRAME`].
    pub fn new(inner: W) -> Self {
        Self::with_max_frame(inner, DEFAULT_MAX_FRAME)
    }

    /// A writer with a maximum body length of `max` bytes (at most `u32::MAX`). A message
    /// that encodes to more is refused with [`EncodeError::FrameTooLarge`].
    pub fn with_max_frame(inner: W, max: usize) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            max: frame::clamp_max(max),
        }
    }

    /// The maximum body length.
    pub fn max_frame(&self) -> usize {
        self.max
    }

    /// Encodes one message as a frame into the buffer.
    ///
    /// On error nothing of the message is buffered and earlier frames are kept.
    pub fn write_message<M: Message>(&mut self, msg: &M) -> Result<(), EncodeError> {
        frame::write_message(&mut self.buf, self.max, msg)?;
        self.flush_if_full()
    }

    /// Buffers one frame with an already encoded body.
    pub fn write_frame(&mut self, body: &[u8]) -> Result<(), EncodeError> {
        frame::write_body(&mut self.buf, self.max, body)?;
        self.flush_if_full()
    }

    /// Encodes one message and flushes it, with everything buffered before it.
    pub fn send<M: Message>(&mut self, msg: &M) -> Result<(), EncodeError> {
        self.write_message(msg)?;
        self.flush()
    }

    /// Writes every buffered frame to the stream and flushes the stream.
    ///
    /// If writing fails, the bytes not yet written stay buffered, so the call can be
    /// repeated (e.g. after `WouldBlock`).
    pub fn flush(&mut self) -> Result<(), EncodeError> {
        self.write_buffered()?;
        self.inner.flush()?;
        Ok(())
    }

    /// The number of bytes buffered and not yet written.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    fn flush_if_full(&mut self) -> Result<(), EncodeError> {
        if self.buf.len() >= WRITE_HIGH_WATER {
            self.write_buffered()?;
        }
        Ok(())
    }

    fn write_buffered(&mut self) -> Result<(), EncodeError> {
        let mut written = 0;
        let res = loop {
            if written == self.buf.len() {
                break Ok(());
            }
            match self.inner.write(&self.buf[written..]) {
                Ok(0) => break Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        self.buf.drain(..written);
        res.map_err(EncodeError::Io)
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// The underlying stream, mutably. Writing to it directly may interleave with buffered
    /// frames: flush first.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// Flushes, then returns the underlying stream.
    pub fn into_inner(mut self) -> Result<W, EncodeError> {
        self.flush()?;
        Ok(self.inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{DriverToShim, Log, LogStream, Ping, ShimToDriver};

    /// A reader that returns at most `step` bytes per call, with interruptions.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
        calls: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            self.calls += 1;
            if self.calls % 3 == 0 {
                return Err(io::ErrorKind::Interrupted.into());
            }
            let n = self.step.min(out.len()).min(self.data.len());
            out[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    fn log(n: usize) -> DriverToShim {
        DriverToShim::Log(Log {
            task_id: None,
            stream: LogStream::Stderr,
            level: Some("info".into()),
            text: "y".repeat(n),
            truncated: false,
        })
    }

    #[test]
    fn round_trip_through_small_reads() {
        let msgs: Vec<_> = [0, 1, 100, 20_000, 3]
            .into_iter()
            .map(log)
            .chain([DriverToShim::Ping(Ping { id: 9 })])
            .collect();
        let mut w = FrameWriter::new(Vec::new());
        for m in &msgs {
            w.write_message(m).unwrap();
        }
        let wire = w.into_inner().unwrap();
        for step in [1, 7, 4096, 1 << 20] {
            let mut r = FrameReader::new(Trickle {
                data: &wire,
                step,
                calls: 0,
            });
            let mut got = Vec::new();
            while let Some(m) = r.read_message::<DriverToShim>().unwrap() {
                got.push(m);
            }
            assert_eq!(got, msgs, "step {step}");
            assert!(r.read_frame().unwrap().is_none());
        }
    }

    #[test]
    fn eof_inside_a_frame_is_truncated() {
        let mut w = FrameWriter::new(Vec::new());
        w.send(&ShimToDriver::Ping(Ping { id: 1 })).unwrap();
        let wire = w.into_inner().unwrap();
        for cut in 1..wire.len() {
            let mut r = FrameReader::new(&wire[..cut]);
            match r.read_frame() {
                Err(DecodeError::Truncated { have, want }) => {
                    assert_eq!(have, cut);
                    assert_eq!(want, if cut < 4 { 4 } else { wire.len() });
                }
                other => panic!("cut {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn oversized_header_is_refused_before_reading_the_body() {
        let mut r = FrameReader::with_max_frame(&[0x00, 0x01, 0x00, 0x01, 0xaa][..], 0x1_0000);
        assert!(matches!(
            r.read_frame(),
            Err(DecodeError::FrameTooLarge {
                len: 0x1_0001,
                max: 0x1_0000
            })
        ));
        assert!(r.buf.len() <= READ_CHUNK);
    }

    #[test]
    fn writer_refuses_oversized_messages_and_keeps_earlier_frames() {
        let mut w = FrameWriter::with_max_frame(Vec::new(), 200);
        w.write_message(&log(10)).unwrap();
        let before = w.buffered();
        assert!(matches!(
            w.write_message(&log(500)),
            Err(EncodeError::FrameTooLarge { .. })
        ));
        assert_eq!(w.buffered(), before);
        assert!(w.write_frame(&[0; 201]).is_err());
        w.write_frame(&[0x80]).unwrap();
        let wire = w.into_inner().unwrap();
        assert_eq!(wire.len(), before + HEADER_LEN + 1);
    }

    /// A stream that accepts a few bytes per write and fails every other call.
    struct Flaky {
        out: Vec<u8>,
        calls: usize,
    }

    impl Write for Flaky {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.calls += 1;
            if self.calls % 2 == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(5);
            self.out.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn failed_flush_keeps_the_rest_for_the_next_try() {
        let msg = DriverToShim::Ping(Ping { id: 77 });
        let mut w = FrameWriter::new(Flaky {
            out: Vec::new(),
            calls: 0,
        });
        w.write_message(&msg).unwrap();
        w.write_message(&msg).unwrap();
        let mut tries = 0;
        while w.flush().is_err() {
            tries += 1;
            assert!(tries < 100);
        }
        let mut r = FrameReader::new(&w.get_ref().out[..]);
        assert_eq!(r.read_message::<DriverToShim>().unwrap(), Some(msg.clone()));
        assert_eq!(r.read_message::<DriverToShim>().unwrap(), Some(msg));
        assert_eq!(r.read_message::<DriverToShim>().unwrap(), None);
    }
}
