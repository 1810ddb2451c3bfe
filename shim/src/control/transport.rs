//! The byte streams under the control link: unix sockets, TCP and vsock, accepted or dialed.
//!
//! Everything above this module — the handshake, the replay buffer, the ids, the
//! sessions — sees a connection as a boxed read half and a boxed write half
//! ([`Halves`]) and never learns which transport or direction it came from.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
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
    /// Binds `addr`: a unix socket with mode 0600 (a dead socket file is replaced, a live
    /// one refused; the socket file is returned too), TCP (the host resolved now), or vsock.
    /// Must be called inside the runtime.
    pub(super) fn bind(addr: &ControlAddr) -> io::Result<(Self, Option<SocketFile>)> {
        match addr {
            ControlAddr::Unix(path) => {
                bind_unix(path).map(|(listener, file)| (Self::Unix(listener), Some(file)))
            }
            ControlAddr::Tcp { host, port } => {
                let listener = std::net::TcpListener::bind((host.as_str(), *port))?;
                deepen_backlog(&listener);
                listener.set_nonblocking(true)?;
                Ok((TcpListener::from_std(listener).map(Self::Tcp)?, None))
            }
            ControlAddr::Vsock { cid, port } => Ok((
                VsockListener::bind(*cid, *port, vsock::BACKLOG).map(Self::Vsock)?,
                None,
            )),
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

/// The socket file a unix listener created: its path and the identity (device, inode) it
/// had right after `bind`, so that only our own socket is ever removed.
#[derive(Debug, Clone)]
pub(super) struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    /// Removes the socket file if the path still names the socket we bound (`lstat`, no
    /// symlink followed): a second shim that took the path over, or anything the tenant put
    /// there, stays.
    pub(super) fn remove(&self) {
        match fs::symlink_metadata(&self.path) {
            Ok(meta)
                if meta.file_type().is_socket()
                    && (meta.dev(), meta.ino()) == (self.dev, self.ino) =>
            {
                if let Err(err) = fs::remove_file(&self.path) {
                    tracing::debug!(path = %self.path.display(), error = %err, "control socket not removed");
                }
            }
            Ok(_) => {
                tracing::warn!(path = %self.path.display(), "the control socket path is no longer ours: left in place");
            }
            Err(err) => {
                tracing::debug!(path = %self.path.display(), error = %err, "control socket already gone");
            }
        }
    }
}

/// Binds a unix socket with mode 0600, replacing a dead socket file only (see
/// [`remove_dead`]).
fn bind_unix(path: &Path) -> io::Result<(UnixListener, SocketFile)> {
    remove_dead(path)?;
    // The socket is created with mode 0600 (umask 0177) rather than chmod'ed after: no window
    // in which another user could connect, and no chmod that would follow a symlink put in
    // its place. The shim is single-threaded here.
    let old = umask(Mode::from_bits_truncate(0o177));
    let bound = std::os::unix::net::UnixListener::bind(path);
    umask(old);
    let listener = bound?;
    deepen_backlog(&listener);
    let meta = fs::symlink_metadata(path)?;
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} changed under us after bind", path.display()),
        ));
    }
    if meta.mode() & 0o077 != 0 {
        // A filesystem that ignores the umask for sockets: a socket, checked just now.
        fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    }
    let file = SocketFile {
        path: path.to_owned(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    listener.set_nonblocking(true)?;
    Ok((UnixListener::from_std(listener)?, file))
}

/// Raises a listening socket's accept queue to [`BACKLOG`] (std listens with 128; calling
/// `listen` again on a listening socket changes its backlog).
fn deepen_backlog(listener: &impl std::os::fd::AsRawFd) {
    // SAFETY: the fd is a socket that `listener` owns and that is already listening.
    if unsafe { libc::listen(listener.as_raw_fd(), BACKLOG) } != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "listen backlog not raised");
    }
}

