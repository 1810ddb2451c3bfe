//! Tool execution end to end: execs started by the control plane (and by the echo driver) run
//! by the real shim, with their output, input, terminal, timeouts, caps, limits and
//! backpressure checked from outside — and from inside, by what the exec itself reports.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use bytes::Bytes;
use driver_protocol::message::{
    Event, Exec, ExecInput, ExecResize, ExecSignal, ShimToControl, TaskStatus, TtySize,
};
use driver_protocol::ErrorCode;
use rmpv::Value;

use super::{input, Driver, Setup, Sup};
use crate::support::control::ExecRun;
use crate::support::process::{children_of, state_of};
use crate::support::{in_both_modes, poll_until, Mode, TempDir, PATIENCE};

/// An exec request running `argv`.
fn cmd(id: u64, argv: &[&str]) -> Exec {
    Exec::new(id, argv.iter().copied())
}

/// An exec request running `sh -c script`.
fn sh(id: u64, script: &str) -> Exec {
    cmd(id, &["sh", "-c", script])
}

/// Runs `req` to its end; what it produced.
fn run(sup: &mut Sup, make: impl FnOnce(u64) -> Exec) -> Result<ExecRun> {
    let started = sup.ctl.exec_started(make)?;
    sup.ctl.exec_run(started.exec_id, PATIENCE)
}

/// Every descendant of `pid` (host pids), depth first.
fn descendants(pid: libc::pid_t) -> Vec<libc::pid_t> {
    let mut out = Vec::new();
    let mut todo = children_of(pid);
    while let Some(p) = todo.pop() {
        out.push(p);
        todo.extend(children_of(p));
    }
    out
}

/// The shim's descendants outside the driver's tree, with their state (the leftovers of
/// execs), once there are none; fails with them after [`PATIENCE`].
fn expect_no_leftovers(sup: &Sup, driver: u32) -> Result<()> {
    let driver = sup.host_pid(driver)?;
    let left = || -> Vec<(libc::pid_t, Option<char>, String)> {
        let mut tree = descendants(driver);
        tree.push(driver);
        descendants(sup.shim.pid())
            .into_iter()
            .filter(|p| !tree.contains(p))
            .map(|p| {
                let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
                (p, state_of(p), comm.trim().to_owned())
            })
            .collect()
    };
    if poll_until(PATIENCE, || left().is_empty().then_some(())).is_none() {
        bail!("processes left behind: {:?}\n{}", left(), sup.context());
    }
    Ok(())
}

