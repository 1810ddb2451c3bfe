//! The driver conformance suite: the behaviour `examples/README.md` specifies for the echo
//! drivers, checked against each of them by a fake shim.
//!
//! The fake shim does what the real one will do at a driver's start: it makes a unix
//! socketpair, starts the driver with one end inherited (its number in `AGENT_SHIM_FD`),
//! and speaks the shim's side of the protocol with `driver_protocol::blocking`. Every read
//! has a deadline (a read timeout on the socket), and the driver is SIGKILLed and reaped by
//! pid when the test ends, however it ends.
//!
//! Every scenario is written once and runs against both drivers (see [`conformance!`]):
//! `Rust` is the `echo-driver` binary (`$AGENT_SHIM_ECHO_DRIVER`, else
//! `<target>/debug/echo-driver`: build it with `cargo build -p agent-shim-examples`);
//! `Python` is `$AGENT_SHIM_PYTHON examples/python-driver/echo_driver.py`, skipped loudly
//! when `AGENT_SHIM_PYTHON` (a python with `msgpack`) is not set.

mod control;
mod exec;
mod lifecycle;
mod tasks;

use std::io::Read;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use driver_protocol::blocking::{FrameReader, FrameWriter};
use driver_protocol::message::{
    DriverToShim, Hello, Ping, Ready, RequestId, Role, ShimToDriver, Task, TaskDone,
};
use driver_protocol::DecodeError;
use rmpv::Value;

pub use crate::support::PATIENCE;

/// How long a test watches for something that must *not* happen.
pub const QUIET: Duration = Duration::from_millis(700);

/// A driver under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// `examples/src/bin/echo-driver.rs`.
    Rust,
    /// `examples/python-driver/echo_driver.py`.
    Python,
}

/// The variable naming the python (with `msgpack`) that runs the Python driver.
const PYTHON_VAR: &str = "AGENT_SHIM_PYTHON";

impl Driver {
    /// Whether the Python driver can run here.
    pub fn python_available() -> bool {
        std::env::var_os(PYTHON_VAR).is_some_and(|p| !p.is_empty())
    }

    /// The `software` of the driver's `hello`.
    pub fn software(self) -> &'static str {
        match self {
            Driver::Rust => "echo-driver",
            Driver::Python => "python-echo-driver",
        }
    }

    fn command(self) -> Result<Command> {
        match self {
            Driver::Rust => Ok(Command::new(echo_driver_bin()?)),
            Driver::Python => {
                let python =
                    std::env::var_os(PYTHON_VAR).ok_or_else(|| anyhow!("{PYTHON_VAR} not set"))?;
                let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("../examples/python-driver/echo_driver.py");
                if !script.is_file() {
                    bail!("the Python driver is missing: {}", script.display());
                }
                let mut cmd = Command::new(python);
                cmd.arg("-u").arg(script);
                Ok(cmd)
            }
        }
    }
}

/// The Rust echo driver: `$AGENT_SHIM_ECHO_DRIVER`, else `<target>/debug/echo-driver` next
/// to the test executable.
pub(crate) fn echo_driver_bin() -> Result<PathBuf> {
    crate::support::workspace_bin(
        "AGENT_SHIM_ECHO_DRIVER",
        &["debug/echo-driver"],
        "`cargo build -p agent-shim-examples`",
    )
}

/// Defines a test module per scenario, with a test per driver (`rust`, `python`) that both
/// run `body(driver)`.
macro_rules! conformance {
    ($(fn $name:ident($driver:ident: Driver) -> Result<()> $body:block)*) => {$(
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            fn body($driver: $crate::drivers::Driver) -> ::anyhow::Result<()> $body

            #[test]
            fn rust() -> ::anyhow::Result<()> {
                body($crate::drivers::Driver::Rust)
            }

            #[test]
            fn python() -> ::anyhow::Result<()> {
                if !$crate::drivers::Driver::python_available() {
                    return $crate::support::skip(
                        "python",
                        "AGENT_SHIM_PYTHON not set",
                        module_path!(),
                    );
                }
                body($crate::drivers::Driver::Python)
            }
        }
    )*};
}
pub(crate) use conformance;

