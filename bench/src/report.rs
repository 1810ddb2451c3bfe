//! What a figure found, and the report that puts every figure side by side.
//!
//! A [`Figure`] holds a table of raw medians (one row per subject: the shim and its
//! baselines), the verdict of each of its targets, notes, and the bars it adds to the chart.
//! [`render`] writes `REPORT.md`; a target that could not be measured is a FAIL whose line
//! says `NOT YET MEASURED` and why — never a made-up number.

use std::fmt::Write as _;

use crate::env::Machine;

/// A target's outcome.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Met.
    Pass,
    /// Not met.
    Fail,
    /// Could not be measured in this run (counts as a FAIL), and why.
    NotMeasured(String),
}

impl Verdict {
    /// Whether the target counts as met.
    pub fn passed(&self) -> bool {
        *self == Verdict::Pass
    }
}

/// One target of a figure and its verdict.
#[derive(Debug, Clone)]
pub struct Target {
    /// The target as the issue states it.
    pub text: String,
    /// The verdict.
    pub verdict: Verdict,
    /// The numbers behind the verdict (measured vs limit).
    pub detail: String,
}

impl Target {
    /// A target measured: PASS when `ok`.
    pub fn check(text: &str, ok: bool, detail: String) -> Target {
        Target {
            text: text.into(),
            verdict: if ok { Verdict::Pass } else { Verdict::Fail },
            detail,
        }
    }

    /// A target that could not be measured.
    pub fn not_measured(text: &str, reason: String) -> Target {
        Target {
            text: text.into(),
            verdict: Verdict::NotMeasured(reason),
            detail: String::new(),
        }
    }

    /// The PASS/FAIL line printed for it.
    pub fn line(&self, figure: &str) -> String {
        match &self.verdict {
            Verdict::Pass => format!("PASS  {figure}: {} — {}", self.text, self.detail),
            Verdict::Fail => format!("FAIL  {figure}: {} — {}", self.text, self.detail),
            Verdict::NotMeasured(why) => {
                format!("FAIL  {figure}: {} — NOT YET MEASURED: {why}", self.text)
            }
        }
    }
}

/// One bar of the chart.
#[derive(Debug, Clone)]
pub struct Bar {
    /// The subject (agent-shim, tini-static, raw forwarder…).
    pub label: String,
    /// Its value, in the chart's unit.
    pub value: f64,
}

/// One panel of the chart: the bars of one figure's metric.
#[derive(Debug, Clone)]
pub struct Chart {
    /// The panel's title.
    pub title: String,
    /// The unit of every bar (`µs`, `ms`, `M events/s`…).
    pub unit: String,
    /// Whether more is better (throughput) or less (latency).
    pub higher_is_better: bool,
    /// The bars, the shim's first.
    pub bars: Vec<Bar>,
}

/// One figure of the benchmark.
#[derive(Debug, Clone, Default)]
pub struct Figure {
    /// Its name, as in the table.
    pub name: String,
    /// How it was measured.
    pub how: String,
    /// Column headers of the table (after the subject column).
    pub columns: Vec<String>,
    /// One row per subject: its name and its cells.
    pub rows: Vec<(String, Vec<String>)>,
    /// The targets and their verdicts.
    pub targets: Vec<Target>,
    /// Notes: why a target failed, what was not measured, caveats.
    pub notes: Vec<String>,
    /// Chart panels.
    pub charts: Vec<Chart>,
}

impl Figure {
    /// An empty figure.
    pub fn new(name: &str, how: &str) -> Figure {
        Figure {
            name: name.into(),
            how: how.into(),
            ..Figure::default()
        }
    }

    /// The figure's measurement failed: every one of `targets` is a FAIL with the error.
    pub fn failed(mut self, targets: &[&str], error: &anyhow::Error) -> Figure {
        let reason = format!("the measurement failed: {error:#}");
        for t in targets {
            self.targets.push(Target::not_measured(t, reason.clone()));
        }
        self
    }

    /// Whether every target passed.
    pub fn passed(&self) -> bool {
        self.targets.iter().all(|t| t.verdict.passed())
    }
}

/// How the run was made, for the report's header.
#[derive(Debug, Clone)]
pub struct RunInfo {
    /// The command line.
    pub command: String,
    /// Quick or full.
    pub quick: bool,
    /// When it started (UTC, ISO 8601).
    pub started: String,
    /// Seconds the run took.
    pub seconds: f64,
    /// `/proc/loadavg` at the end.
    pub load_after: String,
    /// The static shim's size in bytes.
    pub shim_size: u64,
}

