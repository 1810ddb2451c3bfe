//! A running shim: its output, signals to it, waiting for it, and the cleanup on drop.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, ExitStatus};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::{children_of, kill_marked, parent_of, Mode, PidFd, PATIENCE};

/// A running shim. Dropping it SIGKILLs and reaps whatever it started.
#[derive(Debug)]
pub struct Running {
    /// The value of [`MARKER_VAR`] that every process of this run inherits.
    pub(super) marker: String,
    pub(super) mode: Mode,
    pub(super) description: String,
    /// `unshare` in PID-1 mode (and with a terminal), the shim itself otherwise.
    pub(super) child: Child,
    pub(super) outer: PidFd,
    pub(super) shim: Option<PidFd>,
    pub(super) stdin: Option<ChildStdin>,
    pub(super) lines: Receiver<String>,
    pub(super) seen: Vec<String>,
    pub(super) stdout_closed: bool,
    pub(super) stderr_buf: Arc<Mutex<Vec<u8>>>,
    pub(super) stderr_done: Receiver<()>,
    /// While set, stderr is not read ([`Shim::stderr_unread`](super::Shim::stderr_unread)).
    pub(super) stderr_gate: Option<mpsc::Sender<()>>,
    pub(super) status: Option<ExitStatus>,
}

impl Running {
    /// Under `unshare --fork`, the shim is its only child: poll its children list.
    /// `None` if the shim came and went before it was seen (`unshare` has exited then).
    pub(super) fn find_under_unshare(&mut self) -> Result<Option<PidFd>> {
        let upid = self.child.id();
        let path = format!("/proc/{upid}/task/{upid}/children");
        let deadline = Instant::now() + PATIENCE;
        loop {
            let children = std::fs::read_to_string(&path).unwrap_or_default();
            if let Some(pid) = children.split_whitespace().next() {
                let pid: libc::pid_t = pid.parse().context("children list")?;
                // Opened after listing: it counts only if it is still unshare's child
                // (if it exited meanwhile, unshare exits too and is seen below).
                if let Ok(fd) = PidFd::open(pid) {
                    if parent_of(pid) == Some(upid as libc::pid_t) {
                        return Ok(Some(fd));
                    }
                }
            }
            if let Some(status) = self.child.try_wait()? {
                self.status = Some(status);
                return Ok(None);
            }
            if Instant::now() > deadline {
                bail!(
                    "unshare (pid {upid}) started no child within {PATIENCE:?}\n{}",
                    self.context()
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The shim's pid in the host's PID namespace.
    pub fn pid(&self) -> libc::pid_t {
        self.shim.as_ref().map_or(0, PidFd::pid)
    }

    /// Sends `sig` to the shim from outside its PID namespace (so its siginfo says pid 0).
    pub fn signal(&self, sig: libc::c_int) -> Result<()> {
        match &self.shim {
            Some(shim) if shim.signal(sig)? => Ok(()),
            _ => bail!(
                "the shim has already exited; cannot send signal {sig}\n{}",
                self.context()
            ),
        }
    }

    /// Whether the shim is still running.
    pub fn alive(&self) -> bool {
        self.shim.as_ref().is_some_and(PidFd::alive)
    }

    /// The shim's stdin (with [`Shim::stdin_piped`]); drop it to send EOF.
    pub fn stdin(&mut self) -> Option<&mut ChildStdin> {
        self.stdin.as_mut()
    }

    /// Writes to stdin and closes it.
    pub fn write_stdin_and_close(&mut self, data: &[u8]) -> Result<()> {
        let mut stdin = self
            .stdin
            .take()
            .ok_or_else(|| anyhow!("stdin is not piped"))?;
        stdin.write_all(data)?;
        Ok(())
    }

    /// The next stdout line, waiting at most `timeout`.
    pub fn next_line(&mut self, timeout: Duration) -> Result<String> {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => {
                self.seen.push(line.clone());
                Ok(line)
            }
            Err(RecvTimeoutError::Timeout) => {
                bail!("no stdout line within {timeout:?}\n{}", self.context())
            }
            Err(RecvTimeoutError::Disconnected) => {
                self.stdout_closed = true;
                bail!("stdout closed\n{}", self.context())
            }
        }
    }

    /// Waits for the next stdout line and checks that it is exactly `want`.
    pub fn expect_line(&mut self, want: &str, timeout: Duration) -> Result<()> {
        let got = self.next_line(timeout)?;
        if got != want {
            bail!(
                "expected stdout line {want:?}, got {got:?}\n{}",
                self.context()
            );
        }
        Ok(())
    }

    /// Waits for the next stdout line starting with `prefix` (skipping others) and returns
    /// the rest of it.
    pub fn expect_prefix(&mut self, prefix: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.next_line(left)?;
            if let Some(rest) = line.strip_prefix(prefix) {
                return Ok(rest.to_owned());
            }
        }
    }

    /// Every stdout line still to come, until EOF or `timeout`.
    pub fn rest_of_stdout(&mut self, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while !self.stdout_closed {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    out.push(line);
                }
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => self.stdout_closed = true,
            }
        }
        out
    }

