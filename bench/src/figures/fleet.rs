//! Fleet: one control process holding live control connections to 1,000 shims (each
//! supervising the echo driver); the control side's RSS and CPU, and the shims' total RSS.
//!
//! `control-link`'s `Fleet` is not there yet, so the control side is [`control_main`]: one
//! process, one tokio current-thread runtime, one task per shim doing what a fleet client does
//! (connect, `hello`, `resume_from`, read and acknowledge events, answer a `status` round).
//! Switching to `Fleet` means replacing `control_main`'s body; the measurement around it (run
//! as `shim-bench fleet-control DIR N`, reporting on stdout) stays.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Buf, BytesMut};
use driver_protocol::frame::{parse_header, write_message, HEADER_LEN};
use driver_protocol::message::{
    Ack, ControlToShim, Hello, Message, ResumeFrom, Role, ShimToControl, Status,
};
use driver_protocol::{raw, DEFAULT_MAX_FRAME};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use crate::procs::{children_of, status_kb, Mode, Proc, Spec};
use crate::report::{Figure, Target};

use super::Ctx;

/// Control side's limit: 100 MiB.
const CONTROL_LIMIT_KB: f64 = 100.0 * 1024.0;
/// The shims' total limit: 1.5 GiB.
const SHIMS_LIMIT_KB: f64 = 1.5 * 1024.0 * 1024.0;

/// How long the control side holds the fleet idle while its CPU is measured.
const IDLE_HOLD: Duration = Duration::from_secs(2);

fn socket(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("s{i}.sock"))
}

/// Reads one frame into `buf`'s front; cancel-safe (all state is in `buf`).
async fn next_frame(rd: &mut OwnedReadHalf, buf: &mut BytesMut) -> Result<Option<BytesMut>> {
    loop {
        if let Some(len) = parse_header(buf, DEFAULT_MAX_FRAME)? {
            if buf.len() >= HEADER_LEN + len {
                let mut f = buf.split_to(HEADER_LEN + len);
                f.advance(HEADER_LEN);
                return Ok(Some(f));
            }
        }
        if rd.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}

async fn send(wr: &mut OwnedWriteHalf, msg: ControlToShim) -> Result<()> {
    let mut out = Vec::with_capacity(64);
    write_message(&mut out, DEFAULT_MAX_FRAME, &msg)?;
    wr.write_all(&out).await?;
    Ok(())
}

/// What one connection reports to the fleet.
enum Report {
    Ready,
    Status,
    Failed(String),
}

/// One shim's connection: handshake, events until `driver_ready`, then idle (acknowledging
/// events) and one `status` per round.
async fn agent(
    path: PathBuf,
    tx: tokio::sync::mpsc::UnboundedSender<Report>,
    mut go: tokio::sync::watch::Receiver<u64>,
) {
    let res: Result<()> = async {
        let deadline = Instant::now() + Duration::from_secs(120);
        let stream = loop {
            match UnixStream::connect(&path).await {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(5)).await
                }
                Err(e) => return Err(anyhow!(e).context(format!("connect {}", path.display()))),
            }
        };
        let (mut rd, mut wr) = stream.into_split();
        let mut buf = BytesMut::with_capacity(4096);
        send(
            &mut wr,
            Hello::new(Role::Control, "shim-bench-fleet", "0").into(),
        )
        .await?;
        match next_frame(&mut rd, &mut buf).await? {
            Some(f) => match ShimToControl::decode(&f)? {
                ShimToControl::Hello(_) => {}
                other => bail!("first frame {other:?}"),
            },
            None => bail!("closed before hello"),
        }
        send(&mut wr, ResumeFrom { seq: 0 }.into()).await?;
        let mut ready = false;
        let mut next_id = 0u64;
        loop {
            tokio::select! {
                frame = next_frame(&mut rd, &mut buf) => {
                    let Some(f) = frame? else { bail!("the shim closed the connection") };
                    if raw::read_head(&f)?.type_name == "event" {
                        let ev = raw::split_envelope(&f)?;
                        if !ready && raw::read_head(ev.event)?.type_name == "driver_ready" {
                            ready = true;
                            let _ = tx.send(Report::Ready);
                        }
                        send(&mut wr, Ack { seq: ev.seq }.into()).await?;
                    } else if let ShimToControl::StatusReply(_) = ShimToControl::decode(&f)? {
                        let _ = tx.send(Report::Status);
                    }
                }
                changed = go.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    next_id += 1;
                    send(&mut wr, Status { id: next_id }.into()).await?;
                }
            }
        }
    }
    .await;
    if let Err(e) = res {
        let _ = tx.send(Report::Failed(format!("{}: {e:#}", path.display())));
    }
}

