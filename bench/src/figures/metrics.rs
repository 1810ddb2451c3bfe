//! The cost of a `metrics` reading: wall time and instructions per sample, each against a
//! `ping` (the same round trip without a reading) in the same run.

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context as _, Result};

use crate::control::Client;
use crate::procs::{Mode, Spec};
use crate::report::{Figure, Target};
use crate::stats::percentile;

use super::{us, Ctx};

/// Requests left out at the start of each timed run.
const WARMUP: usize = 20;

/// A reading may cost at most this many instructions more than a ping.
const MAX_INSTRUCTIONS: f64 = 2_000_000.0;

/// Wall times (ns) of `count` requests to the shim as PID 1 with the bench driver.
fn timed(ctx: &Ctx, metrics: bool, count: usize) -> Result<Vec<f64>> {
    let name = if metrics { "metrics" } else { "metrics-ping" };
    let (mut proc, sock) = ctx.supervised(name, Mode::Pid1, &ctx.bins.bench_driver)?;
    let res = (|| {
        let mut client = Client::connect(&sock, Duration::from_secs(10))?;
        client.wait_driver_ready(Duration::from_secs(10))?;
        let t = client.requests(count + WARMUP, metrics, Duration::from_secs(60))?;
        client.close();
        Ok(t.into_iter().skip(WARMUP).map(|n| n as f64).collect())
    })();
    proc.stop(Duration::from_secs(5));
    let _ = std::fs::remove_file(&sock);
    res
}

/// The shim's instructions (callgrind's `summary`) over a run of `count` requests, the shim
/// as PID 1 under valgrind.
fn instructions(ctx: &Ctx, metrics: bool, count: usize) -> Result<u64> {
    let tag = if metrics { "metrics" } else { "ping" };
    let out = ctx.scratch.join(format!("callgrind-{tag}.out"));
    let sock = ctx.scratch.join(format!("cg-{tag}.sock"));
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(&out);
    let argv: Vec<OsString> = vec![
        "valgrind".into(),
        "--tool=callgrind".into(),
        format!("--callgrind-out-file={}", out.display()).into(),
        ctx.bins.shim.clone().into(),
        "--control-listen".into(),
        format!("unix:{}", sock.display()).into(),
        "--control-insecure".into(),
        "--".into(),
        ctx.bins.bench_driver.clone().into(),
    ];
    let mut proc = Spec::new(Mode::Pid1, argv).start()?;
    let res = (|| {
        let mut client = Client::connect(&sock, Duration::from_secs(60))?;
        client.wait_driver_ready(Duration::from_secs(60))?;
        client.requests(count, metrics, Duration::from_secs(300))?;
        client.close();
        Ok::<_, anyhow::Error>(())
    })();
    // SIGTERM: the shim stops, and valgrind writes the profile.
    proc.stop(Duration::from_secs(30));
    let _ = std::fs::remove_file(&sock);
    res?;
    summary(&out)
}

/// The `summary:` (or `totals:`) instruction count of a callgrind output file.
fn summary(path: &Path) -> Result<u64> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let _ = std::fs::remove_file(path);
    text.lines()
        .find_map(|l| {
            l.strip_prefix("summary:")
                .or_else(|| l.strip_prefix("totals:"))
        })
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow!("no summary line in {}", path.display()))
}

/// Wall time per reading (p50, p99) against a ping, and instructions per reading.
pub fn run(ctx: &Ctx) -> Figure {
    let mut fig = Figure::new(
        "metrics sample",
        "The shim as PID 1 of a fresh PID namespace with the bench driver; a control-link client \
         sends `metrics` requests one at a time (a reading: the cgroup's files by `pread`, \
         `fstatfs` of the workspace, one pass over `/proc`), and, in a separate shim, `ping` \
         requests (the same round trip without a reading). Wall time p50/p99 of each. \
         Instructions: the shim under `valgrind --tool=callgrind`, N metrics against N pings; \
         (Ir(metrics) − Ir(pings)) ÷ N is what one reading costs the shim, encoding its reply \
         included.",
    );
    let count = ctx.pick(2000, 200);
    fig.columns = vec!["samples".into(), "p50 (µs)".into(), "p99 (µs)".into()];
    for (name, metrics) in [("metrics", true), ("ping (baseline)", false)] {
        match timed(ctx, metrics, count) {
            Ok(v) => fig.rows.push((
                name.into(),
                vec![
                    v.len().to_string(),
                    percentile(&v, 50.0).map_or("—".into(), |x| format!("{:.1}", us(x))),
                    percentile(&v, 99.0).map_or("—".into(), |x| format!("{:.1}", us(x))),
                ],
            )),
            Err(e) => fig.notes.push(format!("{name}: {e:#}")),
        }
    }
    let text = "≤ 2,000,000 instructions per reading";
    let n = ctx.pick(200, 50);
    match (instructions(ctx, true, n), instructions(ctx, false, n)) {
        (Ok(m), Ok(p)) => {
            let per = (m as f64 - p as f64) / n as f64;
            fig.notes.push(format!(
                "callgrind: {m} instructions with {n} readings, {p} with {n} pings: {per:.0} per reading"
            ));
            fig.targets.push(Target::check(
                text,
                per <= MAX_INSTRUCTIONS,
                format!("{per:.0} instructions per reading"),
            ));
        }
        (Err(e), _) | (_, Err(e)) => fig.targets.push(Target::not_measured(
            text,
            format!("callgrind run failed (is valgrind installed?): {e:#}"),
        )),
    }
    fig
}
