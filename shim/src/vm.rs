//! The shim as the kernel's own init in a microVM (Firecracker, Cloud Hypervisor, QEMU).
//!
//! A container runtime mounts `/proc`, `/sys` and `/dev`, sets the hostname, brings up
//! loopback and, when PID 1 exits, tears the container down. In a microVM nobody does: the
//! kernel execs `/init` (or `init=`) with nothing mounted, and if init ever exits the kernel
//! panics ("Attempted to kill init!") and the exit code is lost. This module takes on those
//! duties, the way kata's agent (`init_agent_as_init`) and Fly's init do:
//!
//! ```text
//!  detect (PID 1 and /proc not mounted) or --vm
//!  [--root DEV: mount proc, devtmpfs, DEV; move them under it; switch root]
//!  mount proc, sys, devtmpfs, devpts, /dev/shm, /run, /tmp, cgroup2 (+ its controllers)
//!  hostname (--hostname, else agent_shim.hostname= on the kernel command line), loopback up
//!  ... plain init or supervisor mode, as anywhere else ...
//!  sync, unmount, "agent-shim: exit status N" on the console, reboot(RB_POWER_OFF)
//! ```
//!
//! Every duty but the root switch is best effort: a failure is logged and the shim carries
//! on (a VM whose cgroup2 will not mount still runs its agent). A failed root switch powers
//! the VM off with exit status 125: the command would run in the wrong filesystem.
//!
//! The control token is never read from the kernel command line (every process can read
//! `/proc/cmdline`): it comes from `--control-token-file`, a file the platform places in the
//! initramfs, on the root device or on a config drive.

use std::ffi::{CStr, CString};
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::warn;

/// The console line that carries the exit status to the host: `agent-shim: exit status N`.
pub const EXIT_LINE_PREFIX: &str = "agent-shim: exit status ";

/// The kernel command-line parameter that names the VM's hostname.
const HOSTNAME_PARAM: &str = "agent_shim.hostname=";

/// How long `--root` waits for its block device to appear.
const ROOT_WAIT: Duration = Duration::from_secs(5);

/// Where the root device is mounted before the switch.
const NEW_ROOT: &str = "/newroot";

/// The VM options of the command line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmOpts {
    /// `--vm`: the duties even when not detected.
    pub enabled: bool,
    /// `--hostname`.
    pub hostname: Option<String>,
    /// `--root DEV`: switch root to the filesystem on this block device.
    pub root: Option<PathBuf>,
}

/// Whether the shim is a VM's init without `--vm`: PID 1 with no `/proc` mounted (a
/// container runtime always mounts it).
pub fn detected() -> bool {
    std::process::id() == 1 && !Path::new("/proc/self/stat").exists()
}

/// One filesystem the duties mount.
struct Mount {
    source: &'static CStr,
    target: &'static str,
    fstype: &'static CStr,
    flags: libc::c_ulong,
    data: Option<&'static CStr>,
}

const NOSUID_NODEV: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV;
const NOSUID_NODEV_NOEXEC: libc::c_ulong = NOSUID_NODEV | libc::MS_NOEXEC;

/// The filesystems a container runtime would have mounted, in order (a parent before what
/// is mounted on it).
static MOUNTS: &[Mount] = &[
    Mount {
        source: c"proc",
        target: "/proc",
        fstype: c"proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Mount {
        source: c"sysfs",
        target: "/sys",
        fstype: c"sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Mount {
        source: c"devtmpfs",
        target: "/dev",
        fstype: c"devtmpfs",
        flags: libc::MS_NOSUID,
        data: Some(c"mode=0755"),
    },
    Mount {
        source: c"devpts",
        target: "/dev/pts",
        fstype: c"devpts",
        flags: libc::MS_NOSUID | libc::MS_NOEXEC,
        data: Some(c"mode=0620,ptmxmode=0666"),
    },
    Mount {
        source: c"shm",
        target: "/dev/shm",
        fstype: c"tmpfs",
        flags: NOSUID_NODEV,
        data: Some(c"mode=1777"),
    },
    Mount {
        source: c"run",
        target: "/run",
        fstype: c"tmpfs",
        flags: NOSUID_NODEV,
        data: Some(c"mode=0755"),
    },
    Mount {
        source: c"tmp",
        target: "/tmp",
        fstype: c"tmpfs",
        flags: NOSUID_NODEV,
        data: Some(c"mode=1777"),
    },
    Mount {
        source: c"cgroup2",
        target: "/sys/fs/cgroup",
        fstype: c"cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
];

/// Does the init duties; only a failed root switch is an error (its message names the
/// device and the step).
pub fn setup(opts: &VmOpts) -> std::io::Result<()> {
    if let Some(dev) = &opts.root {
        switch_root(dev)?;
    }
    for m in MOUNTS {
        mount_one(m);
    }
    if !Path::new("/dev/ptmx").exists() {
        if let Err(err) = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx") {
            failed("link /dev/ptmx", "", &err);
        }
    }
    enable_controllers(Path::new("/sys/fs/cgroup"));
    let hostname = opts.hostname.clone().or_else(|| {
        std::fs::read_to_string("/proc/cmdline")
            .ok()
            .and_then(|c| hostname_from_cmdline(&c))
    });
    if let Some(name) = hostname {
        set_hostname(&name);
    }
    if let Err(err) = loopback_up() {
        failed("bring up loopback", "", &err);
    }
    Ok(())
}

