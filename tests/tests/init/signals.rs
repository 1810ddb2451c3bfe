//! Signal forwarding: every forwarded signal reaches the child (or its group with `-g`),
//! `--rewrite`, SIGTERM from outside, and the `--grace` SIGKILL.

use std::time::Duration;

use anyhow::{ensure, Context, Result};

use crate::support::{in_both_modes, poll_until, Mode, Shim, TempDir, PATIENCE};

/// The signals the issue lists, with the name the probe prints for each.
const FORWARDED: &[(libc::c_int, &str)] = &[
    (libc::SIGTERM, "SIGTERM"),
    (libc::SIGINT, "SIGINT"),
    (libc::SIGHUP, "SIGHUP"),
    (libc::SIGQUIT, "SIGQUIT"),
    (libc::SIGWINCH, "SIGWINCH"),
    (libc::SIGUSR1, "SIGUSR1"),
    (libc::SIGUSR2, "SIGUSR2"),
];

/// A shim whose child prints `got SIGNAME` for every signal it receives and exits 0 on
/// SIGUSR2, ready for signals. The grace is long: TERM and INT start the countdown, and the
/// tests must not race it.
fn signal_watcher(mode: Mode) -> Result<crate::support::Running> {
    let mut shim = Shim::new()
        .mode(mode)
        .args(["--grace", "120s"])
        .probe(["signals", "--exit-on", "USR2", "--code", "0"])
        .start()?;
    shim.expect_line("ready", PATIENCE)?;
    Ok(shim)
}

/// Reads the grandchild's signal log (`term`/`usr1` lines).
fn log_of(file: &std::path::Path) -> String {
    std::fs::read_to_string(file).unwrap_or_default()
}

in_both_modes! {
    fn each_signal_reaches_the_child(mode: Mode) -> Result<()> {
        let mut shim = signal_watcher(mode)?;
        for (sig, name) in FORWARDED {
            shim.signal(*sig)?;
            shim.expect_line(&format!("got {name}"), PATIENCE).context(*name)?;
        }
        shim.expect_exit(0, PATIENCE)?;
        Ok(())
    }

    fn sigterm_from_outside_stops_child_and_shim(mode: Mode) -> Result<()> {
        // A child with the default TERM disposition dies of it: 128 + 15.
        let mut shim = Shim::new().mode(mode).probe(["sleep", "60"]).start()?;
        // `sleep` prints nothing: wait until the shim has a child (the probe is running).
        ensure!(
            poll_until(PATIENCE, || (!shim.shim_children().is_empty()).then_some(())).is_some(),
            "the shim started no child\n{}",
            shim.context()
        );
        std::thread::sleep(Duration::from_millis(200)); // let the probe finish exec
        shim.signal(libc::SIGTERM)?;
        shim.expect_exit(143, PATIENCE)?;

        // A child that handles TERM and exits with its own code: that code.
        let mut shim = Shim::new()
            .mode(mode)
            .probe(["signals", "--exit-on", "TERM", "--code", "3"])
            .start()?;
        shim.expect_line("ready", PATIENCE)?;
        shim.signal(libc::SIGTERM)?;
        shim.expect_line("got SIGTERM", PATIENCE)?;
        shim.expect_exit(3, PATIENCE)?;
        Ok(())
    }

    fn child_ignoring_sigterm_is_killed_after_grace(mode: Mode) -> Result<()> {
        // TERM and INT both start the countdown; the child ignores both.
        for signal in [libc::SIGTERM, libc::SIGINT] {
            let mut shim = Shim::new()
                .mode(mode)
                .args(["--grace", "1s"])
                .probe(["ignore-term", "INT"])
                .start()?;
            shim.expect_line("ready", PATIENCE)?;
            shim.signal(signal)?;
            // 128 + SIGKILL: the grace ran out.
            shim.expect_exit(137, PATIENCE).with_context(|| format!("signal {signal}"))?;
        }
        Ok(())
    }

    fn grace_deadline_is_bounded(mode: Mode) -> Result<()> {
        let mut shim = Shim::new()
            .mode(mode)
            .args(["--grace", "500ms"])
            .probe(["ignore-term"])
            .start()?;
        shim.expect_line("ready", PATIENCE)?;
        shim.signal(libc::SIGTERM)?;
        // Well under the 8s default: the flag took effect (upper bound only).
        let took = shim.expect_exit(137, Duration::from_secs(7))?;
        eprintln!("{mode:?}: --grace 500ms: exited {took:?} after SIGTERM");
        Ok(())
    }

    fn rewrite_maps_and_drops_signals(mode: Mode) -> Result<()> {
        let mut shim = Shim::new()
            .mode(mode)
            .args(["--rewrite", "USR1:USR2", "--rewrite", "SIGHUP:0", "--rewrite", "10:12"])
            .args(["--rewrite", "WINCH:SIGTERM", "--grace", "120s"])
            .probe(["signals", "--exit-on", "INT", "--code", "4"])
            .start()?;
        shim.expect_line("ready", PATIENCE)?;
        shim.signal(libc::SIGUSR1)?;
        shim.expect_line("got SIGUSR2", PATIENCE)?;
        shim.signal(libc::SIGWINCH)?;
        shim.expect_line("got SIGTERM", PATIENCE)?;
        // HUP is dropped. Were it forwarded, it would come before INT: either delivered
        // first, or pending together with INT, and sigwaitinfo returns the lower number.
        shim.signal(libc::SIGHUP)?;
        shim.signal(libc::SIGINT)?;
        shim.expect_line("got SIGINT", PATIENCE)?;
        shim.expect_exit(4, PATIENCE)?;
        Ok(())
    }

    fn rewrite_from_variable(mode: Mode) -> Result<()> {
        let mut shim = Shim::new()
            .mode(mode)
            .env("AGENT_SHIM_REWRITE", "USR1:USR2,HUP:INT")
            .probe(["signals", "--exit-on", "INT", "--code", "0"])
            .start()?;
        shim.expect_line("ready", PATIENCE)?;
        shim.signal(libc::SIGUSR1)?;
        shim.expect_line("got SIGUSR2", PATIENCE)?;
        shim.signal(libc::SIGHUP)?;
        shim.expect_line("got SIGINT", PATIENCE)?;
        shim.expect_exit(0, PATIENCE)?;
        Ok(())
    }

    fn pgroup_reaches_a_grandchild(mode: Mode) -> Result<()> {
        // With -g (or AGENT_SHIM_PGROUP=1), USR1 goes to the child's whole group: the
        // grandchild logs it. The child ignores USR1 and stays.
        for (flag, env) in [(Some("-g"), None), (Some("--pgroup"), None), (None, Some("yes"))] {
            let dir = TempDir::new("pgroup")?;
            let file = dir.path().join("log");
            let mut builder = Shim::new().mode(mode);
            if let Some(flag) = flag {
                builder = builder.arg(flag);
            }
            if let Some(val) = env {
                builder = builder.env("AGENT_SHIM_PGROUP", val);
            }
            let mut shim = builder
                .probe([std::ffi::OsStr::new("grandchild"), file.as_os_str(), "--stay".as_ref()])
                .start()?;
            shim.expect_prefix("ready gc=", PATIENCE)?;
            shim.signal(libc::SIGUSR1)?;
            let got = poll_until(PATIENCE, || log_of(&file).contains("usr1").then_some(()));
            ensure!(got.is_some(), "{flag:?}/{env:?}: USR1 did not reach the grandchild\n{}", shim.context());
            ensure!(shim.alive(), "the shim exited although the child ignores USR1\n{}", shim.context());
        }
        Ok(())
    }

    fn without_pgroup_only_the_child_gets_signals(mode: Mode) -> Result<()> {
        let dir = TempDir::new("nopgroup")?;
        let file = dir.path().join("log");
        let mut shim = Shim::new()
            .mode(mode)
            .probe([std::ffi::OsStr::new("grandchild"), file.as_os_str(), "--stay".as_ref()])
            .start()?;
        shim.expect_prefix("ready gc=", PATIENCE)?;
        shim.signal(libc::SIGUSR1)?;
        // A negative check can only wait a while; it never fails spuriously.
        std::thread::sleep(Duration::from_millis(500));
        ensure!(!log_of(&file).contains("usr1"), "USR1 reached the grandchild without -g");
        ensure!(shim.alive(), "the shim exited\n{}", shim.context());
        Ok(())
    }
}

