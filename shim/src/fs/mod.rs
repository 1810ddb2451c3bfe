//! Files: the control link's file operations (PROTOCOL.md §8.8): `fs_stat`, `fs_list`,
//! `fs_read` (streamed), `fs_mkdir`, `fs_remove`, `fs_rename`, confined to `--fs-root` and done
//! with the rights of the sandbox user (`--user`).
//!
//! **Why a process of its own.** Two rules meet here. An operation must do what the
//! sandbox user could do and nothing more, never with root's rights; and PID 1's loop must
//! never block on anything the tenant controls, while every file here is the tenant's: a FUSE
//! or NFS path can hang a `read`, an `open`, even a `stat`, for ever. `setfsuid` on the loop's
//! thread would solve the first and not the second; a thread would solve the second, but a
//! thread stuck in an uninterruptible FUSE read can never be cancelled, and per-thread
//! credentials in a process whose other code assumes root are easy to get wrong. An
//! operation process solves both: it is forked, drops to the user's uid and gid (no
//! supplementary groups, `no_new_privs`, not dumpable), opens the root as that user, does the
//! blocking work, and answers on a socket that the loop reads asynchronously and with bounds
//! (`helper.rs`). A hung operation holds its own process and one slot of `--fs-max-ops`; it is
//! killed (`SIGKILL` through a pidfd) when its request is abandoned: an `fs_read` whose
//! connection is gone, any other operation after [`OP_TIMEOUT`].
//!
//! **The pool.** A one-shot operation (stat, list, read, mkdir, remove, rename) is served by
//! a process that stays after its answer: up to [`POOL_MAX`] wait idle, each killed after
//! [`POOL_IDLE`] unused, and the next operation is sent to one of them (a small record,
//! `helper::encode_op`) instead of forking: listing and reading many small files pays the
//! fork once, not per request. There is one user and one root per shim, so any process of
//! the pool may take any operation; each opens the root again per operation. A process goes
//! back to the pool only after its final answer, and is taken only if it is neither gone nor
//! stopped nor talking out of turn: a tenant who kills or stops an idle process (it runs as
//! the tenant's uid) costs it its place, and fails at most the operation in flight on it.
//! Uploads and watches have a process of their own, for their whole life.
//!
//! **Confinement** is `confine.rs`: `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`, or a
//! component-by-component walk where the kernel lacks it. **The operations** are `ops.rs`.
//! `fs_read` answers with a reply stream (`control::ReplyStream`): its chunks go to the
//! requesting connection only, as fast as it reads them; the operation's process blocks on
//! its socket meanwhile, so at most a socket buffer (four chunks) and one chunk are in flight
//! per read. The process writes each `fs_data` frame whole, the file's bytes read in place
//! behind a head of fixed size, and the shim sends that frame on as it came: the shim copies
//! a chunk only out of one socket and into the other.

mod confine;
mod helper;
mod ops;
mod upload;
mod watch;

use std::cell::Cell;
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use driver_protocol::message::{
    ControlToShim, ErrorMsg, Event, FsChange, FsEvent, FsList, FsMkdir, FsRead, FsRemove, FsRename,
    FsStat, FsWatch, FsWriteOpen, OkReply, RequestId, ShimToControl,
};
use driver_protocol::ErrorCode;
use tracing::{debug, warn};

