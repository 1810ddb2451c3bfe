//! Files: 1 GiB uploaded and downloaded through control-link's `client.fs()` (PROTOCOL.md
//! §8.8) over a unix socket, beside a raw unix-socket copy of the same bytes; 10,000 small
//! files listed and read.

use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _, ReadBuf};

use crate::procs::Mode;
use crate::report::{Figure, Target};
use crate::stats::{list, median};

use super::Ctx;

/// Uploads, and downloads, at once in the mix whose peak memory is read.
const MIX: usize = 4;

/// `len` bytes of a repeating pattern, without holding them.
struct Pattern {
    left: u64,
    block: Vec<u8>,
}

impl AsyncRead for Pattern {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = (buf.remaining() as u64)
            .min(self.left)
            .min(self.block.len() as u64) as usize;
        buf.put_slice(&self.block[..n]);
        self.left -= n as u64;
        Poll::Ready(Ok(()))
    }
}

fn pattern(len: u64) -> Pattern {
    Pattern {
        left: len,
        block: (0..256 * 1024u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect(),
    }
}

/// Reads everything; the byte count.
async fn drain(mut r: impl AsyncRead + Unpin) -> Result<u64> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0u64;
    loop {
        let got = r.read(&mut buf).await?;
        if got == 0 {
            return Ok(n);
        }
        n += got as u64;
    }
}

/// GB/s of one raw unix-socket copy of `bytes`.
async fn raw(bytes: u64) -> Result<f64> {
    let (a, b) = tokio::net::UnixStream::pair()?;
    let t0 = Instant::now();
    let writer = tokio::spawn(async move {
        let mut a = a;
        let r = tokio::io::copy(&mut pattern(bytes), &mut a).await;
        let _ = a.shutdown().await;
        r
    });
    let got = drain(b).await?;
    writer.await??;
    if got != bytes {
        bail!("raw copy: {got} of {bytes}");
    }
    Ok(bytes as f64 / t0.elapsed().as_secs_f64() / 1e9)
}

/// Upload and download GB/s, and small files per second (list + read), through the shim.
async fn through_shim(
    sock: &Path,
    root: &Path,
    bytes: u64,
    small: usize,
) -> Result<(f64, f64, f64)> {
    let addr: control_link::Addr = format!("unix:{}", sock.display()).parse()?;
    // The socket file may exist a moment before the shim listens on it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let client = loop {
        let c = control_link::ConnectOptions::new()
            .connect_timeout(Duration::from_secs(10))
            .request_timeout(Duration::from_secs(60))
            .connect(&addr)
            .await;
        match c {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let fs = client.fs();
    let t0 = Instant::now();
    let n = fs.write("big", pattern(bytes), Default::default()).await?;
    let up = n as f64 / t0.elapsed().as_secs_f64() / 1e9;
    if n != bytes || std::fs::metadata(root.join("big"))?.len() != bytes {
        bail!("upload: {n} of {bytes}");
    }
    let t0 = Instant::now();
    let got = drain(fs.read("big", 0)).await?;
    let down = got as f64 / t0.elapsed().as_secs_f64() / 1e9;
    if got != bytes {
        bail!("download: {got} of {bytes}");
    }
    std::fs::remove_file(root.join("big"))?;
    let dir = root.join("small");
    std::fs::create_dir_all(&dir)?;
    for i in 0..small {
        std::fs::write(dir.join(format!("f{i:05}")), [b'x'; 1024])?;
    }
    let t0 = Instant::now();
    let entries = fs.list("small").await?;
    let mut read = 0;
    for e in &entries {
        read += drain(fs.read(&format!("small/{}", e.name), 0)).await?;
    }
    let rate = entries.len() as f64 / t0.elapsed().as_secs_f64();
    if entries.len() != small || read != small as u64 * 1024 {
        bail!("small files: {} listed, {read} bytes read", entries.len());
    }
    // A mix, for the peak memory: MIX uploads and MIX downloads at once, while the small
    // files are read again.
    let each = (bytes / 8).max(1 << 20);
    for i in 0..MIX {
        fs.write(&format!("mix-{i}"), pattern(each), Default::default())
            .await?;
    }
    let mut jobs = tokio::task::JoinSet::new();
    for i in 0..MIX {
        let fs = client.fs();
        jobs.spawn(async move { drain(fs.read(&format!("mix-{i}"), 0)).await });
        let fs = client.fs();
        jobs.spawn(async move {
            Ok(fs
                .write(&format!("mix-up-{i}"), pattern(each), Default::default())
                .await?)
        });
    }
    let fs2 = client.fs();
    let names: Vec<String> = entries.iter().map(|e| e.name.clone()).collect();
    jobs.spawn(async move {
        let mut n = 0;
        for name in names {
            n += drain(fs2.read(&format!("small/{name}"), 0)).await?;
        }
        Ok(n)
    });
    while let Some(done) = jobs.join_next().await {
        done??;
    }
    client.close().await;
    Ok((up, down, rate))
}

/// Where the file root goes: a tmpfs (`/dev/shm`) when there is one, so that the figure is the
/// transfer's and not the disk's (an upload's `fsync` of 1 GiB is the disk's speed, shown
/// beside it by [`disk`]); the scratch directory otherwise.
fn root_base(ctx: &Ctx) -> (std::path::PathBuf, &'static str) {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        let dir = shm.join(format!("shim-bench-files-{}", std::process::id()));
        if std::fs::create_dir_all(&dir).is_ok() {
            return (dir, "tmpfs (/dev/shm)");
        }
    }
    (ctx.scratch.clone(), "the scratch directory's disk")
}