/// Polls until the shim's `/proc` state is (or is no longer) `T` (stopped).
fn wait_stopped(shim: &crate::support::Running, stopped: bool) -> bool {
    poll_until(PATIENCE, || {
        let state = crate::support::state_of(shim.pid());
        (state.is_some_and(|s| s == 'T') == stopped).then_some(())
    })
    .is_some()
}

in_both_modes! {
    fn job_control_signals_are_forwarded_then_stop_the_shim(mode: Mode) -> Result<()> {
        // dumb-init's behaviour: TSTP/TTIN/TTOU are forwarded, then the shim stops itself
        // (not as PID 1, which cannot be stopped from inside); the SIGCONT that resumes it is
        // forwarded too.
        let mut shim = signal_watcher(mode)?;
        for (sig, name) in [
            (libc::SIGTSTP, "SIGTSTP"),
            (libc::SIGTTIN, "SIGTTIN"),
            (libc::SIGTTOU, "SIGTTOU"),
        ] {
            shim.signal(sig)?;
            shim.expect_line(&format!("got {name}"), PATIENCE).context(name)?;
            if mode == Mode::Subreaper {
                ensure!(
                    wait_stopped(&shim, true),
                    "the shim did not stop itself after {name}\n{}",
                    shim.context()
                );
            }
            shim.signal(libc::SIGCONT)?;
            shim.expect_line("got SIGCONT", PATIENCE).context(name)?;
            ensure!(
                wait_stopped(&shim, false),
                "the shim is still stopped after SIGCONT\n{}",
                shim.context()
            );
        }
        // Still forwarding after the round trips.
        shim.signal(libc::SIGUSR2)?;
        shim.expect_exit(0, PATIENCE)?;
        Ok(())
    }
}
