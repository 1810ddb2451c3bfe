//! The copy of the driver's output lines to our stderr, which must never block PID 1.
//!
//! Whoever reads the shim's stderr (the container runtime, `docker logs`) may stall; a
//! blocking write in the loop would then freeze the supervisor (no status replies, SIGTERM
//! ignored). So the lines go into a bounded in-memory queue ([`QUEUE_BYTES`]) which the loop
//! flushes whenever fd 2 is writable, through a non-blocking descriptor of its own: a fresh
//! open file description from `/proc/self/fd/2` when that works (so fd 2's own flags, shared
//! with the container runtime, stay untouched), else a dup of fd 2 with `O_NONBLOCK` set (which
//! then applies to fd 2 as well). When the queue is full, lines are dropped and counted; one
//! `agent-shim: N driver output lines dropped` line follows once there is room again. The
//! shim's own log lines go through a non-blocking descriptor too
//! ([`crate::logging::use_nonblocking_stderr`]): while stderr is stalled they are dropped,
//! since a single blocking `warn!` would freeze the loop just the same.
//!
//! Not every stderr can be polled: epoll refuses regular files and `/dev/null` (`EPERM`),
//! and those never stall on a reader anyway. A regular file is written directly, line by
//! line, through a dup of fd 2 (a fresh open file description would start at offset 0 and
//! overwrite what is already in the file; the dup shares fd 2's offset and `O_APPEND`); the
//! shim's own log lines keep fd 2 itself. Any other descriptor epoll refuses is written
//! directly through the non-blocking descriptor, dropping (and counting) what it does not
//! take.

