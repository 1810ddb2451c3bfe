//! Fleet: one control process holding live control connections to 1,000 shims (each
//! supervising the echo driver); the control side's RSS and CPU, and the shims' total RSS.
//!
//! The control side is [`control_main`] (run as `shim-bench fleet-control DIR N`, reporting on
//! stdout): one process, one tokio current-thread runtime and one `control_link::Fleet` that
//! dials every shim, reads the fleet's aggregated event stream (acknowledged by control-link)
//! until every `driver_ready`, holds the connections, and sends one `status` round.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use control_link::{Addr, ConnectOptions, Fleet};
use driver_protocol::message::Event;

use crate::procs::{children_of, status_kb, Mode, Proc, Spec};
use crate::report::{Figure, Target};

use super::Ctx;

/// Control side's limit: 100 MiB.
const CONTROL_LIMIT_KB: f64 = 100.0 * 1024.0;
/// The shims' total limit: 1.5 GiB.
const SHIMS_LIMIT_KB: f64 = 1.5 * 1024.0 * 1024.0;

/// How long the control side holds the fleet idle while its CPU is measured.
const IDLE_HOLD: Duration = Duration::from_secs(2);

fn socket(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("s{i}.sock"))
}

fn cpu_ms() -> f64 {
    // SAFETY: `ru` is a valid, writable rusage; RUSAGE_SELF always exists.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// The agent id of shim `i` (each shim is started with `--agent-id` so the fleet can tell
/// them apart).
fn agent_id(i: usize) -> String {
    format!("agent-{i}")
}

/// The control side of the fleet figure (`shim-bench fleet-control DIR N`): one
/// `control_link::Fleet` connects to the `N` shims of `DIR`, prints `ready OK FAILED MS` once
/// its event stream has shown every `driver_ready`, waits for a line on stdin, holds the
/// fleet idle for 2 s, runs one `status` round (one request per shim, all at once), and
/// prints `stats RSS_KB CPU_TOTAL_MS IDLE_CPU_MS STATUS_ROUND_MS STATUSES`.
pub fn control_main(dir: &Path, n: usize) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let t0 = Instant::now();
        let fleet = Fleet::new(
            ConnectOptions::new()
                .connect_timeout(Duration::from_secs(60))
                .request_timeout(Duration::from_secs(120)),
        );
        let mut events = fleet.events().map_err(|e| anyhow!("{e}"))?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Result<(), String>>();
        for i in 0..n {
            let fleet = fleet.clone();
            let tx = tx.clone();
            let path = socket(dir, i);
            tokio::spawn(async move {
                let res = async {
                    let addr: Addr = format!("unix:{}", path.display())
                        .parse()
                        .map_err(|e| format!("{e}"))?;
                    let deadline = Instant::now() + Duration::from_secs(120);
                    loop {
                        match fleet.connect(agent_id(i), &addr).await {
                            Ok(_) => return Ok(()),
                            Err(_) if Instant::now() < deadline => {
                                tokio::time::sleep(Duration::from_millis(5)).await
                            }
                            Err(e) => return Err(format!("connect {addr}: {e}")),
                        }
                    }
                }
                .await;
                let _ = tx.send(res);
            });
        }
        drop(tx);
        let mut ready = std::collections::HashSet::new();
        let mut failed = 0usize;
        let limit = Instant::now() + Duration::from_secs(180);
        while ready.len() + failed < n && Instant::now() < limit {
            tokio::select! {
                ev = events.next() => match ev {
                    Some((agent, _, Event::DriverReady(_))) => {
                        ready.insert(agent);
                    }
                    Some(_) => {}
                    None => break,
                },
                Some(res) = rx.recv() => {
                    if let Err(e) = res {
                        failed += 1;
                        eprintln!("fleet-control: {e}");
                    }
                }
                _ = tokio::time::sleep_until(limit.into()) => break,
            }
        }
        println!(
            "ready {} {failed} {}",
            ready.len(),
            t0.elapsed().as_millis()
        );
        std::io::stdout().flush()?;
        // Keep reading (and so acknowledging) events while the bench measures.
        let reader = tokio::spawn(async move { while events.next().await.is_some() {} });
        let mut line = String::new();
        let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
        tokio::io::AsyncBufReadExt::read_line(&mut stdin, &mut line).await?;
        let before = cpu_ms();
        tokio::time::sleep(IDLE_HOLD).await;
        let idle = cpu_ms() - before;
        let t1 = Instant::now();
        let mut round = tokio::task::JoinSet::new();
        for agent in fleet.agents() {
            if let Some(client) = fleet.client(&agent) {
                round.spawn(async move { client.status().await });
            }
        }
        let mut statuses = 0usize;
        while let Some(res) = round.join_next().await {
            match res {
                Ok(Ok(_)) => statuses += 1,
                Ok(Err(e)) => eprintln!("fleet-control: status: {e}"),
                Err(e) => eprintln!("fleet-control: status task: {e}"),
            }
        }
        let round_ms = t1.elapsed().as_secs_f64() * 1e3;
        let rss = status_kb(std::process::id() as i32, "VmRSS").unwrap_or(0);
        println!(
            "stats {rss} {:.0} {idle:.1} {round_ms:.1} {statuses}",
            cpu_ms()
        );
        std::io::stdout().flush()?;
        reader.abort();
        Ok(())
    })
}

