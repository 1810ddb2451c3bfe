//! `gate-attacker`: what a tenant inside the sandbox runs against the shim's control
//! listener to keep the real control plane out, every strategy at once (the test
//! `security::gate` runs it as a tool process, inside the shim's pid and network namespaces):
//!
//! - **holders**: silent connections from many source addresses (all of 127/8 is bindable
//!   without privilege, and the sandbox's own address), reopened as soon as the shim closes
//!   one;
//! - **slowloris**: connections that send a valid-looking `hello` one byte a second;
//! - **wrong tokens**: full handshakes with a wrong proof, in a loop;
//! - **flood**: connect and close, as fast as one thread can.
//!
//! ```text
//! gate-attacker tcp:IP:PORT|unix:PATH SECS [--sources N] [--own IP] [--holders N]
//!               [--slow N] [--wrong N] [--until-file PATH]
//! ```
//!
//! Bounded in time (SECS, at most 300, or until PATH exists) and in connections; prints one `ATTACK key=value …`
//! line at the end (also on stdout, which the shim relays as exec output).

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd as _, FromRawFd as _, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use driver_protocol::frame;
use driver_protocol::message::{Auth, ControlToShim, Hello, Role};

#[derive(Debug, Clone)]
enum Target {
    Tcp(SocketAddrV4),
    Unix(PathBuf),
}

/// One connection, either kind.
enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    fn fd(&self) -> RawFd {
        match self {
            Conn::Tcp(s) => s.as_raw_fd(),
            Conn::Unix(s) => s.as_raw_fd(),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match self {
            Conn::Tcp(s) => s.write_all(buf),
            Conn::Unix(s) => s.write_all(buf),
        }
    }

    fn set_nonblocking(&self) -> std::io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_nonblocking(true),
            Conn::Unix(s) => s.set_nonblocking(true),
        }
    }

    fn set_read_timeout(&self, t: Duration) -> std::io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_read_timeout(Some(t)),
            Conn::Unix(s) => s.set_read_timeout(Some(t)),
        }
    }
}

/// Counters shared by the strategies.
#[derive(Default)]
struct Stats {
    connects: AtomicU64,
    connect_errors: AtomicU64,
    /// First frames seen: the shim's `hello` (admitted), `busy`, `limit`, or a bare close.
    hellos: AtomicU64,
    busy: AtomicU64,
    limit: AtomicU64,
    bare_closes: AtomicU64,
    wrong_tokens: AtomicU64,
    floods: AtomicU64,
    /// The most connections the holders and slowloris held admitted at once.
    held_max: AtomicU64,
}

