//! Starting the processes a figure measures, reading their memory, and always cleaning up.
//!
//! An init runs either as PID 1 of a fresh PID namespace (`unshare --pid --fork --kill-child
//! --mount-proc INIT …`, the way a container runtime starts it) or directly as our child (the
//! subreaper case). Every process is held by a [`Proc`] guard that SIGKILLs it by pid and reaps
//! it on drop, and every wait is bounded.

use std::ffi::OsString;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// A started process (and, in PID-1 mode, the init inside the namespace), killed and reaped
/// on drop.
#[derive(Debug)]
pub struct Proc {
    /// The process we spawned (`unshare` in PID-1 mode).
    pub child: Child,
    /// The pid of the init under test, as seen from here: the namespace's PID 1 in PID-1
    /// mode, else the child itself.
    pub pid: i32,
    reaped: Option<ExitStatus>,
}

impl Proc {
    /// Waits at most `timeout` for the spawned process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus> {
        if let Some(st) = self.reaped {
            return Ok(st);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().context("waitpid")? {
                self.reaped = Some(st);
                return Ok(st);
            }
            if Instant::now() >= deadline {
                bail!("pid {} still running after {timeout:?}", self.child.id());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Sends `sig` to the init under test.
    pub fn signal(&self, sig: libc::c_int) -> Result<()> {
        signal(self.pid, sig)
    }

    /// SIGTERM, then SIGKILL after `grace`; reaps.
    pub fn stop(&mut self, grace: Duration) {
        if self.reaped.is_some() {
            return;
        }
        let _ = self.signal(libc::SIGTERM);
        if self.wait_timeout(grace).is_err() {
            self.kill();
        }
    }

    /// SIGKILLs the init and the spawned process, and reaps.
    pub fn kill(&mut self) {
        if self.reaped.is_some() {
            return;
        }
        let _ = signal(self.pid, libc::SIGKILL);
        let _ = self.child.kill();
        let _ = self.wait_timeout(Duration::from_secs(10));
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `kill(pid, sig)`.
pub fn signal(pid: i32, sig: libc::c_int) -> Result<()> {
    if pid <= 0 {
        bail!("refusing to signal pid {pid}");
    }
    // SAFETY: kill has no memory preconditions; pid is a positive, single process.
    if unsafe { libc::kill(pid, sig) } != 0 {
        return Err(std::io::Error::last_os_error()).context(format!("kill({pid}, {sig})"));
    }
    Ok(())
}

/// The children of `pid` (from `/proc/PID/task/PID/children`).
pub fn children_of(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Polls `check` every `every` until it gives `Some` or `timeout` passes.
pub fn poll<T>(
    timeout: Duration,
    every: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// A field of `/proc/PID/status` in kB (`VmRSS`, `RssAnon`…).
pub fn status_kb(pid: i32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// How an init is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// PID 1 of a fresh PID namespace, through `unshare`.
    Pid1,
    /// Directly our child (the init makes itself a subreaper, or is told to).
    Direct,
}

/// What to start: a program, its arguments, and how to connect stdio.
#[derive(Debug)]
pub struct Spec {
    /// The program and its arguments (init options, `--`, the command).
    pub argv: Vec<OsString>,
    /// How it is started.
    pub mode: Mode,
    /// Capture stdout through a pipe (else `/dev/null`).
    pub stdout: bool,
    /// Let stderr through to ours (else `/dev/null`).
    pub stderr: bool,
}

impl Spec {
    /// `argv` started in `mode`, stdio to `/dev/null`.
    pub fn new(mode: Mode, argv: Vec<OsString>) -> Self {
        Spec {
            argv,
            mode,
            stdout: false,
            stderr: false,
        }
    }

    /// Starts it; in PID-1 mode, waits (bounded) until the namespace's init exists.
    pub fn start(self) -> Result<Proc> {
        let mut argv: Vec<OsString> = Vec::new();
        if self.mode == Mode::Pid1 {
            argv.extend(
                ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"].map(OsString::from),
            );
        }
        argv.extend(self.argv.iter().cloned());
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| anyhow!("empty command line"))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(if self.stdout {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(if self.stderr {
                Stdio::inherit()
            } else {
                Stdio::null()
            });
        // Hermetic: no AGENT_SHIM_* or TINI_* settings from the environment of the run.
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k.starts_with("AGENT_SHIM_") || k.starts_with("TINI_") || k.starts_with("DUMB_INIT_")
            {
                cmd.env_remove(&key);
            }
        }
        let child = cmd.spawn().with_context(|| format!("spawn {argv:?}"))?;
        let outer = child.id() as i32;
        let mut proc = Proc {
            child,
            pid: outer,
            reaped: None,
        };
        if self.mode == Mode::Pid1 {
            let init = poll(Duration::from_secs(10), Duration::from_micros(200), || {
                children_of(outer).first().copied()
            });
            match init {
                Some(pid) => proc.pid = pid,
                None => bail!("no init appeared under unshare ({argv:?}) within 10 s"),
            }
        }
        Ok(proc)
    }
}

/// A named pipe in `dir`, opened for reading without blocking on a writer.
pub fn fifo(dir: &Path, name: &str) -> Result<(std::path::PathBuf, std::fs::File)> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: `c` is a valid NUL-terminated path.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(std::io::Error::last_os_error()).context(format!("mkfifo {}", path.display()));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    Ok((path, file))
}

/// Reads exactly `buf.len()` bytes from a non-blocking `file`, waiting at most `timeout` in
/// all; `Ok(false)` on timeout or end of file.
pub fn read_exact_within(file: &std::fs::File, buf: &mut [u8], timeout: Duration) -> Result<bool> {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let deadline = Instant::now() + timeout;
    let mut got = 0;
    let mut reader = file;
    while got < buf.len() {
        match reader.read(&mut buf[got..]) {
            Ok(0) => {
                // A FIFO with no writer reads 0: wait for one to open it.
                if Instant::now() >= deadline {
                    return Ok(false);
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(false);
                }
                let mut pfd = libc::pollfd {
                    fd: file.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                let ms = left.as_millis().clamp(1, 1000) as libc::c_int;
                // SAFETY: `pfd` is one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, ms) };
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("read"),
        }
    }
    Ok(true)
}

/// CPU time (user + system) of `pid` so far, in milliseconds, from `/proc/PID/stat`.
pub fn cpu_ms(pid: i32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields are counted after its closing parenthesis.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (hz > 0.0).then(|| (utime + stime) * 1000.0 / hz)
}

/// CPU time of the calling thread so far, in milliseconds.
pub fn thread_cpu_ms() -> f64 {
    // SAFETY: `ru` is a valid, writable rusage.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}