in_both_modes! {
    fn exit_codes_signals_and_refusals(mode: Mode) -> Result<()> {
        let mut sup = Setup::new(mode).start()?;
        let driver = sup.expect_up(1)?;
        let r = run(&mut sup, |id| sh(id, "echo out; echo err >&2; exit 3"))?;
        let exit = r.exit.clone().expect("exit");
        ensure!(r.out() == "out\n" && r.stderr == b"err\n", "{r:?}");
        ensure!(exit.code == Some(3) && exit.signal.is_none() && !exit.timed_out, "{exit:?}");
        let r = run(&mut sup, |id| sh(id, "kill -KILL $$"))?;
        let exit = r.exit.expect("exit");
        ensure!(exit.code.is_none() && exit.signal.as_deref() == Some("SIGKILL"), "{exit:?}");
        // exec_signal reaches the whole group; the exec counts as running until then.
        let s = sup.ctl.exec_started(|id| sh(id, "sleep 100 & sleep 100"))?;
        let status = sup.status_until("the exec running", |s| s.execs_running == 1)?;
        ensure!(status.children >= 2, "{status:?}");
        sup.ctl.send(ExecSignal { exec_id: s.exec_id, signal: "TERM".into() })?;
        let exit = sup.ctl.exec_run(s.exec_id, PATIENCE)?.exit.expect("exit");
        ensure!(exit.signal.as_deref() == Some("SIGTERM"), "{exit:?}");
        expect_no_leftovers(&sup, driver)?;
        ensure!(sup.status()?.execs_running == 0, "still counted");
        // Refusals: not found, empty argv, a bad cwd; unknown ids get not_found without re.
        let refused = |sup: &mut Sup, req: fn(u64) -> Exec| -> Result<ErrorCode> {
            match sup.ctl.exec(req)? {
                ShimToControl::Error(e) => Ok(e.code),
                other => bail!("expected a refusal, got {other:?}"),
            }
        };
        ensure!(refused(&mut sup, |id| cmd(id, &["no-such-tool-here"]))? == ErrorCode::NotFound);
        ensure!(refused(&mut sup, |id| cmd(id, &[]))? == ErrorCode::Invalid);
        ensure!(
            refused(&mut sup, |id| Exec { cwd: Some("/no/such/dir".into()), ..cmd(id, &["true"]) })?
                == ErrorCode::Invalid
        );
        sup.ctl.send(ExecInput { exec_id: 4242, data: Bytes::new(), eof: true })?;
        let e = sup.ctl.error_without_re(PATIENCE)?;
        ensure!(e.code == ErrorCode::NotFound, "{e:?}");
        Ok(())
    }

    fn stdin_is_streamed_through_cat(mode: Mode) -> Result<()> {
        let mut sup = Setup::new(mode).start()?;
        sup.expect_up(1)?;
        let s = sup.ctl.exec_started(|id| Exec { stdin: true, ..cmd(id, &["cat"]) })?;
        sup.ctl.send(ExecInput { exec_id: s.exec_id, data: Bytes::from_static(b"hello "), eof: false })?;
        sup.ctl.send(ExecInput {
            exec_id: s.exec_id,
            data: Bytes::from_static(b"w\x00rld\xff"),
            eof: true,
        })?;
        let r = sup.ctl.exec_run(s.exec_id, PATIENCE)?;
        ensure!(r.stdout == b"hello w\x00rld\xff", "{r:?}");
        ensure!(r.exit.as_ref().and_then(|x| x.code) == Some(0), "{r:?}");
        Ok(())
    }

    fn a_terminal_sees_its_size_and_every_resize(mode: Mode) -> Result<()> {
        let mut sup = Setup::new(mode).start()?;
        sup.expect_up(1)?;
        let tty = Some(TtySize { rows: 24, cols: 80 });
        // A resize sent right after exec_started is never lost.
        let s = sup.ctl.exec_started(|id| Exec {
            tty,
            ..sh(id, "test -t 0 && test -t 1 && echo tty; sleep 0.3; stty size")
        })?;
        sup.ctl.send(ExecResize { exec_id: s.exec_id, rows: 33, cols: 101 })?;
        let r = sup.ctl.exec_run(s.exec_id, PATIENCE)?;
        let text = String::from_utf8_lossy(&r.pty).replace('\r', "");
        ensure!(text == "tty\n33 101\n", "{r:?}");
        ensure!(r.stdout.is_empty() && r.stderr.is_empty(), "{r:?}");
        // A running program is told (SIGWINCH to the terminal's foreground group).
        let s = sup.ctl.exec_started(|id| Exec {
            tty,
            ..sh(id, "trap 'stty size' WINCH; stty size; while :; do sleep 0.05; done")
        })?;
        let mut run = ExecRun::default();
        let mut wait_for = |sup: &mut Sup, want: &str| -> Result<()> {
            let (_, skipped) = sup.wait("terminal output", |e| {
                run.take(e).is_ok()
                    && String::from_utf8_lossy(&run.pty).replace('\r', "").contains(want)
            })?;
            ensure!(skipped.iter().all(|e| !matches!(e.event, Event::ExecExit(_))));
            Ok(())
        };
        wait_for(&mut sup, "24 80\n")?;
        sup.ctl.send(ExecResize { exec_id: s.exec_id, rows: 40, cols: 120 })?;
        wait_for(&mut sup, "40 120\n")?;
        sup.ctl.send(ExecSignal { exec_id: s.exec_id, signal: "KILL".into() })?;
        let exit = sup.ctl.exec_run(s.exec_id, PATIENCE)?.exit.expect("exit");
        ensure!(exit.signal.as_deref() == Some("SIGKILL"), "{exit:?}");
        Ok(())
    }

    fn a_timeout_kills_the_whole_tree(mode: Mode) -> Result<()> {
        let mut sup = Setup::new(mode).flag("--exec-kill-grace", "300ms").start()?;
        let driver = sup.expect_up(1)?;
        let t0 = Instant::now();
        let r = run(&mut sup, |id| Exec {
            timeout_ms: Some(300),
            ..sh(id, "sleep 100 & sleep 100")
        })?;
        let exit = r.exit.expect("exit");
        ensure!(exit.timed_out && exit.signal.as_deref() == Some("SIGTERM"), "{exit:?}");
        ensure!(t0.elapsed() < Duration::from_secs(10), "took {:?}", t0.elapsed());
        expect_no_leftovers(&sup, driver)?;
        // SIGTERM ignored: SIGKILL after the kill grace.
        let r = run(&mut sup, |id| Exec {
            // Long enough for the trap to be set first, even on a loaded machine.
            timeout_ms: Some(1000),
            ..sh(id, "trap '' TERM; echo armed; while :; do sleep 0.05; done")
        })?;
        let exit = r.exit.clone().expect("exit");
        ensure!(r.out() == "armed\n", "{r:?}");
        ensure!(exit.timed_out && exit.signal.as_deref() == Some("SIGKILL"), "{exit:?}");
        ensure!(exit.duration_ms >= 1250, "{exit:?}");
        expect_no_leftovers(&sup, driver)?;
        Ok(())
    }

    fn a_grandchild_holding_stdout_does_not_hold_the_exit(mode: Mode) -> Result<()> {
        let mut sup = Setup::new(mode).start()?;
        let driver = sup.expect_up(1)?;
        let t0 = Instant::now();
        let r = run(&mut sup, |id| sh(id, "echo bye; sleep 100 &"))?;
        ensure!(r.out() == "bye\n", "{r:?}");
        ensure!(r.exit.as_ref().and_then(|x| x.code) == Some(0), "{r:?}");
        ensure!(t0.elapsed() < Duration::from_secs(10), "took {:?}", t0.elapsed());
        // The group is killed once the drain is over: the sleep is gone too.
        expect_no_leftovers(&sup, driver)?;
        // The same on a terminal.
        let r = run(&mut sup, |id| Exec {
            tty: Some(TtySize { rows: 10, cols: 10 }),
            ..sh(id, "sleep 100 & echo bg")
        })?;
        ensure!(r.exit.as_ref().and_then(|x| x.code) == Some(0), "{r:?}");
        expect_no_leftovers(&sup, driver)?;
        Ok(())
    }

    fn the_output_cap_truncates_and_marks(mode: Mode) -> Result<()> {
        let mut sup = Setup::new(mode).start()?;
        sup.expect_up(1)?;
        let r = run(&mut sup, |id| Exec {
            output_cap: Some(1000),
            ..sh(id, "head -c 300000 /dev/zero; echo err >&2")
        })?;
        let exit = r.exit.clone().expect("exit");
        ensure!(r.stdout.len() == 1000 && r.stdout.iter().all(|&b| b == 0), "{}", r.stdout.len());
        ensure!(r.stderr == b"err\n", "{r:?}");
        ensure!(exit.truncated && exit.code == Some(0), "{exit:?}");
        // Chunks are bounded (128 KiB each at most: 300,000 bytes take at least 3).
        let r = run(&mut sup, |id| sh(id, "head -c 300000 /dev/zero"))?;
        ensure!(r.stdout.len() == 300_000 && r.chunks >= 3, "{} in {}", r.stdout.len(), r.chunks);
        ensure!(!r.exit.expect("exit").truncated);
        Ok(())
    }

    fn a_hundred_execs_at_once_and_the_limit(mode: Mode) -> Result<()> {
        let mut sup = Setup::new(mode).flag("--max-execs", "100").start()?;
        sup.expect_up(1)?;
        let mut ids = BTreeMap::new();
        // Each waits for the end of its stdin, so none can finish before it is released.
        for n in 0..100 {
            let script = format!("read _; printf 'exec %s' {n}; exit $(({n} % 7))");
            let s = sup.ctl.exec_started(|id| Exec {
                stdin: true,
                ..sh(id, &script)
            })?;
            ids.insert(s.exec_id, n);
        }
        // The 101st is refused while they run.
        match sup.ctl.exec(|id| cmd(id, &["true"]))? {
            ShimToControl::Error(e) => ensure!(
                e.code == ErrorCode::Limit && e.message.contains("--max-execs 100"),
                "{e:?}"
            ),
            other => bail!("the 101st exec answered {other:?}"),
        }
        for &exec_id in ids.keys() {
            sup.ctl.send(ExecInput {
                exec_id,
                data: Bytes::new(),
                eof: true,
            })?;
        }
        let list: Vec<u64> = ids.keys().copied().collect();
        let runs = sup.ctl.exec_runs(&list, PATIENCE)?;
        for (id, n) in &ids {
            let r = &runs[id];
            ensure!(r.out() == format!("exec {n}"), "{n}: {r:?}");
            ensure!(r.exit.as_ref().and_then(|x| x.code) == Some(n % 7), "{n}: {r:?}");
        }
        ensure!(sup.status()?.execs_running == 0);
        // Slots are free again.
        ensure!(run(&mut sup, |id| cmd(id, &["true"]))?.exit.is_some());
        Ok(())
    }

    fn sandbox_limits_reach_the_driver_and_every_exec(mode: Mode) -> Result<()> {
        let mut sup = Setup::new(mode)
            .switch("--no-new-privs")
            .flag("--rlimit", "NOFILE=123:456")
            .flag("--umask", "027")
            .env("AGENT_SHIM_TOKEN", "do-not-leak")
            .start()?;
        let driver = sup.expect_up(1)?;
        let r = run(&mut sup, |id| Exec {
            env: [("EXTRA".to_owned(), "1".to_owned())].into(),
            ..sh(
                id,
                "grep NoNewPrivs /proc/self/status; grep 'Max open files' /proc/self/limits; \
                 umask; ls /proc/self/fd | tr '\\n' ' '; echo; env | grep -c AGENT_SHIM_TOKEN; \
                 echo extra=$EXTRA",
            )
        })?;
        let out = r.out();
        let lines: Vec<&str> = out.lines().collect();
        ensure!(lines.first().map(|l| l.split_whitespace().collect::<Vec<_>>())
            == Some(vec!["NoNewPrivs:", "1"]), "{out}");
        ensure!(lines.get(1).is_some_and(|l| l.split_whitespace().collect::<Vec<_>>()
            == ["Max", "open", "files", "123", "456", "files"]), "{out}");
        ensure!(lines.get(2) == Some(&"0027"), "{out}");
        // 0, 1, 2 and the directory ls reads: nothing inherited.
        ensure!(lines.get(3).map(|l| l.trim()) == Some("0 1 2 3"), "{out}");
        ensure!(lines.get(4) == Some(&"0"), "an AGENT_SHIM variable reached the exec: {out}");
        ensure!(lines.get(5) == Some(&"extra=1"), "{out}");
        // The driver got the same limits.
        let host = sup.host_pid(driver)?;
        let status = std::fs::read_to_string(format!("/proc/{host}/status"))?;
        ensure!(status.lines().any(|l| l.split_whitespace().eq(["NoNewPrivs:", "1"])), "{status}");
        let limits = std::fs::read_to_string(format!("/proc/{host}/limits"))?;
        ensure!(limits.lines().any(|l| l.starts_with("Max open files")
            && l.split_whitespace().skip(3).take(2).eq(["123", "456"])), "{limits}");
        Ok(())
    }

    fn an_exec_survives_a_disconnect_and_its_output_is_replayed(mode: Mode) -> Result<()> {
        let mut sup = Setup::new(mode).start()?;
        sup.expect_up(1)?;
        let s = sup.ctl.exec_started(|id| {
            sh(id, "echo one; sleep 0.5; echo two; sleep 0.5; echo three")
        })?;
        // Gone before any output was read: the exec runs on, its output is buffered.
        let mut run = ExecRun::default();
        for e in sup.ctl.take_pending() {
            run.take(&e.event)?;
        }
        let cursor = sup.ctl.last_seq();
        let mut ctl = crate::support::control::ControlClient::connect(&sup.sock, PATIENCE)?;
        ctl.continue_ids(&sup.ctl);
        let old = std::mem::replace(&mut sup.ctl, {
            ctl.resume_from(cursor)?;
            ctl
        });
        drop(old);
        let status = sup.status()?;
        ensure!(status.execs_running <= 1, "{status:?}");
        let rest = sup.ctl.exec_run(s.exec_id, PATIENCE)?;
        run.stdout.extend_from_slice(&rest.stdout);
        ensure!(run.out() == "one\ntwo\nthree\n", "{run:?} then {rest:?}");
        ensure!(rest.exit.as_ref().and_then(|x| x.code) == Some(0), "{rest:?}");
        // A client away for the whole run gets all of it on resume.
        let s = sup.ctl.exec_started(|id| sh(id, "echo a; sleep 0.3; echo b"))?;
        let cursor = sup.ctl.last_seq() - sup.ctl.take_pending().len() as u64;
        let mut ctl = crate::support::control::ControlClient::connect(&sup.sock, PATIENCE)?;
        ctl.continue_ids(&sup.ctl);
        drop(std::mem::replace(&mut sup.ctl, {
            std::thread::sleep(Duration::from_millis(800));
            ctl.resume_from(cursor)?;
            ctl
        }));
        let r = sup.ctl.exec_run(s.exec_id, PATIENCE)?;
        ensure!(r.out() == "a\nb\n" && r.exit.is_some(), "{r:?}");
        Ok(())
    }

    fn shutdown_ends_every_exec_with_its_exit_first(mode: Mode) -> Result<()> {
        let mut sup = Setup::new(mode).flag("--exec-kill-grace", "300ms").start()?;
        sup.expect_up(1)?;
        // One ends on SIGTERM, one ignores it and needs the SIGKILL.
        let a = sup.ctl.exec_started(|id| cmd(id, &["sleep", "100"]))?;
        let b = sup.ctl.exec_started(|id| sh(id, "trap '' TERM; echo armed; sleep 100"))?;
        sup.wait("the trap set", |e| {
            matches!(e, Event::ExecOutput(o) if o.exec_id == b.exec_id && o.data == "armed\n")
        })?;
        sup.status_until("both running", |s| s.execs_running == 2)?;
        sup.ctl.expect_ok(|id| {
            driver_protocol::message::Shutdown { id, grace_ms: Some(5000), reason: None }.into()
        })?;
        let events = sup.ctl.until_closed(PATIENCE)?;
        let exit_of = |id: u64| {
            events.iter().find_map(|s| match &s.event {
                Event::ExecExit(x) if x.exec_id == id => Some(x.clone()),
                _ => None,
            })
        };
        let (Some(xa), Some(xb)) = (exit_of(a.exec_id), exit_of(b.exec_id)) else {
            bail!("an exec_exit is missing: {:?}", crate::supervisor::kinds(&events));
        };
        ensure!(xa.signal.as_deref() == Some("SIGTERM"), "{xa:?}");
        ensure!(xb.signal.as_deref() == Some("SIGKILL"), "{xb:?}");
        sup.shim.wait_code(PATIENCE)?;
        Ok(())
    }

    fn the_echo_driver_runs_a_tool_through_the_shim(mode: Mode) -> Result<()> {
        driver_tool_call(mode, Driver::Rust)
    }

    fn the_python_driver_runs_a_tool_through_the_shim(mode: Mode) -> Result<()> {
        if !crate::drivers::Driver::python_available() {
            return crate::support::skip("python", "AGENT_SHIM_PYTHON not set", module_path!());
        }
        driver_tool_call(mode, Driver::Python)
    }
}

