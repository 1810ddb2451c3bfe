//! Supervisor mode end to end: the real shim (as PID 1, and as a subreaper where cheap)
//! supervising the real echo driver, driven over its control socket
//! (`--control-listen unix:… --control-insecure`) by [`ControlClient`].
//!
//! Timings are made fast by flags ([`FAST`]); every wait is bounded, and the shim, the driver
//! and anything else a test starts are killed by pid when the test ends (see
//! `support::Running`). The Python driver runs when `AGENT_SHIM_PYTHON` names a python with
//! `msgpack`, and is skipped loudly otherwise.

mod backpressure;
mod commands;
mod control_lockout;
mod control_resume;
mod control_transport;
mod driver_exit;
mod exec;
mod faults;
mod hostile;
mod idle;
mod lifecycle;
mod python;
mod relay_rules;
mod robustness;
mod soak;
mod tasks;

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Result};
use driver_protocol::message::{
    DriverExited, DriverReady, DriverState, Event, Exec, ShimToControl, StatusReply, TaskDone,
};
use rmpv::Value;

use crate::support::control::{exec_of, ControlClient, ExecRun, Stamped};
use crate::support::{Mode, Running, Shim, TempDir, PATIENCE};

/// How long a test watches for something that must *not* happen.
pub const QUIET: Duration = Duration::from_millis(1000);

/// The default flags of every test run: fast restarts and liveness, no jitter.
pub const FAST: &[(&str, &str)] = &[
    ("--backoff-initial", "100ms"),
    ("--backoff-jitter", "0"),
    ("--ping-interval", "200ms"),
    ("--ping-misses", "3"),
    ("--ready-timeout", "5s"),
    ("--crash-loop-restarts", "20"),
];

/// Which driver a run supervises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// `echo-driver` (Rust).
    Rust,
    /// `examples/python-driver/echo_driver.py` under `$AGENT_SHIM_PYTHON`.
    Python,
}

impl Driver {
    /// The driver's command line.
    pub fn argv(self) -> Result<Vec<OsString>> {
        match self {
            Driver::Rust => Ok(vec![crate::drivers::echo_driver_bin()?.into_os_string()]),
            Driver::Python => {
                let python = std::env::var_os("AGENT_SHIM_PYTHON")
                    .filter(|p| !p.is_empty())
                    .ok_or_else(|| anyhow!("AGENT_SHIM_PYTHON not set"))?;
                let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("../examples/python-driver/echo_driver.py");
                ensure!(script.is_file(), "missing {}", script.display());
                Ok(vec![python, "-u".into(), script.into_os_string()])
            }
        }
    }
}

/// A shim run to start: flags (the [`FAST`] ones unless overridden), environment, driver.
#[derive(Debug)]
pub struct Setup {
    mode: Mode,
    flags: Vec<(String, Option<String>)>,
    envs: Vec<(String, String)>,
    driver: Option<Vec<OsString>>,
    kind: Driver,
    stderr_unread: bool,
}

impl Setup {
    /// The echo driver (Rust) under a shim in `mode`, with the [`FAST`] flags.
    pub fn new(mode: Mode) -> Setup {
        Setup {
            mode,
            flags: FAST
                .iter()
                .map(|(k, v)| (k.to_string(), Some(v.to_string())))
                .collect(),
            envs: Vec::new(),
            driver: None,
            kind: Driver::Rust,
            stderr_unread: false,
        }
    }

    /// Sets (or replaces) a flag with a value.
    pub fn flag(mut self, name: &str, value: &str) -> Setup {
        match self.flags.iter_mut().find(|(k, _)| k == name) {
            Some(slot) => slot.1 = Some(value.to_owned()),
            None => self.flags.push((name.to_owned(), Some(value.to_owned()))),
        }
        self
    }

    /// Adds a flag without a value (a switch such as `--no-new-privs`).
    pub fn switch(mut self, name: &str) -> Setup {
        if !self.flags.iter().any(|(k, _)| k == name) {
            self.flags.push((name.to_owned(), None));
        }
        self
    }

    /// An environment variable for the shim (and so the driver).
    pub fn env(mut self, key: &str, val: &str) -> Setup {
        self.envs.push((key.to_owned(), val.to_owned()));
        self
    }

    /// Nobody reads the shim's stderr (see [`Shim::stderr_unread`]).
    pub fn stderr_unread(mut self) -> Setup {
        self.stderr_unread = true;
        self
    }

    /// Which echo driver.
    pub fn driver(mut self, kind: Driver) -> Setup {
        self.kind = kind;
        self
    }

