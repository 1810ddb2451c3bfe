//! The harness: start the real agent-shim binary as PID 1 of a fresh PID namespace or as a
//! plain subreaper, talk to it, and always clean up after it.
//!
//! Every wait has a deadline (generous: machines are shared and noisy, so tests assert upper
//! bounds only). On drop, every process a run started is SIGKILLed by pid — through a pidfd,
//! so a recycled pid is never hit — and the one we spawned is reaped; leftovers that outlive
//! the shim are found by an environment marker every descendant inherits.

#![allow(dead_code)] // each test module uses a different part of the harness

pub mod control;
pub mod process;
pub mod pty;
pub mod running;
#[cfg(test)]
mod selftest;

use process::new_marker;
pub use process::{children_of, kill_marked, parent_of, state_of, PidFd, MARKER_VAR};
pub use running::Running;
use running::{spawn_collector, spawn_line_reader};

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// How long a test waits for something that normally takes milliseconds.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// The variable under which a run is CI's: every test must run, none may skip.
pub const CI_VAR: &str = "CI";

/// The variable in which a CI run names, comma-separated, what its machine cannot give (for
/// example `vsock`: no loopback transport in this kernel). A skip for a reason it names is
/// still a skip under CI; `.ci/run` sets it only after probing, and says so loudly.
pub const CI_CANNOT_VAR: &str = "AGENT_SHIM_CI_CANNOT";

/// A test that cannot run: under `CI=true` an error (a skipped test must not pass there), and
/// otherwise a loud `SKIPPED` line and `Ok`. `what` names the missing capability (`root`,
/// `docker`, `python`, `vsock`); `test` is the test's path.
pub fn skip(what: &str, why: &str, test: &str) -> Result<()> {
    let ci = std::env::var(CI_VAR).is_ok_and(|v| v == "true" || v == "1");
    let declared =
        std::env::var(CI_CANNOT_VAR).is_ok_and(|list| list.split(',').any(|w| w.trim() == what));
    if ci && !declared {
        bail!("cannot run under CI ({what}: {why}): {test}");
    }
    eprintln!("SKIPPED ({what}: {why}): {test}");
    Ok(())
}

/// Returns from the test, through [`skip`], when not running as root.
macro_rules! require_root {
    () => {
        if !$crate::support::is_root() {
            return $crate::support::skip("root", "a PID namespace needs root", module_path!());
        }
    };
}
pub(crate) use require_root;

/// Defines a test module with one `#[test]` per mode (`pid1`, `subreaper`) that both run
/// `body(mode)`.
macro_rules! in_both_modes {
    ($(fn $name:ident($mode:ident: $mty:ty) -> $ret:ty $body:block)*) => {$(
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            fn body($mode: $mty) -> $ret $body

            #[test]
            fn pid1() -> ::anyhow::Result<()> {
                $crate::support::require_root!();
                body($crate::support::Mode::Pid1)
            }

            #[test]
            fn subreaper() -> ::anyhow::Result<()> {
                body($crate::support::Mode::Subreaper)
            }
        }
    )*};
}
pub(crate) use in_both_modes;

/// Whether the tests run as root (needed for PID namespaces).
pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail and has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The probe binary built with these tests.
pub fn probe() -> &'static str {
    env!("CARGO_BIN_EXE_probe")
}

/// The agent-shim binary under test: `$AGENT_SHIM_BIN`, else the newest build next to the
/// test executable's target dir (musl release, release, debug — in that order).
pub fn shim_bin() -> Result<PathBuf> {
    workspace_bin(
        "AGENT_SHIM_BIN",
        &[
            "x86_64-unknown-linux-musl/release/agent-shim",
            "release/agent-shim",
            "debug/agent-shim",
        ],
        "`cargo build -p agent-shim` (or `cargo build -p agent-shim --release --target \
         x86_64-unknown-linux-musl`)",
    )
}

/// A binary of the workspace that this test package does not build itself: the path in
/// `env_var` if set, else the first of `candidates` (relative to the test executable's target
/// dir) that exists; the error says how to build it.
pub fn workspace_bin(env_var: &str, candidates: &[&str], how_to_build: &str) -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os(env_var) {
        let bin = PathBuf::from(bin);
        if !bin.is_file() {
            bail!("{env_var}={} is not a file", bin.display());
        }
        return Ok(bin);
    }
    // current_exe = <target>/debug/deps/tests-HASH
    let exe = std::env::current_exe().context("current_exe")?;
    let target = exe
        .ancestors()
        .nth(3)
        .ok_or_else(|| anyhow!("unexpected test executable path {}", exe.display()))?;
    let candidates: Vec<PathBuf> = candidates.iter().map(|c| target.join(c)).collect();
    candidates
        .iter()
        .find(|c| c.is_file())
        .cloned()
        .ok_or_else(|| {
            anyhow!(
                "binary not found (looked at {candidates:?}); build it first with {how_to_build}, \
             or set {env_var} to its path"
            )
        })
}

