//! Shared helpers of the example programs (echo driver, agentctl, fleet demo).
//!
//! For drivers built on `driver-protocol`'s blocking API:
//!
//! - [`shim_socket`] turns the inherited fd named by `AGENT_SHIM_FD` into a [`UnixStream`],
//!   checking that it is an open socket and marking it close-on-exec (so tool processes the
//!   driver starts do not inherit the link);
//! - [`spawn_reader`] moves a [`FrameReader`] to a thread that decodes every message into a
//!   channel, so the driver's main loop can wait for messages *with a timeout* at its safe
//!   points while it owns the writer.

#![deny(missing_docs)]

use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver};

use driver_protocol::blocking::FrameReader;
use driver_protocol::{DecodeError, Message};

/// The environment variable that holds the number of the driver's end of the shim link.
pub const SHIM_FD_VAR: &str = "AGENT_SHIM_FD";

/// The inherited shim socket could not be taken over.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FdError {
    /// The variable is not set (or not valid unicode).
    #[error("{SHIM_FD_VAR} is not set")]
    Missing,
    /// The variable is not a non-negative fd number.
    #[error("{SHIM_FD_VAR}={0:?} is not a file descriptor number")]
    NotANumber(String),
    /// No open file descriptor has that number.
    #[error("{SHIM_FD_VAR}={0}: no such open file descriptor")]
    NotOpen(RawFd),
    /// The descriptor is open but is not a socket.
    #[error("{SHIM_FD_VAR}={0}: not a socket")]
    NotASocket(RawFd),
    /// Marking the descriptor close-on-exec failed.
    #[error("{SHIM_FD_VAR}={fd}: cannot set close-on-exec")]
    Cloexec {
        /// The descriptor.
        fd: RawFd,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Takes over the shim link named by [`SHIM_FD_VAR`].
///
/// Call once: the returned stream owns the descriptor and closes it when dropped.
pub fn shim_socket() -> Result<UnixStream, FdError> {
    let value = std::env::var(SHIM_FD_VAR).map_err(|_| FdError::Missing)?;
    let fd: RawFd = value
        .trim()
        .parse()
        .ok()
        .filter(|fd| *fd >= 0)
        .ok_or(FdError::NotANumber(value))?;
    // SAFETY: F_GETFD only reads the descriptor flags; a closed fd yields EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(FdError::NotOpen(fd));
    }
    // SAFETY: `st` is a properly sized, writable stat buffer; fstat fills it or fails.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open (checked above) and `st` is valid for writes.
    if unsafe { libc::fstat(fd, &mut st) } < 0 || st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(FdError::NotASocket(fd));
    }
    // SAFETY: F_SETFD sets only the descriptor flags of an open fd.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
        return Err(FdError::Cloexec {
            fd,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: the fd is open, is a socket, and was handed to this process to own: nothing
    // else in the process uses it, so the stream may close it on drop.
    Ok(unsafe { UnixStream::from_raw_fd(fd) })
}

/// What the reader thread saw on the link.
#[derive(Debug)]
pub enum Inbound<M> {
    /// A decoded message (possibly of an unknown type: `M`'s `Unknown` variant).
    Message(M),
    /// The stream ended cleanly, or failed as a closed link does (reset): the shim is gone.
    Closed,
    /// A bad frame, or a read error: answer with [`DecodeError::code`] and exit.
    Bad(DecodeError),
}

/// Starts a thread that reads messages from `reader` into the returned channel until the
/// stream ends or a frame is bad (the last item is then [`Inbound::Closed`] or
/// [`Inbound::Bad`]), or the receiver is dropped.
pub fn spawn_reader<M, R>(mut reader: FrameReader<R>) -> std::io::Result<Receiver<Inbound<M>>>
where
    M: Message + Send + 'static,
    R: std::io::Read + Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("shim-reader".into())
        .spawn(move || loop {
            let item = match reader.read_message::<M>() {
                Ok(Some(msg)) => Inbound::Message(msg),
                Ok(None) => Inbound::Closed,
                Err(e) if is_closed(&e) => Inbound::Closed,
                Err(e) => Inbound::Bad(e),
            };
            let last = !matches!(item, Inbound::Message(_));
            if tx.send(item).is_err() || last {
                return;
            }
        })?;
    Ok(rx)
}

/// Whether a read error means the peer closed the link (rather than sent a bad frame).
fn is_closed(e: &DecodeError) -> bool {
    matches!(e, DecodeError::Io(io) if is_closed_io(io))
}

/// Whether an I/O error means the peer closed the link: a reset (the peer closed with data
/// unread), a broken pipe, or a write to a shut-down socket.
pub fn is_closed_io(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionReset | BrokenPipe | ConnectionAborted | NotConnected | UnexpectedEof
    )
}
