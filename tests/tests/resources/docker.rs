//! `metrics` in a real container: the limits given to `docker run` are the ones reported.

use anyhow::{anyhow, ensure, Result};

use crate::support::PATIENCE;

#[test]
fn in_docker_the_reported_limits_are_the_containers() -> Result<()> {
    crate::docker::require_docker!();
    let images = crate::docker::image()?;
    let agent = crate::docker::UnixAgent::start(
        &images.test,
        &[
            "--memory",
            "256m",
            "--memory-swap",
            "256m",
            "--pids-limit",
            "100",
            "--cpus",
            "1.5",
        ],
        &[],
    )?;
    crate::control_link::runtime()?.block_on(async {
        let client =
            crate::control_link::within(PATIENCE, "connect", agent.options().connect(&agent.addr))
                .await??;
        let r = client.metrics().await?;
        let c = r
            .cgroup
            .as_deref()
            .ok_or_else(|| anyhow!("no cgroup reading: {r:#?}\n{}", agent.container.logs()))?;
        ensure!(c.memory_limit_bytes == Some(256 << 20), "{c:#?}");
        ensure!(c.pids_limit == Some(100), "{c:#?}");
        let quota = c
            .cpu_quota_us
            .ok_or_else(|| anyhow!("no cpu quota: {c:#?}"))?;
        let period = c
            .cpu_period_us
            .ok_or_else(|| anyhow!("no cpu period: {c:#?}"))?;
        ensure!(
            quota * 2 == period * 3,
            "{quota}/{period} is not 1.5 cpus: {c:#?}"
        );
        // The shim and the driver, in the container's own cgroup.
        ensure!(c.pids.is_some_and(|n| (2..100).contains(&n)), "{c:#?}");
        ensure!(
            c.memory_bytes.is_some_and(|m| m > 0 && m < 256 << 20),
            "{c:#?}"
        );
        ensure!(r.workspace.is_some(), "{r:#?}");
        ensure!(
            r.procs
                .iter()
                .any(|p| p.role == control_link::protocol::message::ProcRole::Driver),
            "{r:#?}"
        );
        // Docker mounts the cgroup tree read-only: no per-exec cgroups, and an exec that
        // asks for limits is refused rather than run without them.
        let status = client.status().await?;
        ensure!(status.cgroups.as_deref() == Some("none"), "{status:?}");
        let refused = client
            .exec(control_link::ExecSpec::new(["true"]).limits(None, Some(10), None))
            .await;
        ensure!(
            matches!(
                &refused,
                Err(control_link::Error::Remote { code, .. })
                    if *code == control_link::ErrorCode::Unsupported
            ),
            "{refused:?}"
        );
        client.close().await;
        Ok(())
    })
}
