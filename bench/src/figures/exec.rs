//! Exec overhead: how much longer `INIT -- true` takes than `true`, fork to reap.

use std::ffi::OsString;
use std::process::{Command, Stdio};

use anyhow::{bail, Result};

use crate::clock::now_ns;
use crate::report::{Bar, Chart, Figure, Target};
use crate::stats::median;

use super::{us, Ctx};

fn time_once(argv: &[OsString]) -> Result<f64> {
    let Some((program, args)) = argv.split_first() else {
        bail!("empty command line");
    };
    let t0 = now_ns();
    let status = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    let t = now_ns() - t0;
    if !status.success() {
        bail!("{argv:?} exited {status}");
    }
    Ok(t as f64)
}

/// What this run's exec overhead figure found (for the instruction counts' table).
static LAST: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// This run's exec overhead of agent-shim against tini-static's, as a phrase (or a dash when
/// that figure did not run).
pub fn last_overhead() -> String {
    LAST.lock()
        .ok()
        .and_then(|l| l.clone())
        .unwrap_or_else(|| "— (exec overhead not measured in this run)".into())
}

/// Measures every init's overhead over a bare `true`.
pub fn run(ctx: &Ctx) -> Figure {
    let mut fig = Figure::new(
        "exec overhead",
        "Wall time from spawn to reap of `INIT -- true`, minus that of `true` alone, each init \
         started directly (not PID 1: agent-shim and catatonit make themselves subreapers, tini \
         gets `-s`). Runs are interleaved across the five commands; medians.",
    );
    let text = "within 10% of tini-static's overhead";
    let runs = ctx.pick(400, 60);
    let inits = ctx.bins.inits();
    let mut commands: Vec<(String, Vec<OsString>)> = vec![("true".into(), vec!["true".into()])];
    for init in &inits {
        let mut argv = init.direct.clone();
        argv.push("true".into());
        commands.push((init.name.to_string(), argv));
    }
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); commands.len()];
    for _ in 0..runs {
        for (i, (name, argv)) in commands.iter().enumerate() {
            match time_once(argv) {
                Ok(t) => times[i].push(t),
                Err(e) => {
                    if fig.notes.len() < 8 {
                        fig.notes.push(format!("{name}: {e:#}"));
                    }
                }
            }
        }
    }
    let base = median(&times[0]);
    fig.columns = vec![
        "median wall time (µs)".into(),
        "overhead over `true` (µs)".into(),
        "runs".into(),
    ];
    let mut chart = Chart {
        title: "exec overhead: INIT -- true minus true".into(),
        unit: "µs".into(),
        higher_is_better: false,
        bars: Vec::new(),
    };
    let mut overheads = Vec::new();
    for (i, (name, _)) in commands.iter().enumerate() {
        let m = median(&times[i]);
        let over = m.zip(base).map(|(m, b)| m - b);
        fig.rows.push((
            name.clone(),
            vec![
                m.map_or("—".into(), |v| format!("{:.1}", us(v))),
                if i == 0 {
                    "—".into()
                } else {
                    over.map_or("—".into(), |v| format!("{:.1}", us(v)))
                },
                times[i].len().to_string(),
            ],
        ));
        if i > 0 {
            if let Some(o) = over {
                chart.bars.push(Bar {
                    label: name.clone(),
                    value: us(o),
                });
            }
            overheads.push(over);
        }
    }
    fig.charts.push(chart);
    match (
        overheads.first().copied().flatten(),
        overheads.get(1).copied().flatten(),
    ) {
        (Some(shim), Some(tini)) => {
            let limit = tini.max(0.0) * 1.1;
            if let Ok(mut last) = LAST.lock() {
                *last = Some(format!(
                    "exec overhead: agent-shim +{:.1} µs, {:.2}× tini-static's +{:.1} µs",
                    us(shim),
                    shim / tini,
                    us(tini)
                ));
            }
            fig.targets.push(Target::check(
                text,
                shim <= limit,
                format!(
                    "agent-shim +{:.1} µs vs limit {:.1} µs (tini-static +{:.1} µs)",
                    us(shim),
                    us(limit),
                    us(tini)
                ),
            ));
            if shim > limit {
                fig.notes.push(format!(
                    "FAIL: agent-shim adds {:.1} µs more than tini-static per exec (medians of the \
                     interleaved runs above). This benchmark does not break the difference down; \
                     the static binary is larger than tini-static's (see the size figure).",
                    us(shim - tini)
                ));
            }
        }
        _ => fig.targets.push(Target::not_measured(
            text,
            "agent-shim or tini-static could not be timed (see notes)".into(),
        )),
    }
    fig
}
