//! `probe`: the process the end-to-end tests run under agent-shim, to check from the inside
//! what the shim promises (signals delivered, zombies reaped, argv/env/stdio untouched).
//!
//! std + libc only, so it also builds static and runs in a `FROM scratch` container.
//! Every subcommand prints one fact per line and flushes it at once, so a test can wait for a
//! line with a deadline. Nothing here waits forever: every sleep is bounded.
//!
//! ```text
//! probe exit N                      exit with code N
//! probe die SIG                     kill itself with SIG (default disposition)
//! probe sleep SECS                  sleep with default signal dispositions, then exit 0
//! probe signals [--exit-on SIG] [--code N]
//!                                   print `ready`, then `got SIGNAME` for every signal received
//! probe ignore-term [SIG...]        ignore SIGTERM (and SIG...), print `ready`, sleep
//! probe orphans N [--stay]          print `adopted_by=shim|other:PID`; make N orphaned
//!                                   grandchildren; print `forked=N in T`, `zombies=K`
//! probe kill-init [--fill-stderr]   as uid 65534, kill(1, SIGTERM); print `sent ...`, `alive`; exit 7
//!                                   (first fill the pipe on fd 2: print `filled=N`)
//! probe all-signals [--exit-on N]   block every signal 1-64 (the ones libc reserves too), print
//!                                   `ready`, then `got N` (the number) for every signal received
//! probe signal-init SIG [--uid U] [--forge] [--watch] [--stay]
//!                                   (as uid U) send SIG to PID 1: kill(2), or with --forge a
//!                                   rt_sigqueueinfo(2) claiming si_pid 0, si_uid 0; print
//!                                   `sent ok|EPERM|...`; with --watch, `got N` if SIG comes back
//!                                   within 1.5 s, else `quiet`; print `alive`; exit 7 (--stay:
//!                                   sleep instead)
//! probe sigio-init SIG               make the kernel send SIG to PID 1 on our behalf: a pipe
//!                                   with F_SETOWN 1, F_SETSIG SIG (none for IO: plain SIGIO,
//!                                   which comes as SI_KERNEL) and O_ASYNC, then a write;
//!                                   print `armed ok|...`, then `got N` if SIG comes back
//!                                   within 1.5 s, else `quiet`; `alive`; exit 7
//! probe argv ARGS...                print `argc=N`, then `arg=HEX` per argument
//! probe env NAMES...                print `NAME=VALUE` or `NAME unset`
//! probe cat                         copy stdin to stdout
//! probe stderr TEXT                 write TEXT and a newline to stderr
//! probe grandchild FILE [--ignore-term] [--stay]
//!                                   fork a grandchild that logs signals to FILE; print `ready gc=PID`
//! probe tty                         print `isatty=0|1 fg=0|1 pgleader=0|1`
//! probe oom-adj [LOWER]            print `oom_score_adj=N`; with LOWER, try to write it and
//!                                   print `lower=ok|ERRNO` and `after=N`
//! probe hog FORKS MIB               fork FORKS children that sleep (print `forked=N`), then
//!                                   touch MIB MiB, printing `mib=K` every 16; sleep, exit 0
//! probe daemon [CMD ARGS...]        fork a child that leaves the session (`setsid`) and sleeps:
//!                                   print `daemon=PID`, then sleep too (with CMD: `execv` it)
//! probe spew MIB                    write MIB MiB of output as fast as stdout takes it
//! probe report                      what the shim gave this process, one `key=value` a line:
//!                                   pid, ppid, uid, gid, groups, no_new_privs, umask, cwd,
//!                                   cwd_writable,
//!                                   rlimit_NAME, fds, env_token, env (names), zombies,
//!                                   pid1 (the command name of PID 1)
//! probe read PATH...               print `== PATH`, then the file's contents (or `error ...`)
//! probe stop-spawns SECS [--uid N]  (as uid N if given) for SECS, spin `tgkill(p, p, SIGSTOP)`
//!                                   on the next pids after /proc/sys/kernel/ns_last_pid:
//!                                   stops a child of PID 1 between its setuid and its execve;
//!                                   print `ready`, then `hits=N` (processes stopped)
//! ```

use std::ffi::{CStr, CString, OsString};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

/// Upper bound of every "sleep until signalled" in the probe, so a lost probe still ends.
const MAX_SLEEP: Duration = Duration::from_secs(120);

