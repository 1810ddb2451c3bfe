//! Following one exec's output from another connection (`attach_exec`, PROTOCOL.md §8.10):
//! the stream [`Client::attach_exec`](crate::Client::attach_exec) returns.

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
}

impl AttachStream {
    pub(crate) fn new(exec_id: u64, from: u64, rx: mpsc::UnboundedReceiver<AttachItem>) -> Self {
        Self {
            exec_id,
            next_offset: from,
            rx,
        }
    }

    /// The exec followed.
    pub fn exec_id(&self) -> u64 {
        self.exec_id
    }

    /// The offset of the next byte expected: where to attach again after a disconnect.
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    /// The next item; `None` after the exit, or when the connection ended.
    pub async fn next(&mut self) -> Option<AttachItem> {
        let item = self.rx.recv().await?;
        match &item {
            AttachItem::Output(o) => {
                self.next_offset = o.offset.saturating_add(o.data.len() as u64);
            }
            AttachItem::Lagged(l) => self.next_offset = l.next_offset,
            AttachItem::Exit(_) => self.rx.close(),
        }
        Some(item)
    }
}
