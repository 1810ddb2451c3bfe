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
    // Each shim names itself as the fleet knows it: `Fleet::connect` refuses a shim whose
    // `hello` names another agent.
    let shims: Vec<LinkShim> = (0..AGENTS)
        .map(|i| LinkShim::start_with(Mode::Subreaper, &["--agent-id", &format!("agent-{i:03}")]))
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

/// Real shims dialing one `Fleet` (`--control-connect` with a token): every agent is known
/// by its `--agent-id`, connections cut mid-task resume exactly once, and a shim with the
/// wrong token never joins.
#[test]
fn shims_dialing_a_fleet_with_a_token() -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    const DIALERS: usize = 10;
    let dir = crate::support::TempDir::new("fleet-dial")?;
    let write_token = |name: &str, token: &str| -> Result<std::path::PathBuf> {
        let path = dir.path().join(name);
        std::fs::write(&path, token)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        Ok(path)
    };
    let good = write_token("token", "fleet-secret\n")?;
    let bad = write_token("wrong", "not-the-secret")?;
    let echo = crate::drivers::echo_driver_bin()?;
    let rt = runtime()?;
    let limit = Duration::from_secs(60);
    let token = control_link::Token::from_file(&good)?;
    let fleet = Fleet::new(ConnectOptions::new().token(token));
    let addr = rt.block_on(fleet.listen(&control_link::Addr::Unix(dir.path().join("f.sock"))))?;
    let start = |i: usize, token: &std::path::Path| {
        let mut args: Vec<String> = vec![
            "--control-connect".into(),
            addr.to_string(),
            "--control-token-file".into(),
            token.display().to_string(),
            "--agent-id".into(),
            format!("dialer-{i}"),
            "--control-reconnect-max".into(),
            "300ms".into(),
        ];
        for (k, v) in crate::supervisor::FAST {
            args.extend([(*k).to_owned(), (*v).to_owned()]);
        }
        crate::support::Shim::new()
            .mode(Mode::Subreaper)
            .args(args)
            .cmd([&echo])
            .start()
    };
    let _shims: Vec<_> = (0..DIALERS)
        .map(|i| start(i, &good))
        .collect::<Result<_>>()?;
    let intruder = start(DIALERS, &bad)?;
    rt.block_on(async {
        let mut events = fleet.events()?;
        let deadline = tokio::time::Instant::now() + limit;
        let mut last: BTreeMap<AgentId, Seq> = BTreeMap::new();
        let mut done: BTreeMap<AgentId, Vec<String>> = BTreeMap::new();
        let mut ready = 0;
        // Every dialer connects and its driver comes up.
        while ready < DIALERS {
            let Ok(Some((agent, seq, event))) =
                tokio::time::timeout_at(deadline, events.next()).await
            else {
                bail!(
                    "only {ready} of {DIALERS} dialers ready: {:?}",
                    fleet.agents()
                );
            };
            let prev = last.insert(agent.clone(), seq).unwrap_or(0);
            ensure!(seq == prev + 1, "{agent}: seq {seq} after {prev}");
            if matches!(event, Event::DriverReady(_)) {
                ready += 1;
            }
        }
        let mut names: Vec<String> = fleet.agents().iter().map(|a| a.to_string()).collect();
        names.sort();
        let want: Vec<String> = {
            let mut w: Vec<String> = (0..DIALERS).map(|i| format!("dialer-{i}")).collect();
            w.sort();
            w
        };
        ensure!(names == want, "agents {names:?}");
        for i in 0..DIALERS {
            let Some(client) = fleet.client(&format!("dialer-{i}")) else {
                bail!("dialer-{i} has no client");
            };
            client
                .submit_task(TaskSpec::new(
                    format!("t{i}"),
                    input("one two three four five six", 40),
                ))
                .await?;
        }
        // Cut three connections once their tasks stream; each shim dials again.
        let mut cut: Vec<AgentId> = Vec::new();
        while done.len() < DIALERS {
            let Ok(Some((agent, seq, event))) =
                tokio::time::timeout_at(deadline, events.next()).await
            else {
                bail!(
                    "only {} of {DIALERS} tasks done within {limit:?}",
                    done.len()
                );
            };
            let prev = last.insert(agent.clone(), seq).unwrap_or(0);
            ensure!(seq == prev + 1, "{agent}: seq {seq} after {prev}");
            match event {
                Event::MessageChunk(_) if cut.len() < 3 && !cut.contains(&agent) => {
                    if let Some(client) = fleet.client(&agent) {
                        client.drop_connection();
                        cut.push(agent);
                    }
                }
                Event::TaskDone(d) => done.entry(agent).or_default().push(d.task_id),
                _ => {}
            }
        }
        ensure!(cut.len() == 3, "cut {cut:?}");
        // No second task_done may follow.
        let quiet = tokio::time::Instant::now() + Duration::from_millis(500);
        while let Ok(Some((agent, seq, event))) =
            tokio::time::timeout_at(quiet, events.next()).await
        {
            let prev = last.insert(agent.clone(), seq).unwrap_or(0);
            ensure!(seq == prev + 1, "{agent}: seq {seq} after {prev}");
            if let Event::TaskDone(d) = event {
                done.entry(agent).or_default().push(d.task_id);
            }
        }
        for (agent, tasks) in &done {
            let want = format!("t{}", &agent["dialer-".len()..]);
            ensure!(tasks == std::slice::from_ref(&want), "{agent}: {tasks:?}");
        }
        ensure!(
            fleet.client("dialer-10").is_none(),
            "the wrong token joined"
        );
        fleet.close().await;
        Ok(())
    })?;
    // The intruder kept being refused and kept running (it retries with backoff).
    ensure!(intruder.alive(), "the shim with the wrong token died");
    Ok(())
}