/// The signals `probe signals` watches: those the shim must forward, plus a few more.
const WATCHED: &[(libc::c_int, &str)] = &[
    (libc::SIGHUP, "SIGHUP"),
    (libc::SIGINT, "SIGINT"),
    (libc::SIGQUIT, "SIGQUIT"),
    (libc::SIGUSR1, "SIGUSR1"),
    (libc::SIGUSR2, "SIGUSR2"),
    (libc::SIGTERM, "SIGTERM"),
    (libc::SIGWINCH, "SIGWINCH"),
    (libc::SIGALRM, "SIGALRM"),
    (libc::SIGPIPE, "SIGPIPE"),
    (libc::SIGCONT, "SIGCONT"),
    (libc::SIGURG, "SIGURG"),
    (libc::SIGTSTP, "SIGTSTP"),
    (libc::SIGTTIN, "SIGTTIN"),
    (libc::SIGTTOU, "SIGTTOU"),
];

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let Some(cmd) = args.first().and_then(|a| a.to_str()) else {
        return usage("missing subcommand");
    };
    let rest = &args[1..];
    let result = match cmd {
        "exit" => return ExitCode::from(parse_arg::<u8>(rest, 0)),
        "die" => die(rest),
        "sleep" => {
            std::thread::sleep(Duration::from_secs_f64(parse_arg::<f64>(rest, 0)));
            Ok(0)
        }
        "signals" => signals(rest),
        "ignore-term" => ignore_term(rest),
        "orphans" => orphans(rest),
        "kill-init" => kill_init(rest),
        "all-signals" => all_signals(rest),
        "signal-init" => signal_init(rest),
        "sigio-init" => sigio_init(rest),
        "argv" => argv(rest),
        "env" => env(rest),
        "cat" => cat(),
        "stderr" => {
            let text = rest.first().map(|s| s.as_bytes()).unwrap_or_default();
            let mut err = io::stderr().lock();
            err.write_all(text)
                .and_then(|()| err.write_all(b"\n"))
                .map(|()| 0)
        }
        "grandchild" => grandchild(rest),
        "tty" => tty(),
        "oom-adj" => oom_adj(rest),
        "hog" => hog(rest),
        "daemon" => daemon(rest),
        "spew" => spew(rest),
        "report" => report(),
        "stop-spawns" => stop_spawns(rest),
        "read" => read_files(rest),
        other => return usage(&format!("unknown subcommand {other:?}")),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("probe {cmd}: {e}");
            ExitCode::from(99)
        }
    }
}

fn usage(msg: &str) -> ExitCode {
    eprintln!("probe: {msg}; see the module docs of tests/src/bin/probe.rs");
    ExitCode::from(98)
}

/// Parses positional argument `i` or exits 98 with a message.
fn parse_arg<T: std::str::FromStr>(args: &[OsString], i: usize) -> T {
    match args
        .get(i)
        .and_then(|a| a.to_str())
        .and_then(|s| s.parse().ok())
    {
        Some(v) => v,
        None => {
            eprintln!("probe: argument {i} missing or invalid");
            std::process::exit(98)
        }
    }
}

fn read_oom_adj() -> String {
    std::fs::read_to_string("/proc/self/oom_score_adj")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|e| format!("? {e}"))
}

fn oom_adj(args: &[OsString]) -> io::Result<u8> {
    say(&format!("oom_score_adj={}", read_oom_adj()));
    if let Some(lower) = args.first().and_then(|a| a.to_str()) {
        let res = std::fs::OpenOptions::new()
            .write(true)
            .open("/proc/self/oom_score_adj")
            .and_then(|mut f| f.write_all(lower.as_bytes()));
        match res {
            Ok(()) => say("lower=ok"),
            Err(e) => say(&format!("lower={}", e.raw_os_error().unwrap_or(0))),
        }
        say(&format!("after={}", read_oom_adj()));
    }
    Ok(0)
}

fn daemon(then: &[OsString]) -> io::Result<u8> {
    let argv: Vec<CString> = then
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(io::Error::other)?;
    let pid = fork()?;
    if pid == 0 {
        // SAFETY: setsid(2), sleep(3) and _exit(2) are async-signal-safe.
        unsafe {
            libc::setsid();
            libc::sleep(MAX_SLEEP.as_secs() as libc::c_uint);
        }
        exit_now(0)
    }
    say(&format!("daemon={pid}"));
    if let Some(cmd) = argv.first() {
        let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        // SAFETY: `cmd` and every pointer of the NULL-terminated `ptrs` point into `argv`,
        // alive across the call.
        unsafe { libc::execv(cmd.as_ptr(), ptrs.as_ptr()) };
        return Err(io::Error::last_os_error());
    }
    std::thread::sleep(MAX_SLEEP);
    Ok(0)
}

fn hog(args: &[OsString]) -> io::Result<u8> {
    let forks: usize = parse_arg(args, 0);
    let mib: usize = parse_arg(args, 1);
    let mut forked = 0;
    for _ in 0..forks {
        // SAFETY: the child only sleeps and `_exit`s (async-signal-safe calls).
        match unsafe { libc::fork() } {
            0 => {
                // SAFETY: sleep(3) and _exit(2) are async-signal-safe.
                unsafe { libc::sleep(MAX_SLEEP.as_secs() as libc::c_uint) };
                exit_now(0)
            }
            n if n > 0 => forked += 1,
            _ => break,
        }
    }
    say(&format!("forked={forked}"));
    let mut held: Vec<Vec<u8>> = Vec::new();
    for k in 1..=mib {
        // Touched, not only reserved: every page is charged to the cgroup.
        held.push(vec![0x5a; 1 << 20]);
        if k % 16 == 0 {
            say(&format!("mib={k}"));
        }
    }
    std::thread::sleep(MAX_SLEEP / 2);
    say(&format!("held={}", held.len()));
    Ok(0)
}

