//! Tasks when the driver exits: none is handed to a driver that already exited (each runs on
//! a fresh one), and every accepted task gets its `task_done` before the shim exits.

use std::time::Duration;

use anyhow::{bail, ensure, Result};
use driver_protocol::message::{ControlToShim, Event, Signal, SignalTarget, TaskStatus};

use super::{ack_until, done_of, input, kinds, Setup};
use crate::support::{in_both_modes, Mode, TempDir, PATIENCE};

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

in_both_modes! {
    // A driver that exits right after its `task_done` is not handed the next task;
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

    // With `--restart never`, a crash ends the shim, and every accepted task gets a
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
