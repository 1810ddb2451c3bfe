//! The shell's signal source: the handled signals, read from a non-blocking `signalfd`
//! registered with tokio.
//!
//! All signals stay blocked (see [`crate::signals`]); reading them from a file descriptor lets
//! the one loop wait for a signal in the same `select!` as every other input, so no signal
//! handler ever runs.

use nix::sys::signalfd::{SfdFlags, SignalFd};
use tokio::io::unix::AsyncFd;
use tracing::warn;

use crate::signals;
use crate::sys::SigInfo;

use super::super::SupervisorError;

/// The signalfd of the handled signals.
pub(super) struct Signals {
    fd: AsyncFd<SignalFd>,
}

impl Signals {
    /// Creates the signalfd and registers it with the runtime.
    pub(super) fn open() -> Result<Self, SupervisorError> {
        let sfd = SignalFd::with_flags(
            &signals::handled_set(),
            SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC,
        )
        .map_err(|e| SupervisorError::Signalfd(e.into()))?;
        // SAFETY: the SignalFd owns a valid fd, which is neither replaced nor closed while the
        // AsyncFd owns it (it is closed when the AsyncFd drops it).
        let fd = unsafe { AsyncFd::register(sfd) }
            .map_err(|e| SupervisorError::Signalfd(e.into_parts().1))?;
        Ok(Signals { fd })
    }

    /// Waits until signals are pending, then takes all of them. Cancel-safe: nothing is read
    /// before the wait is over.
    pub(super) async fn next(&self) -> std::io::Result<Vec<SigInfo>> {
        let mut guard = self.fd.readable().await?;
        let mut infos = Vec::new();
        loop {
            match guard.get_inner().read_signal() {
                Ok(Some(si)) => infos.push(sig_info(&si)),
                Ok(None) => {
                    guard.clear_ready();
                    break;
                }
                Err(err) => {
                    warn!(%err, "reading the signalfd failed");
                    guard.clear_ready();
                    break;
                }
            }
        }
        Ok(infos)
    }
}

fn sig_info(si: &libc::signalfd_siginfo) -> SigInfo {
    SigInfo {
        signo: i32::try_from(si.ssi_signo).unwrap_or_default(),
        code: si.ssi_code,
        pid: i32::try_from(si.ssi_pid).unwrap_or_default(),
        uid: si.ssi_uid,
    }
}