/// A task whose echo driver runs `sh -c …` through the shim: its `tool_result` carries the
/// real output and exit.
fn driver_tool_call(mode: Mode, driver: Driver) -> Result<()> {
    let mut sup = Setup::new(mode).driver(driver).start()?;
    sup.expect_up(1)?;
    let argv = ["sh", "-c", "echo from-tool; echo oops >&2; exit 4"];
    sup.submit(
        "t1",
        input([
            ("text", "done".into()),
            (
                "exec",
                Value::Array(argv.iter().map(|&a| a.into()).collect()),
            ),
        ]),
    )?;
    let (result, _) = sup.wait("tool_result", |e| matches!(e, Event::ToolResult(_)))?;
    let Event::ToolResult(result) = result.event else {
        unreachable!()
    };
    let field = |k: &str| match &result.output {
        Value::Map(m) => m
            .iter()
            .find(|(key, _)| key.as_str() == Some(k))
            .map(|(_, v)| v.clone()),
        _ => None,
    };
    ensure!(result.is_error, "{result:?}");
    ensure!(field("code") == Some(4.into()), "{result:?}");
    ensure!(field("stdout") == Some("from-tool\n".into()), "{result:?}");
    ensure!(field("timed_out") == Some(false.into()), "{result:?}");
    let (done, _, _) = sup.expect_done("t1")?;
    ensure!(done.status == TaskStatus::Succeeded, "{done:?}");
    // The driver's exec output went to the driver only.
    ensure!(sup.status()?.execs_running == 0);
    Ok(())
}

