//! Idle memory: the init's VmRSS and RssAnon while its child sleeps (plain init mode, every
//! anchor the same way), and the shim's in supervisor mode with the echo driver, a live control
//! connection and empty buffers.

use std::ffi::OsString;
use std::time::Duration;

use anyhow::{bail, Result};

use crate::control::Client;
use crate::procs::{children_of, poll, status_kb, Mode, Spec};
use crate::report::{Figure, Target};
use crate::stats::{list, median};

use super::Ctx;

/// Supervisor mode's limit: 2 MiB.
const SUPERVISOR_LIMIT_KB: f64 = 2048.0;

/// How long the init is left alone before its memory is read.
const SETTLE: Duration = Duration::from_millis(300);

/// Both idle memory figures.
pub fn run(ctx: &Ctx) -> Vec<Figure> {
    vec![plain(ctx), supervisor(ctx)]
}

/// `(VmRSS, RssAnon)` in kB of `INIT -- sleep 1000` as PID 1 of a fresh PID namespace.
fn plain_once(init: &[OsString]) -> Result<(f64, f64)> {
    let mut argv = init.to_vec();
    argv.extend(["sleep", "1000"].map(OsString::from));
    let mut proc = Spec::new(Mode::Pid1, argv).start()?;
    let pid = proc.pid;
    let sleeping = poll(Duration::from_secs(10), Duration::from_millis(5), || {
        children_of(pid).into_iter().find(|c| {
            std::fs::read_to_string(format!("/proc/{c}/comm")).is_ok_and(|s| s.trim() == "sleep")
        })
    });
    if sleeping.is_none() {
        bail!("the init's child never became `sleep`");
    }
    std::thread::sleep(SETTLE);
    let rss = status_kb(pid, "VmRSS");
    let anon = status_kb(pid, "RssAnon");
    proc.stop(Duration::from_secs(5));
    match (rss, anon) {
        (Some(r), Some(a)) => Ok((r as f64, a as f64)),
        _ => bail!("cannot read /proc/{pid}/status"),
    }
}

fn plain(ctx: &Ctx) -> Figure {
    let mut fig = Figure::new(
        "idle RSS, plain init mode",
        "Each init runs `sleep 1000` as PID 1 of a fresh PID namespace (`unshare --pid --fork \
         --mount-proc`); 300 ms after its child is `sleep`, VmRSS and RssAnon of the init are read \
         from /proc. Medians over the runs (runs interleaved across inits).",
    );
    let text = "VmRSS ≤ tini-static's in the same run";
    let reps = ctx.pick(5, 2);
    let inits = ctx.bins.inits();
    let mut rss: Vec<Vec<f64>> = vec![Vec::new(); inits.len()];
    let mut anon: Vec<Vec<f64>> = vec![Vec::new(); inits.len()];
    for _ in 0..reps {
        for (i, init) in inits.iter().enumerate() {
            match plain_once(&init.pid1) {
                Ok((r, a)) => {
                    rss[i].push(r);
                    anon[i].push(a);
                }
                Err(e) => fig.notes.push(format!("{}: {e:#}", init.name)),
            }
        }
    }
    fig.columns = vec![
        "VmRSS median (kB)".into(),
        "RssAnon median (kB)".into(),
        "VmRSS runs".into(),
        "RssAnon runs".into(),
    ];
    for (i, init) in inits.iter().enumerate() {
        fig.rows.push((
            init.name.into(),
            vec![
                median(&rss[i]).map_or("—".into(), |v| format!("{v:.0}")),
                median(&anon[i]).map_or("—".into(), |v| format!("{v:.0}")),
                list(&rss[i], 0),
                list(&anon[i], 0),
            ],
        ));
    }
    fig.notes.push(
        "Once its child runs, agent-shim's plain mode drops the page-table entries of its own \
         read-only segments (`madvise(MADV_DONTNEED)`; shim/README.md, “Idle memory in plain \
         mode”): start-up touched code across the whole binary and the kernel maps cached \
         file pages 64 KiB around each fault, but only what the idle loop runs comes back. \
         Its VmRSS is that idle working set; the dropped pages stay in the page cache, shared \
         with every process running the same file. RssAnon (heap, stack, data) is not \
         affected by this and is compared as it is."
            .into(),
    );
    match (median(&rss[0]), median(&rss[1])) {
        (Some(shim), Some(tini)) => {
            fig.targets.push(Target::check(
                text,
                shim <= tini,
                format!("agent-shim {shim:.0} kB vs tini-static {tini:.0} kB"),
            ));
            if shim > tini {
                fig.notes.push(format!(
                    "FAIL: agent-shim's idle VmRSS is {:.0} kB above tini-static's. Its anonymous \
                     memory (RssAnon {:.0} kB vs {:.0} kB) shows how much of the difference is \
                     its own heap and stack; the rest is file-backed pages of its static binary \
                     that its idle loop maps back in, 64 KiB around each page fault \
                     (shim/README.md, “Idle memory in plain mode”).",
                    shim - tini,
                    median(&anon[0]).unwrap_or(0.0),
                    median(&anon[1]).unwrap_or(0.0),
                ));
            }
        }
        _ => fig.targets.push(Target::not_measured(
            text,
            "agent-shim or tini-static could not be measured (see notes)".into(),
        )),
    }
    fig
}

