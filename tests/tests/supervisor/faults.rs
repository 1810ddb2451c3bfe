//! Faults around the shim: a control plane that dies at every step of its handshake and in
//! the middle of a replay, a driver stopped with SIGSTOP, and fd exhaustion (EMFILE) in the
//! shim itself. After each, the shim still serves, and nothing is lost or duplicated.
//! (A slow control plane is in `backpressure.rs`: `backpressure_is_not_a_hang`,
//! `unacknowledged_driver_output_keeps_the_buffer_bounded`.)

use std::io::Write as _;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use driver_protocol::blocking::{FrameReader, FrameWriter};
use driver_protocol::message::{
    ControlToShim, DriverState, Event, Hello, Role, ShimToControl, TaskStatus,
};

use super::{crash, Setup, Sup};
use crate::support::control::{ControlClient, Stamped, Stream, Target};
use crate::support::{in_both_modes, is_root, poll_until, Mode, PATIENCE};

fn one_mode() -> Mode {
    if is_root() {
        Mode::Pid1
    } else {
        Mode::Subreaper
    }
}

/// A fresh client replays everything from seq 1 up to the shim's last seq: returns the
/// events (the client checks that the seqs run 1, 2, 3… with no gap and no duplicate).
fn full_replay(sup: &Sup) -> Result<(ControlClient, Vec<Stamped>)> {
    let mut c = ControlClient::connect(&sup.sock, PATIENCE)?;
    let last = c.status()?.last_seq;
    c.resume_from(0)?;
    let mut got = Vec::new();
    while c.last_seq() < last {
        got.push(c.next_stamped(PATIENCE)?);
    }
    ensure!(
        got.first().map(|s| s.seq) == Some(1),
        "replay starts at {:?}",
        got.first()
    );
    Ok((c, got))
}

/// A task whose echo makes a few events, run to its end on `c`.
fn run_task(c: &mut ControlClient, task_id: &str) -> Result<()> {
    c.submit_ok(task_id, "one two three four five".into())?;
    let (s, _) = c.wait_event(
        |e| matches!(e, Event::TaskDone(d) if d.task_id == task_id),
        PATIENCE,
    )?;
    ensure!(
        matches!(&s.event, Event::TaskDone(d) if d.status == TaskStatus::Succeeded),
        "{s:?}"
    );
    Ok(())
}

in_both_modes! {
    fn a_control_plane_dying_at_each_handshake_step_leaves_the_shim_serving(mode: Mode) -> Result<()> {
        let mut sup = Setup::new(mode).start()?;
        sup.expect_up(1)?;
        run_task(&mut sup.ctl, "before")?;
        let target = Target::Unix(sup.sock.clone());
        let hello = |w: &mut FrameWriter<Stream>| -> Result<()> {
            w.send(&ControlToShim::Hello(Hello::new(Role::Control, "dying", "0")))?;
            Ok(())
        };
        for step in 0..6 {
            let stream = Stream::connect(&target, PATIENCE)?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut w = FrameWriter::new(stream.try_clone()?);
            let mut r = FrameReader::new(stream.try_clone()?);
            match step {
                // Connected, then gone.
                0 => {}
                // Half a frame header.
                1 => {
                    let mut raw = stream.try_clone()?;
                    raw.write_all(&[0, 0])?;
                }
                // Its hello, then gone before the shim's.
                2 => hello(&mut w)?,
                // Both hellos, then gone.
                3 => {
                    hello(&mut w)?;
                    let h = r.read_message::<ShimToControl>()?;
                    ensure!(matches!(h, Some(ShimToControl::Hello(_))), "{h:?}");
                }
                // Handshake done (it replaced the live connection), gone before resuming.
                4 => {
                    let c = ControlClient::over(stream.try_clone()?, None, PATIENCE)?;
                    c.kill();
                }
                // Mid-replay: resumed from 0, read two events, gone.
                _ => {
                    let mut c = ControlClient::over(stream.try_clone()?, None, PATIENCE)?;
                    c.resume_from(0)?;
                    c.next_stamped(PATIENCE)?;
                    c.next_stamped(PATIENCE)?;
                    c.kill();
                }
            }
            stream.shutdown()?;
            drop((w, r, stream));
            ensure!(sup.shim.alive(), "the shim died at step {step}\n{}", sup.context());
        }
        // The shim serves a new control plane: a full replay, then a new task.
        let (mut c, events) = full_replay(&sup)?;
        let before = events
            .iter()
            .filter(|s| matches!(&s.event, Event::TaskDone(d) if d.task_id == "before"))
            .count();
        ensure!(before == 1, "task_done of `before` seen {before} times");
        run_task(&mut c, "after")?;
        Ok(())
    }
}

