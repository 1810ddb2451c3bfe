//! A Fleet driving 100 real shims (subreaper mode, each with the echo driver on its own
//! socket) from one process: a task to each, every `task_done` exactly once on the
//! aggregated stream, each agent's seqs in order without gaps or duplicates.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use control_link::protocol::message::{Event, Seq};
use control_link::{AgentId, ConnectOptions, Fleet, TaskSpec};

use super::{input, runtime, LinkShim};
use crate::support::Mode;

const AGENTS: usize = 100;

#[test]
fn a_fleet_of_100_shims() -> Result<()> {
    let started = Instant::now();
    let shims: Vec<LinkShim> = (0..AGENTS)
        .map(|_| LinkShim::start(Mode::Subreaper))
        .collect::<Result<_>>()?;
    let limit = Duration::from_secs(60);
    runtime()?.block_on(async {
        let fleet = Fleet::new(ConnectOptions::new().cursor_for(|_agent| 0));
        // The stream is read while requests run, as a control plane does: a stream nobody
        // reads fills up, and then the sockets are not read (replies included).
        let mut events = fleet.events()?;
        let deadline = tokio::time::Instant::now() + limit.saturating_sub(started.elapsed());
        let consumer = tokio::spawn(async move {
            let mut last: BTreeMap<AgentId, Seq> = BTreeMap::new();
            let mut done: BTreeMap<AgentId, Vec<String>> = BTreeMap::new();
            while done.len() < AGENTS || done.values().any(|d| d.len() != 1) {
                let Ok(next) = tokio::time::timeout_at(deadline, events.next()).await else {
                    bail!(
                        "only {} of {AGENTS} agents finished within {limit:?}",
                        done.len()
                    );
                };
                let Some((agent, seq, event)) = next else {
                    bail!("the fleet stream ended")
                };
                let prev = last.insert(agent.clone(), seq).unwrap_or(0);
                ensure!(seq == prev + 1, "{agent}: seq {seq} after {prev}");
                if let Event::TaskDone(d) = event {
                    done.entry(agent).or_default().push(d.task_id);
                }
            }
            // A moment more: no second task_done may follow.
            let quiet = tokio::time::Instant::now() + Duration::from_millis(500);
            while let Ok(Some((agent, _, event))) =
                tokio::time::timeout_at(quiet, events.next()).await
            {
                if let Event::TaskDone(d) = event {
                    done.entry(agent).or_default().push(d.task_id);
                }
            }
            Ok(done)
        });
        let mut joins = Vec::new();
        for (i, shim) in shims.iter().enumerate() {
            let (fleet, addr) = (fleet.clone(), shim.addr.clone());
            joins.push(tokio::spawn(async move {
                let agent = format!("agent-{i:03}");
                let client = fleet.connect(agent.as_str(), &addr).await?;
                client
                    .submit_task(TaskSpec::new(
                        format!("task-{i:03}"),
                        input("fleet hello", 0),
                    ))
                    .await?;
                Ok::<_, control_link::Error>(())
            }));
        }
        for j in joins {
            j.await??;
        }
        ensure!(fleet.agents().len() == AGENTS);
        ensure!(fleet.client("agent-007").is_some() && fleet.client("nobody").is_none());
        let done = consumer.await??;
        ensure!(done.len() == AGENTS);
        for (agent, tasks) in &done {
            let want = format!("task-{}", &agent["agent-".len()..]);
            ensure!(
                tasks == std::slice::from_ref(&want),
                "{agent}: {tasks:?}, want [{want}]"
            );
        }
        fleet.close().await;
        Ok(())
    })?;
    let took = started.elapsed();
    ensure!(took < limit, "took {took:?}");
    Ok(())
}
