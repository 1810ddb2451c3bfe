//! [`Files`]: the shim's file operations (PROTOCOL.md §8.8) — stat, list, read as an
//! [`AsyncRead`], write from one, mkdir, remove, rename — with the sandbox user's rights,
//! confined to the shim's `--fs-root`.
//!
//! Both transfers survive reconnects: a read that loses its connection asks again from the
//! offset it reached; a write's chunks are retried with their ids by the session, and, if
//! the upload lost some, it asks the shim what the upload has and sends again from there.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut as _, Bytes, BytesMut};
use driver_protocol::message::{
    ControlToShim, FsEntry, FsList, FsMkdir, FsRead, FsRemove, FsRename, FsStat, FsUnwatch,
    FsWatch, FsWriteClose, FsWriteData, FsWriteOpen, ShimToControl,
};
use tokio::io::{AsyncRead, AsyncReadExt as _, ReadBuf};
use tokio::sync::mpsc;

use crate::error::unexpected;
use crate::{Client, Error, ErrorCode};

/// Bytes per `fs_write_data`.
const WRITE_CHUNK: usize = 256 * 1024;

/// Unanswered `fs_write_data` per upload (4 MiB in flight, under the shim's 8 MiB).
const WRITE_WINDOW: usize = 16;

/// A chunk sent and not yet answered: its offset, its bytes (to send again), its call.
type InFlight = (u64, Bytes, tokio::task::JoinHandle<Result<(), Error>>);

/// How a file is written.
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    /// A new file's permission bits (default `0o644`, less the sandbox's umask).
    pub mode: Option<u32>,
    /// Create missing parent directories.
    pub parents: bool,
    /// Append instead of replacing the file atomically.
    pub append: bool,
}

/// The file operations of one shim; from [`Client::fs`].
///
/// ```no_run
/// # async fn demo(client: control_link::Client) -> Result<(), control_link::Error> {
/// use tokio::io::AsyncReadExt as _;
/// let fs = client.fs();
/// fs.write("/work/in.txt", &b"hello"[..], Default::default()).await?;
/// let mut text = String::new();
/// fs.read("/work/in.txt", 0).read_to_string(&mut text).await?;
/// for entry in fs.list("/work").await? {
///     println!("{} {:?} {}", entry.name, entry.kind, entry.size);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Files {
    client: Client,
}

impl Client {
    /// The shim's file operations (PROTOCOL.md §8.11).
    pub fn fs(&self) -> Files {
        Files {
            client: self.clone(),
        }
    }
}

impl Files {
    async fn call(&self, make: impl FnOnce(u64) -> ControlToShim) -> Result<ShimToControl, Error> {
        let id = self.client.next_id();
        self.client.call(id, make(id)).await
    }

