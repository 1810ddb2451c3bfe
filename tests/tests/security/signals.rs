//! Every catchable signal is forwarded or handled; a signal's origin is what the kernel vouches for.
//!
//! From outside, every signal from 1 to 64 but SIGKILL and SIGSTOP is sent to the real shim,
//! as PID 1 of a new PID namespace and as a subreaper, in plain init mode and in supervisor
//! mode, and each must reach the child (the driver) or be handled as documented: SIGCHLD is
//! "reap", never forwarded; in supervisor mode SIGTERM/SIGINT start the stop. The shim must
//! survive all of them, the ones libc reserves for itself (32–34) and the fault signals sent
//! with `kill` included.
//!
//! From inside, the attacks on the origin rule: a non-root driver sending SIGCONT to PID 1
//! (the kernel allows it within a session, whatever the uid), and `rt_sigqueueinfo` forging
//! `si_pid` 0, "from outside the namespace", which the shim must not believe.

use std::ffi::OsString;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use driver_protocol::message::{DriverState, Event, Exec, LogStream};

use crate::supervisor::{state_to, Setup, Sup};
use crate::support::{
    in_both_modes, poll_until, probe, require_root, state_of, Mode, Running, Shim, PATIENCE,
};

/// SIGKILL and SIGSTOP cannot be caught, blocked or forwarded.
fn catchable() -> impl Iterator<Item = libc::c_int> {
    (1..=64).filter(|&s| s != libc::SIGKILL && s != libc::SIGSTOP)
}

/// The job-control signals after which a shim that is not PID 1 stops itself (dumb-init's
/// behaviour, see the shim's README).
const JOB_CONTROL: [libc::c_int; 3] = [libc::SIGTSTP, libc::SIGTTIN, libc::SIGTTOU];

/// Polls until the shim's `/proc` state is (or is no longer) `T` (stopped).
fn wait_stopped(shim: &Running, stopped: bool) -> bool {
    poll_until(PATIENCE, || {
        (state_of(shim.pid()).is_some_and(|s| s == 'T') == stopped).then_some(())
    })
    .is_some()
}

in_both_modes! {
    fn every_catchable_signal_reaches_the_child_in_plain_mode(mode: Mode) -> Result<()> {
        let mut shim = Shim::new()
            .mode(mode)
            .args(["--grace", "120s"])
            .probe(["all-signals", "--exit-on", "64"])
            .start()?;
        shim.expect_line("ready", PATIENCE)?;
        let started = std::time::Instant::now();
        for sig in catchable() {
            shim.signal(sig).with_context(|| format!("signal {sig}"))?;
            if sig == libc::SIGCHLD {
                // Handled: it means "reap". The next line must be the next signal's.
                continue;
            }
            shim.expect_line(&format!("got {sig}"), PATIENCE)
                .with_context(|| format!("signal {sig}"))?;
            if JOB_CONTROL.contains(&sig) && mode == Mode::Subreaper {
                ensure!(wait_stopped(&shim, true), "the shim did not stop after {sig}\n{}", shim.context());
                shim.signal(libc::SIGCONT)?;
                shim.expect_line(&format!("got {}", libc::SIGCONT), PATIENCE)?;
                ensure!(wait_stopped(&shim, false), "still stopped after SIGCONT\n{}", shim.context());
            }
        }
        // The child exits 0 on 64; nothing (SIGCHLD in particular) came in between.
        shim.expect_exit(0, PATIENCE)?;
        eprintln!(
            "MEASURED: {mode:?}: {} signals from outside, each forwarded or handled, in {:?}",
            catchable().count(),
            started.elapsed()
        );
        Ok(())
    }

    fn every_catchable_signal_reaches_the_driver_in_supervisor_mode(mode: Mode) -> Result<()> {
        // The probe is the driver: it never says hello, so readiness and pings are off; it
        // prints what it gets on stdout, which comes back as `log` events.
        let mut sup = probe_driver(mode, &["all-signals"])?;
        got_line(&mut sup, "ready")?;
        for sig in catchable() {
            if sig == libc::SIGTERM || sig == libc::SIGINT || sig == libc::SIGCHLD {
                continue;
            }
            sup.shim.signal(sig).with_context(|| format!("signal {sig}"))?;
            got_line(&mut sup, &format!("got {sig}")).with_context(|| format!("signal {sig}"))?;
            if sig == libc::SIGUSR2 {
                // SIGCHLD is handled (reap), never forwarded: the line after it is USR2's.
                sup.shim.signal(libc::SIGCHLD)?;
                sup.shim.signal(libc::SIGALRM)?;
                got_line(&mut sup, &format!("got {}", libc::SIGALRM))?;
            }
        }
        ensure!(sup.shim.alive(), "the shim died\n{}", sup.context());
        // SIGINT (and SIGTERM, in a second run) start the stop: state `stopping`.
        sup.shim.signal(libc::SIGINT)?;
        sup.wait("stopping after SIGINT", |e| state_to(e, DriverState::Stopping))?;
        drop(sup);
        let mut sup = probe_driver(mode, &["all-signals"])?;
        got_line(&mut sup, "ready")?;
        sup.shim.signal(libc::SIGTERM)?;
        sup.wait("stopping after SIGTERM", |e| state_to(e, DriverState::Stopping))?;
        Ok(())
    }
}