impl Stats {
    /// Counts what the first bytes from the shim were.
    fn first_frame(&self, bytes: &[u8]) {
        let has = |w: &[u8]| bytes.windows(w.len()).any(|x| x == w);
        let counter = if bytes.is_empty() {
            &self.bare_closes
        } else if has(b"\xa4busy") {
            &self.busy
        } else if has(b"\xa5limit") {
            &self.limit
        } else {
            &self.hellos
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Connects to `target` from `src` (TCP), within a second.
fn connect(target: &Target, src: Option<Ipv4Addr>, stats: &Stats) -> Option<Conn> {
    stats.connects.fetch_add(1, Ordering::Relaxed);
    let conn = match target {
        Target::Unix(path) => UnixStream::connect(path).map(Conn::Unix),
        // From the sandbox's own address, to that address (the listener is on 0.0.0.0).
        Target::Tcp(addr) => match src {
            Some(ip) if !ip.is_loopback() => {
                tcp_from(SocketAddrV4::new(ip, addr.port()), src).map(Conn::Tcp)
            }
            _ => tcp_from(*addr, src).map(Conn::Tcp),
        },
    };
    match conn {
        Ok(c) => Some(c),
        Err(_) => {
            stats.connect_errors.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// A TCP connection to `addr` bound to source address `src` (port chosen by the kernel).
fn tcp_from(addr: SocketAddrV4, src: Option<Ipv4Addr>) -> std::io::Result<TcpStream> {
    // SAFETY: plain socket(2); the fd is owned by the TcpStream made below or closed.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket that nothing else owns.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let sockaddr = |a: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.octets()),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // A bounded connect: SO_SNDTIMEO bounds a blocking connect(2) on Linux.
    let timeout = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: a timeval of the size given, as SO_SNDTIMEO expects.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            std::ptr::from_ref(&timeout).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if let Some(src) = src {
        let sa = sockaddr(src, 0);
        // SAFETY: a sockaddr_in of the length given.
        if unsafe { libc::bind(fd, std::ptr::from_ref(&sa).cast(), len) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    let sa = sockaddr(*addr.ip(), addr.port());
    // SAFETY: a sockaddr_in of the length given.
    if unsafe { libc::connect(fd, std::ptr::from_ref(&sa).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}

/// The source addresses the TCP strategies cycle through: `n` loopback addresses (127.0.x.y)
/// and the sandbox's own address.
fn sources(n: usize, own: Option<Ipv4Addr>) -> Vec<Option<Ipv4Addr>> {
    let mut out: Vec<Option<Ipv4Addr>> = (0..n)
        .map(|i| Some(Ipv4Addr::new(127, 0, (i / 250) as u8, (i % 250) as u8 + 2)))
        .collect();
    if let Some(own) = own {
        out.push(Some(own));
    }
    out
}

/// A slot of the holders or slowloris: its connection, whether the shim admitted it, when it
/// last sent, how much of the hello it sent.
struct Slot {
    conn: Option<Conn>,
    admitted: bool,
    first: Vec<u8>,
    next_byte: usize,
    retry_at: Instant,
}

/// Holders (silent) and slowloris (`trickle`) connections, on one thread with poll(2).
fn hold(
    target: &Target,
    srcs: &[Option<Ipv4Addr>],
    count: usize,
    trickle: Option<&[u8]>,
    stop: &AtomicBool,
    stats: &Stats,
) {
    let mut slots: Vec<Slot> = (0..count)
        .map(|_| Slot {
            conn: None,
            admitted: false,
            first: Vec::new(),
            next_byte: 0,
            retry_at: Instant::now(),
        })
        .collect();
    let mut buf = [0u8; 4096];
    let mut last_trickle = Instant::now();
    let mut turn = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        for (i, slot) in slots.iter_mut().enumerate() {
            if slot.conn.is_none() && now >= slot.retry_at {
                turn = turn.wrapping_add(1);
                let src = srcs.get((i + turn) % srcs.len().max(1)).copied().flatten();
                if let Some(c) = connect(target, src, stats) {
                    let _ = c.set_nonblocking();
                    slot.conn = Some(c);
                    slot.admitted = false;
                    slot.first.clear();
                    slot.next_byte = 0;
                } else {
                    slot.retry_at = now + Duration::from_millis(20);
                }
            }
        }
        // One byte a second on every slowloris connection.
        if let Some(hello) = trickle {
            if now.duration_since(last_trickle) >= Duration::from_secs(1) {
                last_trickle = now;
                for slot in &mut slots {
                    if let Some(c) = slot.conn.as_mut() {
                        if let Some(b) = hello.get(slot.next_byte) {
                            let _ = c.write_all(std::slice::from_ref(b));
                            slot.next_byte += 1;
                        }
                    }
                }
            }
        }
        let mut fds: Vec<libc::pollfd> = slots
            .iter()
            .filter_map(|s| s.conn.as_ref())
            .map(|c| libc::pollfd {
                fd: c.fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of the length given.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 50) };
        let ready: Vec<RawFd> = fds
            .iter()
            .filter(|p| p.revents != 0)
            .map(|p| p.fd)
            .collect();
        for slot in &mut slots {
            let Some(c) = slot.conn.as_mut() else {
                continue;
            };
            if !ready.contains(&c.fd()) {
                continue;
            }
            loop {
                match c.read(&mut buf) {
                    Ok(0) => {
                        if !slot.admitted {
                            stats.first_frame(&slot.first);
                        }
                        slot.conn = None;
                        slot.retry_at = Instant::now() + Duration::from_millis(5);
                        break;
                    }
                    Ok(n) => {
                        if slot.first.len() < 256 {
                            slot.first.extend_from_slice(&buf[..n]);
                        }
                        if !slot.admitted && slot.first.windows(6).any(|w| w == b"\xa5hello") {
                            slot.admitted = true;
                            stats.first_frame(&slot.first);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        slot.conn = None;
                        slot.retry_at = Instant::now() + Duration::from_millis(5);
                        break;
                    }
                }
            }
        }
        let held = slots
            .iter()
            .filter(|s| s.conn.is_some() && s.admitted)
            .count() as u64;
        stats.held_max.fetch_max(held, Ordering::Relaxed);
    }
}

/// Full handshakes with a wrong proof, one after the other.
fn wrong_tokens(target: &Target, srcs: &[Option<Ipv4Addr>], stop: &AtomicBool, stats: &Stats) {
    let mut frames = Vec::new();
    let hello = Hello::new(Role::Control, "attacker", "0").with_nonce([7; 32]);
    let auth = Auth {
        mac: vec![0u8; 32].into(),
    };
    for msg in [ControlToShim::Hello(hello), ControlToShim::Auth(auth)] {
        if frame::write_message(&mut frames, 1 << 16, &msg).is_err() {
            return;
        }
    }
    let mut buf = [0u8; 4096];
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        n = n.wrapping_add(1);
        let src = srcs.get(n % srcs.len().max(1)).copied().flatten();
        let Some(mut c) = connect(target, src, stats) else {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        };
        let _ = c.set_read_timeout(Duration::from_secs(2));
        let _ = c.write_all(&frames);
        let mut first = Vec::new();
        while let Ok(k) = c.read(&mut buf) {
            if k == 0 {
                break;
            }
            if first.len() < 256 {
                first.extend_from_slice(&buf[..k]);
            }
        }
        stats.first_frame(&first);
        stats.wrong_tokens.fetch_add(1, Ordering::Relaxed);
    }
}

/// Connect and close, as fast as one thread can.
fn flood(target: &Target, srcs: &[Option<Ipv4Addr>], stop: &AtomicBool, stats: &Stats) {
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        n = n.wrapping_add(1);
        let src = srcs.get(n % srcs.len().max(1)).copied().flatten();
        if connect(target, src, stats).is_some() {
            stats.floods.fetch_add(1, Ordering::Relaxed);
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn parse_target(s: &str) -> Option<Target> {
    if let Some(rest) = s.strip_prefix("tcp:") {
        return rest.parse().ok().map(Target::Tcp);
    }
    s.strip_prefix("unix:").map(|p| Target::Unix(p.into()))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(target), Some(secs)) = (
        args.first().and_then(|s| parse_target(s)),
        args.get(1).and_then(|s| s.parse::<u64>().ok()),
    ) else {
        eprintln!("usage: gate-attacker tcp:IP:PORT|unix:PATH SECS [--sources N] [--own IP] [--holders N] [--slow N] [--wrong N] [--until-file PATH]");
        return ExitCode::from(2);
    };
    let opt = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
    };
    let num = |name: &str, default: usize| {
        opt(name)
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
            .min(2000)
    };
    let own: Option<Ipv4Addr> = opt("--own").and_then(|v| v.parse().ok());
    let srcs = match target {
        Target::Tcp(_) => sources(num("--sources", 200), own),
        Target::Unix(_) => vec![None],
    };
    let (holders, slow, wrong) = (num("--holders", 300), num("--slow", 50), num("--wrong", 2));
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(Stats::default());
    // A hello frame, trickled a byte a second: its length prefix promises 200 bytes.
    let mut trickle = vec![0, 0, 0, 200, 0x85, 0xa4, b't', b'y', b'p', b'e', 0xa5];
    trickle.extend_from_slice(b"hello");
    let trickle = Arc::new(trickle);
    let mut threads = Vec::new();
    let spawn = |f: Box<dyn FnOnce() + Send>| std::thread::spawn(f);
    {
        let (t, s, st, sr) = (
            target.clone(),
            Arc::clone(&stats),
            Arc::clone(&stop),
            srcs.clone(),
        );
        threads.push(spawn(Box::new(move || {
            hold(&t, &sr, holders, None, &st, &s)
        })));
    }
    {
        let (t, s, st, sr, h) = (
            target.clone(),
            Arc::clone(&stats),
            Arc::clone(&stop),
            srcs.clone(),
            Arc::clone(&trickle),
        );
        threads.push(spawn(Box::new(move || {
            hold(&t, &sr, slow, Some(&h), &st, &s)
        })));
    }
    for _ in 0..wrong {
        let (t, s, st, sr) = (
            target.clone(),
            Arc::clone(&stats),
            Arc::clone(&stop),
            srcs.clone(),
        );
        threads.push(spawn(Box::new(move || wrong_tokens(&t, &sr, &st, &s))));
    }
    {
        let (t, s, st, sr) = (
            target.clone(),
            Arc::clone(&stats),
            Arc::clone(&stop),
            srcs.clone(),
        );
        threads.push(spawn(Box::new(move || flood(&t, &sr, &st, &s))));
    }
    let started = Instant::now();
    let until = opt("--until-file").map(PathBuf::from);
    let end = started + Duration::from_secs(secs.min(300));
    while Instant::now() < end && !until.as_ref().is_some_and(|p| p.exists()) {
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
    println!(
        "ATTACK secs={:.1} sources={} connects={} connect_errors={} admitted={} busy={} \
         limit={} bare_closes={} wrong_tokens={} floods={} held_max={}",
        started.elapsed().as_secs_f64(),
        srcs.len(),
        g(&stats.connects),
        g(&stats.connect_errors),
        g(&stats.hellos),
        g(&stats.busy),
        g(&stats.limit),
        g(&stats.bare_closes),
        g(&stats.wrong_tokens),
        g(&stats.floods),
        g(&stats.held_max),
    );
    ExitCode::SUCCESS
}