/// GB/s of writing `bytes` to a file in `dir` and `fsync`ing it: what an upload to that disk
/// cannot beat.
fn disk(dir: &Path, bytes: u64) -> Result<f64> {
    use std::io::Write as _;
    let path = dir.join("disk-figure");
    let block = vec![0x5au8; 1 << 20];
    let t0 = Instant::now();
    let mut f = std::fs::File::create(&path)?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        f.write_all(&block[..n])?;
        left -= n as u64;
    }
    f.sync_all()?;
    let gbs = bytes as f64 / t0.elapsed().as_secs_f64() / 1e9;
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(gbs)
}

fn shim_run(ctx: &Ctx, n: usize, bytes: u64, small: usize) -> Result<(f64, f64, f64, f64)> {
    let root = root_base(ctx).0.join(format!("files-root-{n}"));
    std::fs::create_dir_all(&root)?;
    let sock = ctx.scratch.join(format!("files-{n}.sock"));
    let _ = std::fs::remove_file(&sock);
    let argv: Vec<std::ffi::OsString> = vec![
        ctx.bins.shim.clone().into(),
        "--control-listen".into(),
        format!("unix:{}", sock.display()).into(),
        "--control-insecure".into(),
        "--fs-root".into(),
        root.clone().into(),
        "--".into(),
        ctx.bins.bench_driver.clone().into(),
    ];
    let mut proc = crate::procs::Spec::new(Mode::Direct, argv).start()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("runtime")?;
    let result = rt.block_on(through_shim(&sock, &root, bytes, small));
    // The shim's peak resident memory over the whole run, the mix included.
    let peak = crate::procs::status_kb(proc.pid, "VmHWM");
    proc.stop(Duration::from_secs(5));
    let _ = std::fs::remove_dir_all(&root);
    let (up, down, rate) = result?;
    Ok((up, down, rate, peak.map_or(f64::NAN, |kb| kb as f64)))
}