use std::collections::VecDeque;
use std::os::fd::{AsFd as _, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{self, FcntlArg, OFlag};
use nix::sys::stat::SFlag;
use tokio::io::unix::AsyncFd;
use tracing::{debug, warn};

/// Bytes of driver output waiting for our stderr, at most.
pub(super) const QUEUE_BYTES: usize = 256 * 1024;

/// The non-blocking copy of driver output lines to our stderr.
pub(super) struct ErrCopy {
    fd: Option<AsyncFd<OwnedFd>>,
    /// A stderr epoll refuses (a regular file, `/dev/null`): written at once, line by line.
    direct: Option<Direct>,
    q: Queue,
}

/// Stderr written directly: it cannot be polled, and it never waits on a reader.
struct Direct {
    fd: OwnedFd,
    /// One line and its newline, so each goes out in a single `write`.
    scratch: Vec<u8>,
    /// Whether a failed write was already logged (once, not per line).
    failed: bool,
}

/// The bounded bytes waiting for stderr and the count of lines that did not fit.
struct Queue {
    queue: VecDeque<u8>,
    cap: usize,
    dropped: u64,
}

impl ErrCopy {
    /// Opens the non-blocking descriptor for fd 2; without one, lines are only dropped and
    /// counted.
    pub(super) fn open() -> ErrCopy {
        let stderr = std::io::stderr();
        if nix::sys::stat::fstat(stderr.as_fd())
            .is_ok_and(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG)
        {
            return match nix::unistd::dup(stderr.as_fd()) {
                Ok(fd) => ErrCopy::direct(fd),
                Err(err) => {
                    warn!(%err, "cannot dup stderr: driver output is not copied there");
                    ErrCopy::with(None, QUEUE_BYTES)
                }
            };
        }
        let fd = match nonblocking_stderr() {
            Ok(fd) => fd,
            Err(err) => {
                warn!(%err, "no non-blocking stderr: driver output is not copied there");
                return ErrCopy::with(None, QUEUE_BYTES);
            }
        };
        match fd.try_clone() {
            Ok(logs) => crate::logging::use_nonblocking_stderr(logs),
            Err(err) => debug!(%err, "log lines keep a blocking stderr"),
        }
        // SAFETY: `fd` is a valid descriptor owned by the AsyncFd from here on, neither
        // replaced nor closed while registered (it is closed when the AsyncFd drops it).
        let fd = match unsafe { AsyncFd::register(fd) } {
            Ok(fd) => Some(fd),
            Err(err) => {
                let (fd, err) = err.into_parts();
                // epoll refuses descriptors that are always ready (`/dev/null`): write
                // directly.
                if err.raw_os_error() == Some(libc::EPERM) {
                    return ErrCopy::direct(fd);
                }
                warn!(%err, "cannot register stderr: driver output is not copied there");
                None
            }
        };
        ErrCopy::with(fd, QUEUE_BYTES)
    }

    fn direct(fd: OwnedFd) -> ErrCopy {
        let mut c = ErrCopy::with(None, QUEUE_BYTES);
        c.direct = Some(Direct {
            fd,
            scratch: Vec::new(),
            failed: false,
        });
        c
    }

    fn with(fd: Option<AsyncFd<OwnedFd>>, cap: usize) -> ErrCopy {
        ErrCopy {
            fd,
            direct: None,
            q: Queue {
                queue: VecDeque::new(),
                cap,
                dropped: 0,
            },
        }
    }

    /// Queues one line (a newline is added); drops it when the queue has no room.
    pub(super) fn line(&mut self, text: &str) {
        if let Some(d) = self.direct.as_mut() {
            d.line(text);
            return;
        }
        self.q.note_dropped();
        if self.fd.is_none() || !self.q.push(text) {
            self.q.dropped = self.q.dropped.saturating_add(1);
        }
    }

    /// Whether something waits to be written.
    pub(super) fn pending(&self) -> bool {
        self.fd.is_some() && (!self.q.queue.is_empty() || self.q.dropped > 0)
    }

    /// Waits until fd 2 is writable, then writes what it takes without blocking.
    pub(super) async fn flush(&mut self) {
        let Some(fd) = self.fd.as_ref() else {
            return std::future::pending().await;
        };
        let q = &mut self.q;
        if q.queue.is_empty() && q.dropped == 0 {
            return std::future::pending().await;
        }
        let mut guard = match fd.writable().await {
            Ok(g) => g,
            Err(err) => {
                debug!(%err, "waiting for stderr failed: no more copies");
                q.queue.clear();
                self.fd = None;
                return;
            }
        };
        loop {
            q.note_dropped();
            if q.queue.is_empty() {
                return;
            }
            let (head, _) = q.queue.as_slices();
            match guard.try_io(|inner| {
                nix::unistd::write(inner.get_ref().as_fd(), head).map_err(std::io::Error::from)
            }) {
                Ok(Ok(0)) => return,
                Ok(Ok(n)) => {
                    q.queue.drain(..n.min(q.queue.len()));
                }
                Ok(Err(err)) => {
                    debug!(%err, "writing driver output to stderr failed: no more copies");
                    q.queue.clear();
                    drop(guard);
                    self.fd = None;
                    return;
                }
                // Would block: readiness cleared, the loop waits again.
                Err(_would_block) => return,
            }
        }
    }
}

impl Direct {
    /// Writes one line and its newline; a line the descriptor does not take is dropped, and
    /// the first failure is logged.
    fn line(&mut self, text: &str) {
        self.scratch.clear();
        self.scratch.extend_from_slice(text.as_bytes());
        self.scratch.push(b'\n');
        let mut rest = self.scratch.as_slice();
        while !rest.is_empty() {
            match nix::unistd::write(&self.fd, rest) {
                Err(Errno::EINTR) => {}
                Ok(0) => return,
                Ok(n) => rest = rest.get(n..).unwrap_or_default(),
                Err(err) => {
                    if !self.failed {
                        self.failed = true;
                        warn!(%err, "writing driver output to stderr failed: lines are dropped");
                    }
                    return;
                }
            }
        }
    }
}

impl Queue {
    fn push(&mut self, text: &str) -> bool {
        let len = text.len().saturating_add(1);
        if self.queue.len().saturating_add(len) > self.cap {
            return false;
        }
        self.queue.extend(text.as_bytes());
        self.queue.push_back(b'\n');
        true
    }

    /// Reports the dropped lines once there is room for the report.
    fn note_dropped(&mut self) {
        if self.dropped == 0 {
            return;
        }
        let note = format!("agent-shim: {} driver output lines dropped", self.dropped);
        if self.push(&note) {
            self.dropped = 0;
        }
    }
}

/// A non-blocking descriptor for our stderr (see the module docs).
fn nonblocking_stderr() -> Result<OwnedFd, Errno> {
    match crate::logging::reopen_stderr_nonblocking() {
        Ok(fd) => return Ok(fd),
        Err(err) => debug!(%err, "cannot reopen stderr: setting O_NONBLOCK on fd 2"),
    }
    let dup = nix::unistd::dup(std::io::stderr().as_fd())?;
    let fl = OFlag::from_bits_truncate(fcntl::fcntl(&dup, FcntlArg::F_GETFL)?);
    fcntl::fcntl(&dup, FcntlArg::F_SETFL(fl | OFlag::O_NONBLOCK))?;
    Ok(dup)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_and_counts_then_reports_once() {
        // A queue without a descriptor only counts; with a small cap it queues, then drops.
        let mut c = ErrCopy::with(None, 64);
        c.line("x");
        assert_eq!(c.q.dropped, 1);
        let mut q = ErrCopy::with(None, 64).q;
        assert!(q.push(&"a".repeat(40)));
        assert!(!q.push(&"b".repeat(40)));
        q.dropped = 3;
        q.queue.clear();
        q.note_dropped();
        assert_eq!(q.dropped, 0);
        let text: Vec<u8> = q.queue.iter().copied().collect();
        assert_eq!(text, b"agent-shim: 3 driver output lines dropped\n");
    }

    #[test]
    fn a_regular_file_is_written_directly_after_what_it_holds() {
        use std::io::{Seek as _, Write as _};
        let path = std::env::temp_dir().join(format!("agent-shim-errcopy-{}", std::process::id()));
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(b"earlier\n").unwrap();
        file.seek(std::io::SeekFrom::End(0)).unwrap();
        // As for fd 2: a dup shares the offset, so nothing earlier is overwritten.
        let mut c = ErrCopy::direct(OwnedFd::from(file.try_clone().unwrap()));
        c.line("driver[7] stdout: one");
        c.line("driver[7] stderr: two");
        assert!(!c.pending(), "nothing waits: it was written");
        file.write_all(b"later\n").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(
            text,
            "earlier\ndriver[7] stdout: one\ndriver[7] stderr: two\nlater\n"
        );
    }
}
