//! shim-bench: measures agent-shim against tini, dumb-init, catatonit and the raw socket in
//! one run, prints a PASS/FAIL line per target, writes `REPORT.md` and `chart.svg`, and exits
//! non-zero when any target fails.
//!
//! ```sh
//! cargo run --release -p agent-shim-bench -- [--quick] [--out bench/] [--only NAME]…
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use agent_shim_bench::figures::{self, Ctx};
use agent_shim_bench::{env, report, svg};
use anyhow::{bail, Context, Result};

const USAGE: &str = "usage: shim-bench [--quick] [--out DIR] [--only NAME]...
  --quick      a short run (seconds), e.g. for CI
  --out DIR    where REPORT.md and chart.svg go (default: the bench/ folder of the workspace)
  --only NAME  run only the figures whose name contains NAME (repeatable); no report is
               written, their rows and notes are printed";

struct Args {
    quick: bool,
    out: PathBuf,
    only: Vec<String>,
}

fn parse() -> Result<Option<Args>> {
    let mut args = Args {
        quick: false,
        out: env::workspace_root().join("bench"),
        only: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => args.quick = true,
            "--out" => args.out = it.next().context("--out needs a directory")?.into(),
            "--only" => args.only.push(it.next().context("--only needs a name")?),
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            "fleet-control" => {
                let dir: PathBuf = it.next().context("fleet-control DIR N")?.into();
                let n: usize = it.next().context("fleet-control DIR N")?.parse()?;
                figures::fleet::control_main(&dir, n)?;
                return Ok(None);
            }
            "link-client" => {
                let sock: PathBuf = it.next().context("link-client SOCK N")?.into();
                let n: u64 = it.next().context("link-client SOCK N")?.parse()?;
                figures::instructions::link_client_main(&sock, n)?;
                return Ok(None);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(Some(args))
}

/// `YYYY-MM-DD HH:MM` (UTC) of a Unix time.
fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60
    )
}

fn run(args: Args) -> Result<bool> {
    let started = Instant::now();
    let when = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let bins = env::prepare()?;
    let machine = env::machine(&bins);
    let scratch = std::env::temp_dir().join(format!("shim-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let ctx = Ctx {
        bins,
        quick: args.quick,
        scratch: scratch.clone(),
    };
    let figs = figures::all(&ctx, &args.only);
    let _ = std::fs::remove_dir_all(&scratch);
    let passed = figs.iter().all(|f| f.passed());
    let total: usize = figs.iter().map(|f| f.targets.len()).sum();
    let ok: usize = figs
        .iter()
        .map(|f| f.targets.iter().filter(|t| t.verdict.passed()).count())
        .sum();
    println!("{ok} passed, {} failed", total - ok);
    if !args.only.is_empty() {
        eprintln!("shim-bench: --only given: no report written");
        return Ok(passed);
    }
    let info = report::RunInfo {
        command: format!(
            "cargo run --release -p agent-shim-bench --{}",
            if args.quick { " --quick" } else { "" }
        ),
        quick: args.quick,
        started: utc(when),
        seconds: started.elapsed().as_secs_f64(),
        load_after: env::loadavg(),
        shim_size: figures::size::shim_size(&ctx),
    };
    std::fs::create_dir_all(&args.out)?;
    let md = report::render(&machine, &info, &figs);
    let charts: Vec<report::Chart> = figs.iter().flat_map(|f| f.charts.iter().cloned()).collect();
    let title = format!(
        "agent-shim vs tini-static, dumb-init, catatonit and raw sockets ({}, {} cores)",
        machine.cpu, machine.cores
    );
    let chart = svg::render(&title, &charts);
    std::fs::write(args.out.join("REPORT.md"), md)?;
    std::fs::write(args.out.join("chart.svg"), chart)?;
    eprintln!(
        "shim-bench: wrote {} and {}",
        args.out.join("REPORT.md").display(),
        args.out.join("chart.svg").display()
    );
    Ok(passed)
}

fn main() -> ExitCode {
    match parse() {
        Ok(None) => ExitCode::SUCCESS,
        Ok(Some(args)) => match run(args) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(e) => {
                eprintln!("shim-bench: {e:#}");
                ExitCode::from(2)
            }
        },
        Err(e) => {
            eprintln!("shim-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}
