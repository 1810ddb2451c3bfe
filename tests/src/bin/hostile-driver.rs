//! `hostile-driver`: a driver that misbehaves on purpose, so the end-to-end tests can show
//! what the shim survives. It does the handshake properly (so it gets to `ready`), then the
//! one attack named by its argument, and reports what happened on stderr (which the shim
//! turns into `log` events), one fact a line. Nothing here waits forever: every sleep is
//! bounded.
//!
//! ```text
//! hostile-driver half-frame            write a header promising 64 KiB and 10 bytes of it
//! hostile-driver reopen-fd             close the socket's fd and open /dev/null on it
//! hostile-driver flood SECS            write `log` events as fast as possible for SECS
//! hostile-driver signal-pid1           at its first task, kill(1, SIG) for TERM, INT, HUP, USR1,
//!                                      QUIT, KILL, STOP
//! hostile-driver peek LIST             wait (≤ 10 s) for the file LIST, then try to connect to
//!                                      (as a unix socket) and to read each path listed in it
//! hostile-driver exec-flood N BYTES    N exec requests at once (`sleep 5`, a variable of BYTES)
//! hostile-driver exec-then-exit        at its first task, start an exec that outlives SIGTERM,
//!                                      then exit 0 as soon as it says `ready`
//! hostile-driver task-strays           at its first task T: a `custom` event for a task it was
//!                                      not given, a chunk of T, `task_done` for T twice, a
//!                                      chunk of T after its end; prints each `error` notice
//!                                      the shim sends back (`notice CODE TASK`)
//! hostile-driver hold-task             take its first task and never end it (nor exit)
//! hostile-driver big-event             a `custom` event of exactly the largest body the shim
//!                                      relays, then one a byte larger; prints the notices
//! hostile-driver crash-on-task         exit 1 at each task it is given (`crashed TASK ATTEMPT`)
//! ```
//! After its attack it prints `done ...` and sleeps (at most 60 s), answering nothing.

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::os::fd::{AsRawFd as _, FromRawFd as _};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use driver_protocol::blocking::{FrameReader, FrameWriter};
use driver_protocol::message::{
    Custom, DriverToShim, Exec, Hello, Log, LogStream, Message as _, MessageChunk, Ready, Role,
    ShimToDriver, Task, TaskDone, TaskStatus,
};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(fd) = std::env::var("AGENT_SHIM_FD")
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    else {
        eprintln!("no AGENT_SHIM_FD");
        std::process::exit(2);
    };
    // SAFETY: the shim hands us this descriptor, open, for the life of the process; nothing
    // else here owns it.
    let sock = unsafe { UnixStream::from_raw_fd(fd) };
    let Ok(read_half) = sock.try_clone() else {
        std::process::exit(2);
    };
    let mut reader = FrameReader::new(read_half);
    let mut writer = FrameWriter::new(sock);
    // The handshake: their hello, ours, ready.
    let _ = reader.read_message::<ShimToDriver>();
    send(
        &mut writer,
        &DriverToShim::Hello(Hello::new(Role::Driver, "hostile-driver", "1")),
    );
    send(&mut writer, &DriverToShim::Ready(Ready { re: None }));
    let mode = args.first().map(String::as_str).unwrap_or("");
    match mode {
        "half-frame" => {
            let Ok(mut raw) = writer.into_inner() else {
                std::process::exit(3);
            };
            let mut frame = (64u32 << 10).to_be_bytes().to_vec();
            frame.extend_from_slice(b"\x81\xa4type\xa3log");
            let _ = raw.write_all(&frame);
            eprintln!("done half-frame");
        }
        "reopen-fd" => {
            drop(writer);
            drop(reader);
            let null = File::open("/dev/null").map(|f| {
                // SAFETY: dup2 onto the fd number we just closed; both are ours.
                unsafe { libc::dup2(f.as_raw_fd(), fd) }
            });
            eprintln!("done reopen-fd {null:?}");
        }
        "flood" => {
            let secs = arg_u64(&args, 1).unwrap_or(5);
            let until = Instant::now() + Duration::from_secs(secs);
            let mut n = 0u64;
            let text = "x".repeat(200);
            while Instant::now() < until {
                let log = Log {
                    task_id: None,
                    stream: LogStream::Driver,
                    level: Some("info".into()),
                    text: text.clone(),
                    truncated: false,
                };
                if writer.send(&DriverToShim::Log(log)).is_err() {
                    break;
                }
                n += 1;
            }
            eprintln!("done flood {n}");
        }
        "signal-pid1" => {
            // The first task is the go: the control plane is watching by then.
            wait_task(&mut reader);
            for (name, sig) in [
                ("TERM", libc::SIGTERM),
                ("INT", libc::SIGINT),
                ("HUP", libc::SIGHUP),
                ("USR1", libc::SIGUSR1),
                ("QUIT", libc::SIGQUIT),
                ("KILL", libc::SIGKILL),
                ("STOP", libc::SIGSTOP),
            ] {
                // SAFETY: kill has no memory-safety preconditions.
                let r = unsafe { libc::kill(1, sig) };
                let how = if r == 0 {
                    "sent".to_owned()
                } else {
                    format!("refused {}", std::io::Error::last_os_error())
                };
                eprintln!("kill 1 {name}: {how}");
            }
            eprintln!("done signal-pid1");
        }
        "peek" => {
            let list = args.get(1).cloned().unwrap_or_default();
            let until = Instant::now() + Duration::from_secs(10);
            let mut paths = String::new();
            while Instant::now() < until {
                if let Ok(s) = std::fs::read_to_string(&list) {
                    if s.ends_with('\n') {
                        paths = s;
                        break;
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            for path in paths.lines() {
                match UnixStream::connect(path) {
                    Ok(_) => eprintln!("connect {path}: connected"),
                    Err(e) => eprintln!("connect {path}: denied {e}"),
                }
                let mut buf = Vec::new();
                match File::open(path).and_then(|mut f| f.read_to_end(&mut buf)) {
                    Ok(n) => eprintln!("read {path}: read {n} bytes"),
                    Err(e) => eprintln!("read {path}: denied {e}"),
                }
            }
            eprintln!("done peek");
        }
        "exec-flood" => {
            let n = arg_u64(&args, 1).unwrap_or(1000);
            let bytes = usize::try_from(arg_u64(&args, 2).unwrap_or(0)).unwrap_or(0);
            let big = "a".repeat(bytes);
            for id in 1..=n {
                let exec = Exec {
                    id,
                    argv: vec!["sleep".into(), "5".into()],
                    env: [("BIG".to_owned(), big.clone())].into(),
                    cwd: None,
                    user: None,
                    tty: None,
                    stdin: false,
                    timeout_ms: Some(u64::MAX),
                    output_cap: Some(u64::MAX),
                    task_id: None,
                    limits: None,
                    tag: None,
                };
                if let Err(e) = writer.write_message(&DriverToShim::Exec(exec)) {
                    eprintln!("exec {id}: not sent: {e}");
                }
            }
            let _ = writer.flush();
            // Count the answers (bounded by time).
            let (mut started, mut refused, mut other) = (0u64, 0u64, 0u64);
            let until = Instant::now() + Duration::from_secs(20);
            let _ = reader
                .get_ref()
                .set_read_timeout(Some(Duration::from_millis(500)));
            while started + refused < n && Instant::now() < until {
                match reader.read_message::<ShimToDriver>() {
                    Ok(Some(ShimToDriver::ExecStarted(_))) => started += 1,
                    Ok(Some(ShimToDriver::Error(_))) => refused += 1,
                    Ok(Some(ShimToDriver::Ping(p))) => {
                        let pong = DriverToShim::Pong(driver_protocol::message::Pong { re: p.id });
                        let _ = writer.send(&pong);
                    }
                    Ok(Some(_)) => other += 1,
                    Ok(None) => break,
                    Err(_) => {}
                }
            }
            eprintln!("done exec-flood started={started} refused={refused} other={other}");
        }
        "exec-then-exit" => {
            // The first task is the go: the control plane is connected by then.
            wait_task(&mut reader);
            // It says `ready` once SIGTERM is ignored (and its children inherit that).
            let script = "trap '' TERM; echo ready; while :; do sleep 0.1; done";
            let exec = Exec {
                id: 1,
                argv: vec!["sh".into(), "-c".into(), script.into()],
                env: Default::default(),
                cwd: None,
                user: None,
                tty: None,
                stdin: false,
                timeout_ms: None,
                output_cap: None,
                task_id: None,
                limits: None,
                tag: None,
            };
            send(&mut writer, &DriverToShim::Exec(exec));
            let mut out = Vec::new();
            while !out.ends_with(b"ready\n") {
                match reader.read_message::<ShimToDriver>() {
                    Ok(Some(ShimToDriver::ExecOutput(o))) => out.extend_from_slice(&o.data),
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => std::process::exit(4),
                }
            }
            eprintln!("done exec-then-exit");
            std::process::exit(0);
        }
        "task-strays" => {
            let task = wait_task(&mut reader).task_id;
            let chunk = |t: &str| {
                DriverToShim::MessageChunk(MessageChunk {
                    task_id: Some(t.to_owned()),
                    text: format!("chunk of {t}"),
                    role: None,
                    is_final: false,
                })
            };
            let done = |t: &str| {
                DriverToShim::TaskDone(TaskDone {
                    task_id: t.to_owned(),
                    status: TaskStatus::Succeeded,
                    output: None,
                    error: None,
                })
            };
            send(
                &mut writer,
                &DriverToShim::Custom(Custom {
                    task_id: Some("never-given".into()),
                    kind: "stray".into(),
                    data: rmpv::Value::Nil,
                }),
            );
            send(&mut writer, &chunk(&task));
            send(&mut writer, &done(&task));
            send(&mut writer, &done(&task));
            send(&mut writer, &chunk(&task));
            print_notices(&mut reader, 3);
            eprintln!("done task-strays");
        }
        "hold-task" => {
            let task = wait_task(&mut reader).task_id;
            eprintln!("done hold-task {task}");
        }
        "big-event" => {
            let largest = big_custom(driver_protocol::envelope::MAX_EVENT_BODY);
            let over = big_custom(driver_protocol::envelope::MAX_EVENT_BODY + 1);
            for body in [&largest, &over] {
                if writer
                    .write_frame(body)
                    .and_then(|()| writer.flush())
                    .is_err()
                {
                    std::process::exit(3);
                }
            }
            eprintln!("sent big-event {} {}", largest.len(), over.len());
            print_notices(&mut reader, 1);
            eprintln!("done big-event");
        }
        "crash-on-task" => {
            let task = wait_task(&mut reader);
            eprintln!("crashed {} {}", task.task_id, task.attempt);
            std::process::exit(1);
        }
        other => {
            eprintln!("unknown mode {other:?}");
            std::process::exit(2);
        }
    }
    std::thread::sleep(Duration::from_secs(60));
}

/// Prints (`notice CODE TASK`) the first `n` `error` notices (no `re`) from the shim,
/// waiting at most 10 s; `notices timed out` if they do not all come.
fn print_notices(reader: &mut FrameReader<UnixStream>, n: usize) {
    let until = Instant::now() + Duration::from_secs(10);
    let _ = reader
        .get_ref()
        .set_read_timeout(Some(Duration::from_millis(200)));
    let mut seen = 0;
    while seen < n && Instant::now() < until {
        match reader.read_message::<ShimToDriver>() {
            Ok(Some(ShimToDriver::Error(e))) if e.re.is_none() => {
                seen += 1;
                eprintln!("notice {} {}", e.code, e.task_id.as_deref().unwrap_or("-"));
            }
            Ok(Some(_)) | Err(_) => {}
            Ok(None) => break,
        }
    }
    if seen < n {
        eprintln!("notices timed out");
    }
}

/// The body of a `custom` event of exactly `len` bytes (over 64 KiB): its `data` a binary
/// of the bytes 0, 1, …, 250, 0, 1, …
fn big_custom(len: usize) -> Vec<u8> {
    let event = |n: usize| {
        DriverToShim::Custom(Custom {
            task_id: None,
            kind: "big".into(),
            data: rmpv::Value::Binary((0..n).map(|i| (i % 251) as u8).collect()),
        })
    };
    // A bin32 of n bytes takes 5 + n; an empty one (bin8) 2.
    let base = event(0).to_body().map(|b| b.len()).unwrap_or(0);
    let n = len.saturating_sub(base + 3);
    let body = event(n).to_body().unwrap_or_default();
    if body.len() != len {
        eprintln!("big-event: body of {} bytes, wanted {len}", body.len());
        std::process::exit(3);
    }
    body
}

/// Waits for the first task (the test's go); exits 4 if the socket ends first.
fn wait_task(reader: &mut FrameReader<UnixStream>) -> Task {
    loop {
        match reader.read_message::<ShimToDriver>() {
            Ok(Some(ShimToDriver::Task(t))) => return t,
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => std::process::exit(4),
        }
    }
}

fn send(w: &mut FrameWriter<UnixStream>, msg: &DriverToShim) {
    if let Err(e) = w.send(msg) {
        eprintln!("send failed: {e}");
        std::process::exit(3);
    }
}

fn arg_u64(args: &[String], i: usize) -> Option<u64> {
    args.get(i).and_then(|a| a.parse().ok())
}
