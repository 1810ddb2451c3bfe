//! Instruction counts: callgrind's count of the instructions the shim (or control-link)
//! executes for a fixed piece of work, held against a budget. Unlike wall-clock figures they
//! do not move with the machine's load: the same binary and input give the same count.
//!
//! Timing must not leak into a count, so each measured window starts and ends with the
//! process idle, its counters zeroed and dumped there by `callgrind_control` (vgdb), and the
//! input it reads is made whole before it may read it: the process is stopped (`SIGSTOP`)
//! while its peer writes the whole burst into a socket whose send buffer holds it all, then
//! continued. Every read then finds the same bytes, whatever the machine does meanwhile.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use driver_protocol::blocking::{FrameReader, FrameWriter};
use driver_protocol::message::{
    Ack, ControlToShim, Event, Hello, Message as _, ResumeFrom, Role, ShimToControl, SubmitTask,
};
use rmpv::Value;

use crate::control::Client;
use crate::procs::{signal, Mode, Spec};
use crate::report::{Figure, Target};

use super::relay::EVENT_SIZE;
use super::Ctx;

/// Events per measured relay burst.
const RELAY_EVENTS: u64 = 20_000;

/// Exec spawns per measured window.
const SPAWNS: u64 = 20;

/// The budgets: a count over its budget is a FAIL. Each is the count measured when it was
/// set (2026-12-07, rustc 1.95, the static musl shim) plus about 5%: a change that costs
/// more shows here first, whatever the machine's load. Instructions per relayed event in
/// the shim (measured 1,417 on 2026-12-08: keys and names compared as numbers, a known
/// event type or field name not checked for UTF-8, the envelope's head written at fixed
/// places; 2,435 before).
const BUDGET_SHIM_EVENT: u64 = 1_475;
/// Instructions per event on control-link's read path (measured 1,382 on 2026-12-08: an
/// envelope as the shim writes it read at its places, only its event walked, a raw event
/// moved at its own size; 2,340 before).
const BUDGET_LINK_EVENT: u64 = 1_440;
/// Instructions per exec spawn in the shim (measured 178,932 and 180,570: the per-exec
/// cgroup is made, written and removed through the descriptors opened at start, and
/// valgrind, which has no `openat2`, takes the component walk).
const BUDGET_SPAWN: u64 = 190_000;
/// Instructions of a whole plain-mode run of `agent-shim -- true` (measured 121,995).
const BUDGET_PLAIN: u64 = 128_000;

/// `valgrind --tool=callgrind` writing `<dir>/<tag>.<pid>[.<dump>]`, then `argv`, in a
/// fixed environment (`env -i PATH=…`).
fn under_callgrind(dir: &Path, tag: &str, argv: &[OsString]) -> Vec<OsString> {
    // A fixed environment: the shim copies its own into every process it starts, so an
    // inherited one would make the counts depend on who runs the bench.
    let mut v: Vec<OsString> = vec![
        "env".into(),
        "-i".into(),
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        "valgrind".into(),
        "--tool=callgrind".into(),
        "--quiet".into(),
        format!("--callgrind-out-file={}/{tag}.%p", dir.display()).into(),
    ];
    v.extend(argv.iter().cloned());
    v
}

/// The instruction count (`summary:`) of a callgrind output file.
fn total(file: &Path) -> Result<u64> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    text.lines()
        .find_map(|l| l.strip_prefix("summary:"))
        .and_then(|n| n.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow!("no summary in {}", file.display()))
}