/// Reads lines of `stdout` into a channel.
fn lines(stdout: std::process::ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// What the measurement found.
struct Found {
    n: usize,
    ready_ms: f64,
    shims_kb: f64,
    drivers_kb: f64,
    control_kb: f64,
    cpu_total_ms: f64,
    idle_cpu_ms: f64,
    status_round_ms: f64,
}

fn measure(ctx: &Ctx, n: usize) -> Result<Found> {
    let dir = ctx.scratch.join("fleet");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut shims: Vec<Proc> = Vec::with_capacity(n);
    for i in 0..n {
        let argv: Vec<OsString> = vec![
            ctx.bins.shim.clone().into(),
            "--control-listen".into(),
            format!("unix:{}", socket(&dir, i).display()).into(),
            "--control-insecure".into(),
            "--agent-id".into(),
            agent_id(i).into(),
            "--".into(),
            ctx.bins.echo_driver.clone().into(),
        ];
        shims.push(Spec::new(Mode::Direct, argv).start()?);
    }
    let mut control = Command::new(&ctx.bins.this)
        .arg("fleet-control")
        .arg(&dir)
        .arg(n.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("spawn the fleet's control side")?;
    let result = (|| -> Result<Found> {
        let out = lines(control.stdout.take().context("no stdout")?);
        let ready = out
            .recv_timeout(Duration::from_secs(240))
            .context("the control side never reported ready")?;
        let w: Vec<&str> = ready.split_whitespace().collect();
        let (ok, failed, ready_ms) = match w[..] {
            ["ready", ok, failed, ms] => (
                ok.parse::<usize>()?,
                failed.parse::<usize>()?,
                ms.parse::<f64>()?,
            ),
            _ => bail!("unexpected line {ready:?}"),
        };
        if ok != n {
            bail!("{ok} of {n} shims became ready ({failed} failed)");
        }
        std::thread::sleep(Duration::from_millis(500));
        let mut shims_kb = 0.0;
        let mut drivers_kb = 0.0;
        for s in &shims {
            shims_kb +=
                status_kb(s.pid, "VmRSS").ok_or_else(|| anyhow!("shim {} gone", s.pid))? as f64;
            for d in children_of(s.pid) {
                drivers_kb += status_kb(d, "VmRSS").unwrap_or(0) as f64;
            }
        }
        let mut stdin = control.stdin.take().context("no stdin")?;
        writeln!(stdin, "go")?;
        let stats = out
            .recv_timeout(Duration::from_secs(120))
            .context("the control side never reported its stats")?;
        let w: Vec<&str> = stats.split_whitespace().collect();
        let ["stats", rss, cpu, idle, round, statuses] = w[..] else {
            bail!("unexpected line {stats:?}");
        };
        if statuses.parse::<usize>()? != n {
            bail!("only {statuses} of {n} shims answered the status round");
        }
        Ok(Found {
            n,
            ready_ms,
            shims_kb,
            drivers_kb,
            control_kb: rss.parse()?,
            cpu_total_ms: cpu.parse()?,
            idle_cpu_ms: idle.parse()?,
            status_round_ms: round.parse()?,
        })
    })();
    let _ = control.kill();
    let _ = control.wait();
    for s in &shims {
        let _ = s.signal(libc::SIGTERM);
    }
    for s in &mut shims {
        s.stop(Duration::from_secs(10));
    }
    drop(shims);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Measures the fleet.
pub fn run(ctx: &Ctx) -> Figure {
    let n = ctx.pick(1000, 50);
    let mut fig = Figure::new(
        "fleet",
        "1,000 agent-shims (not PID 1, each `--control-listen unix:… --control-insecure -- \
         echo-driver`) and one control process (`shim-bench fleet-control`: one tokio \
         current-thread runtime and one control-link `Fleet`) that dials all of them, reads the \
         fleet's event stream (acknowledged by control-link) until every `driver_ready`, then \
         holds them. Measured while \
         every connection is live: the control process's VmRSS and CPU time (total, and during a \
         2 s idle hold), the time of one `status` round to all shims, and the sum of the shims' \
         VmRSS (their drivers' shown apart).",
    );
    let t_control = "control side ≤ 100 MiB";
    let t_shims = "shims ≤ 1.5 GiB total";
    match measure(ctx, n) {
        Ok(f) => {
            fig.columns = vec!["value".into()];
            let row = |k: &str, v: String| (k.to_string(), vec![v]);
            fig.rows = vec![
                row("shims", f.n.to_string()),
                row(
                    "time until every driver_ready at the control side",
                    format!("{:.0} ms", f.ready_ms),
                ),
                row(
                    "control side VmRSS",
                    format!("{:.1} MiB", f.control_kb / 1024.0),
                ),
                row(
                    "control side CPU, total (connect, handshakes, events, status round)",
                    format!("{:.0} ms", f.cpu_total_ms),
                ),
                row(
                    "control side CPU during a 2 s idle hold",
                    format!("{:.1} ms", f.idle_cpu_ms),
                ),
                row(
                    "one status round to every shim",
                    format!("{:.1} ms", f.status_round_ms),
                ),
                row(
                    "shims' VmRSS, total",
                    format!(
                        "{:.1} MiB ({:.0} kB per shim)",
                        f.shims_kb / 1024.0,
                        f.shims_kb / f.n as f64
                    ),
                ),
                row(
                    "echo drivers' VmRSS, total (not part of the target)",
                    format!("{:.1} MiB", f.drivers_kb / 1024.0),
                ),
            ];
            fig.targets.push(Target::check(
                t_control,
                f.control_kb <= CONTROL_LIMIT_KB,
                format!("{:.1} MiB", f.control_kb / 1024.0),
            ));
            let scaled = f.shims_kb * 1000.0 / f.n as f64;
            fig.targets.push(Target::check(
                t_shims,
                scaled <= SHIMS_LIMIT_KB,
                format!(
                    "{:.1} MiB for {} shims{}",
                    f.shims_kb / 1024.0,
                    f.n,
                    if f.n == 1000 {
                        String::new()
                    } else {
                        format!(
                            " (×{:.0} = {:.1} MiB for 1,000)",
                            1000.0 / f.n as f64,
                            scaled / 1024.0
                        )
                    }
                ),
            ));
            if f.status_round_ms > 1000.0 {
                fig.notes.push(format!(
                    "The status round took {:.1} s: each shim answers `status` by counting its \
                     live children over every `/proc/PID/stat` (`live_children` in \
                     shim/src/supervisor/shell/mod.rs). Here the {} shims are not in PID \
                     namespaces and share the host's /proc with their drivers and each other, so \
                     one round reads millions of stat files; in a sandbox each shim sees only its \
                     own namespace.",
                    f.status_round_ms / 1000.0,
                    f.n
                ));
            }
        }
        Err(e) => fig = fig.failed(&[t_control, t_shims], &e),
    }
    fig
}