/// How the shim is started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `unshare --pid --fork --mount-proc SHIM ...`: the shim is PID 1 of a new namespace.
    Pid1,
    /// The shim is started directly: not PID 1, so it makes itself a child subreaper.
    Subreaper,
}

/// A builder for one run of the shim.
#[derive(Debug)]
pub struct Shim {
    mode: Mode,
    args: Vec<OsString>,
    command: Vec<OsString>,
    separator: bool,
    envs: Vec<(OsString, OsString)>,
    stdin: bool,
    tty: bool,
    user: Option<u32>,
    stderr_unread: bool,
    stderr_file: Option<PathBuf>,
    netns: Option<String>,
}

impl Default for Shim {
    fn default() -> Self {
        Self::new()
    }
}

impl Shim {
    /// A shim in PID-1 mode running nothing yet.
    pub fn new() -> Self {
        Shim {
            mode: Mode::Pid1,
            args: Vec::new(),
            command: Vec::new(),
            separator: true,
            envs: Vec::new(),
            stdin: false,
            tty: false,
            user: None,
            stderr_unread: false,
            stderr_file: None,
            netns: None,
        }
    }

    /// Starts in `mode`.
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// The shim is PID 1 of a new PID namespace (the default).
    pub fn pidns(self) -> Self {
        self.mode(Mode::Pid1)
    }

    /// The shim is not PID 1 (a child subreaper).
    pub fn subreaper(self) -> Self {
        self.mode(Mode::Subreaper)
    }

