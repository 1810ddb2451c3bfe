//! Auto-wake: a task submitted to a paused, frozen agent wakes it through the wake hook,
//! once, and is delivered exactly once. The container freezer is simulated by SIGSTOP of
//! the shim and every child of it; the hook SIGCONTs them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{bail, ensure, Result};
use control_link::protocol::message::{DriverState, Event, Paused, Seq};
use control_link::{connect, AgentId, Client, ConnectOptions, EventStream, Fleet, TaskSpec};

use super::{input, kinds, read_until, runtime, within, LinkShim};
use crate::support::process::{children_of, state_of};
use crate::support::{in_both_modes, Mode, PATIENCE};

/// The processes of a simulated frozen sandbox, and the hook's record.
#[derive(Clone, Default)]
struct Freezer {
    frozen: Arc<Mutex<Vec<libc::pid_t>>>,
    calls: Arc<AtomicUsize>,
    agents: Arc<Mutex<Vec<String>>>,
    /// How many of the frozen processes were still stopped when the hook ran.
    stopped_at_wake: Arc<AtomicUsize>,
}

impl Freezer {
    /// SIGSTOPs the shim and every child of it (the driver first, like a freezer would
    /// stop them all at once).
    fn freeze(&self, shim: libc::pid_t) -> Result<()> {
        let mut pids = children_of(shim);
        pids.push(shim);
        for &pid in &pids {
            // SAFETY: kill has no memory-safety preconditions; pid is a live process of
            // this test's shim (killed by pid when the test ends).
            if unsafe { libc::kill(pid, libc::SIGSTOP) } != 0 {
                bail!("SIGSTOP {pid}: {}", std::io::Error::last_os_error());
            }
        }
        for &pid in &pids {
            let stopped =
                crate::support::poll_until(PATIENCE, || (state_of(pid) == Some('T')).then_some(()));
            ensure!(stopped.is_some(), "pid {pid} did not stop");
        }
        if let Ok(mut f) = self.frozen.lock() {
            *f = pids;
        }
        Ok(())
    }

    /// The hook: SIGCONT everything frozen (the shim last).
    fn thaw(&self, agent: &AgentId) {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut a) = self.agents.lock() {
            a.push(agent.to_string());
        }
        let pids = self.frozen.lock().map(|f| f.clone()).unwrap_or_default();
        let stopped = pids.iter().filter(|&&p| state_of(p) == Some('T')).count();
        self.stopped_at_wake.store(stopped, Ordering::SeqCst);
        for pid in pids {
            // SAFETY: as in `freeze`.
            unsafe { libc::kill(pid, libc::SIGCONT) };
        }
    }

    fn options(&self) -> ConnectOptions {
        let me = self.clone();
        ConnectOptions::new().wake_hook(move |agent: AgentId| {
            let me = me.clone();
            async move {
                me.thaw(&agent);
                Ok::<(), std::io::Error>(())
            }
        })
    }
}

/// Connects, again while the socket exists but is not listening yet (the shim binds, then
/// listens): at most [`PATIENCE`].
async fn refused_retry<T, F: std::future::Future<Output = Result<T, control_link::Error>>>(
    mut connect: impl FnMut() -> F,
) -> Result<T> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match within(PATIENCE, "connect", connect()).await? {
            Err(control_link::Error::Io(e))
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            r => return Ok(r?),
        }
    }
}

/// A client with the freezer's hook (connected as soon as the shim listens) and its events,
/// read up to the driver's `driver_ready`.
async fn ready_client(freezer: &Freezer, shim: &LinkShim) -> Result<(Client, EventStream)> {
    let opts = freezer.options();
    let client = refused_retry(|| opts.connect(&shim.addr)).await?;
    let mut events = client.events()?;
    read_until(&mut events, PATIENCE, |e| {
        matches!(e, Event::DriverReady(_))
    })
    .await?;
    Ok((client, events))
}