/// Logs a duty that failed (one call site for all: every one costs the static binary).
fn failed(what: &str, on: &str, err: &dyn std::fmt::Display) {
    warn!("microVM init: cannot {what} {on}: {err}");
}

/// `mkdir(path, 0755)`; one that exists already is fine.
fn mkdir(path: &Path) -> std::io::Result<()> {
    let p = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: mkdir(2) with a NUL-terminated path.
    if unsafe { libc::mkdir(p.as_ptr(), 0o755) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EEXIST) {
        Ok(())
    } else {
        Err(err)
    }
}

/// Whether `path` is a mount point: its device differs from its parent's (or it is `/`).
fn is_mountpoint(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let (Ok(me), Some(parent)) = (std::fs::metadata(path), path.parent()) else {
        return false;
    };
    match std::fs::metadata(parent) {
        Ok(p) => p.dev() != me.dev() || p.ino() == me.ino(),
        Err(_) => false,
    }
}

/// Mounts `m` unless something is mounted there already; failures are logged.
fn mount_one(m: &Mount) {
    let target = Path::new(m.target);
    if is_mountpoint(target) {
        return;
    }
    if let Err(err) =
        mkdir(target).and_then(|()| mount(m.source, target, Some(m.fstype), m.flags, m.data))
    {
        failed("mount", m.target, &err);
    }
}

