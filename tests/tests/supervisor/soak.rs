//! The soak: tasks, driver crashes and restarts, execs and control reconnects, continuously,
//! for `AGENT_SHIM_SOAK_SECS` seconds (default 600). Not in the default run (`#[ignore]`):
//!
//! ```text
//! AGENT_SHIM_SOAK_SECS=600 cargo nextest run -p agent-shim-tests --run-ignored only \
//!     --no-capture -E 'test(soak)'
//! ```
//!
//! At the end it prints and checks: the shim's fd count flat (the same as after the warm-up),
//! no zombie among the shim's children, RSS flat within 25 % + 1 MiB of the warm-up figure,
//! every task with exactly one `task_done`, and every event seen once (the client checks that
//! the seqs run on without a gap or a duplicate across every reconnect).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use driver_protocol::message::{DriverState, Event, Exec};

use super::{crash, Setup};
use crate::support::control::ControlClient;
use crate::support::process::{children_of, state_of};
use crate::support::{is_root, Mode, PATIENCE};

/// The figures compared between the warm-up and the end.
#[derive(Debug, Clone, Copy)]
struct Figures {
    fds: usize,
    rss: u64,
    zombies: usize,
}

fn figures(shim: libc::pid_t, rss: u64) -> Result<Figures> {
    let fds = std::fs::read_dir(format!("/proc/{shim}/fd"))?.count();
    let zombies = children_of(shim)
        .into_iter()
        .filter(|&p| state_of(p) == Some('Z'))
        .count();
    Ok(Figures { fds, rss, zombies })
}

fn exec_req(id: u64) -> Exec {
    Exec {
        id,
        argv: vec!["sh".into(), "-c".into(), "echo soak".into()],
        env: BTreeMap::new(),
        cwd: None,
        user: None,
        tty: None,
        stdin: false,
        timeout_ms: Some(10_000),
        output_cap: None,
        task_id: None,
        limits: None,
        tag: None,
    }
}

#[test]
#[ignore = "the soak runs for minutes: AGENT_SHIM_SOAK_SECS, --run-ignored only"]
fn soak() -> Result<()> {
    let secs: u64 = std::env::var("AGENT_SHIM_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let mode = if is_root() {
        Mode::Pid1
    } else {
        Mode::Subreaper
    };
    let mut sup = Setup::new(mode)
        .flag("--crash-loop-restarts", "1000000")
        .flag("--backoff-max", "200ms")
        .flag("--backoff-reset", "1s")
        .start()?;
    sup.expect_up(1)?;
    let shim = sup.shim.pid();
    let mut accepted: BTreeMap<String, u32> = BTreeMap::new();
    let mut done: BTreeMap<String, u32> = BTreeMap::new();
    let (mut crashes, mut execs, mut reconnects, mut events) = (0u64, 0u64, 0u64, 0u64);
    let start = Instant::now();
    let warmup = Duration::from_secs(secs.min(600) / 10).max(Duration::from_secs(2));
    let mut base: Option<Figures> = None;
    let mut round = 0u64;
    while start.elapsed() < Duration::from_secs(secs) {
        round += 1;
        let task = format!("s{round}");
        let input = if round % 3 == 0 {
            crashes += 1;
            crash(3)
        } else {
            "soak one two three".into()
        };
        sup.ctl.submit_ok(&task, input)?;
        // Until this task's task_done; count every task event on the way.
        loop {
            let s = sup.ctl.next_stamped(PATIENCE)?;
            sup.ctl.ack(s.seq)?;
            events += 1;
            match &s.event {
                Event::TaskAccepted(a) => *accepted.entry(a.task_id.clone()).or_default() += 1,
                Event::TaskDone(d) => {
                    *done.entry(d.task_id.clone()).or_default() += 1;
                    if d.task_id == task {
                        break;
                    }
                }
                _ => {}
            }
        }
        if round % 3 == 0 {
            sup.status_until("the driver back after a crash", |s| {
                s.state == DriverState::Ready
            })?;
        }
        let started = sup.ctl.exec_started(exec_req)?;
        let run = sup.ctl.exec_run(started.exec_id, PATIENCE)?;
        ensure!(run.stdout == b"soak\n", "exec output {:?}", run.stdout);
        execs += 1;
        if round % 5 == 0 {
            // A new control plane takes over where the old one stopped.
            let cursor = sup.ctl.last_seq();
            let mut next = ControlClient::connect(&sup.sock, PATIENCE)?;
            next.continue_ids(&sup.ctl);
            next.resume_from(cursor)?;
            sup.ctl = next;
            reconnects += 1;
        }
        if base.is_none() && start.elapsed() >= warmup {
            let rss = sup.status()?.rss_bytes;
            base = Some(figures(shim, rss)?);
            eprintln!("soak: after warm-up ({warmup:?}, {round} rounds): {base:?}");
        }
    }
    // Settle: nothing running, every exit reaped.
    let s = sup.status_until("idle and ready", |s| {
        s.state == DriverState::Ready && s.execs_running == 0 && s.task_running.is_none()
    })?;
    std::thread::sleep(Duration::from_millis(300));
    let end = figures(shim, sup.status()?.rss_bytes)?;
    let base = base.unwrap_or(end);
    let lost: Vec<_> = accepted
        .iter()
        .filter(|(t, &n)| done.get(*t).copied() != Some(n))
        .collect();
    let dup = done.values().filter(|&&n| n > 1).count();
    eprintln!(
        "soak: {:?}, {round} rounds: {} tasks, {crashes} crashes+restarts, {execs} execs, \
         {reconnects} reconnects, {events} events (last seq {}), restarts {}",
        start.elapsed(),
        accepted.len(),
        s.last_seq,
        s.restarts
    );
    eprintln!(
        "soak: fds {} -> {}; zombies {}; rss {} KiB -> {} KiB; lost {}, duplicated {}",
        base.fds,
        end.fds,
        end.zombies,
        base.rss >> 10,
        end.rss >> 10,
        lost.len(),
        dup
    );
    ensure!(end.fds == base.fds, "fd count moved: {base:?} -> {end:?}");
    ensure!(end.zombies == 0, "zombies: {end:?}");
    ensure!(
        end.rss <= base.rss + base.rss / 4 + (1 << 20),
        "rss grew: {base:?} -> {end:?}"
    );
    ensure!(
        lost.is_empty() && dup == 0,
        "lost {lost:?}, duplicated {dup}"
    );
    ensure!(
        accepted.len() as u64 == round,
        "{} accepted of {round}",
        accepted.len()
    );
    Ok(())
}
