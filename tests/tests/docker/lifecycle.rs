//! The container's lifecycle commands against the shim as its PID 1: `docker stop` is a
//! graceful shutdown whose exit code is the driver's, `docker kill -s USR1` reaches the
//! command, and `docker pause`/`unpause` sit inside the pause/resume protocol.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use control_link::protocol::message::{DriverState, Event, Paused, TaskStatus};
use control_link::TaskSpec;

use super::{image, require_docker, resumed_after_ms, Run, UnixAgent, DOCKER_PATIENCE};
use crate::control_link::{
    assert_consecutive, chunks, input, kinds, read_until, runtime, within, words,
};
use crate::support::PATIENCE;

/// `docker stop` mid-task: the driver is told to shut down (its task ends `cancelled`), it
/// exits with its code (7 here), every event up to `driver_exited` reaches the control plane,
/// and the container exits with the driver's code, long before Docker would SIGKILL it.
#[test]
fn docker_stop_is_a_graceful_shutdown_with_the_drivers_exit_code() -> Result<()> {
    require_docker!();
    let images = image()?;
    let agent = UnixAgent::start(&images.test, &["-e", "ECHO_EXIT_CODE=7"], &[])?;
    let name = agent.container.name.clone();
    let (stop_took, seen) = runtime()?.block_on(async {
        let client = within(PATIENCE, "connect", agent.options().connect(&agent.addr)).await??;
        let mut events = client.events()?;
        client
            .submit_task(TaskSpec::new("long", input(&words(400), 25)))
            .await?;
        let mut seen = read_until(
            &mut events,
            PATIENCE,
            |e| matches!(e, Event::MessageChunk(m) if m.text == "w5"),
        )
        .await?;
        // Docker's own SIGKILL would come after 30 s: the shim must be done long before.
        let stop = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            super::docker(&["stop", "-t", "30", &name], DOCKER_PATIENCE).map(|_| started.elapsed())
        });
        seen.extend(
            read_until(
                &mut events,
                PATIENCE,
                |e| matches!(e, Event::StateChanged(s) if s.to == DriverState::Exited),
            )
            .await?,
        );
        let stop_took = stop.await??;
        // The shim is gone: nothing can follow.
        while let Ok(Some(e)) =
            tokio::time::timeout(Duration::from_millis(300), events.next()).await
        {
            seen.push(e);
        }
        client.close().await;
        Ok::<_, anyhow::Error>((stop_took, seen))
    })?;
    let seqs: Vec<u64> = seen.iter().map(|(s, _)| *s).collect();
    assert_consecutive(&seqs, 1)?;
    let done: Vec<_> = seen
        .iter()
        .filter_map(|(_, e)| match e {
            Event::TaskDone(d) => Some(d),
            _ => None,
        })
        .collect();
    ensure!(
        done.len() == 1 && done[0].task_id == "long" && done[0].status == TaskStatus::Cancelled,
        "task_done: {done:?}"
    );
    let exited = seen
        .iter()
        .find_map(|(_, e)| match e {
            Event::DriverExited(x) => Some(x),
            _ => None,
        })
        .with_context(|| format!("no driver_exited in {}", kinds(&seen)))?;
    ensure!(exited.code == Some(7), "{exited:?}");
    let code = agent.container.wait_exit(PATIENCE)?;
    ensure!(
        code == 7,
        "the container exited {code}\n{}",
        agent.container.logs()
    );
    ensure!(
        stop_took < Duration::from_secs(15),
        "docker stop took {stop_took:?}"
    );
    eprintln!(
        "docker stop took {stop_took:?}; {} events, exit 7",
        seqs.len()
    );
    Ok(())
}

/// Plain init mode: `docker kill -s USR1` and `-s HUP` reach the command; `docker stop`'s
/// SIGTERM too, and the command's exit code is the container's.
#[test]
fn docker_kill_signals_are_forwarded() -> Result<()> {
    require_docker!();
    let images = image()?;
    let c = Run::new("signals")
        .args([
            "/usr/local/bin/probe",
            "signals",
            "--exit-on",
            "SIGTERM",
            "--code",
            "3",
        ])
        .start(&images.test)?;
    c.wait_log("ready", PATIENCE)?;
    c.docker(&["kill", "-s", "USR1"])?;
    c.wait_log("got SIGUSR1", PATIENCE)?;
    c.docker(&["kill", "-s", "HUP"])?;
    c.wait_log("got SIGHUP", PATIENCE)?;
    c.docker(&["stop", "-t", "30"])?;
    ensure!(c.wait_exit(PATIENCE)? == 3, "{}", c.logs());
    let logs = c.logs();
    ensure!(
        logs.lines().filter(|l| *l == "got SIGUSR1").count() == 1,
        "{logs}"
    );
    ensure!(logs.contains("got SIGTERM"), "{logs}");
    Ok(())
}

