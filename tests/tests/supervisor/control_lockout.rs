//! A client without the token cannot lock the real control plane out: a flood from another
//! loopback address is refused with `limit`, never silently, and the inside gets in again
//! within seconds once it stops.

use std::ffi::OsString;
use std::io::Write as _;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};

use super::{Driver, FAST};
use crate::support::control::{ControlClient, Target};
use crate::support::{is_root, Mode, Shim, TempDir, PATIENCE};

fn one_mode() -> Mode {
    if is_root() {
        Mode::Pid1
    } else {
        Mode::Subreaper
    }
}

/// A client that cannot authenticate (no token) must not be able to keep the real control
/// plane out for as long as it likes. Every loopback address is the sandbox's inside to the
/// gate (one source: all of 127/8 is bindable without privilege), so a flood from 127.0.0.2
/// slows 127.0.0.1 too — each refused with `limit`, never silently — and once the flood stops
/// the inside gets in again within seconds. (A control plane *outside* the sandbox is never
/// slowed by the inside at all: `security::gate`.)
#[test]
fn a_client_without_the_token_cannot_lock_out_the_control_plane() -> Result<()> {
    let dir = TempDir::new("lockout")?;
    let file = dir.path().join("token");
    std::fs::write(&file, b"e2e-token-0123456789\n")?;
    std::os::unix::fs::PermissionsExt::set_mode(
        &mut std::fs::metadata(&file)?.permissions(),
        0o600,
    );
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut args: Vec<OsString> = FAST
        .iter()
        .flat_map(|(k, v)| [OsString::from(k), OsString::from(v)])
        .collect();
    args.extend([
        "--control-listen".into(),
        format!("tcp:127.0.0.1:{port}").into(),
        "--control-token-file".into(),
        file.into_os_string(),
    ]);
    let shim = Shim::new()
        .mode(one_mode())
        .args(args)
        .cmd(Driver::Rust.argv()?)
        .start()?;
    let target = Target::Tcp(format!("127.0.0.1:{port}"));
    // Up and reachable with the right token.
    drop(ControlClient::connect_to(
        &target,
        Some(b"e2e-token-0123456789"),
        PATIENCE,
    )?);

    let stop = Arc::new(AtomicBool::new(false));
    let hostile = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if let Ok(mut s) = connect_from([127, 0, 0, 2], port) {
                    let _ = s.write_all(b"\x00\x00\x00\x05garbage");
                    n += 1;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            n
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let (mut ok, mut failed) = (0, 0);
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        match ControlClient::connect_to(
            &target,
            Some(b"e2e-token-0123456789"),
            Duration::from_secs(1),
        ) {
            Ok(_) => ok += 1,
            Err(_) => failed += 1,
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    let n = hostile.join().unwrap_or(0);
    eprintln!("hostile connections: {n}; control plane: {ok} connected, {failed} refused");
    // The flood is over: its own address gets in again once its bucket refills.
    let mut recovered = false;
    let until = Instant::now() + Duration::from_secs(10);
    while !recovered && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(500));
        recovered = ControlClient::connect_to(
            &target,
            Some(b"e2e-token-0123456789"),
            Duration::from_secs(1),
        )
        .is_ok();
    }
    ensure!(
        recovered,
        "the shim stayed closed to 127.0.0.1 after the flood\n{}",
        shim.context()
    );
    ensure!(
        n > 0 && ok + failed > 0,
        "no flood ({n}) or no attempts ({ok} + {failed})"
    );
    Ok(())
}

/// A TCP connection to 127.0.0.1:`port` from the local address `from` (any of 127/8 works
/// on loopback), so that one machine can play two peers.
fn connect_from(from: [u8; 4], port: u16) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd as _;
    let sin = |addr: [u8; 4], port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor we own; the sockaddrs live on the stack
    // for the duration of each call and `len` is their size.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let local = sin(from, 0);
        if libc::bind(fd, std::ptr::from_ref(&local).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let remote = sin([127, 0, 0, 1], port);
        if libc::connect(fd, std::ptr::from_ref(&remote).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stream)
    }
}
