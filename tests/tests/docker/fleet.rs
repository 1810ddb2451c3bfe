//! One `Fleet` on the host drives 20 containers: each shim dials the fleet's unix socket
//! (bind-mounted into every container) with the fleet's token and its own `--agent-id`; every
//! agent gets a task and reports its `task_done` exactly once, each agent's seqs in order
//! without gap or duplicate; then a `shutdown` to each stops every container with exit 0.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use control_link::protocol::message::{Event, Seq};
use control_link::{Addr, AgentId, ConnectOptions, Fleet, TaskSpec, Token};

use super::{fast_flags, image, require_docker, Container, Run};
use crate::control_link::{input, runtime};
use crate::support::TempDir;

const AGENTS: usize = 20;

#[test]
fn twenty_containers_driven_by_one_fleet() -> Result<()> {
    require_docker!();
    let images = image()?;
    let dir = TempDir::new("docker-fleet")?;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("fleet-{}", std::process::id()))?;
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600))?;
    let rt = runtime()?;
    let fleet = Fleet::new(ConnectOptions::new().token(Token::from_file(&token_file)?));
    rt.block_on(fleet.listen(&Addr::Unix(dir.path().join("fleet.sock"))))?;
    let mut fleet_events = fleet.events()?;
    let started = Instant::now();

    // Start them four at a time: `docker run` is slow, the machine small.
    let mount = format!("{}:/run/fleet", dir.path().display());
    let start = |i: usize| -> Result<Container> {
        Run::new(&format!("fleet{i:02}"))
            .opts(["-v", &mount])
            .args([
                "--control-connect",
                "unix:/run/fleet/fleet.sock",
                "--control-token-file",
                "/run/fleet/token",
                "--agent-id",
                &format!("docker-{i:02}"),
                "--control-reconnect-max",
                "500ms",
            ])
            .args(fast_flags())
            .args(["--", "/usr/local/bin/echo-driver"])
            .start(&images.test)
    };
    let mut containers: Vec<Container> = Vec::new();
    for batch in (0..AGENTS).collect::<Vec<_>>().chunks(4) {
        let started: Vec<Result<Container>> = std::thread::scope(|s| {
            let handles: Vec<_> = batch.iter().map(|&i| s.spawn(move || start(i))).collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| bail!("docker run panicked")))
                .collect()
        });
        for c in started {
            containers.push(c?);
        }
    }
    let up = started.elapsed();

    let limit = Duration::from_secs(90);
    let (last, done) = rt.block_on(async {
        let deadline = tokio::time::Instant::now() + limit;
        let mut last: BTreeMap<AgentId, Seq> = BTreeMap::new();
        let mut done: BTreeMap<AgentId, Vec<String>> = BTreeMap::new();
        let mut submitted = 0;
        // Each agent gets its task as soon as its driver is ready.
        while done.len() < AGENTS {
            let Ok(Some((agent, seq, event))) =
                tokio::time::timeout_at(deadline, fleet_events.next()).await
            else {
                bail!(
                    "{submitted} submitted, {} done within {limit:?}; agents {:?}",
                    done.len(),
                    fleet.agents()
                );
            };
            let prev = last.insert(agent.clone(), seq).unwrap_or(0);
            ensure!(seq == prev + 1, "{agent}: seq {seq} after {prev}");
            match event {
                Event::DriverReady(_) => {
                    let client = fleet
                        .client(&agent)
                        .context("a ready agent has no client")?;
                    let n = &agent[agent.len() - 2..];
                    client
                        .submit_task(TaskSpec::new(format!("task-{n}"), input("hello fleet", 5)))
                        .await?;
                    submitted += 1;
                }
                Event::TaskDone(d) => done.entry(agent).or_default().push(d.task_id),
                _ => {}
            }
        }
        // A moment more: no second task_done may follow.
        let quiet = tokio::time::Instant::now() + Duration::from_millis(500);
        while let Ok(Some((agent, seq, event))) =
            tokio::time::timeout_at(quiet, fleet_events.next()).await
        {
            let prev = last.insert(agent.clone(), seq).unwrap_or(0);
            ensure!(seq == prev + 1, "{agent}: seq {seq} after {prev}");
            if let Event::TaskDone(d) = event {
                done.entry(agent).or_default().push(d.task_id);
            }
        }
        let mut names: Vec<String> = fleet.agents().iter().map(|a| a.to_string()).collect();
        names.sort();
        let want: Vec<String> = (0..AGENTS).map(|i| format!("docker-{i:02}")).collect();
        ensure!(names == want, "agents {names:?}");
        // Stop every agent through its control link.
        for agent in fleet.agents() {
            let client = fleet.client(&agent).context("no client")?;
            client
                .shutdown(Some(Duration::from_secs(5)), Some("test over"))
                .await?;
        }
        Ok::<_, anyhow::Error>((last, done))
    })?;
    for (agent, tasks) in &done {
        let want = format!("task-{}", &agent[agent.len() - 2..]);
        ensure!(tasks == std::slice::from_ref(&want), "{agent}: {tasks:?}");
    }
    ensure!(last.len() == AGENTS);
    for c in &containers {
        let code = c.wait_exit(Duration::from_secs(60))?;
        ensure!(code == 0, "{} exited {code}\n{}", c.name, c.logs());
    }
    rt.block_on(fleet.close());
    eprintln!(
        "{AGENTS} containers up in {up:?}; all tasks done and containers stopped in {:?}",
        started.elapsed()
    );
    Ok(())
}
