//! Reap storm: how long an init takes to reap 10,000 orphaned grandchildren that exit at once.

use std::ffi::OsString;
use std::io::Read;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::procs::{Mode, Spec};
use crate::report::{Bar, Chart, Figure, Target};
use crate::stats::{list, median};

use super::{ms, Ctx};

/// Nanoseconds until all `n` orphans were reaped by `init` (PID 1 of a fresh namespace).
fn once(ctx: &Ctx, init: &[OsString], n: usize) -> Result<f64> {
    let mut argv = init.to_vec();
    argv.push(ctx.bins.probe.clone().into());
    argv.push("storm".into());
    argv.push(n.to_string().into());
    let mut spec = Spec::new(Mode::Pid1, argv);
    spec.stdout = true;
    let mut proc = spec.start()?;
    let mut stdout = proc
        .child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("no stdout"))?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    proc.wait_timeout(Duration::from_secs(180))
        .context("the storm did not end")?;
    let out = reader
        .join()
        .map_err(|_| anyhow!("the reader thread panicked"))?;
    let mut words = out.split_whitespace();
    let (Some(ns), Some(count)) = (words.next(), words.next()) else {
        bail!("the probe printed {out:?}");
    };
    let ns: f64 = ns.parse().context("elapsed")?;
    let count: usize = count.parse().context("count")?;
    if count != n {
        bail!("only {count} of {n} orphans were forked");
    }
    Ok(ns)
}

/// Measures every init.
pub fn run(ctx: &Ctx) -> Figure {
    let n = 10_000;
    let mut fig = Figure::new(
        "reap storm",
        "Each init runs, as PID 1 of a fresh PID namespace, a probe that forks an intermediate \
         process which forks 10,000 grandchildren blocked on a pipe and exits: they are orphans \
         of the init. The probe closes the pipe (all exit at once) and polls `kill(pid, 0)` until \
         every one is gone, i.e. reaped by the init. Time from the release to the last reap; \
         medians over the runs, interleaved across inits.",
    );
    let text = "≤ 1.1 × tini-static's time";
    let reps = ctx.pick(9, 1);
    let inits = ctx.bins.inits();
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); inits.len()];
    for _ in 0..reps {
        for (i, init) in inits.iter().enumerate() {
            match once(ctx, &init.pid1, n) {
                Ok(t) => times[i].push(ms(t)),
                Err(e) => fig.notes.push(format!("{}: {e:#}", init.name)),
            }
        }
    }
    fig.columns = vec!["median (ms)".into(), "runs (ms)".into()];
    let mut chart = Chart {
        title: "reap storm: 10,000 orphans".into(),
        unit: "ms".into(),
        higher_is_better: false,
        bars: Vec::new(),
    };
    for (i, init) in inits.iter().enumerate() {
        let m = median(&times[i]);
        fig.rows.push((
            init.name.into(),
            vec![
                m.map_or("—".into(), |v| format!("{v:.1}")),
                list(&times[i], 1),
            ],
        ));
        if let Some(v) = m {
            chart.bars.push(Bar {
                label: init.name.into(),
                value: v,
            });
        }
    }
    fig.charts.push(chart);
    match (median(&times[0]), median(&times[1])) {
        (Some(shim), Some(tini)) => {
            let limit = 1.1 * tini;
            fig.targets.push(Target::check(
                text,
                shim <= limit,
                format!(
                    "agent-shim {shim:.1} ms vs limit {limit:.1} ms (tini-static {tini:.1} ms)"
                ),
            ));
            if shim > limit {
                fig.notes.push(
                    "FAIL: agent-shim took longer than 1.1 × tini-static to reap the storm \
                     (medians of the runs above; a storm makes 10,000 processes runnable at once, \
                     so single runs vary widely on a shared machine). This benchmark does not \
                     profile where the time goes."
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
