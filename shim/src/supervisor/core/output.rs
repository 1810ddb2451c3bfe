//! What crosses the core's boundary besides its inputs: the [`Output`]s it asks the shell to
//! carry out (a [`Kill`] among them) and the [`Counters`] only the shell can read.

use bytes::Bytes;
use driver_protocol::message::{Event, ShimToControl, ShimToDriver};
use driver_protocol::ErrorCode;
use tracing::{debug, warn};

use crate::sys::Sys;

use super::ExecOwner;

#[cfg(doc)]
use super::Core;

/// Something the shell must do for the core.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Queue this message for the driver.
    ToDriver(Box<ShimToDriver>),
    /// Publish this shim event.
    Event(Box<Event>),
    /// Publish this driver event, given as its MessagePack body (relayed, never re-encoded).
    Relay(Bytes),
    /// Publish the driver event just given to `Core::on_driver_event`: the shell holds its
    /// body (relayed from the read buffer as it is, never copied for the core).
    RelayEvent,
    /// Launch the driver now (then call [`Core::on_launched`] or [`Core::on_launch_error`]).
    Launch,
    /// Stop reading the driver's socket (it sent something unusable).
    StopReading,
    /// The driver asks for an exec: start it (see [`Core::exec_admit`]) and answer the driver.
    StartExec(Box<driver_protocol::message::Exec>),
    /// The exec request given to [`Core::exec_admit`] is admitted as exec `id`: fork it for
    /// `owner` (running as `user`), then call [`Core::exec_started`] (or
    /// [`Core::exec_spawn_failed`]).
    ExecAdmitted {
        /// Its exec id.
        id: u64,
        /// Who steers it and gets its output.
        owner: ExecOwner,
        /// The uid and gid it runs as, as the shell resolved them.
        user: Option<(u32, u32)>,
    },
    /// The exec request given to [`Core::exec_admit`] is refused: answer its sender with this
    /// `error` code and message.
    ExecRefused(ErrorCode, String),
    /// Write these bytes (then, with `eof`, close) to an exec's stdin or terminal.
    ExecInput(driver_protocol::message::ExecInput),
    /// Set the terminal size of an exec.
    ExecResize(u64, driver_protocol::message::TtySize),
    /// Exec `exec_id` ended, reported to its owner (if it is still there) by the output that
    /// follows: the exec registry records it (`list_execs`, `attach_exec`).
    ExecEnded(driver_protocol::message::ExecExit),
    /// Read what is left of an exec's output, close it, then call [`Core::exec_io_closed`].
    ExecStop(u64),
    /// The driver was reaped: read what is left in its socket and pipes, close them, then
    /// call [`Core::on_driver_link_closed`].
    CloseDriverLink,
    /// Send a signal (see [`Kill::apply`]).
    Kill(Kill),
    /// The reply to the control command just given to [`Core::on_command`] or
    /// [`Core::on_status`], or the refusal of a control `exec_input`, `exec_resize` or
    /// `exec_signal` (those have no reply when carried out).
    Reply(Box<ShimToControl>),
}

/// A signal the core decided to send, by whom it is meant for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kill {
    /// The driver's process group, or the driver alone if it left its group.
    Driver {
        /// The driver's pid (its process group's id).
        pid: i32,
        /// The signal.
        sig: i32,
    },
    /// An exec's process group.
    Exec {
        /// The exec's pid (its process group's id).
        pid: i32,
        /// The signal.
        sig: i32,
    },
    /// `kill(-1, SIGKILL)`: every process PID 1 can signal, at the end of the grace.
    Everything,
}

impl Kill {
    /// The first `kill(2)` this sends, as `(pid, signal)` in `kill`'s conventions.
    pub fn target(self) -> (i32, i32) {
        match self {
            Kill::Driver { pid, sig } | Kill::Exec { pid, sig } => (pid.saturating_neg(), sig),
            Kill::Everything => (-1, libc::SIGKILL),
        }
    }

    /// Sends it; failures are logged (a group already gone is no failure).
    pub fn apply(self, sys: &impl Sys) {
        let (target, sig) = self.target();
        match (self, sys.kill(target, sig)) {
            (_, Ok(())) | (Kill::Exec { .. }, Err(nix::errno::Errno::ESRCH)) => {}
            (Kill::Driver { pid, sig }, Err(nix::errno::Errno::ESRCH)) => {
                if let Err(err) = sys.kill(pid, sig) {
                    debug!(%err, pid, "cannot signal the driver");
                }
            }
            (Kill::Driver { pid, .. }, Err(err)) => {
                warn!(%err, pid, "cannot signal the driver's group");
            }
            (Kill::Exec { pid, .. }, Err(err)) => warn!(%err, pid, "cannot signal an exec's group"),
            (Kill::Everything, Err(err)) => debug!(%err, "kill(-1) failed"),
        }
    }
}

/// What only the shell can read for a `status_reply` (see [`Core::on_status`]); zero where it
/// cannot tell.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Every child live now, adopted orphans included, if the shell counted them; `None`
    /// leaves the core's count (the driver and the execs).
    pub children: Option<u32>,
    /// Children reaped since the start.
    pub reaped: u64,
    /// Events waiting in the replay buffer.
    pub buffered_events: u64,
    /// Bytes waiting in the replay buffer.
    pub buffered_bytes: u64,
    /// The seq of the last event published.
    pub last_seq: u64,
    /// The shim's resident set size, in bytes.
    pub rss_bytes: u64,
    /// Which per-exec cgroups are in effect (`none`, `v1`, `v2-delegated`), if the shell knows.
    pub cgroups: Option<&'static str>,
}