/// Five control planes in a row die in the middle of a replay of the same events, each after
/// reading a different number of them: the sixth gets every event exactly once, identical.
#[test]
fn control_planes_dying_mid_replay_lose_and_duplicate_nothing() -> Result<()> {
    let mut sup = Setup::new(one_mode()).start()?;
    sup.expect_up(1)?;
    for i in 0..4 {
        run_task(&mut sup.ctl, &format!("t{i}"))?;
    }
    let (first, want) = full_replay(&sup)?;
    drop(first);
    ensure!(want.len() >= 20, "only {} events", want.len());
    for k in [1usize, 3, 7, 12, 19] {
        let mut c = ControlClient::connect(&sup.sock, PATIENCE)?;
        c.resume_from(0)?;
        for _ in 0..k {
            c.next_stamped(PATIENCE)?;
        }
        c.kill();
    }
    let (_, have) = full_replay(&sup)?;
    let strip = |v: &[Stamped]| -> Vec<_> { v.iter().map(|s| (s.seq, s.event.clone())).collect() };
    ensure!(strip(&want) == strip(&have), "replays differ");
    Ok(())
}

/// A driver stopped with SIGSTOP answers no ping: it is killed as hung (SIGKILL reaches a
/// stopped process), reported once, and restarted; the shim answers throughout.
#[test]
fn a_stopped_driver_is_killed_as_hung_and_restarted() -> Result<()> {
    let mut sup = Setup::new(one_mode()).start()?;
    let pid = sup.expect_up(1)?;
    let host = sup.host_pid(pid)?;
    let stopped_at = Instant::now();
    // SAFETY: kill has no memory-safety preconditions; `host` is the driver, ours.
    let stopped = unsafe { libc::kill(host, libc::SIGSTOP) };
    ensure!(stopped == 0, "SIGSTOP failed");
    let s = sup.ctl.status_within(Duration::from_secs(1))?;
    ensure!(s.driver_pid == Some(pid), "{s:?}");
    let (exited, at, _) = sup.expect_exited()?;
    ensure!(
        exited.pid == pid && exited.reason == "hung",
        "{exited:?}\n{}",
        sup.context()
    );
    let after = at.duration_since(stopped_at);
    // Pings every 200 ms, 3 misses.
    ensure!(after < Duration::from_secs(5), "hung after {after:?}");
    let next = sup.expect_up(2)?;
    ensure!(next != pid, "same pid");
    eprintln!("MEASURED: a SIGSTOPped driver was killed as hung after {after:?}");
    Ok(())
}

/// The shim's fd count, from /proc.
fn fds_of(pid: libc::pid_t) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// The shim's CPU time (user + system) in clock ticks.
fn cpu_ticks(pid: libc::pid_t) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("stat format")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let t = |i: usize| -> Result<u64> { Ok(f.get(i).context("stat field")?.parse()?) };
    // utime and stime are fields 14 and 15; after "pid (comm)" they are 11 and 12 (0-based).
    Ok(t(11)? + t(12)?)
}

fn set_nofile(pid: libc::pid_t, soft: u64) -> Result<u64> {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `old` is a valid out pointer; a null new limit only reads.
    if unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) } != 0 {
        bail!("prlimit read: {}", std::io::Error::last_os_error());
    }
    let new = libc::rlimit {
        rlim_cur: soft,
        rlim_max: old.rlim_max,
    };
    // SAFETY: `new` is a valid limit; lowering or restoring the soft limit below the hard one.
    if unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) } != 0 {
        bail!("prlimit set: {}", std::io::Error::last_os_error());
    }
    Ok(old.rlim_cur)
}