fn spew(args: &[OsString]) -> io::Result<u8> {
    let mib: usize = parse_arg(args, 0);
    let block = vec![b'x'; 1 << 16];
    let mut out = io::stdout().lock();
    for _ in 0..mib * 16 {
        out.write_all(&block)?;
    }
    out.flush()?;
    Ok(0)
}

/// Prints one line and flushes it, so a test sees it at once through a pipe.
fn say(line: &str) {
    let mut out = io::stdout().lock();
    // A closed stdout only loses the report; the test notices the missing line.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn last_os_error() -> io::Error {
    io::Error::last_os_error()
}

fn signal_number(name: &str) -> Option<libc::c_int> {
    if let Ok(n) = name.parse() {
        return Some(n);
    }
    let name = name.to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    let extra = [
        ("KILL", libc::SIGKILL),
        ("SEGV", libc::SIGSEGV),
        ("ABRT", libc::SIGABRT),
    ];
    WATCHED
        .iter()
        .map(|(n, s)| (&s[3..], *n))
        .chain(extra)
        .find(|(s, _)| *s == name)
        .map(|(_, n)| n)
}

fn signal_name(sig: libc::c_int) -> String {
    WATCHED
        .iter()
        .find(|(n, _)| *n == sig)
        .map_or_else(|| format!("SIG{sig}"), |(_, s)| (*s).to_owned())
}

fn set_disposition(sig: libc::c_int, handler: libc::sighandler_t) -> io::Result<()> {
    // SAFETY: `handler` is SIG_DFL, SIG_IGN, or an `extern "C" fn(c_int)` that only calls
    // async-signal-safe functions.
    if unsafe { libc::signal(sig, handler) } == libc::SIG_ERR {
        return Err(last_os_error());
    }
    Ok(())
}

/// Sleeps until `MAX_SLEEP` has passed; signals with a default disposition end it sooner.
fn sleep_bounded() {
    let deadline = Instant::now() + MAX_SLEEP;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        std::thread::sleep(left.min(Duration::from_secs(1)));
    }
}

fn die(args: &[OsString]) -> io::Result<u8> {
    let name = args.first().and_then(|a| a.to_str()).unwrap_or("");
    let sig = signal_number(name)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "unknown signal"))?;
    // No core files from SIGSEGV/SIGABRT/SIGQUIT in the test's working directory.
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `no_core` is a valid rlimit for the duration of the call.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
    if sig != libc::SIGKILL {
        set_disposition(sig, libc::SIG_DFL)?;
    }
    let mut set = empty_sigset();
    // SAFETY: `set` is an initialised sigset_t; `sig` is a valid signal number.
    unsafe {
        libc::sigaddset(&mut set, sig);
        libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
    // SAFETY: raise has no memory-safety preconditions.
    if unsafe { libc::raise(sig) } != 0 {
        return Err(last_os_error());
    }
    std::thread::sleep(Duration::from_secs(5));
    Err(io::Error::other("still alive after raise"))
}

fn empty_sigset() -> libc::sigset_t {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the whole set it is given.
    unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        set.assume_init()
    }
}

fn signals(args: &[OsString]) -> io::Result<u8> {
    let mut exit_on = None;
    let mut code = 0u8;
    let mut it = args.iter().filter_map(|a| a.to_str());
    while let Some(a) = it.next() {
        match a {
            "--exit-on" => exit_on = it.next().and_then(signal_number),
            "--code" => code = it.next().and_then(|c| c.parse().ok()).unwrap_or(0),
            _ => return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad option")),
        }
    }
    let mut set = empty_sigset();
    for (sig, _) in WATCHED {
        // SAFETY: `set` is an initialised sigset_t and `sig` a valid signal.
        unsafe { libc::sigaddset(&mut set, *sig) };
    }
    // SAFETY: `set` is initialised; the old mask is not wanted. Blocking in the only thread
    // before any other thread exists means every watched signal stays pending for sigwaitinfo.
    if unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) } != 0 {
        return Err(last_os_error());
    }
    say("ready");
    let timeout = libc::timespec {
        tv_sec: 1,
        tv_nsec: 0,
    };
    let deadline = Instant::now() + MAX_SLEEP;
    while Instant::now() < deadline {
        let mut info = std::mem::MaybeUninit::<libc::siginfo_t>::uninit();
        // SAFETY: `set` and `timeout` are valid; `info` is written by the kernel on success.
        let sig = unsafe { libc::sigtimedwait(&set, info.as_mut_ptr(), &timeout) };
        if sig < 0 {
            let e = last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => continue,
                _ => return Err(e),
            }
        }
        say(&format!("got {}", signal_name(sig)));
        if exit_on == Some(sig) {
            return Ok(code);
        }
    }
    Err(io::Error::new(io::ErrorKind::TimedOut, "no exit signal"))
}

fn ignore_term(also: &[OsString]) -> io::Result<u8> {
    set_disposition(libc::SIGTERM, libc::SIG_IGN)?;
    for name in also {
        let sig = name.to_str().and_then(signal_number);
        let sig = sig.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad signal"))?;
        set_disposition(sig, libc::SIG_IGN)?;
    }
    say("ready");
    sleep_bounded();
    Ok(0)
}

