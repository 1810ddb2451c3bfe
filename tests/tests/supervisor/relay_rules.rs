//! What the shim relays of a driver's events and task ends, against the real shim with the
//! `hostile-driver` binary: every event the driver link accepts fits its `event` envelope
//! (the largest reaches the control plane unchanged; a larger one is refused to the driver),
//! events of a task the driver was not given and a second `task_done` are not relayed and the
//! driver is told, and a task still running at a shutdown ends `cancelled`.

use anyhow::{ensure, Result};
use driver_protocol::envelope::MAX_EVENT_BODY;
use driver_protocol::message::{Event, LogStream, TaskStatus};

use crate::support::control::Stamped;

use super::hostile::{hostile, one_mode};
use super::{kinds, Setup, Sup};

/// Reads events until the driver's stderr line starting with `prefix`; returns every event
/// read before it.
fn until_stderr(sup: &mut Sup, prefix: &str) -> Result<Vec<Stamped>> {
    let (_, seen) = sup.wait(&format!("driver stderr {prefix:?}"), |e| {
        matches!(e, Event::Log(l) if l.stream == LogStream::Stderr && l.text.starts_with(prefix))
    })?;
    Ok(seen)
}

/// The driver's stderr lines among `seen`.
fn stderr_lines(seen: &[Stamped]) -> Vec<String> {
    seen.iter()
        .filter_map(|s| match &s.event {
            Event::Log(l) if l.stream == LogStream::Stderr => Some(l.text.clone()),
            _ => None,
        })
        .collect()
}

/// A `custom` event of exactly the largest body the shim relays reaches the control plane
/// byte for byte (its envelope is a frame of at most 16 MiB); one a byte larger is not
/// relayed, the driver gets `error{code:"frame_too_large"}`, and everything goes on.
#[test]
fn the_largest_legal_event_is_relayed_unchanged_and_a_larger_one_is_refused() -> Result<()> {
    let mut sup = Setup::new(one_mode())
        .flag("--ping-interval", "0")
        .driver_cmd([hostile(), "big-event"])
        .start()?;
    sup.expect_up(1)?;
    let (big, _) = sup.wait("the big custom event", |e| matches!(e, Event::Custom(_)))?;
    // Over --event-buffer-bytes on its own: the driver is read again once it is acknowledged.
    sup.ctl.ack(big.seq)?;
    let Event::Custom(c) = &big.event else {
        unreachable!("matched a custom event")
    };
    let rmpv::Value::Binary(data) = &c.data else {
        anyhow::bail!("custom data is not binary: {:?}", c.kind);
    };
    let want: Vec<u8> = (0..data.len()).map(|i| (i % 251) as u8).collect();
    ensure!(
        c.kind == "big" && *data == want,
        "the event changed on the way"
    );
    let body = driver_protocol::Message::to_body(&driver_protocol::message::DriverToShim::Custom(
        c.clone(),
    ))?;
    ensure!(
        body.len() == MAX_EVENT_BODY,
        "relayed body {} bytes, sent {MAX_EVENT_BODY}",
        body.len()
    );
    let seen = until_stderr(&mut sup, "done big-event")?;
    let lines = stderr_lines(&seen);
    ensure!(
        lines.iter().any(|l| l == "notice frame_too_large -"),
        "no frame_too_large notice: {lines:?}"
    );
    ensure!(
        !seen.iter().any(|s| matches!(s.event, Event::Custom(_))),
        "the larger event was relayed: {:?}",
        kinds(&seen)
    );
    let status = sup.status()?;
    ensure!(
        status.driver_pid.is_some() && status.restarts == 0,
        "the driver was not kept: {status:?}"
    );
    Ok(())
}

/// Events for a task the driver was not given, a second `task_done` and an event of a task
/// after its end are not relayed, and the driver gets `not_found` / `invalid_state` naming
/// the task; the task's own chunk and its first `task_done` are relayed, once each.
#[test]
fn stray_events_and_a_second_task_done_are_refused_and_told() -> Result<()> {
    let mut sup = Setup::new(one_mode())
        .flag("--ping-interval", "0")
        .driver_cmd([hostile(), "task-strays"])
        .start()?;
    sup.expect_up(1)?;
    sup.submit("T1", rmpv::Value::Nil)?;
    let seen = until_stderr(&mut sup, "done task-strays")?;
    let lines = stderr_lines(&seen);
    let notices: Vec<&str> = lines
        .iter()
        .filter(|l| l.starts_with("notice "))
        .map(String::as_str)
        .collect();
    ensure!(
        notices
            == [
                "notice not_found never-given",
                "notice invalid_state T1",
                "notice not_found T1"
            ],
        "notices {notices:?}\n{}",
        sup.context()
    );
    let chunks = seen
        .iter()
        .filter(
            |s| matches!(&s.event, Event::MessageChunk(c) if c.task_id.as_deref() == Some("T1")),
        )
        .count();
    let dones = seen
        .iter()
        .filter(|s| matches!(&s.event, Event::TaskDone(d) if d.task_id == "T1"))
        .count();
    let strays = seen
        .iter()
        .filter(|s| matches!(&s.event, Event::Custom(c) if c.kind == "stray"))
        .count();
    ensure!(
        (chunks, dones, strays) == (1, 1, 0),
        "chunks {chunks}, task_dones {dones}, strays {strays}: {:?}",
        kinds(&seen)
    );
    // Nothing more comes for T1, and the shim answers.
    sup.status()?;
    let late = sup.ctl.take_pending();
    ensure!(
        !late
            .iter()
            .any(|s| matches!(&s.event, Event::TaskDone(_) | Event::MessageChunk(_))),
        "late: {:?}",
        kinds(&late)
    );
    Ok(())
}

