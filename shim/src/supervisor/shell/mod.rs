//! The shell: supervisor mode's one async loop, which does all the I/O and lets the
//! [`Core`] decide.
//!
//! Each turn hands the core's outputs to the world (frames for the driver, events for the
//! control server, launches), then waits in one `select!` for the next input: a signal
//! ([`signalfd`]), a control command, the driver's socket or pipes ([`link`]), or the nearest
//! deadline. Once the core has an exit code, buffered events get a last chance to be
//! delivered.

mod errcopy;
mod exec;
mod link;
mod signalfd;
mod spawning;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use driver_protocol::message::{
    ControlToShim, Event, LogStream, Message, MetricsReply, Oom, ProcRole, Resume, ShimToControl,
};
use driver_protocol::DEFAULT_MAX_FRAME;
use nix::sys::signal::SigSet;
use tracing::{debug, info, warn};

use crate::cgroups::{Delegation, ExecCgroup};
use crate::cli::Config;
use crate::control::{ControlConfig, ControlServer, Endpoints, Token};
use crate::metrics::procs::Leader;
use crate::metrics::Sampler;
use crate::oom::OomCounter;
use crate::reaper::{ExitStatus, Reaper};
use crate::sys::{Real, Sys};

use self::errcopy::ErrCopy;
use self::exec::{exec_ready, ExecIoState, Ready};
use self::link::{link_readable, link_writable, pipe_readable, relay, Link, OutPipe};
use self::signalfd::Signals;
use self::spawning::{spawn_ready, Spawning};
use super::core::{Core, Counters, Output};
use super::loglines::RateLimiter;
use super::{Owner, SupervisorError};

/// After the driver's final exit, how long buffered events may take to be acknowledged.
const FINAL_DRAIN: Duration = Duration::from_secs(2);

/// At exit, how long driver output queued for our stderr may take to be written.
const ERROUT_DRAIN: Duration = Duration::from_millis(200);

/// While the event buffer is full, how often waiting control requests are taken.
const FULL_RECHECK: Duration = Duration::from_millis(20);

/// Everything the loop owns besides the core.
struct Shell<'a> {
    cfg: &'a Config,
    mask: SigSet,
    core: Core,
    reaper: &'a mut Reaper<Owner>,
    control: Option<ControlServer>,
    link: Option<Link>,
    outs: [Option<OutPipe>; 2],
    driver_pid: i32,
    rate: RateLimiter,
    /// The stream of the last line the rate limit refused (for the "suppressed" event).
    suppressed_stream: LogStream,
    /// The non-blocking copy of driver output lines to our stderr.
    errout: ErrCopy,
    /// The core was told that the driver is not read (the event buffer is full).
    reading_paused: bool,
    reaped: u64,
    /// The I/O of every running exec, by exec id.
    execs: BTreeMap<u64, ExecIoState>,
    /// Where the next look for exec I/O starts (round robin).
    exec_cursor: u64,
    /// Where exec output is read into: each chunk is split off as the `data` of its
    /// `exec_output` (no copy), and the storage is reused once the chunk is encoded.
    exec_buf: bytes::BytesMut,
    /// Children forked but not yet known to have exec'd.
    spawning: Vec<Spawning>,
    /// The sandbox cgroup's OOM-kill counter.
    oom: OomCounter,
    /// Where the reply of the control command being executed goes.
    replying: Option<crate::control::Reply>,
    /// The exec requests given to the core, oldest first, waiting for its verdict
    /// ([`Output::ExecAdmitted`] or [`Output::ExecRefused`], in the same order).
    admitting: std::collections::VecDeque<(driver_protocol::message::Exec, spawning::ReplyTo)>,
    /// The body of the driver event given to the core, while its outputs are carried out
    /// ([`Output::RelayEvent`]).
    held_event: Option<bytes::Bytes>,
    /// The file operations (`fs_*` requests).
    files: crate::fs::Files,
    /// The sources of `metrics` readings, opened before any child runs.
    sampler: Sampler,
    /// When the next periodic `metrics` event is due (`--metrics-interval`).
    metrics_due: Option<Instant>,
    /// Where execs get cgroups of their own, if anywhere.
    delegation: Delegation,
    /// The cgroup of each exec that has one: exec id, pid, cgroup (a few entries: a `Vec`
    /// costs less code in the static binary than another `BTreeMap`).
    cgroups: Vec<(u64, i32, ExecCgroup)>,
    /// Cgroups of ended execs not yet empty enough to remove.
    stale_cgroups: Vec<ExecCgroup>,
    /// The cgroup of the driver's current launch, if it has one.
    driver_cgroup: Option<ExecCgroup>,
    /// Launches of the driver so far (names its cgroups).
    launches: u64,
}

