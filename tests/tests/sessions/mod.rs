//! Many control sessions at once, end to end (PROTOCOL.md §8.7): durable consumers with their
//! own positions, observers that never slow anything, and every refusal, against the real
//! shim over real unix sockets.

mod consumers;
mod link;
mod observers;
mod refusals;
mod registry;

use std::time::Duration;

use anyhow::{bail, Result};
use driver_protocol::message::{Event, ShimToControl};

use crate::support::control::ControlClient;

/// Reads events (acknowledging each one) until `done` says so or `timeout` passes; returns
/// the seqs read. The client's own check makes each seq exactly one more than the last.
pub fn read_until(
    c: &mut ControlClient,
    timeout: Duration,
    mut done: impl FnMut(&Event) -> bool,
) -> Result<Vec<u64>> {
    let deadline = std::time::Instant::now() + timeout;
    let mut seqs = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            bail!(
                "not done within {timeout:?} (read {seqs:?})\n{}",
                c.context()
            );
        }
        if let Some(s) = c.try_next_stamped(left)? {
            seqs.push(s.seq);
            c.ack(s.seq)?;
            if done(&s.event) {
                return Ok(seqs);
            }
        }
    }
}

/// The `task_done` of `task_id`.
pub fn done_of(task_id: &str) -> impl Fn(&Event) -> bool + '_ {
    move |e| matches!(e, Event::TaskDone(t) if t.task_id == task_id)
}

/// The next message that is not an event (`None`: none within `timeout`).
pub fn next_non_event(c: &mut ControlClient, timeout: Duration) -> Result<Option<ShimToControl>> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        match c.next_msg(left)? {
            Some(ShimToControl::Event(_)) => {}
            other => return Ok(other),
        }
    }
}