/// Forks; returns the child's pid in the parent and 0 in the child.
fn fork() -> io::Result<libc::pid_t> {
    // SAFETY: the probe is single-threaded when it forks (the tests run it fresh), and the
    // child side only calls async-signal-safe functions before it `_exit`s or returns into
    // code that does the same.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(last_os_error());
    }
    Ok(pid)
}

fn exit_now(code: libc::c_int) -> ! {
    // SAFETY: `_exit` ends the process without running destructors or atexit handlers,
    // which is what a forked child of this probe must do.
    unsafe { libc::_exit(code) }
}

fn orphans(args: &[OsString]) -> io::Result<u8> {
    let n: usize = parse_arg(args, 0);
    let stay = args.iter().any(|a| a == "--stay");
    // SAFETY: getppid cannot fail.
    let reaper = unsafe { libc::getppid() };
    // First a witness: one orphan reports who adopted it. Without a subreaper (or PID 1)
    // orphans leave the shim's tree, and "no zombie" would prove nothing.
    match witness_orphan()? {
        Some(p) if p == reaper => say("adopted_by=shim"),
        Some(p) => say(&format!("adopted_by=other:{p}")),
        None => say("adopted_by=unknown"),
    }
    let started = Instant::now();
    for _ in 0..n {
        let mid = fork()?;
        if mid == 0 {
            // The intermediate: fork the grandchild and exit at once, orphaning it. The
            // grandchild exits on its own, possibly before or after the reparenting.
            match fork() {
                Ok(0) => exit_now(0),
                Ok(_) => exit_now(0),
                Err(_) => exit_now(1),
            }
        }
        let mut status = 0;
        // SAFETY: `status` is a valid out-pointer; `mid` is our own child.
        while unsafe { libc::waitpid(mid, &mut status, 0) } < 0 {
            if last_os_error().raw_os_error() != Some(libc::EINTR) {
                return Err(last_os_error());
            }
        }
    }
    say(&format!("forked={n} in {:?}", started.elapsed()));
    // Orphans belong to the shim (PID 1 or subreaper, our parent): count its zombies.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut zombies = count_zombies(reaper)?;
    while zombies > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        zombies = count_zombies(reaper)?;
    }
    say(&format!("zombies={zombies}"));
    if stay {
        say("ready");
        sleep_bounded();
    }
    Ok(0)
}

/// Orphans one grandchild and returns the pid of the process that adopted it (as the
/// grandchild sees it), or `None` if it could not tell within its deadline.
fn witness_orphan() -> io::Result<Option<libc::pid_t>> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(last_os_error());
    }
    let mid = fork()?;
    if mid == 0 {
        // SAFETY: getpid cannot fail.
        let me = unsafe { libc::getpid() };
        if let Ok(0) = fork() {
            // The grandchild: wait (bounded) until `me` has exited and it is adopted.
            // SAFETY: getppid, nanosleep via usleep, write and _exit are async-signal-safe.
            unsafe {
                let mut tries = 0;
                let mut parent = libc::getppid();
                while parent == me && tries < 10_000 {
                    libc::usleep(1000);
                    tries += 1;
                    parent = libc::getppid();
                }
                let bytes = parent.to_ne_bytes();
                libc::write(fds[1], bytes.as_ptr().cast(), bytes.len());
            }
            exit_now(0);
        }
        exit_now(0);
    }
    let mut bytes = [0u8; 4];
    // SAFETY: closing our write end (so EOF comes if the grandchild dies), then waiting for
    // the intermediate and reading at most 4 bytes into a valid buffer.
    let n = unsafe {
        libc::close(fds[1]);
        let mut status = 0;
        libc::waitpid(mid, &mut status, 0);
        let n = libc::read(fds[0], bytes.as_mut_ptr().cast(), bytes.len());
        libc::close(fds[0]);
        n
    };
    Ok((n == 4).then(|| libc::pid_t::from_ne_bytes(bytes)))
}

/// Counts the zombies in `/proc` whose parent is `parent`.
fn count_zombies(parent: libc::pid_t) -> io::Result<usize> {
    let mut n = 0;
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        if !entry.file_name().as_bytes().iter().all(u8::is_ascii_digit) {
            continue;
        }
        // A process can vanish between readdir and read: skip it.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) S ppid ...`; comm may contain spaces and parentheses.
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let mut fields = after.split_whitespace();
        let state = fields.next();
        let ppid = fields.next().and_then(|p| p.parse::<libc::pid_t>().ok());
        if state == Some("Z") && ppid == Some(parent) {
            n += 1;
        }
    }
    Ok(n)
}