    /// Another driver command.
    pub fn driver_cmd<S: Into<OsString>>(mut self, argv: impl IntoIterator<Item = S>) -> Setup {
        self.driver = Some(argv.into_iter().map(Into::into).collect());
        self
    }

    /// Starts the shim, connects, and sends `resume_from{0}`.
    pub fn start(self) -> Result<Sup> {
        let dir = TempDir::new("sup")?;
        let sock = dir.path().join("c.sock");
        let mut args: Vec<OsString> = vec![
            "--control-listen".into(),
            format!("unix:{}", sock.display()).into(),
            "--control-insecure".into(),
        ];
        for (k, v) in &self.flags {
            args.push(k.into());
            if let Some(v) = v {
                args.push(v.into());
            }
        }
        let driver = match self.driver {
            Some(argv) => argv,
            None => self.kind.argv()?,
        };
        let mut shim = Shim::new().mode(self.mode).args(args).cmd(driver);
        for (k, v) in &self.envs {
            shim = shim.env(k, v);
        }
        if self.stderr_unread {
            shim = shim.stderr_unread();
        }
        let running = shim.start()?;
        // A token (file or environment) turns authentication on: use it.
        let from_file = match self.flags.iter().find(|(k, _)| k == "--control-token-file") {
            Some((_, Some(path))) => Some(std::fs::read(path)?.trim_ascii_end().to_vec()),
            _ => None,
        };
        let token = from_file.as_deref().or_else(|| {
            self.envs
                .iter()
                .find(|(k, _)| k == "AGENT_SHIM_TOKEN")
                .map(|(_, v)| v.as_bytes())
        });
        let target = crate::support::control::Target::Unix(sock.clone());
        let mut ctl = match ControlClient::connect_to(&target, token, PATIENCE) {
            Ok(c) => c,
            Err(e) => bail!("{e:#}\n{}", running.context()),
        };
        ctl.resume_from(0)?;
        Ok(Sup {
            ctl,
            shim: running,
            mode: self.mode,
            sock,
            _dir: dir,
        })
    }
}

/// A running shim in supervisor mode and a control connection to it.
///
/// Field order is drop order: the connection, then the shim (killed with everything it
/// started), then the directory of its socket.
pub struct Sup {
    /// The control connection.
    pub ctl: ControlClient,
    /// The shim.
    pub shim: Running,
    /// How the shim runs.
    pub mode: Mode,
    /// The control socket.
    pub sock: PathBuf,
    _dir: TempDir,
}

