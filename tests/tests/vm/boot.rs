//! The shim as the init of an initramfs: it mounts what a container runtime would have,
//! sets the hostname, runs tasks and execs for a control plane over a forwarded TCP port, and
//! at the end powers the VM off with the exit status on the console (no kernel panic).

use anyhow::{ensure, Result};
use driver_protocol::message::{Event, ExecExit, TtySize};

use super::{driver_ready, exec, require_vm, shutdown, Boot, Vm, LISTEN, VM_PATIENCE};
use crate::supervisor::{crash, done_of, input};

/// Whether `e` is an `exec_exit` with code 0.
fn exited_zero(exit: Option<&ExecExit>) -> bool {
    exit.is_some_and(|x| x.code == Some(0))
}

#[test]
fn tasks_execs_and_a_graceful_shutdown_then_power_off() -> Result<()> {
    require_vm!();
    let args: Vec<&str> = LISTEN.iter().copied().chain(["/echo-driver"]).collect();
    let mut vm = Vm::boot(&Boot {
        shim_args: &args,
        ..Boot::default()
    })?;
    let mut ctl = vm.control()?;
    driver_ready(&mut ctl)?;

    ctl.submit_ok("t1", input([("text", "hello from the host".into())]))?;
    ctl.wait_event(|e| done_of(e, "t1"), VM_PATIENCE)?;

    // What a container runtime would have given, from the inside.
    let run = exec(
        &mut ctl,
        &[
            "/probe",
            "read",
            "/proc/mounts",
            "/proc/sys/kernel/hostname",
            "/proc/1/comm",
        ],
    )?;
    ensure!(exited_zero(run.exit.as_ref()), "probe read: {:?}", run.exit);
    let out = run.out();
    for want in [
        "proc /proc proc rw,nosuid,nodev,noexec",
        "sysfs /sys sysfs rw,nosuid,nodev,noexec",
        "devtmpfs /dev devtmpfs rw,nosuid",
        "devpts /dev/pts devpts rw,nosuid,noexec",
        "shm /dev/shm tmpfs rw,nosuid,nodev",
        "run /run tmpfs rw,nosuid,nodev",
        "tmp /tmp tmpfs rw,nosuid,nodev",
        "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec",
        "== /proc/sys/kernel/hostname\nvm-e2e\n",
        "== /proc/1/comm\nagent-shim\n",
    ] {
        ensure!(out.contains(want), "{want:?} missing from:\n{out}");
    }
    // The tenant (here uid 1000) cannot read the token: not in its file (0600, root's), not
    // on the kernel command line.
    let started = ctl.exec_started(|id| {
        let mut e =
            driver_protocol::message::Exec::new(id, ["/probe", "read", "/token", "/proc/cmdline"]);
        e.user = Some("1000:1000".into());
        e
    })?;
    let run = ctl.exec_run(started.exec_id, VM_PATIENCE)?;
    let out = run.out();
    ensure!(
        out.contains("== /token\nerror Permission denied"),
        "the token file is readable: {out}"
    );
    let token = String::from_utf8_lossy(super::TOKEN).into_owned();
    ensure!(
        out.contains("== /proc/cmdline\n") && !out.contains(&token),
        "{out}"
    );

    // Loopback is up: the probe reads its flags from sysfs (IFF_UP is bit 0).
    let run = exec(&mut ctl, &["/probe", "read", "/sys/class/net/lo/flags"])?;
    let flags = run.out();
    let value = flags
        .lines()
        .nth(1)
        .and_then(|l| u32::from_str_radix(l.trim().trim_start_matches("0x"), 16).ok());
    ensure!(value.is_some_and(|f| f & 1 == 1), "lo flags: {flags}");

    // devpts with ptmx: an exec on a terminal.
    let started = ctl.exec_started(|id| {
        let mut e = driver_protocol::message::Exec::new(id, ["/probe", "tty"]);
        e.tty = Some(TtySize { rows: 24, cols: 80 });
        e
    })?;
    let run = ctl.exec_run(started.exec_id, VM_PATIENCE)?;
    let tty = String::from_utf8_lossy(&run.pty).into_owned();
    ensure!(
        tty.contains("isatty=1"),
        "probe tty: {tty:?} {:?}",
        run.exit
    );

    let events = shutdown(&mut ctl)?;
    let (code, console) = vm.wait_power_off()?;
    ensure!(code == 0, "exit status {code}\n{console}");
    let last = events.last().map(|s| &s.event);
    ensure!(
        matches!(last, Some(Event::ShimExiting(x)) if x.code == 0),
        "the last event is {last:?}"
    );
    Ok(())
}

#[test]
fn the_drivers_exit_code_reaches_the_console_and_the_last_event() -> Result<()> {
    require_vm!();
    let args: Vec<&str> = LISTEN
        .iter()
        .copied()
        .chain(["--restart", "never", "/echo-driver"])
        .collect();
    let mut vm = Vm::boot(&Boot {
        shim_args: &args,
        ..Boot::default()
    })?;
    let mut ctl = vm.control()?;
    driver_ready(&mut ctl)?;
    ctl.submit_ok("boom", crash(7))?;
    let events = ctl.until_closed(VM_PATIENCE)?;
    let (code, console) = vm.wait_power_off()?;
    ensure!(code == 7, "exit status {code}\n{console}");
    let last = events.last().map(|s| &s.event);
    ensure!(
        matches!(last, Some(Event::ShimExiting(x)) if x.code == 7),
        "the last event is {last:?}"
    );
    Ok(())
}

#[test]
fn a_usage_error_powers_off_with_status_2_not_a_panic() -> Result<()> {
    require_vm!();
    let mut vm = Vm::boot(&Boot {
        shim_args: &["--no-such-flag"],
        boot_only: true,
        ..Boot::default()
    })?;
    let (code, console) = vm.wait_power_off()?;
    ensure!(code == 2, "exit status {code}\n{console}");
    ensure!(console.contains("--no-such-flag"), "{console}");
    Ok(())
}
