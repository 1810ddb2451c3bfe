//! Auto-wake with the real freezer: an agent that went idle, was paused at its safe point
//! and then `docker pause`d is woken by a submit through a wake hook that runs
//! `docker unpause`. Ten concurrent submits wake it once, and each task runs exactly once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use control_link::protocol::message::{DriverState, Event, Paused, TaskStatus};
use control_link::{AgentId, TaskSpec};

use super::{docker, image, require_docker, resumed_after_ms, UnixAgent, DOCKER_PATIENCE};
use crate::control_link::{input, kinds, read_until, runtime, within};
use crate::support::PATIENCE;

#[test]
fn a_docker_paused_agent_is_woken_by_a_submit_through_docker_unpause() -> Result<()> {
    require_docker!();
    let images = image()?;
    let agent = UnixAgent::start(&images.test, &[], &["--idle-after", "500ms"])?;
    let name = agent.container.name.clone();
    let calls = Arc::new(AtomicUsize::new(0));
    let frozen = Duration::from_millis(1000);
    let opts = {
        let (name, calls) = (name.clone(), Arc::clone(&calls));
        agent.options().wake_hook(move |_agent: AgentId| {
            let (name, calls) = (name.clone(), Arc::clone(&calls));
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let unpause = tokio::task::spawn_blocking(move || {
                    docker(&["unpause", &name], DOCKER_PATIENCE)
                })
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?;
                match unpause {
                    Ok(_) => Ok(()),
                    // Already running: a wake must succeed then too.
                    Err(e) if e.to_string().contains("is not paused") => Ok(()),
                    Err(e) => Err(std::io::Error::other(e.to_string())),
                }
            }
        })
    };
    runtime()?.block_on(async {
        let client = within(PATIENCE, "connect", opts.connect(&agent.addr)).await??;
        let mut events = client.events()?;
        // The agent goes idle: the platform's cue to pause it.
        read_until(&mut events, PATIENCE, |e| matches!(e, Event::Idle(_))).await?;
        let pause = client.pause(None).await?;
        read_until(
            &mut events,
            PATIENCE,
            |e| matches!(e, Event::Paused(Paused { re: Some(re) }) if *re == pause),
        )
        .await?;
        agent.container.docker(&["pause"])?;
        ensure!(agent.container.inspect("{{.State.Paused}}")? == "true");
        let froze_at = Instant::now();
        tokio::time::sleep(frozen).await;
        ensure!(
            client.needs_wake(),
            "the client does not know the agent is paused"
        );
        // Ten submits at once, as if nothing were frozen.
        let mut submits = Vec::new();
        for i in 0..10 {
            let client = client.clone();
            submits.push(tokio::spawn(async move {
                client
                    .submit_task(TaskSpec::new(format!("w{i}"), input("awake now", 0)))
                    .await
            }));
        }
        for s in submits {
            within(PATIENCE, "a submit to a frozen agent", s).await???;
        }
        eprintln!(
            "woken and delivered {:?} after the freeze",
            froze_at.elapsed()
        );
        ensure!(
            calls.load(Ordering::SeqCst) == 1,
            "hook calls: {}",
            calls.load(Ordering::SeqCst)
        );
        ensure!(agent.container.inspect("{{.State.Paused}}")? == "false");
        let mut seen = Vec::new();
        while (0..10).any(|i| {
            !seen
                .iter()
                .any(|(_, e)| matches!(e, Event::TaskDone(d) if d.task_id == format!("w{i}")))
        }) {
            seen.extend(
                read_until(&mut events, PATIENCE, |e| matches!(e, Event::TaskDone(_))).await?,
            );
        }
        // Resumed (the driver learns how long it slept) before any task was accepted.
        let ready = seen
            .iter()
            .position(|(_, e)| matches!(e, Event::StateChanged(c) if c.to == DriverState::Ready))
            .with_context(|| format!("no state_changed to ready: {}", kinds(&seen)))?;
        let first_task = seen
            .iter()
            .position(|(_, e)| matches!(e, Event::TaskAccepted(_)))
            .with_context(|| format!("no task_accepted: {}", kinds(&seen)))?;
        ensure!(
            ready < first_task,
            "a task before the resume: {}",
            kinds(&seen)
        );
        let slept = resumed_after_ms(&seen)?;
        ensure!(u128::from(slept) >= frozen.as_millis(), "slept {slept} ms");
        for i in 0..10 {
            let id = format!("w{i}");
            let accepted = seen
                .iter()
                .filter(|(_, e)| matches!(e, Event::TaskAccepted(a) if a.task_id == id))
                .count();
            let done: Vec<_> = seen
                .iter()
                .filter_map(|(_, e)| match e {
                    Event::TaskDone(d) if d.task_id == id => Some(d.status),
                    _ => None,
                })
                .collect();
            ensure!(
                accepted == 1 && done == [TaskStatus::Succeeded],
                "{id}: accepted {accepted}, done {done:?}"
            );
        }
        ensure!(client.status().await?.state == DriverState::Ready);
        client.close().await;
        Ok(())
    })
}