/// A supervisor-mode shim whose driver is `probe ARGS` (with the extra shim flags).
fn probe_driver_with(mode: Mode, args: &[&str], flags: &[(&str, &str)]) -> Result<Sup> {
    let mut argv: Vec<OsString> = vec![probe().into()];
    argv.extend(args.iter().map(OsString::from));
    let mut setup = Setup::new(mode)
        .flag("--ready-timeout", "600s")
        .flag("--ping-interval", "0")
        .flag("--restart", "never")
        .flag("--grace", "120s");
    for (k, v) in flags {
        setup = setup.flag(k, v);
    }
    setup.driver_cmd(argv).start()
}

fn probe_driver(mode: Mode, args: &[&str]) -> Result<Sup> {
    probe_driver_with(mode, args, &[])
}

/// Waits for the driver's next stdout line (a `log` event) and checks it is `want`.
fn got_line(sup: &mut Sup, want: &str) -> Result<()> {
    let (s, _) = sup.wait(
        &format!("driver stdout {want:?}"),
        |e| matches!(e, Event::Log(l) if l.stream == LogStream::Stdout),
    )?;
    match s.event {
        Event::Log(l) if l.text.trim_end() == want => Ok(()),
        other => bail!(
            "expected driver stdout {want:?}, got {other:?}\n{}",
            sup.context()
        ),
    }
}

/// The driver's next stdout line.
fn driver_line(sup: &mut Sup) -> Result<String> {
    let (s, _) = sup.wait(
        "a driver stdout line",
        |e| matches!(e, Event::Log(l) if l.stream == LogStream::Stdout),
    )?;
    match s.event {
        Event::Log(l) => Ok(l.text.trim_end().to_owned()),
        other => bail!("not a log event: {other:?}"),
    }
}

