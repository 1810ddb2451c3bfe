//! cgroup v2 as the shim mounts it in a VM: the unified hierarchy at `/sys/fs/cgroup`, every
//! controller the kernel offers enabled for children, so per-exec cgroups can carry limits.
//! This is the one place in the suite with a real cgroup v2 hierarchy of the shim's own (the
//! container engine here is cgroup v1): tests of per-exec cgroups belong beside this one,
//! with [`booted`] to start from.

use anyhow::{ensure, Result};

use super::{driver_ready, exec, require_vm, shutdown, Boot, Vm, LISTEN};
use crate::support::control::ControlClient;

/// A booted VM running the echo driver, its driver ready.
pub fn booted() -> Result<(Vm, ControlClient)> {
    let args: Vec<&str> = LISTEN.iter().copied().chain(["/echo-driver"]).collect();
    let mut vm = Vm::boot(&Boot {
        shim_args: &args,
        ..Boot::default()
    })?;
    let mut ctl = vm.control()?;
    driver_ready(&mut ctl)?;
    Ok((vm, ctl))
}

#[test]
fn cgroup2_is_mounted_with_every_controller_enabled_for_children() -> Result<()> {
    require_vm!();
    let (mut vm, mut ctl) = booted()?;
    let run = exec(
        &mut ctl,
        &[
            "/probe",
            "read",
            "/sys/fs/cgroup/cgroup.controllers",
            "/sys/fs/cgroup/cgroup.subtree_control",
            "/proc/self/cgroup",
        ],
    )?;
    let out = run.out();
    let section = |name: &str| -> Vec<String> {
        out.split(&format!("== {name}\n"))
            .nth(1)
            .and_then(|s| s.lines().next())
            .map(|l| l.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default()
    };
    let mut offered = section("/sys/fs/cgroup/cgroup.controllers");
    let mut enabled = section("/sys/fs/cgroup/cgroup.subtree_control");
    ensure!(
        ["memory", "pids", "cpu"]
            .iter()
            .all(|c| offered.iter().any(|o| o == c)),
        "controllers offered: {offered:?}\n{out}"
    );
    offered.sort();
    enabled.sort();
    ensure!(
        offered == enabled,
        "offered {offered:?}, enabled {enabled:?}"
    );
    ensure!(out.contains("== /proc/self/cgroup\n0::/"), "{out}");
    shutdown(&mut ctl)?;
    let (code, _) = vm.wait_power_off()?;
    ensure!(code == 0);
    Ok(())
}
