//! Signal forwarding latency: `kill(PID 1)` from outside the namespace → the child's handler.

use std::ffi::OsString;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::clock::now_ns;
use crate::procs::{fifo, read_exact_within, Mode, Spec};
use crate::report::{Bar, Chart, Figure, Target};
use crate::stats::{list, median, percentile};

use super::{us, Ctx};

/// Signals per run left out at the start (cold caches).
const WARMUP: usize = 20;

/// Latencies in ns of `count` SIGUSR1s sent to `init` (PID 1 of a fresh namespace) and
/// received by the probe's handler.
fn once(ctx: &Ctx, init: &[OsString], count: usize, tag: &str) -> Result<Vec<f64>> {
    let (path, file) = fifo(&ctx.scratch, &format!("sig-{tag}.fifo"))?;
    let mut argv = init.to_vec();
    argv.push(ctx.bins.probe.clone().into());
    argv.push("signals".into());
    argv.push(path.clone().into());
    let mut proc = Spec::new(Mode::Pid1, argv).start()?;
    let mut rec = [0u8; 8];
    if !read_exact_within(&file, &mut rec, Duration::from_secs(10))? || rec != [0; 8] {
        bail!("the probe did not report ready");
    }
    std::thread::sleep(Duration::from_millis(20));
    let mut out = Vec::with_capacity(count);
    for i in 0..count + WARMUP {
        let t0 = now_ns();
        proc.signal(libc::SIGUSR1)?;
        if !read_exact_within(&file, &mut rec, Duration::from_secs(5))
            .context("reading the probe's record")?
        {
            bail!("signal {i}: no delivery within 5 s");
        }
        let t = u64::from_ne_bytes(rec);
        if i >= WARMUP {
            out.push(t.saturating_sub(t0) as f64);
        }
    }
    proc.stop(Duration::from_secs(5));
    let _ = std::fs::remove_file(&path);
    Ok(out)
}

/// Measures every init.
pub fn run(ctx: &Ctx) -> Figure {
    let mut fig = Figure::new(
        "signal forwarding latency",
        "Each init runs, as PID 1 of a fresh PID namespace, a probe whose SIGUSR1 handler writes \
         the CLOCK_MONOTONIC instant to a FIFO. The bench sends SIGUSR1 to the init's pid from \
         outside the namespace, one at a time, and subtracts the send instant. p50/p99 over all \
         signals of all runs (runs interleaved across inits; 20 warm-up signals per run dropped).",
    );
    let text = "p50 ≤ 1.2 × tini-static's";
    let per_run = 1000;
    let reps = ctx.pick(5, 1);
    let inits = ctx.bins.inits();
    let mut lat: Vec<Vec<f64>> = vec![Vec::new(); inits.len()];
    let mut run_medians: Vec<Vec<f64>> = vec![Vec::new(); inits.len()];
    for r in 0..reps {
        for (i, init) in inits.iter().enumerate() {
            match once(ctx, &init.pid1, per_run, &format!("{i}-{r}")) {
                Ok(v) => {
                    if let Some(m) = median(&v) {
                        run_medians[i].push(us(m));
                    }
                    lat[i].extend(v);
                }
                Err(e) => fig.notes.push(format!("{}: {e:#}", init.name)),
            }
        }
    }
    fig.columns = vec![
        "signals".into(),
        "p50 (µs)".into(),
        "p99 (µs)".into(),
        "per-run medians (µs)".into(),
    ];
    let mut p50s = Vec::new();
    let mut chart50 = Chart {
        title: "signal forwarding latency, p50".into(),
        unit: "µs".into(),
        higher_is_better: false,
        bars: Vec::new(),
    };
    let mut chart99 = Chart {
        title: "signal forwarding latency, p99".into(),
        unit: "µs".into(),
        higher_is_better: false,
        bars: Vec::new(),
    };
    for (i, init) in inits.iter().enumerate() {
        let p50 = percentile(&lat[i], 50.0).map(us);
        let p99 = percentile(&lat[i], 99.0).map(us);
        fig.rows.push((
            init.name.into(),
            vec![
                lat[i].len().to_string(),
                p50.map_or("—".into(), |v| format!("{v:.1}")),
                p99.map_or("—".into(), |v| format!("{v:.1}")),
                list(&run_medians[i], 1),
            ],
        ));
        if let (Some(a), Some(b)) = (p50, p99) {
            chart50.bars.push(Bar {
                label: init.name.into(),
                value: a,
            });
            chart99.bars.push(Bar {
                label: init.name.into(),
                value: b,
            });
        }
        p50s.push(p50);
    }
    fig.charts.push(chart50);
    fig.charts.push(chart99);
    match (
        p50s.first().copied().flatten(),
        p50s.get(1).copied().flatten(),
    ) {
        (Some(shim), Some(tini)) => {
            let limit = 1.2 * tini;
            fig.targets.push(Target::check(
                text,
                shim <= limit,
                format!(
                    "agent-shim p50 {shim:.1} µs vs limit {limit:.1} µs (tini-static {tini:.1} µs)"
                ),
            ));
            if shim > limit {
                fig.notes.push(
                    "FAIL: agent-shim forwards slower than 1.2 × tini-static at the median (see \
                     the per-run medians above). This benchmark does not profile where the time \
                     goes."
                        .into(),
                );
            }
        }
        _ => fig.targets.push(Target::not_measured(
            text,
            "agent-shim or tini-static could not be measured (see notes)".into(),
        )),
    }
    fig
}
