//! Children forked but not yet known to have exec'd: the driver being launched and execs
//! being started.
//!
//! A forked child runs as the tenant's uid between its credential drop and its `execve`, and
//! the tenant may `SIGSTOP` it there for good (`tgkill` on the next pids). So the loop never
//! waits for the outcome of a spawn: [`crate::spawn::start`] hands back the pid and the
//! report pipe, the pid is registered with the reaper at once, and the outcome comes to the
//! loop like any other input:
//!
//! ```text
//!  fork ─► register pid, core told (on_launched / exec_started) ─► pending
//!  pending ── report pipe readable (EOF: exec'd; (step, errno): failed) ─► done
//!          ── reaped first (exec'd and exited, failed, or killed) ─► pipe read, then done,
//!             then the exit is handed on
//!          ── --spawn-timeout passed ─► SIGKILL (works on a stopped process) ─► failed
//!  done: driver ⇒ nothing more, or exec_failed (its exit reports driver_exited, the
//!        restart policy follows); exec ⇒ exec_started to its owner (I/O read from then on),
//!        or an `error` reply and the core forgets it (no exec_exit, as for a failed spawn)
//! ```
//!
//! Meanwhile everything else goes on: status, other execs, control connections, signals,
//! reaping. Shutdown, a task cancel or an `exec_signal` reach a pending child through the
//! core, which already tracks its pid; the signals stay blocked in the child until its
//! `execve`, so only the SIGKILL of a kill grace or of the spawn deadline ends a stopped one.

use std::future::poll_fn;
use std::task::Poll;
use std::time::Instant;

use driver_protocol::message::{ErrorMsg, Exec, ExecStarted, ShimToControl, ShimToDriver};
use nix::errno::Errno;
use tokio::io::unix::AsyncFd;
use tracing::{debug, info, warn};

use crate::exec::ExecIo;
use crate::spawn::{Pending, SpawnError};

use super::super::core::{ExecOwner, Refusal};
use super::Shell;

/// Where an exec's answer goes once its spawn is decided.
pub(super) enum ReplyTo {
    /// The control request's reply.
    Control(crate::control::Reply),
    /// The driver with this pid (dropped if it is no longer the driver).
    Driver(i32),
}

/// What a pending child is for.
pub(super) enum SpawnFor {
    /// The driver (already known to the core by its pid).
    Driver,
    /// An exec admitted as `id` (already known to the core).
    Exec {
        id: u64,
        owner: ExecOwner,
        /// The request's id, for the reply's `re`.
        re: u64,
        to: ReplyTo,
        /// Its I/O, registered with the loop once it exec'd.
        io: ExecIo,
    },
}

/// One pending child.
pub(super) struct Spawning {
    pid: i32,
    report: AsyncFd<Pending>,
    deadline: Instant,
    what: SpawnFor,
}

/// Waits until the report pipe of a pending child has something (data or EOF) and returns
/// that child's outcome. Never returns while nothing is pending.
pub(super) async fn spawn_ready(spawning: &mut [Spawning]) -> (i32, Result<i32, SpawnError>) {
    if spawning.is_empty() {
        return std::future::pending().await;
    }
    poll_fn(|cx| {
        for s in spawning.iter_mut() {
            let pid = s.pid;
            loop {
                match s.report.poll_read_ready_mut(cx) {
                    Poll::Ready(Ok(mut guard)) => match guard.get_inner_mut().poll() {
                        Some(outcome) => return Poll::Ready((pid, outcome)),
                        // A piece of the report, or a spurious wake-up: re-arm.
                        None => guard.clear_ready(),
                    },
                    Poll::Ready(Err(err)) => {
                        let errno = Errno::from_raw(err.raw_os_error().unwrap_or(libc::EIO));
                        return Poll::Ready((
                            pid,
                            Err(SpawnError::Os {
                                call: "epoll(spawn report)",
                                errno,
                            }),
                        ));
                    }
                    Poll::Pending => break,
                }
            }
        }
        Poll::Pending
    })
    .await
}

/// The reply to an exec request once its spawn is decided.
fn exec_reply(re: u64, r: Result<ExecStarted, Refusal>) -> Result<ExecStarted, ErrorMsg> {
    r.map_err(|(code, message)| ErrorMsg {
        re: Some(re),
        code,
        message,
        task_id: None,
        first_available: None,
    })
}