    async fn call_ok(&self, make: impl FnOnce(u64) -> ControlToShim) -> Result<(), Error> {
        match self.call(make).await? {
            ShimToControl::Ok(_) => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// A path's metadata; a final symlink is reported as itself unless `follow`.
    pub async fn stat(&self, path: &str, follow: bool) -> Result<FsEntry, Error> {
        let path = path.to_owned();
        match self.call(|id| FsStat { id, path, follow }.into()).await? {
            ShimToControl::FsStatReply(r) => Ok(r.entry),
            other => Err(unexpected(&other)),
        }
    }

    /// Every entry of a directory, by name, page after page.
    pub async fn list(&self, path: &str) -> Result<Vec<FsEntry>, Error> {
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let (p, a) = (path.to_owned(), after.clone());
            let page = match self
                .call(|id| {
                    FsList {
                        id,
                        path: p,
                        after: a,
                        limit: None,
                    }
                    .into()
                })
                .await?
            {
                ShimToControl::FsListReply(r) => r,
                other => return Err(unexpected(&other)),
            };
            after = page.entries.last().map(|e| e.name.clone());
            all.extend(page.entries);
            if !page.more || after.is_none() {
                return Ok(all);
            }
        }
    }

    /// Creates a directory (and its parents, with `parents`).
    pub async fn mkdir(&self, path: &str, parents: bool) -> Result<(), Error> {
        let path = path.to_owned();
        self.call_ok(|id| {
            FsMkdir {
                id,
                path,
                parents,
                mode: None,
            }
            .into()
        })
        .await
    }

    /// Removes a file, a symlink or an empty directory (any tree with `recursive`).
    pub async fn remove(&self, path: &str, recursive: bool) -> Result<(), Error> {
        let path = path.to_owned();
        self.call_ok(|id| {
            FsRemove {
                id,
                path,
                recursive,
            }
            .into()
        })
        .await
    }

    /// Moves `from` to `to`, replacing `to`.
    pub async fn rename(&self, from: &str, to: &str) -> Result<(), Error> {
        let (from, to) = (from.to_owned(), to.to_owned());
        self.call_ok(|id| FsRename { id, from, to }.into()).await
    }

    /// Watches `path` (the tree below, with `recursive`): its changes arrive as
    /// `Event::FsEvent` on the client's event stream ([`Client::events`]), exactly once,
    /// with `watch` = the id returned here, until [`Files::unwatch`].
    pub async fn watch(&self, path: &str, recursive: bool) -> Result<u64, Error> {
        let path = path.to_owned();
        let id = self.client.next_id();
        match self
            .client
            .call(
                id,
                FsWatch {
                    id,
                    path,
                    recursive,
                }
                .into(),
            )
            .await?
        {
            ShimToControl::Ok(_) => Ok(id),
            other => Err(unexpected(&other)),
        }
    }

    /// Ends the watch `watch` (the id [`Files::watch`] returned).
    pub async fn unwatch(&self, watch: u64) -> Result<(), Error> {
        self.call_ok(|id| FsUnwatch { id, watch }.into()).await
    }

    /// The file's bytes from `offset`, as they stream in.
    pub fn read(&self, path: &str, offset: u64) -> FsReader {
        FsReader {
            client: self.client.clone(),
            path: path.to_owned(),
            offset,
            frames: None,
            chunk: Bytes::new(),
            done: false,
            retries: 0,
        }
    }

    /// Writes everything `data` yields to `path` (atomically replacing it, unless
    /// `opts.append`); the number of bytes written.
    pub async fn write(
        &self,
        path: &str,
        mut data: impl AsyncRead + Unpin,
        opts: WriteOptions,
    ) -> Result<u64, Error> {
        let p = path.to_owned();
        let handle = match self
            .call(|id| {
                FsWriteOpen {
                    id,
                    path: p,
                    mode: opts.mode,
                    parents: opts.parents,
                    append: opts.append,
                    handle: None,
                }
                .into()
            })
            .await?
        {
            ShimToControl::FsWriteReady(r) => r.handle,
            other => return Err(unexpected(&other)),
        };
        // Chunks sent and not yet answered, kept to send again after a loss.
        let mut window: VecDeque<InFlight> = VecDeque::new();
        let mut offset = 0u64;
        let mut eof = false;
        while !eof || !window.is_empty() {
            if !eof && window.len() < WRITE_WINDOW {
                // Filled as it is read, never zeroed first.
                let mut buf = BytesMut::with_capacity(WRITE_CHUNK);
                while buf.len() < WRITE_CHUNK {
                    let room = WRITE_CHUNK - buf.len();
                    if data.read_buf(&mut (&mut buf).limit(room)).await? == 0 {
                        eof = true;
                        break;
                    }
                }
                let n = buf.len();
                if n > 0 {
                    let bytes = buf.freeze();
                    let task = self.send_chunk(handle, offset, bytes.clone());
                    window.push_back((offset, bytes, task));
                    offset += n as u64;
                }
                continue;
            }
            let Some((at, bytes, task)) = window.pop_front() else {
                break;
            };
            match task.await.map_err(|e| Error::Protocol(e.to_string()))? {
                Ok(()) => {}
                Err(err @ Error::Remote { .. }) if err.code() != Some(&ErrorCode::Invalid) => {
                    return Err(err);
                }
                Err(_) => {
                    // Lost (or out of order after a reconnect): ask what the upload has,
                    // then send again from there.
                    let taken = self.upload_offset(handle).await?;
                    let mut again = VecDeque::from([(at, bytes)]);
                    again.extend(window.drain(..).map(|(o, b, t)| {
                        t.abort();
                        (o, b)
                    }));
                    for (o, b) in again {
                        let end = o + b.len() as u64;
                        if end > taken {
                            let task = self.send_chunk(handle, o, b.clone());
                            window.push_back((o, b, task));
                        }
                    }
                }
            }
        }
        let close = self
            .call(|id| {
                FsWriteClose {
                    id,
                    handle,
                    abort: false,
                }
                .into()
            })
            .await?;
        match close {
            ShimToControl::Ok(_) => Ok(offset),
            other => Err(unexpected(&other)),
        }
    }

    fn send_chunk(
        &self,
        handle: u64,
        offset: u64,
        data: Bytes,
    ) -> tokio::task::JoinHandle<Result<(), Error>> {
        let files = self.clone();
        tokio::spawn(async move {
            files
                .call_ok(|id| {
                    FsWriteData {
                        id,
                        handle,
                        offset,
                        data,
                    }
                    .into()
                })
                .await
        })
    }

    async fn upload_offset(&self, handle: u64) -> Result<u64, Error> {
        match self
            .call(|id| {
                FsWriteOpen {
                    id,
                    path: String::new(),
                    mode: None,
                    parents: false,
                    append: false,
                    handle: Some(handle),
                }
                .into()
            })
            .await?
        {
            ShimToControl::FsWriteReady(r) => Ok(r.offset),
            other => Err(unexpected(&other)),
        }
    }
}

/// A file's bytes as an [`AsyncRead`], from [`Files::read`]. A dropped connection is
/// resumed from the offset reached (up to 5 times in a row without progress).
#[derive(Debug)]
pub struct FsReader {
    client: Client,
    path: String,
    offset: u64,
    frames: Option<mpsc::Receiver<ShimToControl>>,
    chunk: Bytes,
    done: bool,
    retries: u32,
}

impl FsReader {
    /// The offset of the next byte [`poll_read`](AsyncRead::poll_read) returns.
    pub fn offset(&self) -> u64 {
        self.offset - self.chunk.len() as u64
    }
}

fn io_err(e: Error) -> io::Error {
    let kind = match e.code() {
        Some(ErrorCode::NotFound) => io::ErrorKind::NotFound,
        Some(ErrorCode::Permission) => io::ErrorKind::PermissionDenied,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e)
}

impl AsyncRead for FsReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.chunk.is_empty() {
                let n = this.chunk.len().min(buf.remaining());
                buf.put_slice(&this.chunk.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.done {
                return Poll::Ready(Ok(()));
            }
            let frames = match &mut this.frames {
                Some(f) => f,
                None => {
                    let id = this.client.next_id();
                    let msg = FsRead {
                        id,
                        path: this.path.clone(),
                        offset: this.offset,
                        length: None,
                    };
                    let rx = this.client.stream(id, msg.into()).map_err(io_err)?;
                    this.frames.insert(rx)
                }
            };
            match frames.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(ShimToControl::FsData(d))) => {
                    if d.offset != this.offset {
                        let e = Error::Protocol(format!(
                            "fs_data at {} where {} was due",
                            d.offset, this.offset
                        ));
                        return Poll::Ready(Err(io_err(e)));
                    }
                    this.retries = 0;
                    this.offset += d.data.len() as u64;
                    this.chunk = d.data;
                    if d.eof {
                        this.done = true;
                        this.frames = None;
                    }
                }
                Poll::Ready(Some(ShimToControl::Error(e))) => {
                    this.done = true;
                    return Poll::Ready(Err(io_err(Error::remote(e.code, e.message))));
                }
                Poll::Ready(Some(other)) => {
                    return Poll::Ready(Err(io_err(unexpected(&other))));
                }
                Poll::Ready(None) => {
                    // The connection dropped: ask again from here.
                    this.frames = None;
                    this.retries += 1;
                    if this.retries > 5 || this.client.is_closed() {
                        this.done = true;
                        return Poll::Ready(Err(io_err(Error::NotConnected)));
                    }
                }
            }
        }
    }
}
