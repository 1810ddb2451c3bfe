//! Uploads: `fs_write_open`, `fs_write_data`, `fs_write_close` (PROTOCOL.md §8.8).
//!
//! An upload is one operation's process (`helper.rs`) holding the file open (a temporary
//! file beside the target, or the target itself with `append`), and one task here feeding it.
//! The loop never waits: `fs_write_data` queues its bytes on the upload (refused with `limit`
//! over [`QUEUE_MAX`]) and its `ok` is sent when the bytes are in the process's socket, so a
//! client that keeps a window of unanswered chunks is paced by the disk. The upload outlives
//! its connection: a client that reconnects asks `fs_write_open{handle}` for the bytes it
//! has, and goes on from there. An upload left alone for [`IDLE`] is aborted.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use driver_protocol::message::{
    FsWriteClose, FsWriteData, FsWriteOpen, FsWriteReady, OkReply, ShimToControl,
};
use driver_protocol::ErrorCode;
use tokio::sync::Notify;
use tracing::{debug, warn};

use super::helper::{self, Helper, Record};
use super::ops::{CHUNK, TAG_COMMIT, TAG_DATA};
use super::{error, is_final, outcome, Slot, OP_TIMEOUT};
use crate::control::Reply;

/// Bytes queued on one upload at most; a client sending more before its `ok`s is refused
/// (`limit`).
pub const QUEUE_MAX: usize = 8 * 1024 * 1024;

/// An upload that hears nothing for this long is aborted.
pub const IDLE: Duration = Duration::from_secs(600);

/// One upload's state, shared by the loop (which queues) and its task (which writes).
#[derive(Debug, Default)]
struct State {
    /// Bytes taken: queued or written.
    taken: u64,
    /// Chunks not yet written, with the `ok` each owes.
    queue: VecDeque<(Bytes, Reply)>,
    queued: usize,
    /// `fs_write_close`: its reply and whether it aborts.
    close: Option<(Reply, bool)>,
}

/// One open upload: its state and its task's wake-up.
type Open = (Rc<RefCell<State>>, Rc<Notify>);

/// The open uploads, by handle.
#[derive(Debug, Default)]
pub struct Uploads {
    open: RefCell<HashMap<u64, Open>>,
    next: std::cell::Cell<u64>,
}

impl Uploads {
    /// `fs_write_open{handle}`: the upload's handle and bytes.
    pub fn reopen(&self, m: &FsWriteOpen, handle: u64, reply: Reply) {
        let msg = match self.open.borrow().get(&handle) {
            Some((st, _)) => FsWriteReady {
                re: m.id,
                handle,
                offset: st.borrow().taken,
            }
            .into(),
            None => no_upload(m.id, handle),
        };
        reply.send(msg);
    }

    /// A new upload: its task waits for the process to open the file, then answers.
    pub fn start(self: &Rc<Self>, m: FsWriteOpen, reply: Reply, helper: Helper, slot: Slot) {
        let handle = self.next.get().wrapping_add(1);
        self.next.set(handle);
        let state = Rc::new(RefCell::new(State::default()));
        let wake = Rc::new(Notify::new());
        let uploads = Rc::clone(self);
        super::spawn(async move {
            run(&uploads, handle, m, reply, helper, &state, &wake).await;
            uploads.open.borrow_mut().remove(&handle);
            // Whatever is still queued is answered: the upload is over.
            let left = std::mem::take(&mut *state.borrow_mut());
            for (_, r) in left.queue {
                let id = r.id().unwrap_or(0);
                r.send(no_upload(id, handle));
            }
            if let Some((r, _)) = left.close {
                let id = r.id().unwrap_or(0);
                r.send(no_upload(id, handle));
            }
            drop(slot);
        });
    }

