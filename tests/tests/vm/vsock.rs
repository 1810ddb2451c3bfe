//! vsock as the VM's PID 1: the shim dials the host (`--control-connect vsock:2:PORT`) over
//! a `vhost-vsock-pci` device, and the control plane on the host runs a task and a graceful
//! shutdown over it. The host needs vhost-vsock (`/dev/vhost-vsock`, module `vhost_vsock`);
//! without it the test is skipped by name (`vhost-vsock`: `.ci/run` probes for it and
//! declares it in `AGENT_SHIM_CI_CANNOT`), and the VM tests' control link is the forwarded TCP
//! port instead.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};

use super::{driver_ready, require_vm, shutdown, Boot, Vm, TOKEN, VM_PATIENCE};
use crate::supervisor::{done_of, input};
use crate::support::control::{ControlClient, Stream};

/// `VMADDR_CID_ANY`: listen on every context id of the host.
const CID_ANY: u32 = u32::MAX;

const LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

/// A non-blocking vsock listener on `port`, any CID.
fn listen(port: u32) -> Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers.
    let fd = unsafe {
        libc::socket(
            libc::AF_VSOCK,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        bail!("no AF_VSOCK sockets: {}", std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let l = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: plain old data; zeroes are valid.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = CID_ANY;
    a.svm_port = port;
    // SAFETY: `a` is a valid sockaddr_vm of LEN bytes.
    if unsafe { libc::bind(l.as_raw_fd(), std::ptr::addr_of!(a).cast(), LEN) } != 0 {
        bail!("vsock bind: {}", std::io::Error::last_os_error());
    }
    // SAFETY: listen(2) takes no pointers.
    if unsafe { libc::listen(l.as_raw_fd(), 4) } != 0 {
        bail!("vsock listen: {}", std::io::Error::last_os_error());
    }
    Ok(l)
}

/// The next connection on `l` within `timeout` (std's UnixStream only wraps the fd: read,
/// write, timeouts and shutdown are the same calls on any stream socket).
fn accept(l: &OwnedFd, timeout: Duration) -> Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    loop {
        // SAFETY: null address pointers are allowed.
        let fd = unsafe {
            libc::accept4(
                l.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd >= 0 {
            // SAFETY: a fresh descriptor nobody else owns.
            let s = unsafe { UnixStream::from_raw_fd(fd) };
            s.set_nonblocking(false)?;
            return Ok(s);
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::WouldBlock || Instant::now() > deadline {
            bail!("vsock accept: {err}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_control_link_over_vsock_as_the_vms_pid1() -> Result<()> {
    require_vm!();
    if !Path::new("/dev/vhost-vsock").exists() {
        return crate::support::skip(
            "vhost-vsock",
            "the host has no /dev/vhost-vsock (modprobe vhost_vsock)",
            module_path!(),
        );
    }
    let pid = std::process::id();
    let port = 30_000 + pid % 10_000;
    // Guest CIDs are host-wide: one per test process (3 and up; 0-2 are reserved).
    let cid = 1_000 + pid % 1_000_000;
    let listener = listen(port)?;
    let dial = format!("vsock:2:{port}");
    let device = format!("vhost-vsock-pci,guest-cid={cid}");
    let mut vm = Vm::boot(&Boot {
        shim_args: &[
            "--control-connect",
            &dial,
            "--control-token-file",
            "/token",
            "/echo-driver",
        ],
        qemu_args: &["-device", &device],
        ..Boot::default()
    })?;
    let stream =
        accept(&listener, VM_PATIENCE).map_err(|e| anyhow::anyhow!("{e:#}\n{}", vm.console()))?;
    let mut ctl = ControlClient::over(Stream::Unix(stream), Some(TOKEN), VM_PATIENCE)?;
    ctl.resume_from(0)?;
    driver_ready(&mut ctl)?;
    ctl.submit_ok("v", input([("text", "over vsock".into())]))?;
    ctl.wait_event(|e| done_of(e, "v"), VM_PATIENCE)?;
    shutdown(&mut ctl)?;
    let (code, console) = vm.wait_power_off()?;
    ensure!(code == 0, "exit status {code}\n{console}");
    Ok(())
}
