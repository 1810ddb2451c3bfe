//! Zombies are reaped inside the container: orphans of the command (plain mode) and of a tool
//! run through the control link (supervisor mode) are re-parented to the shim, PID 1, and
//! reaped — seen by the probe from the inside and in `/proc` from the host.

use anyhow::{ensure, Result};

use super::{exec_output, image, report, require_docker, wait_for, Container, Run, UnixAgent};
use crate::control_link::{runtime, within};
use crate::support::{children_of, state_of, PATIENCE};

/// Zombie children of the container's PID 1, seen from the host.
fn host_zombies(c: &Container) -> Result<usize> {
    let init = c.host_pid()?;
    Ok(children_of(init)
        .into_iter()
        .filter(|pid| state_of(*pid) == Some('Z'))
        .count())
}

#[test]
fn orphans_of_the_command_are_reaped_by_pid_1() -> Result<()> {
    require_docker!();
    let images = image()?;
    let c = Run::new("orphans")
        .args(["/usr/local/bin/probe", "orphans", "300", "--stay"])
        .start(&images.test)?;
    let logs = c.wait_log("\nready", PATIENCE)?;
    let r = report(&logs);
    ensure!(
        r.get("adopted_by").map(String::as_str) == Some("shim"),
        "{logs}"
    );
    ensure!(r.get("zombies").map(String::as_str) == Some("0"), "{logs}");
    ensure!(host_zombies(&c)? == 0);
    c.docker(&["stop", "-t", "30"])?;
    // The probe dies of the forwarded SIGTERM: 128 + 15.
    ensure!(c.wait_exit(PATIENCE)? == 143, "{}", c.logs());
    Ok(())
}

#[test]
fn orphans_of_a_tool_are_reaped_by_pid_1() -> Result<()> {
    require_docker!();
    let images = image()?;
    let agent = UnixAgent::start(&images.test, &[], &[])?;
    let orphans = 200;
    runtime()?.block_on(async {
        let client = within(PATIENCE, "connect", agent.options().connect(&agent.addr)).await??;
        let mut events = client.events()?;
        let before = client.status().await?.reaped;
        let (out, exit) = exec_output(
            &client,
            &mut events,
            &["/usr/local/bin/probe", "orphans", &orphans.to_string()],
        )
        .await?;
        ensure!(exit.code == Some(0), "{exit:?}\n{out}");
        let r = report(&out);
        ensure!(
            r.get("adopted_by").map(String::as_str) == Some("shim"),
            "{out}"
        );
        ensure!(r.get("zombies").map(String::as_str) == Some("0"), "{out}");
        // Every orphan (and the witness, and the exec itself) was reaped by the shim.
        let reaped = client.status().await?.reaped - before;
        ensure!(reaped > orphans, "reaped {reaped}");
        client.close().await;
        Ok(())
    })?;
    wait_for(PATIENCE, "no zombie under PID 1", || {
        (host_zombies(&agent.container).ok()? == 0).then_some(())
    })?;
    Ok(())
}