impl Shell<'_> {
    /// Follows a freshly forked child (its pid already registered with the reaper and told
    /// to the core) until its `execve` is decided. If the loop cannot watch its report pipe,
    /// the child is killed and its start fails at once.
    pub(super) fn track_spawn(&mut self, pending: Pending, what: SpawnFor) {
        let pid = pending.pid();
        let deadline = Instant::now()
            .checked_add(self.cfg.spawn_timeout)
            .unwrap_or_else(Instant::now);
        // `new` on a type that owns its descriptor (the pipe's read end lives and dies with
        // the `Pending`): sound, and `new` also exists in older tokios.
        #[allow(deprecated, reason = "Pending owns its descriptor: sound")]
        let registered = AsyncFd::new(pending);
        match registered {
            Ok(report) => {
                self.spawning.push(Spawning {
                    pid,
                    report,
                    deadline,
                    what,
                });
            }
            Err(err) => {
                warn!(%err, pid, "cannot watch a child's start: killing it");
                // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped
                // child's.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                let errno = Errno::from_raw(err.raw_os_error().unwrap_or(libc::EIO));
                let err = SpawnError::Os {
                    call: "epoll(spawn report)",
                    errno,
                };
                self.spawn_decided(pid, what, Err(err));
            }
        }
    }

    /// The nearest spawn deadline.
    pub(super) fn spawn_deadline(&self) -> Option<Instant> {
        self.spawning.iter().map(|s| s.deadline).min()
    }

    /// The report pipe of `pid` gave its outcome.
    pub(super) fn spawn_done(&mut self, pid: i32, outcome: Result<i32, SpawnError>) {
        if let Some(s) = self.take_spawning(pid) {
            if outcome.is_err() {
                // Already exited after a report; killed when the pipe itself failed.
                s.report.get_ref().kill();
            }
            self.spawn_decided(pid, s.what, outcome);
        }
    }

    /// Kills the children whose `--spawn-timeout` has passed; their starts fail.
    pub(super) fn spawn_timeouts(&mut self, now: Instant) {
        while let Some(i) = self.spawning.iter().position(|s| s.deadline <= now) {
            let mut s = self.spawning.swap_remove(i);
            let pid = s.pid;
            // The last word first: it may have exec'd or failed just now.
            let outcome = match s.report.get_mut().poll() {
                Some(outcome) => outcome,
                None => {
                    let p = s.report.get_ref();
                    p.kill();
                    let err = p.timed_out(self.cfg.spawn_timeout);
                    warn!(pid, timeout = ?self.cfg.spawn_timeout, "a child did not reach its execve in time (stopped?): killed");
                    Err(err)
                }
            };
            if outcome.is_err() {
                s.report.get_ref().kill();
            }
            self.spawn_decided(pid, s.what, outcome);
        }
    }

    /// `pid` was reaped: if its spawn was pending, decides it first (its pipe is complete
    /// now), so that its exit follows its `exec_started` or its `exec_failed`.
    pub(super) fn spawn_reaped(&mut self, pid: i32) {
        let Some(mut s) = self.take_spawning(pid) else {
            return;
        };
        // EOF without a report: it exec'd, or was killed before it could; either way its
        // exit status tells the rest.
        let outcome = s.report.get_mut().poll().unwrap_or(Ok(pid));
        self.spawn_decided(pid, s.what, outcome);
    }

    /// Stops following `pid`'s spawn (there are few at once: a linear search).
    fn take_spawning(&mut self, pid: i32) -> Option<Spawning> {
        let i = self.spawning.iter().position(|s| s.pid == pid)?;
        Some(self.spawning.swap_remove(i))
    }

    fn spawn_decided(&mut self, pid: i32, what: SpawnFor, outcome: Result<i32, SpawnError>) {
        let now = Instant::now();
        match what {
            SpawnFor::Driver => match outcome {
                Ok(_) => debug!(pid, "driver exec'd"),
                Err(err) => {
                    warn!(%err, pid, "cannot start the driver");
                    self.core.on_driver_spawn_failed(pid);
                }
            },
            SpawnFor::Exec {
                id,
                owner,
                re,
                to,
                io,
            } => {
                let reply = match outcome {
                    Ok(_) => {
                        info!(exec_id = id, pid, "exec'd");
                        self.exec_io_open(id, owner, io);
                        Ok(ExecStarted {
                            re,
                            exec_id: id,
                            pid: pid.unsigned_abs(),
                        })
                    }
                    Err(err) => {
                        debug!(%err, exec_id = id, pid, "exec failed to start");
                        drop(io);
                        self.core.exec_spawn_failed(id, now);
                        Err(super::exec::refusal_of(&err))
                    }
                };
                self.send_exec_reply(to, exec_reply(re, reply));
            }
        }
    }

    /// Answers an exec request.
    pub(super) fn send_exec_reply(&mut self, to: ReplyTo, r: Result<ExecStarted, ErrorMsg>) {
        match to {
            ReplyTo::Control(reply) => reply.send(match r {
                Ok(s) => ShimToControl::ExecStarted(s),
                Err(e) => ShimToControl::Error(e),
            }),
            ReplyTo::Driver(pid) if pid == self.driver_pid => {
                let msg: ShimToDriver = match r {
                    Ok(s) => s.into(),
                    Err(e) => e.into(),
                };
                self.queue_for_driver(&msg);
            }
            ReplyTo::Driver(pid) => debug!(pid, "exec reply for a driver that is gone"),
        }
    }

    /// The request of an exec that could not even be forked.
    pub(super) fn refuse_exec(&mut self, to: ReplyTo, req: &Exec, refusal: Refusal) {
        self.send_exec_reply(to, exec_reply(req.id, Err(refusal)));
    }
}