    /// `fs_write_data`.
    pub fn data(&self, m: FsWriteData, reply: Reply) {
        let open = self.open.borrow();
        let Some((st, wake)) = open.get(&m.handle) else {
            reply.send(no_upload(m.id, m.handle));
            return;
        };
        let mut st = st.borrow_mut();
        let end = m.offset.saturating_add(m.data.len() as u64);
        if st.close.is_some() {
            let msg = "the upload is closing".to_owned();
            reply.send(error(m.id, ErrorCode::InvalidState, msg));
        } else if m.offset > st.taken {
            let msg = format!("the upload has {} bytes; send from there", st.taken);
            reply.send(error(m.id, ErrorCode::Invalid, msg));
        } else if end <= st.taken {
            // Already taken (a retry after a reconnect).
            reply.send(OkReply::new(m.id).into());
        } else {
            let skip = usize::try_from(st.taken - m.offset).unwrap_or(usize::MAX);
            let data = m.data.slice(skip.min(m.data.len())..);
            if st.queued.saturating_add(data.len()) > QUEUE_MAX && st.queued > 0 {
                let msg = format!("over {QUEUE_MAX} bytes of this upload are queued");
                reply.send(error(m.id, ErrorCode::Limit, msg));
                return;
            }
            st.taken = end;
            st.queued += data.len();
            st.queue.push_back((data, reply));
            wake.notify_one();
        }
    }

    /// `fs_write_close`.
    pub fn close(&self, m: FsWriteClose, reply: Reply) {
        let open = self.open.borrow();
        let Some((st, wake)) = open.get(&m.handle) else {
            reply.send(no_upload(m.id, m.handle));
            return;
        };
        let mut st = st.borrow_mut();
        if st.close.is_some() {
            let msg = "the upload is already closing".to_owned();
            reply.send(error(m.id, ErrorCode::InvalidState, msg));
            return;
        }
        st.close = Some((reply, m.abort));
        wake.notify_one();
    }
}

fn no_upload(id: u64, handle: u64) -> ShimToControl {
    let msg = format!("no upload {handle} (it ended, failed or was aborted)");
    error(id, ErrorCode::NotFound, msg)
}

/// What the process said when it stopped taking bytes early (a full disk, say).
async fn why_stopped(helper: &mut Helper, id: u64) -> ShimToControl {
    let rec = tokio::time::timeout(Duration::from_secs(5), helper.rd.next())
        .await
        .unwrap_or(Ok(None));
    if is_final(&rec) {
        helper.finished();
    }
    match outcome(id, rec) {
        // An upload's process never sends an encoded reply.
        Ok(ShimToControl::Ok(_)) | Err(_) => error(
            id,
            ErrorCode::Internal,
            "the upload's process stopped early".to_owned(),
        ),
        Ok(msg) => msg,
    }
}