/// pause → `paused` → `docker pause` → (frozen) → `docker unpause` → resume → the driver
/// learns how long it slept (at least the frozen time), and its task finishes intact.
#[test]
fn docker_pause_and_unpause_inside_the_pause_resume_protocol() -> Result<()> {
    require_docker!();
    let images = image()?;
    let agent = UnixAgent::start(&images.test, &[], &[])?;
    let frozen = Duration::from_millis(1500);
    runtime()?.block_on(async {
        let client = within(PATIENCE, "connect", agent.options().connect(&agent.addr)).await??;
        let mut events = client.events()?;
        let n = 40;
        client
            .submit_task(TaskSpec::new("p", input(&words(n), 20)))
            .await?;
        let mut seen = read_until(
            &mut events,
            PATIENCE,
            |e| matches!(e, Event::MessageChunk(m) if m.text == "w3"),
        )
        .await?;
        let pause = client.pause(None).await?;
        seen.extend(
            read_until(
                &mut events,
                PATIENCE,
                |e| matches!(e, Event::Paused(Paused { re: Some(re) }) if *re == pause),
            )
            .await?,
        );
        // At the safe point: now the runtime may freeze the whole container.
        let c = &agent.container;
        c.docker(&["pause"])?;
        let froze_at = Instant::now();
        ensure!(c.inspect("{{.State.Status}} {{.State.Paused}}")? == "paused true");
        tokio::time::sleep(frozen).await;
        c.docker(&["unpause"])?;
        let thawed_after = froze_at.elapsed();
        client.resume(None).await?;
        seen.extend(
            read_until(
                &mut events,
                PATIENCE,
                |e| matches!(e, Event::TaskDone(d) if d.task_id == "p"),
            )
            .await?,
        );
        let slept = resumed_after_ms(&seen)?;
        eprintln!("frozen for {thawed_after:?}; the driver slept {slept} ms");
        ensure!(
            u128::from(slept) >= frozen.as_millis(),
            "slept_ms {slept} < frozen {frozen:?}"
        );
        let seqs: Vec<u64> = seen.iter().map(|(s, _)| *s).collect();
        assert_consecutive(&seqs, 1)?;
        let want: Vec<String> = words(n).split(' ').map(str::to_owned).collect();
        ensure!(chunks(&seen, "p") == want, "chunks lost or repeated");
        let Some((_, Event::TaskDone(d))) = seen.last() else {
            bail!("no task_done")
        };
        ensure!(d.status == TaskStatus::Succeeded, "{d:?}");
        client.close().await;
        Ok(())
    })
}

/// The stop budget the image documents: a driver that answers nothing and ignores SIGTERM
/// (the probe, which never speaks the protocol) is SIGKILLed by the shim when the image's
/// grace (7 s) runs out, its last events still reach the control plane, and the container
/// exits by itself inside Docker's default 10 s stop timeout — with 137, the driver's
/// SIGKILL, not by Docker's SIGKILL of PID 1 (which would lose those events).
#[test]
fn a_stuck_driver_is_stopped_within_dockers_default_stop_timeout() -> Result<()> {
    require_docker!();
    let images = image()?;
    let agent = UnixAgent::start_driver(
        &images.test,
        &[],
        &["--ready-timeout", "60s"],
        &["/usr/local/bin/probe", "ignore-term"],
    )?;
    agent.container.wait_log("stdout: ready", PATIENCE)?;
    let name = agent.container.name.clone();
    let (took, seen) = runtime()?.block_on(async {
        let client = within(PATIENCE, "connect", agent.options().connect(&agent.addr)).await??;
        let mut events = client.events()?;
        // Docker's default stop timeout: no -t, and the image sets none.
        let stop = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            super::docker(&["stop", &name], DOCKER_PATIENCE).map(|_| started.elapsed())
        });
        let seen = read_until(
            &mut events,
            Duration::from_secs(30),
            |e| matches!(e, Event::StateChanged(s) if s.to == DriverState::Exited),
        )
        .await?;
        let took = stop.await??;
        client.close().await;
        Ok::<_, anyhow::Error>((took, seen))
    })?;
    let exited = seen
        .iter()
        .find_map(|(_, e)| match e {
            Event::DriverExited(x) => Some(x),
            _ => None,
        })
        .with_context(|| format!("no driver_exited in {}", kinds(&seen)))?;
    ensure!(exited.signal.as_deref() == Some("SIGKILL"), "{exited:?}");
    let code = agent.container.wait_exit(PATIENCE)?;
    ensure!(code == 137, "exit {code}\n{}", agent.container.logs());
    eprintln!("a stuck driver: docker stop took {took:?} (grace 7 s, Docker's timeout 10 s)");
    ensure!(
        took >= Duration::from_secs(6) && took < Duration::from_secs(10),
        "docker stop took {took:?}"
    );
    Ok(())
}
