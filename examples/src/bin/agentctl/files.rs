//! agentctl's file commands over `client.fs()`: `cp` both ways (`-r` for trees), `ls`, `cat`,
//! `rm`, `mkdir`, `mv`. A path in the sandbox is written with a leading `:` in `cp`
//! (`agentctl cp ./in.txt :/work/in.txt`, `agentctl cp -r :/work/out ./out`); the other
//! commands take sandbox paths only.

use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::Instant;

use control_link::protocol::message::{FsEntry, FsKind};
use control_link::{Client, Files, WriteOptions};
use tokio::io::{AsyncRead, AsyncWriteExt as _, ReadBuf};

use super::{Fail, Out};

/// Exit code of a usage error (as the rest of agentctl).
const USAGE: u8 = super::exit::USAGE;

/// `cp SRC DST`.
pub async fn cp(
    client: &Client,
    src: &str,
    dst: &str,
    recursive: bool,
    out: &Out,
) -> Result<u8, Fail> {
    let fs = client.fs();
    let progress = !out.json && std::io::stderr().is_terminal();
    match (src.strip_prefix(':'), dst.strip_prefix(':')) {
        (None, Some(remote)) => {
            let local = Path::new(src);
            let n = upload(&fs, local, remote, recursive, progress).await?;
            out.line(
                || format!("{n} bytes copied to :{remote}"),
                || serde_json::json!({"copied": n, "to": remote}),
            );
        }
        (Some(remote), None) => {
            let n = download(&fs, remote, Path::new(dst), recursive, progress).await?;
            out.line(
                || format!("{n} bytes copied from :{remote}"),
                || serde_json::json!({"copied": n, "from": remote}),
            );
        }
        _ => {
            return Err(Fail(
                USAGE,
                "cp copies between here and the sandbox: exactly one path starts with ':'".into(),
            ))
        }
    }
    Ok(0)
}

fn local_err(path: &Path, e: std::io::Error) -> Fail {
    Fail(super::exit::FAILED, format!("{}: {e}", path.display()))
}

async fn upload(
    fs: &Files,
    local: &Path,
    remote: &str,
    recursive: bool,
    progress: bool,
) -> Result<u64, Fail> {
    let meta = tokio::fs::metadata(local)
        .await
        .map_err(|e| local_err(local, e))?;
    if meta.is_dir() {
        if !recursive {
            return Err(Fail(
                USAGE,
                format!("{} is a directory (use -r)", local.display()),
            ));
        }
        fs.mkdir(remote, true).await?;
        let mut total = 0;
        let mut dir = tokio::fs::read_dir(local)
            .await
            .map_err(|e| local_err(local, e))?;
        while let Some(e) = dir.next_entry().await.map_err(|e| local_err(local, e))? {
            let name = e.file_name().to_string_lossy().into_owned();
            let child = format!("{}/{name}", remote.trim_end_matches('/'));
            total += Box::pin(upload(fs, &e.path(), &child, true, progress)).await?;
        }
        return Ok(total);
    }
    let file = tokio::fs::File::open(local)
        .await
        .map_err(|e| local_err(local, e))?;
    let reader = Progress::new(file, meta.len(), progress, remote);
    let opts = WriteOptions {
        mode: Some(std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777),
        parents: true,
        append: false,
    };
    Ok(fs.write(remote, reader, opts).await?)
}

async fn download(
    fs: &Files,
    remote: &str,
    local: &Path,
    recursive: bool,
    progress: bool,
) -> Result<u64, Fail> {
    let entry = fs.stat(remote, true).await?;
    if entry.kind == FsKind::Dir {
        if !recursive {
            return Err(Fail(USAGE, format!(":{remote} is a directory (use -r)")));
        }
        tokio::fs::create_dir_all(local)
            .await
            .map_err(|e| local_err(local, e))?;
        let mut total = 0;
        for e in fs.list(remote).await? {
            let child = format!("{}/{}", remote.trim_end_matches('/'), e.name);
            if matches!(e.kind, FsKind::File | FsKind::Dir) {
                total +=
                    Box::pin(download(fs, &child, &local.join(&e.name), true, progress)).await?;
            }
        }
        return Ok(total);
    }
    let tmp = PathBuf::from(format!("{}.agentctl-part", local.display()));
    let mut file = tokio::fs::File::create(&tmp)
        .await
        .map_err(|e| local_err(&tmp, e))?;
    let mut reader = Progress::new(fs.read(remote, 0), entry.size, progress, remote);
    let n = tokio::io::copy(&mut reader, &mut file)
        .await
        .map_err(|e| Fail(super::exit::FAILED, format!(":{remote}: {e}")))?;
    file.flush().await.map_err(|e| local_err(&tmp, e))?;
    tokio::fs::rename(&tmp, local)
        .await
        .map_err(|e| local_err(local, e))?;
    Ok(n)
}