fn cpu_ms() -> f64 {
    // SAFETY: `ru` is a valid, writable rusage; RUSAGE_SELF always exists.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// The control side of the fleet figure (`shim-bench fleet-control DIR N`): connects to the
/// `N` shims of `DIR`, prints `ready OK FAILED MS` once every driver is ready, waits for a
/// line on stdin, holds the fleet idle for 2 s, runs one `status` round, and prints
/// `stats RSS_KB CPU_TOTAL_MS IDLE_CPU_MS STATUS_ROUND_MS STATUSES`.
pub fn control_main(dir: &Path, n: usize) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let t0 = Instant::now();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let (go_tx, go_rx) = tokio::sync::watch::channel(0u64);
        for i in 0..n {
            tokio::spawn(agent(socket(dir, i), tx.clone(), go_rx.clone()));
        }
        drop(tx);
        let (mut ok, mut failed) = (0usize, 0usize);
        while ok + failed < n {
            match tokio::time::timeout(Duration::from_secs(180), rx.recv()).await {
                Ok(Some(Report::Ready)) => ok += 1,
                Ok(Some(Report::Failed(e))) => {
                    failed += 1;
                    eprintln!("fleet-control: {e}");
                }
                Ok(Some(Report::Status)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        println!("ready {ok} {failed} {}", t0.elapsed().as_millis());
        std::io::stdout().flush()?;
        let mut line = String::new();
        let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
        tokio::io::AsyncBufReadExt::read_line(&mut stdin, &mut line).await?;
        let before = cpu_ms();
        tokio::time::sleep(IDLE_HOLD).await;
        let idle = cpu_ms() - before;
        let t1 = Instant::now();
        go_tx.send(1)?;
        let mut statuses = 0usize;
        while statuses < ok {
            match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
                Ok(Some(Report::Status)) => statuses += 1,
                Ok(Some(Report::Failed(e))) => eprintln!("fleet-control: {e}"),
                Ok(Some(Report::Ready)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        let round = t1.elapsed().as_secs_f64() * 1e3;
        let rss = status_kb(std::process::id() as i32, "VmRSS").unwrap_or(0);
        println!(
            "stats {rss} {:.0} {idle:.1} {round:.1} {statuses}",
            cpu_ms()
        );
        std::io::stdout().flush()?;
        Ok(())
    })
}

/// Reads lines of `stdout` into a channel.
fn lines(stdout: std::process::ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// What the measurement found.
struct Found {
    n: usize,
    ready_ms: f64,
    shims_kb: f64,
    drivers_kb: f64,
    control_kb: f64,
    cpu_total_ms: f64,
    idle_cpu_ms: f64,
    status_round_ms: f64,
}

fn measure(ctx: &Ctx, n: usize) -> Result<Found> {
    let dir = ctx.scratch.join("fleet");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut shims: Vec<Proc> = Vec::with_capacity(n);
    for i in 0..n {
        let argv: Vec<OsString> = vec![
            ctx.bins.shim.clone().into(),
            "--control-listen".into(),
            format!("unix:{}", socket(&dir, i).display()).into(),
            "--control-insecure".into(),
            "--".into(),
            ctx.bins.echo_driver.clone().into(),
        ];
        shims.push(Spec::new(Mode::Direct, argv).start()?);
    }
    let mut control = Command::new(&ctx.bins.this)
        .arg("fleet-control")
        .arg(&dir)
        .arg(n.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("spawn the fleet's control side")?;
    let result = (|| -> Result<Found> {
        let out = lines(control.stdout.take().context("no stdout")?);
        let ready = out
            .recv_timeout(Duration::from_secs(240))
            .context("the control side never reported ready")?;
        let w: Vec<&str> = ready.split_whitespace().collect();
        let (ok, failed, ready_ms) = match w[..] {
            ["ready", ok, failed, ms] => (
                ok.parse::<usize>()?,
                failed.parse::<usize>()?,
                ms.parse::<f64>()?,
            ),
            _ => bail!("unexpected line {ready:?}"),
        };
        if ok != n {
            bail!("{ok} of {n} shims became ready ({failed} failed)");
        }
        std::thread::sleep(Duration::from_millis(500));
        let mut shims_kb = 0.0;
        let mut drivers_kb = 0.0;
        for s in &shims {
            shims_kb +=
                status_kb(s.pid, "VmRSS").ok_or_else(|| anyhow!("shim {} gone", s.pid))? as f64;
            for d in children_of(s.pid) {
                drivers_kb += status_kb(d, "VmRSS").unwrap_or(0) as f64;
            }
        }
        let mut stdin = control.stdin.take().context("no stdin")?;
        writeln!(stdin, "go")?;
        let stats = out
            .recv_timeout(Duration::from_secs(120))
            .context("the control side never reported its stats")?;
        let w: Vec<&str> = stats.split_whitespace().collect();
        let ["stats", rss, cpu, idle, round, statuses] = w[..] else {
            bail!("unexpected line {stats:?}");
        };
        if statuses.parse::<usize>()? != n {
            bail!("only {statuses} of {n} shims answered the status round");
        }
        Ok(Found {
            n,
            ready_ms,
            shims_kb,
            drivers_kb,
            control_kb: rss.parse()?,
            cpu_total_ms: cpu.parse()?,
            idle_cpu_ms: idle.parse()?,
            status_round_ms: round.parse()?,
        })
    })();
    let _ = control.kill();
    let _ = control.wait();
    for s in &shims {
        let _ = s.signal(libc::SIGTERM);
    }
    for s in &mut shims {
        s.stop(Duration::from_secs(10));
    }
    drop(shims);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Measures the fleet.
pub fn run(ctx: &Ctx) -> Figure {
    let n = ctx.pick(1000, 50);
    let mut fig = Figure::new(
        "fleet",
        "1,000 agent-shims (not PID 1, each `--control-listen unix:… --control-insecure -- \
         echo-driver`) and one control process (`shim-bench fleet-control`: one tokio \
         current-thread runtime, one task per shim) that connects to all of them, reads and \
         acknowledges their events until every `driver_ready`, then holds them. Measured while \
         every connection is live: the control process's VmRSS and CPU time (total, and during a \
         2 s idle hold), the time of one `status` round to all shims, and the sum of the shims' \
         VmRSS (their drivers' shown apart).",
    );
    let t_control = "control side ≤ 100 MiB";
    let t_shims = "shims ≤ 1.5 GiB total";
    match measure(ctx, n) {
        Ok(f) => {
            fig.columns = vec!["value".into()];
            let row = |k: &str, v: String| (k.to_string(), vec![v]);
            fig.rows = vec![
                row("shims", f.n.to_string()),
                row(
                    "time until every driver_ready at the control side",
                    format!("{:.0} ms", f.ready_ms),
                ),
                row(
                    "control side VmRSS",
                    format!("{:.1} MiB", f.control_kb / 1024.0),
                ),
                row(
                    "control side CPU, total (connect, handshakes, events, status round)",
                    format!("{:.0} ms", f.cpu_total_ms),
                ),
                row(
                    "control side CPU during a 2 s idle hold",
                    format!("{:.1} ms", f.idle_cpu_ms),
                ),
                row(
                    "one status round to every shim",
                    format!("{:.1} ms", f.status_round_ms),
                ),
                row(
                    "shims' VmRSS, total",
                    format!(
                        "{:.1} MiB ({:.0} kB per shim)",
                        f.shims_kb / 1024.0,
                        f.shims_kb / f.n as f64
                    ),
                ),
                row(
                    "echo drivers' VmRSS, total (not part of the target)",
                    format!("{:.1} MiB", f.drivers_kb / 1024.0),
                ),
            ];
            fig.targets.push(Target::check(
                t_control,
                f.control_kb <= CONTROL_LIMIT_KB,
                format!("{:.1} MiB", f.control_kb / 1024.0),
            ));
            let scaled = f.shims_kb * 1000.0 / f.n as f64;
            fig.targets.push(Target::check(
                t_shims,
                scaled <= SHIMS_LIMIT_KB,
                format!(
                    "{:.1} MiB for {} shims{}",
                    f.shims_kb / 1024.0,
                    f.n,
                    if f.n == 1000 {
                        String::new()
                    } else {
                        format!(
                            " (×{:.0} = {:.1} MiB for 1,000)",
                            1000.0 / f.n as f64,
                            scaled / 1024.0
                        )
                    }
                ),
            ));
            if f.status_round_ms > 1000.0 {
                fig.notes.push(format!(
                    "The status round took {:.1} s: each shim answers `status` by counting its \
                     live children over every `/proc/PID/stat` (`live_children` in \
                     shim/src/supervisor/shell/mod.rs). Here the {} shims are not in PID \
                     namespaces and share the host's /proc with their drivers and each other, so \
                     one round reads millions of stat files; in a sandbox each shim sees only its \
                     own namespace.",
                    f.status_round_ms / 1000.0,
                    f.n
                ));
            }
            fig.notes.push(
                "The control side is the bench's own tokio client (control-link's `Fleet` has not \
                 landed); it does the same work per connection that a fleet client does."
                    .into(),
            );
        }
        Err(e) => fig = fig.failed(&[t_control, t_shims], &e),
    }
    fig
}
