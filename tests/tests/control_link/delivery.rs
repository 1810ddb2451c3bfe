//! Delivery guarantees: every event exactly once and in order across dropped connections,
//! a request whose reply was lost runs once, and manual acks decide what a new client gets.

use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use control_link::protocol::message::{
    ControlToShim, Event, Message as _, ShimToControl, SubmitTask,
};
use control_link::{AckMode, ConnectOptions, TaskSpec};

use super::{
    assert_consecutive, chunks, fast_reconnect, input, read_until, runtime, within, words, LinkShim,
};
use crate::supervisor::QUIET;
use crate::support::control::ControlClient;
use crate::support::{Mode, PATIENCE};

/// The events `seen` of the task "long" (`n` words) are every seq once from 1, its chunks in
/// order, and nothing more comes after them (the shim's last seq is the last one seen).
async fn all_once_in_order(
    client: &control_link::Client,
    seen: &[(u64, Event)],
    n: usize,
) -> Result<()> {
    let seqs: Vec<u64> = seen.iter().map(|(s, _)| *s).collect();
    assert_consecutive(&seqs, 1)?;
    let want: Vec<String> = words(n).split(' ').map(str::to_owned).collect();
    ensure!(
        chunks(seen, "long") == want,
        "chunks out of order or missing"
    );
    let status = client.status().await?;
    ensure!(status.last_seq == *seqs.last().unwrap_or(&0), "{status:?}");
    Ok(())
}

#[test]
fn exactly_once_across_dropped_connections() -> Result<()> {
    let shim = LinkShim::start(Mode::Subreaper)?;
    let n = 150;
    runtime()?.block_on(async {
        let client = fast_reconnect().connect(&shim.addr).await?;
        let mut events = client.events()?;
        client
            .submit_task(TaskSpec::new("long", input(&words(n), 2)))
            .await?;
        let mut seen = Vec::new();
        let mut drops = 0;
        let deadline = tokio::time::Instant::now() + PATIENCE * 2;
        loop {
            let (seq, event) = tokio::time::timeout_at(deadline, events.next())
                .await
                .context("events stopped")?
                .context("stream ended")?;
            let done = matches!(&event, Event::TaskDone(d) if d.task_id == "long");
            seen.push((seq, event));
            if done {
                break;
            }
            // Every 40 events the connection dies: by the test hook, or (every other time)
            // by an observer connecting and acknowledging everything it is sent, which must
            // change nothing for this consumer. (A second client of the same consumer would
            // replace this one for good: see sessions::link.)
            if seen.len() % 40 == 0 {
                drops += 1;
                client.drop_connection();
                if drops % 2 == 0 {
                    let target = crate::support::control::Target::Unix(shim.sock.clone());
                    tokio::task::spawn_blocking(move || -> Result<()> {
                        let mut o = ControlClient::connect_as(&target, None, PATIENCE, None)?;
                        o.send(control_link::protocol::message::ResumeFrom::now())?;
                        while let Some(msg) = o.next_msg(Duration::from_millis(50))? {
                            if let ShimToControl::Event(env) = msg {
                                o.ack(env.seq)?;
                            }
                        }
                        Ok(())
                    })
                    .await??;
                }
            }
        }
        ensure!(drops >= 3, "only {drops} drops");
        all_once_in_order(&client, &seen, n).await?;
        client.close().await;
        Ok(())
    })
}

#[test]
fn raw_events_exactly_once_across_dropped_connections() -> Result<()> {
    let shim = LinkShim::start(Mode::Subreaper)?;
    let n = 150;
    runtime()?.block_on(async {
        let client = fast_reconnect().connect(&shim.addr).await?;
        let mut events = client.raw_events()?;
        ensure!(
            client.events().is_err(),
            "the stream is taken once, raw or not"
        );
        client
            .submit_task(TaskSpec::new("long", input(&words(n), 2)))
            .await?;
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + PATIENCE * 2;
        loop {
            let raw = tokio::time::timeout_at(deadline, events.next())
                .await
                .context("events stopped")?
                .context("stream ended")?;
            let event = raw.decode()?;
            ensure!(
                raw.type_name() == event.type_name(),
                "type {} read as {}",
                event.type_name(),
                raw.type_name()
            );
            ensure!(
                event.to_body()? == raw.body(),
                "the body is not the event's encoding"
            );
            let done = matches!(&event, Event::TaskDone(d) if d.task_id == "long");
            seen.push((raw.seq(), event));
            if done {
                break;
            }
            if seen.len() % 40 == 0 {
                client.drop_connection();
            }
        }
        all_once_in_order(&client, &seen, n).await?;
        client.close().await;
        Ok(())
    })
}