/// Makes way for our socket at `path`: nothing there is fine; a socket nobody listens on (a
/// connect is refused) is a dead one left by an earlier run and is removed; a socket that
/// accepts a connection (or whose backlog is full) belongs to a live listener, most likely
/// another shim, and is never touched. Anything else (a symlink, a file) is refused too:
/// the path is looked at with `lstat` and nothing is followed.
fn remove_dead(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match probe_listener(path) {
            Ok(Liveness::Dead) => match fs::remove_file(path) {
                Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
                _ => Ok(()),
            },
            Ok(Liveness::Gone) => Ok(()),
            Ok(Liveness::Live) => Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "{} is the socket of a live listener (another shim?): not taken over",
                    path.display()
                ),
            )),
            Err(err) => Err(io::Error::new(
                err.kind(),
                format!(
                    "{} is a socket we cannot connect to, so it may be live: not taken over ({err})",
                    path.display()
                ),
            )),
        },
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        )),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err),
    }
}

/// What a connection attempt says about a socket file.
#[derive(Debug, PartialEq, Eq)]
enum Liveness {
    /// Someone listens: the connection was accepted, or the backlog is full.
    Live,
    /// Nobody listens (`ECONNREFUSED`).
    Dead,
    /// The file went away meanwhile.
    Gone,
}

/// Connects to `path` without blocking (a full backlog answers `EAGAIN` at once) and closes
/// the connection again.
fn probe_listener(path: &Path) -> io::Result<Liveness> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let sock = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    match connect(std::os::fd::AsRawFd::as_raw_fd(&sock), &addr) {
        Ok(()) | Err(Errno::EAGAIN | Errno::EINPROGRESS) => Ok(Liveness::Live),
        Err(Errno::ECONNREFUSED) => Ok(Liveness::Dead),
        Err(Errno::ENOENT) => Ok(Liveness::Gone),
        Err(err) => Err(err.into()),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener as StdListener;

    use super::*;

    /// A fresh directory under the temp dir, removed at the end.
    struct Dir(PathBuf);

    impl Dir {
        fn new(tag: &str) -> Dir {
            let d = std::env::temp_dir()
                .join(format!("agent-shim-transport-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&d);
            fs::create_dir_all(&d).unwrap();
            Dir(d)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_live_socket_is_refused_a_dead_one_replaced_anything_else_left_alone() {
        let dir = Dir::new("liveness");
        let path = dir.0.join("c.sock");
        assert_eq!(probe_listener(&path).unwrap(), Liveness::Gone);
        remove_dead(&path).unwrap();

        let live = StdListener::bind(&path).unwrap();
        assert_eq!(probe_listener(&path).unwrap(), Liveness::Live);
        let err = remove_dead(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        assert!(err.to_string().contains("live listener"), "{err}");
        assert!(path.exists(), "a live socket was removed");

        drop(live);
        assert_eq!(probe_listener(&path).unwrap(), Liveness::Dead);
        remove_dead(&path).unwrap();
        assert!(!path.exists(), "a dead socket was left");

        // A symlink to a live socket is not followed: refused, and both stay.
        let target = dir.0.join("other.sock");
        let _other = StdListener::bind(&target).unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let err = remove_dead(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert!(fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(target.exists());
    }

    #[test]
    fn only_our_own_socket_is_removed() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        let _entered = rt.enter();
        let dir = Dir::new("ours");
        let path = dir.0.join("c.sock");
        let (listener, file) = bind_unix(&path).unwrap();
        let meta = fs::symlink_metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        // Replaced by someone else's socket: left in place.
        fs::remove_file(&path).unwrap();
        let _theirs = StdListener::bind(&path).unwrap();
        file.remove();
        assert!(path.exists(), "another socket was removed");
        // Ours: removed.
        fs::remove_file(&path).unwrap();
        drop(listener);
        let (_listener, file) = bind_unix(&path).unwrap();
        file.remove();
        assert!(!path.exists(), "our socket was left");
    }
}