/// Tests that need the shim as PID 1 of its own namespace and root.
mod pid1 {
    use super::*;

    fn start(setup: Setup) -> Result<Sup> {
        setup.start()
    }

    #[test]
    fn a_non_root_exec_can_neither_signal_pid1_nor_read_the_token_file() -> Result<()> {
        crate::support::require_root!();
        let dir = TempDir::new("exec-secret")?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let secret = dir.path().join("token");
        std::fs::write(&secret, "s3cret")?;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600))?;
        // The shim's own control token file: root's, mode 0600 (the shim insists on it).
        let token_file = secret.display().to_string();
        let mut sup = start(Setup::new(Mode::Pid1).flag("--control-token-file", &token_file))?;
        sup.expect_up(1)?;
        let script = format!(
            "id -u; kill -TERM 1 2>/dev/null; echo kill=$?; kill -KILL 1 2>/dev/null; \
             echo kill=$?; cat {} 2>/dev/null; echo cat=$?",
            secret.display()
        );
        let r = run(&mut sup, |id| Exec {
            user: Some("65534:65534".into()),
            ..sh(id, &script)
        })?;
        ensure!(r.out() == "65534\nkill=1\nkill=1\ncat=1\n", "{r:?}");
        std::thread::sleep(Duration::from_millis(200));
        ensure!(sup.shim.alive(), "the shim died\n{}", sup.context());
        ensure!(sup.status()?.state == driver_protocol::message::DriverState::Ready);
        Ok(())
    }

    #[test]
    fn an_nproc_limit_stops_a_fork_bomb_without_hurting_the_shim() -> Result<()> {
        crate::support::require_root!();
        // A uid of its own: NPROC counts every process of the real uid.
        let uid = 61000 + std::process::id() % 1000;
        let mut sup = start(Setup::new(Mode::Pid1).flag("--rlimit", "NPROC=50"))?;
        let driver = sup.expect_up(1)?;
        let r = run(&mut sup, |id| Exec {
            user: Some(uid.to_string()),
            timeout_ms: Some(20_000),
            ..sh(
                id,
                "n=0; while [ $n -lt 500 ]; do sleep 30 & n=$((n+1)); echo $n; done",
            )
        })?;
        let last: u32 = r
            .out()
            .lines()
            .last()
            .and_then(|l| l.parse().ok())
            .unwrap_or(0);
        ensure!((1..50).contains(&last), "forks: {last}\n{r:?}");
        ensure!(String::from_utf8_lossy(&r.stderr).contains("fork"), "{r:?}");
        ensure!(r.exit.as_ref().is_some_and(|x| x.code != Some(0)), "{r:?}");
        expect_no_leftovers(&sup, driver)?;
        // The shim is fine and runs more.
        let r = run(&mut sup, |id| cmd(id, &["true"]))?;
        ensure!(r.exit.and_then(|x| x.code) == Some(0));
        ensure!(sup.shim.alive());
        Ok(())
    }

    #[test]
    fn a_fast_exec_is_slowed_by_its_pipe_not_buffered() -> Result<()> {
        crate::support::require_root!();
        const TOTAL: usize = 50 << 20;
        let mut sup = start(Setup::new(Mode::Pid1))?;
        sup.expect_up(1)?;
        let s = sup
            .ctl
            .exec_started(|id| sh(id, &format!("head -c {TOTAL} /dev/zero")))?;
        // Nobody acknowledges: the replay buffer fills, the exec waits on its pipe.
        std::thread::sleep(Duration::from_secs(2));
        let status = sup.status()?;
        ensure!(
            status.execs_running == 1,
            "the exec should be blocked: {status:?}"
        );
        ensure!(
            status.rss_bytes < 48 << 20,
            "rss {} MiB",
            status.rss_bytes >> 20
        );
        std::thread::sleep(Duration::from_secs(1));
        let later = sup.status()?;
        ensure!(
            later.rss_bytes < 48 << 20,
            "rss {} MiB",
            later.rss_bytes >> 20
        );
        // Over the 8 MiB limit by one output chunk (128 KiB) and its envelope at most.
        ensure!(
            later.buffered_bytes <= (8 << 20) + (128 << 10) + 1024,
            "{later:?}"
        );
        // Everything arrives once the client reads and acknowledges.
        let r = sup.ctl.exec_run(s.exec_id, Duration::from_secs(120))?;
        ensure!(
            r.stdout.len() == TOTAL,
            "got {} of {TOTAL} bytes",
            r.stdout.len()
        );
        ensure!(
            r.exit.as_ref().and_then(|x| x.code) == Some(0),
            "{:?}",
            r.exit
        );
        Ok(())
    }
}