    /// Starts reading stderr after [`Shim::stderr_unread`](super::Shim::stderr_unread).
    pub fn read_stderr(&mut self) {
        self.stderr_gate = None;
    }

    /// Everything on stderr so far (after an exit: all of it, waiting a little for the pipe
    /// to drain).
    pub fn stderr(&self) -> String {
        if self.status.is_some() {
            // Bounded: a leftover process may still hold the pipe open.
            let _ = self.stderr_done.recv_timeout(Duration::from_secs(5));
        }
        let buf = self
            .stderr_buf
            .lock()
            .map_or_else(|e| e.into_inner().clone(), |b| b.clone());
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// Waits at most `timeout` for the shim to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                self.status = Some(status);
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "the shim did not exit within {timeout:?}\n{}",
                    self.context()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits at most `timeout` for the shim to exit and returns its exit code.
    pub fn wait_code(&mut self, timeout: Duration) -> Result<i32> {
        let status = self.wait_timeout(timeout)?;
        match status.code() {
            Some(code) => Ok(code),
            None => bail!("the shim was killed: {status:?}\n{}", self.context()),
        }
    }

    /// Waits for the exit and checks the code; returns how long the wait took.
    pub fn expect_exit(&mut self, want: i32, timeout: Duration) -> Result<Duration> {
        let started = Instant::now();
        let code = self.wait_code(timeout)?;
        let took = started.elapsed();
        if code != want {
            bail!("expected exit code {want}, got {code}\n{}", self.context());
        }
        Ok(took)
    }

    /// A description of the run for failure messages.
    pub fn context(&self) -> String {
        let stderr = self
            .stderr_buf
            .lock()
            .map_or_else(|e| e.into_inner().clone(), |b| b.clone());
        format!(
            "  command: {}\n  mode: {:?}\n  stdout so far: {:?}\n  stderr so far: {}",
            self.description,
            self.mode,
            self.seen,
            String::from_utf8_lossy(&stderr)
        )
    }

    /// The pids of the shim's children (host pids), as the kernel lists them.
    pub fn shim_children(&self) -> Vec<libc::pid_t> {
        children_of(self.pid())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // PID-1 mode: SIGKILL to PID 1 kills its whole namespace.
        if let Some(shim) = &self.shim {
            let _ = shim.signal(libc::SIGKILL);
        }
        let _ = self.outer.signal(libc::SIGKILL);
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                _ => break,
            }
        }
        // Whatever outlived the shim (subreaper mode leaves leftovers by design, and a
        // killed shim leaves its whole tree) carries our marker: kill it too.
        kill_marked(&self.marker);
    }
}

/// Reads lines (lossily decoded, without `\r\n`) on a thread and hands them over a channel.
pub(super) fn spawn_line_reader(source: Box<dyn Read + Send>) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(source);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    while matches!(buf.last(), Some(b'\n' | b'\r')) {
                        buf.pop();
                    }
                    if tx.send(String::from_utf8_lossy(&buf).into_owned()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    rx
}

/// Collects a stream into a shared buffer on a thread; the receiver fires at EOF.
/// A reader that reads nothing until its gate opens (its sender sends or is dropped).
pub(crate) struct Gated<R> {
    inner: R,
    gate: Option<Receiver<()>>,
}

impl<R> Gated<R> {
    /// `inner`, read once `gate` opens.
    pub(crate) fn new(inner: R, gate: Receiver<()>) -> Self {
        Gated {
            inner,
            gate: Some(gate),
        }
    }
}

impl<R: Read> Read for Gated<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some(gate) = self.gate.take() {
            let _ = gate.recv();
        }
        self.inner.read(buf)
    }
}

pub(crate) fn spawn_collector(
    mut source: impl Read + Send + 'static,
) -> (Arc<Mutex<Vec<u8>>>, Receiver<()>) {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = mpsc::channel();
    let sink = Arc::clone(&buf);
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = source.read(&mut chunk) {
            if n == 0 {
                break;
            }
            if let Ok(mut b) = sink.lock() {
                b.extend_from_slice(&chunk[..n]);
            }
        }
        let _ = tx.send(());
    });
    (buf, rx)
}
