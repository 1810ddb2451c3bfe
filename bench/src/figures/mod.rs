//! One module per figure of the benchmark issue. Each `run` measures the shim and its
//! baselines in this same run and returns a [`Figure`] with raw medians and verdicts; it
//! never panics and never invents a number: a measurement that fails is a FAIL with the error.

use std::path::PathBuf;

use crate::env::Bins;
use crate::report::Figure;

pub mod driver;
pub mod exec;
pub mod exec_output;
// sessions
pub mod fanout;
pub mod files;
pub mod fleet;
pub mod instructions;
pub mod metrics;
pub mod reap;
pub mod relay;
pub mod roundtrip;
pub mod rss;
pub mod signals;
pub mod size;

/// What every figure gets.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// The binaries.
    pub bins: Bins,
    /// A short run (seconds) instead of the full one.
    pub quick: bool,
    /// A scratch directory for sockets and FIFOs.
    pub scratch: PathBuf,
}

impl Ctx {
    /// `full` normally, `quick` in a quick run.
    pub fn pick<T>(&self, full: T, quick: T) -> T {
        if self.quick {
            quick
        } else {
            full
        }
    }

    /// Starts the shim in `mode` with an insecure control socket `<scratch>/<name>.sock`
    /// (a stale one removed first), supervising `driver`; the process and the socket.
    pub fn supervised(
        &self,
        name: &str,
        mode: crate::procs::Mode,
        driver: &std::path::Path,
    ) -> anyhow::Result<(crate::procs::Proc, PathBuf)> {
        let sock = self.scratch.join(format!("{name}.sock"));
        let _ = std::fs::remove_file(&sock);
        let argv: Vec<std::ffi::OsString> = vec![
            self.bins.shim.clone().into(),
            "--control-listen".into(),
            format!("unix:{}", sock.display()).into(),
            "--control-insecure".into(),
            "--".into(),
            driver.into(),
        ];
        let proc = crate::procs::Spec::new(mode, argv).start()?;
        Ok((proc, sock))
    }
}

/// Runs every figure in the order (or only those whose group name contains one of
/// `only`, then also printing each one's rows and notes), printing each one's PASS/FAIL
/// lines as it ends.
pub fn all(ctx: &Ctx, only: &[String]) -> Vec<Figure> {
    type Run = fn(&Ctx) -> Vec<Figure>;
    let runs: &[(&str, Run)] = &[
        ("static binary size", |c| vec![size::run(c)]),
        ("idle RSS", rss::run),
        ("exec overhead", |c| vec![exec::run(c)]),
        ("reap storm", |c| vec![reap::run(c)]),
        ("signal forwarding latency", |c| vec![signals::run(c)]),
        ("driver start, crash to ready", driver::run),
        ("event relay", |c| vec![relay::run(c)]),
        ("round trip", |c| vec![roundtrip::run(c)]),
        ("exec output", |c| vec![exec_output::run(c)]),
        ("fleet", |c| vec![fleet::run(c)]),
        // sessions
        ("fan-out to observers", |c| vec![fanout::run(c)]),
        ("files", files::run),
        ("metrics sample", |c| vec![metrics::run(c)]),
        ("instruction counts", |c| vec![instructions::run(c)]),
    ];
    let mut out = Vec::new();
    for (name, run) in runs {
        if !only.is_empty() && !only.iter().any(|o| name.contains(o.as_str())) {
            continue;
        }
        eprintln!("shim-bench: measuring {name}…");
        for fig in run(ctx) {
            for t in &fig.targets {
                println!("{}", t.line(&fig.name));
            }
            if !only.is_empty() {
                // No report is written: its rows and notes are printed instead.
                for (subject, cells) in &fig.rows {
                    println!("      {subject}: {}", cells.join(" | "));
                }
                for note in &fig.notes {
                    println!("      note: {note}");
                }
            }
            out.push(fig);
        }
    }
    out
}

/// Microseconds from nanoseconds.
pub fn us(ns: f64) -> f64 {
    ns / 1_000.0
}

/// Milliseconds from nanoseconds.
pub fn ms(ns: f64) -> f64 {
    ns / 1_000_000.0
}
