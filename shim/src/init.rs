//! Plain init mode: run one command, reap everything, forward signals, exit with its status.
//!
//! This is a synchronous loop, like tini's, with no async runtime: plain mode must cost no
//! more memory and start no slower than tini. Every signal but the fault signals is blocked
//! before the fork and dequeued with `sigtimedwait`, whose timeout is the nearest deadline
//! (the `--grace` SIGKILL, the cleanup SIGKILL), so the loop sleeps in the kernel until
//! something happens.
//!
//! ```text
//!  block signals ─► fork child ─► register pid ─► wait ≤ --spawn-timeout for its execve
//!                                                 (else SIGKILL, reap, exit 124)
//!                                               ─► loop: sigtimedwait(deadline)
//!                                                        first SETTLE quiet → release code pages
//!                                                        SIGCHLD     → drain the reaper
//!                                                        TERM/INT    → forward, arm --grace
//!                                                        TSTP/TTIN/TTOU → forward, stop self
//!                                                        other       → forward (--rewrite)
//!                                                        deadline    → SIGKILL everything
//!  child reaped ─► (PID 1) SIGTERM all, wait ≤ --cleanup-grace, SIGKILL all, reap ─► exit
//! ```

use std::ffi::OsString;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::SigSet;
use thiserror::Error;
use tracing::{debug, info, info_span, warn};

use crate::cli::Config;
use crate::reaper::{ExitStatus, Reaper};
use crate::signals::{self, Admission, Origin};
use crate::spawn::{self, Prepared, SpawnError, Spec};
use crate::sys::{Real, SigInfo, Sys};

// Removed from the child's environment (main has already scrubbed it from ours): the
// control-plane token never reaches children.
use crate::cli::TOKEN_VAR;

/// After the final SIGKILL as PID 1, how long to wait for the last exits before giving up
/// (a process stuck in uninterruptible sleep). Exiting PID 1 kills them anyway.
const FINAL_REAP_LIMIT: Duration = Duration::from_secs(5);

/// Quiet time after which start-up counts as over: the first `sigtimedwait` that waits this
/// long without a signal releases the mappings of the code start-up ran
/// ([`Sys::release_startup_pages`]). A short-lived child exits before it, so it costs such a
/// run nothing.
const SETTLE: Duration = Duration::from_millis(100);

/// Pause after an unexpected `sigtimedwait` error, so a persistent one cannot spin the CPU.
const ERROR_BACKOFF: Duration = Duration::from_millis(10);

/// The exit code when the command did not reach its `execve` within `--spawn-timeout`
/// (like `timeout(1)`'s).
pub const SPAWN_TIMEOUT_EXIT: i32 = 124;

/// Why plain init mode could not run the command at all.
#[derive(Debug, Error)]
pub enum InitError {
    /// Blocking the signals failed.
    #[error("cannot block signals")]
    Signals(#[source] Errno),
    /// The command could not be started.
    #[error(transparent)]
    Spawn(#[from] SpawnError),
}

impl InitError {
    /// The shim's exit code for this error: 127 not found, 126 not executable, 124 the
    /// child did not reach its `execve` within `--spawn-timeout`, 125 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            InitError::Spawn(SpawnError::NotFound { .. }) => 127,
            InitError::Spawn(SpawnError::NotExecutable { .. }) => 126,
            InitError::Spawn(SpawnError::Timeout { .. }) => SPAWN_TIMEOUT_EXIT,
            _ => 125,
        }
    }
}

