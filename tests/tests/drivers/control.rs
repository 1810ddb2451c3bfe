//! Requests from the shim: cancel, pause/resume, shutdown, ping, unknown types, and the
//! misbehaviours a driver can be told to show (hang, ignore cancel, garbage).

use anyhow::{bail, ensure, Result};
use driver_protocol::message::{
    Cancel, DriverToShim, Log, LogStream, Pause, Ping, Ready, Resume, Shutdown, TaskStatus,
};
use driver_protocol::{DecodeError, ErrorCode};
use rmpv::Value;

use super::{conformance, input, recv, skip_to, FakeShim, PATIENCE, QUIET};

/// A task of `words` words with `delay_ms` before each.
fn slow(text: &str, delay_ms: u64) -> Value {
    input([("text", text.into()), ("delay_ms", delay_ms.into())])
}

/// Counts the chunks among `events`.
fn chunks(events: &[DriverToShim]) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, DriverToShim::MessageChunk(_)))
        .count()
}

/// Reads until the first chunk of a task, so that it is known to be running.
fn first_chunk(shim: &mut FakeShim) -> Result<()> {
    recv!(shim, DriverToShim::MessageChunk(_));
    recv!(shim, DriverToShim::Progress(_));
    Ok(())
}

conformance! {
    fn cancel_stops_at_the_next_safe_point(driver: Driver) -> Result<()> {
        let mut shim = FakeShim::start(driver)?;
        shim.send_task("t1", slow("a b c d e f g h", 200))?;
        first_chunk(&mut shim)?;
        let id = shim.id();
        shim.send(Cancel { id, task_id: "t1".into(), grace_ms: None })?;
        let mut events = Vec::new();
        let ok = skip_to!(shim, events, DriverToShim::Ok(ok) => ok);
        ensure!(ok.re == id, "{ok:?}");
        let (rest, done) = shim.until_done("t1")?;
        events.extend(rest);
        ensure!(chunks(&events) <= 1, "chunks after the cancel: {events:#?}");
        ensure!(done.status == TaskStatus::Cancelled, "{done:?}");
        ensure!(done.error.is_none() && done.output.is_none(), "{done:?}");
        // Then idle: the task is gone.
        let id = shim.id();
        shim.send(Cancel { id, task_id: "t1".into(), grace_ms: None })?;
        let err = recv!(shim, DriverToShim::Error(e) => e);
        ensure!(err.code == ErrorCode::NotFound && err.re == Some(id), "{err:?}");
        Ok(())
    }

    fn cancel_ends_even_the_longest_wait(driver: Driver) -> Result<()> {
        let mut shim = FakeShim::start(driver)?;
        shim.send_task("t1", slow("a", u64::MAX))?;
        shim.ping()?;
        let id = shim.id();
        shim.send(Cancel { id, task_id: "t1".into(), grace_ms: None })?;
        let ok = recv!(shim, DriverToShim::Ok(ok) => ok);
        ensure!(ok.re == id, "{ok:?}");
        let done = recv!(shim, DriverToShim::TaskDone(d) => d);
        ensure!(done.status == TaskStatus::Cancelled, "{done:?}");
        Ok(())
    }

    fn cancel_of_an_unknown_task_is_not_found(driver: Driver) -> Result<()> {
        let mut shim = FakeShim::start(driver)?;
        let id = shim.id();
        shim.send(Cancel { id, task_id: "nope".into(), grace_ms: None })?;
        let err = recv!(shim, DriverToShim::Error(e) => e);
        ensure!(err.code == ErrorCode::NotFound && err.re == Some(id), "{err:?}");
        // Also while another task runs; that one is not disturbed.
        shim.send_task("t1", slow("a b", 100))?;
        let id = shim.id();
        shim.send(Cancel { id, task_id: "other".into(), grace_ms: None })?;
        let mut events = Vec::new();
        let err = skip_to!(shim, events, DriverToShim::Error(e) => e);
        ensure!(err.code == ErrorCode::NotFound && err.re == Some(id), "{err:?}");
        let (rest, done) = shim.until_done("t1")?;
        events.extend(rest);
        ensure!(chunks(&events) == 2 && done.status == TaskStatus::Succeeded, "{events:#?} {done:?}");
        Ok(())
    }

    fn ignore_cancel_answers_ok_and_finishes(driver: Driver) -> Result<()> {
        let mut shim = FakeShim::start(driver)?;
        let task = input([
            ("text", "a b c".into()),
            ("delay_ms", 150.into()),
            ("ignore_cancel", true.into()),
        ]);
        shim.send_task("t1", task)?;
        first_chunk(&mut shim)?;
        let id = shim.id();
        shim.send(Cancel { id, task_id: "t1".into(), grace_ms: None })?;
        let mut events = Vec::new();
        let ok = skip_to!(shim, events, DriverToShim::Ok(ok) => ok);
        ensure!(ok.re == id, "{ok:?}");
        let (rest, done) = shim.until_done("t1")?;
        events.extend(rest);
        ensure!(chunks(&events) == 2, "{events:#?}");
        ensure!(done.status == TaskStatus::Succeeded, "{done:?}");
        Ok(())
    }

    fn pause_ping_resume_during_a_task(driver: Driver) -> Result<()> {
        let mut shim = FakeShim::start(driver)?;
        shim.send_task("t1", slow("a b c", 150))?;
        first_chunk(&mut shim)?;
        let pause = shim.id();
        shim.send(Pause { id: pause, timeout_ms: Some(5000) })?;
        let mut events = Vec::new();
        let paused = skip_to!(shim, events, DriverToShim::Paused(p) => p);
        ensure!(paused.re == Some(pause), "{paused:?}");
        // Paused: pings are answered, the task does not go on, other requests wait.
        shim.ping()?;
        let cancel = shim.id();
        shim.send(Cancel { id: cancel, task_id: "nope".into(), grace_ms: None })?;
        shim.expect_quiet()?;
        shim.ping()?;
        let resume = shim.id();
        shim.send(Resume { id: resume, slept_ms: Some(1234), unix_ms: None })?;
        let log = recv!(shim, DriverToShim::Log(l) => l);
        let want = Log {
            task_id: None,
            stream: LogStream::Driver,
            level: Some("info".into()),
            text: "resumed after 1234 ms".into(),
            truncated: false,
        };
        ensure!(Log { task_id: None, ..log.clone() } == want, "{log:?}");
        let ready = recv!(shim, DriverToShim::Ready(r) => r);
        ensure!(ready == Ready { re: Some(resume) }, "{ready:?}");
        // The held cancel is answered now; the task finishes.
        let err = skip_to!(shim, events, DriverToShim::Error(e) => e);
        ensure!(err.code == ErrorCode::NotFound && err.re == Some(cancel), "{err:?}");
        let (rest, done) = shim.until_done("t1")?;
        events.extend(rest);
        ensure!(chunks(&events) == 2, "{events:#?}");
        ensure!(done.status == TaskStatus::Succeeded, "{done:?}");
        Ok(())
    }

    fn pause_when_idle_and_resume_when_not_paused(driver: Driver) -> Result<()> {
        let mut shim = FakeShim::start(driver)?;
        let resume = shim.id();
        shim.send(Resume { id: resume, slept_ms: Some(1), unix_ms: None })?;
        let err = recv!(shim, DriverToShim::Error(e) => e);
        ensure!(err.code == ErrorCode::InvalidState && err.re == Some(resume), "{err:?}");

        let pause = shim.id();
        shim.send(Pause { id: pause, timeout_ms: None })?;
        let paused = recv!(shim, DriverToShim::Paused(p) => p);
        ensure!(paused.re == Some(pause), "{paused:?}");
        shim.ping()?;
        let resume = shim.id();
        shim.send(Resume { id: resume, slept_ms: None, unix_ms: None })?;
        let log = recv!(shim, DriverToShim::Log(l) => l);
        ensure!(log.text == "resumed after 0 ms" && log.stream == LogStream::Driver, "{log:?}");
        let ready = recv!(shim, DriverToShim::Ready(r) => r);
        ensure!(ready.re == Some(resume), "{ready:?}");
        shim.send_task("t1", Value::from("still works"))?;
        let (_, done) = shim.until_done("t1")?;
        ensure!(done.status == TaskStatus::Succeeded, "{done:?}");
        Ok(())
    }

    fn shutdown_mid_task_cancels_it_and_exits_with_echo_exit_code(driver: Driver) -> Result<()> {
        let mut shim = FakeShim::start_with(driver, &[("ECHO_EXIT_CODE", "5")])?;
        shim.send_task("t1", slow("a b c d e f", 200))?;
        first_chunk(&mut shim)?;
        let id = shim.id();
        shim.send(Shutdown { id, grace_ms: Some(5000), reason: Some("test".into()) })?;
        let mut events = Vec::new();
        let ok = skip_to!(shim, events, DriverToShim::Ok(ok) => ok);
        ensure!(ok.re == id, "{ok:?}");
        let (rest, done) = shim.until_done("t1")?;
        events.extend(rest);
        ensure!(chunks(&events) <= 1, "{events:#?}");
        ensure!(done.status == TaskStatus::Cancelled, "{done:?}");
        ensure!(done.error.as_deref() == Some("shutdown"), "{done:?}");
        shim.expect_exit(5)
    }

    fn shutdown_while_paused_in_a_task(driver: Driver) -> Result<()> {
        let mut shim = FakeShim::start_with(driver, &[("ECHO_EXIT_CODE", "6")])?;
        shim.send_task("t1", slow("a b c", 100))?;
        first_chunk(&mut shim)?;
        let pause = shim.id();
        shim.send(Pause { id: pause, timeout_ms: None })?;
        let mut events = Vec::new();
        let paused = skip_to!(shim, events, DriverToShim::Paused(p) => p);
        ensure!(paused.re == Some(pause), "{paused:?}");
        let id = shim.id();
        shim.send(Shutdown { id, grace_ms: None, reason: None })?;
        let ok = recv!(shim, DriverToShim::Ok(ok) => ok);
        ensure!(ok.re == id, "{ok:?}");
        let done = recv!(shim, DriverToShim::TaskDone(d) => d);
        ensure!(done.status == TaskStatus::Cancelled && done.error.as_deref() == Some("shutdown"),
            "{done:?}");
        shim.expect_exit(6)
    }

    fn hang_stops_answering_pings(driver: Driver) -> Result<()> {
        let mut shim = FakeShim::start(driver)?;
        shim.ping()?;
        shim.send_task("t1", input([("text", "x".into()), ("hang", true.into())]))?;
        let id = shim.id();
        shim.send(Ping { id })?;
        shim.expect_quiet()?;
        ensure!(shim.alive(), "a hanging driver exited\n{}", shim.context());
        Ok(())
    }

    fn unknown_request_is_unsupported(driver: Driver) -> Result<()> {
        let mut shim = FakeShim::start(driver)?;
        let frob = |id: Option<u64>| {
            let mut pairs = vec![
                (Value::from("type"), Value::from("frobnicate")),
                (Value::from("level"), Value::from(11)),
            ];
            if let Some(id) = id {
                pairs.push((Value::from("id"), Value::from(id)));
            }
            Value::Map(pairs)
        };
        let id = shim.id();
        shim.send_value(&frob(Some(id)))?;
        let err = recv!(shim, DriverToShim::Error(e) => e);
        ensure!(err.code == ErrorCode::Unsupported && err.re == Some(id), "{err:?}");
        // Without an id: ignored (the next message is the pong).
        shim.send_value(&frob(None))?;
        shim.ping()?;
        // During a task, too.
        shim.send_task("t1", slow("a b", 100))?;
        let id = shim.id();
        shim.send_value(&frob(Some(id)))?;
        let mut events = Vec::new();
        let err = skip_to!(shim, events, DriverToShim::Error(e) => e);
        ensure!(err.code == ErrorCode::Unsupported && err.re == Some(id), "{err:?}");
        let (_, done) = shim.until_done("t1")?;
        ensure!(done.status == TaskStatus::Succeeded, "{done:?}");
        Ok(())
    }

    fn garbage_is_a_frame_too_large(driver: Driver) -> Result<()> {
        let mut shim = FakeShim::start(driver)?;
        shim.send_task("t1", input([("text", "x".into()), ("garbage", true.into())]))?;
        match shim.read_within(PATIENCE)? {
            Err(e @ DecodeError::FrameTooLarge { .. }) => {
                ensure!(e.to_string().contains("4294967295"), "{e}");
            }
            other => bail!("expected a frame too large, got {other:?}\n{}", shim.context()),
        }
        // The driver keeps running.
        std::thread::sleep(QUIET);
        ensure!(shim.alive(), "the driver exited after writing garbage\n{}", shim.context());
        Ok(())
    }
}