use crate::control::{Command, Reply, ReplyStream};
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
    /// Idle operation processes, kept for the next operations.
    pool: Rc<Pool>,
    /// Watch events for the shell to publish (bounded).
    events_tx: tokio::sync::mpsc::Sender<FileEvent>,
    events_rx: tokio::sync::mpsc::Receiver<FileEvent>,
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
            pool: Rc::default(),
            events_tx,
            events_rx,
        }
    }

    /// The next watch events to publish (up to 256). Cancel-safe.
    pub async fn next_events(&mut self) -> Vec<FileEvent> {
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
                        OkReply::new(m.id).into()
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
        // A one-shot operation (not an upload, not a watch) goes to an idle process of the
        // pool if there is one, else to a new process that serves on after it.
        let pooled = helper::encode_op(&op)
            .and_then(|payload| self.pool.take().map(|helper| (helper, payload)));
        let serve = matches!(
            op,
            Op::Stat(_) | Op::List(_) | Op::Read(_) | Op::Mkdir(_) | Op::Remove(_) | Op::Rename(_)
        );
        let (helper, payload) = match pooled {
            Some((helper, payload)) => (helper, Some(payload)),
            None => match helper::start(&op, &self.settings, serve) {
                Ok(h) => (h, None),
                Err(err) => {
                    warn!(error = %err, "cannot start a file operation");
                    let msg = format!("cannot start the operation: {err}");
                    reply.send(error(id, ErrorCode::Internal, msg));
                    return None;
                }
            },
        };
        debug!(id, pid = helper.pid(), reused = payload.is_some(), op = ?op, "file operation started");
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
            let task = spawn(async move {
                watch(id, reply, helper, events, rate).await;
                watches.borrow_mut().remove(&id);
            });
            self.watches.borrow_mut().insert(id, task.abort_handle());
            return None;
        }
        let pool = Rc::clone(&self.pool);
        spawn(async move {
            let mut helper = helper;
            // The record goes into an idle process's empty socket buffer: it does not wait.
            // Should the process be gone, the answer below says so.
            if let Some(payload) = payload {
                let send = helper::send(&mut helper.wr, helper::TAG_OP, &payload);
                let _ = tokio::time::timeout(OP_TIMEOUT, send).await;
            }
            match op {
                Op::Read(m) => read(m, reply.into_stream(), helper, pool).await,
                _ => {
                    if let Some(helper) = answer(id, reply, helper).await {
                        Pool::put(&pool, helper);
                    }
                }
            }
            drop(slot);
        });
        None
    }
}

/// Idle operation processes, at most [`POOL_MAX`], each killed after [`POOL_IDLE`] unused.
///
/// The shim has one user and one file root, so every process of the pool runs as that user
/// beneath that root: any of them may take any operation. Each opens the root again for
/// every operation. A process is reused only after its final answer, and only when it is
/// neither gone nor stopped nor talking out of turn ([`Helper::idle_ok`]): what a tenant does
/// to an idle process (it runs as the tenant's uid) costs it its place, never the next
/// operation.
#[derive(Debug, Default)]
struct Pool {
    /// The oldest first.
    idle: std::cell::RefCell<Vec<(Helper, tokio::time::Instant)>>,
    reaping: Cell<bool>,
}

/// Idle operation processes kept at most.
pub const POOL_MAX: usize = 4;

/// An operation process unused for this long is killed.
pub const POOL_IDLE: Duration = Duration::from_secs(5);

impl Pool {
    /// The most recently used idle process that can serve, if any (the others met on the
    /// way are killed).
    fn take(&self) -> Option<Helper> {
        loop {
            let (mut helper, _) = self.idle.borrow_mut().pop()?;
            if helper.idle_ok() {
                return Some(helper);
            }
        }
    }

    /// Keeps a process that gave its final answer, if there is room; kills it otherwise.
    fn put(pool: &Rc<Self>, mut helper: Helper) {
        if !helper.idle_ok() || pool.idle.borrow().len() >= POOL_MAX {
            return;
        }
        pool.idle
            .borrow_mut()
            .push((helper, tokio::time::Instant::now()));
        if !pool.reaping.replace(true) {
            let pool = Rc::clone(pool);
            spawn(async move {
                loop {
                    let oldest = pool.idle.borrow().first().map(|(_, t)| *t);
                    let Some(oldest) = oldest else { break };
                    tokio::time::sleep_until(oldest + POOL_IDLE).await;
                    let now = tokio::time::Instant::now();
                    // Dropped: killed.
                    let old: Vec<_> = {
                        let mut idle = pool.idle.borrow_mut();
                        let keep = idle
                            .iter()
                            .take_while(|(_, t)| *t + POOL_IDLE <= now)
                            .count();
                        idle.drain(..keep).collect()
                    };
                    drop(old);
                }
                pool.reaping.set(false);
            });
        }
    }
}