/// Runs `cfg.command` under plain init mode on the real kernel; returns the exit code.
pub fn run(cfg: &Config) -> Result<i32, InitError> {
    let sys = Real;
    let span = info_span!("init");
    let _enter = span.enter();

    let own_pid = sys.getpid();
    let pid1 = own_pid == 1;
    if !pid1 {
        if let Err(err) = sys.set_child_subreaper() {
            warn!(%err, "cannot become a child subreaper: orphans will not be reaped by us");
        }
    }
    let original_mask = signals::block_all(&sys).map_err(InitError::Signals)?;
    // The child shares our stderr: on a terminal it can suspend output (`tcflow(TCOOFF)`), and
    // a blocking log line (say, about the signal it then sends us) would freeze PID 1. Log
    // lines that do not fit are dropped instead. Without a reopenable stderr they block as
    // before (fd 2's own flags are the child's too, so they are not changed).
    match crate::logging::reopen_stderr_nonblocking() {
        Ok(fd) => crate::logging::use_nonblocking_stderr(fd),
        Err(err) => debug!(%err, "log lines keep a blocking stderr"),
    }
    let own_score = crate::oom::protect_self(crate::oom::Report::Quiet);

    let env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| k.as_os_str() != TOKEN_VAR)
        .collect();
    let mut spec = Spec::new(cfg.command.clone(), env);
    spec.mask = original_mask;
    // The command gets back the value the shim started with, like under tini.
    spec.limits.oom_score_adj = own_score
        .filter(|s| s.now != s.original)
        .map(|s| s.original);
    let prepared = Prepared::new(&spec)?;

    let mut reaper = Reaper::new();
    // No drain may happen between the fork and this registration (see `reaper`): both are
    // right here, on this thread.
    let mut pending = spawn::start(&prepared)?;
    let child = pending.pid();
    reaper.register(child, ());
    // Nothing else runs yet, so this waits (bounded) for the child's execve; signals stay
    // pending meanwhile and are handled by the loop. A child stuck before its execve is
    // killed at the deadline.
    if let Err(err) = pending.wait(cfg.spawn_timeout) {
        reap_one(&sys, &mut reaper, child);
        return Err(err.into());
    }
    info!(pid = child, pid1, command = ?cfg.command, "child started");

    let mut init = Init {
        sys: &sys,
        cfg,
        own_pid,
        pid1,
        child,
        status: None,
        reaper,
        set: signals::handled_set(),
        grace_deadline: None,
        admission: Admission::new(own_pid, cfg.allow_internal_signals),
        released: false,
    };
    let status = init.wait_for_child();
    info!(pid = child, ?status, "child exited");
    if pid1 {
        init.cleanup();
    } else {
        init.drain();
    }
    debug!(orphans = init.reaper.orphans_reaped(), "exiting");
    Ok(cfg.exit_code(status.code()))
}

/// How long a child that failed to start (or was killed for not starting) may take to be
/// reaped before the shim exits anyway.
const FAILED_REAP_LIMIT: Duration = Duration::from_secs(1);

/// Reaps `child` (which failed at or before its `execve`, or was killed), waiting at most
/// [`FAILED_REAP_LIMIT`] for its SIGCHLD.
fn reap_one<S: Sys>(sys: &S, reaper: &mut Reaper<()>, child: i32) {
    let mut set = SigSet::empty();
    set.add(nix::sys::signal::Signal::SIGCHLD);
    let deadline = Instant::now().checked_add(FAILED_REAP_LIMIT);
    loop {
        let mut done = false;
        let d = reaper.drain(sys, |pid, (), _| done |= pid == child);
        if done || d.no_children {
            return;
        }
        let left = deadline.map_or(Duration::ZERO, |d| {
            d.saturating_duration_since(Instant::now())
        });
        if left.is_zero() {
            warn!(
                pid = child,
                "the child that failed to start was not reaped in time"
            );
            return;
        }
        let _ = sys.sigtimedwait(&set, Some(left));
    }
}

/// The state of the plain-mode loop, generic over the kernel for testing.
struct Init<'a, S: Sys> {
    sys: &'a S,
    cfg: &'a Config,
    own_pid: i32,
    pid1: bool,
    child: i32,
    status: Option<ExitStatus>,
    reaper: Reaper<()>,
    set: SigSet,
    grace_deadline: Option<Instant>,
    admission: Admission,
    /// Whether start-up's code mappings have been released (see [`SETTLE`]).
    released: bool,
}