/// The platform pauses the agent (its `paused` read), then freezes its sandbox.
async fn pause_and_freeze(
    client: &Client,
    events: &mut EventStream,
    freezer: &Freezer,
    shim: &LinkShim,
) -> Result<()> {
    let id = client.pause(None).await?;
    read_until(
        events,
        PATIENCE,
        |e| matches!(e, Event::Paused(Paused { re: Some(r) }) if *r == id),
    )
    .await?;
    freezer.freeze(shim.shim.pid())
}

/// The hook ran exactly once, and found the sandbox frozen (the shim and its driver at
/// least).
fn woken_once(freezer: &Freezer) -> Result<()> {
    let calls = freezer.calls.load(Ordering::SeqCst);
    ensure!(calls == 1, "hook calls: {calls}");
    ensure!(
        freezer.stopped_at_wake.load(Ordering::SeqCst) >= 2,
        "the hook did not find the sandbox frozen"
    );
    Ok(())
}

/// Counts each task's `task_accepted` and `task_done` in `events`.
fn counts(events: &[(Seq, Event)], task: &str) -> (usize, usize) {
    let accepted = events
        .iter()
        .filter(|(_, e)| matches!(e, Event::TaskAccepted(a) if a.task_id == task))
        .count();
    let done = events
        .iter()
        .filter(|(_, e)| matches!(e, Event::TaskDone(d) if d.task_id == task))
        .count();
    (accepted, done)
}