/// As PID 1, a process inside forges a signal "from outside the namespace" with
/// `rt_sigqueueinfo` (`si_code` SI_QUEUE, `si_pid` 0, `si_uid` 0): the shim must not forward
/// it (the child watches for it) and must log it. Three identities reach PID 1 with it: a
/// child of the same uid as the shim (`docker run --user`: here both run as 65534), root, and
/// (SIGCONT only) a non-root child of a root shim, through the kernel's same-session rule:
/// plain mode keeps its child in the shim's session, like tini, for the terminal's sake.
#[test]
fn a_forged_outside_signal_from_inside_is_not_forwarded() -> Result<()> {
    require_root!();
    let cases: [(Option<u32>, &[&str], libc::c_int); 3] = [
        (Some(65534), &["TERM"], libc::SIGTERM),
        (None, &["TERM"], libc::SIGTERM),
        (None, &["CONT", "--uid", "65534"], libc::SIGCONT),
    ];
    for (shim_user, what, sig) in cases {
        let mut builder = Shim::new().pidns().args(["--grace", "120s"]);
        if let Some(uid) = shim_user {
            builder = builder.user(uid);
        }
        let mut args = vec!["signal-init"];
        args.extend_from_slice(what);
        args.extend(["--forge", "--watch"]);
        let mut shim = builder.probe(args).start()?;
        let case = format!("shim as {shim_user:?}, {what:?}");
        shim.expect_line("sent ok", PATIENCE)
            .with_context(|| format!("{case}: the kernel refused the forged signal"))?;
        // Forwarded, it would come back to the child as `got N`.
        shim.expect_line("quiet", PATIENCE)
            .with_context(|| format!("{case}: the forged signal {sig} was forwarded"))?;
        shim.expect_line("alive", PATIENCE)?;
        shim.expect_exit(7, PATIENCE)?;
        let log = shim.stderr();
        ensure!(
            log.contains("does not vouch"),
            "{case}: the ignored signal was not logged:\n{log}"
        );
    }
    Ok(())
}

/// As PID 1 run as a non-root uid (`docker run --user`), a process inside with the same uid
/// makes the *kernel* send SIGTERM to PID 1 on its behalf: `F_SETOWN 1` and `F_SETSIG
/// SIGTERM` on a pipe with `O_ASYNC`, then a write. The siginfo carries a kernel code
/// (`POLL_IN`), but the signal is the tenant's choice: not forwarded, logged. The same for a
/// plain SIGIO (no `F_SETSIG`), which the kernel raises with `SI_KERNEL`.
#[test]
fn a_signal_raised_through_f_setsig_is_not_forwarded() -> Result<()> {
    require_root!();
    // TERM through F_SETSIG (its code is the band, POLL_IN), and plain SIGIO without F_SETSIG
    // (its code is SI_KERNEL, yet it is raised for whoever did F_SETOWN).
    let sigio = libc::SIGIO.to_string();
    for sig in ["TERM", sigio.as_str()] {
        let mut shim = Shim::new()
            .pidns()
            .user(65534)
            .args(["--grace", "120s"])
            .probe(["sigio-init", sig])
            .start()?;
        shim.expect_line("armed ok", PATIENCE)?;
        shim.expect_line("quiet", PATIENCE)
            .with_context(|| format!("signal {sig} raised through F_SETOWN was forwarded"))?;
        shim.expect_line("alive", PATIENCE)?;
        shim.expect_exit(7, PATIENCE)?;
        let log = shim.stderr();
        ensure!(
            log.contains("does not vouch"),
            "SIG{sig} not logged:\n{log}"
        );
    }
    Ok(())
}

/// A non-root driver (`--user 65534`) sends SIGCONT to PID 1, plainly and forged as from
/// outside: the kernel refuses both (the driver has a session of its own, so the "same
/// session" rule of SIGCONT does not apply), and nothing reaches the driver back. A non-root
/// exec tries the same.
#[test]
fn a_non_root_driver_cannot_sigcont_pid1() -> Result<()> {
    require_root!();
    for forge in [false, true] {
        let mut args = vec!["signal-init", "CONT", "--watch", "--stay"];
        if forge {
            args.push("--forge");
        }
        let mut sup = probe_driver_with(Mode::Pid1, &args, &[("--user", "65534:65534")])?;
        let sent = driver_line(&mut sup)?;
        let back = driver_line(&mut sup)?;
        ensure!(
            sent == "sent EPERM" && back == "quiet",
            "forge={forge}: the driver's SIGCONT to PID 1: {sent:?}, then {back:?}\n{}",
            sup.context()
        );
        let s = sup.status()?;
        ensure!(s.state == DriverState::Starting, "{s:?}");
        if !forge {
            // A tool run by the control plane as 65534: its own session as well.
            let started = sup.ctl.exec_started(|id| Exec {
                user: Some("65534:65534".into()),
                ..Exec::new(id, [probe(), "signal-init", "CONT", "--forge"])
            })?;
            let run = sup.ctl.exec_run(started.exec_id, PATIENCE)?;
            ensure!(run.out().starts_with("sent EPERM\n"), "the exec: {run:?}");
        }
        ensure!(sup.shim.alive(), "the shim died\n{}", sup.context());
    }
    Ok(())
}

