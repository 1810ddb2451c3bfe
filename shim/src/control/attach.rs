//! `list_execs`, `attach_exec` and `detach_exec` (PROTOCOL.md §8.10): answered inside the
//! control server from the [`registry`](super::registry), and each attachment's output
//! written by its connection's writer task.
//!
//! An attachment is a cursor (a byte offset) into one exec's retained output. The exec never
//! waits for it: its output goes into the ring whatever the attached clients do, and a
//! writer that fell behind the ring's oldest byte says `attach_lagged{missed, next_offset}`
//! and goes on from there. The writer gives attachments at most half of each batch, so the
//! events a connection streams are never held back by an attached exec.

use std::cell::RefCell;

use bytes::Bytes;
use driver_protocol::message::{
    AttachExec, AttachLagged, AttachOutput, DetachExec, ErrorMsg, ExecAttached, ExecList,
    ListExecs, OkReply, ShimToControl,
};
use driver_protocol::ErrorCode;
use tracing::warn;

use super::registry;
use super::{encode_frame, Inner};

/// Execs one connection may follow at once.
pub(super) const MAX_PER_CONN: usize = 8;

/// Attachments at once, over every connection.
pub(super) const MAX_TOTAL: usize = 64;

/// The largest `attach_output` chunk.
const PIECE: usize = 32 * 1024;

/// One exec a connection follows.
#[derive(Debug)]
pub(super) struct Attachment {
    exec_id: u64,
    rec: registry::Shared,
    /// The next byte to send.
    offset: u64,
}

/// `list_execs`.
pub(super) fn list(inner: &Inner, req: &ListExecs) -> ShimToControl {
    let execs = inner.state.borrow_mut().registry.list();
    ExecList { re: req.id, execs }.into()
}

/// The execs one connection follows (`attach_exec`).
#[derive(Debug, Default)]
pub(super) struct Attached(RefCell<Vec<Attachment>>);

impl Attached {
    /// How many execs are followed.
    fn len(&self) -> usize {
        self.0.borrow().len()
    }

    /// Whether exec `id` is followed.
    pub(super) fn follows(&self, id: u64) -> bool {
        self.0.borrow().iter().any(|a| a.exec_id == id)
    }

    /// `attach_exec` on connection `conn`: the reply; on success the exec is followed from
    /// now on (the connection then has output to write).
    pub(super) fn attach(&self, conn: u64, inner: &Inner, req: &AttachExec) -> ShimToControl {
        match self.try_attach(conn, inner, req) {
            Ok(reply) => reply.into(),
            Err((code, message, first_available)) => ErrorMsg {
                first_available,
                ..ErrorMsg::new(Some(req.id), code, message)
            }
            .into(),
        }
    }

    fn try_attach(
        &self,
        conn: u64,
        inner: &Inner,
        req: &AttachExec,
    ) -> Result<ExecAttached, Refusal> {
        let id = req.exec_id;
        let mut st = inner.state.borrow_mut();
        if st.registry.retain() == 0 {
            let msg = "exec output is not retained (--exec-retain 0)".to_owned();
            return Err((ErrorCode::Unsupported, msg, None));
        }
        let Some(rec) = st.registry.get(id) else {
            let msg = format!("no exec {id} (never started, or forgotten since it exited)");
            return Err((ErrorCode::NotFound, msg, None));
        };
        let mut attached = self.0.borrow_mut();
        if attached.iter().any(|a| a.exec_id == id) {
            let msg = format!("exec {id} is already attached on this connection");
            return Err((ErrorCode::InvalidState, msg, None));
        }
        if attached.len() >= MAX_PER_CONN {
            let msg = format!("{MAX_PER_CONN} execs are attached on this connection already");
            return Err((ErrorCode::Limit, msg, None));
        }
        let others: usize = st
            .sessions
            .iter()
            .filter(|c| c.id != conn)
            .map(|c| c.attached.len())
            .sum();
        if others + attached.len() >= MAX_TOTAL {
            let msg = format!("{MAX_TOTAL} attachments are open already");
            return Err((ErrorCode::Limit, msg, None));
        }
        drop(st);
        let (first, end, running) = {
            let r = rec.borrow();
            (r.out.first(), r.out.end(), r.exit.is_none())
        };
        let from = req.from_offset.unwrap_or(first);
        if from < first {
            let msg = format!("exec {id}: bytes before {first} are no longer retained");
            return Err((ErrorCode::Gap, msg, Some(first)));
        }
        if from > end {
            let msg = format!("exec {id}: offset {from} is past the end of its output ({end})");
            return Err((ErrorCode::Invalid, msg, None));
        }
        attached.push(Attachment {
            exec_id: id,
            rec,
            offset: from,
        });
        Ok(ExecAttached {
            re: req.id,
            exec_id: id,
            from_offset: from,
            first_offset: first,
            end_offset: end,
            running,
        })
    }

    /// `detach_exec`.
    pub(super) fn detach(&self, req: &DetachExec) -> ShimToControl {
        let mut attached = self.0.borrow_mut();
        match attached.iter().position(|a| a.exec_id == req.exec_id) {
            Some(i) => {
                attached.remove(i);
                OkReply::new(req.id).into()
            }
            None => ErrorMsg::new(
                Some(req.id),
                ErrorCode::NotFound,
                format!("exec {} is not attached on this connection", req.exec_id),
            )
            .into(),
        }
    }

    /// Appends `conn`'s attachments' frames to `batch` until it holds `limit` bytes: output
    /// from each cursor, `attach_lagged` for a cursor the ring has passed, and `attach_exit`
    /// (ending the attachment) once an ended exec's output is all sent.
    pub(super) fn fill(&self, conn: u64, inner: &Inner, batch: &mut Vec<u8>, limit: usize) {
        let mut attached = self.0.borrow_mut();
        let mut i = 0;
        while batch.len() < limit {
            let Some(a) = attached.get_mut(i) else {
                return;
            };
            let msg: ShimToControl = {
                let rec = a.rec.borrow();
                let first = rec.out.first();
                let room = limit.saturating_sub(batch.len()).clamp(1, PIECE);
                if a.offset < first {
                    let lagged = AttachLagged {
                        exec_id: a.exec_id,
                        missed: first - a.offset,
                        next_offset: first,
                    };
                    a.offset = first;
                    lagged.into()
                } else if let Some((stream, data)) = rec.out.read(a.offset, room) {
                    let offset = a.offset;
                    a.offset = offset.saturating_add(data.len() as u64);
                    AttachOutput {
                        exec_id: a.exec_id,
                        stream,
                        offset,
                        data: Bytes::from(data),
                    }
                    .into()
                } else if let Some(exit) = rec.exit.as_ref().filter(|_| a.offset >= rec.out.end()) {
                    let msg = ShimToControl::AttachExit(exit.clone());
                    drop(rec);
                    attached.remove(i);
                    push(conn, inner, batch, &msg);
                    continue;
                } else {
                    i += 1;
                    continue;
                }
            };
            push(conn, inner, batch, &msg);
        }
    }
}

type Refusal = (ErrorCode, String, Option<u64>);

fn push(conn: u64, inner: &Inner, batch: &mut Vec<u8>, msg: &ShimToControl) {
    match encode_frame(msg, inner.max_frame) {
        Ok(frame) => batch.extend_from_slice(&frame),
        Err(err) => warn!(conn, error = %err, "cannot encode attached output"),
    }
}