    /// One shim option.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Several shim options.
    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, args: I) -> Self {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// An environment variable for the shim (and so for the child).
    pub fn env(mut self, key: impl AsRef<OsStr>, val: impl AsRef<OsStr>) -> Self {
        self.envs
            .push((key.as_ref().to_owned(), val.as_ref().to_owned()));
        self
    }

    /// The command the shim runs (after `--`).
    pub fn cmd<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, cmd: I) -> Self {
        self.command = cmd.into_iter().map(|a| a.as_ref().to_owned()).collect();
        self
    }

    /// The command is the probe with these arguments.
    pub fn probe<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(self, args: I) -> Self {
        let mut cmd = vec![OsString::from(probe())];
        cmd.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self.cmd(cmd)
    }

    /// Leave out the `--` between the options and the command.
    pub fn no_separator(mut self) -> Self {
        self.separator = false;
        self
    }

    /// Give the shim a pipe as stdin (see [`Running::stdin`]); the default is `/dev/null`.
    pub fn stdin_piped(mut self) -> Self {
        self.stdin = true;
        self
    }

    /// Give the shim a new pseudo-terminal as stdin, stdout and controlling terminal, in a
    /// new session led by `unshare --fork` (so the shim is neither session nor group leader);
    /// stdout lines are read from the terminal's master side.
    pub fn tty(mut self) -> Self {
        self.tty = true;
        self
    }

    /// Run the shim (and so the command) as this uid/gid, via `setpriv`.
    pub fn user(mut self, id: u32) -> Self {
        self.user = Some(id);
        self
    }

    /// Run the shim in the named network namespace (`ip netns exec NAME`, which execs in
    /// place: the process started is still `unshare`, or the shim).
    pub fn netns(mut self, name: &str) -> Self {
        self.netns = Some(name.to_owned());
        self
    }

    /// Nobody reads the shim's stderr (a pipe) until [`Running::read_stderr`] or the end of
    /// the run: a stalled log reader.
    pub fn stderr_unread(mut self) -> Self {
        self.stderr_unread = true;
        self
    }

    /// The shim's stderr is this regular file (created or truncated), not a pipe:
    /// [`Running::stderr`] is then empty, read the file instead.
    pub fn stderr_file(mut self, path: impl AsRef<Path>) -> Self {
        self.stderr_file = Some(path.as_ref().to_owned());
        self
    }

    fn command_line(&self) -> Result<Command> {
        let shim = shim_bin()?;
        let mut argv: Vec<OsString> = Vec::new();
        if let Some(ns) = &self.netns {
            argv.extend(["ip", "netns", "exec", ns.as_str()].map(OsString::from));
        }
        if self.mode == Mode::Pid1 {
            argv.extend(["unshare", "--pid", "--fork", "--mount-proc"].map(OsString::from));
        } else if self.tty {
            // The session leader owning the terminal must not be the shim itself: a shim that
            // forgot to give the child its own group would otherwise pass as the leader's.
            argv.extend(["unshare", "--fork"].map(OsString::from));
        }
        if let Some(id) = self.user {
            argv.extend(
                [
                    "setpriv",
                    &format!("--reuid={id}"),
                    &format!("--regid={id}"),
                    "--clear-groups",
                ]
                .map(OsString::from),
            );
        }
        argv.push(shim.into_os_string());
        argv.extend(self.args.iter().cloned());
        if self.separator {
            argv.push("--".into());
        }
        argv.extend(self.command.iter().cloned());
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        // Hermetic: no AGENT_SHIM_* from the environment of the test run (CI sets some).
        for (key, _) in std::env::vars_os() {
            if key.as_bytes().starts_with(b"AGENT_SHIM_") {
                cmd.env_remove(key);
            }
        }
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        Ok(cmd)
    }

    /// Starts the shim.
    pub fn start(self) -> Result<Running> {
        let mut cmd = self.command_line()?;
        let description = format!("{cmd:?}");
        let marker = new_marker();
        cmd.env(MARKER_VAR, &marker);
        match &self.stderr_file {
            Some(path) => cmd.stderr(
                std::fs::File::create(path)
                    .with_context(|| format!("create {}", path.display()))?,
            ),
            None => cmd.stderr(Stdio::piped()),
        };
        let mut tty_master = None;
        if self.tty {
            let pair = pty::Pty::open()?;
            cmd.stdin(Stdio::from(pair.slave.try_clone()?));
            cmd.stdout(Stdio::from(pair.slave.try_clone()?));
            pty::make_controlling(&mut cmd);
            tty_master = Some(pair.master);
            // `pair.slave` is dropped here: after the spawn only the shim's side holds it,
            // so the master reads EOF (EIO) once every process on the terminal is gone.
        } else {
            cmd.stdin(if self.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            });
            cmd.stdout(Stdio::piped());
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawn {description}"))?;
        drop(cmd); // closes our copies of the terminal's slave side
        let outer =
            PidFd::open(child.id() as libc::pid_t).context("pidfd_open of our own child")?;
        let stdin = child.stdin.take();
        let stdout: Box<dyn Read + Send> = match tty_master {
            Some(master) => Box::new(pty::MasterReader(std::fs::File::from(master))),
            None => Box::new(
                child
                    .stdout
                    .take()
                    .ok_or_else(|| anyhow!("no stdout pipe"))?,
            ),
        };
        let stderr: Box<dyn Read + Send> = match child.stderr.take() {
            Some(pipe) => Box::new(pipe),
            None if self.stderr_file.is_some() => Box::new(std::io::empty()),
            None => bail!("no stderr pipe"),
        };
        let lines = spawn_line_reader(stdout);
        let (stderr_gate, stderr_buf, stderr_done) = if self.stderr_unread {
            let (open, gate) = std::sync::mpsc::channel::<()>();
            let (buf, done) = spawn_collector(running::Gated::new(stderr, gate));
            (Some(open), buf, done)
        } else {
            let (buf, done) = spawn_collector(stderr);
            (None, buf, done)
        };
        let mut running = Running {
            marker,
            mode: self.mode,
            description,
            child,
            outer,
            shim: None,
            stdin,
            lines,
            seen: Vec::new(),
            stdout_closed: false,
            stderr_buf,
            stderr_done,
            stderr_gate,
            status: None,
        };
        running.shim = if self.mode == Mode::Pid1 || self.tty {
            running.find_under_unshare()?
        } else {
            Some(running.outer.try_clone()?)
        };
        Ok(running)
    }

    /// Starts the shim, waits for it to exit (at most `timeout`), and collects its output.
    pub fn run(self, timeout: Duration) -> Result<Output> {
        let mut running = self.start()?;
        let code = running.wait_code(timeout)?;
        Ok(Output {
            code,
            stdout: running.rest_of_stdout(PATIENCE),
            stderr: running.stderr(),
        })
    }
}

/// What a finished run printed.
#[derive(Debug)]
pub struct Output {
    /// The exit code (in PID-1 mode, `unshare` passes the shim's code through).
    pub code: i32,
    /// Every stdout line, without line endings.
    pub stdout: Vec<String>,
    /// All of stderr.
    pub stderr: String,
}

/// A scratch directory removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// A new empty directory under the system temp dir.
    pub fn new(tag: &str) -> Result<Self> {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("agent-shim-test-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        // World-accessible, for the tests that run the shim as an unprivileged user.
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
        Ok(TempDir(dir))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Polls `check` until it returns `Some` or `timeout` passes.
pub fn poll_until<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
