//! bench-probe: the child an init runs in the init figures.
//!
//! - `bench-probe signals FIFO`: installs a SIGUSR1 handler that writes the
//!   `CLOCK_MONOTONIC` instant of each delivery (8 bytes, native endian) to FIFO, after an
//!   all-zero "ready" record; then sleeps until killed. The bench subtracts the instant it
//!   sent the signal to the init: that is the forwarding latency.
//! - `bench-probe storm N`: forks an intermediate process that forks N grandchildren, each
//!   blocked reading a pipe, and exits: the grandchildren are orphans of the init. Then it
//!   closes the pipe (they all exit at once, zombies of the init) and waits until `kill(pid,
//!   0)` fails for every one of them, i.e. until the init has reaped them all. It prints the
//!   nanoseconds from the release to the last reap, and the count.

use std::io::Write;
use std::sync::atomic::{AtomicI32, Ordering};

static OUT_FD: AtomicI32 = AtomicI32::new(-1);

fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

extern "C" fn on_usr1(_: libc::c_int) {
    let t = now_ns().to_ne_bytes();
    // SAFETY: clock_gettime and write are async-signal-safe; `t` is a valid 8-byte buffer.
    unsafe { libc::write(OUT_FD.load(Ordering::Relaxed), t.as_ptr().cast(), t.len()) };
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["signals", fifo] => signals(fifo),
        ["storm", n] => match n.parse() {
            Ok(n) => storm(n),
            Err(_) => Err(format!("bad count {n:?}")),
        },
        _ => Err("usage: bench-probe signals FIFO | storm N".into()),
    };
    if let Err(e) = code {
        eprintln!("bench-probe: {e}");
        std::process::exit(1);
    }
}

fn signals(fifo: &str) -> Result<(), String> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(fifo)
        .map_err(|e| format!("open {fifo}: {e}"))?;
    let fd = std::os::fd::IntoRawFd::into_raw_fd(file);
    OUT_FD.store(fd, Ordering::Relaxed);
    // SAFETY: a zeroed sigaction is a valid starting point; the handler is an extern "C" fn
    // that only calls async-signal-safe functions.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_usr1 as extern "C" fn(libc::c_int) as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()) != 0 {
            return Err("sigaction failed".into());
        }
        // The init may have started us with signals blocked; make sure SIGUSR1 is not.
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
    let ready = 0u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a valid buffer to our own fd.
    unsafe { libc::write(fd, ready.as_ptr().cast(), ready.len()) };
    loop {
        // SAFETY: pause has no preconditions; it returns after each handled signal.
        unsafe { libc::pause() };
    }
}

fn pipe() -> Result<[libc::c_int; 2], String> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    Ok(fds)
}

fn storm(n: usize) -> Result<(), String> {
    let [release_r, release_w] = pipe()?;
    let [pids_r, pids_w] = pipe()?;
    // SAFETY: this process is single-threaded; the children below only call async-signal-safe
    // functions (fork, close, read, write, _exit) before exiting.
    let mid = unsafe { libc::fork() };
    if mid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if mid == 0 {
        // SAFETY: see above; every buffer is a valid local.
        unsafe {
            libc::close(pids_r);
            libc::close(release_w);
            for _ in 0..n {
                let pid = libc::fork();
                if pid == 0 {
                    libc::close(pids_w);
                    let mut b = 0u8;
                    libc::read(release_r, (&mut b as *mut u8).cast(), 1);
                    libc::_exit(0);
                }
                if pid < 0 {
                    break;
                }
                let bytes = pid.to_ne_bytes();
                libc::write(pids_w, bytes.as_ptr().cast(), bytes.len());
            }
            libc::_exit(0);
        }
    }
    // SAFETY: closing our copies of descriptors we own.
    unsafe {
        libc::close(pids_w);
        libc::close(release_r);
    }
    let mut pids = Vec::with_capacity(n);
    let mut buf = [0u8; 4096];
    let mut have = Vec::new();
    loop {
        // SAFETY: reads into a valid local buffer.
        let got = unsafe { libc::read(pids_r, buf.as_mut_ptr().cast(), buf.len()) };
        if got <= 0 {
            break;
        }
        have.extend_from_slice(&buf[..got as usize]);
    }
    for chunk in have.chunks_exact(4) {
        let mut b = [0u8; 4];
        b.copy_from_slice(chunk);
        pids.push(i32::from_ne_bytes(b));
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    unsafe { libc::waitpid(mid, &mut status, 0) };
    // Every grandchild is now an orphan of the init, blocked on the pipe. Release them.
    let t0 = now_ns();
    // SAFETY: closes the last write end we own: every reader sees end of file.
    unsafe { libc::close(release_w) };
    for &pid in &pids {
        // SAFETY: kill with signal 0 only checks existence; a zombie still exists.
        while unsafe { libc::kill(pid, 0) } == 0 {
            // SAFETY: sched_yield has no preconditions.
            unsafe { libc::sched_yield() };
        }
    }
    let elapsed = now_ns() - t0;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{elapsed} {}", pids.len());
    let _ = out.flush();
    Ok(())
}
