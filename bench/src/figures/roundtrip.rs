//! Round trip: control → shim → driver → shim → control with a 64-byte payload, against a raw
//! frame round trip over socketpairs in the same run.

use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use driver_protocol::blocking::{FrameReader, FrameWriter};
use driver_protocol::message::{Custom, Event, Message};

use crate::clock::now_ns;
use crate::control::Client;
use crate::procs::Mode;
use crate::report::{Bar, Chart, Figure, Target};
use crate::stats::percentile;

use super::{us, Ctx};

/// The payload size the issue asks for.
const PAYLOAD: usize = 64;

/// Round trips left out at the start of each run.
const WARMUP: usize = 50;

/// The allowed margin over the raw round trip: 25 µs.
const MARGIN_US: f64 = 25.0;

/// Copies frames from `from` to `to`, one write per frame, until `from` ends; then shuts
/// down `to`'s write side so the next hop ends too.
fn hop(from: UnixStream, to: UnixStream) -> Result<()> {
    let mut r = FrameReader::new(from);
    let mut w = FrameWriter::new(to);
    let res = (|| -> Result<()> {
        while let Some(frame) = r.read_frame()? {
            w.write_frame(frame)?;
            w.flush()?;
        }
        Ok(())
    })();
    let _ = w.get_ref().shutdown(std::net::Shutdown::Write);
    res
}

/// Round-trip times (ns) of `count` frames: control ↔ (forwarder ↔)? echo.
fn raw_run(count: usize, forwarder: bool) -> Result<Vec<f64>> {
    let body = Event::Custom(Custom {
        task_id: None,
        kind: "rt".into(),
        data: rmpv::Value::Binary(vec![7; PAYLOAD]),
    })
    .to_body()?;
    let (control, far) = UnixStream::pair()?;
    let mut threads = Vec::new();
    let echo_end = if forwarder {
        let (near, echo_end) = UnixStream::pair()?;
        let (a, b) = (far.try_clone()?, near.try_clone()?);
        threads.push(std::thread::spawn(move || hop(a, b)));
        threads.push(std::thread::spawn(move || hop(near, far)));
        echo_end
    } else {
        far
    };
    let echo_out = echo_end.try_clone()?;
    threads.push(std::thread::spawn(move || hop(echo_end, echo_out)));
    control.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut w = FrameWriter::new(control.try_clone()?);
    let mut r = FrameReader::new(control.try_clone()?);
    let mut out = Vec::with_capacity(count);
    for i in 0..count + WARMUP {
        let t0 = now_ns();
        w.write_frame(&body)?;
        w.flush()?;
        match r.read_frame()? {
            Some(f) if f == &body[..] => {}
            other => bail!("round trip {i}: got {other:?}"),
        }
        if i >= WARMUP {
            out.push((now_ns() - t0) as f64);
        }
    }
    control.shutdown(std::net::Shutdown::Both)?;
    drop((w, r, control));
    for t in threads {
        // A hop ends with an error when its peer is shut down first: that is the normal end.
        let _ = t.join().map_err(|_| anyhow!("a hop thread panicked"))?;
    }
    Ok(out)
}

/// Round-trip times (ns) through the shim and the bench driver.
fn shim_run(ctx: &Ctx, n: usize, count: usize) -> Result<Vec<f64>> {
    let (mut proc, sock) =
        ctx.supervised(&format!("rt-{n}"), Mode::Direct, &ctx.bins.bench_driver)?;
    let mut client = Client::connect(&sock, Duration::from_secs(10))?;
    client.wait_driver_ready(Duration::from_secs(10))?;
    client.drain(Duration::from_millis(100))?;
    let payload = [7u8; PAYLOAD];
    let mut out = Vec::with_capacity(count);
    for i in 0..count + WARMUP {
        let t = client.round_trip(&format!("rt-{n}-{i}"), &payload, Duration::from_secs(10))?;
        if i >= WARMUP {
            out.push(t as f64);
        }
    }
    drop(client);
    proc.stop(Duration::from_secs(5));
    let _ = std::fs::remove_file(&sock);
    Ok(out)
}

/// Measures the shim and the raw round trips, interleaved.
pub fn run(ctx: &Ctx) -> Figure {
    let mut fig = Figure::new(
        "round trip",
        "A control-link `Client` sends `submit_task` with a 64-byte `bin` input; the shim queues it and \
         hands the `task` to the bench driver, which ends it at once with `task_done{output: the \
         payload}`; time until the client's event stream hands out that `task_done` event (the `ok` reply and the \
         `task_accepted` event arrive on the way). One request at a time. Baseline (the target's \
         \"raw\"): a frame with a 64-byte payload from a control thread through a raw forwarder \
         thread to an echo thread and back, over socketpairs, one write per frame: the same \
         topology without the shim. Also shown: a direct socketpair ping-pong. p50/p99 over all \
         samples; runs interleaved.",
    );
    let text = "p50 ≤ raw + 25 µs";
    let per_run = ctx.pick(2000, 300);
    let reps = ctx.pick(5, 1);
    let mut shim = Vec::new();
    let mut fwd = Vec::new();
    let mut direct = Vec::new();
    for n in 0..reps {
        match raw_run(per_run, true) {
            Ok(v) => fwd.extend(v),
            Err(e) => fig.notes.push(format!("raw forwarder run {n}: {e:#}")),
        }
        match raw_run(per_run, false) {
            Ok(v) => direct.extend(v),
            Err(e) => fig.notes.push(format!("direct run {n}: {e:#}")),
        }
        match shim_run(ctx, n, per_run) {
            Ok(v) => shim.extend(v),
            Err(e) => fig.notes.push(format!("shim run {n}: {e:#}")),
        }
    }
    fig.columns = vec!["samples".into(), "p50 (µs)".into(), "p99 (µs)".into()];
    let mut c50 = Chart {
        title: "round trip, 64-byte payload, p50".into(),
        unit: "µs".into(),
        higher_is_better: false,
        bars: Vec::new(),
    };
    let mut c99 = Chart {
        title: "round trip, 64-byte payload, p99".into(),
        unit: "µs".into(),
        higher_is_better: false,
        bars: Vec::new(),
    };
    for (name, v) in [
        ("agent-shim + bench driver", &shim),
        ("raw forwarder (baseline)", &fwd),
        ("direct socketpair ping-pong", &direct),
    ] {
        let p50 = percentile(v, 50.0).map(us);
        let p99 = percentile(v, 99.0).map(us);
        fig.rows.push((
            name.into(),
            vec![
                v.len().to_string(),
                p50.map_or("—".into(), |x| format!("{x:.1}")),
                p99.map_or("—".into(), |x| format!("{x:.1}")),
            ],
        ));
        if let (Some(a), Some(b)) = (p50, p99) {
            c50.bars.push(Bar {
                label: name.into(),
                value: a,
            });
            c99.bars.push(Bar {
                label: name.into(),
                value: b,
            });
        }
    }
    fig.charts.push(c50);
    fig.charts.push(c99);
    match (percentile(&shim, 50.0), percentile(&fwd, 50.0)) {
        (Some(s), Some(r)) => {
            let (s, r) = (us(s), us(r));
            fig.targets.push(Target::check(
                text,
                s <= r + MARGIN_US,
                format!(
                    "agent-shim p50 {s:.1} µs vs limit {:.1} µs (raw {r:.1} µs)",
                    r + MARGIN_US
                ),
            ));
        }
        _ => fig.targets.push(Target::not_measured(
            text,
            "the shim or the raw round trip could not be measured (see notes)".into(),
        )),
    }
    fig
}