/// `mount(2)`.
fn mount(
    source: &CStr,
    target: &Path,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> std::io::Result<()> {
    let target = CString::new(target.as_os_str().as_bytes())?;
    // SAFETY: every pointer is a NUL-terminated string that outlives the call, or null where
    // mount(2) accepts null (fstype for MS_MOVE, data).
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.map_or(std::ptr::null(), CStr::as_ptr),
            flags,
            data.map_or(std::ptr::null(), |d| d.as_ptr().cast()),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The cgroup v2 controllers enabled for children: every one in `cgroup.controllers`, so
/// per-exec cgroups can be given limits.
fn enable_controllers(root: &Path) {
    let Ok(list) = std::fs::read_to_string(root.join("cgroup.controllers")) else {
        failed("read", "cgroup.controllers", &std::io::ErrorKind::NotFound);
        return;
    };
    // One write per controller: one the kernel refuses does not keep the others off.
    for c in list.split_ascii_whitespace() {
        if let Err(err) = std::fs::write(root.join("cgroup.subtree_control"), format!("+{c}")) {
            failed("enable the cgroup controller", c, &err);
        }
    }
}

/// The value of `agent_shim.hostname=` on a kernel command line, if any and valid (the last
/// one wins, as for the kernel's own parameters). Only before `--`: what follows is the
/// shim's argv.
fn hostname_from_cmdline(cmdline: &str) -> Option<String> {
    cmdline
        .split_ascii_whitespace()
        .take_while(|w| *w != "--")
        .filter_map(|w| w.strip_prefix(HOSTNAME_PARAM))
        .last()
        .filter(|n| valid_hostname(n))
        .map(str::to_owned)
}

/// 1 to 64 bytes of letters, digits, `-` and `.`.
pub fn valid_hostname(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn set_hostname(name: &str) {
    // SAFETY: the pointer and length describe `name`'s bytes, alive for the call.
    let rc = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    if rc != 0 {
        failed("set the hostname", name, &std::io::Error::last_os_error());
    }
}

/// `ip link set lo up`, by `SIOCGIFFLAGS`/`SIOCSIFFLAGS` on a datagram socket.
fn loopback_up() -> std::io::Result<()> {
    // SAFETY: plain socket(2); the descriptor is owned right below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&sock);
    // SAFETY: `ifreq` is plain data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `req` is a valid ifreq naming "lo"; the kernel fills in `ifru_flags`.
    if unsafe { libc::ioctl(raw, libc::SIOCGIFFLAGS as _, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe {
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: `req` is a valid ifreq with the flags to set.
    if unsafe { libc::ioctl(raw, libc::SIOCSIFFLAGS as _, &req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Mounts `dev` (waiting up to [`ROOT_WAIT`] for it to appear) and makes it `/`, with
/// `/proc` and `/dev` moved under it; the initramfs stays in memory beneath.
fn switch_root(dev: &Path) -> std::io::Result<()> {
    let fail = |what: &str, err: std::io::Error| {
        std::io::Error::new(
            err.kind(),
            format!("cannot switch root to {}: {what}: {err}", dev.display()),
        )
    };
    for m in MOUNTS
        .iter()
        .filter(|m| m.target == "/proc" || m.target == "/dev")
    {
        mount_one(m);
    }
    let deadline = Instant::now() + ROOT_WAIT;
    while !dev.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let new_root = Path::new(NEW_ROOT);
    mkdir(new_root).map_err(|e| fail("mkdir /newroot", e))?;
    let source =
        CString::new(dev.as_os_str().as_bytes()).map_err(|e| fail("device path", e.into()))?;
    let types = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    let mut last = std::io::Error::from(std::io::ErrorKind::NotFound);
    let mounted = block_fstypes(&types).any(|t| {
        let Ok(t) = CString::new(t) else { return false };
        match mount(&source, new_root, Some(&t), 0, None) {
            Ok(()) => true,
            Err(e) => {
                last = e;
                false
            }
        }
    });
    if !mounted {
        return Err(fail("mount", last));
    }
    for sub in ["proc", "dev"] {
        let old = Path::new("/").join(sub);
        let new = new_root.join(sub);
        mkdir(&new).map_err(|e| fail("mkdir under the new root", e))?;
        let old = CString::new(old.as_os_str().as_bytes()).map_err(|e| fail("path", e.into()))?;
        mount(&old, &new, None, libc::MS_MOVE, None).map_err(|e| fail("move a mount", e))?;
    }
    std::env::set_current_dir(new_root).map_err(|e| fail("chdir", e))?;
    mount(c".", Path::new("/"), None, libc::MS_MOVE, None).map_err(|e| fail("move to /", e))?;
    // SAFETY: chroot(2) with a NUL-terminated path.
    if unsafe { libc::chroot(c".".as_ptr()) } != 0 {
        return Err(fail("chroot", std::io::Error::last_os_error()));
    }
    std::env::set_current_dir("/").map_err(|e| fail("chdir /", e))?;
    Ok(())
}

/// The block filesystems of `/proc/filesystems` (the lines without `nodev`).
fn block_fstypes(list: &str) -> impl Iterator<Item = &str> {
    list.lines()
        .filter(|l| !l.starts_with("nodev"))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// The end of the VM: sync, unmount, the exit line on the console, power off. Never returns
/// (PID 1 must not exit: the kernel would panic and the exit code would be lost).
pub fn power_off(code: i32) -> ! {
    // Opened while /proc and /dev are still mounted; written after everything is unmounted.
    // Our own stderr first (the console the kernel gave init: the tenant may have replaced
    // the /dev/console node, never our descriptor), non-blocking: a console whose output
    // someone stopped loses the line rather than keeping the VM from powering off.
    let console = crate::logging::reopen_stderr_nonblocking()
        .map(std::fs::File::from)
        .or_else(|_| {
            std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
                .open("/dev/console")
        });
    // SAFETY: sync(2) takes no arguments.
    unsafe { libc::sync() };
    for m in MOUNTS.iter().rev() {
        let Ok(t) = CString::new(m.target) else {
            continue;
        };
        // SAFETY: umount2(2) with a NUL-terminated path; failures are fine (not mounted).
        unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
    }
    // A block root is left clean; an initramfs (rootfs) refuses, which is fine.
    // SAFETY: the strings are NUL-terminated; null data is allowed.
    unsafe {
        libc::mount(
            c"".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | libc::MS_RDONLY,
            std::ptr::null(),
        )
    };
    // SAFETY: as above.
    unsafe { libc::sync() };
    let line = format!("{EXIT_LINE_PREFIX}{code}\n");
    if let Ok(mut c) = console {
        let _ = c.write_all(line.as_bytes());
    }
    loop {
        // SAFETY: reboot(2) with a documented command; it returns only on failure.
        unsafe { libc::reboot(libc::RB_POWER_OFF) };
        // SAFETY: as above.
        unsafe { libc::reboot(libc::RB_HALT_SYSTEM) };
        std::thread::sleep(Duration::from_secs(60));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hostname_comes_from_before_the_double_dash() {
        let c = "console=ttyS0 agent_shim.hostname=vm-1 quiet -- --x agent_shim.hostname=evil";
        assert_eq!(hostname_from_cmdline(c).as_deref(), Some("vm-1"));
        assert_eq!(
            hostname_from_cmdline("a agent_shim.hostname=bad/name"),
            None
        );
        assert_eq!(hostname_from_cmdline("a b"), None);
        assert_eq!(
            hostname_from_cmdline("agent_shim.hostname=a agent_shim.hostname=b").as_deref(),
            Some("b")
        );
    }

    #[test]
    fn hostnames_are_bounded() {
        assert!(valid_hostname("agent-7.local"));
        assert!(!valid_hostname(""));
        assert!(!valid_hostname(&"a".repeat(65)));
        assert!(!valid_hostname("a b"));
    }

    #[test]
    fn block_filesystems_skip_nodev() {
        let list = "nodev\tsysfs\nnodev\tproc\n\text3\n\text4\nnodev\tcgroup2\n\tvfat\n";
        assert_eq!(
            block_fstypes(list).collect::<Vec<_>>(),
            ["ext3", "ext4", "vfat"]
        );
    }

    #[test]
    fn the_exit_line_is_fixed() {
        assert_eq!(
            format!("{EXIT_LINE_PREFIX}{}", 3),
            "agent-shim: exit status 3"
        );
    }
}
