//! Regressions of reviewed defects: a stalled stderr reader, an unbounded replay buffer, a
//! task handed to a dead driver, backpressure taken for a hang, a large task taken for a
//! driver that does not read, and accepted tasks left without a `task_done` at exit.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use driver_protocol::message::{
    ControlToShim, DriverState, Event, Signal, SignalTarget, TaskStatus,
};
use rmpv::Value;

use super::{done_of, input, kinds, Setup};
use crate::support::control::Stamped;
use crate::support::{in_both_modes, Mode, TempDir, PATIENCE};

/// A driver that never says hello and writes long lines to its stderr as fast as it can.
const SPEW: &str = "exec yes 'a driver output line long enough to fill a pipe quickly: \
                    0123456789012345678901234567890123456789012345678901234567890123456789' >&2";

/// A Python driver that says on stderr which task it got, answers it with `task_done` and
/// exits 1 right after.
const DONE_THEN_EXIT: &str = r#"
import os, socket, struct, sys, time, msgpack
s = socket.socket(fileno=int(os.environ["AGENT_SHIM_FD"]))
def send(m):
    b = msgpack.packb(m, use_bin_type=True)
    s.sendall(struct.pack(">I", len(b)) + b)
buf = b""
def recv():
    global buf
    while True:
        if len(buf) >= 4:
            n = struct.unpack(">I", buf[:4])[0]
            if len(buf) >= 4 + n:
                m = msgpack.unpackb(buf[4:4 + n], raw=False)
                buf = buf[4 + n:]
                return m
        d = s.recv(65536)
        if not d:
            sys.exit(2)
        buf += d
send({"type": "hello", "protocol": "agent-shim", "versions": [1], "role": "driver",
      "software": "done-then-exit", "software_version": "0", "capabilities": []})
send({"type": "ready"})
while True:
    m = recv()
    if m["type"] == "task":
        print("got task " + m["task_id"], file=sys.stderr, flush=True)
        time.sleep(0.2)
        send({"type": "task_done", "task_id": m["task_id"], "status": "succeeded",
              "output": "x"})
        os._exit(1)
    elif m["type"] == "ping":
        send({"type": "pong", "re": m["id"]})
"#;

/// Reads and acknowledges events until `pred` matches one (at most [`PATIENCE`]); returns
/// every event read.
fn ack_until(
    sup: &mut super::Sup,
    what: &str,
    pred: impl Fn(&Event) -> bool,
) -> Result<Vec<Stamped>> {
    let deadline = Instant::now() + PATIENCE;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match sup.ctl.try_next_stamped(left)? {
            Some(s) => {
                sup.ctl.ack(s.seq)?;
                let hit = pred(&s.event);
                seen.push(s);
                if hit {
                    return Ok(seen);
                }
            }
            None => bail!(
                "no {what} within {PATIENCE:?}; last kinds {:?}\n{}",
                kinds(&seen[seen.len().saturating_sub(20)..]),
                sup.context()
            ),
        }
    }
}