pub(super) async fn shell(
    cfg: &Config,
    token: Option<Token>,
    mask: SigSet,
    reaper: &mut Reaper<Owner>,
) -> Result<(i32, Option<Instant>), SupervisorError> {
    let signals = Signals::open()?;
    // Before any child runs, and before the control server, whose `hello` tells the cgroup
    // mode. The OOM counter and the readings' files are those of the sandbox's cgroup as it
    // was before the delegation moved the shim into a leaf of it (or, at the root of a
    // microVM's hierarchy, the cgroup the delegation made for the sandbox).
    let proc_cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let delegation = Delegation::detect(&proc_cgroup);
    let sandbox = delegation.sandbox().unwrap_or(&proc_cgroup);
    let oom = OomCounter::open(sandbox);
    let sampler = Sampler::open(
        cfg.sup
            .workdir
            .as_deref()
            .unwrap_or_else(|| std::path::Path::new(".")),
        sandbox,
    );
    let endpoints = Endpoints {
        listen: cfg.sup.control_listen.clone(),
        connect: cfg.sup.control_connect.clone(),
    };
    let control = if endpoints == Endpoints::default() {
        None
    } else {
        let secure = token.is_some();
        let ccfg = ControlConfig {
            max_events: cfg.sup.event_buffer,
            max_bytes: cfg.sup.event_buffer_bytes,
            max_frame: DEFAULT_MAX_FRAME,
            agent_id: cfg.sup.agent_id.clone().or_else(crate::sys::hostname),
            token,
            reconnect_max: cfg.sup.control_reconnect_max,
            idle_timeout: cfg.sup.control_idle_timeout,
            max_sessions: cfg.sup.max_sessions,
            max_consumers: cfg.sup.max_consumers,
            registry: crate::control::RegistryConfig {
                retain: cfg.sup.exec_retain,
                history: cfg.sup.exec_history,
                ttl: cfg.sup.exec_history_ttl,
            },
            cgroups: Some(delegation.mode().name()),
        };
        let server = ControlServer::start(&endpoints, ccfg).map_err(SupervisorError::Control)?;
        if let Some(addr) = &endpoints.listen {
            info!(%addr, secure, "control link listening");
        }
        if let Some(addr) = &endpoints.connect {
            info!(%addr, secure, "control link dialing out");
        }
        Some(server)
    };
    let now = Instant::now();
    let seed = seed();
    let mut sh = Shell {
        cfg,
        mask,
        core: Core::new(Real.getpid(), &super::core::Settings::from(cfg), now, seed),
        reaper,
        control,
        link: None,
        outs: [None, None],
        driver_pid: 0,
        rate: RateLimiter::new(cfg.sup.log_rate),
        suppressed_stream: LogStream::Stderr,
        errout: ErrCopy::open(),
        reading_paused: false,
        reaped: 0,
        execs: BTreeMap::new(),
        exec_cursor: 0,
        exec_buf: bytes::BytesMut::new(),
        spawning: Vec::new(),
        oom,
        replying: None,
        admitting: std::collections::VecDeque::new(),
        held_event: None,
        files: crate::fs::Files::new(
            &cfg.sup.fs_root,
            cfg.sup.core.user,
            cfg.sup.limits.umask,
            crate::fs::Limits {
                ops: cfg.sup.fs_max_ops,
                watches: cfg.sup.fs_max_watches,
                watch_rate: cfg.sup.fs_watch_rate,
            },
        ),
        sampler,
        metrics_due: cfg.sup.metrics_interval.map(|i| now + i),
        delegation,
        cgroups: Vec::new(),
        stale_cgroups: Vec::new(),
        driver_cgroup: None,
        launches: 0,
    };
    sh.core.start();
    loop {
        let published = sh.last_seq();
        // Frames left in the read buffer while the event buffer was full (a no-op if none).
        sh.decode_frames(false);
        if sh.core.idle_enabled() {
            // After every input: notices work that ended (idle detection).
            sh.core.idle_tick(Instant::now());
        }
        sh.apply_outputs();
        if let Some(code) = sh.core.exit_code() {
            let kill_deadline = sh.core.kill_deadline();
            sh.flush_errout().await;
            sh.final_drain().await;
            return Ok((code, kill_deadline));
        }
        let full = sh.control.as_ref().is_some_and(ControlServer::is_full);
        if full != sh.reading_paused {
            sh.reading_paused = full;
            if full {
                sh.core.reading_paused(Instant::now());
            } else {
                sh.core.reading_resumed(Instant::now());
                sh.restart_stall_clock();
            }
        }
        let deadline = sh.core.next_deadline();
        let stall = sh.stall_deadline();
        let reading = sh.link_reading() && !full;
        let writing = sh.link_writing();
        let copying = sh.errout.pending();
        let gate = sh.exec_gate();
        let spawn_deadline = sh.spawn_deadline();
        if !full {
            // Lines counted while the event buffer was full are reported once it has room.
            sh.flush_suppressed(Instant::now());
        }
        // Not `biased`: a driver that always has something to say must not starve the
        // timers (cancel grace, pings) or the control connection.
        tokio::select! {
            r = signals.next() => match r {
                Ok(infos) => {
                    for info in infos {
                        if info.signo != libc::SIGCHLD {
                            sh.core.on_signal(&info, Instant::now());
                        }
                        // After every signal, not only SIGCHLD (see init.rs).
                        sh.reap();
                    }
                }
                Err(err) => {
                    warn!(%err, "waiting for signals failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    sh.reap();
                }
            },
            step = control_step(&mut sh.control, full) => {
                if let Some(cmd) = step {
                    sh.on_command(cmd);
                }
            }
            r = link_readable(&sh.link), if reading => {
                if let Err(err) = r {
                    debug!(%err, "driver socket");
                }
                sh.read_link();
            }
            r = link_writable(&sh.link), if writing => {
                if let Err(err) = r {
                    debug!(%err, "driver socket");
                }
                sh.write_link();
            }
            r = pipe_readable(&sh.outs[0]) => {
                if let Err(err) = r {
                    debug!(%err, "driver stdout");
                }
                sh.read_pipe(0);
            }
            r = pipe_readable(&sh.outs[1]) => {
                if let Err(err) = r {
                    debug!(%err, "driver stderr");
                }
                sh.read_pipe(1);
            }
            () = sleep_until(deadline) => {
                sh.core.on_timer(Instant::now());
            }
            () = sh.errout.flush(), if copying => {}
            ready = exec_ready(&sh.execs, gate, sh.exec_cursor) => match ready {
                Ready::Read(id, n) => {
                    sh.exec_cursor = id.wrapping_add(1);
                    sh.exec_read(id, n, false);
                }
                Ready::Write(id) => {
                    sh.exec_cursor = id.wrapping_add(1);
                    sh.exec_write(id);
                }
            },
            (pid, outcome) = spawn_ready(&mut sh.spawning) => {
                sh.spawn_done(pid, outcome);
            }
            () = sleep_until(spawn_deadline) => {
                sh.spawn_timeouts(Instant::now());
            }
            () = sleep_until(stall) => {
                sh.write_link();
            }
            () = sleep_until(sh.rate.suppressed_due()), if !full => {
                sh.flush_suppressed(Instant::now());
            }
            // files: a watch's event (held back while the event buffer is full)
            evs = sh.files.next_events(), if !full => {
                for ev in evs {
                    match ev {
                        crate::fs::FileEvent::Typed(ev) => sh.publish(&ev),
                        crate::fs::FileEvent::Raw(body) => relay(&mut sh.control, &body),
                    }
                }
            }
            () = sleep_until(sh.metrics_due), if !full => {
                sh.periodic_metrics(Instant::now());
            }
        }
        if sh.last_seq() != published {
            // The connection's writer is another task: it runs only once this one waits.
            // With a driver or a tool that always has more to read, that would be when the
            // runtime's budget runs out, after megabytes read and buffered while the control
            // plane sat idle. Letting it write what this turn published keeps both ends busy.
            tokio::task::yield_now().await;
        }
    }
}

/// A PRNG seed for the backoff jitter: the wall clock's nanoseconds and our pid.
fn seed() -> u64 {
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    u64::from(wall) ^ (u64::from(std::process::id()) << 32)
}

/// The next request; while the event buffer is `full`, also returns `None` when it has room
/// again (so reading the driver resumes at once), taking waiting requests at least every
/// [`FULL_RECHECK`].
async fn control_step(
    control: &mut Option<ControlServer>,
    full: bool,
) -> Option<crate::control::Command> {
    let Some(c) = control else {
        return std::future::pending().await;
    };
    if !full {
        return Some(c.next_command().await);
    }
    // Polls the request queue once without waiting (next_command is cancel-safe).
    if let Ok(cmd) = tokio::time::timeout(Duration::ZERO, c.next_command()).await {
        return Some(cmd);
    }
    let _ = tokio::time::timeout(FULL_RECHECK, c.not_full()).await;
    None
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

impl Shell<'_> {
    /// The seq of the last event published (0 without a control server or before any).
    fn last_seq(&self) -> u64 {
        self.control.as_ref().map_or(0, |c| c.stats().last_seq)
    }

    /// The figures of a `status_reply` that only the shell can read.
    fn counters(&self) -> Counters {
        let stats = self.control.as_ref().map(ControlServer::stats);
        Counters {
            // As PID 1 the namespace's /proc is ours and small: count every child, adopted
            // orphans included. As a subreaper on a host, scanning every process of the
            // host per `status` would not scale: the core's count stands.
            children: (std::process::id() == 1)
                .then(|| self.sampler.children_of(1))
                .flatten(),
            reaped: self.reaped,
            buffered_events: stats.as_ref().map_or(0, |st| st.events),
            buffered_bytes: stats.as_ref().map_or(0, |st| st.bytes),
            last_seq: stats.as_ref().map_or(0, |st| st.last_seq),
            rss_bytes: self.sampler.own_rss_bytes(),
            cgroups: Some(self.delegation.mode().name()),
        }
    }

    /// Carries out what the core asked for, until it asks for nothing more.
    fn apply_outputs(&mut self) {
        loop {
            let outs = self.core.take_outputs();
            if outs.is_empty() {
                break;
            }
            for out in outs {
                match out {
                    Output::ToDriver(msg) => self.queue_for_driver(&msg),
                    Output::Event(ev) => self.publish(&ev),
                    Output::Relay(body) => relay(&mut self.control, &body),
                    Output::RelayEvent => match self.held_event.take() {
                        Some(body) => relay(&mut self.control, &body),
                        None => debug!("a relay without an event"),
                    },
                    Output::Launch => self.launch(),
                    Output::StopReading => self.stop_reading(),
                    Output::StartExec(req) => self.driver_exec(*req),
                    Output::ExecAdmitted { id, owner, user } => self.exec_admitted(id, owner, user),
                    Output::ExecRefused(code, message) => self.exec_refused(code, message),
                    Output::ExecInput(m) => self.exec_input(m),
                    Output::ExecResize(id, size) => self.exec_resize(id, size),
                    Output::ExecStop(id) => self.exec_stop(id),
                    Output::ExecEnded(exit) => {
                        if let Some(control) = &self.control {
                            control.exec_ended(&exit);
                        }
                    }
                    Output::CloseDriverLink => {
                        self.close_driver_io();
                        self.core.on_driver_link_closed(Instant::now());
                    }
                    Output::Kill(kill) => {
                        kill.apply(&Real);
                        if let super::core::Kill::Exec {
                            pid,
                            sig: libc::SIGKILL,
                        } = kill
                        {
                            self.kill_exec_cgroup(pid);
                        }
                    }
                    Output::Reply(reply) => match self.replying.take() {
                        Some(to) => to.send(*reply),
                        None => debug!("a reply without a command"),
                    },
                }
            }
        }
        self.forget_finished_execs();
        // Try to send at once; what does not fit waits for writability.
        self.write_link();
    }

    fn publish(&mut self, ev: &Event) {
        match self.control.as_mut() {
            Some(c) => {
                c.publish(ev);
            }
            None => debug!(event = ev.type_name(), "event (no control socket)"),
        }
    }

    /// Reaps whatever exited and tells the core (which asks for the driver's last output to
    /// be read before it decides on the driver's exit).
    fn reap(&mut self) {
        let mut exits = Vec::new();
        let d = self
            .reaper
            .drain(&Real, |pid, owner, status| exits.push((pid, owner, status)));
        self.reaped = self.reaped.saturating_add(d.reaped);
        for (pid, owner, status) in exits {
            // A child reaped before its spawn was decided: decided now, before its exit.
            self.spawn_reaped(pid);
            let oom_killed = self.oom_reading(pid, status);
            match owner {
                Owner::Driver => {
                    let mut oom_killed = oom_killed;
                    if self.driver_pid == pid {
                        if let Some(cg) = self.driver_cgroup.take() {
                            // Its own counter says exactly; then nothing of it outlives it.
                            if status == ExitStatus::Signaled(libc::SIGKILL) {
                                oom_killed = cg.oom_kills().map(|n| n > 0).or(oom_killed);
                            }
                            cg.kill();
                            self.retire_cgroup(cg);
                        }
                    }
                    self.core.on_driver_exit_oom(pid, status, oom_killed);
                }
                Owner::Exec(id) => {
                    // With a cgroup of its own, its own counter says exactly.
                    let own = self
                        .cgroups
                        .iter()
                        .find(|(e, ..)| *e == id)
                        .and_then(|(_, _, cg)| cg.oom_kills())
                        .filter(|_| status == ExitStatus::Signaled(libc::SIGKILL))
                        .map(|n| n > 0);
                    self.core
                        .on_exec_exit_oom(id, status, own.or(oom_killed), Instant::now())
                }
            }
            self.apply_outputs();
        }
        if !self.stale_cgroups.is_empty() {
            self.stale_cgroups.retain(|cg| !cg.remove());
        }
    }

    /// Reads the sandbox's OOM-kill counter after a tracked child ended: an `oom` event when
    /// it rose; for a `SIGKILL` death, whether it rose (`None`: the counter cannot be read, or
    /// the child did not die of `SIGKILL`).
    fn oom_reading(&mut self, pid: i32, status: ExitStatus) -> Option<bool> {
        let rise = self.oom.check()?;
        if let Some(r) = rise {
            warn!(
                pid,
                ?status,
                oom_kills = r.kills,
                new = r.new_kills,
                "the OOM killer killed processes in the sandbox"
            );
            self.publish(&Event::Oom(Oom {
                kills: r.kills,
                new_kills: r.new_kills,
            }));
        }
        (status == ExitStatus::Signaled(libc::SIGKILL)).then_some(rise.is_some())
    }

    fn on_command(&mut self, cmd: crate::control::Command) {
        let Some(cmd) = self.files.handle(cmd) else {
            return;
        };
        let Some(cmd) = self.exec_command(cmd) else {
            return;
        };
        let now = Instant::now();
        match cmd.request {
            ControlToShim::Status(s) => {
                let counters = self.counters();
                self.replying = Some(cmd.reply);
                self.core.on_status(s.id, now, &counters);
            }
            ControlToShim::SetClock(s) => {
                let jump = crate::sys::set_clock(s.unix_ms);
                let reply = self.core.clock_set(s.id, s.unix_ms, jump, now);
                cmd.reply.send(reply);
                self.apply_outputs();
            }
            ControlToShim::Resume(Resume {
                id,
                unix_ms: Some(unix_ms),
                ..
            }) => {
                // The clock first, then the driver (see `Core::resume_at`).
                let reply = self.core.resume_at(id, unix_ms, crate::sys::set_clock, now);
                cmd.reply.send(reply);
            }
            ControlToShim::Metrics(m) => {
                let reading = self.sample();
                cmd.reply
                    .send(ShimToControl::MetricsReply(MetricsReply::new(
                        m.id, reading,
                    )));
            }
            request => {
                // The core's reply (an output) goes here, before its other outputs.
                self.replying = Some(cmd.reply);
                self.core.on_command(request, now);
            }
        }
        self.apply_outputs();
        if self.replying.take().is_some() {
            warn!("the core did not answer a control command");
        }
    }

    /// A resource reading of the sandbox, the driver and every running exec.
    fn sample(&mut self) -> driver_protocol::message::Reading {
        let mut leaders: Vec<Leader> = Vec::with_capacity(1 + self.core.execs_running());
        if let Some(pid) = self.core.driver_pid() {
            leaders.push(Leader {
                role: ProcRole::Driver,
                exec_id: None,
                pid,
            });
        }
        leaders.extend(self.core.exec_pids().map(|(id, pid)| Leader {
            role: ProcRole::Exec,
            exec_id: Some(id),
            pid,
        }));
        self.sampler.read(&leaders)
    }

    /// `--metrics-interval`: publishes a reading as a `metrics` event and sets the next one.
    /// A late turn does not make up for missed ones (no burst after a freeze).
    fn periodic_metrics(&mut self, now: Instant) {
        let Some(interval) = self.cfg.sup.metrics_interval else {
            self.metrics_due = None;
            return;
        };
        let reading = self.sample();
        self.publish(&Event::Metrics(reading));
        let mut next = self.metrics_due.unwrap_or(now) + interval;
        if next <= now {
            next = now + interval;
        }
        self.metrics_due = Some(next);
    }

    /// Gives driver output still queued for our stderr a last, bounded chance.
    async fn flush_errout(&mut self) {
        let errout = &mut self.errout;
        let flush = async {
            while errout.pending() {
                errout.flush().await;
            }
        };
        if tokio::time::timeout(ERROUT_DRAIN, flush).await.is_err() {
            debug!("stderr does not take the last driver output");
        }
    }

    /// Delivers buffered events before exiting: at most [`FINAL_DRAIN`], and only while a
    /// control connection is live.
    async fn final_drain(&mut self) {
        let Some(c) = self.control.as_ref() else {
            return;
        };
        if c.connected() && c.stats().events > 0 && !c.drain(FINAL_DRAIN).await {
            warn!("exiting with unacknowledged events");
        }
    }
}
