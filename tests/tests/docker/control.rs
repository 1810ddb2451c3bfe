//! control-link on the host driving the shim in a container: over a unix socket in a
//! bind-mounted directory, and over TCP across a user-defined docker network. What the shim
//! promises its children is checked from the inside (the probe, run as an exec) and from the
//! host (`/proc` of the driver's host pid).

use anyhow::{ensure, Result};
use control_link::protocol::message::{Event, Seq, TaskStatus};
use control_link::{Addr, Client, EventStream, TaskSpec, Token};

use super::{
    connect_options, connect_when_up, driver_on_host, exec_output, fast_flags, image, proc_status,
    report, require_docker, Network, Run, UnixAgent,
};
use crate::control_link::{chunks, input, read_until, runtime, within};
use crate::support::PATIENCE;

/// Submits `text` to the echo driver as task `task_id`, reads until its `task_done`, and
/// checks it came back word by word; the events read.
async fn echo_task(
    client: &Client,
    events: &mut EventStream,
    task_id: &str,
    text: &str,
) -> Result<Vec<(Seq, Event)>> {
    client
        .submit_task(TaskSpec::new(task_id, input(text, 0)))
        .await?;
    let got = read_until(
        events,
        PATIENCE,
        |e| matches!(e, Event::TaskDone(d) if d.task_id == task_id),
    )
    .await?;
    let words: Vec<&str> = text.split(' ').collect();
    ensure!(
        chunks(&got, task_id) == words,
        "{task_id}: {:?}",
        chunks(&got, task_id)
    );
    Ok(got)
}

#[test]
fn control_link_over_a_bind_mounted_unix_socket() -> Result<()> {
    require_docker!();
    let images = image()?;
    let agent = UnixAgent::start(
        &images.test,
        &[],
        &[
            "--agent-id",
            "unix-agent",
            "--rlimit",
            "NOFILE=256",
            "--umask",
            "027",
        ],
    )?;
    runtime()?.block_on(async {
        let client = within(PATIENCE, "connect", agent.options().connect(&agent.addr)).await??;
        ensure!(client.agent_id().as_deref() == Some("unix-agent"));
        let mut events = client.events()?;
        let got = echo_task(&client, &mut events, "t1", "hello from the host").await?;
        ensure!(
            matches!(got.last(), Some((_, Event::TaskDone(d))) if d.status == TaskStatus::Succeeded)
        );

        // What every exec gets, from the inside.
        let (out, exit) =
            exec_output(&client, &mut events, &["/usr/local/bin/probe", "report"]).await?;
        ensure!(exit.code == Some(0), "{exit:?}\n{out}");
        let r = report(&out);
        for (key, want) in [
            ("uid", "1000"),
            ("euid", "1000"),
            ("gid", "1000"),
            ("groups", ""),
            ("no_new_privs", "1"),
            ("rlimit_NOFILE", "256:256"),
            ("umask", "027"),
            ("cwd", "/workspace"),
            ("cwd_writable", "1"),
            ("fds", "0,1,2"),
            ("env_token", "unset"),
            ("ppid", "1"),
            ("pid1", "agent-shim"),
            ("zombies", "0"),
        ] {
            ensure!(
                r.get(key).map(String::as_str) == Some(want),
                "{key}: want {want:?}, the probe says {:?}\n{out}",
                r.get(key)
            );
        }
        let status = client.status().await?;
        ensure!(status.driver_pid.is_some(), "{status:?}");
        client.close().await;
        Ok(())
    })?;

    // The driver itself, from the host.
    let driver = driver_on_host(&agent.container)?;
    let uid = proc_status(driver, "Uid")?;
    ensure!(uid.split_whitespace().all(|u| u == "1000"), "Uid: {uid}");
    ensure!(proc_status(driver, "NoNewPrivs")? == "1");
    ensure!(proc_status(driver, "Groups")?.is_empty());
    Ok(())
}

#[test]
fn control_link_over_tcp_on_a_user_defined_network() -> Result<()> {
    require_docker!();
    let images = image()?;
    let net = Network::new()?;
    let secret = format!("tcp-secret-{}", std::process::id());
    let container = Run::new("tcp")
        .opts(["--network", &net.name])
        .opts(["-e", &format!("AGENT_SHIM_TOKEN={secret}")])
        .args([
            "--control-listen",
            "tcp:0.0.0.0:7000",
            "--agent-id",
            "tcp-agent",
        ])
        .args(fast_flags())
        .args(["--", "/usr/local/bin/echo-driver"])
        .start(&images.test)?;
    let addr: Addr = format!("tcp:{}:7000", container.ip(&net.name)?).parse()?;
    runtime()?.block_on(async {
        let opts = connect_options().token(Token::from_bytes(&secret)?);
        let client = connect_when_up(&opts, &addr).await?;
        ensure!(client.agent_id().as_deref() == Some("tcp-agent"));

        // A wrong token is refused; the shim carries on.
        let wrong = connect_options().token(Token::from_bytes("not-the-secret")?);
        let refused = within(PATIENCE, "a wrong token", wrong.connect(&addr)).await?;
        ensure!(refused.is_err(), "a wrong token was accepted");

        let mut events = client.events()?;
        echo_task(&client, &mut events, "net", "across the bridge").await?;

        // The token came in the environment; no child ever sees it.
        let (out, _) =
            exec_output(&client, &mut events, &["/usr/local/bin/probe", "report"]).await?;
        let r = report(&out);
        ensure!(
            r.get("env_token").map(String::as_str) == Some("unset"),
            "{out}"
        );
        ensure!(!out.contains(&secret), "{out}");
        client.close().await;
        Ok(())
    })?;
    let driver = driver_on_host(&container)?;
    let environ = std::fs::read(format!("/proc/{driver}/environ"))?;
    let environ = String::from_utf8_lossy(&environ);
    ensure!(!environ.contains("AGENT_SHIM_TOKEN") && !environ.contains(&secret));
    ensure!(environ.contains("AGENT_SHIM_FD="), "{environ}");
    Ok(())
}