/// `callgrind_control OP pid` (`-z` zeroes the counters, `-d` dumps them).
fn control(op: &str, pid: i32) -> Result<()> {
    let out = Command::new("callgrind_control")
        .arg(op)
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .output()
        .context("callgrind_control")?;
    if !out.status.success() {
        bail!(
            "callgrind_control {op} {pid}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Zeroes `pid`'s counters; later [`dump`] gives the count of the window.
fn zero(pid: i32) -> Result<()> {
    control("-z", pid)
}

/// Dumps `pid`'s counters (its first dump: `<dir>/<tag>.<pid>.1`) and returns the count.
fn dump(dir: &Path, tag: &str, pid: i32) -> Result<u64> {
    control("-d", pid)?;
    let file = dir.join(format!("{tag}.{pid}.1"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !file.is_file() {
        if Instant::now() > deadline {
            bail!("{} not written", file.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    total(&file)
}

/// The threads of `pid`: `(state, syscall number)` each (`-1` when running).
fn threads(pid: i32) -> Vec<(char, i64)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.flatten()
        .map(|t| {
            let p = t.path();
            let stat = std::fs::read_to_string(p.join("stat")).unwrap_or_default();
            let state = stat
                .rsplit_once(") ")
                .and_then(|(_, r)| r.chars().next())
                .unwrap_or('?');
            let sys = std::fs::read_to_string(p.join("syscall"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse().ok())
                .unwrap_or(-1);
            (state, sys)
        })
        .collect()
}

/// Waits until every thread of `pid` has slept in a wait for readiness (epoll, poll, a
/// futex, a pause) for 300 ms: the process has done all it had to do.
fn wait_idle(pid: i32, timeout: Duration) -> Result<()> {
    // epoll_wait, epoll_pwait, epoll_pwait2, poll, ppoll, futex, pause, rt_sigsuspend,
    // rt_sigtimedwait, wait4, nanosleep, clock_nanosleep, read.
    const WAITS: [i64; 13] = [232, 281, 441, 7, 271, 202, 34, 130, 128, 61, 35, 230, 0];
    let idle = || {
        let t = threads(pid);
        !t.is_empty()
            && t.iter()
                .all(|&(state, sys)| state == 'S' && WAITS.contains(&sys))
    };
    let deadline = Instant::now() + timeout;
    let mut since: Option<Instant> = None;
    loop {
        if idle() {
            let s = *since.get_or_insert_with(Instant::now);
            if s.elapsed() >= Duration::from_millis(300) {
                return Ok(());
            }
        } else {
            since = None;
        }
        if Instant::now() > deadline {
            bail!("pid {pid} not idle after {timeout:?}: {:?}", threads(pid));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `SIGSTOP`s `pid` and waits until every thread is stopped.
fn stop(pid: i32) -> Result<()> {
    signal(pid, libc::SIGSTOP)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !threads(pid).iter().all(|&(s, _)| s == 'T' || s == 't') {
        if Instant::now() > deadline {
            bail!("pid {pid} did not stop");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// Polls `f` every millisecond until it holds, at most `timeout`.
fn until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// A blocking control connection speaking the raw protocol (no timers of its own).
struct Raw {
    rd: FrameReader<UnixStream>,
    wr: FrameWriter<UnixStream>,
}

impl Raw {
    fn connect(sock: &Path, timeout: Duration) -> Result<Raw> {
        let deadline = Instant::now() + timeout;
        let s = loop {
            match UnixStream::connect(sock) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(anyhow!(e).context(format!("connect {}", sock.display())))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(120)))?;
        let mut raw = Raw {
            rd: FrameReader::new(s.try_clone()?),
            wr: FrameWriter::new(s),
        };
        raw.send(&ControlToShim::Hello(Hello::new(
            Role::Control,
            "shim-bench",
            env!("CARGO_PKG_VERSION"),
        )))?;
        match raw.recv()? {
            ShimToControl::Hello(_) => {}
            other => bail!("expected hello, got {}", other.type_name()),
        }
        raw.send(&ControlToShim::ResumeFrom(ResumeFrom::after(0)))?;
        Ok(raw)
    }

    fn send(&mut self, msg: &ControlToShim) -> Result<()> {
        self.wr.send(msg)?;
        Ok(())
    }

    fn recv(&mut self) -> Result<ShimToControl> {
        self.rd
            .read_message::<ShimToControl>()?
            .context("the shim closed the connection")
    }

    /// Reads until an event matching `want`; returns its seq and the `custom` events seen.
    fn until_event(&mut self, want: impl Fn(&Event) -> bool) -> Result<(u64, u64)> {
        let mut custom = 0;
        loop {
            if let ShimToControl::Event(env) = self.recv()? {
                if want(&env.event) {
                    return Ok((env.seq, custom));
                }
                if matches!(env.event, Event::Custom(_)) {
                    custom += 1;
                }
            }
        }
    }
}

/// The shim's instructions for a burst of `RELAY_EVENTS` 200-byte events, driver → control
/// connection, the task's end included.
fn shim_relay(ctx: &Ctx, dir: &Path, tag: &str) -> Result<u64> {
    let flags = [
        "--event-buffer",
        "1000000",
        "--event-buffer-bytes",
        "1073741824",
    ];
    under_shim(ctx, dir, tag, &flags, |sock, pid| {
        let mut raw = Raw::connect(sock, Duration::from_secs(120))?;
        raw.until_event(|e| matches!(e, Event::DriverReady(_)))?;
        wait_idle(pid, Duration::from_secs(60))?;
        let mark = ctx.scratch.join(format!("{tag}.mark"));
        let (read, written) = (
            PathBuf::from(format!("{}.read", mark.display())),
            PathBuf::from(format!("{}.written", mark.display())),
        );
        let _ = std::fs::remove_file(&read);
        let _ = std::fs::remove_file(&written);
        let input = Value::Map(vec![
            ("events".into(), RELAY_EVENTS.into()),
            ("size".into(), EVENT_SIZE.into()),
            ("sndbuf".into(), (RELAY_EVENTS * 512 + (1 << 20)).into()),
            ("hold_ms".into(), 3000u64.into()),
            ("mark".into(), mark.display().to_string().into()),
        ]);
        raw.send(&ControlToShim::SubmitTask(SubmitTask {
            id: 1,
            task_id: tag.into(),
            input,
            output_schema: None,
            timeout_ms: None,
            redeliver: false,
            max_attempts: None,
        }))?;
        // The driver has the task and holds; the shim settles, is zeroed and stopped while
        // the burst is written whole.
        until(
            "the driver to read the task",
            Duration::from_secs(60),
            || read.exists(),
        )?;
        wait_idle(pid, Duration::from_secs(60))?;
        zero(pid)?;
        stop(pid)?;
        let wrote = until("the burst", Duration::from_secs(60), || written.exists());
        signal(pid, libc::SIGCONT)?;
        wrote?;
        let (seq, custom) = raw.until_event(|e| matches!(e, Event::TaskDone(_)))?;
        if custom != RELAY_EVENTS {
            bail!("{custom} of {RELAY_EVENTS} events relayed");
        }
        raw.send(&ControlToShim::Ack(Ack { seq }))?;
        wait_idle(pid, Duration::from_secs(120))?;
        dump(dir, tag, pid)
    })
}

/// The shim's instructions for `SPAWNS` execs of `true`, one after the other, each from the
/// request to its `exec_exit`.
fn shim_spawns(ctx: &Ctx, dir: &Path, tag: &str) -> Result<u64> {
    under_shim(ctx, dir, tag, &[], |sock, pid| {
        let mut client = Client::connect(sock, Duration::from_secs(120))?;
        client.wait_driver_ready(Duration::from_secs(120))?;
        client.drain(Duration::from_millis(300))?;
        wait_idle(pid, Duration::from_secs(60))?;
        zero(pid)?;
        for _ in 0..SPAWNS {
            client.exec_output(&["true"], Duration::from_secs(60))?;
        }
        client.drain(Duration::from_millis(300))?;
        wait_idle(pid, Duration::from_secs(60))?;
        let n = dump(dir, tag, pid)?;
        client.close();
        Ok(n)
    })
}

/// Runs the shim under callgrind with the bench driver, listening on a socket of its own
/// (insecure, no pings, `flags` added), and `body` with that socket and the shim's pid; the
/// shim is killed and the socket removed after it.
fn under_shim(
    ctx: &Ctx,
    dir: &Path,
    tag: &str,
    flags: &[&str],
    body: impl FnOnce(&Path, i32) -> Result<u64>,
) -> Result<u64> {
    let sock = ctx.scratch.join(format!("{tag}.sock"));
    let _ = std::fs::remove_file(&sock);
    let mut shim: Vec<OsString> = vec![
        ctx.bins.shim.clone().into(),
        "--control-listen".into(),
        format!("unix:{}", sock.display()).into(),
        "--control-insecure".into(),
        "--ping-interval".into(),
        "0".into(),
    ];
    shim.extend(flags.iter().map(OsString::from));
    shim.extend(["--".into(), ctx.bins.bench_driver.clone().into()]);
    let mut proc = Spec::new(Mode::Direct, under_callgrind(dir, tag, &shim)).start()?;
    let res = body(&sock, proc.pid);
    proc.kill();
    let _ = std::fs::remove_file(&sock);
    res
}

/// The shim's instructions for a whole plain-mode run of `agent-shim -- true`.
fn plain_start(ctx: &Ctx, dir: &Path, tag: &str) -> Result<u64> {
    let argv: Vec<OsString> = vec![ctx.bins.shim.clone().into(), "--".into(), "true".into()];
    let mut proc = Spec::new(Mode::Direct, under_callgrind(dir, tag, &argv)).start()?;
    let st = proc.wait_timeout(Duration::from_secs(60))?;
    if !st.success() {
        bail!("agent-shim -- true: {st}");
    }
    total(&dir.join(format!("{tag}.{}", proc.pid)))
}

/// control-link's instructions for reading a burst of `RELAY_EVENTS` events through its raw
/// event stream: `shim-bench link-client SOCK N` runs under callgrind against a stand-in
/// shim (this process) that writes the whole burst while the client is stopped.
fn link_read(ctx: &Ctx, dir: &Path, tag: &str) -> Result<u64> {
    let sock = ctx.scratch.join(format!("{tag}.sock"));
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock)?;
    let argv: Vec<OsString> = vec![
        ctx.bins.this.clone().into(),
        "link-client".into(),
        sock.clone().into(),
        RELAY_EVENTS.to_string().into(),
    ];
    let mut spec = Spec::new(Mode::Direct, under_callgrind(dir, tag, &argv));
    spec.stdout = true;
    let mut proc = spec.start()?;
    let res = (|| {
        listener.set_nonblocking(true)?;
        let deadline = Instant::now() + Duration::from_secs(120);
        let s = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        bail!("link-client did not connect");
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e.into()),
            }
        };
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(Duration::from_secs(120)))?;
        let mut rd = FrameReader::new(s.try_clone()?);
        let mut wr = FrameWriter::new(s.try_clone()?);
        match rd.read_message::<ControlToShim>()? {
            Some(ControlToShim::Hello(_)) => {}
            _ => bail!("link-client: expected hello"),
        }
        wr.send(&ShimToControl::Hello(Hello::new(
            Role::Shim,
            "shim-bench",
            env!("CARGO_PKG_VERSION"),
        )))?;
        loop {
            match rd.read_message::<ControlToShim>()? {
                Some(ControlToShim::ResumeFrom(_)) => break,
                Some(_) => {}
                None => bail!("link-client closed"),
            }
        }
        // The burst, encoded before the client is stopped.
        let body = super::relay::event_body()?;
        let mut burst = Vec::with_capacity(RELAY_EVENTS as usize * 256);
        for seq in 1..=RELAY_EVENTS {
            driver_protocol::frame::write_event_envelope(&mut burst, usize::MAX, seq, &body)?;
        }
        force_sndbuf(&s, burst.len() + (1 << 20))?;
        wait_idle(proc.pid, Duration::from_secs(60))?;
        zero(proc.pid)?;
        stop(proc.pid)?;
        let wrote = (&s).write_all(&burst);
        signal(proc.pid, libc::SIGCONT)?;
        wrote?;
        // The client prints "done" once it has read and acknowledged every event.
        let mut line = [0u8; 5];
        let out = proc.child.stdout.as_mut().context("link-client stdout")?;
        out.read_exact(&mut line)?;
        if &line != b"done\n" {
            bail!("link-client: {:?}", String::from_utf8_lossy(&line));
        }
        // It sends its acknowledgement, then idles. The acknowledgement is read only after
        // the dump: reading it frees room in the client's socket, which wakes the client
        // (EPOLLOUT) at a moment only the scheduler decides, alone or together with a
        // wake-up of its own, and so with one turn of its runtime more or less. (Another
        // such turn remains at the window's start, around the zeroing and the SIGSTOP/
        // SIGCONT: the runs still differ by one park, 1,389 instructions, now and then.)
        wait_idle(proc.pid, Duration::from_secs(60))?;
        let n = dump(dir, tag, proc.pid)?;
        loop {
            match rd.read_message::<ControlToShim>()? {
                Some(ControlToShim::Ack(a)) if a.seq == RELAY_EVENTS => break,
                Some(_) => {}
                None => bail!("link-client closed before its ack"),
            }
        }
        drop(wr);
        drop(rd);
        let _ = s.shutdown(std::net::Shutdown::Both);
        let _ = proc.wait_timeout(Duration::from_secs(30));
        Ok(n)
    })();
    proc.kill();
    let _ = std::fs::remove_file(&sock);
    res
}

/// Raises the send buffer of `sock` to `bytes` (`SO_SNDBUFFORCE`: we run as root).
fn force_sndbuf(sock: &UnixStream, bytes: usize) -> Result<()> {
    use std::os::fd::AsRawFd as _;
    let value = libc::c_int::try_from(bytes / 2)?; // the kernel doubles it
                                                   // SAFETY: a valid socket fd, and a c_int option value of the size given.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!("SO_SNDBUFFORCE: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// `shim-bench link-client SOCK N`: connects control-link to SOCK, reads N events from its
/// raw event stream (checking each one's `type`), acknowledges them, prints `done` and waits
/// for the connection to close.
pub fn link_client_main(sock: &Path, n: u64) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let addr: control_link::Addr = format!("unix:{}", sock.display())
        .parse()
        .map_err(|e| anyhow!("{e}"))?;
    rt.block_on(async {
        let client = control_link::ConnectOptions::new()
            .ack_mode(control_link::AckMode::Manual)
            .event_buffer(4096)
            .keepalive(Duration::ZERO)
            .reconnect(false)
            .connect(&addr)
            .await?;
        let mut events = client.raw_events()?;
        let mut got = 0u64;
        while got < n {
            let ev = events
                .next()
                .await
                .context("the stand-in shim closed early")?;
            if ev.type_name() != "custom" {
                bail!("event {} is a {}", ev.seq(), ev.type_name());
            }
            got += 1;
        }
        client.ack(n);
        println!("done");
        // Idle until the stand-in closes the connection (after the dump).
        while events.next().await.is_some() {}
        Ok(())
    })
}

/// Two runs of each measurement: (first, second).
type Twice = (Result<u64>, Result<u64>);

fn twice(f: impl Fn(&str) -> Result<u64>, tag: &str) -> Twice {
    (f(&format!("{tag}-a")), f(&format!("{tag}-b")))
}

/// Measures every count twice (the two must agree within a share) and holds each against its budget.
pub fn run(ctx: &Ctx) -> Figure {
    let mut fig = Figure::new(
        "instruction counts",
        "Instructions executed, counted by `valgrind --tool=callgrind` in the measured process \
         only (its children are not counted), for a fixed piece of work, twice. Each window \
         starts and ends with the process idle (every thread waiting on epoll or a futex for \
         300 ms), its counters zeroed and dumped there with `callgrind_control`; the input it \
         reads is made whole before it may read it (the process is stopped with SIGSTOP while \
         its peer writes the whole burst into a socket whose send buffer holds it all, then \
         continued). Relay, shim side: agent-shim (not PID 1) supervising the bench driver, \
         which writes 20,000 events of 200 bytes of body and its `task_done`; a blocking \
         control client reads them and acknowledges the last; count ÷ 20,000. Relay, \
         control-link side: control-link's `Client` (manual acks) reads the same 20,000 \
         `event` frames through its `RawEventStream` and checks each `type`, then \
         acknowledges the last (the stand-in reads that acknowledgement only after the \
         dump); the frames come from a stand-in shim in the bench process; \
         count ÷ 20,000. Exec spawn: 20 execs of `true` through control-link, one after the \
         other, each from the request to its `exec_exit`; count ÷ 20 (the forked child's \
         instructions up to its `execve` are its own). Plain-mode start: the whole run of \
         `agent-shim -- true` (start, spawn, reap, exit). Each count is held against a \
         budget. control-link's read path repeats to the instruction but for one park of its \
         runtime at the window's start that comes in one run and not in the other (about \
         1,400 of 27.7 M instructions); in the shim, its runtime's timer driver may turn once more in one run than in the other (the window \
         lasts some wall-clock time), and an exec's exit, output end and SIGCHLD arrive in \
         an order the kernel decides: their runs must agree within the share shown.",
    );
    let targets = [
        "relay, shim: instructions per event ≤ budget, two runs within 0.1%",
        "relay, control-link: instructions per event ≤ budget, two runs within 0.01%",
        "exec spawn: instructions per spawn ≤ budget, two runs within 3%",
        "plain-mode start: instructions ≤ budget, two runs within 1%",
    ];
    if Command::new("valgrind")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .map(|s| !s.success())
        .unwrap_or(true)
    {
        return fig.failed(&targets, &anyhow!("valgrind not found"));
    }
    // SHIM_BENCH_CALLGRIND_DIR keeps the callgrind files there, to be read with
    // `callgrind_annotate` (with a shim built unstripped for its symbols).
    let keep = std::env::var_os("SHIM_BENCH_CALLGRIND_DIR").map(PathBuf::from);
    let dir: PathBuf = keep
        .clone()
        .unwrap_or_else(|| ctx.scratch.join("callgrind"));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        return fig.failed(&targets, &e.into());
    }
    fig.columns = vec![
        "per".into(),
        "run 1".into(),
        "run 2".into(),
        "budget".into(),
        "wall-clock counterpart (this run)".into(),
    ];
    let wall = super::relay::last_ratio();
    // (target, budget, units of work, the two counts, wall-clock counterpart, the largest
    // difference allowed between the two runs, as a share of the count).
    let items: [(&str, u64, u64, Twice, String, f64); 4] = [
        (
            targets[0],
            BUDGET_SHIM_EVENT,
            RELAY_EVENTS,
            twice(|t| shim_relay(ctx, &dir, t), "relay"),
            wall.clone(),
            0.001,
        ),
        (
            targets[1],
            BUDGET_LINK_EVENT,
            RELAY_EVENTS,
            twice(|t| link_read(ctx, &dir, t), "link"),
            wall,
            0.0001,
        ),
        (
            targets[2],
            BUDGET_SPAWN,
            SPAWNS,
            twice(|t| shim_spawns(ctx, &dir, t), "spawn"),
            super::exec::last_overhead(),
            0.03,
        ),
        (
            targets[3],
            BUDGET_PLAIN,
            1,
            twice(|t| plain_start(ctx, &dir, t), "plain"),
            super::exec::last_overhead(),
            0.01,
        ),
    ];
    let names = [
        "relay, agent-shim",
        "relay, control-link read path",
        "exec spawn, agent-shim",
        "plain-mode start, agent-shim",
    ];
    let pers = ["event", "event", "spawn", "run"];
    for (i, (text, budget, per, (a, b), counterpart, spread)) in items.into_iter().enumerate() {
        let fmt = |r: &Result<u64>| match r {
            Ok(n) => format!("{} ({n} in all)", n / per),
            Err(e) => format!("— ({e:#})"),
        };
        fig.rows.push((
            names[i].into(),
            vec![
                pers[i].into(),
                fmt(&a),
                fmt(&b),
                budget.to_string(),
                counterpart,
            ],
        ));
        match (&a, &b) {
            (Ok(x), Ok(y)) => {
                let (px, py) = (x / per, y / per);
                let worst = px.max(py);
                let diff = x.abs_diff(*y);
                let share = diff as f64 / (*x).max(1) as f64;
                let ok = worst <= budget && share <= spread;
                let how = if diff == 0 {
                    "both runs the same to the instruction".to_owned()
                } else {
                    format!(
                        "the runs differ by {diff} instructions in all ({:.3}%; at most {:.1}% \
                         allowed)",
                        100.0 * share,
                        100.0 * spread
                    )
                };
                fig.targets.push(Target::check(
                    text,
                    ok,
                    format!("{worst} per {} vs budget {budget}; {how}", pers[i]),
                ));
            }
            (Err(e), _) | (_, Err(e)) => fig
                .targets
                .push(Target::not_measured(text, format!("{e:#}"))),
        }
    }
    if keep.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    fig
}