/// Receives the next message and matches it against a pattern, or fails with what came.
macro_rules! recv {
    ($shim:expr, $pat:pat => $out:expr) => {{
        let msg = $shim.recv()?;
        #[allow(unused_variables)]
        match msg {
            $pat => $out,
            other => ::anyhow::bail!(
                "expected {}, got {:?}\n{}",
                stringify!($pat),
                other,
                $shim.context()
            ),
        }
    }};
    ($shim:expr, $pat:pat) => {
        $crate::drivers::recv!($shim, $pat => ())
    };
}
pub(crate) use recv;

/// Receives messages until one matches the pattern, pushing the others onto `$events`.
macro_rules! skip_to {
    ($shim:expr, $events:expr, $pat:pat => $out:expr) => {{
        loop {
            match $shim.recv()? {
                $pat => break $out,
                other => $events.push(other),
            }
        }
    }};
}
pub(crate) use skip_to;

/// The shim's side of one driver's link.
pub struct FakeShim {
    driver: Driver,
    child: Child,
    status: Option<ExitStatus>,
    reader: FrameReader<UnixStream>,
    writer: FrameWriter<UnixStream>,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    next_id: RequestId,
}

impl std::fmt::Debug for FakeShim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeShim")
            .field("driver", &self.driver)
            .field("pid", &self.child.id())
            .finish_non_exhaustive()
    }
}

impl FakeShim {
    /// Starts `driver` with the link inherited, and `envs` set; no handshake yet.
    pub fn spawn(driver: Driver, envs: &[(&str, &str)]) -> Result<FakeShim> {
        let (ours, theirs) = UnixStream::pair().context("socketpair")?;
        let mut cmd = driver.command()?;
        let fd = theirs.as_raw_fd();
        cmd.env("AGENT_SHIM_FD", fd.to_string());
        Self::spawn_with(driver, cmd, envs, Some(&theirs), ours)
    }

    /// Starts `driver` without `AGENT_SHIM_FD` (the returned shim's link is dead).
    pub fn spawn_without_fd(driver: Driver) -> Result<FakeShim> {
        let (ours, _theirs) = UnixStream::pair().context("socketpair")?;
        let cmd = driver.command()?;
        Self::spawn_with(driver, cmd, &[], None, ours)
    }

