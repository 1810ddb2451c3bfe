//! The byte streams under the control link: unix sockets, TCP and vsock, accepted or dialed.
//!
//! Everything above this module — the handshake, the replay buffer, the ids, the
//! one-live-connection rule — sees a connection as a boxed read half and a boxed write half
//! ([`Halves`]) and never learns which transport or direction it came from.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::Path;

use nix::sys::stat::{umask, Mode};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use super::addr::ControlAddr;
use super::source::{Classifier, Source};
use super::vsock::{self, VsockListener, VsockStream};

/// The read half of a connection.
pub(super) type ReadHalf = Box<dyn AsyncRead + Unpin>;
/// The write half of a connection.
pub(super) type WriteHalf = Box<dyn AsyncWrite + Unpin>;
/// A connection, split.
pub(super) type Halves = (ReadHalf, WriteHalf);

/// Connections the kernel queues for accepting (the kernel caps it at `somaxconn`): a flood
/// of connects from inside the sandbox must not fill the queue in front of the control
/// plane's.
const BACKLOG: libc::c_int = 4096;

/// A bound control listener.
#[derive(Debug)]
pub(super) enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
    Vsock(VsockListener),
}

impl Listener {
    /// Binds `addr`: a unix socket with mode 0600 (a stale socket file is replaced), TCP
    /// (the host resolved now), or vsock. Must be called inside the runtime.
    pub(super) fn bind(addr: &ControlAddr) -> io::Result<Self> {
        match addr {
            ControlAddr::Unix(path) => bind_unix(path).map(Self::Unix),
            ControlAddr::Tcp { host, port } => {
                let listener = std::net::TcpListener::bind((host.as_str(), *port))?;
                deepen_backlog(&listener);
                listener.set_nonblocking(true)?;
                TcpListener::from_std(listener).map(Self::Tcp)
            }
            ControlAddr::Vsock { cid, port } => {
                VsockListener::bind(*cid, *port, vsock::BACKLOG).map(Self::Vsock)
            }
        }
    }

    /// The next connection, split; a description of the peer for logs, and its source for
    /// the gate.
    pub(super) async fn accept(
        &self,
        classifier: &mut Classifier,
    ) -> io::Result<(Halves, String, Source)> {
        match self {
            Self::Unix(l) => {
                let (stream, _) = l.accept().await?;
                let cred = stream.peer_cred().ok().map(|c| (c.uid(), c.pid()));
                let peer = match cred {
                    Some((uid, Some(pid))) => format!("unix uid {uid} pid {pid}"),
                    Some((uid, None)) => format!("unix uid {uid}"),
                    None => "unix".to_owned(),
                };
                Ok((unix_halves(stream), peer, Classifier::unix(cred)))
            }
            Self::Tcp(l) => {
                let (stream, peer) = l.accept().await?;
                let local = stream.local_addr().ok().map(|a| a.ip());
                let source = classifier.tcp(peer.ip(), local, std::time::Instant::now());
                Ok((tcp_halves(stream), peer.to_string(), source))
            }
            Self::Vsock(l) => Ok((
                vsock_halves(l.accept().await?),
                "vsock".to_owned(),
                Source::Vsock,
            )),
        }
    }
}

/// Turns a connection away without ever waiting for it: writes `frame` (an `error`) only if
/// the socket takes it whole at once (a fresh socket's empty send buffer always does), reads
/// and discards what the peer already sent (unread data would make the close a reset, and
/// the peer could lose the frame), then closes.
pub(super) async fn refuse((mut rd, mut wr): Halves, frame: &[u8]) {
    use std::pin::Pin;
    use std::task::Poll;
    // Polled once, outside tokio's cooperative budget: a socket that is not ready now is not
    // waited for.
    let once = std::future::poll_fn(|cx| {
        let _ = Pin::new(&mut wr).poll_write(cx, frame);
        let mut scratch = [0u8; 4096];
        for _ in 0..4 {
            let mut buf = tokio::io::ReadBuf::new(&mut scratch);
            match Pin::new(&mut rd).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => {}
                _ => break,
            }
        }
        Poll::Ready(())
    });
    tokio::task::unconstrained(once).await;
}

/// Dials `addr` (names resolved now, every address tried in turn). Unbounded: the caller
/// puts a timeout around it.
pub(super) async fn dial(addr: &ControlAddr) -> io::Result<Halves> {
    match addr {
        ControlAddr::Unix(path) => Ok(unix_halves(UnixStream::connect(path).await?)),
        ControlAddr::Tcp { host, port } => Ok(tcp_halves(
            TcpStream::connect((host.as_str(), *port)).await?,
        )),
        ControlAddr::Vsock { cid, port } => {
            Ok(vsock_halves(VsockStream::connect(*cid, *port).await?))
        }
    }
}

fn unix_halves(stream: UnixStream) -> Halves {
    let (rd, wr) = stream.into_split();
    (Box::new(rd), Box::new(wr))
}

fn tcp_halves(stream: TcpStream) -> Halves {
    // Frames are written whole, often small (replies, acks): no Nagle delay on them.
    if let Err(err) = stream.set_nodelay(true) {
        tracing::debug!(error = %err, "TCP_NODELAY not set");
    }
    keepalive(&stream);
    let (rd, wr) = stream.into_split();
    (Box::new(rd), Box::new(wr))
}

/// TCP keepalive (first probe after 30 s of silence, then every 10 s, dead after 3
/// unanswered) and `TCP_USER_TIMEOUT` (unacknowledged data for 60 s), so that a peer behind a
/// path that went dark is noticed by the kernel even while neither side has anything to say.
fn keepalive(stream: &TcpStream) {
    use std::os::fd::AsRawFd as _;
    let fd = stream.as_raw_fd();
    let set = |level: libc::c_int, name: libc::c_int, value: libc::c_int| {
        // SAFETY: `fd` is an open socket owned by `stream`; the value is a c_int of the size
        // given, as these options expect.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                std::ptr::from_ref(&value).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            tracing::debug!(name, error = %std::io::Error::last_os_error(), "socket option not set");
        }
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 30);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 10);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3);
    set(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, 60_000);
}

fn vsock_halves(stream: VsockStream) -> Halves {
    let (rd, wr) = stream.split();
    (Box::new(rd), Box::new(wr))
}

/// Binds a unix socket with mode 0600, replacing a stale socket file.
fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    remove_stale(path)?;
    // The socket is created with mode 0600 rather than chmod'ed after: no window in which
    // another user could connect. The shim is single-threaded here.
    let old = umask(Mode::from_bits_truncate(0o177));
    let bound = std::os::unix::net::UnixListener::bind(path);
    umask(old);
    let listener = bound?;
    deepen_backlog(&listener);
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    UnixListener::from_std(listener)
}

/// Raises a listening socket's accept queue to [`BACKLOG`] (std listens with 128; calling
/// `listen` again on a listening socket changes its backlog).
fn deepen_backlog(listener: &impl std::os::fd::AsRawFd) {
    // SAFETY: the fd is a socket that `listener` owns and that is already listening.
    if unsafe { libc::listen(listener.as_raw_fd(), BACKLOG) } != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "listen backlog not raised");
    }
}

/// Removes a socket left by an earlier run; refuses to remove anything that is not a socket.
fn remove_stale(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => fs::remove_file(path),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        )),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err),
    }
}