fn kill_init(args: &[OsString]) -> io::Result<u8> {
    if args.iter().any(|a| a == "--fill-stderr") {
        say(&format!("filled={}", fill_stderr()?));
    }
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        // SAFETY: plain syscalls; order matters (groups and gid while still root).
        let dropped = unsafe {
            libc::setgroups(0, std::ptr::null()) == 0
                && libc::setgid(65534) == 0
                && libc::setuid(65534) == 0
        };
        if !dropped {
            return Err(last_os_error());
        }
    }
    // SAFETY: kill has no memory-safety preconditions.
    let rc = unsafe { libc::kill(1, libc::SIGTERM) };
    if rc == 0 {
        say("sent ok");
    } else {
        say(&format!("sent error {}", last_os_error()));
    }
    std::thread::sleep(Duration::from_secs(1));
    say("alive");
    Ok(7)
}

/// Fills the pipe on fd 2 (shared with the shim) through a non-blocking open file
/// description of its own (fd 2's flags, shared with the shim, stay blocking); the bytes
/// written.
fn fill_stderr() -> io::Result<usize> {
    let path = CString::new("/proc/self/fd/2").map_err(io::Error::other)?;
    // SAFETY: a valid NUL-terminated path.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_WRONLY | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(last_os_error());
    }
    let chunk = [b'x'; 4096];
    let mut total = 0usize;
    while total < 64 << 20 {
        // SAFETY: a valid buffer of its length.
        let n = unsafe { libc::write(fd, chunk.as_ptr().cast(), chunk.len()) };
        if n <= 0 {
            break;
        }
        total += n as usize;
    }
    // SAFETY: our descriptor.
    unsafe { libc::close(fd) };
    Ok(total)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn argv(args: &[OsString]) -> io::Result<u8> {
    say(&format!("argc={}", args.len()));
    for a in args {
        say(&format!("arg={}", hex(a.as_bytes())));
    }
    Ok(0)
}

fn env(names: &[OsString]) -> io::Result<u8> {
    for name in names {
        let shown = name.to_string_lossy();
        match std::env::var_os(name) {
            Some(v) => say(&format!("{shown}={}", v.to_string_lossy())),
            None => say(&format!("{shown} unset")),
        }
    }
    Ok(0)
}

fn cat() -> io::Result<u8> {
    let mut buf = [0u8; 8192];
    let mut input = io::stdin().lock();
    let mut out = io::stdout().lock();
    loop {
        let n = input.read(&mut buf)?;
        if n == 0 {
            return Ok(0);
        }
        out.write_all(&buf[..n])?;
        out.flush()?;
    }
}

/// The grandchild's log file, set before its handlers are installed.
static LOG_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn log_and_exit(sig: libc::c_int) {
    let msg: &[u8] = if sig == libc::SIGTERM {
        b"term\n"
    } else {
        b"usr1\n"
    };
    let fd = LOG_FD.load(Ordering::Relaxed);
    // SAFETY: write and _exit are async-signal-safe; `msg` is a valid buffer of its length.
    unsafe {
        libc::write(fd, msg.as_ptr().cast(), msg.len());
        if sig == libc::SIGTERM {
            libc::_exit(0);
        }
    }
}

fn grandchild(args: &[OsString]) -> io::Result<u8> {
    let file = args
        .first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "missing FILE"))?;
    let ignore_term = args.iter().any(|a| a == "--ignore-term");
    let stay = args.iter().any(|a| a == "--stay");
    let path = CString::new(file.as_bytes())?;
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(last_os_error());
    }
    let gc = fork()?;
    if gc == 0 {
        run_grandchild(&path, ignore_term, fds[1]);
    }
    // SAFETY: closing our copy of the write end; reading one byte into a valid buffer.
    let ok = unsafe {
        libc::close(fds[1]);
        let mut b = 0u8;
        libc::read(fds[0], (&mut b as *mut u8).cast(), 1) == 1
    };
    if !ok {
        return Err(io::Error::other("grandchild did not start"));
    }
    if stay {
        // The child survives USR1 (so a test can see where USR1 went) but not TERM.
        set_disposition(libc::SIGUSR1, libc::SIG_IGN)?;
    }
    say(&format!("ready gc={gc}"));
    if stay {
        sleep_bounded();
    }
    Ok(0)
}

/// The grandchild: logs TERM/USR1 to `path`, signals readiness through `ready_fd`, waits.
fn run_grandchild(path: &CStr, ignore_term: bool, ready_fd: libc::c_int) -> ! {
    // SAFETY: only async-signal-safe calls (open, dup2, signal, write, close, nanosleep via
    // `sleep`, _exit) in the forked child; LOG_FD is written before any handler exists.
    unsafe {
        let fd = libc::open(
            path.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND | libc::O_CLOEXEC,
            0o644,
        );
        if fd < 0 {
            libc::_exit(1);
        }
        LOG_FD.store(fd, Ordering::Relaxed);
        // Do not hold the test's stdout/stderr pipes open after the shim is gone.
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            libc::dup2(null, 1);
            libc::dup2(null, 2);
        }
        let term = if ignore_term {
            libc::SIG_IGN
        } else {
            log_and_exit as *const () as libc::sighandler_t
        };
        libc::signal(libc::SIGTERM, term);
        libc::signal(
            libc::SIGUSR1,
            log_and_exit as *const () as libc::sighandler_t,
        );
        let b = 1u8;
        libc::write(ready_fd, (&b as *const u8).cast(), 1);
        libc::close(ready_fd);
        let mut left = MAX_SLEEP.as_secs() as libc::c_uint;
        while left > 0 {
            left = libc::sleep(left);
        }
        libc::_exit(0)
    }
}