/// A driver that neither ends its task nor exits on `shutdown`: at SIGTERM the shim ends the
/// task `cancelled` ("shim shutting down"), as it does the queued ones, not `failed`.
#[test]
fn a_task_running_at_shutdown_ends_cancelled() -> Result<()> {
    let mut sup = Setup::new(one_mode())
        .flag("--ping-interval", "0")
        .flag("--grace", "2s")
        .driver_cmd([hostile(), "hold-task"])
        .start()?;
    sup.expect_up(1)?;
    sup.submit("held", rmpv::Value::Nil)?;
    sup.submit("queued", rmpv::Value::Nil)?;
    until_stderr(&mut sup, "done hold-task held")?;
    sup.shim.signal(libc::SIGTERM)?;
    let mut ends = Vec::new();
    for task in ["held", "queued"] {
        let (done, _, _) = sup.expect_done(task)?;
        ends.push((done.task_id, done.status, done.error));
    }
    let want = |t: &str| {
        (
            t.to_owned(),
            TaskStatus::Cancelled,
            Some("shim shutting down".to_owned()),
        )
    };
    ensure!(
        ends == [want("held"), want("queued")],
        "{ends:?}\n{}",
        sup.context()
    );
    let code = sup.shim.wait_code(super::PATIENCE)?;
    ensure!(code == 128 + libc::SIGTERM, "exit code {code}");
    Ok(())
}

/// A `redeliver` task that crashes every driver it is given is delivered `--max-attempts`
/// times (or its own `max_attempts`), then ends `failed` saying `max_attempts reached`;
/// `max_attempts: 0` is refused.
#[test]
fn redelivery_of_a_poison_task_stops_at_max_attempts() -> Result<()> {
    use driver_protocol::message::{ShimToControl, SubmitTask};
    use driver_protocol::ErrorCode;

    let mut sup = Setup::new(one_mode())
        .flag("--ping-interval", "0")
        .flag("--max-attempts", "2")
        .driver_cmd([hostile(), "crash-on-task"])
        .start()?;
    sup.expect_up(1)?;
    let submit = |sup: &mut Sup, task_id: &str, max_attempts| {
        let id = sup.ctl.id();
        sup.ctl.request(
            id,
            SubmitTask {
                id,
                task_id: task_id.into(),
                input: rmpv::Value::Nil,
                output_schema: None,
                timeout_ms: None,
                redeliver: true,
                max_attempts,
            },
        )
    };
    for (task, own, attempts) in [("poison", None, 2u32), ("poison-1", Some(1), 1)] {
        let reply = submit(&mut sup, task, own)?;
        ensure!(matches!(reply, ShimToControl::Ok(_)), "{reply:?}");
        let (done, _, seen) = sup.expect_done(task)?;
        let crashes: Vec<String> = stderr_lines(&seen)
            .into_iter()
            .filter(|l| l.starts_with(&format!("crashed {task} ")))
            .collect();
        let want: Vec<String> = (1..=attempts)
            .map(|a| format!("crashed {task} {a}"))
            .collect();
        ensure!(crashes == want, "{task}: deliveries {crashes:?}");
        let suffix = format!("; max_attempts reached ({attempts} of {attempts})");
        ensure!(
            done.status == TaskStatus::Failed
                && done.error.as_deref().is_some_and(|e| e.ends_with(&suffix)),
            "{done:?}"
        );
    }
    let reply = submit(&mut sup, "never", Some(0))?;
    ensure!(
        matches!(&reply, ShimToControl::Error(e) if e.code == ErrorCode::Invalid),
        "{reply:?}"
    );
    // The driver is up again, with nothing to deliver.
    let status = sup.status()?;
    ensure!(
        status.task_running.is_none() && status.tasks_queued == 0,
        "{status:?}"
    );
    Ok(())
}
