//! The microVM tests' pre-init (`rdinit=/preinit`): what a platform's initramfs does before
//! handing over to the shim, and no more.
//!
//! 1. Loads the kernel modules listed, one path a line, in `/modules.order` (dependencies
//!    first) with `finit_module(2)`: the distribution kernel has virtio, virtio-net,
//!    virtio-blk and ext4 as modules.
//! 2. Gives `eth0` QEMU user networking's guest address (10.0.2.15/24) and brings it up: the
//!    kernel has no `ip=` autoconfiguration, and the control plane reaches the shim through a
//!    port QEMU forwards to that address.
//! 3. Prints `preinit: boottime_us=N` (`CLOCK_BOOTTIME`: how long since the kernel started),
//!    for the boot benchmark.
//! 4. `exec`s `/agent-shim` with its own arguments and environment, so the shim is PID 1
//!    (or, with `--exec PROGRAM` first, PROGRAM: the benchmark's plain `/init` starts the
//!    driver directly, with one end of a socketpair as fd 3 and `AGENT_SHIM_FD=3`, the other
//!    end kept open and never read).
//!
//! It mounts nothing: the shim must find `/proc` unmounted and take on the init duties by
//! itself. Any failure is printed and the exec still happens (the shim then reports).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt as _;
use std::time::{Duration, Instant};

fn main() {
    load_modules();
    if let Err(err) = eth0_up() {
        eprintln!("preinit: eth0: {err}");
    }
    let mut rest: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let program = match rest.first().map(|a| a.as_bytes()) {
        Some(b"--exec") if rest.len() > 1 => {
            let p = rest.remove(1);
            rest.remove(0);
            driver_socket();
            CString::new(p.as_bytes()).unwrap_or_default()
        }
        _ => c"/agent-shim".to_owned(),
    };
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime(2) fills the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    eprintln!(
        "preinit: boottime_us={}",
        ts.tv_sec.saturating_mul(1_000_000) + ts.tv_nsec / 1000
    );
    let args: Vec<CString> = std::iter::once(program.clone())
        .chain(rest.iter().filter_map(|a| CString::new(a.as_bytes()).ok()))
        .collect();
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    // SAFETY: argv is a null-terminated array of NUL-terminated strings alive for the call;
    // the environment is the process's own.
    unsafe { libc::execv(program.as_ptr(), argv.as_ptr()) };
    eprintln!(
        "preinit: exec {}: {}",
        program.to_string_lossy(),
        std::io::Error::last_os_error()
    );
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// fd 3 (and `AGENT_SHIM_FD=3`) for a driver started without the shim: one end of a
/// socketpair whose other end stays open (fd 4) and is never read.
fn driver_socket() {
    let mut fds = [0; 2];
    // SAFETY: socketpair(2) fills the array we own; dup2(2) and setenv(3) on our own
    // descriptors and NUL-terminated strings, single-threaded.
    unsafe {
        if libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) != 0 {
            eprintln!("preinit: socketpair: {}", std::io::Error::last_os_error());
            return;
        }
        libc::dup2(fds[0], 3);
        libc::dup2(fds[1], 4);
        libc::setenv(c"AGENT_SHIM_FD".as_ptr(), c"3".as_ptr(), 1);
    }
}

fn load_modules() {
    let Ok(list) = std::fs::read_to_string("/modules.order") else {
        return;
    };
    for path in list.lines().filter(|l| !l.trim().is_empty()) {
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(err) => {
                eprintln!("preinit: {path}: {err}");
                continue;
            }
        };
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        // SAFETY: finit_module(2) on an open file with an empty parameter string.
        let rc = unsafe { libc::syscall(libc::SYS_finit_module, fd, c"".as_ptr(), 0) };
        let err = std::io::Error::last_os_error();
        if rc != 0 && err.raw_os_error() != Some(libc::EEXIST) {
            eprintln!("preinit: load {path}: {err}");
        }
    }
}

fn ifreq(name: &[u8]) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all zeroes is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    req
}

fn sockaddr(ip: [u8; 4]) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; this is how the API is used.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn eth0_up() -> std::io::Result<()> {
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let check = |rc: libc::c_int| {
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // The device appears once virtio_net has probed it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut req = ifreq(b"eth0\0");
    loop {
        // SAFETY: a valid ifreq naming eth0.
        match check(unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut req) }) {
            Ok(()) => break,
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    let mut addr = ifreq(b"eth0\0");
    addr.ifr_ifru.ifru_addr = sockaddr([10, 0, 2, 15]);
    // SAFETY: a valid ifreq with an address.
    check(unsafe { libc::ioctl(fd, libc::SIOCSIFADDR as _, &addr) })?;
    let mut mask = ifreq(b"eth0\0");
    mask.ifr_ifru.ifru_netmask = sockaddr([255, 255, 255, 0]);
    // SAFETY: as above.
    check(unsafe { libc::ioctl(fd, libc::SIOCSIFNETMASK as _, &mask) })?;
    // SAFETY: SIOCGIFFLAGS filled the flags.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    // SAFETY: a valid ifreq with flags.
    check(unsafe { libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &req) })?;
    // SAFETY: our own descriptor, closed once.
    unsafe { libc::close(fd) };
    Ok(())
}