in_both_modes! {
    // Item 1: with nobody reading the shim's stderr and the driver writing lines as fast as
    // it can, `status` is still answered and SIGTERM still stops the shim.
    fn a_stalled_stderr_reader_does_not_freeze_the_shim(mode: Mode) -> Result<()> {
        let mut sup = Setup::new(mode)
            .stderr_unread()
            .flag("--ready-timeout", "60s")
            .flag("--grace", "2s")
            .driver_cmd(["sh", "-c", SPEW])
            .start()?;
        sup.expect_started(1)?;
        // The pipe (64 KiB) and the shim's queue (256 KiB) are full well before this.
        std::thread::sleep(Duration::from_millis(1500));
        let mut slowest = Duration::ZERO;
        for _ in 0..10 {
            let asked = Instant::now();
            let s = sup.ctl.status_within(Duration::from_secs(5))?;
            slowest = slowest.max(asked.elapsed());
            ensure!(s.state == DriverState::Starting, "{s:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
        let sent = Instant::now();
        sup.shim.signal(libc::SIGTERM)?;
        let code = sup.shim.wait_code(PATIENCE)?;
        let took = sent.elapsed();
        sup.shim.read_stderr();
        eprintln!("MEASURED ({mode:?}): slowest status {slowest:?}; exit {code} {took:?} after SIGTERM");
        ensure!(code == 128 + libc::SIGTERM, "exit code {code}\n{}", sup.shim.context());
        // The grace (2 s), then at most 2 s for the unacknowledged events.
        ensure!(took < Duration::from_secs(6), "took {took:?} after SIGTERM (grace 2 s)");
        Ok(())
    }

    // Item 5: while nobody acknowledges, driver output lines do not grow the replay buffer
    // past its bound; once there is room, one "lines suppressed" event reports them.
    fn unacknowledged_driver_output_keeps_the_buffer_bounded(mode: Mode) -> Result<()> {
        let mut sup = Setup::new(mode)
            .flag("--event-buffer", "100")
            .flag("--log-rate", "0")
            .flag("--ready-timeout", "60s")
            .driver_cmd(["sh", "-c", SPEW])
            .start()?;
        sup.expect_started(1)?;
        let first = sup.status()?;
        let mut worst = 0;
        let mut last = first.clone();
        for _ in 0..15 {
            std::thread::sleep(Duration::from_millis(200));
            last = sup.status()?;
            worst = worst.max(last.buffered_events);
        }
        eprintln!(
            "MEASURED ({mode:?}): buffered events at most {worst}; rss {} -> {} KiB",
            first.rss_bytes >> 10,
            last.rss_bytes >> 10
        );
        ensure!(worst <= 100 + 8, "buffered_events {worst} (bound 100)\n{}", sup.context());
        ensure!(
            last.rss_bytes < first.rss_bytes + (16 << 20),
            "rss grew from {} to {}",
            first.rss_bytes,
            last.rss_bytes
        );
        // A submit while the buffer is full is refused, not accepted past the bound.
        let reply = sup.ctl.submit("refused", "x".into())?;
        ensure!(
            matches!(&reply, driver_protocol::message::ShimToControl::Error(e)
                if e.code == driver_protocol::ErrorCode::Limit),
            "{reply:?}"
        );
        ack_until(&mut sup, "lines suppressed", |e| {
            matches!(e, Event::Log(l) if l.text.ends_with("lines suppressed"))
        })?;
        Ok(())
    }

    // Item 2: a driver that exits right after its `task_done` is not handed the next task;
    // every task runs on a fresh driver and succeeds.
    fn no_task_goes_to_a_driver_that_already_exited(mode: Mode) -> Result<()> {
        let Some(python) = std::env::var_os("AGENT_SHIM_PYTHON").filter(|p| !p.is_empty()) else {
            return crate::support::skip("python", "AGENT_SHIM_PYTHON not set", module_path!());
        };
        let dir = TempDir::new("done-then-exit")?;
        let script = dir.path().join("driver.py");
        std::fs::write(&script, DONE_THEN_EXIT)?;
        // The event buffer is full once the driver logs that it got A (4 start events, 3
        // task_accepted, that log): the shim reads its socket no more, so A's task_done is
        // read only after the driver was reaped, deterministically.
        let mut sup = Setup::new(mode)
            .flag("--restart", "always")
            .flag("--event-buffer", "8")
            .driver_cmd([python, script.into_os_string()])
            .start()?;
        for t in ["A", "B", "C"] {
            sup.submit(t, "x".into())?;
        }
        std::thread::sleep(Duration::from_millis(1000));
        let seen = ack_until(&mut sup, "task_done of B", |e| done_of(e, "B"))?;
        for t in ["A", "B"] {
            let done = seen.iter().find_map(|s| match &s.event {
                Event::TaskDone(d) if d.task_id == t => Some(d.clone()),
                _ => None,
            });
            ensure!(
                done.as_ref().is_some_and(|d| d.status == TaskStatus::Succeeded),
                "task {t}: {done:?} (sent to a driver that had exited?): {:?}",
                kinds(&seen)
            );
        }
        Ok(())
    }

    // Item 3: while the event buffer is full (nobody acknowledges), a chatty but healthy
    // driver is not taken for hung; afterwards the client gets every event.
    fn backpressure_is_not_a_hang(mode: Mode) -> Result<()> {
        let mut sup = Setup::new(mode)
            .flag("--event-buffer", "50")
            .flag("--ping-interval", "300ms")
            .flag("--ping-misses", "2")
            .start()?;
        sup.expect_up(1)?;
        let words = vec!["w"; 2000].join(" ");
        sup.submit("chatty", input([("text", words.into())]))?;
        std::thread::sleep(Duration::from_secs(3));
        let seen = ack_until(&mut sup, "task_done of chatty", |e| done_of(e, "chatty"))?;
        let exits: Vec<_> = seen
            .iter()
            .filter(|s| matches!(s.event, Event::DriverExited(_)))
            .collect();
        ensure!(exits.is_empty(), "the driver exited: {exits:?}");
        let chunks = seen
            .iter()
            .filter(|s| matches!(&s.event, Event::MessageChunk(_)))
            .count();
        ensure!(chunks == 2000, "{chunks} chunks of 2000");
        Ok(())
    }

    // Item 4: a legal 3 MiB task is delivered and completes (the driver reads it, slowly
    // or not, so it is not taken for a driver that does not read).
    fn a_large_task_completes(mode: Mode) -> Result<()> {
        let mut sup = Setup::new(mode).start()?;
        sup.expect_up(1)?;
        let big = "z".repeat(3 << 20);
        sup.submit("big", input([("text", "x".into()), ("output", Value::from(big.as_str()))]))?;
        let (done, _, seen) = sup.expect_done("big")?;
        ensure!(done.status == TaskStatus::Succeeded, "{done:?}: {:?}", kinds(&seen));
        ensure!(
            done.output.as_ref().and_then(|o| o.as_str()).map(str::len) == Some(3 << 20),
            "output of {:?} bytes",
            done.output.as_ref().and_then(|o| o.as_str()).map(str::len)
        );
        Ok(())
    }

    // Item 6: with `--restart never`, a crash ends the shim, and every accepted task gets a
    // `task_done` first (the running one failed by the crash, the queued one "shim exiting").
    fn queued_tasks_get_task_done_when_the_shim_exits(mode: Mode) -> Result<()> {
        let mut sup = Setup::new(mode).flag("--restart", "never").start()?;
        sup.expect_up(1)?;
        sup.submit("A", input([("text", "a b c d e f g h".into()), ("delay_ms", 1000.into())]))?;
        sup.submit("B", "queued".into())?;
        sup.wait("the first chunk", |e| matches!(e, Event::MessageChunk(_)))?;
        sup.ctl.expect_ok(|id| {
            ControlToShim::Signal(Signal {
                id,
                signal: "KILL".to_owned(),
                target: SignalTarget::Driver,
                exec_id: None,
            })
        })?;
        let rest = match sup.ctl.until_closed(PATIENCE) {
            Ok(rest) => rest,
            Err(e) => bail!("{e:#}\n{}", sup.shim.context()),
        };
        let done = |id: &str| {
            rest.iter().find_map(|s| match &s.event {
                Event::TaskDone(d) if d.task_id == id => Some(d.clone()),
                _ => None,
            })
        };
        let (Some(a), Some(b)) = (done("A"), done("B")) else {
            bail!("missing task_done: {:?}", kinds(&rest));
        };
        ensure!(a.status == TaskStatus::Failed, "{a:?}");
        ensure!(
            b.status == TaskStatus::Failed && b.error.as_deref() == Some("shim exiting"),
            "{b:?}"
        );
        let code = sup.shim.wait_code(PATIENCE)?;
        ensure!(code == 128 + libc::SIGKILL, "exit code {code}");
        Ok(())
    }
}
