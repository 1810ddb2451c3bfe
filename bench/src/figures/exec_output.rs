//! Exec output: a tool writing 1 GiB to stdout through the shim, read by the control side.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::clock::now_ns;
use crate::control::Client;
use crate::procs::Mode;
use crate::report::{Bar, Chart, Figure, Target};
use crate::stats::{list, median};

use super::Ctx;

/// The tool's writes: 128 KiB each, as large as the shim's reads, so the producer is not what
/// caps the figure (`head` writes 4 KiB at a time).
const BLOCK: u64 = 128 << 10;

/// The tool that writes `bytes` (a multiple of [`BLOCK`]) of zeros to stdout, in writes of
/// [`BLOCK`]: `dd if=/dev/zero bs=128K count=N status=none`.
fn producer(bytes: u64) -> [String; 5] {
    [
        "dd".into(),
        "if=/dev/zero".into(),
        format!("bs={BLOCK}"),
        format!("count={}", bytes / BLOCK),
        "status=none".into(),
    ]
}

/// The producer started with its stdout on a pipe.
fn spawn_producer(bytes: u64) -> Result<std::process::Child> {
    let [cmd, args @ ..] = producer(bytes);
    Command::new(cmd)
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .context("spawn dd")
}

/// Bytes per second of the producer read straight from a pipe.
fn pipe_run(bytes: u64) -> Result<f64> {
    let t0 = now_ns();
    let mut child = spawn_producer(bytes)?;
    let mut out = child.stdout.take().context("no stdout")?;
    let mut buf = vec![0u8; 1 << 16];
    let mut got = 0u64;
    loop {
        let n = out.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    child.wait()?;
    if got != bytes {
        bail!("read {got} of {bytes} bytes");
    }
    Ok(bytes as f64 / ((now_ns() - t0) as f64 / 1e9))
}

/// Bytes per second of the producer copied by a minimal forwarder thread from
/// its pipe to a socketpair (reads of 128 KiB, each written whole), read from the socket by
/// the bench: the raw pipe-to-socket copy the shim is held against.
fn pipe_socket_run(bytes: u64) -> Result<f64> {
    use std::io::Write as _;
    use std::os::unix::net::UnixStream;
    let t0 = now_ns();
    let mut child = spawn_producer(bytes)?;
    let mut out = child.stdout.take().context("no stdout")?;
    let (mut tx, mut rx) = UnixStream::pair()?;
    rx.set_read_timeout(Some(Duration::from_secs(60)))?;
    let copier = std::thread::spawn(move || -> std::io::Result<()> {
        let mut buf = vec![0u8; 128 << 10];
        loop {
            let n = out.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            tx.write_all(&buf[..n])?;
        }
    });
    let mut buf = vec![0u8; 1 << 16];
    let mut got = 0u64;
    loop {
        let n = rx.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    let elapsed = now_ns() - t0;
    child.wait()?;
    copier
        .join()
        .map_err(|_| anyhow::anyhow!("the copier panicked"))??;
    if got != bytes {
        bail!("read {got} of {bytes} bytes");
    }
    Ok(bytes as f64 / (elapsed as f64 / 1e9))
}

/// Bytes per second through the shim, read by control-link.
fn shim_run(ctx: &Ctx, n: usize, bytes: u64) -> Result<f64> {
    let (mut proc, sock) =
        ctx.supervised(&format!("exec-{n}"), Mode::Direct, &ctx.bins.bench_driver)?;
    let result = (|| -> Result<f64> {
        let mut client = Client::connect(&sock, Duration::from_secs(10))?;
        client.wait_driver_ready(Duration::from_secs(10))?;
        let argv = producer(bytes);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let run = client.exec_output(&argv, Duration::from_secs(300))?;
        client.close();
        if run.bytes != bytes {
            bail!("received {} of {bytes} bytes of output", run.bytes);
        }
        Ok(bytes as f64 / (run.elapsed_ns as f64 / 1e9))
    })();
    proc.stop(Duration::from_secs(5));
    let _ = std::fs::remove_file(&sock);
    result
}

/// Measures the shim (when it can exec) and a bare pipe.
pub fn run(ctx: &Ctx) -> Figure {
    let bytes: u64 = ctx.pick(1 << 30, 64 << 20);
    let mut fig = Figure::new(
        "exec output",
        "A control-link `Client` sends `exec{argv: [dd, if=/dev/zero, bs=131072, count=8192, \
         status=none]}` (1 GiB in writes of 128 KiB) to agent-shim \
         (supervising the bench driver) and reads every `exec_output` event from its event \
         stream until `exec_exit` (acknowledged in control-link's batches); bytes / time from \
         the request to `exec_exit`. Baseline: the same `dd` copied by a minimal forwarder \
         thread from its pipe to a socketpair (128 KiB reads, each written whole) and read \
         from the socket by the bench; for scale, the same `dd` read straight from its \
         pipe. Runs interleaved; medians.",
    );
    let text = "≥ 2.5 GB/s";
    let t_rel = "≥ 50% of a raw pipe-to-socket copy";
    let reps = ctx.pick(3, 1);
    let mut shim = Vec::new();
    let mut pipe = Vec::new();
    let mut sock = Vec::new();
    for n in 0..reps {
        match pipe_socket_run(bytes) {
            Ok(v) => sock.push(v / 1e9),
            Err(e) => fig.notes.push(format!("pipe-to-socket run {n}: {e:#}")),
        }
        match pipe_run(bytes) {
            Ok(v) => pipe.push(v / 1e9),
            Err(e) => fig.notes.push(format!("pipe run {n}: {e:#}")),
        }
        match shim_run(ctx, n, bytes) {
            Ok(v) => shim.push(v / 1e9),
            Err(e) => fig.notes.push(format!("shim run {n}: {e:#}")),
        }
    }
    fig.columns = vec!["GB/s (median)".into(), "runs (GB/s)".into()];
    fig.rows.push((
        "agent-shim → control-link".into(),
        vec![
            median(&shim).map_or("not measured".into(), |v| format!("{v:.2}")),
            list(&shim, 2),
        ],
    ));
    fig.rows.push((
        "raw pipe-to-socket copy (baseline)".into(),
        vec![
            median(&sock).map_or("—".into(), |v| format!("{v:.2}")),
            list(&sock, 2),
        ],
    ));
    fig.rows.push((
        "bare pipe (for scale)".into(),
        vec![
            median(&pipe).map_or("—".into(), |v| format!("{v:.2}")),
            list(&pipe, 2),
        ],
    ));
    fig.notes.push(format!("{bytes} bytes per run."));
    let mut chart = Chart {
        title: "exec output, 1 GiB".into(),
        unit: "GB/s".into(),
        higher_is_better: true,
        bars: Vec::new(),
    };
    if let Some(v) = median(&shim) {
        chart.bars.push(Bar {
            label: "agent-shim".into(),
            value: v,
        });
    }
    if let Some(v) = median(&sock) {
        chart.bars.push(Bar {
            label: "pipe to socket".into(),
            value: v,
        });
    }
    if let Some(v) = median(&pipe) {
        chart.bars.push(Bar {
            label: "bare pipe".into(),
            value: v,
        });
    }
    fig.charts.push(chart);
    if median(&shim).is_some_and(|v| v < 2.5) {
        fig.notes.push(
            "FAIL: the output still crosses more copies than a pipe, with three processes \
             (`dd`, the shim, the client) on the machine's cores instead of two. The shim \
             reads each chunk (at most 128 KiB) straight into the replay buffer, behind room \
             for the frame's head, writes the head in front of it, and writes such large \
             frames to the socket as they are; control-link hands each large chunk out as a \
             slice of the frame it came in. What remains in the shim is the copy of each \
             chunk's last 64 KiB into the exec's retained tail (`--exec-retain`) and the \
             kernel's copies; the bare pipe is the ceiling of every row."
                .into(),
        );
    }
    match median(&shim) {
        Some(v) => fig
            .targets
            .push(Target::check(text, v >= 2.5, format!("{v:.2} GB/s"))),
        None => fig.targets.push(Target::not_measured(
            text,
            "no shim run succeeded (see notes)".into(),
        )),
    }
    match (median(&shim), median(&sock)) {
        (Some(v), Some(r)) => fig.targets.push(Target::check(
            t_rel,
            v >= 0.5 * r,
            format!(
                "{:.0}% of the pipe-to-socket copy's {r:.2} GB/s",
                100.0 * v / r
            ),
        )),
        _ => fig.targets.push(Target::not_measured(
            t_rel,
            "the shim or the pipe-to-socket copy could not be measured (see notes)".into(),
        )),
    }
    fig
}