impl<S: Sys> Init<'_, S> {
    /// Loops until the child has been reaped; returns its status.
    fn wait_for_child(&mut self) -> ExitStatus {
        loop {
            if let Some(status) = self.status {
                return status;
            }
            let grace = self
                .grace_deadline
                .map(|d| d.saturating_duration_since(Instant::now()));
            let settle = (!self.released).then_some(SETTLE);
            let timeout = match (grace, settle) {
                (Some(g), Some(s)) => Some(g.min(s)),
                (g, s) => g.or(s),
            };
            match self.sys.sigtimedwait(&self.set, timeout) {
                Ok(Some(info)) => {
                    self.on_signal(&info);
                    // sigtimedwait hands out the lowest-numbered pending signal first, so a
                    // flood of, say, SIGHUP (1) could keep SIGCHLD (17) waiting forever: reap
                    // after every signal, not only after SIGCHLD.
                    if info.signo != libc::SIGCHLD {
                        self.drain();
                    }
                }
                Ok(None) => {
                    self.drain();
                    if !self.released && self.status.is_none() {
                        self.released = true;
                        // Logged first: formatting a line runs code all over the binary.
                        debug!("start-up is over: releasing its code mappings");
                        self.sys.release_startup_pages();
                    }
                }
                Err(Errno::EINTR) => {}
                Err(err) => {
                    warn!(%err, "sigtimedwait failed");
                    std::thread::sleep(ERROR_BACKOFF);
                    self.drain();
                }
            }
            if self.status.is_none() && self.grace_deadline.is_some_and(|d| Instant::now() >= d) {
                self.grace_deadline = None;
                warn!(grace = ?self.cfg.grace, pid = self.child, "grace period over, sending SIGKILL");
                self.kill_all(libc::SIGKILL);
            }
        }
    }

    /// Reaps what is ready, noting the child's status.
    fn drain(&mut self) -> bool {
        let child = self.child;
        let status = &mut self.status;
        let d = self.reaper.drain(self.sys, |pid, (), st| {
            if pid == child {
                *status = Some(st);
            }
        });
        d.no_children
    }

    fn on_signal(&mut self, info: &SigInfo) {
        let sig = info.signo;
        if sig == libc::SIGCHLD {
            self.drain();
            return;
        }
        let Some(admitted) = self
            .admission
            .admit(info, &self.cfg.rewrites, Instant::now())
        else {
            return;
        };
        let fwd = admitted.signal;
        self.forward(fwd);
        let stopping = |s: i32| s == libc::SIGTERM || s == libc::SIGINT;
        if (stopping(admitted.received) || stopping(fwd)) && self.grace_deadline.is_none() {
            self.grace_deadline = Instant::now().checked_add(self.cfg.grace);
            debug!(grace = ?self.cfg.grace, "stop requested, grace period started");
        }
        let job_control = [libc::SIGTSTP, libc::SIGTTIN, libc::SIGTTOU];
        if job_control.contains(&fwd) && !self.pid1 {
            // Like dumb-init: stop ourselves too, so the shell that sent it sees the job
            // stopped; its SIGCONT is forwarded when we are continued.
            if let Err(err) = self.sys.kill(self.own_pid, libc::SIGSTOP) {
                warn!(%err, "cannot stop ourselves");
            }
        }
    }

    /// Sends `sig` to the child, or to its group with `--pgroup`.
    fn forward(&self, sig: i32) {
        let target = if self.cfg.pgroup {
            -self.child
        } else {
            self.child
        };
        debug!(signal = %signals::name(sig), target, "forwarding signal");
        match self.sys.kill(target, sig) {
            Ok(()) => {}
            // The group may be gone while the child lives on in another group.
            Err(Errno::ESRCH) if self.cfg.pgroup => {
                if let Err(err) = self.sys.kill(self.child, sig) {
                    debug!(%err, pid = self.child, "cannot forward signal");
                }
            }
            Err(err) => debug!(%err, target, "cannot forward signal"),
        }
    }

    /// SIGKILL (or `sig`) to everything we are responsible for: the whole namespace as
    /// PID 1, else the child and its process group.
    fn kill_all(&self, sig: i32) {
        let targets: &[i32] = if self.pid1 {
            &[-1]
        } else {
            &[-self.child, self.child]
        };
        for &target in targets {
            match self.sys.kill(target, sig) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(err) => warn!(%err, target, signal = %signals::name(sig), "kill failed"),
            }
        }
    }

    /// As PID 1, after the child exited: see [`cleanup_after_child`].
    fn cleanup(&mut self) {
        let sys = self.sys;
        let cfg = self.cfg;
        let grace_deadline = self.grace_deadline;
        let set = self.set;
        let mut drain = || self.drain();
        cleanup_after_child(sys, cfg, &set, grace_deadline, &mut drain);
    }
}