/// Spawns a file task on the `LocalSet`, boxed: every kind of file task is then one future
/// type, and the binary holds one task harness for them all rather than one per kind.
fn spawn(task: impl std::future::Future<Output = ()> + 'static) -> tokio::task::JoinHandle<()> {
    let task: std::pin::Pin<Box<dyn std::future::Future<Output = ()>>> = Box::pin(task);
    tokio::task::spawn_local(task)
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
    ErrorMsg::new(Some(id), code, message).into()
}

/// What a child's final record means for the request `id`: a reply to send (`Ok` for
/// `Done`, the `error` of a `Fail`), or one the child encoded itself (`Err`). The shim never
/// decodes what a child says: it frames it, or builds the message from a code.
fn outcome(id: RequestId, rec: io::Result<Option<Record>>) -> Result<ShimToControl, Bytes> {
    match rec {
        Ok(Some(Record::Done)) => Ok(OkReply::new(id).into()),
        Ok(Some(Record::Fail(code, message))) => Ok(error(id, code, message)),
        Ok(Some(Record::Reply(body))) => Err(body),
        Ok(Some(Record::Frame(_) | Record::Event(_))) => Ok(error(
            id,
            ErrorCode::Internal,
            "the operation answered out of turn".to_owned(),
        )),
        Ok(None) | Err(_) => Ok(error(
            id,
            ErrorCode::Internal,
            "the operation's process ended without an answer (was it killed?)".to_owned(),
        )),
    }
}

/// Whether a record is the child's last (it exits by itself after it).
fn is_final(rec: &io::Result<Option<Record>>) -> bool {
    matches!(
        rec,
        Ok(Some(Record::Done | Record::Fail(..) | Record::Reply(_)))
    )
}

/// Waits (at most [`OP_TIMEOUT`]) for a one-frame operation's answer and sends it. The
/// process back once it gave its final answer (it may serve again), killed otherwise.
async fn answer(id: RequestId, reply: Reply, mut helper: Helper) -> Option<Helper> {
    let mut last = false;
    let wait = async {
        loop {
            let rec = helper.rd.next().await;
            if matches!(rec, Ok(Some(Record::Frame(_) | Record::Event(_)))) {
                continue;
            }
            if is_final(&rec) {
                helper.finished();
                last = true;
            }
            return outcome(id, rec);
        }
    };
    match tokio::time::timeout(OP_TIMEOUT, wait).await {
        Ok(Ok(msg)) => reply.send(msg),
        Ok(Err(body)) => reply.send_encoded(&body),
        Err(_) => {
            warn!(id, "a file operation did not finish in time; killed");
            let msg = format!("not done within {} s", OP_TIMEOUT.as_secs());
            reply.send(error(id, ErrorCode::Timeout, msg));
        }
    }
    last.then_some(helper)
}

/// Relays an `fs_read`'s `fs_data` frames, made whole by its process, flow-controlled by the
/// connection. The last frame (`eof`, no data) is held until the final answer: the process
/// is back in the pool before the client has the last frame and can ask again.
async fn read(m: FsRead, mut stream: ReplyStream, mut helper: Helper, pool: Rc<Pool>) {
    let id = m.id;
    let mut held: Option<Bytes> = None;
    while !stream.is_gone() {
        let record = tokio::select! {
            r = helper.rd.next() => r,
            () = stream.gone() => break,
        };
        let last = is_final(&record);
        if last {
            helper.finished();
        }
        let msg = match record {
            Ok(Some(Record::Frame(frame))) => {
                if let Some(prev) = held.take() {
                    if stream.send_frame(prev).await.is_err() {
                        break;
                    }
                }
                // A frame without data (the `eof`) waits for the final answer; the others go
                // on at once.
                if frame.len() + 5 == ops::DATA_HEAD {
                    held = Some(frame);
                } else if stream.send_frame(frame).await.is_err() {
                    break;
                }
                continue;
            }
            // The process sent the `eof` frame before it.
            Ok(Some(Record::Done)) => None,
            other => Some(outcome(id, other).unwrap_or_else(|_| {
                error(
                    id,
                    ErrorCode::Internal,
                    "the read answered out of turn".to_owned(),
                )
            })),
        };
        if last {
            Pool::put(&pool, helper);
        }
        if let Some(frame) = held {
            let _ = stream.send_frame(frame).await;
        }
        if let Some(msg) = msg {
            let _ = stream.send(&msg).await;
        }
        return;
    }
    debug!(id, "fs_read abandoned: its connection is gone");
}

