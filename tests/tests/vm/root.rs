//! The shim switches root to an ext4 filesystem on a virtio block device (`--root /dev/vda`):
//! the initramfs holds only the pre-init, the shim and the modules; the driver, the probe and
//! the token are on the disk. At the end the disk is left clean (`e2fsck -n` finds nothing).

use std::process::Command;

use anyhow::{ensure, Context as _, Result};

use super::{
    driver_ready, exec, require_vm, root_image, shutdown, Bins, Boot, Vm, LISTEN, VM_PATIENCE,
};
use crate::supervisor::{done_of, input};
use crate::support::{require_root, TempDir};

#[test]
fn a_block_device_root_runs_the_agent_and_is_left_clean() -> Result<()> {
    require_vm!();
    // The image's files must be root's (the token file is checked).
    require_root!();
    let dir = TempDir::new("vm-root")?;
    let image = root_image(&Bins::find()?, dir.path())?;
    let args: Vec<&str> = ["--root", "/dev/vda"]
        .into_iter()
        .chain(LISTEN.iter().copied())
        .chain(["/echo-driver"])
        .collect();
    let mut vm = Vm::boot(&Boot {
        shim_args: &args,
        disk: Some(&image),
        boot_only: true,
        ..Boot::default()
    })?;
    let mut ctl = vm.control()?;
    driver_ready(&mut ctl)?;
    ctl.submit_ok("t1", input([("text", "on a disk".into())]))?;
    ctl.wait_event(|e| done_of(e, "t1"), VM_PATIENCE)?;

    let run = exec(
        &mut ctl,
        &["/probe", "read", "/proc/mounts", "/on-the-block-device"],
    )?;
    let out = run.out();
    for want in [
        "/dev/vda / ext4 rw",
        "proc /proc proc",
        "devtmpfs /dev devtmpfs",
        "cgroup2 /sys/fs/cgroup cgroup2",
        "== /on-the-block-device\nyes\n",
    ] {
        ensure!(out.contains(want), "{want:?} missing from:\n{out}");
    }

    shutdown(&mut ctl)?;
    let (code, console) = vm.wait_power_off()?;
    ensure!(code == 0, "exit status {code}\n{console}");
    let fsck = Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(&image)
        .output()
        .context("run e2fsck")?;
    ensure!(
        fsck.status.success(),
        "the root filesystem was not left clean: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    Ok(())
}

#[test]
fn a_missing_root_device_powers_off_with_status_125() -> Result<()> {
    require_vm!();
    let mut vm = Vm::boot(&Boot {
        shim_args: &["--root", "/dev/vdz", "/echo-driver"],
        boot_only: true,
        ..Boot::default()
    })?;
    let (code, console) = vm.wait_power_off()?;
    ensure!(code == 125, "exit status {code}\n{console}");
    ensure!(
        console.contains("cannot switch root to /dev/vdz"),
        "{console}"
    );
    Ok(())
}