/// As PID 1, after the main child (plain mode's command, supervisor mode's driver) is gone:
/// SIGTERM everything left, wait at most `--cleanup-grace` (never past a running `--grace`
/// deadline), SIGKILL, reap until ECHILD. `drain` reaps what is ready and says whether no
/// children are left; `set` is the blocked signal set, dequeued with `sigtimedwait` (a stop
/// request from outside ends the waiting early).
pub fn cleanup_after_child<S: Sys>(
    sys: &S,
    cfg: &Config,
    set: &SigSet,
    grace_deadline: Option<Instant>,
    drain: &mut dyn FnMut() -> bool,
) {
    if drain() {
        return;
    }
    let own_pid = sys.getpid();
    match sys.kill(-1, libc::SIGTERM) {
        Ok(()) => info!("child exited; sent SIGTERM to the remaining processes"),
        Err(Errno::ESRCH) => {
            // Nothing left alive; collect any zombies and go.
            drain();
            return;
        }
        Err(err) => warn!(%err, "cannot SIGTERM the remaining processes"),
    }
    let now = Instant::now();
    let mut deadline = now.checked_add(cfg.cleanup_grace).unwrap_or(now);
    if let Some(g) = grace_deadline {
        deadline = deadline.min(g);
    }
    let mut killed = false;
    loop {
        if drain() {
            return;
        }
        let now = Instant::now();
        if now >= deadline {
            if killed {
                warn!("processes survived SIGKILL; exiting anyway");
                return;
            }
            warn!(cleanup_grace = ?cfg.cleanup_grace, "processes left after the child exited; sending SIGKILL");
            match sys.kill(-1, libc::SIGKILL) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(err) => warn!(%err, "kill(-1, SIGKILL) failed"),
            }
            killed = true;
            deadline = now.checked_add(FINAL_REAP_LIMIT).unwrap_or(now);
            continue;
        }
        match sys.sigtimedwait(set, Some(deadline.saturating_duration_since(now))) {
            Ok(Some(info)) => {
                let stop = info.signo == libc::SIGTERM || info.signo == libc::SIGINT;
                let origin = signals::origin(&info, own_pid, true, cfg.allow_internal_signals);
                if stop && origin == Origin::Accepted && !killed {
                    debug!("stop requested during cleanup: no more waiting");
                    deadline = now;
                }
            }
            Ok(None) | Err(Errno::EINTR) => {}
            Err(err) => {
                warn!(%err, "sigtimedwait failed");
                std::thread::sleep(ERROR_BACKOFF);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signals::Rewrites;
    use crate::sys::fake::Fake;

    fn init<'a>(sys: &'a Fake, cfg: &'a Config, pid1: bool) -> Init<'a, Fake> {
        let mut reaper = Reaper::new();
        reaper.register(100, ());
        Init {
            sys,
            cfg,
            own_pid: sys.pid,
            pid1,
            child: 100,
            status: None,
            reaper,
            set: signals::handled_set(),
            grace_deadline: None,
            admission: Admission::new(sys.pid, cfg.allow_internal_signals),
            released: false,
        }
    }

    fn sig(signo: i32, pid: i32, uid: u32) -> SigInfo {
        SigInfo {
            signo,
            code: libc::SI_USER,
            pid,
            uid,
        }
    }

    #[test]
    fn forwards_rewrites_and_arms_grace() {
        let sys = Fake {
            pid: 7,
            ..Fake::default()
        };
        let cfg = Config {
            rewrites: Rewrites::new(vec![(libc::SIGHUP, 0), (libc::SIGUSR1, libc::SIGUSR2)]),
            ..Config::default()
        };
        let mut i = init(&sys, &cfg, false);
        i.on_signal(&sig(libc::SIGHUP, 0, 0));
        i.on_signal(&sig(libc::SIGUSR1, 0, 0));
        assert!(i.grace_deadline.is_none());
        i.on_signal(&sig(libc::SIGTERM, 0, 0));
        assert!(i.grace_deadline.is_some());
        assert_eq!(
            *sys.kills.borrow(),
            vec![(100, libc::SIGUSR2), (100, libc::SIGTERM)]
        );
    }

    #[test]
    fn pgroup_targets_the_group_and_job_control_stops_us() {
        let sys = Fake {
            pid: 7,
            ..Fake::default()
        };
        let cfg = Config {
            pgroup: true,
            ..Config::default()
        };
        let mut i = init(&sys, &cfg, false);
        i.on_signal(&sig(libc::SIGTSTP, 0, 0));
        assert_eq!(
            *sys.kills.borrow(),
            vec![(-100, libc::SIGTSTP), (7, libc::SIGSTOP)]
        );
        // As PID 1 we never stop ourselves.
        let sys = Fake {
            pid: 1,
            ..Fake::default()
        };
        let mut i = init(&sys, &cfg, true);
        i.on_signal(&sig(libc::SIGTSTP, 0, 0));
        assert_eq!(*sys.kills.borrow(), vec![(-100, libc::SIGTSTP)]);
    }

    #[test]
    fn internal_and_self_signals_are_not_forwarded() {
        let sys = Fake {
            pid: 1,
            ..Fake::default()
        };
        let cfg = Config::default();
        let mut i = init(&sys, &cfg, true);
        i.on_signal(&sig(libc::SIGTERM, 55, 1000));
        i.on_signal(&sig(libc::SIGPIPE, 1, 0));
        assert!(sys.kills.borrow().is_empty());
        assert!(i.grace_deadline.is_none());
        i.on_signal(&sig(libc::SIGTERM, 55, 0));
        assert_eq!(*sys.kills.borrow(), vec![(100, libc::SIGTERM)]);
    }

    #[test]
    fn a_forged_outside_signal_is_not_forwarded_as_pid1() {
        let sys = Fake {
            pid: 1,
            ..Fake::default()
        };
        let cfg = Config::default();
        let mut i = init(&sys, &cfg, true);
        // rt_sigqueueinfo lets the sender write si_pid 0 and si_uid 0 with SI_QUEUE.
        let forged = SigInfo {
            code: libc::SI_QUEUE,
            ..sig(libc::SIGTERM, 0, 0)
        };
        i.on_signal(&forged);
        assert!(sys.kills.borrow().is_empty());
        assert!(i.grace_deadline.is_none());
    }

    #[test]
    fn sigchld_drains_and_records_the_child() {
        let sys = Fake::with_waits(
            7,
            [
                Ok(Some((555, ExitStatus::Exited(0)))),
                Ok(Some((100, ExitStatus::Exited(42)))),
            ],
        );
        sys.signals.borrow_mut().push_back(Ok(Some(SigInfo {
            signo: libc::SIGCHLD,
            code: libc::CLD_EXITED,
            pid: 100,
            uid: 0,
        })));
        let cfg = Config::default();
        let mut i = init(&sys, &cfg, false);
        assert_eq!(i.wait_for_child(), ExitStatus::Exited(42));
        assert_eq!(i.reaper.orphans_reaped(), 1);
    }

    #[test]
    fn a_signal_flood_cannot_starve_reaping() {
        // The child's exit is ready, but sigtimedwait keeps returning lower-numbered signals
        // (here our own SIGPIPEs) and never SIGCHLD.
        let sys = Fake::with_waits(1, [Ok(Some((100, ExitStatus::Exited(4))))]);
        for _ in 0..3 {
            sys.signals
                .borrow_mut()
                .push_back(Ok(Some(sig(libc::SIGPIPE, 1, 0))));
        }
        let cfg = Config::default();
        let mut i = init(&sys, &cfg, true);
        assert_eq!(i.wait_for_child(), ExitStatus::Exited(4));
        assert_eq!(
            sys.signals.borrow().len(),
            2,
            "reaped after the first signal"
        );
        assert!(sys.kills.borrow().is_empty());
    }

    #[test]
    fn start_up_mappings_are_released_once_after_a_quiet_wait() {
        // A signal, then a quiet wait (release), another quiet wait, then the child's exit.
        let sys = Fake::with_waits(
            7,
            [
                Ok(None),
                Ok(None),
                Ok(None),
                Ok(Some((100, ExitStatus::Exited(0)))),
            ],
        );
        sys.signals
            .borrow_mut()
            .push_back(Ok(Some(sig(libc::SIGUSR1, 0, 0))));
        let cfg = Config::default();
        let mut i = init(&sys, &cfg, false);
        assert_eq!(i.wait_for_child(), ExitStatus::Exited(0));
        assert_eq!(sys.releases.get(), 1);
    }

    #[test]
    fn a_child_gone_before_start_up_settles_releases_nothing() {
        let sys = Fake::with_waits(7, [Ok(Some((100, ExitStatus::Exited(3))))]);
        let cfg = Config::default();
        let mut i = init(&sys, &cfg, false);
        assert_eq!(i.wait_for_child(), ExitStatus::Exited(3));
        assert_eq!(sys.releases.get(), 0);
    }

    #[test]
    fn grace_expiry_kills() {
        let sys = Fake::with_waits(7, [Ok(None), Ok(Some((100, ExitStatus::Signaled(9))))]);
        let cfg = Config {
            grace: Duration::ZERO,
            ..Config::default()
        };
        sys.signals
            .borrow_mut()
            .push_back(Ok(Some(sig(libc::SIGTERM, 0, 0))));
        let mut i = init(&sys, &cfg, false);
        // TERM forwarded, grace 0 → SIGKILL to group and child; the timeout drain reaps it.
        assert_eq!(i.wait_for_child().code(), 137);
        assert_eq!(
            *sys.kills.borrow(),
            vec![
                (100, libc::SIGTERM),
                (-100, libc::SIGKILL),
                (100, libc::SIGKILL)
            ]
        );
    }

    #[test]
    fn pid1_cleanup_terms_then_kills() {
        // Something is left: the first drains see "nothing ready", never ECHILD.
        let sys = Fake::with_waits(1, (0..4).map(|_| Ok(None)));
        let cfg = Config {
            cleanup_grace: Duration::ZERO,
            ..Config::default()
        };
        let mut i = init(&sys, &cfg, true);
        i.cleanup();
        assert_eq!(
            *sys.kills.borrow(),
            vec![(-1, libc::SIGTERM), (-1, libc::SIGKILL)]
        );
    }

    #[test]
    fn pid1_cleanup_with_nothing_left_kills_nothing() {
        let sys = Fake::with_waits(1, [Err(Errno::ECHILD)]);
        let cfg = Config::default();
        let mut i = init(&sys, &cfg, true);
        i.cleanup();
        assert!(sys.kills.borrow().is_empty());
    }

    #[test]
    fn spawn_errors_map_to_shell_exit_codes() {
        let nf = InitError::Spawn(SpawnError::NotFound {
            program: "x".into(),
            pid: None,
        });
        assert_eq!(nf.exit_code(), 127);
        let ne = InitError::Spawn(SpawnError::NotExecutable {
            program: "x".into(),
            errno: Errno::EACCES,
            pid: None,
        });
        assert_eq!(ne.exit_code(), 126);
        assert!(ne.to_string().contains("not executable"));
        assert!(nf.to_string().contains("command not found"));
        let os = InitError::Spawn(SpawnError::Os {
            call: "fork",
            errno: Errno::EAGAIN,
        });
        assert_eq!(os.exit_code(), 125);
    }
}
