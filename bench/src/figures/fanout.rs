//! Fan-out to observers: the control plane's (a durable consumer's) relay rate with no
//! observer attached and with 16, side by side: what each observer costs the consumer.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use driver_protocol::blocking::{FrameReader, FrameWriter};
use driver_protocol::message::{ControlToShim, Hello, ResumeFrom, Role, ShimToControl};
use driver_protocol::raw;

use crate::control::Client;
use crate::procs::Mode;
use crate::report::{Bar, Chart, Figure};
use crate::stats::{list, median};

use super::relay::EVENT_SIZE;
use super::Ctx;

/// The observers of the second configuration (PROTOCOL.md §8.7; `--max-sessions` 16 with
/// the consumer makes 17 sessions, so the shim runs with a higher limit).
pub const OBSERVERS: usize = 16;

/// One observer: a raw connection that says no `consumer`, subscribes from now and reads
/// every frame until the shim closes it; returns the events and `lagged` frames it read.
fn observer(sock: &Path) -> Result<JoinHandle<Result<(u64, u64)>>> {
    let stream = UnixStream::connect(sock).context("observer connect")?;
    let mut w = FrameWriter::new(stream.try_clone()?);
    let mut r = FrameReader::new(stream);
    let hello = Hello::new(Role::Control, "shim-bench-observer", "0");
    w.send(&ControlToShim::Hello(hello))?;
    w.flush()?;
    match r.read_message::<ShimToControl>()? {
        Some(ShimToControl::Hello(_)) => {}
        other => bail!("observer: expected hello, got {other:?}"),
    }
    w.send(&ControlToShim::ResumeFrom(ResumeFrom::now()))?;
    w.flush()?;
    Ok(std::thread::spawn(move || {
        // Frames are only told apart by their `type` (as a log shipper that forwards them
        // would), so the figure is the shim's cost, not the observers' decoding.
        let (mut events, mut lagged) = (0, 0);
        loop {
            match r.read_frame() {
                Ok(Some(frame)) => match raw::read_head(frame).map(|h| h.type_name) {
                    Ok("event") => events += 1,
                    Ok("lagged") => lagged += 1,
                    _ => {}
                },
                Ok(None) | Err(_) => return Ok((events, lagged)),
            }
        }
    }))
}

/// The consumer's events per second with `observers` attached, and what they read.
fn run_with(ctx: &Ctx, n: usize, events: u64, observers: usize) -> Result<(f64, u64, u64)> {
    let name = format!("fanout-{observers}-{n}");
    let sock = ctx.scratch.join(format!("{name}.sock"));
    let _ = std::fs::remove_file(&sock);
    let argv: Vec<std::ffi::OsString> = vec![
        ctx.bins.shim.clone().into(),
        "--control-listen".into(),
        format!("unix:{}", sock.display()).into(),
        "--control-insecure".into(),
        "--max-sessions".into(),
        (OBSERVERS + 1).to_string().into(),
        "--".into(),
        ctx.bins.bench_driver.clone().into(),
    ];
    let mut proc = crate::procs::Spec::new(Mode::Direct, argv).start()?;
    let result = (|| -> Result<_> {
        let mut client = Client::connect_raw(&sock, Duration::from_secs(10))?;
        client.wait_driver_ready(Duration::from_secs(10))?;
        client.drain(Duration::from_millis(100))?;
        let readers = (0..observers)
            .map(|_| observer(&sock))
            .collect::<Result<Vec<_>>>()?;
        let r = client.relay(&name, events, EVENT_SIZE, Duration::from_secs(300))?;
        drop(client);
        Ok((r, readers))
    })();
    proc.stop(Duration::from_secs(5));
    let _ = std::fs::remove_file(&sock);
    let (r, readers) = result?;
    let (mut seen, mut lagged) = (0, 0);
    for h in readers {
        let (e, l) = h
            .join()
            .map_err(|_| anyhow::anyhow!("observer panicked"))??;
        seen += e;
        lagged += l;
    }
    if r.events != events {
        bail!("the consumer received {} of {events} events", r.events);
    }
    let rate = r.events.saturating_sub(1) as f64 / (r.elapsed_ns as f64 / 1e9);
    Ok((rate, seen, lagged))
}

/// Measures the consumer with 0 and with [`OBSERVERS`] observers, interleaved.
pub fn run(ctx: &Ctx) -> Figure {
    let mut fig = Figure::new(
        "fan-out to observers",
        "As \"event relay\" (raw event stream, 200-byte `custom` events, the shim not PID 1), \
         the control-link client being the durable consumer `control`, with no observer and \
         with 16 observers attached (raw connections without `consumer`, subscribed from now, \
         each read by its own thread as fast as it can, frames told apart by their `type` \
         only). The consumer's rate from its first \
         to its last event; medians over the runs, interleaved. Observers never slow the \
         consumer by design (one that falls behind is told `lagged`); the difference is the \
         shim's cost of writing every event 17 times instead of once.",
    );
    let events: u64 = ctx.pick(1_000_000, 100_000);
    let reps = ctx.pick(3, 1);
    let mut rates: [Vec<f64>; 2] = Default::default();
    for n in 0..reps {
        for (i, observers) in [0, OBSERVERS].into_iter().enumerate() {
            match run_with(ctx, n, events, observers) {
                Ok((rate, seen, lagged)) => {
                    rates[i].push(rate);
                    if observers > 0 {
                        fig.notes.push(format!(
                            "run {n}: the {observers} observers read {seen} events in all \
                             ({:.0}% of {observers} × {events}), {lagged} `lagged`.",
                            100.0 * seen as f64 / (observers as u64 * events) as f64
                        ));
                    }
                }
                Err(e) => fig
                    .notes
                    .push(format!("run {n}, {observers} observers: {e:#}")),
            }
        }
    }
    fig.columns = vec![
        "consumer events/s (median)".into(),
        "runs (M events/s)".into(),
    ];
    let mev = |v: &[f64]| v.iter().map(|x| x / 1e6).collect::<Vec<_>>();
    for (name, v) in [("no observer", &rates[0]), ("16 observers", &rates[1])] {
        fig.rows.push((
            name.into(),
            vec![
                median(v).map_or("—".into(), |x| format!("{x:.0}")),
                list(&mev(v), 3),
            ],
        ));
    }
    if let (Some(a), Some(b)) = (median(&rates[0]), median(&rates[1])) {
        fig.notes.push(format!(
            "With 16 observers the consumer relays {:.0}% of its rate alone.",
            100.0 * b / a
        ));
        fig.charts.push(Chart {
            title: "consumer relay rate, 200-byte events".into(),
            unit: "M events/s".into(),
            higher_is_better: true,
            bars: vec![
                Bar {
                    label: "no observer".into(),
                    value: a / 1e6,
                },
                Bar {
                    label: "16 observers".into(),
                    value: b / 1e6,
                },
            ],
        });
    }
    fig.notes.push(format!("{events} events per run."));
    fig
}
