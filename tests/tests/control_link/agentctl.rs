//! agentctl against a real shim: every command, human and `--json` output, exit codes, and
//! `tail` killed with SIGKILL mid-stream then restarted from the last seq it printed.

use std::io::{BufRead as _, BufReader, Read as _};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use control_link::TaskSpec;

use super::{assert_consecutive, input, runtime, words, LinkShim};
use crate::support::{poll_until, workspace_bin, Mode, TempDir, PATIENCE};

fn agentctl_bin() -> Result<PathBuf> {
    workspace_bin(
        "AGENTCTL_BIN",
        &["debug/agentctl"],
        "`cargo build -p agent-shim-examples`",
    )
}

/// A child process killed and reaped on drop.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn command(addr: &str, args: &[&str]) -> Result<Command> {
    let mut cmd = Command::new(agentctl_bin()?);
    cmd.arg("--addr").arg(addr).args(args);
    cmd.env_remove("AGENT_SHIM_TOKEN")
        .env_remove("AGENT_SHIM_CONTROL");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    Ok(cmd)
}

/// Runs agentctl to its end (at most `PATIENCE`): exit code, stdout, stderr.
fn run(addr: &str, args: &[&str]) -> Result<(i32, String, String)> {
    let mut child = Guard(command(addr, args)?.spawn()?);
    let mut out = child.0.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut err = child.0.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = poll_until(PATIENCE, || child.0.try_wait().ok().flatten())
        .ok_or_else(|| anyhow!("agentctl {args:?} did not finish within {PATIENCE:?}"))?;
    let out = out_t.join().map_err(|_| anyhow!("stdout reader"))?;
    let err = err_t.join().map_err(|_| anyhow!("stderr reader"))?;
    let code = status.code().unwrap_or(-1);
    Ok((code, out, err))
}

fn json_lines(out: &str) -> Result<Vec<serde_json::Value>> {
    out.lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l:?}")))
        .collect()
}

fn seq_of(v: &serde_json::Value) -> Result<u64> {
    v["seq"].as_u64().ok_or_else(|| anyhow!("no seq in {v}"))
}

