//! Files: the control link's file operations (PROTOCOL.md §8.8): `fs_stat`, `fs_list`,
//! `fs_read` (streamed), `fs_mkdir`, `fs_remove`, `fs_rename`, confined to `--fs-root` and done
//! with the rights of the sandbox user (`--user`).
//!
//! **Why a process per operation.** Two rules meet here. An operation must do what the
//! sandbox user could do and nothing more, never with root's rights; and PID 1's loop must
//! never block on anything the tenant controls, while every file here is the tenant's: a FUSE
//! or NFS path can hang a `read`, an `open`, even a `stat`, for ever. `setfsuid` on the loop's
//! thread would solve the first and not the second; a thread would solve the second, but a
//! thread stuck in an uninterruptible FUSE read can never be cancelled, and per-thread
//! credentials in a process whose other code assumes root are easy to get wrong. A process
//! per operation solves both: it is forked, drops to the user's uid and gid (no supplementary
//! groups, `no_new_privs`, not dumpable), opens the root as that user, does the blocking work,
//! and answers on a socket that the loop reads asynchronously and with bounds (`helper.rs`).
//! A hung operation holds its own process and one slot of `--fs-max-ops`; it is killed
//! (`SIGKILL` through a pidfd) when its request is abandoned: an `fs_read` whose connection is
//! gone, any other operation after [`OP_TIMEOUT`]. A fork of the small shim costs tens of
//! microseconds, small against a transfer; listing or reading many small files pays it per
//! request.
//!
//! **Confinement** is `confine.rs`: `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`, or a
//! component-by-component walk where the kernel lacks it. **The operations** are `ops.rs`.
//! `fs_read` answers with a reply stream (`control::ReplyStream`): its chunks go to the
//! requesting connection only, as fast as it reads them; the operation's process blocks on
//! its socket meanwhile, so at most a socket buffer and one chunk are in flight per read.

mod confine;
mod helper;
mod ops;
mod upload;
mod watch;

use std::cell::Cell;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use driver_protocol::message::{
    ControlToShim, ErrorMsg, Event, FsChange, FsData, FsEvent, FsList, FsMkdir, FsRead, FsRemove,
    FsRename, FsStat, FsWatch, FsWriteOpen, Message as _, OkReply, RequestId, ShimToControl,
};
use driver_protocol::ErrorCode;
use tracing::{debug, warn};

use crate::control::{Command, Gone, Reply, ReplyStream};
pub use helper::Settings;
use helper::{Helper, Record};

/// How long an operation other than `fs_read` may take before its process is killed and the
/// request answered `timeout` (a hung file system).
pub const OP_TIMEOUT: Duration = Duration::from_secs(60);

/// One file operation, as the control plane asked it.
#[derive(Debug, Clone)]
pub enum Op {
    /// `fs_stat`.
    Stat(FsStat),
    /// `fs_list`.
    List(FsList),
    /// `fs_read`.
    Read(FsRead),
    /// `fs_mkdir`.
    Mkdir(FsMkdir),
    /// `fs_remove`.
    Remove(FsRemove),
    /// `fs_rename`.
    Rename(FsRename),
    /// `fs_write_open` of a new upload.
    Write(FsWriteOpen),
    /// `fs_watch`.
    Watch(FsWatch),
}

impl Op {
    fn id(&self) -> RequestId {
        match self {
            Self::Stat(m) => m.id,
            Self::List(m) => m.id,
            Self::Read(m) => m.id,
            Self::Mkdir(m) => m.id,
            Self::Remove(m) => m.id,
            Self::Rename(m) => m.id,
            Self::Write(m) => m.id,
            Self::Watch(m) => m.id,
        }
    }
}

/// The file operations of one shim: their settings and how many run.
#[derive(Debug)]
pub struct Files {
    settings: Rc<Settings>,
    running: Rc<Cell<usize>>,
    max: usize,
    uploads: Rc<upload::Uploads>,
    /// Running watches, by the id of their `fs_watch`.
    watches: Rc<std::cell::RefCell<std::collections::HashMap<RequestId, tokio::task::AbortHandle>>>,
    max_watches: usize,
    /// Events per second per watch.
    watch_rate: u32,
    /// Watch events for the shell to publish (bounded).
    events_tx: tokio::sync::mpsc::Sender<Event>,
    events_rx: tokio::sync::mpsc::Receiver<Event>,
}

