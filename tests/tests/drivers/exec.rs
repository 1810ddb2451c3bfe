//! A tool call through the shim: `tool_call`, the `exec` request, its output and exit, and
//! the `tool_result`.

use anyhow::{ensure, Result};
use bytes::Bytes;
use driver_protocol::message::{
    DriverToShim, ErrorMsg, Exec, ExecExit, ExecOutput, ExecStarted, OutputStream, TaskStatus,
};
use driver_protocol::ErrorCode;
use rmpv::Value;

use super::{conformance, input, recv, strings, FakeShim};

/// Expects the `tool_call` and the `exec` request of task `task_id` running `argv`; returns
/// the exec.
fn expect_call(shim: &mut FakeShim, task_id: &str, argv: &[&str]) -> Result<Exec> {
    let call = recv!(shim, DriverToShim::ToolCall(c) => c);
    ensure!(
        call.call_id == format!("{task_id}-exec") && call.name == "exec",
        "{call:?}"
    );
    ensure!(call.task_id.as_deref() == Some(task_id), "{call:?}");
    ensure!(
        call.input == super::input([("argv", strings(argv))]),
        "{call:?}"
    );
    let exec = recv!(shim, DriverToShim::Exec(e) => e);
    ensure!(exec.argv == argv, "{exec:?}");
    ensure!(exec.task_id.as_deref() == Some(task_id), "{exec:?}");
    Ok(exec)
}

fn output(exec_id: u64, stream: OutputStream, data: &'static [u8]) -> ExecOutput {
    ExecOutput {
        exec_id,
        stream,
        data: Bytes::from_static(data),
    }
}

conformance! {
    fn exec_runs_through_the_shim(driver: Driver) -> Result<()> {
        let mut shim = FakeShim::start(driver)?;
        let argv = ["sh", "-c", "echo hello"];
        shim.send_task("t1", input([("text", "done".into()), ("exec", strings(&argv))]))?;
        let exec = expect_call(&mut shim, "t1", &argv)?;
        // A ping while the driver waits for the exec is answered.
        shim.ping()?;
        shim.send(ExecStarted { re: exec.id, exec_id: 9, pid: 4242 })?;
        shim.send(output(9, OutputStream::Stdout, b"hel"))?;
        shim.send(output(9, OutputStream::Stderr, b"warning\n"))?;
        shim.send(output(7, OutputStream::Stdout, b"another exec's"))?;
        shim.send(output(9, OutputStream::Stdout, b"lo \xff\n"))?;
        shim.send(ExecExit {
            exec_id: 9,
            code: Some(0),
            signal: None,
            timed_out: false,
            truncated: true,
            duration_ms: 12,
            oom_killed: None,
        })?;
        let result = recv!(shim, DriverToShim::ToolResult(r) => r);
        let want = input([
            ("code", 0.into()),
            ("signal", Value::Nil),
            ("stdout", "hello \u{fffd}\n".into()),
            ("timed_out", false.into()),
            ("truncated", true.into()),
        ]);
        ensure!(result.call_id == "t1-exec" && !result.is_error, "{result:?}");
        ensure!(result.task_id.as_deref() == Some("t1"), "{result:?}");
        ensure!(result.output == want, "output {} want {want}", result.output);
        let (events, done) = shim.until_done("t1")?;
        ensure!(events.len() == 2, "{events:#?}");
        ensure!(done.status == TaskStatus::Succeeded && done.output == Some("done".into()),
            "{done:?}");
        Ok(())
    }

    fn exec_that_fails_is_an_error_result(driver: Driver) -> Result<()> {
        let mut shim = FakeShim::start(driver)?;
        let argv = ["false"];
        shim.send_task("t2", input([("exec", strings(&argv))]))?;
        let exec = expect_call(&mut shim, "t2", &argv)?;
        shim.send(ExecStarted { re: exec.id, exec_id: 1, pid: 1 })?;
        shim.send(ExecExit {
            exec_id: 1,
            code: None,
            signal: Some("SIGKILL".into()),
            timed_out: true,
            truncated: false,
            duration_ms: 5000,
            oom_killed: None,
        })?;
        let result = recv!(shim, DriverToShim::ToolResult(r) => r);
        let want = input([
            ("code", Value::Nil),
            ("signal", "SIGKILL".into()),
            ("stdout", "".into()),
            ("timed_out", true.into()),
            ("truncated", false.into()),
        ]);
        ensure!(result.is_error && result.output == want, "{result:?}");
        let (_, done) = shim.until_done("t2")?;
        ensure!(done.status == TaskStatus::Succeeded, "{done:?}");
        Ok(())
    }

    fn exec_refused_by_the_shim_is_an_error_result(driver: Driver) -> Result<()> {
        let mut shim = FakeShim::start(driver)?;
        let argv = ["no-such-tool"];
        shim.send_task("t3", input([("text", "after".into()), ("exec", strings(&argv))]))?;
        let exec = expect_call(&mut shim, "t3", &argv)?;
        shim.send(ErrorMsg {
            re: Some(exec.id),
            code: ErrorCode::Limit,
            message: "all exec slots are taken".into(),
            task_id: None,
            first_available: None,
        })?;
        let result = recv!(shim, DriverToShim::ToolResult(r) => r);
        ensure!(result.call_id == "t3-exec" && result.is_error, "{result:?}");
        let want = input([("error", "all exec slots are taken".into())]);
        ensure!(result.output == want, "{result:?}");
        let (events, done) = shim.until_done("t3")?;
        ensure!(events.len() == 2, "{events:#?}");
        ensure!(done.status == TaskStatus::Succeeded, "{done:?}");
        Ok(())
    }
}
