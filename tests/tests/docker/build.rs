//! `Dockerfile.agent` builds from the static binaries, its image is configured as documented,
//! and the probe, run by the shim inside it, reports what PID 1 promises.

use std::time::Duration;

use anyhow::{ensure, Result};

use super::{image, report, require_docker, Run, DOCKER_PATIENCE};

#[test]
fn dockerfile_agent_builds_and_is_configured_as_documented() -> Result<()> {
    require_docker!();
    let images = image()?;
    let base = |format: &str| {
        super::docker(
            &["image", "inspect", "--format", format, &images.base],
            DOCKER_PATIENCE,
        )
    };
    let size: u64 = base("{{.Size}}")?.parse()?;
    println!("{} size: {size} bytes", images.base);
    // The static shim is nearly all of it.
    ensure!(size < 4 << 20, "the base image is {size} bytes");
    ensure!(
        base("{{json .Config.Entrypoint}}")? == r#"["/usr/local/bin/agent-shim"]"#,
        "entrypoint {}",
        base("{{json .Config.Entrypoint}}")?
    );
    ensure!(base("{{.Config.StopSignal}}")? == "SIGTERM");
    ensure!(base("{{json .Config.Volumes}}")? == r#"{"/workspace":{}}"#);
    let env = base("{{json .Config.Env}}")?;
    for want in [
        "AGENT_SHIM_USER=1000:1000",
        "AGENT_SHIM_WORKDIR=/workspace",
        "AGENT_SHIM_NO_NEW_PRIVS=1",
        "AGENT_SHIM_GRACE=7s",
    ] {
        ensure!(env.contains(want), "{want} missing from {env}");
    }
    let labels = base("{{json .Config.Labels}}")?;
    for want in [
        "org.opencontainers.image.title",
        "org.opencontainers.image.source",
        "org.opencontainers.image.licenses",
        "org.opencontainers.image.version",
        "io.agent-shim.stop-timeout",
    ] {
        ensure!(labels.contains(want), "label {want} missing from {labels}");
    }
    ensure!(
        base("{{.Config.User}}")?.is_empty(),
        "the shim must run as root"
    );

    // The shim answers in it.
    let version = Run::new("version")
        .args(["--version"])
        .start(&images.base)?;
    ensure!(version.wait_exit(DOCKER_PATIENCE)? == 0);
    let out = version.logs();
    ensure!(out.starts_with("agent-shim "), "{out}");

    // The accounts a scratch image lacks, and the driver's workspace.
    let created = Run::new("files").args(["--version"]).start(&images.base)?;
    let tar = super::docker(
        &["cp", &format!("{}:/etc/passwd", created.name), "-"],
        DOCKER_PATIENCE,
    )?;
    ensure!(tar.contains("agent:x:1000:1000:"), "{tar}");
    let tar = super::docker(
        &["cp", &format!("{}:/etc/group", created.name), "-"],
        DOCKER_PATIENCE,
    )?;
    ensure!(tar.contains("agent:x:1000:"), "{tar}");
    Ok(())
}

/// Plain init mode in a container: the probe is PID 1's child, sees only stdio, no token,
/// no zombie, and its exit code is the container's.
#[test]
fn the_probe_reports_from_inside_a_plain_container() -> Result<()> {
    require_docker!();
    let images = image()?;
    let c = Run::new("plain")
        .opts(["-e", "AGENT_SHIM_TOKEN=plain-secret"])
        .args(["/usr/local/bin/probe", "report"])
        .start(&images.test)?;
    ensure!(c.wait_exit(DOCKER_PATIENCE)? == 0, "{}", c.logs());
    let r = report(&c.logs());
    let get = |k: &str| r.get(k).map(String::as_str).unwrap_or("(missing)");
    ensure!(get("ppid") == "1", "{r:?}");
    ensure!(get("pid1") == "agent-shim", "{r:?}");
    ensure!(get("fds") == "0,1,2", "{r:?}");
    ensure!(get("env_token") == "unset", "{r:?}");
    ensure!(get("zombies") == "0", "{r:?}");

    // The command's exit code is the container's.
    let c = Run::new("exit")
        .args(["/usr/local/bin/probe", "exit", "42"])
        .start(&images.test)?;
    ensure!(c.wait_exit(Duration::from_secs(60))? == 42);
    Ok(())
}
