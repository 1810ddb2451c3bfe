//! Read buffers reused once every frame taken off them is gone.
//!
//! A large frame (a file's chunk) is read into a buffer of its own and sent on as a slice of
//! it, so the buffer cannot be reused in place while the slice waits in a queue. A fresh
//! buffer for every chunk would be a fresh `mmap` for every chunk (the allocator maps
//! anything over 128 KiB on its own), and a page fault, a zeroed page, for every 4 KiB of it.
//! Instead the buffers given up are kept, at most [`SPARES`] of them for the whole shim (the
//! supervisor runs on one thread), and a reader takes back the oldest one whose frames are
//! all gone. They are let go when no large frame is on its way ([`clear`]).

use std::cell::RefCell;
use std::collections::VecDeque;

use bytes::BytesMut;

/// Buffers kept at most, for every reader together: 4 MiB of chunks, as many as one
/// transfer may have on their way (an upload's window, a read's share of its connection's
/// queue), so that the one sent first is still here when it can be reused.
pub const SPARES: usize = 16;

thread_local! {
    /// The buffers given up, oldest first.
    static BUFS: RefCell<VecDeque<BytesMut>> = const { RefCell::new(VecDeque::new()) };
}

/// Makes `buf` a buffer with room for `need` more bytes, what it holds moved to the front: a
/// spare whose frames are all gone, or a fresh buffer of that size (at least `size`). The
/// buffer it was is returned (to [`keep`] if it is a large one).
#[must_use]
pub fn renew(buf: &mut BytesMut, need: usize, size: usize) -> BytesMut {
    let total = buf.len().saturating_add(need);
    let spare = BUFS.with(|bufs| {
        let mut bufs = bufs.borrow_mut();
        let reusable = bufs.iter_mut().position(|b| b.try_reclaim(total));
        reusable.and_then(|i| bufs.remove(i))
    });
    let mut next = spare.unwrap_or_else(|| BytesMut::with_capacity(total.max(size)));
    next.extend_from_slice(buf);
    std::mem::replace(buf, next)
}

/// Keeps `buf` (its bytes are dropped) for a later [`renew`]; past [`SPARES`] the oldest
/// spare is let go.
pub fn keep(mut buf: BytesMut) {
    buf.clear();
    BUFS.with(|bufs| {
        let mut bufs = bufs.borrow_mut();
        if bufs.len() >= SPARES {
            bufs.pop_front();
        }
        bufs.push_back(buf);
    });
}

/// Lets every spare go (no large frame is on its way).
pub fn clear() {
    BUFS.with(|bufs| bufs.borrow_mut().clear());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A buffer whose frames are gone is taken back, one still held is not; the bytes
    /// read ahead move with the buffer.
    #[test]
    fn a_buffer_comes_back_once_its_frames_are_gone() {
        clear();
        let mut buf = BytesMut::with_capacity(1000);
        buf.extend_from_slice(&[1; 1000]);
        let first = buf.split_to(1000).freeze();
        let first_at = first.as_ptr() as usize;
        keep(renew(&mut buf, 1000, 0));
        buf.extend_from_slice(&[2; 1000]);
        let second = buf.split_to(1000).freeze();
        // The first frame is still held: a fresh buffer.
        buf.extend_from_slice(b"ab");
        keep(renew(&mut buf, 998, 0));
        assert_ne!(buf.as_ptr() as usize, first_at);
        assert_eq!(&buf[..], b"ab");
        drop(first);
        drop(second);
        buf.extend_from_slice(&[3; 998]);
        let third = buf.split_to(1000).freeze();
        buf.extend_from_slice(b"c");
        keep(renew(&mut buf, 999, 0));
        assert_eq!(
            buf.as_ptr() as usize,
            first_at,
            "the first buffer, taken back"
        );
        assert_eq!(&buf[..], b"c");
        assert_eq!(third.len(), 1000);
        for _ in 0..2 * SPARES {
            keep(BytesMut::with_capacity(10));
        }
        assert_eq!(BUFS.with(|b| b.borrow().len()), SPARES);
        clear();
        assert_eq!(BUFS.with(|b| b.borrow().len()), 0);
    }
}
