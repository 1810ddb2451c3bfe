//! A slow reader never freezes the shim or grows its memory: with nobody reading its stderr
//! the shim still answers `status` and stops on SIGTERM; unacknowledged driver output keeps
//! the replay buffer bounded; a chatty driver behind a full buffer is not taken for hung; a
//! large task is delivered to a driver that reads it slowly.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use driver_protocol::message::{DriverState, Event, TaskStatus};
use rmpv::Value;

use super::{ack_until, done_of, input, kinds, Setup};
use crate::support::{in_both_modes, Mode, PATIENCE};

/// A driver that never says hello and writes long lines to its stderr as fast as it can.
const SPEW: &str = "exec yes 'a driver output line long enough to fill a pipe quickly: \
                    0123456789012345678901234567890123456789012345678901234567890123456789' >&2";

in_both_modes! {
    // With nobody reading the shim's stderr and the driver writing lines as fast as
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

    // While nobody acknowledges, driver output lines do not grow the replay buffer
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

    // While the event buffer is full (nobody acknowledges), a chatty but healthy
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

    // A legal 3 MiB task is delivered and completes (the driver reads it, slowly
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
}
