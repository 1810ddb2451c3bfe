//! A network partition mid-task: `docker network disconnect` cuts the container off the
//! network the control plane reaches it on, `docker network connect` brings it back (at the
//! same address, as after a real partition). control-link notices the dead connection by its
//! keepalive, redials until the shim answers again, resumes from its cursor, and the task's
//! events arrive with zero lost and zero duplicated.

use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use control_link::protocol::message::{Event, TaskStatus};
use control_link::{Addr, TaskSpec, Token};

use super::{connect_options, connect_when_up, fast_flags, image, require_docker, Network, Run};
use crate::control_link::{assert_consecutive, chunks, input, kinds, runtime, words};
use crate::support::PATIENCE;

#[test]
fn network_disconnect_and_connect_mid_task_lose_and_duplicate_nothing() -> Result<()> {
    require_docker!();
    let images = image()?;
    let net = Network::with_subnet()?;
    let prefix = net.prefix.clone().context("no subnet")?;
    let ip = format!("{prefix}.10");
    let secret = format!("partition-{}", std::process::id());
    let container = Run::new("partition")
        .opts(["--network", &net.name, "--ip", &ip])
        .opts(["-e", &format!("AGENT_SHIM_TOKEN={secret}")])
        .args([
            "--control-listen",
            "tcp:0.0.0.0:7000",
            "--agent-id",
            "partitioned",
        ])
        .args(fast_flags())
        .args(["--", "/usr/local/bin/echo-driver"])
        .start(&images.test)?;
    let addr: Addr = format!("tcp:{ip}:7000").parse()?;
    let n = 150;
    runtime()?.block_on(async {
        let opts = connect_options()
            .token(Token::from_bytes(&secret)?)
            .keepalive(Duration::from_millis(300))
            .connect_timeout(Duration::from_secs(1));
        let client = connect_when_up(&opts, &addr).await?;
        let mut events = client.events()?;
        client
            .submit_task(TaskSpec::new("cut", input(&words(n), 25)))
            .await?;
        let deadline = tokio::time::Instant::now() + PATIENCE * 3;
        let mut seen = Vec::new();
        let mut cut = false;
        loop {
            let next = tokio::time::timeout_at(deadline, events.next()).await;
            let Ok(Some((seq, event))) = next else {
                bail!("events stopped; seen {}", kinds(&seen));
            };
            let done = matches!(&event, Event::TaskDone(d) if d.task_id == "cut");
            let chunk = matches!(&event, Event::MessageChunk(_));
            seen.push((seq, event));
            if done {
                break;
            }
            if chunk && !cut && chunks(&seen, "cut").len() == 20 {
                cut = true;
                let (name, net_name) = (container.name.clone(), net.name.clone());
                tokio::task::spawn_blocking(move || {
                    super::docker(
                        &["network", "disconnect", &net_name, &name],
                        super::DOCKER_PATIENCE,
                    )
                })
                .await??;
                // The control side notices: its keepalive gets no answer.
                let noticed = tokio::time::timeout(PATIENCE, async {
                    while client.is_connected() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                })
                .await;
                ensure!(
                    noticed.is_ok(),
                    "still connected {PATIENCE:?} after the cut"
                );
                // The shim keeps working and buffering meanwhile.
                tokio::time::sleep(Duration::from_millis(1000)).await;
                let (name, net_name, ip) = (container.name.clone(), net.name.clone(), ip.clone());
                tokio::task::spawn_blocking(move || {
                    super::docker(
                        &["network", "connect", "--ip", &ip, &net_name, &name],
                        super::DOCKER_PATIENCE,
                    )
                })
                .await??;
            }
        }
        ensure!(cut, "the task ended before the cut");
        let seqs: Vec<u64> = seen.iter().map(|(s, _)| *s).collect();
        assert_consecutive(&seqs, 1)?;
        let want: Vec<String> = words(n).split(' ').map(str::to_owned).collect();
        ensure!(chunks(&seen, "cut") == want, "chunks lost or repeated");
        let Some((_, Event::TaskDone(d))) = seen.last() else {
            bail!("no task_done")
        };
        ensure!(d.status == TaskStatus::Succeeded, "{d:?}");
        // Nothing more comes: the shim's last seq is the last one we got, exactly once.
        let status = client.status().await?;
        ensure!(
            status.last_seq == *seqs.last().unwrap_or(&0),
            "{status:?} vs {} events",
            seqs.len()
        );
        ensure!(client.is_connected());
        client.close().await;
        Ok(())
    })
}
