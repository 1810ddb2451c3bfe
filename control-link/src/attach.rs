//! Following one exec's output from another connection (`attach_exec`, PROTOCOL.md §8.10):
//! the stream [`Client::attach_exec`](crate::Client::attach_exec) returns.
//!
//! The connection's task hands each attached frame to the stream without waiting (the same
//! socket carries every other reply and event, which a slow reader of one stream must never
//! hold up). What the stream holds unread is counted in output bytes and bounded
//! ([`ConnectOptions::attach_buffer`](crate::ConnectOptions::attach_buffer)): output that
//! would go over the bound is dropped, and the reader is told, as the shim itself tells a
//! slow connection, by an [`AttachItem::Lagged`] (`missed` bytes, `next_offset`) before the
//! next item it gets.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use driver_protocol::message::{AttachLagged, AttachOutput, ExecExit};
use tokio::sync::mpsc;

/// One item of an [`AttachStream`].
#[derive(Debug, Clone, PartialEq)]
pub enum AttachItem {
    /// Output bytes at `offset` of the exec's output.
    Output(AttachOutput),
    /// This client read slower than the exec wrote: `missed` bytes were skipped, and the
    /// stream goes on at `next_offset`.
    Lagged(AttachLagged),
    /// The exec ended: the last item.
    Exit(ExecExit),
}

/// An attached exec's output, then its exit.
///
/// The attachment belongs to the connection: if the connection drops, the stream ends
/// (`next` gives `None`) without an [`AttachItem::Exit`]; attach again from
/// [`AttachStream::next_offset`]. Dropping the stream stops routing its frames (send
/// [`Client::detach_exec`](crate::Client::detach_exec) to stop the shim sending them).
#[derive(Debug)]
pub struct AttachStream {
    exec_id: u64,
    next_offset: u64,
    rx: mpsc::UnboundedReceiver<AttachItem>,
    /// Output bytes queued for this stream, shared with its [`AttachSink`].
    held: Arc<AtomicUsize>,
}

/// The connection's end of an [`AttachStream`]: queues its items, at most `cap` output
/// bytes unread.
#[derive(Debug)]
pub(crate) struct AttachSink {
    exec_id: u64,
    tx: mpsc::UnboundedSender<AttachItem>,
    held: Arc<AtomicUsize>,
    cap: usize,
    /// Output dropped since the stream's last item: `(missed, next_offset)`.
    lost: Option<(u64, u64)>,
}

/// The stream was dropped.
#[derive(Debug)]
pub(crate) struct Gone;

/// A stream of exec `exec_id`'s output from `from`, holding at most `cap` bytes unread (one
/// frame more, when a single frame is larger).
pub(crate) fn channel(exec_id: u64, from: u64, cap: usize) -> (AttachSink, AttachStream) {
    let (tx, rx) = mpsc::unbounded_channel();
    let held = Arc::new(AtomicUsize::new(0));
    let sink = AttachSink {
        exec_id,
        tx,
        held: Arc::clone(&held),
        cap,
        lost: None,
    };
    let stream = AttachStream {
        exec_id,
        next_offset: from,
        rx,
        held,
    };
    (sink, stream)
}

impl AttachSink {
    /// Queues `item`, or drops it (output over the bound) and counts it as missed; `Gone`
    /// when the stream was dropped.
    pub(crate) fn send(&mut self, item: AttachItem) -> Result<(), Gone> {
        if self.tx.is_closed() {
            return Err(Gone);
        }
        match item {
            AttachItem::Output(o) => {
                let n = o.data.len();
                let held = self.held.load(Ordering::Acquire);
                if held > 0 && held.saturating_add(n) > self.cap {
                    let end = o.offset.saturating_add(n as u64);
                    let lost = self.lost.get_or_insert((0, end));
                    lost.0 = lost.0.saturating_add(n as u64);
                    lost.1 = end;
                    return Ok(());
                }
                self.flush_lost()?;
                self.held.fetch_add(n, Ordering::AcqRel);
                self.queue(AttachItem::Output(o))
            }
            AttachItem::Lagged(l) => match &mut self.lost {
                // One report for both losses: the shim's and ours.
                Some(lost) => {
                    lost.0 = lost.0.saturating_add(l.missed);
                    lost.1 = l.next_offset;
                    Ok(())
                }
                None => self.queue(AttachItem::Lagged(l)),
            },
            AttachItem::Exit(x) => {
                self.flush_lost()?;
                self.queue(AttachItem::Exit(x))
            }
        }
    }