in_both_modes! {
    fn a_submit_wakes_a_paused_frozen_agent_once(mode: Mode) -> Result<()> {
        let shim = LinkShim::start(mode)?;
        let freezer = Freezer::default();
        runtime()?.block_on(async {
            let (client, mut events) = ready_client(&freezer, &shim).await?;
            // Running: no wake.
            client.submit_task(TaskSpec::new("t0", input("before", 0))).await?;
            read_until(&mut events, PATIENCE, |e| matches!(e, Event::TaskDone(d) if d.task_id == "t0")).await?;
            ensure!(freezer.calls.load(Ordering::SeqCst) == 0, "woken while running");
            ensure!(!client.needs_wake());

            // The platform pauses the agent, then freezes its sandbox.
            pause_and_freeze(&client, &mut events, &freezer, &shim).await?;
            ensure!(client.needs_wake());

            // A submit as if nothing were frozen.
            within(PATIENCE, "submit to a frozen agent", client.submit_task(TaskSpec::new("t1", input("after the thaw", 0)))).await??;
            woken_once(&freezer)?;
            let frozen = freezer.frozen.lock().map(|f| f.len()).unwrap_or(0);
            ensure!(
                freezer.stopped_at_wake.load(Ordering::SeqCst) == frozen,
                "the hook found only part of the sandbox frozen"
            );
            ensure!(freezer.agents.lock().map(|a| a.clone()).unwrap_or_default() == ["link-test"]);
            let got = read_until(&mut events, PATIENCE, |e| matches!(e, Event::TaskDone(d) if d.task_id == "t1")).await?;
            // Resumed by the wake, then the task, exactly once.
            ensure!(got.iter().any(|(_, e)| matches!(e, Event::StateChanged(c) if c.to == DriverState::Ready)), "{}", kinds(&got));
            ensure!(counts(&got, "t1") == (1, 1), "{}", kinds(&got));
            let more = tokio::time::timeout(std::time::Duration::from_millis(500), events.next()).await;
            if let Ok(Some((_, e))) = &more {
                ensure!(!matches!(e, Event::TaskAccepted(_) | Event::TaskDone(_)), "a second delivery: {e:?}");
            }
            ensure!(client.status().await?.state == DriverState::Ready);
            ensure!(freezer.calls.load(Ordering::SeqCst) == 1);
            client.close().await;
            Ok(())
        })
    }

    fn ten_concurrent_submits_wake_it_once(mode: Mode) -> Result<()> {
        let shim = LinkShim::start(mode)?;
        let freezer = Freezer::default();
        runtime()?.block_on(async {
            let (client, mut events) = ready_client(&freezer, &shim).await?;
            pause_and_freeze(&client, &mut events, &freezer, &shim).await?;

            let mut submits = tokio::task::JoinSet::new();
            for i in 0..10 {
                let c = client.clone();
                submits.spawn(async move { c.submit_task(TaskSpec::new(format!("c{i}"), input("x", 0))).await });
            }
            while let Some(r) = within(PATIENCE, "ten submits", submits.join_next()).await? {
                r??;
            }
            woken_once(&freezer)?;
            let mut seen: Vec<(Seq, Event)> = Vec::new();
            while (0..10).any(|i| counts(&seen, &format!("c{i}")).1 == 0) {
                match tokio::time::timeout(PATIENCE, events.next()).await {
                    Ok(Some(ev)) => seen.push(ev),
                    _ => bail!("not every task finished: {}", kinds(&seen)),
                }
            }
            for i in 0..10 {
                ensure!(counts(&seen, &format!("c{i}")) == (1, 1), "task c{i}: {}", kinds(&seen));
            }
            client.close().await;
            Ok(())
        })
    }

    fn a_fleet_wakes_an_agent_whose_connection_is_down(mode: Mode) -> Result<()> {
        let shim = LinkShim::start(mode)?;
        let freezer = Freezer::default();
        runtime()?.block_on(async {
            let fleet = Fleet::new(freezer.options());
            let client = refused_retry(|| fleet.connect("link-test", &shim.addr)).await?;
            let mut events = fleet.events()?;
            let deadline = tokio::time::Instant::now() + PATIENCE;
            while client.status().await?.state != DriverState::Ready {
                ensure!(tokio::time::Instant::now() < deadline, "the driver never got ready");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            // Frozen without a pause (the platform froze it; this control plane did not
            // know), and the connection is lost: it cannot be made again while frozen.
            freezer.freeze(shim.shim.pid())?;
            client.drop_connection();
            let down = crate::support::poll_until(PATIENCE, || (!client.is_connected()).then_some(()));
            ensure!(down.is_some(), "the connection did not drop");
            ensure!(client.needs_wake());

            within(PATIENCE, "submit while down", client.submit_task(TaskSpec::new("f1", input("hello fleet", 0)))).await??;
            woken_once(&freezer)?;
            let mut seen = Vec::new();
            loop {
                match tokio::time::timeout(PATIENCE, events.next()).await {
                    Ok(Some((agent, seq, e))) => {
                        ensure!(&*agent == "link-test");
                        let end = matches!(&e, Event::TaskDone(d) if d.task_id == "f1");
                        seen.push((seq, e));
                        if end { break; }
                    }
                    _ => bail!("no task_done f1: {}", kinds(&seen)),
                }
            }
            ensure!(counts(&seen, "f1") == (1, 1), "{}", kinds(&seen));
            fleet.close().await;
            Ok(())
        })
    }
}

#[test]
fn without_a_hook_nothing_is_woken() -> Result<()> {
    let shim = LinkShim::start(Mode::Subreaper)?;
    runtime()?.block_on(async {
        let client = refused_retry(|| connect(&shim.addr, None)).await?;
        let mut events = client.events()?;
        read_until(&mut events, PATIENCE, |e| {
            matches!(e, Event::DriverReady(_))
        })
        .await?;
        client.pause(None).await?;
        read_until(&mut events, PATIENCE, |e| matches!(e, Event::Paused(_))).await?;
        ensure!(!client.needs_wake());
        // Paused at the protocol level: the task is queued, and runs after a resume.
        client
            .submit_task(TaskSpec::new("q", input("queued", 0)))
            .await?;
        ensure!(client.status().await?.tasks_queued == 1);
        client.resume(None).await?;
        read_until(
            &mut events,
            PATIENCE,
            |e| matches!(e, Event::TaskDone(d) if d.task_id == "q"),
        )
        .await?;
        client.close().await;
        Ok(())
    })
}