#[test]
fn tail_killed_mid_stream_resumes_exactly_once() -> Result<()> {
    let shim = LinkShim::start(Mode::Subreaper)?;
    let addr = shim.addr.to_string();
    // Fill the shim's buffer: a long task, run to its end by a client that never reads
    // events (so nothing is acknowledged).
    let total = runtime()?.block_on(async {
        let client = control_link::connect(&shim.addr, None).await?;
        client
            .submit_task(TaskSpec::new("big", input(&words(600), 0)))
            .await?;
        let deadline = Instant::now() + PATIENCE;
        loop {
            let s = client.status().await?;
            if s.task_running.is_none() && s.tasks_queued == 0 && s.last_seq > 1200 {
                client.close().await;
                return Ok::<_, anyhow::Error>(s.last_seq);
            }
            ensure!(Instant::now() < deadline, "the task did not finish: {s:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })?;

    // First run: read some lines, then SIGKILL it while it is blocked writing the rest.
    let mut first = Guard(command(&addr, &["--json", "tail"])?.spawn()?);
    let stdout = first.0.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut reader = BufReader::new(stdout);
    let mut lines = Vec::new();
    let start = Instant::now();
    while lines.len() < 300 {
        ensure!(
            start.elapsed() < PATIENCE,
            "tail printed only {} lines",
            lines.len()
        );
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            bail!("tail ended after {} lines", lines.len());
        }
        lines.push(line.trim_end().to_owned());
    }
    first.0.kill()?;
    first.0.wait()?;
    // Everything it printed before dying.
    let mut rest = String::new();
    reader.read_to_string(&mut rest)?;
    lines.extend(rest.lines().map(str::to_owned));
    let printed = json_lines(&lines.join("\n"))?;
    let first_seqs: Vec<u64> = printed.iter().map(seq_of).collect::<Result<_>>()?;
    let last = *first_seqs
        .last()
        .ok_or_else(|| anyhow!("nothing printed"))?;
    ensure!(
        last < total,
        "the first tail printed everything ({last}); not mid-stream"
    );

    // It acked only what it printed: the shim still holds everything after `last`.
    let buffered = runtime()?.block_on(async {
        let c = control_link::connect(&shim.addr, None).await?;
        let s = c.status().await?;
        c.close().await;
        Ok::<_, control_link::Error>(s.buffered_events)
    })?;
    ensure!(
        buffered >= total - last,
        "{buffered} buffered, {} unprinted",
        total - last
    );

    // Second run from the last seq printed.
    let count = (total - last).to_string();
    let from = last.to_string();
    let (code, out, err) = run(
        &addr,
        &["--json", "tail", "--from", &from, "--count", &count],
    )?;
    ensure!(code == 0, "tail --from exited {code}: {err}");
    let second: Vec<u64> = json_lines(&out)?
        .iter()
        .map(seq_of)
        .collect::<Result<_>>()?;
    let all: Vec<u64> = first_seqs.into_iter().chain(second).collect();
    assert_consecutive(&all, 1)?;
    ensure!(all.len() as u64 == total, "{} events of {total}", all.len());
    Ok(())
}

#[test]
fn commands_human_and_json() -> Result<()> {
    let mut shim = LinkShim::start_with(Mode::Pid1, &["--idle-after", "200ms"])?;
    let addr = shim.addr.to_string();
    let ok = |args: &[&str]| -> Result<String> {
        let (code, out, err) = run(&addr, args)?;
        ensure!(
            code == 0,
            "agentctl {args:?} exited {code}\nstdout: {out}\nstderr: {err}"
        );
        Ok(out)
    };

    // status
    let human = ok(&["status"])?;
    ensure!(
        human.contains("state") && human.contains("last seq"),
        "{human}"
    );
    let json: serde_json::Value = serde_json::from_str(ok(&["--json", "status"])?.trim())?;
    ensure!(
        json["state"].is_string() && json["last_seq"].is_u64(),
        "{json}"
    );
    // Idle time, once the shim has been without work for its --idle-after.
    let idle = crate::support::poll_until(PATIENCE, || {
        let out = ok(&["status"]).ok()?;
        out.lines()
            .find(|l| l.starts_with("idle for "))
            .map(str::to_owned)
    });
    ensure!(
        idle.as_deref().is_some_and(|l| l.contains(" s (since ")),
        "agentctl status never showed the idle time: {idle:?}"
    );
    let json: serde_json::Value = serde_json::from_str(ok(&["--json", "status"])?.trim())?;
    ensure!(json["idle_since_ms"].is_u64(), "{json}");

    // task: follows the task to its end
    let out = ok(&["task", "hello agent", "--id", "h1"])?;
    ensure!(
        out.contains("submitted h1")
            && out.contains("\"hello\"")
            && out.contains("task_done [h1] Succeeded"),
        "{out}"
    );
    let out = ok(&["--json", "task", "json please", "--id", "j1"])?;
    let lines = json_lines(&out)?;
    ensure!(
        lines.first().map(|l| l["submitted"] == "j1") == Some(true),
        "{out}"
    );
    let done = lines.last().ok_or_else(|| anyhow!("no output"))?;
    ensure!(
        done["event"]["type"] == "task_done" && done["event"]["status"] == "succeeded",
        "{done}"
    );
    // a failing task exits 1; the input from a JSON file
    let dir = TempDir::new("ctl")?;
    let file = dir.path().join("task.json");
    std::fs::write(&file, r#"{"text": "x y", "fail": "boom"}"#)?;
    let (code, out, _) = run(
        &addr,
        &["task", "--file", &file.to_string_lossy(), "--id", "f1"],
    )?;
    ensure!(
        code == 1 && out.contains("Failed") && out.contains("boom"),
        "{code} {out}"
    );
    // --no-follow returns at once
    let out = ok(&["task", "later", "--id", "n1", "--no-follow"])?;
    ensure!(out.trim() == "submitted n1", "{out}");

    // cancel of an unknown task: the shim's not_found, exit 1
    let (code, _, err) = run(&addr, &["cancel", "nope"])?;
    ensure!(code == 1 && err.contains("not_found"), "{code} {err}");

    // pause --wait, resume, resume again (invalid_state)
    let out = ok(&["pause", "--wait"])?;
    ensure!(
        out.contains("pause accepted") && out.contains("paused"),
        "{out}"
    );
    let out = ok(&["--json", "resume"])?;
    ensure!(json_lines(&out)?[0]["ok"] == true, "{out}");
    let (code, _, err) = run(&addr, &["resume"])?;
    ensure!(code == 1 && err.contains("invalid_state"), "{code} {err}");
    // With a time: refused the same way before the clock is touched (this host's); a time
    // that is neither milliseconds nor `now` is a usage error.
    let (code, _, err) = run(&addr, &["resume", "--clock", "now"])?;
    ensure!(code == 1 && err.contains("invalid_state"), "{code} {err}");
    let (code, _, err) = run(&addr, &["resume", "--clock", "yesterday"])?;
    ensure!(code == 2 && err.contains("bad time"), "{code} {err}");

    // signal, restart, ping
    ensure!(ok(&["signal", "CONT"])?.contains("signal CONT sent"));
    let (code, _, err) = run(&addr, &["signal", "BOGUS"])?;
    ensure!(code == 1 && err.contains("invalid"), "{code} {err}");
    ensure!(ok(&["restart"])?.contains("restart accepted"));
    ensure!(ok(&["ping"])?.contains("pong"));

    // tail with a count, human
    let out = ok(&["tail", "--count", "3"])?;
    ensure!(out.lines().count() == 3, "{out}");

    // usage errors: 2; nothing listening: 3
    let (code, _, err) = run(&addr, &["frobnicate"])?;
    ensure!(
        code == 2 && err.contains("unrecognized subcommand 'frobnicate'"),
        "{code} {err}"
    );
    let (code, _, _) = run(&addr, &["status", "extra"])?;
    ensure!(code == 2);
    let missing = format!("unix:{}", dir.path().join("none.sock").display());
    let (code, _, err) = run(&missing, &["--timeout", "1s", "status"])?;
    ensure!(code == 3, "{code} {err}");
    let (code, _, err) = run("tcp:127.0.0.1:1", &["status"])?;
    ensure!(code == 3 && err.contains("needs a token"), "{code} {err}");

    // `--json` means JSON output wherever it is placed.
    let json: serde_json::Value = serde_json::from_str(ok(&["status", "--json"])?.trim())?;
    ensure!(json["last_seq"].is_u64(), "{json}");

    // exec: the command's code; agentctl's own failures apart from it (125), a command
    // that cannot be started 126, one not found 127, as docker does.
    let (code, out, err) = run(&addr, &["exec", "--", "sh", "-c", "echo hi; exit 7"])?;
    ensure!(code == 7 && out == "hi\n", "{code} {out:?} {err}");
    let (code, _, err) = run(&addr, &["exec", "--", "/no/such/program"])?;
    ensure!(code == 127 && err.contains("not_found"), "{code} {err}");
    let (code, _, err) = run(&addr, &["exec", "--", "/dev/null"])?;
    ensure!(code == 126 && err.contains("invalid"), "{code} {err}");
    let (code, _, err) = run(&addr, &["exec"])?;
    ensure!(code == 125 && err.contains("required"), "{code} {err}");
    let (code, _, err) = run(&missing, &["--timeout", "1s", "exec", "--", "true"])?;
    ensure!(code == 125, "{code} {err}");

    // --help on every command, and --version
    for cmd in [
        "status",
        "tail",
        "task",
        "cancel",
        "pause",
        "resume",
        "signal",
        "restart",
        "set-driver",
        "exec",
        "shutdown",
        "ping",
    ] {
        let (code, out, err) = run(&addr, &[cmd, "--help"])?;
        ensure!(
            code == 0 && out.contains(&format!("Usage: agentctl {cmd}")),
            "{cmd} --help: {code} {out} {err}"
        );
    }
    let (code, out, _) = run(&addr, &["--version"])?;
    ensure!(
        code == 0 && out.trim() == format!("agentctl {}", env!("CARGO_PKG_VERSION")),
        "{code} {out}"
    );

    // shutdown: accepted, and the shim exits
    ensure!(ok(&["shutdown", "--grace", "2s"])?.contains("shutdown accepted"));
    shim.shim.wait_code(PATIENCE)?;
    Ok(())
}

/// Issue 18's scenario with the real tool: `agentctl tail` (an observer) prints and
/// acknowledges events while the control plane is away; the control plane, back with its
/// cursor, still gets every one of them. `--consumer` makes agentctl a consumer whose acks
/// count.
#[test]
fn tail_never_moves_the_control_planes_cursor() -> Result<()> {
    use crate::support::control::{ControlClient, Target};
    let shim = LinkShim::start(Mode::Subreaper)?;
    let addr = format!("unix:{}", shim.sock.display());
    let target = Target::Unix(shim.sock.clone());
    // The control plane processes up to `cursor`, then goes away.
    let mut ctl = ControlClient::connect_to(&target, None, PATIENCE)?;
    ctl.resume_from(0)?;
    ctl.submit_ok("t1", input("a b", 0))?;
    let mut cursor = 0;
    while let Some(s) = ctl.try_next_stamped(PATIENCE)? {
        ctl.ack(s.seq)?;
        cursor = s.seq;
        if matches!(
            &s.event,
            control_link::protocol::message::Event::TaskDone(_)
        ) {
            break;
        }
    }
    drop(ctl);
    let (code, out, err) = run(&addr, &["--json", "task", "c d e", "--id", "t2"])?;
    ensure!(code == 0, "task exited {code}: {err}");
    let tailed = {
        let (code, out, err) = run(
            &addr,
            &[
                "--json",
                "tail",
                "--from",
                &cursor.to_string(),
                "--count",
                "5",
            ],
        )?;
        ensure!(code == 0, "tail exited {code}: {err}");
        json_lines(&out)?
            .iter()
            .map(seq_of)
            .collect::<Result<Vec<_>>>()?
    };
    ensure!(
        tailed.len() == 5 && tailed[0] == cursor + 1,
        "tail printed {tailed:?}\n{out}"
    );
    let mut back = ControlClient::connect_to(&target, None, PATIENCE)?;
    back.resume_from(cursor)?;
    let first = back.next_stamped(PATIENCE)?;
    ensure!(
        first.seq == cursor + 1,
        "the control plane resumed at {} after {cursor}: agentctl's acks moved its cursor",
        first.seq
    );
    drop(back);
    // As a consumer, its acks count for that consumer only.
    let (code, _, err) = run(&addr, &["--consumer", "ops", "tail", "--count", "2"])?;
    ensure!(code == 0, "tail --consumer exited {code}: {err}");
    let mut back = ControlClient::connect_to(&target, None, PATIENCE)?;
    back.resume_from(cursor)?;
    ensure!(back.next_stamped(PATIENCE)?.seq == cursor + 1);
    Ok(())
}

// Resources.

#[test]
fn metrics_and_top_human_and_json() -> Result<()> {
    let shim = LinkShim::start(Mode::Subreaper)?;
    let addr = shim.addr.to_string();

    // The socket is up a moment before the driver is launched: a reading taken meanwhile
    // rightly has no driver in it. Asked again until it has (bounded).
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let (code, out, err) = run(&addr, &["metrics", "--json"])?;
        ensure!(code == 0, "metrics --json exited {code}: {err}");
        let v = json_lines(&out)?;
        let r = v.first().ok_or_else(|| anyhow!("no output"))?;
        ensure!(v.len() == 1 && r["time_ms"].as_u64().is_some(), "{out}");
        ensure!(
            r["workspace"]["size_bytes"].as_u64().is_some_and(|n| n > 0),
            "{out}"
        );
        let driver = r["procs"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["role"] == "driver"));
        if driver {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "no driver in the reading: {out}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    let (code, out, err) = run(&addr, &["metrics"])?;
    ensure!(code == 0, "metrics exited {code}: {err}");
    for want in ["time ", "workspace ", "driver pid "] {
        ensure!(out.contains(want), "no {want:?} in {out}");
    }

    let (code, out, err) = run(
        &addr,
        &["top", "--interval", "100ms", "--count", "3", "--json"],
    )?;
    ensure!(code == 0, "top --json exited {code}: {err}");
    let times: Vec<u64> = json_lines(&out)?
        .iter()
        .map(|v| v["time_ms"].as_u64().ok_or_else(|| anyhow!("{v}")))
        .collect::<Result<_>>()?;
    ensure!(
        times.len() == 3 && times.windows(2).all(|w| w[0] < w[1]),
        "{out}"
    );

    // Not a terminal: readings one after the other, the second with CPU use since the first.
    let (code, out, err) = run(&addr, &["top", "--interval", "100ms", "--count", "2"])?;
    ensure!(code == 0, "top exited {code}: {err}");
    ensure!(!out.contains('\x1b'), "terminal codes in a pipe: {out:?}");
    ensure!(out.matches("time ").count() == 2, "{out}");
    let second = out.rsplit("time ").next().unwrap_or_default();
    ensure!(
        second
            .lines()
            .any(|l| l.starts_with("driver pid") && l.ends_with("%)")),
        "{out}"
    );
    Ok(())
}

/// `agentctl ps` and `agentctl attach` against a real shim as PID 1: an exec started by
/// another client (a control-link consumer) is listed with its tag, and attach replays its
/// output, follows it live and exits with its code; control-link's typed `list_execs` and
/// `attach_exec` see the same.
#[test]
fn ps_and_attach_follow_an_exec_another_client_started() -> Result<()> {
    let shim = LinkShim::start(Mode::Pid1)?;
    let addr = shim.addr.to_string();
    let rt = runtime()?;
    let client = rt.block_on(control_link::connect(&shim.addr, None))?;
    let script = "echo one; echo two >&2; read x; echo three; exit 5";
    let spec = control_link::ExecSpec::new(["sh", "-c", script])
        .stdin(true)
        .tag("job:ctl");
    let exec_id = rt.block_on(client.exec(spec))?.exec_id;
    // Wait (typed list_execs) until the first two lines are written.
    poll_until(PATIENCE, || {
        let execs = rt.block_on(client.list_execs()).ok()?;
        execs
            .into_iter()
            .find(|e| e.exec_id == exec_id && e.output_bytes >= 8)
    })
    .ok_or_else(|| anyhow!("exec {exec_id} never wrote its first lines"))?;

    let (code, out, err) = run(&addr, &["ps"])?;
    ensure!(code == 0, "ps: {code} {err}");
    let row = out
        .lines()
        .find(|l| l.contains("job:ctl"))
        .ok_or_else(|| anyhow!("ps shows no job:ctl:\n{out}"))?;
    ensure!(
        row.contains("running") && row.contains("control") && row.contains("sh -c"),
        "{out}"
    );
    let (code, out, _) = run(&addr, &["ps", "--json"])?;
    ensure!(code == 0);
    let rows = json_lines(&out)?;
    ensure!(
        rows.iter()
            .any(|r| r["exec_id"] == exec_id && r["tag"] == "job:ctl" && r["exit"].is_null()),
        "{out}"
    );

    // attach: the replay, then (after the input the owner sends) the rest and the exit code.
    let mut att = Guard(command(&addr, &["attach", &exec_id.to_string()])?.spawn()?);
    let mut stdout = att.0.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut stderr = att.0.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    // A typed attachment beside it sees the same replay.
    let (attached, mut stream) = rt.block_on(client.attach_exec(exec_id, Some(0)))?;
    ensure!(
        attached.running && attached.first_offset == 0,
        "{attached:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    rt.block_on(client.exec_input(exec_id, b"go\n".to_vec(), true))?;
    let status = poll_until(PATIENCE, || att.0.try_wait().ok().flatten())
        .ok_or_else(|| anyhow!("agentctl attach did not finish"))?;
    let out = out_t.join().map_err(|_| anyhow!("stdout reader"))?;
    let err = err_t.join().map_err(|_| anyhow!("stderr reader"))?;
    ensure!(status.code() == Some(5), "attach exited {status:?}: {err}");
    ensure!(
        out == "one\nthree\n" && err.contains("two"),
        "out {out:?} err {err:?}"
    );
    let typed = rt.block_on(async {
        let mut bytes = Vec::new();
        while let Some(item) = stream.next().await {
            match item {
                control_link::AttachItem::Output(o) => bytes.extend_from_slice(&o.data),
                control_link::AttachItem::Exit(x) => return Ok((bytes, x)),
                control_link::AttachItem::Lagged(l) => bail!("lagged {l:?}"),
            }
        }
        bail!("the stream ended without the exit")
    })?;
    ensure!(typed.0.len() == 14 && typed.1.code == Some(5), "{typed:?}");
    // An exec nobody knows: agentctl's own failure (125), the shim's code printed.
    let (code, _, err) = run(&addr, &["attach", "987654"])?;
    ensure!(code == 125 && err.contains("not_found"), "{code} {err}");
    // After the exit, ps shows it exited.
    let (_, out, _) = run(&addr, &["ps"])?;
    ensure!(
        out.lines()
            .any(|l| l.contains("job:ctl") && l.contains("exited 5")),
        "{out}"
    );
    rt.block_on(client.close());
    Ok(())
}