    /// Tells the stream what was dropped since its last item.
    fn flush_lost(&mut self) -> Result<(), Gone> {
        match self.lost.take() {
            Some((missed, next_offset)) => self.queue(AttachItem::Lagged(AttachLagged {
                exec_id: self.exec_id,
                missed,
                next_offset,
            })),
            None => Ok(()),
        }
    }

    fn queue(&self, item: AttachItem) -> Result<(), Gone> {
        self.tx.send(item).map_err(|_| Gone)
    }
}

impl AttachStream {
    /// The same stream, whose first byte is at `offset`.
    pub(crate) fn starting_at(mut self, offset: u64) -> Self {
        self.next_offset = offset;
        self
    }

    /// The exec followed.
    pub fn exec_id(&self) -> u64 {
        self.exec_id
    }

    /// The offset of the next byte expected: where to attach again after a disconnect.
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    /// Output bytes received for this stream and not read yet (at most
    /// [`ConnectOptions::attach_buffer`](crate::ConnectOptions::attach_buffer), or one frame
    /// when a single frame is larger).
    pub fn buffered_bytes(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    /// The next item; `None` after the exit, or when the connection ended.
    pub async fn next(&mut self) -> Option<AttachItem> {
        let item = self.rx.recv().await?;
        match &item {
            AttachItem::Output(o) => {
                self.held.fetch_sub(o.data.len(), Ordering::AcqRel);
                self.next_offset = o.offset.saturating_add(o.data.len() as u64);
            }
            AttachItem::Lagged(l) => self.next_offset = l.next_offset,
            AttachItem::Exit(_) => self.rx.close(),
        }
        Some(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use driver_protocol::message::OutputStream;

    fn out(offset: u64, n: usize) -> AttachItem {
        AttachItem::Output(AttachOutput {
            exec_id: 7,
            stream: OutputStream::Stdout,
            offset,
            data: vec![b'x'; n].into(),
        })
    }

    #[tokio::test]
    async fn a_slow_reader_holds_at_most_the_bound_and_is_told_what_it_missed() {
        let (mut sink, mut stream) = channel(7, 0, 1000);
        // 100 frames of 100 bytes, none read: ten are kept, the other ninety dropped.
        for i in 0..100u64 {
            sink.send(out(i * 100, 100)).unwrap();
            assert!(stream.buffered_bytes() <= 1000);
        }
        assert_eq!(stream.buffered_bytes(), 1000);
        // A loss the shim reports meanwhile is folded into ours.
        sink.send(AttachItem::Lagged(AttachLagged {
            exec_id: 7,
            missed: 50,
            next_offset: 10_050,
        }))
        .unwrap();
        for i in 0..10u64 {
            assert_eq!(stream.next().await, Some(out(i * 100, 100)));
        }
        assert_eq!(stream.buffered_bytes(), 0);
        sink.send(out(10_050, 10)).unwrap();
        assert_eq!(
            stream.next().await,
            Some(AttachItem::Lagged(AttachLagged {
                exec_id: 7,
                missed: 9_050,
                next_offset: 10_050,
            }))
        );
        assert_eq!(stream.next().await, Some(out(10_050, 10)));
        assert_eq!(stream.next_offset(), 10_060);
        // A frame larger than the bound still passes when nothing is held.
        sink.send(out(10_060, 5000)).unwrap();
        assert_eq!(stream.next().await, Some(out(10_060, 5000)));
        // Dropped, then the exit: the loss is told before it.
        sink.send(out(15_060, 2000)).unwrap();
        sink.send(out(17_060, 2000)).unwrap();
        sink.send(AttachItem::Exit(ExecExit {
            exec_id: 7,
            code: Some(0),
            signal: None,
            timed_out: false,
            truncated: false,
            duration_ms: 1,
            oom_killed: None,
        }))
        .unwrap();
        assert_eq!(stream.next().await, Some(out(15_060, 2000)));
        assert!(matches!(
            stream.next().await,
            Some(AttachItem::Lagged(l)) if l.missed == 2000 && l.next_offset == 19_060
        ));
        assert!(matches!(stream.next().await, Some(AttachItem::Exit(_))));
        assert_eq!(stream.next().await, None);
        drop(stream);
        assert!(sink.send(out(19_060, 1)).is_err());
    }
}