    fn spawn_with(
        driver: Driver,
        mut cmd: Command,
        envs: &[(&str, &str)],
        inherit: Option<&UnixStream>,
        ours: UnixStream,
    ) -> Result<FakeShim> {
        // Hermetic: nothing of the test run's AGENT_SHIM_* or ECHO_* reaches the driver.
        for (key, _) in std::env::vars_os() {
            let k = key.as_bytes();
            if (k.starts_with(b"AGENT_SHIM_") && k != b"AGENT_SHIM_FD") || k.starts_with(b"ECHO_") {
                cmd.env_remove(&key);
            }
        }
        cmd.envs(envs.iter().copied());
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(sock) = inherit {
            let fd = sock.as_raw_fd();
            // Clear FD_CLOEXEC in the child only: cleared in this process, the fd would also
            // leak into children that other tests of this process spawn meanwhile, and keep
            // the link open after the driver exits.
            // SAFETY: the closure runs between fork and exec and calls only fcntl, which is
            // async-signal-safe; `fd` stays open in the parent until after the spawn.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().with_context(|| format!("spawn {cmd:?}"))?;
        let stdout = collect(child.stdout.take());
        let stderr = collect(child.stderr.take());
        let writer = FrameWriter::new(ours.try_clone()?);
        Ok(FakeShim {
            driver,
            child,
            status: None,
            reader: FrameReader::new(ours),
            writer,
            stdout,
            stderr,
            next_id: 1000,
        })
    }

    /// Starts `driver` and completes the handshake: its `hello` is checked, ours is the
    /// shim's, and its first `ready` is read.
    pub fn start(driver: Driver) -> Result<FakeShim> {
        Self::start_with(driver, &[])
    }

    /// [`start`](Self::start) with environment variables for the driver.
    pub fn start_with(driver: Driver, envs: &[(&str, &str)]) -> Result<FakeShim> {
        let mut shim = Self::spawn(driver, envs)?;
        shim.send(Hello::new(Role::Shim, "fake-shim", "0"))?;
        shim.expect_driver_hello()?;
        let ready = recv!(shim, DriverToShim::Ready(r) => r);
        anyhow::ensure!(
            ready == Ready { re: None },
            "first ready has a re: {ready:?}"
        );
        Ok(shim)
    }

    /// Reads the driver's `hello` and checks it.
    pub fn expect_driver_hello(&mut self) -> Result<Hello> {
        let hello = recv!(self, DriverToShim::Hello(h) => h);
        let ok = hello.protocol == "agent-shim"
            && hello.versions == [1]
            && hello.role == Role::Driver
            && hello.software == self.driver.software();
        anyhow::ensure!(ok, "unexpected driver hello {hello:?}\n{}", self.context());
        Ok(hello)
    }

    /// A fresh request id.
    pub fn id(&mut self) -> RequestId {
        self.next_id += 1;
        self.next_id
    }

    /// Sends one message.
    pub fn send(&mut self, msg: impl Into<ShimToDriver>) -> Result<()> {
        self.writer
            .send(&msg.into())
            .with_context(|| format!("send to the driver\n{}", self.context()))
    }

    /// Sends a task with this id and input.
    pub fn send_task(&mut self, task_id: &str, input: Value) -> Result<()> {
        self.send(Task {
            task_id: task_id.into(),
            input,
            output_schema: None,
            timeout_ms: None,
            attempt: 1,
        })
    }

    /// Sends a frame whose body is `value`, encoded as is (for messages the crate cannot
    /// encode, such as unknown types).
    pub fn send_value(&mut self, value: &Value) -> Result<()> {
        let mut body = Vec::new();
        rmpv::encode::write_value(&mut body, value)?;
        self.writer.write_frame(&body)?;
        self.writer.flush()?;
        Ok(())
    }

    /// Sends `ping` and expects the matching `pong` next.
    pub fn ping(&mut self) -> Result<()> {
        let id = self.id();
        self.send(Ping { id })?;
        let pong = recv!(self, DriverToShim::Pong(p) => p);
        anyhow::ensure!(pong.re == id, "pong for {id} has re {}", pong.re);
        Ok(())
    }

    /// The next message from the driver, waiting at most [`PATIENCE`].
    pub fn recv(&mut self) -> Result<DriverToShim> {
        match self.recv_within(PATIENCE)? {
            Some(msg) => Ok(msg),
            None => bail!("no message within {PATIENCE:?}\n{}", self.context()),
        }
    }

    /// The next message, or `None` if none comes within `timeout`. End of stream and bad
    /// frames are errors.
    pub fn recv_within(&mut self, timeout: Duration) -> Result<Option<DriverToShim>> {
        match self.read_within(timeout)? {
            Ok(msg) => Ok(msg),
            Err(e) => {
                Err(anyhow!(e).context(format!("reading from the driver\n{}", self.context())))
            }
        }
    }

    /// Like [`recv_within`](Self::recv_within), but hands decoding errors back: `Ok(Ok(Some))`
    /// is a message, `Ok(Ok(None))` a timeout, `Ok(Err(e))` a frame the driver got wrong;
    /// `Err` is end of stream or an I/O error.
    pub fn read_within(
        &mut self,
        timeout: Duration,
    ) -> Result<std::result::Result<Option<DriverToShim>, DecodeError>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Ok(None));
            }
            self.reader.get_ref().set_read_timeout(Some(left))?;
            match self.reader.read_message::<DriverToShim>() {
                Ok(Some(msg)) => return Ok(Ok(Some(msg))),
                Ok(None) => bail!("the driver closed the link\n{}", self.context()),
                Err(DecodeError::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(DecodeError::Io(e)) => {
                    return Err(anyhow!(e).context(format!("reading\n{}", self.context())))
                }
                Err(e) => return Ok(Err(e)),
            }
        }
    }

    /// Checks that the driver sends nothing for [`QUIET`].
    pub fn expect_quiet(&mut self) -> Result<()> {
        if let Some(msg) = self.recv_within(QUIET)? {
            bail!("expected silence, got {msg:?}\n{}", self.context());
        }
        Ok(())
    }

    /// Reads the task's events until its `task_done`; returns the events before it.
    pub fn until_done(&mut self, task_id: &str) -> Result<(Vec<DriverToShim>, TaskDone)> {
        let mut events = Vec::new();
        loop {
            match self.recv()? {
                DriverToShim::TaskDone(done) if done.task_id == task_id => {
                    return Ok((events, done))
                }
                other => events.push(other),
            }
        }
    }

    /// Closes the link both ways (the driver reads end of stream).
    pub fn close(&mut self) -> Result<()> {
        self.reader.get_ref().shutdown(Shutdown::Both)?;
        Ok(())
    }

    /// Waits at most [`PATIENCE`] for the driver to exit; its exit code.
    pub fn wait_code(&mut self) -> Result<i32> {
        let deadline = Instant::now() + PATIENCE;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                bail!(
                    "the driver did not exit within {PATIENCE:?}\n{}",
                    self.context()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        self.status = Some(status);
        match status.code() {
            Some(code) => Ok(code),
            None => bail!(
                "the driver died of signal {:?}\n{}",
                status.signal(),
                self.context()
            ),
        }
    }

    /// Waits for the driver to exit and checks its code.
    pub fn expect_exit(&mut self, want: i32) -> Result<()> {
        let code = self.wait_code()?;
        anyhow::ensure!(
            code == want,
            "exit code {code}, want {want}\n{}",
            self.context()
        );
        Ok(())
    }

    /// Whether the driver is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Everything the driver wrote to stdout so far.
    pub fn stdout(&self) -> String {
        text_of(&self.stdout)
    }

    /// Everything the driver wrote to stderr so far.
    pub fn stderr(&self) -> String {
        text_of(&self.stderr)
    }

    /// Which driver, its pid, and its stderr: for failure messages.
    pub fn context(&self) -> String {
        format!(
            "driver {:?} (pid {}), stderr:\n{}",
            self.driver,
            self.child.id(),
            self.stderr()
        )
    }
}

impl Drop for FakeShim {
    fn drop(&mut self) {
        if self.status.is_none() {
            // Killed by pid, then reaped: the pid stays ours until the wait.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn text_of(buf: &Arc<Mutex<Vec<u8>>>) -> String {
    buf.lock()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Collects a pipe into a buffer on a thread, until end of file.
fn collect(source: Option<impl Read + Send + 'static>) -> Arc<Mutex<Vec<u8>>> {
    match source {
        Some(source) => crate::support::running::spawn_collector(source).0,
        None => Arc::default(),
    }
}

/// A task input map from key–value pairs.
pub fn input<const N: usize>(pairs: [(&str, Value); N]) -> Value {
    Value::Map(
        pairs
            .into_iter()
            .map(|(k, v)| (Value::from(k), v))
            .collect(),
    )
}

/// A MessagePack array of strings.
pub fn strings(items: &[&str]) -> Value {
    Value::Array(items.iter().map(|s| Value::from(*s)).collect())
}
