//! Fleet: one control process holding live control connections to 1,000, 3,000 and 5,000
//! shims in turn (each supervising the echo driver); the control side's RSS and CPU in all and
//! per agent, and the shims' total RSS.
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
use crate::report::{Bar, Chart, Figure, Target};

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
                    let deadline = Instant::now() + Duration::from_secs(300);
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
        let limit = Instant::now() + Duration::from_secs(540);
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
            .recv_timeout(Duration::from_secs(600))
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
            .recv_timeout(Duration::from_secs(300))
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

/// Control side's memory per agent: 20 KiB.
const PER_AGENT_LIMIT_KB: f64 = 20.0;

/// Raises our open-file limit to its hard limit (the control side, our child, inherits it:
/// it holds a socket per shim).
fn raise_nofile() {
    // SAFETY: `lim` is a valid, writable rlimit; RLIMIT_NOFILE always exists.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Measures the fleet at each size, smallest first.
pub fn run(ctx: &Ctx) -> Figure {
    let sizes: Vec<usize> = ctx.pick(vec![1000, 3000, 5000], vec![50, 150]);
    let mut fig = Figure::new(
        "fleet",
        "N agent-shims (N = 1,000, 3,000 and 5,000 in turn; not PID 1, each `--control-listen \
         unix:… --control-insecure -- echo-driver`) and one control process (`shim-bench \
         fleet-control`: one tokio current-thread runtime and one control-link `Fleet`) that \
         dials all of them, reads the fleet's event stream (acknowledged by control-link) until \
         every `driver_ready`, then holds them. Measured while every connection is live: the \
         control process's VmRSS and CPU time (total, and during a 2 s idle hold), the time of \
         one `status` round to all shims, and the sum of the shims' VmRSS (their drivers' shown \
         apart). Per agent: the control process's VmRSS (or CPU) divided by N, everything it \
         holds included; the marginal cost is the growth from the previous size divided by the \
         agents added.",
    );
    let t_control = "control side ≤ 100 MiB at 1,000 shims";
    let t_shims = "shims ≤ 1.5 GiB total per 1,000";
    let t_per = "control side ≤ 20 KiB per agent, at every size";
    raise_nofile();
    let mut found: Vec<Found> = Vec::new();
    for &n in &sizes {
        eprintln!("shim-bench: fleet of {n}…");
        match measure(ctx, n) {
            Ok(f) => found.push(f),
            Err(e) => fig.notes.push(format!("fleet of {n}: {e:#}")),
        }
    }
    if found.is_empty() {
        return fig.failed(
            &[t_control, t_shims, t_per],
            &anyhow!("no fleet size could be measured (see notes)"),
        );
    }
    fig.columns = found.iter().map(|f| format!("{} shims", f.n)).collect();
    let row = |k: &str, f: &dyn Fn(&Found) -> String| {
        (k.to_string(), found.iter().map(f).collect::<Vec<_>>())
    };
    let marginal = |f: &Found, key: &dyn Fn(&Found) -> f64| -> String {
        match found.iter().take_while(|g| g.n < f.n).last() {
            Some(prev) => format!("{:.1}", (key(f) - key(prev)) / (f.n - prev.n) as f64),
            None => "—".into(),
        }
    };
    fig.rows = vec![
        row("time until every driver_ready at the control side", &|f| {
            format!("{:.0} ms", f.ready_ms)
        }),
        row("control side VmRSS", &|f| {
            format!("{:.1} MiB", f.control_kb / 1024.0)
        }),
        row("control side VmRSS per agent", &|f| {
            format!("{:.1} KiB", f.control_kb / f.n as f64)
        }),
        row("control side VmRSS per added agent (KiB, marginal)", &|f| {
            marginal(f, &|g| g.control_kb)
        }),
        row(
            "control side CPU, total (connect, handshakes, events, status round)",
            &|f| format!("{:.0} ms", f.cpu_total_ms),
        ),
        row("control side CPU per agent, total", &|f| {
            format!("{:.0} µs", f.cpu_total_ms * 1e3 / f.n as f64)
        }),
        row("control side CPU during a 2 s idle hold", &|f| {
            format!("{:.1} ms", f.idle_cpu_ms)
        }),
        row("one status round to every shim", &|f| {
            format!("{:.1} ms", f.status_round_ms)
        }),
        row("shims' VmRSS, total", &|f| {
            format!(
                "{:.1} MiB ({:.0} kB per shim)",
                f.shims_kb / 1024.0,
                f.shims_kb / f.n as f64
            )
        }),
        row(
            "echo drivers' VmRSS, total (not part of the target)",
            &|f| format!("{:.1} MiB", f.drivers_kb / 1024.0),
        ),
    ];
    fig.charts.push(Chart {
        title: "fleet: control side memory per agent".into(),
        unit: "KiB per agent".into(),
        higher_is_better: false,
        bars: found
            .iter()
            .map(|f| Bar {
                label: format!("{} shims", f.n),
                value: f.control_kb / f.n as f64,
            })
            .collect(),
    });
    fig.charts.push(Chart {
        title: "fleet: control side CPU per agent (connect to status round)".into(),
        unit: "µs per agent".into(),
        higher_is_better: false,
        bars: found
            .iter()
            .map(|f| Bar {
                label: format!("{} shims", f.n),
                value: f.cpu_total_ms * 1e3 / f.n as f64,
            })
            .collect(),
    });
    let first = &found[0];
    match found.iter().find(|f| f.n == 1000) {
        Some(f) => fig.targets.push(Target::check(
            t_control,
            f.control_kb <= CONTROL_LIMIT_KB,
            format!("{:.1} MiB", f.control_kb / 1024.0),
        )),
        None => fig.targets.push(Target::not_measured(
            t_control,
            "no fleet of 1,000 in this run (a quick run, or it failed: see notes)".into(),
        )),
    }
    let scaled = first.shims_kb * 1000.0 / first.n as f64;
    fig.targets.push(Target::check(
        t_shims,
        scaled <= SHIMS_LIMIT_KB,
        format!(
            "{:.1} MiB for {} shims{}",
            first.shims_kb / 1024.0,
            first.n,
            if first.n == 1000 {
                String::new()
            } else {
                format!(" (= {:.1} MiB per 1,000)", scaled / 1024.0)
            }
        ),
    ));
    let worst = found
        .iter()
        .map(|f| (f.control_kb / f.n as f64, f.n))
        .fold((0.0f64, 0usize), |a, b| if b.0 > a.0 { b } else { a });
    let all = found
        .iter()
        .map(|f| format!("{:.1} KiB at {}", f.control_kb / f.n as f64, f.n))
        .collect::<Vec<_>>()
        .join(", ");
    if found.len() == sizes.len() {
        fig.targets.push(Target::check(
            t_per,
            worst.0 <= PER_AGENT_LIMIT_KB,
            format!("{all} (limit {PER_AGENT_LIMIT_KB:.0} KiB)"),
        ));
    } else {
        fig.targets.push(Target::not_measured(
            t_per,
            format!("only {all} measured (see notes)"),
        ));
    }
    if let Some(f) = found.iter().find(|f| f.status_round_ms > 1000.0) {
        fig.notes.push(format!(
            "The status round of {} shims took {:.1} s: each shim answers `status` by counting \
             its live children over every `/proc/PID/stat` (`live_children` in \
             shim/src/supervisor/shell/mod.rs). Here the shims are not in PID namespaces and \
             share the host's /proc with their drivers and each other, so one round reads \
             millions of stat files; in a sandbox each shim sees only its own namespace.",
            f.n,
            f.status_round_ms / 1000.0,
        ));
    }
    fig
}
