//! Driver start (shim exec → `driver_ready` at the control client) and crash to ready
//! (driver SIGKILLed → restarted with zero backoff → `driver_ready`), each against a bare
//! fork + exec of the same driver that the bench hand-shakes itself.

use std::ffi::OsString;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use driver_protocol::blocking::{FrameReader, FrameWriter};
use driver_protocol::message::{DriverToShim, Hello, Role, ShimToDriver};

use crate::clock::now_ns;
use crate::control::Client;
use crate::procs::{signal, Mode, Spec};
use crate::report::{Bar, Chart, Figure, Target};
use crate::stats::{list, median};

use super::{ms, Ctx};

/// The margin both targets allow over the bare fork + exec: 5 ms.
const MARGIN_MS: f64 = 5.0;

/// A driver started by the bench itself, as the shim would start it.
struct Bare {
    child: Child,
    _link: UnixStream,
}

impl Drop for Bare {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// fork + exec of `driver` on a socketpair (fd 3, `AGENT_SHIM_FD=3`), `hello` both ways, and
/// its `ready`; the driver and the nanoseconds from spawn to `ready`.
fn bare_start(driver: &Path) -> Result<(Bare, u64)> {
    let (ours, theirs) = UnixStream::pair()?;
    let fd = theirs.as_raw_fd();
    let mut cmd = Command::new(driver);
    cmd.env("AGENT_SHIM_FD", "3")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: between fork and exec the closure only calls dup2 and fcntl, which are
    // async-signal-safe, on descriptors that are open in the child.
    unsafe {
        cmd.pre_exec(move || {
            if fd == 3 {
                let flags = libc::fcntl(3, libc::F_GETFD);
                libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            } else if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let t0 = now_ns();
    let child = cmd
        .spawn()
        .with_context(|| format!("spawn {}", driver.display()))?;
    drop(theirs);
    ours.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut writer = FrameWriter::new(ours.try_clone()?);
    let mut reader = FrameReader::new(ours.try_clone()?);
    let bare = Bare { child, _link: ours };
    writer.send(&ShimToDriver::Hello(Hello::new(
        Role::Shim,
        "shim-bench",
        "0",
    )))?;
    match reader.read_message::<DriverToShim>()? {
        Some(DriverToShim::Hello(_)) => {}
        other => bail!("expected the driver's hello, got {other:?}"),
    }
    match reader.read_message::<DriverToShim>()? {
        Some(DriverToShim::Ready(_)) => {}
        other => bail!("expected ready, got {other:?}"),
    }
    Ok((bare, now_ns() - t0))
}

/// One shim run: the start time, then `crashes` crash-to-ready times.
fn shim_run(ctx: &Ctx, n: usize, crashes: usize) -> Result<(u64, Vec<u64>)> {
    let sock = ctx.scratch.join(format!("start-{n}.sock"));
    let _ = std::fs::remove_file(&sock);
    let argv: Vec<OsString> = [
        ctx.bins.shim.clone().into_os_string(),
        "--control-listen".into(),
        format!("unix:{}", sock.display()).into(),
        "--control-insecure".into(),
        "--restart".into(),
        "always".into(),
        "--backoff-initial".into(),
        "0".into(),
        "--backoff-jitter".into(),
        "0".into(),
        "--crash-loop-restarts".into(),
        "1000000".into(),
        "--".into(),
        ctx.bins.echo_driver.clone().into_os_string(),
    ]
    .into();
    let t0 = now_ns();
    let mut proc = Spec::new(Mode::Direct, argv).start()?;
    let mut client = Client::connect(&sock, Duration::from_secs(10))?;
    let (mut ready, at) = client.wait_driver_ready(Duration::from_secs(10))?;
    let start = at.saturating_sub(t0);
    let mut out = Vec::with_capacity(crashes);
    for _ in 0..crashes {
        std::thread::sleep(Duration::from_millis(20));
        let t0 = now_ns();
        signal(ready.pid as i32, libc::SIGKILL)?;
        let (next, at) = client.wait_driver_ready(Duration::from_secs(10))?;
        out.push(at.saturating_sub(t0));
        ready = next;
    }
    drop(client);
    proc.stop(Duration::from_secs(5));
    let _ = std::fs::remove_file(&sock);
    Ok((start, out))
}

/// Both figures.
pub fn run(ctx: &Ctx) -> Vec<Figure> {
    let mut start = Figure::new(
        "driver start",
        "Wall time from spawning `agent-shim --control-listen unix:… --control-insecure -- \
         echo-driver` (not PID 1) to the `driver_ready` event handed out by a control-link \
         `Client` (which connects as soon as the socket accepts, and sends `resume_from{0}`). Baseline: \
         the bench forks + execs the same echo-driver on a socketpair itself, exchanges `hello`s \
         and reads its `ready`. Medians; runs interleaved.",
    );
    let mut crash = Figure::new(
        "crash to ready",
        "With `--restart always --backoff-initial 0 --backoff-jitter 0`, the driver is SIGKILLed; \
         wall time from the kill to the next `driver_ready` at the control-link client. Baseline: \
         SIGKILL the bare driver, reap it, fork + exec it again and read its `ready`. Medians.",
    );
    let start_text = "≤ 5 ms above a bare fork+exec of the driver";
    let crash_text = "≤ 5 ms above a bare fork+exec";
    let runs = ctx.pick(20, 5);
    let crashes = ctx.pick(10, 3);
    let mut s_shim = Vec::new();
    let mut c_shim = Vec::new();
    let mut s_bare = Vec::new();
    let mut c_bare = Vec::new();
    for n in 0..runs {
        match shim_run(ctx, n, crashes) {
            Ok((s, c)) => {
                s_shim.push(ms(s as f64));
                c_shim.extend(c.into_iter().map(|v| ms(v as f64)));
            }
            Err(e) => start.notes.push(format!("shim run {n}: {e:#}")),
        }
        let bare = (|| -> Result<()> {
            let (mut drv, t) = bare_start(&ctx.bins.echo_driver)?;
            s_bare.push(ms(t as f64));
            for _ in 0..crashes {
                std::thread::sleep(Duration::from_millis(20));
                let t0 = now_ns();
                drv.child.kill()?;
                drv.child.wait()?;
                let (next, _) = bare_start(&ctx.bins.echo_driver)?;
                c_bare.push(ms((now_ns() - t0) as f64));
                drv = next;
            }
            Ok(())
        })();
        if let Err(e) = bare {
            start.notes.push(format!("bare run {n}: {e:#}"));
        }
    }
    for (fig, shim, bare, text, what) in [
        (&mut start, &s_shim, &s_bare, start_text, "driver start"),
        (&mut crash, &c_shim, &c_bare, crash_text, "crash to ready"),
    ] {
        fig.columns = vec!["median (ms)".into(), "samples".into(), "raw (ms)".into()];
        fig.rows.push((
            "agent-shim → control-link".into(),
            vec![
                median(shim).map_or("—".into(), |v| format!("{v:.2}")),
                shim.len().to_string(),
                list(shim, 2),
            ],
        ));
        fig.rows.push((
            "bare fork+exec (baseline)".into(),
            vec![
                median(bare).map_or("—".into(), |v| format!("{v:.2}")),
                bare.len().to_string(),
                list(bare, 2),
            ],
        ));
        match (median(shim), median(bare)) {
            (Some(s), Some(b)) => {
                fig.charts.push(Chart {
                    title: what.into(),
                    unit: "ms".into(),
                    higher_is_better: false,
                    bars: vec![
                        Bar {
                            label: "agent-shim".into(),
                            value: s,
                        },
                        Bar {
                            label: "bare fork+exec".into(),
                            value: b,
                        },
                    ],
                });
                fig.targets.push(Target::check(
                    text,
                    s <= b + MARGIN_MS,
                    format!(
                        "agent-shim {s:.2} ms vs limit {:.2} ms (bare {b:.2} ms; +{:.2} ms)",
                        b + MARGIN_MS,
                        s - b
                    ),
                ));
            }
            _ => fig.targets.push(Target::not_measured(
                text,
                "no run succeeded (see notes)".into(),
            )),
        }
    }
    if !start.notes.is_empty() {
        crash.notes.extend(start.notes.iter().cloned());
    }
    vec![start, crash]
}