async fn run(
    uploads: &Uploads,
    handle: u64,
    m: FsWriteOpen,
    reply: Reply,
    mut helper: Helper,
    state: &Rc<RefCell<State>>,
    wake: &Rc<Notify>,
) {
    // The process opens the file (or fails to) first.
    let opened = match tokio::time::timeout(OP_TIMEOUT, helper.rd.next()).await {
        Ok(rec) => rec,
        Err(_) => {
            let msg = "the file did not open in time".to_owned();
            reply.send(error(m.id, ErrorCode::Timeout, msg));
            return;
        }
    };
    if !matches!(opened, Ok(Some(Record::Done))) {
        if is_final(&opened) {
            helper.finished();
        }
        let msg = outcome(m.id, opened).unwrap_or_else(|_| {
            error(
                m.id,
                ErrorCode::Internal,
                "the upload's process failed".to_owned(),
            )
        });
        reply.send(msg);
        return;
    }
    uploads
        .open
        .borrow_mut()
        .insert(handle, (Rc::clone(state), Rc::clone(wake)));
    reply.send(
        FsWriteReady {
            re: m.id,
            handle,
            offset: 0,
        }
        .into(),
    );
    debug!(handle, path = %m.path, pid = helper.pid(), "upload open");
    loop {
        let next = {
            let mut st = state.borrow_mut();
            match st.queue.pop_front() {
                Some((data, r)) => {
                    st.queued = st.queued.saturating_sub(data.len());
                    Some((data, r))
                }
                None => None,
            }
        };
        if let Some((data, r)) = next {
            let mut failed = false;
            for piece in data.chunks(CHUNK) {
                if helper::send(&mut helper.wr, TAG_DATA, piece).await.is_err() {
                    failed = true;
                    break;
                }
            }
            if failed {
                let why = why_stopped(&mut helper, 0).await;
                let mut why = why;
                if let (ShimToControl::Error(e), Some(id)) = (&mut why, reply_id(&r)) {
                    e.re = Some(id);
                }
                warn!(handle, "upload failed");
                r.send(why);
                return;
            }
            let id = reply_id(&r).unwrap_or(0);
            r.send(OkReply::new(id).into());
            continue;
        }
        let close = state.borrow_mut().close.take();
        if let Some((r, abort)) = close {
            let id = reply_id(&r).unwrap_or(0);
            if abort {
                end_input(&mut helper).await;
                r.send(OkReply::new(id).into());
                return;
            }
            let msg = match helper::send(&mut helper.wr, TAG_COMMIT, &[]).await {
                Ok(()) => match tokio::time::timeout(OP_TIMEOUT, helper.rd.next()).await {
                    Ok(rec) => {
                        if is_final(&rec) {
                            helper.finished();
                        }
                        outcome(id, rec).unwrap_or_else(|_| {
                            error(id, ErrorCode::Internal, "the upload failed".to_owned())
                        })
                    }
                    Err(_) => error(id, ErrorCode::Timeout, "fsync did not finish".to_owned()),
                },
                Err(_) => why_stopped(&mut helper, id).await,
            };
            r.send(msg);
            return;
        }
        let notified = wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if !state.borrow().queue.is_empty() || state.borrow().close.is_some() {
            continue;
        }
        tokio::select! {
            () = notified => {}
            () = tokio::time::sleep(IDLE) => {
                warn!(handle, "upload idle for too long; aborted");
                end_input(&mut helper).await;
                return;
            }
            // The process stopped on its own: a write failed (a full disk) on bytes already
            // answered `ok` (they were in its socket), or it was killed.
            r = helper.rd.next() => {
                if is_final(&r) {
                    helper.finished();
                }
                warn!(handle, "upload's process ended");
                let why = match outcome(0, r) {
                    Ok(ShimToControl::Error(e)) => (e.code, e.message),
                    _ => (ErrorCode::Internal, "the upload's process ended".to_owned()),
                };
                fail_rest(state, wake, &why).await;
                return;
            }
        }
    }
}

/// Answers what comes for a failed upload with its failure, until its `fs_write_close` (or
/// [`IDLE`]): the client learns why (`no_space`, say), not only that the upload is gone.
async fn fail_rest(state: &Rc<RefCell<State>>, wake: &Rc<Notify>, why: &(ErrorCode, String)) {
    loop {
        let notified = wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let (queue, close) = {
            let mut st = state.borrow_mut();
            st.queued = 0;
            (std::mem::take(&mut st.queue), st.close.take())
        };
        for (_, r) in queue {
            let id = reply_id(&r).unwrap_or(0);
            r.send(error(id, why.0.clone(), why.1.clone()));
        }
        if let Some((r, abort)) = close {
            let id = reply_id(&r).unwrap_or(0);
            r.send(if abort {
                OkReply::new(id).into()
            } else {
                error(id, why.0.clone(), why.1.clone())
            });
            return;
        }
        if tokio::time::timeout(IDLE, notified).await.is_err() {
            return;
        }
    }
}

/// Ends the process's input: it removes its temporary file, answers and exits. Waits a
/// little for that; a process that does not answer is killed on drop.
async fn end_input(helper: &mut Helper) {
    use tokio::io::AsyncWriteExt as _;
    let _ = helper.wr.shutdown().await;
    let wait = tokio::time::timeout(Duration::from_secs(5), helper.rd.next()).await;
    if let Ok(rec) = &wait {
        if is_final(rec) {
            helper.finished();
        }
    }
}

fn reply_id(r: &Reply) -> Option<u64> {
    r.id()
}
