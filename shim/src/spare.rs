//! Read buffers reused once every frame taken off them is gone.
//!
//! A large frame (a file's chunk) is read into a buffer of its own and sent on as a slice of
//! it, so the buffer cannot be reused in place while the slice waits in a queue. A fresh
//! buffer for every chunk would be a fresh `mmap` for every chunk (the allocator maps
//! anything over 128 KiB on its own), and a page fault, a zeroed page, for every 4 KiB of it:
//! a fifth of the shim's time on a transfer. Instead a reader keeps the last few buffers it
//! gave up, and takes back the oldest one whose frames are all gone.

use std::collections::VecDeque;

use bytes::BytesMut;

/// Buffers kept per reader, at most: as many chunks as may be on their way from one reader
/// (an upload's window, a read's share of its connection's queue), so that the one written
/// first is still here when it can be reused. A spare is a buffer that was on its way, so
/// the spares never hold more than the chunks in flight did.
const SPARES: usize = 16;

/// The buffers a reader gave up, oldest first.
#[derive(Debug, Default)]
pub struct Spares {
    bufs: VecDeque<BytesMut>,
}

impl Spares {
    /// Makes `buf` a buffer with room for `need` more bytes, what it holds moved to the
    /// front: a spare whose frames are all gone, or a fresh buffer of that size (at least
    /// `size`). The buffer it was is returned (to [`Spares::keep`] if it is a large one).
    #[must_use]
    pub fn renew(&mut self, buf: &mut BytesMut, need: usize, size: usize) -> BytesMut {
        let total = buf.len().saturating_add(need);
        let reusable = self.bufs.iter_mut().position(|b| b.try_reclaim(total));
        let mut next = match reusable.and_then(|i| self.bufs.remove(i)) {
            Some(b) => b,
            None => BytesMut::with_capacity(total.max(size)),
        };
        next.extend_from_slice(buf);
        std::mem::replace(buf, next)
    }

    /// Keeps `buf` (its bytes are dropped) for a later [`Spares::renew`]; the oldest spare
    /// is let go past [`SPARES`].
    pub fn keep(&mut self, mut buf: BytesMut) {
        buf.clear();
        if self.bufs.len() >= SPARES {
            self.bufs.pop_front();
        }
        self.bufs.push_back(buf);
    }

    /// Lets every spare go (the reader is idle).
    pub fn clear(&mut self) {
        self.bufs.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A buffer whose frames are gone is taken back, one still held is not; the bytes
    /// read ahead move with the buffer.
    #[test]
    fn a_buffer_comes_back_once_its_frames_are_gone() {
        let mut spares = Spares::default();
        let mut buf = BytesMut::with_capacity(1000);
        buf.extend_from_slice(&[1; 1000]);
        let first = buf.split_to(1000).freeze();
        let first_at = first.as_ptr() as usize;
        let old = spares.renew(&mut buf, 1000, 0);
        spares.keep(old);
        buf.extend_from_slice(&[2; 1000]);
        let second = buf.split_to(1000).freeze();
        // The first frame is still held: a fresh buffer.
        buf.extend_from_slice(b"ab");
        let old = spares.renew(&mut buf, 998, 0);
        spares.keep(old);
        assert_ne!(buf.as_ptr() as usize, first_at);
        assert_eq!(&buf[..], b"ab");
        drop(first);
        drop(second);
        buf.extend_from_slice(&[3; 998]);
        let third = buf.split_to(1000).freeze();
        buf.extend_from_slice(b"c");
        let old = spares.renew(&mut buf, 999, 0);
        spares.keep(old);
        assert_eq!(
            buf.as_ptr() as usize,
            first_at,
            "the first buffer, taken back"
        );
        assert_eq!(&buf[..], b"c");
        assert_eq!(third.len(), 1000);
        spares.clear();
    }
}