impl std::fmt::Debug for Sup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sup")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Sup {
    /// The control client's and the shim's state, for failure messages.
    pub fn context(&self) -> String {
        format!("{}{}", self.ctl.context(), self.shim.context())
    }

    /// Waits (at most [`PATIENCE`]) for an event matching `pred`; returns it and the ones
    /// skipped before it.
    pub fn wait(
        &mut self,
        what: &str,
        pred: impl FnMut(&Event) -> bool,
    ) -> Result<(Stamped, Vec<Stamped>)> {
        self.wait_within(what, pred, PATIENCE)
    }

    /// [`wait`](Self::wait) with its own timeout.
    pub fn wait_within(
        &mut self,
        what: &str,
        pred: impl FnMut(&Event) -> bool,
        timeout: Duration,
    ) -> Result<(Stamped, Vec<Stamped>)> {
        match self.ctl.wait_event(pred, timeout) {
            Ok(found) => Ok(found),
            Err(e) => bail!("waiting for {what}: {e:#}\n{}", self.shim.context()),
        }
    }

    /// Waits (at most [`PATIENCE`] in all) until each of `preds` has matched an event, in
    /// any order; returns every event read meanwhile.
    pub fn wait_all(
        &mut self,
        what: &str,
        preds: &[&dyn Fn(&Event) -> bool],
    ) -> Result<Vec<Stamped>> {
        let deadline = Instant::now() + PATIENCE;
        let mut seen: Vec<Stamped> = Vec::new();
        loop {
            let missing = preds.iter().any(|p| !seen.iter().any(|s| p(&s.event)));
            if !missing {
                return Ok(seen);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.ctl.try_next_stamped(left) {
                Ok(Some(s)) => seen.push(s),
                Ok(None) => bail!(
                    "waiting for {what}: not all within {PATIENCE:?}; seen {:?}\n{}",
                    kinds(&seen),
                    self.context()
                ),
                Err(e) => bail!("waiting for {what}: {e:#}\n{}", self.shim.context()),
            }
        }
    }

    /// Waits for `driver_started{attempt}`; returns its pid and when it was read.
    pub fn expect_started(&mut self, attempt: u32) -> Result<(u32, Instant, Vec<Stamped>)> {
        let (s, skipped) = self.wait(&format!("driver_started attempt {attempt}"), |e| {
            matches!(e, Event::DriverStarted(_))
        })?;
        let Event::DriverStarted(started) = &s.event else {
            unreachable!()
        };
        ensure!(
            started.attempt == attempt,
            "driver_started {started:?}, want attempt {attempt}\n{}",
            self.context()
        );
        Ok((started.pid, s.at, skipped))
    }

    /// Waits for `driver_ready` of `pid`.
    pub fn expect_ready(&mut self, pid: u32) -> Result<(DriverReady, Vec<Stamped>)> {
        let (s, skipped) = self.wait("driver_ready", |e| matches!(e, Event::DriverReady(_)))?;
        let Event::DriverReady(ready) = s.event else {
            unreachable!()
        };
        ensure!(
            ready.pid == pid,
            "driver_ready {ready:?} for another pid than {pid}\n{}",
            self.context()
        );
        Ok((ready, skipped))
    }

    /// Waits for `driver_started{attempt}` and its `driver_ready`; the driver's pid.
    pub fn expect_up(&mut self, attempt: u32) -> Result<u32> {
        let (pid, _, _) = self.expect_started(attempt)?;
        self.expect_ready(pid)?;
        Ok(pid)
    }

    /// Waits for `driver_exited`.
    pub fn expect_exited(&mut self) -> Result<(DriverExited, Instant, Vec<Stamped>)> {
        let (s, skipped) = self.wait("driver_exited", |e| matches!(e, Event::DriverExited(_)))?;
        let Event::DriverExited(exited) = s.event else {
            unreachable!()
        };
        Ok((exited, s.at, skipped))
    }

    /// Waits for the `task_done` of `task_id`.
    pub fn expect_done(&mut self, task_id: &str) -> Result<(TaskDone, Instant, Vec<Stamped>)> {
        let (s, skipped) = self.wait(
            &format!("task_done of {task_id}"),
            |e| matches!(e, Event::TaskDone(d) if d.task_id == task_id),
        )?;
        let Event::TaskDone(done) = s.event else {
            unreachable!()
        };
        Ok((done, s.at, skipped))
    }

    /// Waits for the `task_done` of `task_id` (unless it is among `seen`) and for
    /// `driver_started{attempt}`, in either order, then for that driver's `driver_ready`;
    /// the `task_done` and the new driver's pid.
    pub fn done_and_up(
        &mut self,
        task_id: &str,
        seen: &[Stamped],
        attempt: u32,
    ) -> Result<(TaskDone, u32)> {
        let mut all = seen.to_vec();
        let is_done = |e: &Event| done_of(e, task_id);
        let is_started = |e: &Event| matches!(e, Event::DriverStarted(_));
        if !all.iter().any(|s| is_done(&s.event)) {
            all.extend(self.wait_all("task_done and driver_started", &[&is_done, &is_started])?);
        } else {
            all.extend(self.wait("driver_started", is_started)?.1);
        }
        let done = all.iter().find_map(|s| match &s.event {
            Event::TaskDone(d) if d.task_id == task_id => Some(d.clone()),
            _ => None,
        });
        let started = all.iter().find_map(|s| match &s.event {
            Event::DriverStarted(d) => Some(d.clone()),
            _ => None,
        });
        let (Some(done), Some(started)) = (done, started) else {
            bail!(
                "no task_done or driver_started: {:?}\n{}",
                kinds(&all),
                self.context()
            );
        };
        ensure!(
            started.attempt == attempt,
            "{started:?}, want attempt {attempt}"
        );
        self.expect_ready(started.pid)?;
        Ok((done, started.pid))
    }

    /// Submits a task and requires `ok`.
    pub fn submit(&mut self, task_id: &str, input: Value) -> Result<()> {
        match self.ctl.submit(task_id, input) {
            Ok(ShimToControl::Ok(_)) => Ok(()),
            Ok(other) => bail!(
                "submit_task {task_id} answered {other:?}\n{}",
                self.context()
            ),
            Err(e) => bail!("submit_task {task_id}: {e:#}\n{}", self.shim.context()),
        }
    }

    /// Asks for `status`.
    pub fn status(&mut self) -> Result<StatusReply> {
        match self.ctl.status() {
            Ok(s) => Ok(s),
            Err(e) => bail!("status: {e:#}\n{}", self.shim.context()),
        }
    }

    /// Polls `status` until `check` accepts it (at most [`PATIENCE`]).
    pub fn status_until(
        &mut self,
        what: &str,
        mut check: impl FnMut(&StatusReply) -> bool,
    ) -> Result<StatusReply> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let s = self.status()?;
            if check(&s) {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!(
                    "status never showed {what}; last: {s:?}\n{}",
                    self.context()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the exec `make` builds and runs it to its end (then acknowledges everything):
    /// its run, and the other events seen meanwhile.
    pub fn run_to_end(&mut self, make: impl FnOnce(u64) -> Exec) -> Result<(ExecRun, Vec<Event>)> {
        let started = self.ctl.exec_started(make)?;
        let id = started.exec_id;
        let (last, skipped) = self.wait(
            "exec_exit",
            |e| matches!(e, Event::ExecExit(x) if x.exec_id == id),
        )?;
        let mut run = ExecRun::default();
        let mut others = Vec::new();
        for s in skipped.iter().chain([&last]) {
            if exec_of(&s.event) == Some(id) {
                run.take(&s.event)?;
            } else {
                others.push(s.event.clone());
            }
        }
        self.ctl.ack(self.ctl.last_seq())?;
        Ok((run, others))
    }

    /// The host pid of a process the shim reports by its pid in the shim's namespace
    /// (the same number in subreaper mode): one of the shim's children.
    pub fn host_pid(&self, ns_pid: u32) -> Result<libc::pid_t> {
        if self.mode == Mode::Subreaper {
            return Ok(ns_pid as libc::pid_t);
        }
        for child in self.shim.shim_children() {
            let status =
                std::fs::read_to_string(format!("/proc/{child}/status")).unwrap_or_default();
            let inner = status
                .lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .and_then(|l| l.split_whitespace().last())
                .and_then(|p| p.parse::<u32>().ok());
            if inner == Some(ns_pid) {
                return Ok(child);
            }
        }
        bail!(
            "no child of the shim has pid {ns_pid} in its namespace\n{}",
            self.context()
        )
    }
}

/// A task input map from key–value pairs.
pub fn input<const N: usize>(pairs: [(&str, Value); N]) -> Value {
    crate::drivers::input(pairs)
}

/// A task that makes the echo driver exit with `code` at once.
pub fn crash(code: i64) -> Value {
    input([("crash", code.into())])
}

/// Whether `e` is a `message_chunk` of `task_id`.
pub fn chunk_of(e: &Event, task_id: &str) -> bool {
    matches!(e, Event::MessageChunk(c) if c.task_id.as_deref() == Some(task_id))
}

/// Whether `e` is the `task_done` of `task_id`.
pub fn done_of(e: &Event, task_id: &str) -> bool {
    matches!(e, Event::TaskDone(d) if d.task_id == task_id)
}

/// Whether `e` is `state_changed` to `to`.
pub fn state_to(e: &Event, to: DriverState) -> bool {
    matches!(e, Event::StateChanged(s) if s.to == to)
}

/// The event types of `events`, for failure messages.
pub fn kinds(events: &[Stamped]) -> Vec<String> {
    events
        .iter()
        .map(|s| {
            format!(
                "{}:{}",
                s.seq,
                driver_protocol::Message::type_name(&s.event)
            )
        })
        .collect()
}

/// Fails unless the status looks sane for a shim with a ready driver `pid`.
pub fn check_status_ready(s: &StatusReply, pid: u32) -> Result<()> {
    ensure!(s.state == DriverState::Ready, "state: {s:?}");
    ensure!(s.driver_pid == Some(pid), "driver_pid: {s:?}");
    ensure!(s.children >= 1, "children: {s:?}");
    ensure!(s.execs_running == 0, "execs_running: {s:?}");
    ensure!(
        s.rss_bytes > 0 && s.rss_bytes < 64 << 20,
        "rss_bytes: {s:?}"
    );
    ensure!(s.buffered_events <= s.last_seq, "buffered_events: {s:?}");
    Ok(())
}

/// Reads and acknowledges events until `pred` matches one (at most [`PATIENCE`]); returns
/// every event read.
fn ack_until(sup: &mut Sup, what: &str, pred: impl Fn(&Event) -> bool) -> Result<Vec<Stamped>> {
    let deadline = Instant::now() + PATIENCE;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match sup.ctl.try_next_stamped(left)? {
            Some(s) => {
                sup.ctl.ack(s.seq)?;
                let hit = pred(&s.event);
                seen.push(s);
                if hit {
                    return Ok(seen);
                }
            }
            None => bail!(
                "no {what} within {PATIENCE:?}; last kinds {:?}\n{}",
                kinds(&seen[seen.len().saturating_sub(20)..]),
                sup.context()
            ),
        }
    }
}