#[test]
fn a_request_whose_reply_was_lost_runs_once() -> Result<()> {
    let shim = LinkShim::start(Mode::Subreaper)?;
    runtime()?.block_on(async {
        let client = fast_reconnect().connect(&shim.addr).await?;
        let mut events = client.events()?;
        // Written, then the connection drops before the reply is read: the client redials
        // and sends the same id again; the shim answers with the recorded reply.
        client.test_drop_after_next_send();
        client
            .submit_task(TaskSpec::new("lost", input("one two", 0)))
            .await?;
        // Another instance retrying a request by id: the shim replays, executes nothing.
        let id = 0xdead_beef_0000_0001;
        let msg = ControlToShim::SubmitTask(SubmitTask {
            id,
            task_id: "again".into(),
            input: "x".into(),
            output_schema: None,
            timeout_ms: None,
            redeliver: false,
            max_attempts: None,
        });
        for _ in 0..3 {
            let reply = client.test_request(id, msg.clone()).await?;
            ensure!(
                matches!(reply, ShimToControl::Ok(ref ok) if ok.re == id),
                "{reply:?}"
            );
        }
        let mut got = read_until(
            &mut events,
            PATIENCE,
            |e| matches!(e, Event::TaskDone(d) if d.task_id == "again"),
        )
        .await?;
        // Watch a while longer for a second run.
        let quiet_until = tokio::time::Instant::now() + QUIET;
        while let Ok(Some(ev)) = tokio::time::timeout_at(quiet_until, events.next()).await {
            got.push(ev);
        }
        for task in ["lost", "again"] {
            let accepted = got
                .iter()
                .filter(|(_, e)| matches!(e, Event::TaskAccepted(a) if a.task_id == task))
                .count();
            let done = got
                .iter()
                .filter(|(_, e)| matches!(e, Event::TaskDone(d) if d.task_id == task))
                .count();
            ensure!(
                accepted == 1 && done == 1,
                "{task}: accepted {accepted}×, done {done}×"
            );
        }
        client.close().await;
        Ok(())
    })
}

#[test]
fn manual_ack_unacked_events_are_replayed_to_a_new_client() -> Result<()> {
    let shim = LinkShim::start(Mode::Subreaper)?;
    runtime()?.block_on(async {
        let manual = ConnectOptions::new().ack_mode(AckMode::Manual);
        let first = manual.connect(&shim.addr).await?;
        let mut events = first.events()?;
        first
            .submit_task(TaskSpec::new("m", input("a b c d", 0)))
            .await?;
        let all = read_until(
            &mut events,
            PATIENCE,
            |e| matches!(e, Event::TaskDone(d) if d.task_id == "m"),
        )
        .await?;
        let last = all.last().map(|(s, _)| *s).unwrap_or(0);
        let cursor = last / 2;
        // "Persisted" up to `cursor`, then the control process goes away.
        first.ack(cursor);
        first.close().await;
        ensure!(
            within(PATIENCE, "status", async {
                loop {
                    let c = manual.connect(&shim.addr).await?;
                    let s = c.status().await?;
                    c.close().await;
                    if s.buffered_events == last - cursor {
                        return Ok::<_, control_link::Error>(true);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await??
        );
        // A new instance from the persisted cursor gets exactly the unacked events.
        let second = manual
            .clone()
            .resume_from(cursor)
            .connect(&shim.addr)
            .await?;
        let mut events = second.events()?;
        let replay = read_until(
            &mut events,
            PATIENCE,
            |e| matches!(e, Event::TaskDone(d) if d.task_id == "m"),
        )
        .await?;
        let want: Vec<_> = all.iter().filter(|(s, _)| *s > cursor).cloned().collect();
        ensure!(replay == want, "replayed {replay:?}\nwanted {want:?}");
        // Not acked: a third instance from the same cursor gets them again.
        second.close().await;
        let third = manual
            .clone()
            .resume_from(cursor)
            .connect(&shim.addr)
            .await?;
        let mut events = third.events()?;
        let (seq, _) = within(PATIENCE, "replay", events.next())
            .await?
            .context("stream ended")?;
        ensure!(
            seq == cursor + 1,
            "replay starts at {seq}, not {}",
            cursor + 1
        );
        third.close().await;
        Ok(())
    })
}