/// Input for execs that never read their stdin is bounded: 16 MiB per exec, 64 MiB for all
/// together; past either, `exec_input` is refused with `limit` and the shim carries on.
#[test]
fn stdin_that_is_never_read_is_bounded() -> Result<()> {
    const CHUNK: usize = 1 << 20;
    let mut sup = Setup::new(Mode::Subreaper).start()?;
    sup.expect_up(1)?;
    let chunk = Bytes::from(vec![b'x'; CHUNK]);
    // Sends one chunk; `None` if accepted, the error if refused. (`status` goes through the
    // supervisor in order after the input, unlike `ping`, which the connection answers.)
    let feed = |sup: &mut Sup, exec_id: u64| -> Result<Option<ErrorCode>> {
        sup.ctl.send(ExecInput {
            exec_id,
            data: chunk.clone(),
            eof: false,
        })?;
        let id = sup.ctl.id();
        sup.ctl.send(driver_protocol::message::Status { id })?;
        let is_status =
            |m: &ShimToControl| matches!(m, ShimToControl::StatusReply(s) if s.re == id);
        match sup.ctl.next_reply(PATIENCE)? {
            ref m if is_status(m) => Ok(None),
            ShimToControl::Error(e) if e.re.is_none() => {
                let next = sup.ctl.next_reply(PATIENCE)?;
                ensure!(is_status(&next), "{next:?}");
                Ok(Some(e.code))
            }
            other => bail!("unexpected {other:?}"),
        }
    };
    let mut execs = Vec::new();
    for _ in 0..5 {
        let s = sup.ctl.exec_started(|id| Exec {
            stdin: true,
            ..cmd(id, &["sleep", "100"])
        })?;
        execs.push(s.exec_id);
    }
    // Per exec: 16 MiB (plus what the pipe holds) is taken, then refused.
    let mut accepted = [0usize; 5];
    for (i, &exec_id) in execs.iter().take(4).enumerate() {
        loop {
            match feed(&mut sup, exec_id)? {
                None => accepted[i] += 1,
                Some(code) => {
                    ensure!(code == ErrorCode::Limit, "exec {exec_id}: {code:?}");
                    break;
                }
            }
            ensure!(accepted[i] <= 20, "exec {exec_id} took {} MiB", accepted[i]);
        }
        ensure!(
            accepted[i] >= 15,
            "exec {exec_id} took only {} MiB",
            accepted[i]
        );
    }
    // All together: the fifth exec finds the total bound reached at once.
    let code = feed(&mut sup, execs[4])?;
    ensure!(
        code == Some(ErrorCode::Limit),
        "a fifth exec's input: {code:?}"
    );
    // The shim is fine: its memory is what it holds, and it still answers.
    let status = sup.status()?;
    ensure!(
        status.rss_bytes < 200 << 20,
        "rss {} bytes",
        status.rss_bytes
    );
    ensure!(status.execs_running == 5, "{status:?}");
    for exec_id in execs {
        sup.ctl.send(ExecSignal {
            exec_id,
            signal: "KILL".into(),
        })?;
    }
    sup.status_until("execs gone", |s| s.execs_running == 0)?;
    Ok(())
}