fn tty() -> io::Result<u8> {
    // SAFETY: isatty, tcgetpgrp, getpgrp and getpid only read process/terminal state.
    let (isatty, fg, leader) = unsafe {
        let isatty = libc::isatty(0) == 1;
        let fg = isatty && libc::tcgetpgrp(0) == libc::getpgrp();
        (isatty, fg, libc::getpgrp() == libc::getpid())
    };
    say(&format!(
        "isatty={} fg={} pgleader={}",
        u8::from(isatty),
        u8::from(fg),
        u8::from(leader)
    ));
    Ok(0)
}

/// `probe report`: the facts the shim promises about a driver or an exec, seen from inside.
fn report() -> io::Result<u8> {
    // SAFETY: these getters cannot fail and have no preconditions.
    let (pid, ppid, uid, euid, gid, egid) = unsafe {
        (
            libc::getpid(),
            libc::getppid(),
            libc::getuid(),
            libc::geteuid(),
            libc::getgid(),
            libc::getegid(),
        )
    };
    say(&format!("pid={pid}"));
    say(&format!("ppid={ppid}"));
    say(&format!("uid={uid}"));
    say(&format!("euid={euid}"));
    say(&format!("gid={gid}"));
    say(&format!("egid={egid}"));
    let mut groups = [0 as libc::gid_t; 256];
    // SAFETY: `groups` has room for the 256 entries the call may write.
    let n = unsafe { libc::getgroups(groups.len() as libc::c_int, groups.as_mut_ptr()) };
    let groups = usize::try_from(n)
        .ok()
        .and_then(|n| groups.get(..n))
        .map(|g| join(g.iter()))
        .unwrap_or_else(|| "?".to_owned());
    say(&format!("groups={groups}"));
    // SAFETY: PR_GET_NO_NEW_PRIVS takes no pointer arguments.
    let nnp = unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) };
    say(&format!("no_new_privs={nnp}"));
    // umask can only be read by setting it: set it back at once (single-threaded).
    // SAFETY: umask cannot fail.
    let mask = unsafe {
        let m = libc::umask(0o022);
        libc::umask(m);
        m
    };
    say(&format!("umask={mask:03o}"));
    match std::env::current_dir() {
        Ok(dir) => say(&format!("cwd={}", dir.display())),
        Err(e) => say(&format!("cwd=? {e}")),
    }
    // Whether this process can create a file in its working directory (and remove it again).
    let scratch = format!(".probe-{pid}");
    let writable = std::fs::write(&scratch, b"probe").is_ok();
    if writable {
        let _ = std::fs::remove_file(&scratch);
    }
    say(&format!("cwd_writable={}", u8::from(writable)));
    for (name, res) in [
        ("NOFILE", libc::RLIMIT_NOFILE),
        ("NPROC", libc::RLIMIT_NPROC),
        ("AS", libc::RLIMIT_AS),
        ("CPU", libc::RLIMIT_CPU),
        ("CORE", libc::RLIMIT_CORE),
    ] {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `lim` is a valid out-pointer for the call.
        if unsafe { libc::getrlimit(res, &mut lim) } != 0 {
            say(&format!("rlimit_{name}=? {}", last_os_error()));
            continue;
        }
        let show = |v: libc::rlim_t| {
            if v == libc::RLIM_INFINITY {
                "unlimited".to_owned()
            } else {
                v.to_string()
            }
        };
        say(&format!(
            "rlimit_{name}={}:{}",
            show(lim.rlim_cur),
            show(lim.rlim_max)
        ));
    }
    say(&format!("fds={}", join(open_fds()?.iter())));
    let token = if std::env::var_os("AGENT_SHIM_TOKEN").is_some() {
        "set"
    } else {
        "unset"
    };
    say(&format!("env_token={token}"));
    let mut names: Vec<String> = std::env::vars_os()
        .map(|(k, _)| k.to_string_lossy().into_owned())
        .collect();
    names.sort();
    say(&format!("env={}", names.join(",")));
    say(&format!("zombies={}", count_all_zombies()?));
    let pid1 = std::fs::read_to_string("/proc/1/comm").unwrap_or_else(|_| "?".to_owned());
    say(&format!("pid1={}", pid1.trim()));
    Ok(0)
}

fn join<T: std::fmt::Display>(items: impl Iterator<Item = T>) -> String {
    items.map(|i| i.to_string()).collect::<Vec<_>>().join(",")
}

/// The descriptors open in this process, without the one that lists them.
fn open_fds() -> io::Result<Vec<i32>> {
    let mut fds = Vec::new();
    let mut listing = None;
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let entry = entry?;
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        // The directory being read is itself an open fd: a link to `/proc/<pid>/fd`.
        match std::fs::read_link(entry.path()) {
            Ok(target) if target.ends_with("fd") && target.starts_with("/proc") => {
                listing = Some(fd);
            }
            Ok(_) => fds.push(fd),
            // Gone between readdir and readlink: the listing's own fd, closed already.
            Err(_) => {}
        }
    }
    fds.retain(|fd| Some(*fd) != listing);
    fds.sort_unstable();
    Ok(fds)
}