/// Watch events waiting for the shell, at most.
const EVENT_QUEUE: usize = 4096;

/// Limits of the file operations.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Operations and uploads at once (`--fs-max-ops`).
    pub ops: usize,
    /// Watches at once (`--fs-max-watches`).
    pub watches: usize,
    /// Events per second per watch (`--fs-watch-rate`).
    pub watch_rate: u32,
}

impl Files {
    /// File operations beneath `root`, as `user`, within `limits`.
    pub fn new(root: &Path, user: Option<(u32, u32)>, umask: Option<u32>, limits: Limits) -> Self {
        let (events_tx, events_rx) = tokio::sync::mpsc::channel(EVENT_QUEUE);
        let root = CString::new(root.as_os_str().as_bytes()).unwrap_or_else(|_| c"/".to_owned());
        Self {
            settings: Rc::new(Settings {
                root,
                user,
                umask,
                force_walk: false,
            }),
            running: Rc::new(Cell::new(0)),
            max: limits.ops,
            uploads: Rc::default(),
            watches: Rc::default(),
            max_watches: limits.watches,
            watch_rate: limits.watch_rate.max(1),
            events_tx,
            events_rx,
        }
    }

    /// The next watch events to publish (up to 256). Cancel-safe.
    pub async fn next_events(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        if self.events_rx.recv_many(&mut out, 256).await == 0 {
            // We hold a sender: never closed.
            std::future::pending::<()>().await;
        }
        out
    }

    /// Takes a file operation (started on its own task), or gives any other command back.
    /// Must be called inside the supervisor's `LocalSet`.
    pub fn handle(&self, cmd: Command) -> Option<Command> {
        let Command { request, reply } = cmd;
        let op = match request {
            ControlToShim::FsStat(m) => Op::Stat(m),
            ControlToShim::FsList(m) => Op::List(m),
            ControlToShim::FsRead(m) => Op::Read(m),
            ControlToShim::FsMkdir(m) => Op::Mkdir(m),
            ControlToShim::FsRemove(m) => Op::Remove(m),
            ControlToShim::FsRename(m) => Op::Rename(m),
            ControlToShim::FsWriteOpen(m) => match m.handle {
                Some(handle) => {
                    self.uploads.reopen(&m, handle, reply);
                    return None;
                }
                None => Op::Write(m),
            },
            ControlToShim::FsWriteData(m) => {
                self.uploads.data(m, reply);
                return None;
            }
            ControlToShim::FsWriteClose(m) => {
                self.uploads.close(m, reply);
                return None;
            }
            ControlToShim::FsWatch(m) => {
                if self.watches.borrow().len() >= self.max_watches {
                    let msg = format!("{} watches are running", self.max_watches);
                    reply.send(error(m.id, ErrorCode::Limit, msg));
                    return None;
                }
                Op::Watch(m)
            }
            ControlToShim::FsUnwatch(m) => {
                let msg = match self.watches.borrow_mut().remove(&m.watch) {
                    Some(task) => {
                        // Dropping the task kills the watch's process.
                        task.abort();
                        OkReply { re: m.id }.into()
                    }
                    None => error(m.id, ErrorCode::NotFound, format!("no watch {}", m.watch)),
                };
                reply.send(msg);
                return None;
            }
            request => return Some(Command { request, reply }),
        };
        let id = op.id();
        if self.running.get() >= self.max {
            let msg = format!("{} file operations are running", self.max);
            reply.send(error(id, ErrorCode::Limit, msg));
            return None;
        }
        let slot = Slot::take(&self.running);
        let helper = match helper::start(&op, &self.settings) {
            Ok(h) => h,
            Err(err) => {
                warn!(error = %err, "cannot start a file operation");
                let msg = format!("cannot start the operation: {err}");
                reply.send(error(id, ErrorCode::Internal, msg));
                return None;
            }
        };
        debug!(id, pid = helper.pid(), op = ?op, "file operation started");
        if let Op::Write(m) = op {
            self.uploads.start(m, reply, helper, slot);
            return None;
        }
        if let Op::Watch(_) = op {
            // A watch holds a watch's place, not an operation's.
            drop(slot);
            let watches = Rc::clone(&self.watches);
            let events = self.events_tx.clone();
            let rate = self.watch_rate;
            let task = tokio::task::spawn_local(async move {
                watch(id, reply, helper, events, rate).await;
                watches.borrow_mut().remove(&id);
            });
            self.watches.borrow_mut().insert(id, task.abort_handle());
            return None;
        }
        tokio::task::spawn_local(async move {
            match op {
                Op::Read(m) => read(m, reply.into_stream(), helper).await,
                _ => answer(id, reply, helper).await,
            }
            drop(slot);
        });
        None
    }
}

