//! The one owner of every `wait*()` call in the shim.
//!
//! PID 1 (or a child subreaper) inherits every orphan of its namespace, so it must reap
//! children it never started; and the children it *did* start must have their exit status
//! delivered to whoever waits for them. Both jobs are one loop: `waitpid(-1, WNOHANG)` until
//! no child is ready (`0`) or there are no children at all (`ECHILD`). Exits of pids in the
//! tracking table go to their waiter; the rest are orphans, counted and forgotten.
//!
//! **Why a full drain on every SIGCHLD.** Standard signals do not queue: while SIGCHLD is
//! pending, a second, third or thousandth child exit adds nothing, so one SIGCHLD may stand for
//! any number of exits. Reaping "one child per SIGCHLD" leaks zombies under an orphan storm;
//! the only correct reaction to a SIGCHLD is to drain until `waitpid` says nothing is left.
//! Draining when nothing happened is harmless (one `waitpid` returning 0).
//!
//! **Why nobody else may call `wait`.** A `waitpid(pid)` elsewhere (`std::process::Child::wait`,
//! `tokio::process`) races this loop: whichever reaps first takes the status and the other gets
//! `ECHILD`. Measured here, both lose exit statuses up to 100% of the time next to a global
//! reaper, so the shim never uses either.
//!
//! **The registration invariant.** A child can exit before its parent has even looked at the
//! pid `fork` returned. Its status is safe as long as the pid is [`Reaper::register`]ed before
//! the next [`Reaper::drain`]: the zombie stays in the kernel until someone waits for it, and
//! only `drain` waits. So `fork` and `register` must happen with no drain in between — on the
//! same thread with no await point between them (plain mode's synchronous loop, or a
//! current_thread runtime), or while holding the lock around the reaper.
//!
//! The table is generic over the waiter `W`: plain init mode tracks its one child with `()`,
//! the supervisor each process with its owner (the driver, or an exec by id). [`Reaper::drain`] takes the
//! [`Sys`] and a callback, so it can be driven from any loop.

use std::collections::BTreeMap;

use nix::errno::Errno;
use tracing::{debug, warn};

use crate::sys::Sys;

pub use crate::sys::ExitStatus;

/// What one [`Reaper::drain`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drained {
    /// Children reaped by this drain, tracked or not.
    pub reaped: u64,
    /// `waitpid` said `ECHILD`: this process has no children left at all.
    pub no_children: bool,
}

/// The pid → waiter table and the reaping loop.
#[derive(Debug)]
pub struct Reaper<W> {
    tracked: BTreeMap<i32, W>,
    orphans: u64,
}

impl<W> Default for Reaper<W> {
    fn default() -> Self {
        Reaper {
            tracked: BTreeMap::new(),
            orphans: 0,
        }
    }
}

impl<W> Reaper<W> {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Tracks `pid`: its exit will be handed to `waiter`. Must be called before the next
    /// [`drain`](Self::drain) after the `fork` that produced `pid` (see the module docs).
    /// Returns the waiter previously registered for `pid`, if any (a bug in the caller).
    pub fn register(&mut self, pid: i32, waiter: W) -> Option<W> {
        self.tracked.insert(pid, waiter)
    }

    #[allow(dead_code, reason = "for supervisor mode")]
    /// Stops tracking `pid`; its exit, when it comes, is counted as an orphan's.
    pub fn unregister(&mut self, pid: i32) -> Option<W> {
        self.tracked.remove(&pid)
    }

    #[allow(dead_code, reason = "for supervisor mode")]
    /// Whether `pid` is tracked (registered and not yet reaped).
    pub fn is_tracked(&self, pid: i32) -> bool {
        self.tracked.contains_key(&pid)
    }

    /// How many untracked processes (orphans) have been reaped so far.
    pub fn orphans_reaped(&self) -> u64 {
        self.orphans
    }