/// `ls PATH`.
pub async fn ls(client: &Client, path: &str, out: &Out) -> Result<u8, Fail> {
    let fs = client.fs();
    let entry = fs.stat(path, true).await?;
    let entries = if entry.kind == FsKind::Dir {
        fs.list(path).await?
    } else {
        vec![entry]
    };
    for e in &entries {
        out.line(
            || describe(e),
            || serde_json::to_value(e).unwrap_or_default(),
        );
    }
    Ok(0)
}

fn describe(e: &FsEntry) -> String {
    let kind = match e.kind {
        FsKind::Dir => 'd',
        FsKind::Symlink => 'l',
        FsKind::Fifo => 'p',
        FsKind::Socket => 's',
        FsKind::Char => 'c',
        FsKind::Block => 'b',
        FsKind::File => '-',
    };
    let target = e
        .target
        .as_deref()
        .map(|t| format!(" -> {t}"))
        .unwrap_or_default();
    format!(
        "{kind}{:04o} {:>5}:{:<5} {:>12} {}{target}",
        e.mode, e.uid, e.gid, e.size, e.name
    )
}

/// `cat PATH`: the bytes to stdout.
pub async fn cat(client: &Client, path: &str) -> Result<u8, Fail> {
    let mut reader = client.fs().read(path, 0);
    let mut stdout = tokio::io::stdout();
    tokio::io::copy(&mut reader, &mut stdout)
        .await
        .map_err(|e| Fail(super::exit::FAILED, format!(":{path}: {e}")))?;
    let _ = stdout.flush().await;
    Ok(0)
}

/// `rm`, `mkdir`, `mv`.
pub async fn simple(client: &Client, what: Simple, out: &Out) -> Result<u8, Fail> {
    let fs = client.fs();
    match &what {
        Simple::Rm { path, recursive } => fs.remove(path, *recursive).await?,
        Simple::Mkdir { path, parents } => fs.mkdir(path, *parents).await?,
        Simple::Mv { from, to } => fs.rename(from, to).await?,
    }
    out.ok(match what {
        Simple::Rm { .. } => "removed",
        Simple::Mkdir { .. } => "created",
        Simple::Mv { .. } => "moved",
    });
    Ok(0)
}

/// The one-request file commands.
pub enum Simple {
    /// `rm`.
    Rm { path: String, recursive: bool },
    /// `mkdir`.
    Mkdir { path: String, parents: bool },
    /// `mv`.
    Mv { from: String, to: String },
}

/// A reader that draws a one-line progress bar on stderr (a terminal only).
struct Progress<R> {
    inner: R,
    total: u64,
    done: u64,
    show: bool,
    name: String,
    started: Instant,
    drawn: Instant,
}

impl<R> Progress<R> {
    fn new(inner: R, total: u64, show: bool, name: &str) -> Self {
        let now = Instant::now();
        Self {
            inner,
            total,
            done: 0,
            show,
            name: name.to_owned(),
            started: now,
            drawn: now,
        }
    }

    fn draw(&mut self, end: bool) {
        if !self.show || (!end && self.drawn.elapsed().as_millis() < 100) {
            return;
        }
        self.drawn = Instant::now();
        let pct = (self.done * 100)
            .checked_div(self.total)
            .unwrap_or(100)
            .min(100);
        let bar: String = (0..30)
            .map(|i| if i * 100 / 30 < pct { '#' } else { '.' })
            .collect();
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = self.done as f64 / secs / 1e6;
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r{} [{bar}] {pct:>3}% {:.1} MB/s", self.name, rate);
        if end {
            let _ = writeln!(err);
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Progress<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if let std::task::Poll::Ready(Ok(())) = &r {
            self.done += n as u64;
            let end = n == 0;
            self.draw(end);
        }
        r
    }
}

/// `watch PATH`: prints the changes until interrupted (or `count` of them), acking each.
pub async fn watch(
    client: &Client,
    path: &str,
    recursive: bool,
    count: Option<u64>,
    out: &Out,
) -> Result<u8, Fail> {
    use control_link::protocol::message::Event;
    let mut events = client.events()?;
    let watch = client.fs().watch(path, recursive).await?;
    let mut seen = 0;
    while count.is_none_or(|c| seen < c) {
        let Some((seq, event)) = events.next().await else {
            return Err(Fail(super::exit::CONNECT, "the connection was lost".into()));
        };
        if let Event::FsEvent(e) = &event {
            if e.watch == watch {
                seen += 1;
                out.line(
                    || {
                        let to =
                            e.to.as_deref()
                                .map(|t| format!(" -> {t}"))
                                .unwrap_or_default();
                        let lost = e
                            .dropped
                            .map(|d| format!(" ({d} lost)"))
                            .unwrap_or_default();
                        format!("{:?} {}{to}{lost}", e.change, e.path).to_lowercase()
                    },
                    || serde_json::to_value(e).unwrap_or_default(),
                );
            }
        }
        client.ack(seq);
    }
    client.fs().unwatch(watch).await?;
    Ok(0)
}