/// The shim runs out of file descriptors (EMFILE): relaunching its crashed driver fails and a
/// new control connection cannot be accepted, yet the shim keeps answering on its live
/// connection without spinning; once fds are available again the driver comes back and the
/// waiting connection is served.
#[test]
fn fd_exhaustion_in_the_shim_is_survived_and_recovered_from() -> Result<()> {
    let mut sup = Setup::new(one_mode())
        .flag("--crash-loop-restarts", "1000")
        .flag("--backoff-max", "500ms")
        .start()?;
    let pid = sup.expect_up(1)?;
    let shim = sup.shim.pid();
    let used = fds_of(shim)?;
    let old = set_nofile(shim, u64::try_from(used)?)?;
    // The driver crashes; its fds are freed but a relaunch needs more than that.
    sup.submit("boom", crash(3))?;
    let (exited, _, _) = sup.expect_exited()?;
    ensure!(exited.pid == pid, "{exited:?}");
    // A new control plane knocks while no fd is free, and sends its hello at once (the shim
    // wants it within a second of accepting): it waits in the listen backlog.
    let stream = Stream::connect(&Target::Unix(sup.sock.clone()), PATIENCE)?;
    // It may be accepted with an fd the crashed driver freed, and then becomes the live
    // connection: the shim answers on whichever is live.
    let mut waiting = Some(std::thread::spawn(move || {
        ControlClient::over(stream, None, PATIENCE * 4)
    }));
    let mut served: Option<ControlClient> = None;
    let take_waiting = |waiting: &mut Option<std::thread::JoinHandle<Result<ControlClient>>>,
                        block: bool|
     -> Result<Option<ControlClient>> {
        match waiting.take() {
            Some(t) if block || t.is_finished() => Ok(Some(
                t.join()
                    .map_err(|_| anyhow::anyhow!("the waiting client panicked"))?
                    .context("the connection made during EMFILE")?,
            )),
            other => {
                *waiting = other;
                Ok(None)
            }
        }
    };
    let ticks0 = cpu_ticks(shim)?;
    let mut answered = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(1500) {
        if served.is_none() {
            served = take_waiting(&mut waiting, false)?;
        }
        let s = match served.as_mut() {
            Some(c) => c.status_within(Duration::from_secs(2))?,
            None => match sup.ctl.status_within(Duration::from_secs(2)) {
                Ok(s) => s,
                // Replaced by the waiting client meanwhile.
                Err(_) => {
                    let mut c = take_waiting(&mut waiting, true)?
                        .ok_or_else(|| anyhow::anyhow!("the live connection failed"))?;
                    let s = c.status_within(Duration::from_secs(2))?;
                    served = Some(c);
                    s
                }
            },
        };
        ensure!(
            s.state != DriverState::Ready,
            "a driver came up without fds: {s:?}"
        );
        answered += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let ticks = cpu_ticks(shim)? - ticks0;
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
    let cpu_ms = ticks * 1000 / hz.max(1);
    ensure!(
        sup.shim.alive(),
        "the shim died of EMFILE\n{}",
        sup.context()
    );
    eprintln!(
        "MEASURED: EMFILE: {answered} status answered in 1.5 s, shim cpu {cpu_ms} ms, fds {used}"
    );
    ensure!(
        cpu_ms < 1000,
        "the shim spun at EMFILE: {cpu_ms} ms of cpu in 1.5 s"
    );
    // The relaunches failed for want of fds: each reported as a start that did not happen.
    let exec_failed = |e: &Event| matches!(e, Event::DriverExited(x) if x.reason == "exec_failed");
    match served.as_mut() {
        Some(c) => {
            c.resume_from(sup.ctl.last_seq())?;
            c.wait_event(exec_failed, Duration::from_secs(5))
                .context("driver_exited{exec_failed} while fds are exhausted")?;
        }
        None => {
            sup.wait_within(
                "driver_exited{exec_failed} while fds are exhausted",
                exec_failed,
                Duration::from_secs(5),
            )?;
        }
    }
    set_nofile(shim, old)?;
    // The waiting client is served (and becomes the live connection), and the driver comes
    // back (the restart backoff retries).
    let mut c = match served {
        Some(c) => c,
        None => {
            take_waiting(&mut waiting, true)?.ok_or_else(|| anyhow::anyhow!("no waiting client"))?
        }
    };
    let ready = poll_until(PATIENCE, || {
        c.status()
            .ok()
            .filter(|s| s.state == DriverState::Ready && s.driver_pid.is_some_and(|p| p != pid))
    });
    ensure!(ready.is_some(), "no new driver ready\n{}", sup.context());
    Ok(())
}

/// The whole sandbox is frozen without notice (SIGSTOP of the shim and its driver, as a
/// runtime's freezer does) for 3 s, far past the liveness limit (pings every 200 ms, 3
/// misses), then thawed: to the shim the clock jumped. Its overdue deadlines fire at once, but
/// a driver that answers right after the thaw is not killed as hung, and a task submitted
/// before the freeze completes after it. (With notice, `pause` first: `idle.rs`,
/// `pause_with_the_container`; arbitrary jumps of the core's clock: the `supervisor_core`
/// fuzz target.)
#[test]
fn a_sandbox_frozen_without_notice_keeps_its_driver_after_the_thaw() -> Result<()> {
    let mut sup = Setup::new(one_mode()).start()?;
    let pid = sup.expect_up(1)?;
    let driver = crate::support::process::PidFd::open(sup.host_pid(pid)?)?;
    sup.submit(
        "across",
        super::input([("text", "a b c".into()), ("delay_ms", 300.into())]),
    )?;
    sup.shim.signal(libc::SIGSTOP)?;
    ensure!(driver.signal(libc::SIGSTOP)?, "the driver is gone");
    std::thread::sleep(Duration::from_secs(3));
    ensure!(driver.signal(libc::SIGCONT)?, "the driver is gone");
    sup.shim.signal(libc::SIGCONT)?;
    let (done, _, seen) = sup.expect_done("across")?;
    ensure!(done.status == TaskStatus::Succeeded, "{done:?}");
    let exits: Vec<_> = seen
        .iter()
        .filter(|s| matches!(s.event, Event::DriverExited(_)))
        .collect();
    ensure!(
        exits.is_empty(),
        "the driver was killed after the thaw: {exits:?}"
    );
    let quiet = sup.ctl.events_for(super::QUIET)?;
    ensure!(
        !quiet
            .iter()
            .any(|s| matches!(s.event, Event::DriverExited(_))),
        "the driver was killed after the thaw: {:?}",
        super::kinds(&quiet)
    );
    let s = sup.ctl.status_within(Duration::from_secs(2))?;
    ensure!(
        s.state == DriverState::Ready && s.driver_pid == Some(pid),
        "{s:?}"
    );
    Ok(())
}