/// One running operation's place in the count, given back on drop.
struct Slot(Rc<Cell<usize>>);

impl Slot {
    fn take(running: &Rc<Cell<usize>>) -> Self {
        running.set(running.get().saturating_add(1));
        Self(Rc::clone(running))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

fn error(id: RequestId, code: ErrorCode, message: String) -> ShimToControl {
    ErrorMsg {
        re: Some(id),
        code,
        message,
        task_id: None,
    }
    .into()
}

/// The child's final message, checked and given the request's id; anything unexpected is
/// an `internal` error.
fn final_message(id: RequestId, body: &[u8], read: bool) -> ShimToControl {
    let msg = match ShimToControl::decode(body) {
        Ok(msg) => msg,
        Err(err) => {
            warn!(id, error = %err, "a file operation answered garbage");
            return error(id, ErrorCode::Internal, "the operation failed".to_owned());
        }
    };
    match msg {
        ShimToControl::Error(mut e) => {
            e.re = Some(id);
            e.into()
        }
        ShimToControl::Ok(mut o) => {
            o.re = id;
            o.into()
        }
        ShimToControl::FsStatReply(mut r) if !read => {
            r.re = id;
            r.into()
        }
        ShimToControl::FsListReply(mut r) if !read => {
            r.re = id;
            r.into()
        }
        other => {
            warn!(
                id,
                r#type = other.type_name(),
                "a file operation answered out of turn"
            );
            error(id, ErrorCode::Internal, "the operation failed".to_owned())
        }
    }
}

/// The child's final message (it exits by itself now).
fn finish(helper: &mut Helper, id: RequestId, body: &[u8]) -> ShimToControl {
    helper.finished();
    final_message(id, body, true)
}

/// Why the child ended without its answer.
fn vanished() -> ShimToControl {
    error(
        0,
        ErrorCode::Internal,
        "the operation's process ended without an answer (was it killed?)".to_owned(),
    )
}

/// Waits (at most [`OP_TIMEOUT`]) for a one-frame operation's answer and sends it.
async fn answer(id: RequestId, reply: Reply, mut helper: Helper) {
    let wait = async {
        loop {
            match helper.rd.next().await {
                Ok(Some(Record::Msg(body))) => {
                    helper.finished();
                    return final_message(id, &body, false);
                }
                // Only reads send data, only watches events.
                Ok(Some(Record::Data(_) | Record::Event(_))) => {}
                Ok(None) | Err(_) => {
                    let mut e = vanished();
                    if let ShimToControl::Error(e) = &mut e {
                        e.re = Some(id);
                    }
                    return e;
                }
            }
        }
    };
    let msg = match tokio::time::timeout(OP_TIMEOUT, wait).await {
        Ok(msg) => msg,
        Err(_) => {
            warn!(id, "a file operation did not finish in time; killed");
            let msg = format!("not done within {} s", OP_TIMEOUT.as_secs());
            error(id, ErrorCode::Timeout, msg)
        }
    };
    reply.send(msg);
    drop(helper);
}

/// Relays an `fs_read`'s chunks as `fs_data` frames, flow-controlled by the connection.
async fn read(m: FsRead, mut stream: ReplyStream, mut helper: Helper) {
    let id = m.id;
    let mut offset = m.offset;
    while !stream.is_gone() {
        let record = tokio::select! {
            r = helper.rd.next() => r,
            () = stream.gone() => {
                debug!(id, "fs_read abandoned: its connection is gone");
                return;
            }
        };
        let frame = match record {
            Ok(Some(Record::Data(data))) => {
                let len = data.len() as u64;
                let frame = FsData {
                    re: id,
                    offset,
                    data,
                    eof: false,
                };
                offset = offset.saturating_add(len);
                frame.into()
            }
            Ok(Some(Record::Msg(body))) => match finish(&mut helper, id, &body) {
                ShimToControl::Ok(_) => FsData {
                    re: id,
                    offset,
                    data: Bytes::new(),
                    eof: true,
                }
                .into(),
                other => other,
            },
            Ok(None) | Err(_) | Ok(Some(Record::Event(_))) => {
                let mut e = vanished();
                if let ShimToControl::Error(e) = &mut e {
                    e.re = Some(id);
                }
                e
            }
        };
        let last = !matches!(&frame, ShimToControl::FsData(d) if !d.eof);
        if let Err(Gone) = stream.send(&frame).await {
            debug!(id, "fs_read abandoned: its connection is gone");
            return;
        }
        if last {
            return;
        }
    }
}

/// Runs a watch: answers its `fs_watch` once the process has set it up, then relays its
/// events, at most `rate` a second (the rest counted and reported as one `overflow`).
async fn watch(
    id: RequestId,
    reply: Reply,
    mut helper: Helper,
    events: tokio::sync::mpsc::Sender<Event>,
    rate: u32,
) {
    match tokio::time::timeout(OP_TIMEOUT, helper.rd.next()).await {
        Ok(Ok(Some(Record::Msg(body)))) => {
            let msg = final_message(id, &body, false);
            let ok = matches!(msg, ShimToControl::Ok(_));
            reply.send(msg);
            if !ok {
                helper.finished();
                return;
            }
        }
        _ => {
            reply.send(error(
                id,
                ErrorCode::Internal,
                "the watch could not be set up".to_owned(),
            ));
            return;
        }
    }
    let mut dropped: u64 = 0;
    let mut tokens = f64::from(rate);
    let mut last = tokio::time::Instant::now();
    let mut offer = |ev: FsEvent, dropped: &mut u64| {
        let now = tokio::time::Instant::now();
        tokens = (tokens + now.duration_since(last).as_secs_f64() * f64::from(rate))
            .min(f64::from(rate));
        last = now;
        if *dropped > 0 && events.capacity() > 1 && tokens >= 2.0 {
            let lost = FsEvent {
                watch: id,
                change: FsChange::Overflow,
                path: String::new(),
                to: None,
                dropped: Some(*dropped),
            };
            if events.try_send(Event::FsEvent(lost)).is_ok() {
                tokens -= 1.0;
                *dropped = 0;
            }
        }
        if *dropped == 0 && tokens >= 1.0 && events.try_send(Event::FsEvent(ev)).is_ok() {
            tokens -= 1.0;
        } else {
            *dropped += 1;
        }
    };
    loop {
        match helper.rd.next().await {
            Ok(Some(Record::Event(body))) => match Event::decode(&body) {
                Ok(Event::FsEvent(ev)) if ev.watch == id => offer(ev, &mut dropped),
                _ => warn!(id, "a watch sent something else than its events"),
            },
            Ok(Some(Record::Msg(_))) | Ok(None) | Err(_) => {
                helper.finished();
                let end = FsEvent {
                    watch: id,
                    change: FsChange::Ended,
                    path: String::new(),
                    to: None,
                    dropped: None,
                };
                offer(end, &mut dropped);
                if dropped > 0 {
                    // The end is said, even when the rest was dropped.
                    let lost = FsEvent {
                        watch: id,
                        change: FsChange::Overflow,
                        path: String::new(),
                        to: None,
                        dropped: Some(dropped),
                    };
                    let _ = events.send(Event::FsEvent(lost)).await;
                }
                return;
            }
            Ok(Some(Record::Data(_))) => {}
        }
    }
}