fn cell(s: &str) -> String {
    s.replace('|', "\\|")
}

/// Renders `REPORT.md`.
pub fn render(machine: &Machine, run: &RunInfo, figures: &[Figure]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# agent-shim benchmark report\n");
    let _ = writeln!(
        out,
        "Produced by `{}` ({} run), started {} UTC, {:.0} s. Every figure is measured side by \
         side with its baseline in this same run; each target is a ratio or a margin against \
         that baseline, or an absolute limit from the benchmark issue. Chart: \
         [chart.svg](chart.svg).\n",
        run.command,
        if run.quick { "quick" } else { "full" },
        run.started,
        run.seconds
    );
    let _ = writeln!(out, "## Machine\n");
    let _ = writeln!(out, "| | |\n|---|---|");
    let _ = writeln!(out, "| CPU | {} |", cell(&machine.cpu));
    let _ = writeln!(out, "| logical cores | {} |", machine.cores);
    let _ = writeln!(out, "| memory | {} MiB |", machine.mem_mib);
    let _ = writeln!(out, "| kernel | {} |", cell(&machine.kernel));
    let _ = writeln!(out, "| rustc | {} |", cell(&machine.rustc));
    for (name, version) in &machine.anchors {
        let _ = writeln!(out, "| {name} | {} |", cell(version));
    }
    let _ = writeln!(
        out,
        "| load average (1, 5, 15 min) | before: {}; after: {} |",
        machine.load_before, run.load_after
    );
    let busy = machine
        .load_before
        .split_whitespace()
        .next()
        .and_then(|v| v.parse::<f64>().ok())
        .is_some_and(|v| v >= 0.5);
    let _ = writeln!(
        out,
        "\nThe run raises the load average itself: the reap storm makes 10,000 processes runnable \
         at once and the fleets run up to 10,000 processes, so the \"after\" figures overstate the \
         outside load; \"before\" is the load the run started in.{}",
        if busy {
            " This machine was shared with other builds and tests during the run: absolute \
             numbers are noisier than on an idle machine, which is why every target is held \
             against a baseline measured in the same run, with runs interleaved."
        } else {
            ""
        }
    );
    let _ = writeln!(out, "\n## Summary\n");
    let _ = writeln!(
        out,
        "| figure | target | measured | verdict |\n|---|---|---|---|"
    );
    for f in figures {
        for t in &f.targets {
            let (verdict, detail) = match &t.verdict {
                Verdict::Pass => ("PASS", t.detail.clone()),
                Verdict::Fail => ("**FAIL**", t.detail.clone()),
                Verdict::NotMeasured(why) => ("**FAIL**", format!("NOT YET MEASURED: {why}")),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {verdict} |",
                cell(&f.name),
                cell(&t.text),
                cell(&detail)
            );
        }
    }
    let passed: usize = figures
        .iter()
        .map(|f| f.targets.iter().filter(|t| t.verdict.passed()).count())
        .sum();
    let total: usize = figures.iter().map(|f| f.targets.len()).sum();
    let _ = writeln!(out, "\n{passed} of {total} targets pass.\n");
    let _ = writeln!(out, "## Figures\n");
    for f in figures {
        let _ = writeln!(out, "### {}\n", f.name);
        let _ = writeln!(out, "{}\n", f.how);
        if !f.rows.is_empty() {
            let _ = writeln!(out, "| | {} |", f.columns.join(" | "));
            let _ = writeln!(out, "|---|{}", "---|".repeat(f.columns.len()));
            for (subject, cells) in &f.rows {
                let cells: Vec<String> = cells.iter().map(|c| cell(c)).collect();
                let _ = writeln!(out, "| {subject} | {} |", cells.join(" | "));
            }
            let _ = writeln!(out);
        }
        for t in &f.targets {
            let _ = writeln!(out, "- `{}`", t.line(&f.name));
        }
        if !f.notes.is_empty() {
            let _ = writeln!(out);
            for n in &f.notes {
                let _ = writeln!(out, "> {n}\n");
            }
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(
        out,
        "The static binary measured is {} bytes ({:.1} KiB).",
        run.shim_size,
        run.shim_size as f64 / 1024.0
    );
    out
}
