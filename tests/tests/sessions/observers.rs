//! Observers: sixteen of them beside the consumer, one stalled. The consumer loses nothing,
//! no observer loses anything silently (what it misses is announced by `lagged`), and the
//! stalled one lags instead of slowing anything.

use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Result};
use driver_protocol::message::{Event, Exec, ShimToControl};

use crate::supervisor::Setup;
use crate::support::control::{ControlClient, Target};
use crate::support::{Mode, PATIENCE};

/// Bytes the exec writes: twice the default event buffer (8 MiB), and more than the
/// stalled socket's buffers hold.
const OUTPUT: u64 = 16 * 1024 * 1024;

/// What one observer saw: exec output bytes, events, and what `lagged` said it missed.
#[derive(Debug, Default)]
struct Seen {
    bytes: u64,
    events: u64,
    missed: u64,
    lagged: u32,
    last_seq: u64,
}

/// Reads as an observer until the exec's `exec_exit` or seq `end` (or `deadline`), checking
/// that seqs only ever increase by one, except across a `lagged` that says exactly by how
/// much.
fn observe(mut c: ControlClient, exec_id: u64, end: u64, deadline: Instant) -> Result<Seen> {
    let mut seen = Seen::default();
    loop {
        if seen.last_seq >= end {
            return Ok(seen);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("observer not done: {seen:?}");
        }
        match c.next_msg(left)? {
            Some(ShimToControl::Event(env)) => {
                ensure!(
                    seen.last_seq == 0 || env.seq == seen.last_seq + 1,
                    "seq {} after {} without lagged",
                    env.seq,
                    seen.last_seq
                );
                seen.last_seq = env.seq;
                seen.events += 1;
                match env.event {
                    Event::ExecOutput(o) if o.exec_id == exec_id => {
                        seen.bytes += o.data.len() as u64
                    }
                    Event::ExecExit(x) if x.exec_id == exec_id => return Ok(seen),
                    _ => {}
                }
            }
            Some(ShimToControl::Lagged(l)) => {
                ensure!(
                    seen.last_seq == 0 || l.next_seq == seen.last_seq + l.missed + 1,
                    "lagged {l:?} after seq {}",
                    seen.last_seq
                );
                seen.missed += l.missed;
                seen.lagged += 1;
                seen.last_seq = l.next_seq - 1;
            }
            Some(other) => bail!("observer got {other:?}"),
            None => {}
        }
    }
}

#[test]
fn sixteen_observers_and_a_consumer_one_stalled() -> Result<()> {
    let mut sup = Setup::new(Mode::Pid1)
        .flag("--max-sessions", "17")
        .start()?;
    let target = Target::Unix(sup.sock.clone());
    let last = sup.status()?.last_seq;
    let mut observers = Vec::new();
    for _ in 0..15 {
        let mut o = ControlClient::connect_as(&target, None, PATIENCE, None)?;
        o.send(driver_protocol::message::ResumeFrom::after(last))?;
        observers.push(o);
    }
    // The stalled one: subscribed, and never read from until the end.
    let mut stalled = ControlClient::connect_as(&target, None, PATIENCE, None)?;
    stalled.send(driver_protocol::message::ResumeFrom::after(last))?;
    // A 17th session past --max-sessions is refused (an observer).
    let mut extra = ControlClient::connect_as(&target, None, PATIENCE, None)?;
    match extra.next_msg(PATIENCE)? {
        Some(ShimToControl::Error(e)) if e.code == driver_protocol::ErrorCode::Limit => {}
        other => bail!("an 18th session got {other:?}"),
    }

    let started = sup
        .ctl
        .exec_started(|id| Exec::new(id, ["sh", "-c", &format!("head -c {OUTPUT} /dev/zero")]))?;
    let exec_id = started.exec_id;
    let deadline = Instant::now() + Duration::from_secs(120);
    let readers: Vec<_> = observers
        .into_iter()
        .map(|o| thread::spawn(move || observe(o, exec_id, u64::MAX, deadline)))
        .collect();
    let run = sup.ctl.exec_run(exec_id, Duration::from_secs(120))?;
    ensure!(
        run.stdout.len() as u64 == OUTPUT,
        "the consumer got {} of {OUTPUT} bytes",
        run.stdout.len()
    );
    for (i, r) in readers.into_iter().enumerate() {
        let seen = r.join().map_err(|_| anyhow!("observer {i} panicked"))??;
        // Nothing silently lost: what an observer did not get, lagged announced.
        ensure!(
            seen.missed > 0 || seen.bytes == OUTPUT,
            "observer {i}: {seen:?}"
        );
        eprintln!("observer {i}: {seen:?}");
    }
    let end = sup.ctl.last_seq();
    let seen = observe(stalled, exec_id, end, Instant::now() + PATIENCE)?;
    ensure!(
        seen.lagged >= 1 && seen.missed > 0,
        "the stalled observer: {seen:?}"
    );
    eprintln!("MEASURED: stalled observer {seen:?}");
    Ok(())
}
