//! Tasks: chunks and progress, output, failure, crash, bad input, one task at a time.

use anyhow::ensure;
use driver_protocol::message::{DriverToShim, MessageChunk, Progress, TaskStatus};
use driver_protocol::ErrorCode;
use rmpv::Value;

use super::{conformance, input, FakeShim, QUIET};

/// The events the echo driver sends for `words` in task `task_id`: a chunk per word (the
/// last one final), each followed by its progress.
fn echo_events(task_id: &str, words: &[&str]) -> Vec<DriverToShim> {
    let total = words.len() as u64;
    let mut events = Vec::new();
    for (i, word) in words.iter().enumerate() {
        let done = i as u64 + 1;
        events.push(DriverToShim::MessageChunk(MessageChunk {
            task_id: Some(task_id.into()),
            text: (*word).into(),
            role: Some("assistant".into()),
            is_final: done == total,
        }));
        events.push(DriverToShim::Progress(Progress {
            task_id: Some(task_id.into()),
            message: None,
            done: Some(done),
            total: Some(total),
        }));
    }
    events
}

conformance! {
    fn string_task_is_echoed_word_by_word(driver: Driver) -> Result<()> {
        let mut shim = FakeShim::start(driver)?;
        shim.send_task("t1", Value::from("hello  big\tworld"))?;
        let (events, done) = shim.until_done("t1")?;
        ensure!(events == echo_events("t1", &["hello", "big", "world"]), "events: {events:#?}");
        ensure!(done.status == TaskStatus::Succeeded, "{done:?}");
        ensure!(done.output == Some(Value::from("hello  big\tworld")), "{done:?}");
        ensure!(done.error.is_none(), "{done:?}");
        // The driver takes the next task.
        shim.send_task("t2", Value::from("again"))?;
        let (events, done) = shim.until_done("t2")?;
        ensure!(events == echo_events("t2", &["again"]), "events: {events:#?}");
        ensure!(done.status == TaskStatus::Succeeded, "{done:?}");
        Ok(())
    }

    fn map_task_with_output_and_empty_text(driver: Driver) -> Result<()> {
        let mut shim = FakeShim::start(driver)?;
        let output = Value::Map(vec![(Value::from("answer"), Value::from(42))]);
        shim.send_task("t1", input([("output", output.clone()), ("unknown_key", Value::Nil)]))?;
        let (events, done) = shim.until_done("t1")?;
        ensure!(events == echo_events("t1", &[""]), "events: {events:#?}");
        ensure!(done.status == TaskStatus::Succeeded && done.output == Some(output), "{done:?}");

        shim.send_task("t2", input([("text", "two words".into())]))?;
        let (events, done) = shim.until_done("t2")?;
        ensure!(events == echo_events("t2", &["two", "words"]), "events: {events:#?}");
        ensure!(done.output == Some(Value::from("two words")), "{done:?}");
        Ok(())
    }

    fn fail_ends_the_task_failed_after_the_chunks(driver: Driver) -> Result<()> {
        let mut shim = FakeShim::start(driver)?;
        shim.send_task("t1", input([("text", "a b".into()), ("fail", "boom".into())]))?;
        let (events, done) = shim.until_done("t1")?;
        ensure!(events == echo_events("t1", &["a", "b"]), "events: {events:#?}");
        ensure!(done.status == TaskStatus::Failed, "{done:?}");
        ensure!(done.error.as_deref() == Some("boom") && done.output.is_none(), "{done:?}");
        Ok(())
    }

    fn bad_input_fails_the_task(driver: Driver) -> Result<()> {
        let mut shim = FakeShim::start(driver)?;
        let cases = [
            Value::from(42),
            Value::Nil,
            input([("delay_ms", "soon".into())]),
            input([("delay_ms", Value::from(-5))]),
            input([("exec", Value::Array(vec![Value::from(1)]))]),
            input([("text", Value::from(true))]),
            input([("crash", "yes".into())]),
            input([("hang", Value::from(1))]),
        ];
        for (i, case) in cases.into_iter().enumerate() {
            let task_id = format!("bad{i}");
            shim.send_task(&task_id, case.clone())?;
            let (events, done) = shim.until_done(&task_id)?;
            ensure!(events.is_empty(), "{case}: events before task_done: {events:#?}");
            ensure!(done.status == TaskStatus::Failed, "{case}: {done:?}");
            ensure!(done.error.as_ref().is_some_and(|e| !e.is_empty()), "{case}: {done:?}");
        }
        shim.ping()
    }

    fn crash_exits_with_the_code(driver: Driver) -> Result<()> {
        let mut shim = FakeShim::start(driver)?;
        shim.send_task("t1", input([("text", "never said".into()), ("crash", 7.into())]))?;
        shim.expect_exit(7)?;
        // Nothing of the task was sent (the link then ends).
        let left = shim.read_within(QUIET);
        ensure!(
            left.is_err(),
            "expected end of stream after the crash, got {left:?}\n{}",
            shim.context()
        );
        Ok(())
    }

    fn second_task_while_one_runs_is_refused(driver: Driver) -> Result<()> {
        let mut shim = FakeShim::start(driver)?;
        shim.send_task("t1", input([("text", "a b c".into()), ("delay_ms", 150.into())]))?;
        shim.send_task("t2", Value::from("no room"))?;
        let mut events = Vec::new();
        let refusal = loop {
            match shim.recv()? {
                DriverToShim::Error(e) => break e,
                other => events.push(other),
            }
        };
        ensure!(refusal.code == ErrorCode::Limit, "{refusal:?}");
        ensure!(refusal.task_id.as_deref() == Some("t2") && refusal.re.is_none(), "{refusal:?}");
        let (rest, done) = shim.until_done("t1")?;
        events.extend(rest);
        ensure!(events == echo_events("t1", &["a", "b", "c"]), "events: {events:#?}");
        ensure!(done.status == TaskStatus::Succeeded, "{done:?}");
        shim.ping()
    }
}