/// A root driver (no `--user`) forges SIGTERM "from outside" with `rt_sigqueueinfo`: the shim
/// must not take it for the runtime's stop (it would stop the whole sandbox as if `docker
/// stop` had asked); it is ignored and logged, the driver keeps running.
#[test]
fn a_forged_stop_from_a_root_driver_does_not_stop_the_sandbox() -> Result<()> {
    require_root!();
    {
        let mut sup = probe_driver(
            Mode::Pid1,
            &["signal-init", "TERM", "--forge", "--watch", "--stay"],
        )?;
        got_line(&mut sup, "sent ok")?;
        got_line(&mut sup, "quiet")?;
        got_line(&mut sup, "alive")?;
        std::thread::sleep(Duration::from_millis(200));
        let s = sup.status()?;
        ensure!(
            s.state == DriverState::Starting,
            "the forged SIGTERM was taken for a stop: {s:?}\n{}",
            sup.context()
        );
        ensure!(sup.shim.alive(), "the shim exited\n{}", sup.context());
        let log = sup.shim.stderr();
        ensure!(log.contains("does not vouch"), "not logged:\n{log}");
    }
    Ok(())
}

/// In a real container run with `--user 1000:1000` (the shim, PID 1, and its command share
/// the uid, so the kernel lets the command signal PID 1), the command forges SIGTERM "from
/// outside" with `rt_sigqueueinfo`: it is not forwarded back to it, and the shim logs it.
#[test]
fn docker_a_forged_outside_signal_from_the_command_is_not_forwarded() -> Result<()> {
    crate::docker::require_docker!();
    let images = crate::docker::image()?;
    let c = crate::docker::Run::new("forge")
        .opts(["--user", "1000:1000"])
        .args([
            "/usr/local/bin/probe",
            "signal-init",
            "TERM",
            "--forge",
            "--watch",
        ])
        .start(&images.test)?;
    let code = c.wait_exit(PATIENCE)?;
    let logs = c.logs();
    ensure!(
        logs.contains("sent ok"),
        "the kernel refused the forged signal:\n{logs}"
    );
    ensure!(
        logs.contains("quiet") && !logs.contains("got 15"),
        "the forged SIGTERM was forwarded:\n{logs}"
    );
    ensure!(code == 7, "exit {code}:\n{logs}");
    ensure!(logs.contains("does not vouch"), "not logged:\n{logs}");
    Ok(())
}

/// In a real container, the driver (uid 1000 by the image's `AGENT_SHIM_USER`) sends SIGCONT
/// to PID 1, plainly and forged: refused by the kernel, since the driver has a session of its
/// own.
#[test]
fn docker_a_non_root_driver_cannot_sigcont_pid1() -> Result<()> {
    crate::docker::require_docker!();
    let images = crate::docker::image()?;
    for forge in [false, true] {
        let mut driver = vec![
            "/usr/local/bin/probe",
            "signal-init",
            "CONT",
            "--watch",
            "--stay",
        ];
        if forge {
            driver.push("--forge");
        }
        let agent = crate::docker::UnixAgent::start_driver(
            &images.test,
            &[],
            &[
                "--ready-timeout",
                "600s",
                "--ping-interval",
                "0",
                "--restart",
                "never",
            ],
            &driver,
        )?;
        let logs = agent.container.wait_log("alive", PATIENCE)?;
        ensure!(
            logs.contains("sent EPERM") && logs.contains("quiet"),
            "forge={forge}: the driver's SIGCONT reached PID 1:\n{logs}"
        );
    }
    Ok(())
}