/// A watch event for the shell to publish: as the watch's process encoded it, or made here.
#[derive(Debug)]
pub enum FileEvent {
    /// An `fs_event` body from the watch's process, published as it is.
    Raw(Bytes),
    /// An event made here (an `overflow`, an `ended`).
    Typed(Event),
}

/// Runs a watch: answers its `fs_watch` once the process has set it up, then relays its
/// events, at most `rate` a second (the rest counted and reported as one `overflow`).
async fn watch(
    id: RequestId,
    reply: Reply,
    mut helper: Helper,
    events: tokio::sync::mpsc::Sender<FileEvent>,
    rate: u32,
) {
    let first = tokio::time::timeout(OP_TIMEOUT, helper.rd.next()).await;
    let first = first.unwrap_or_else(|_| Ok(None));
    let ok = matches!(first, Ok(Some(Record::Done)));
    if is_final(&first) && !ok {
        helper.finished();
    }
    match outcome(id, first) {
        Ok(msg) => reply.send(msg),
        Err(body) => reply.send_encoded(&body),
    }
    if !ok {
        return;
    }
    let made = |change: FsChange, dropped: Option<u64>| {
        FileEvent::Typed(Event::FsEvent(FsEvent {
            watch: id,
            change,
            path: String::new(),
            to: None,
            dropped,
        }))
    };
    let mut dropped: u64 = 0;
    let mut tokens = f64::from(rate);
    let mut last = tokio::time::Instant::now();
    loop {
        // While changes are held back as dropped, the overflow that says so goes out as soon
        // as the bucket and the queue have room, even when no further change comes (the
        // wait for the next record is cancel-safe: a record read in part stays buffered).
        let next = if dropped > 0 {
            let short = (2.0 - tokens).max(0.0) / f64::from(rate.max(1));
            let wait = std::time::Duration::from_secs_f64(short.min(1.0))
                .max(std::time::Duration::from_millis(20));
            match tokio::time::timeout(wait, helper.rd.next()).await {
                Ok(next) => next,
                Err(_) => {
                    let now = tokio::time::Instant::now();
                    tokens = (tokens + now.duration_since(last).as_secs_f64() * f64::from(rate))
                        .min(f64::from(rate));
                    last = now;
                    if tokens >= 1.0
                        && events
                            .try_send(made(FsChange::Overflow, Some(dropped)))
                            .is_ok()
                    {
                        tokens -= 1.0;
                        dropped = 0;
                    }
                    continue;
                }
            }
        } else {
            helper.rd.next().await
        };
        let ev = match next {
            Ok(Some(Record::Event(body))) => FileEvent::Raw(body),
            Ok(Some(Record::Frame(_))) => continue,
            other => {
                if is_final(&other) {
                    helper.finished();
                }
                if dropped > 0 {
                    let _ = events.send(made(FsChange::Overflow, Some(dropped))).await;
                }
                let _ = events.send(made(FsChange::Ended, None)).await;
                return;
            }
        };
        let now = tokio::time::Instant::now();
        tokens = (tokens + now.duration_since(last).as_secs_f64() * f64::from(rate))
            .min(f64::from(rate));
        last = now;
        if dropped > 0
            && tokens >= 2.0
            && events.capacity() > 1
            && events
                .try_send(made(FsChange::Overflow, Some(dropped)))
                .is_ok()
        {
            tokens -= 1.0;
            dropped = 0;
        }
        if dropped == 0 && tokens >= 1.0 && events.try_send(ev).is_ok() {
            tokens -= 1.0;
        } else {
            dropped = dropped.saturating_add(1);
        }
    }
}