/// Measures uploads, downloads and small files through the shim, and the raw socket copy.
pub fn run(ctx: &Ctx) -> Vec<Figure> {
    let bytes: u64 = ctx.pick(1 << 30, 64 << 20);
    let small = ctx.pick(10_000, 1_000);
    let (base, where_) = root_base(ctx);
    let mut fig = Figure::new(
        "files",
        "control-link's `client.fs()` against agent-shim over a unix socket (`--fs-root` a \
         directory on a tmpfs where there is one, no `--user`): `write` of a generated 1 GiB \
         stream (atomic replace: temporary file, fsync, rename), `read` of it back; beside \
         it, the same bytes through a raw unix socketpair in one process. Then 10,000 files \
         of 1 KiB listed (`fs_list` pages) and each read (`fs_read`): files per second.",
    );
    let reps = ctx.pick(3, 1);
    let (mut up, mut down, mut files, mut rawv) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut diskv = Vec::new();
    let mut peaks = Vec::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    for n in 0..reps {
        match &rt {
            Ok(rt) => match rt.block_on(raw(bytes)) {
                Ok(v) => rawv.push(v),
                Err(e) => fig.notes.push(format!("raw run {n}: {e:#}")),
            },
            Err(e) => fig.notes.push(format!("runtime: {e}")),
        }
        match disk(&ctx.scratch, bytes) {
            Ok(v) => diskv.push(v),
            Err(e) => fig.notes.push(format!("disk run {n}: {e:#}")),
        }
        match shim_run(ctx, n, bytes, small) {
            Ok((u, d, f, p)) => {
                if p.is_finite() {
                    peaks.push(p / 1024.0);
                }
                up.push(u);
                down.push(d);
                files.push(f);
            }
            Err(e) => fig.notes.push(format!("shim run {n}: {e:#}")),
        }
    }
    fig.columns = vec!["median".into(), "runs".into()];
    let gb = |v: &[f64]| median(v).map_or("not measured".into(), |m| format!("{m:.2} GB/s"));
    fig.rows.push((
        "upload (client.fs().write)".into(),
        vec![gb(&up), list(&up, 2)],
    ));
    fig.rows.push((
        "download (client.fs().read)".into(),
        vec![gb(&down), list(&down, 2)],
    ));
    fig.rows.push((
        "raw unix socket copy".into(),
        vec![gb(&rawv), list(&rawv, 2)],
    ));
    fig.rows.push((
        "the scratch disk: the same bytes written and fsync'd".into(),
        vec![gb(&diskv), list(&diskv, 2)],
    ));
    fig.rows.push((
        format!("agent-shim's peak RSS (VmHWM), a mix of {MIX} uploads, {MIX} downloads and the small files at once"),
        vec![
            median(&peaks).map_or("not measured".into(), |m| format!("{m:.1} MiB")),
            list(&peaks, 1),
        ],
    ));
    fig.rows.push((
        format!("{small} small files, listed and read"),
        vec![
            median(&files).map_or("not measured".into(), |m| format!("{m:.0} files/s")),
            list(&files, 0),
        ],
    ));
    if base != ctx.scratch {
        let _ = std::fs::remove_dir_all(&base);
    }
    fig.notes.push(format!(
        "The file root was on {where_}. An upload's atomic replace ends with an fsync: \
         to a disk, no upload is faster than the disk's row."
    ));
    fig.notes.push(format!(
        "{bytes} bytes per transfer. Not measured here: `exec cat` through the shim (the \
         `exec output` figure is its download direction) and `docker cp`."
    ));
    let raw_m = median(&rawv);
    for (what, v) in [("upload", median(&up)), ("download", median(&down))] {
        match v {
            Some(v) => {
                fig.targets.push(Target::check(
                    &format!("{what} ≥ 1 GB/s"),
                    v >= 1.0,
                    format!("{v:.2} GB/s"),
                ));
                if let Some(r) = raw_m {
                    fig.targets.push(Target::check(
                        &format!("{what} ≥ 50% of the raw copy"),
                        v >= r / 2.0,
                        format!("{:.0}% of {r:.2} GB/s", v / r * 100.0),
                    ));
                }
            }
            None => fig.targets.push(Target::not_measured(
                &format!("{what} ≥ 1 GB/s"),
                "no run".into(),
            )),
        }
    }
    vec![fig]
}
