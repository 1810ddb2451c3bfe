//! control-link's side of sessions: a `Client` is the consumer `control` by default and,
//! replaced by a newer connection of that consumer, closes with `Error::Replaced` instead of
//! reconnecting over it; an observer `Client` tails beside it and changes nothing for it.

use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use control_link::protocol::message::Event;
use control_link::{Error, TaskSpec};

use crate::control_link::{fast_reconnect, input, runtime, words, LinkShim};
use crate::support::control::{ControlClient, Target};
use crate::support::{Mode, PATIENCE};

#[test]
fn a_replaced_client_closes_with_replaced_and_does_not_fight() -> Result<()> {
    let shim = LinkShim::start(Mode::Subreaper)?;
    runtime()?.block_on(async {
        let client = fast_reconnect().connect(&shim.addr).await?;
        let mut events = client.events()?;
        client.status().await?;
        let target = Target::Unix(shim.sock.clone());
        let newer =
            tokio::task::spawn_blocking(move || ControlClient::connect_to(&target, None, PATIENCE))
                .await??;
        // The event stream ends and the client says why.
        let end =
            tokio::time::timeout(PATIENCE, async { while events.next().await.is_some() {} }).await;
        ensure!(end.is_ok(), "the replaced client's stream never ended");
        match client.close_reason() {
            Some(Error::Replaced { consumer }) => ensure!(consumer == "control"),
            other => bail!("close reason {other:?}"),
        }
        // It does not come back: the newer connection stays up.
        tokio::time::sleep(Duration::from_millis(500)).await;
        ensure!(!client.is_connected() && client.is_closed());
        let mut newer = newer;
        ensure!(
            newer.status().is_ok(),
            "the newer connection was kicked off"
        );
        Ok(())
    })
}

#[test]
fn an_observer_client_tails_beside_the_consumer() -> Result<()> {
    let shim = LinkShim::start(Mode::Subreaper)?;
    let n = 60;
    runtime()?.block_on(async {
        let client = fast_reconnect().connect(&shim.addr).await?;
        let observer = fast_reconnect().observer(true).connect(&shim.addr).await?;
        let mut tail = observer.events()?;
        let mut events = client.events()?;
        // The observer subscribes from now; give its resume_from a moment to land.
        observer.status().await?;
        client
            .submit_task(TaskSpec::new("long", input(&words(n), 1)))
            .await?;
        let mut seen = Vec::new();
        loop {
            let (seq, event) = tokio::time::timeout(PATIENCE, events.next())
                .await
                .context("consumer events stopped")?
                .context("consumer stream ended")?;
            let done = matches!(&event, Event::TaskDone(d) if d.task_id == "long");
            seen.push(seq);
            if done {
                break;
            }
        }
        let mut tailed = Vec::new();
        loop {
            let (seq, event) = tokio::time::timeout(PATIENCE, tail.next())
                .await
                .context("observer events stopped")?
                .context("observer stream ended")?;
            tailed.push(seq);
            if matches!(&event, Event::TaskDone(d) if d.task_id == "long") {
                break;
            }
        }
        let want: Vec<u64> = (seen[0]..=*seen.last().unwrap_or(&0)).collect();
        ensure!(seen == want, "the consumer's events: {seen:?}");
        ensure!(
            tailed.last() == seen.last() && tailed.windows(2).all(|w| w[1] == w[0] + 1),
            "the observer's: {tailed:?}"
        );
        ensure!(client.close_reason().is_none());
        Ok(())
    })
}