    /// Reaps every child that has exited, until none is ready or none is left. Each tracked
    /// exit is passed to `on_exit(pid, waiter, status)` and removed from the table. Never
    /// blocks; `EINTR` is retried; any other error ends the drain (logged).
    pub fn drain<S: Sys + ?Sized>(
        &mut self,
        sys: &S,
        mut on_exit: impl FnMut(i32, W, ExitStatus),
    ) -> Drained {
        let mut out = Drained::default();
        loop {
            match sys.waitpid_any_nohang() {
                Ok(None) => break,
                Ok(Some((pid, status))) => {
                    out.reaped = out.reaped.saturating_add(1);
                    match self.tracked.remove(&pid) {
                        Some(waiter) => {
                            debug!(pid, ?status, "tracked child exited");
                            on_exit(pid, waiter, status);
                        }
                        None => {
                            self.orphans = self.orphans.saturating_add(1);
                            debug!(pid, ?status, "reaped orphan");
                        }
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::ECHILD) => {
                    out.no_children = true;
                    break;
                }
                Err(err) => {
                    warn!(%err, "waitpid failed");
                    break;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::Fake;

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        assert_eq!(ExitStatus::Exited(0).code(), 0);
        assert_eq!(ExitStatus::Exited(42).code(), 42);
        assert_eq!(ExitStatus::Signaled(libc::SIGTERM).code(), 143);
        assert_eq!(ExitStatus::Signaled(libc::SIGKILL).code(), 137);
    }

    #[test]
    fn raw_statuses_decode() {
        assert_eq!(ExitStatus::from_raw(42 << 8), ExitStatus::Exited(42));
        assert_eq!(
            ExitStatus::from_raw(libc::SIGKILL),
            ExitStatus::Signaled(libc::SIGKILL)
        );
        // With the core-dump bit set.
        assert_eq!(
            ExitStatus::from_raw(libc::SIGSEGV | 0x80),
            ExitStatus::Signaled(libc::SIGSEGV)
        );
    }

    #[test]
    fn drain_dispatches_tracked_and_counts_orphans() {
        let sys = Fake::with_waits(
            7,
            [
                Ok(Some((100, ExitStatus::Exited(3)))),
                Ok(Some((200, ExitStatus::Signaled(9)))),
                Err(Errno::EINTR),
                Ok(Some((101, ExitStatus::Signaled(15)))),
                Ok(None),
                // Not consumed: the drain stops at the first "nothing ready".
                Ok(Some((102, ExitStatus::Exited(0)))),
            ],
        );
        let mut reaper = Reaper::new();
        assert!(reaper.register(100, "a").is_none());
        assert!(reaper.register(101, "b").is_none());
        let mut seen = Vec::new();
        let d = reaper.drain(&sys, |pid, w, st| seen.push((pid, w, st)));
        assert_eq!(
            seen,
            vec![
                (100, "a", ExitStatus::Exited(3)),
                (101, "b", ExitStatus::Signaled(15))
            ]
        );
        assert_eq!(
            d,
            Drained {
                reaped: 3,
                no_children: false
            }
        );
        assert_eq!(reaper.orphans_reaped(), 1);
        assert!(!reaper.is_tracked(100));
        assert_eq!(sys.waits.borrow().len(), 1);
    }

    #[test]
    fn drain_stops_at_echild() {
        let sys = Fake::with_waits(
            1,
            [Ok(Some((5, ExitStatus::Exited(0)))), Err(Errno::ECHILD)],
        );
        let mut reaper: Reaper<()> = Reaper::new();
        let d = reaper.drain(&sys, |_, _, _| panic!("nothing is tracked"));
        assert_eq!(
            d,
            Drained {
                reaped: 1,
                no_children: true
            }
        );
    }

    #[test]
    fn drain_survives_unexpected_errors() {
        let sys = Fake::with_waits(
            1,
            [Err(Errno::EINVAL), Ok(Some((5, ExitStatus::Exited(0))))],
        );
        let mut reaper: Reaper<()> = Reaper::new();
        let d = reaper.drain(&sys, |_, _, _| {});
        assert_eq!(
            d,
            Drained {
                reaped: 0,
                no_children: false
            }
        );
        // The next drain picks up where it left off.
        let d = reaper.drain(&sys, |_, _, _| {});
        assert_eq!(d.reaped, 1);
    }

    #[test]
    fn an_exit_reaped_before_registration_is_not_lost_when_registered_first() {
        // The child exited before the parent looked at the pid: its zombie waits in the kernel
        // (the fake's queue) until a drain, which happens after registration.
        let sys = Fake::with_waits(1, [Ok(Some((300, ExitStatus::Exited(7)))), Ok(None)]);
        let mut reaper = Reaper::new();
        reaper.register(300, ());
        let mut got = None;
        reaper.drain(&sys, |pid, (), st| got = Some((pid, st)));
        assert_eq!(got, Some((300, ExitStatus::Exited(7))));
    }

    #[test]
    fn storms_are_drained_completely() {
        let n = 10_000;
        let waits = (0..n)
            .map(|i| Ok(Some((1000 + i, ExitStatus::Exited(0)))))
            .chain([Ok(None)]);
        let sys = Fake::with_waits(1, waits);
        let mut reaper: Reaper<()> = Reaper::new();
        let d = reaper.drain(&sys, |_, _, _| {});
        assert_eq!(d.reaped, 10_000);
        assert_eq!(reaper.orphans_reaped(), 10_000);
        assert!(sys.waits.borrow().is_empty());
    }
}
