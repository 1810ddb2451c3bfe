//! A Fleet client replaced mid-task (the agent connected again) repeats no event and loses
//! none: each of the agent's seqs comes out of the fleet's stream once.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, ensure, Result};
use control_link::protocol::message::{Event, Seq};
use control_link::{AckMode, Addr, ConnectOptions, Fleet, TaskSpec};

use super::{input, runtime, words, LinkShim};
use crate::support::{Mode, PATIENCE};

/// Connects `agent` to `addr` in `fleet` again while its task streams, and checks every seq
/// of the agent comes out of the fleet's stream once, consecutively, with one `task_done`.
async fn replace_mid_task(fleet: &Fleet, addr: &Addr, ack: AckMode) -> Result<()> {
    let agent = "swap";
    let mut events = fleet.events()?;
    let client = fleet.connect(agent, addr).await?;
    client
        .submit_task(TaskSpec::new("t", input(&words(120), 5)))
        .await?;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut seqs: Vec<Seq> = Vec::new();
    let mut done = 0;
    let mut replaced = false;
    let mut count: BTreeMap<Seq, usize> = BTreeMap::new();
    while done == 0 {
        let Ok(next) = tokio::time::timeout_at(deadline, events.next()).await else {
            bail!("no task_done within {PATIENCE:?}; seqs {seqs:?}");
        };
        let Some((who, seq, event)) = next else {
            bail!("the fleet stream ended")
        };
        ensure!(&*who == agent, "an event of {who}");
        seqs.push(seq);
        *count.entry(seq).or_default() += 1;
        if ack == AckMode::Manual && seq % 7 == 0 {
            fleet.ack(agent, seq);
        }
        match event {
            // Events of the old client are in the stream's channel now: replace it.
            Event::MessageChunk(_) if !replaced && seqs.len() >= 30 => {
                let again = fleet.connect(agent, addr).await?;
                ensure!(client.is_closed(), "the replaced client is still open");
                ensure!(!again.is_closed());
                replaced = true;
            }
            Event::TaskDone(_) => done += 1,
            _ => {}
        }
    }
    // A moment more: nothing may be repeated after the end either.
    let quiet = tokio::time::Instant::now() + Duration::from_millis(500);
    while let Ok(Some((_, seq, event))) = tokio::time::timeout_at(quiet, events.next()).await {
        seqs.push(seq);
        *count.entry(seq).or_default() += 1;
        if matches!(event, Event::TaskDone(_)) {
            done += 1;
        }
    }
    let twice: Vec<Seq> = count
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(s, _)| *s)
        .collect();
    ensure!(replaced, "the task ended before the client was replaced");
    ensure!(
        twice.is_empty(),
        "{ack:?}: seqs handed out twice: {twice:?}"
    );
    ensure!(done == 1, "{ack:?}: {done} task_done");
    super::assert_consecutive(&seqs, 1)?;
    Ok(())
}

/// `Fleet::connect` for an agent already in the fleet, while its events are in flight (in
/// the stream's channel, unacknowledged): the replacement client continues the stream, and
/// no seq comes out twice (nor is any lost), with manual acks (nothing acked: the shim
/// replays everything to the new client) and with automatic ones.
#[test]
fn a_replaced_fleet_client_repeats_no_event() -> Result<()> {
    for ack in [AckMode::Manual, AckMode::Auto] {
        let shim = LinkShim::start_with(Mode::Subreaper, &["--agent-id", "swap"])?;
        runtime()?.block_on(async {
            let fleet = Fleet::new(ConnectOptions::new().ack_mode(ack).cursor_for(|_| 0));
            let result = replace_mid_task(&fleet, &shim.addr, ack).await;
            fleet.close().await;
            result
        })?;
    }
    Ok(())
}
