//! bench-driver: the fastest honest driver, for the event relay and round trip figures.
//!
//! It speaks the driver side of the protocol (`docs/PROTOCOL.md` §7) with `driver-protocol`'s
//! blocking API on one thread. A `task` whose input is a map `{events: N, size: S}` makes it
//! write N `custom` events whose bodies are exactly S bytes (when S allows), as fast as the
//! socket takes them: the body is encoded once and written as a frame N times through the
//! writer's buffer, so a burst costs one `write` per 64 KiB. Any other task is ended at once
//! with its input as its output: the round-trip probe. It answers `ping`, `pause`, `resume`
//! and `shutdown` like any driver.
//!
//! For the instruction counts (run under callgrind, where a count must not depend on timing),
//! a burst task may also carry `sndbuf` (bytes: the socket's send buffer is raised to hold the
//! whole burst, `SO_SNDBUFFORCE`), `hold_ms` (a pause between reading the task and writing
//! the burst, in which the bench stops the shim) and `mark` (a path: `<mark>.read` is created
//! once the task is read, `<mark>.written` once the burst and the `task_done` are written):
//! the burst then waits whole in the socket.

use driver_protocol::blocking::{FrameReader, FrameWriter};
use driver_protocol::message::{
    Custom, DriverToShim, ErrorMsg, Event, Hello, Message, OkReply, Paused, Pong, Ready, Role,
    ShimToDriver, Task, TaskDone, TaskStatus,
};
use driver_protocol::ErrorCode;
use rmpv::Value;

fn main() {
    std::process::exit(match run() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("bench-driver: {e:#}");
            1
        }
    });
}

/// The body of a `custom` event of (as nearly as possible) `size` bytes.
fn event_body(size: usize) -> anyhow::Result<Vec<u8>> {
    let make = |pad: usize| {
        Event::Custom(Custom {
            task_id: None,
            kind: "bench".into(),
            data: Value::Binary(vec![0x5a; pad]),
        })
        .to_body()
    };
    let mut pad = size;
    let mut body = make(pad)?;
    for _ in 0..4 {
        if body.len() == size {
            break;
        }
        let over = body.len().saturating_sub(size);
        if over == 0 || over > pad {
            break;
        }
        pad -= over;
        body = make(pad)?;
    }
    Ok(body)
}

fn field(input: &Value, name: &str) -> Option<u64> {
    input
        .as_map()?
        .iter()
        .find(|(k, _)| k.as_str() == Some(name))?
        .1
        .as_u64()
}

/// Raises the send buffer of `sock` to `bytes` (past the system limit: we run as root).
fn force_sndbuf(sock: &std::os::unix::net::UnixStream, bytes: u64) -> anyhow::Result<()> {
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
        anyhow::bail!("SO_SNDBUFFORCE: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn run() -> anyhow::Result<()> {
    let stream = agent_shim_examples::shim_socket()?;
    let mut reader = FrameReader::new(stream.try_clone()?);
    let mut out = FrameWriter::new(stream);
    out.send(&DriverToShim::Hello(Hello::new(
        Role::Driver,
        "bench-driver",
        env!("CARGO_PKG_VERSION"),
    )))?;
    match reader.read_message::<ShimToDriver>()? {
        Some(ShimToDriver::Hello(_)) => {}
        Some(other) => anyhow::bail!("expected hello, got {}", other.type_name()),
        None => return Ok(()),
    }
    out.send(&DriverToShim::Ready(Ready { re: None }))?;
    while let Some(msg) = reader.read_message::<ShimToDriver>()? {
        match msg {
            ShimToDriver::Task(task) => run_task(&mut out, task)?,
            ShimToDriver::Ping(p) => out.send(&DriverToShim::Pong(Pong { re: p.id }))?,
            ShimToDriver::Pause(p) => out.send(&DriverToShim::Paused(Paused { re: Some(p.id) }))?,
            ShimToDriver::Resume(r) => out.send(&DriverToShim::Ready(Ready { re: Some(r.id) }))?,
            ShimToDriver::Cancel(c) => out.send(&DriverToShim::Error(ErrorMsg {
                re: Some(c.id),
                code: ErrorCode::NotFound,
                message: format!("task {} is not running", c.task_id),
                task_id: None,
                first_available: None,
            }))?,
            ShimToDriver::Shutdown(s) => {
                out.send(&DriverToShim::Ok(OkReply {
                    re: s.id,
                    duplicate: None,
                }))?;
                return Ok(());
            }
            _ => {}
        }
    }
    Ok(())
}

fn run_task(
    out: &mut FrameWriter<std::os::unix::net::UnixStream>,
    task: Task,
) -> anyhow::Result<()> {
    let burst = field(&task.input, "events").zip(field(&task.input, "size"));
    let mark = task
        .input
        .as_map()
        .and_then(|m| m.iter().find(|(k, _)| k.as_str() == Some("mark")))
        .and_then(|(_, v)| v.as_str())
        .map(str::to_owned);
    let output = match burst {
        Some((events, size)) => {
            let body = event_body(usize::try_from(size)?)?;
            if let Some(mark) = &mark {
                std::fs::write(format!("{mark}.read"), b"")?;
            }
            if let Some(bytes) = field(&task.input, "sndbuf") {
                force_sndbuf(out.get_ref(), bytes)?;
            }
            if let Some(ms) = field(&task.input, "hold_ms") {
                std::thread::sleep(std::time::Duration::from_millis(ms));
            }
            for _ in 0..events {
                out.write_frame(&body)?;
            }
            None
        }
        None => Some(task.input),
    };
    out.send(&DriverToShim::TaskDone(TaskDone {
        task_id: task.task_id,
        status: TaskStatus::Succeeded,
        output,
        error: None,
    }))?;
    if let Some(mark) = mark {
        std::fs::write(format!("{mark}.written"), b"")?;
    }
    Ok(())
}