/// Counts every zombie in this PID namespace's `/proc`, whoever its parent.
fn count_all_zombies() -> io::Result<usize> {
    let mut n = 0;
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        if !entry.file_name().as_bytes().iter().all(u8::is_ascii_digit) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let state = stat
            .rfind(')')
            .and_then(|i| stat.get(i + 1..))
            .and_then(|after| after.split_whitespace().next());
        if state == Some("Z") {
            n += 1;
        }
    }
    Ok(n)
}

/// Every signal from 1 to 64 but SIGKILL and SIGSTOP, bit by bit: libc's `sigfillset` and
/// `sigaddset` leave out (or refuse) the ones libc reserves.
fn every_signal() -> libc::sigset_t {
    let mut set = empty_sigset();
    let ptr = std::ptr::addr_of_mut!(set).cast::<u64>();
    let mut bits = u64::MAX;
    for sig in [libc::SIGKILL, libc::SIGSTOP] {
        bits &= !(1u64 << (sig - 1));
    }
    // SAFETY: a sigset_t is at least 8 bytes and 8-aligned on the 64-bit targets the tests
    // run on; the first 64 bits are signals 1 to 64.
    unsafe { *ptr = bits };
    set
}

/// `rt_sigprocmask(SIG_BLOCK, set)` straight to the kernel (glibc's wrappers drop 32 and 33).
fn block_raw(set: &libc::sigset_t) -> io::Result<()> {
    // SAFETY: `set` is a valid sigset_t of at least 8 bytes; the old mask is not wanted.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_BLOCK,
            set as *const libc::sigset_t,
            std::ptr::null_mut::<libc::sigset_t>(),
            8usize,
        )
    };
    if rc != 0 {
        return Err(last_os_error());
    }
    Ok(())
}

/// Waits at most `timeout` for a signal of `set`; `None` when none came.
fn wait_signal(set: &libc::sigset_t, timeout: Duration) -> io::Result<Option<libc::c_int>> {
    let deadline = Instant::now() + timeout;
    loop {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            return Ok(None);
        };
        let ts = libc::timespec {
            tv_sec: left.as_secs() as libc::time_t,
            tv_nsec: left.subsec_nanos() as libc::c_long,
        };
        let mut info = std::mem::MaybeUninit::<libc::siginfo_t>::uninit();
        // SAFETY: raw syscall on valid pointers: the set (8 bytes), the siginfo buffer and
        // the timeout.
        let sig = unsafe {
            libc::syscall(
                libc::SYS_rt_sigtimedwait,
                set as *const libc::sigset_t,
                info.as_mut_ptr(),
                &ts as *const libc::timespec,
                8usize,
            )
        };
        if sig > 0 {
            return Ok(Some(sig as libc::c_int));
        }
        let e = last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) => return Ok(None),
            Some(libc::EINTR) => continue,
            _ => return Err(e),
        }
    }
}

fn all_signals(args: &[OsString]) -> io::Result<u8> {
    let mut exit_on = None;
    let mut it = args.iter().filter_map(|a| a.to_str());
    while let Some(a) = it.next() {
        match a {
            "--exit-on" => exit_on = it.next().and_then(|n| n.parse::<libc::c_int>().ok()),
            _ => return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad option")),
        }
    }
    let set = every_signal();
    block_raw(&set)?;
    say("ready");
    let deadline = Instant::now() + MAX_SLEEP;
    while Instant::now() < deadline {
        if let Some(sig) = wait_signal(&set, Duration::from_secs(1))? {
            say(&format!("got {sig}"));
            if exit_on == Some(sig) {
                return Ok(0);
            }
        }
    }
    Err(io::Error::new(io::ErrorKind::TimedOut, "no exit signal"))
}