/// `(VmRSS, RssAnon)` in kB of the shim supervising the echo driver, with a live control
/// connection and every event acknowledged.
fn supervisor_once(ctx: &Ctx, n: usize) -> Result<(f64, f64)> {
    let (mut proc, sock) =
        ctx.supervised(&format!("idle-{n}"), Mode::Pid1, &ctx.bins.echo_driver)?;
    let mut client = Client::connect(&sock, Duration::from_secs(10))?;
    client.wait_driver_ready(Duration::from_secs(10))?;
    // Let the driver's start-up log lines arrive and be acknowledged: empty buffers.
    client.drain(SETTLE)?;
    let rss = status_kb(proc.pid, "VmRSS");
    let anon = status_kb(proc.pid, "RssAnon");
    drop(client);
    proc.stop(Duration::from_secs(5));
    let _ = std::fs::remove_file(&sock);
    match (rss, anon) {
        (Some(r), Some(a)) => Ok((r as f64, a as f64)),
        _ => bail!("cannot read the shim's /proc status"),
    }
}

fn supervisor(ctx: &Ctx) -> Figure {
    let mut fig = Figure::new(
        "idle RSS, supervisor mode",
        "agent-shim as PID 1 of a fresh PID namespace with `--control-listen unix:… \
         --control-insecure -- echo-driver`; a control-link client is connected, has \
         received `driver_ready` and acknowledged every event; 300 ms later the shim's VmRSS and RssAnon \
         are read. Medians over the runs.",
    );
    let text = "VmRSS ≤ 2 MiB";
    let reps = ctx.pick(5, 2);
    let mut rss = Vec::new();
    let mut anon = Vec::new();
    for n in 0..reps {
        match supervisor_once(ctx, n) {
            Ok((r, a)) => {
                rss.push(r);
                anon.push(a);
            }
            Err(e) => fig.notes.push(format!("run {n}: {e:#}")),
        }
    }
    fig.columns = vec![
        "VmRSS median (kB)".into(),
        "RssAnon median (kB)".into(),
        "VmRSS runs".into(),
    ];
    fig.rows.push((
        "agent-shim + echo-driver + control connection".into(),
        vec![
            median(&rss).map_or("—".into(), |v| format!("{v:.0}")),
            median(&anon).map_or("—".into(), |v| format!("{v:.0}")),
            list(&rss, 0),
        ],
    ));
    match median(&rss) {
        Some(v) => fig.targets.push(Target::check(
            text,
            v <= SUPERVISOR_LIMIT_KB,
            format!("{v:.0} kB vs limit {SUPERVISOR_LIMIT_KB:.0} kB"),
        )),
        None => fig.targets.push(Target::not_measured(
            text,
            "no run succeeded (see notes)".into(),
        )),
    }
    fig
}