fn signal_init(args: &[OsString]) -> io::Result<u8> {
    let mut args = args.iter().filter_map(|a| a.to_str());
    let sig = args
        .next()
        .and_then(signal_number)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "unknown signal"))?;
    let (mut uid, mut forge, mut watch, mut stay) = (None, false, false, false);
    while let Some(a) = args.next() {
        match a {
            "--uid" => uid = args.next().and_then(|u| u.parse::<libc::uid_t>().ok()),
            "--forge" => forge = true,
            "--watch" => watch = true,
            "--stay" => stay = true,
            _ => return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad option")),
        }
    }
    let mut set = empty_sigset();
    // SAFETY: `set` is initialised and `sig` a valid signal.
    unsafe { libc::sigaddset(&mut set, sig) };
    if watch {
        block_raw(&set)?;
    }
    if let Some(uid) = uid {
        // SAFETY: plain syscalls; groups and gid first, while still root.
        let dropped = unsafe {
            libc::setgroups(0, std::ptr::null()) == 0
                && libc::setgid(uid) == 0
                && libc::setuid(uid) == 0
        };
        if !dropped {
            return Err(last_os_error());
        }
    }
    let rc = if forge {
        // SAFETY: siginfo_t is plain data; all zeros is valid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        info.si_signo = sig;
        info.si_code = libc::SI_QUEUE;
        // si_pid and si_uid (the kill/sigqueue member of the union) follow si_signo,
        // si_errno, si_code and the padding that aligns the union: at offsets 16 and 20 on
        // 64-bit Linux. They stay 0, "from outside the namespace, as root".
        // SAFETY: raw syscall on a valid siginfo.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigqueueinfo,
                1 as libc::pid_t,
                sig,
                &info as *const libc::siginfo_t,
            )
        }
    } else {
        // SAFETY: kill has no memory-safety preconditions.
        libc::c_long::from(unsafe { libc::kill(1, sig) })
    };
    if rc == 0 {
        say("sent ok");
    } else {
        let e = last_os_error();
        match e.raw_os_error() {
            Some(libc::EPERM) => say("sent EPERM"),
            _ => say(&format!("sent {e}")),
        }
    }
    if watch {
        match wait_signal(&set, Duration::from_millis(1500))? {
            Some(got) => say(&format!("got {got}")),
            None => say("quiet"),
        }
    }
    say("alive");
    if stay {
        sleep_bounded();
    }
    Ok(7)
}

/// `F_SETSIG` (`<fcntl.h>`, Linux): which signal `O_ASYNC` raises. Not in the libc crate.
const F_SETSIG: libc::c_int = 10;

fn sigio_init(args: &[OsString]) -> io::Result<u8> {
    let sig = args
        .first()
        .and_then(|a| a.to_str())
        .and_then(signal_number)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "unknown signal"))?;
    let mut set = empty_sigset();
    // SAFETY: `set` is initialised and `sig` a valid signal.
    unsafe { libc::sigaddset(&mut set, sig) };
    block_raw(&set)?;
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two descriptors.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(last_os_error());
    }
    let [r, w] = fds;
    // SAFETY: fcntl on the pipe we own; F_SETOWN takes a pid, F_SETSIG a signal number.
    let armed = unsafe {
        libc::fcntl(r, libc::F_SETOWN, 1) == 0
            && (sig == libc::SIGIO || libc::fcntl(r, F_SETSIG, sig) == 0)
            && libc::fcntl(r, libc::F_SETFL, libc::O_ASYNC | libc::O_NONBLOCK) == 0
            && libc::write(w, b"x".as_ptr().cast(), 1) == 1
    };
    if armed {
        say("armed ok");
    } else {
        say(&format!("armed {}", last_os_error()));
    }
    match wait_signal(&set, Duration::from_millis(1500))? {
        Some(got) => say(&format!("got {got}")),
        None => say("quiet"),
    }
    say("alive");
    Ok(7)
}

/// The spawn attack: a process of the tenant's uid stops every new process it may signal, as
/// soon as it exists (see the module docs).
fn stop_spawns(args: &[OsString]) -> io::Result<u8> {
    let secs: f64 = parse_arg(args, 0);
    let uid = args
        .iter()
        .position(|a| a == "--uid")
        .map(|i| parse_arg::<u32>(args, i + 1));
    if let Some(uid) = uid {
        // SAFETY: plain credential syscalls on our own process.
        let failed = unsafe {
            libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(uid) != 0
                || libc::setuid(uid) != 0
        };
        if failed {
            return Err(last_os_error());
        }
    }
    let me = std::process::id() as libc::pid_t;
    say("ready");
    let deadline = Instant::now() + Duration::from_secs_f64(secs).min(MAX_SLEEP);
    let mut hits = 0u64;
    let mut buf = [0u8; 32];
    while Instant::now() < deadline {
        let last = match std::fs::File::open("/proc/sys/kernel/ns_last_pid")
            .and_then(|mut f| f.read(&mut buf))
        {
            Ok(n) => std::str::from_utf8(&buf[..n])
                .ok()
                .and_then(|s| s.trim().parse::<libc::pid_t>().ok())
                .unwrap_or(0),
            Err(_) => 0,
        };
        for _ in 0..64 {
            for pid in last..=last.saturating_add(3) {
                if pid <= 1 || pid == me {
                    continue;
                }
                // SAFETY: tgkill takes three integers; a pid we may not signal is refused.
                let r = unsafe { libc::syscall(libc::SYS_tgkill, pid, pid, libc::SIGSTOP) };
                if r == 0 {
                    hits += 1;
                }
            }
        }
    }
    say(&format!("hits={hits}"));
    Ok(0)
}

/// `probe read PATH...`: each file's contents under a `== PATH` line.
fn read_files(paths: &[OsString]) -> io::Result<u8> {
    let mut out = io::stdout().lock();
    for p in paths {
        writeln!(out, "== {}", p.to_string_lossy())?;
        match std::fs::read(p) {
            Ok(bytes) => out.write_all(&bytes)?,
            Err(e) => writeln!(out, "error {e}")?,
        }
        writeln!(out)?;
    }
    out.flush()?;
    Ok(0)
}
