//! vsock streams (`AF_VSOCK`): the control link of a shim inside a microVM, and the control
//! plane's end of it on the host.
//!
//! A small hand-written transport on [`AsyncFd`] and `libc`, rather than the `tokio-vsock`
//! crate, which would bring `futures` and a second `nix` into the shim's static binary, which
//! is in every sandbox. `AF_VSOCK` sockets are ordinary non-blocking stream sockets, so
//! readiness-driven `read`/`send` is all it takes: listen and accept, connect (non-blocking,
//! completion awaited on writability, the outcome read from `SO_ERROR`), and read/write halves
//! that share one descriptor.
//!
//! Every socket is created `SOCK_NONBLOCK | SOCK_CLOEXEC`, so no child ever inherits one.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// A new non-blocking, close-on-exec vsock stream socket.
fn socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers.
    let fd = unsafe {
        libc::socket(
            libc::AF_VSOCK,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Registers `fd` with the runtime's reactor.
fn register(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the `OwnedFd` is moved into the `AsyncFd`, which owns it from here on: the
    // descriptor stays open and the same until the `AsyncFd` drops (and closes) it.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into_parts().1)
}

fn sockaddr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all zeroes is a valid value of it.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

const ADDR_LEN: libc::socklen_t = size_of::<libc::sockaddr_vm>() as libc::socklen_t;

/// `bind(2)` or `connect(2)`.
type AddrCall =
    unsafe extern "C" fn(libc::c_int, *const libc::sockaddr, libc::socklen_t) -> libc::c_int;

/// Calls `call` (`libc::bind` or `libc::connect`) on `fd` with the address `cid:port`; the
/// error it set, if any.
fn at_addr(fd: &OwnedFd, cid: u32, port: u32, call: AddrCall) -> io::Result<()> {
    let addr = sockaddr(cid, port);
    // SAFETY: `addr` is a valid sockaddr_vm of ADDR_LEN bytes that outlives the call, and
    // `fd` is an open socket.
    let rc = unsafe {
        call(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            ADDR_LEN,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A listening vsock socket.
#[derive(Debug)]
pub struct VsockListener {
    fd: AsyncFd<OwnedFd>,
}

impl VsockListener {
    /// Binds `cid:port` (`cid` [`VSOCK_CID_ANY`](super::VSOCK_CID_ANY) for every context id)
    /// and listens, with at most `backlog` connections waiting to be accepted. Must be called
    /// inside a tokio runtime.
    pub fn bind(cid: u32, port: u32, backlog: u32) -> io::Result<Self> {
        let fd = socket()?;
        at_addr(&fd, cid, port, libc::bind)?;
        let backlog = libc::c_int::try_from(backlog).unwrap_or(libc::c_int::MAX);
        // SAFETY: listen(2) takes no pointers.
        if unsafe { libc::listen(fd.as_raw_fd(), backlog) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            fd: register(fd, Interest::READABLE)?,
        })
    }

    /// The next connection.
    pub async fn accept(&self) -> io::Result<VsockStream> {
        loop {
            let mut guard = self.fd.readable().await?;
            let accepted = guard.try_io(|fd| {
                // SAFETY: null address pointers are allowed (the peer's address is not wanted).
                let new = unsafe {
                    libc::accept4(
                        fd.as_raw_fd(),
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    )
                };
                if new < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    // SAFETY: `new` was just returned by accept4 and is owned by nobody else.
                    Ok(unsafe { OwnedFd::from_raw_fd(new) })
                }
            });
            match accepted {
                Ok(result) => return VsockStream::new(result?),
                Err(_would_block) => continue,
            }
        }
    }
}

/// A connected vsock stream; [`Self::split`] gives halves that share the descriptor.
#[derive(Debug)]
pub struct VsockStream {
    fd: Arc<AsyncFd<OwnedFd>>,
}

impl VsockStream {
    fn new(fd: OwnedFd) -> io::Result<Self> {
        let fd = register(fd, Interest::READABLE | Interest::WRITABLE)?;
        Ok(Self { fd: Arc::new(fd) })
    }

    /// Connects to `cid:port` without blocking the runtime. Must be called inside a tokio
    /// runtime. Bound it with a timeout: a peer that never answers leaves it pending.
    pub async fn connect(cid: u32, port: u32) -> io::Result<Self> {
        let fd = socket()?;
        let pending = match at_addr(&fd, cid, port, libc::connect) {
            Ok(()) => false,
            Err(err) if err.raw_os_error() == Some(libc::EINPROGRESS) => true,
            Err(err) => return Err(err),
        };
        let stream = Self::new(fd)?;
        if pending {
            // The writability is left set: the socket is writable, and the first write must
            // not wait for an edge that will not come.
            drop(stream.fd.writable().await?);
            so_error(stream.fd.get_ref().as_raw_fd())?;
        }
        Ok(stream)
    }

    /// A read half and a write half: both are the same stream, one reads while the other
    /// writes.
    pub fn split(self) -> (Self, Self) {
        (
            Self {
                fd: Arc::clone(&self.fd),
            },
            self,
        )
    }
}

/// The pending error of a socket (the outcome of a non-blocking connect).
fn so_error(fd: RawFd) -> io::Result<()> {
    let mut err: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `err` and `len` are valid for writes and sized as getsockopt expects.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            std::ptr::addr_of_mut!(err).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if err != 0 {
        return Err(io::Error::from_raw_os_error(err));
    }
    Ok(())
}

impl AsyncRead for VsockStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let read = guard.try_io(|fd| {
                // SAFETY: `unfilled` is valid for writes of its length.
                let n = unsafe {
                    libc::read(fd.as_raw_fd(), unfilled.as_mut_ptr().cast(), unfilled.len())
                };
                usize::try_from(n).map_err(|_| io::Error::last_os_error())
            });
            match read {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(err)) => return Poll::Ready(Err(err)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for VsockStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            let written = guard.try_io(|fd| {
                // SAFETY: `data` is valid for reads of its length. MSG_NOSIGNAL: a closed peer
                // is an EPIPE error, not a SIGPIPE.
                let n = unsafe {
                    libc::send(
                        fd.as_raw_fd(),
                        data.as_ptr().cast(),
                        data.len(),
                        libc::MSG_NOSIGNAL,
                    )
                };
                usize::try_from(n).map_err(|_| io::Error::last_os_error())
            });
            match written {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // SAFETY: shutdown(2) takes no pointers.
        if unsafe { libc::shutdown(self.fd.get_ref().as_raw_fd(), libc::SHUT_WR) } != 0 {
            return Poll::Ready(Err(io::Error::last_os_error()));
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// `VMADDR_CID_LOCAL`: the loopback context id (module `vsock_loopback`).
    const CID_LOCAL: u32 = 1;

    /// Over the loopback transport if this machine has one; otherwise a loud skip.
    #[test]
    fn loopback_round_trip_when_available() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let port = 30_000 + (std::process::id() % 10_000);
            let listener = match VsockListener::bind(CID_LOCAL, port, 8) {
                Ok(l) => l,
                Err(err) => {
                    eprintln!("SKIPPED (vsock): {err}");
                    return;
                }
            };
            let within = Duration::from_secs(10);
            let (dialed, accepted) = tokio::time::timeout(within, async {
                tokio::join!(VsockStream::connect(CID_LOCAL, port), listener.accept())
            })
            .await
            .expect("connect and accept within 10 s");
            let (mut rd, mut wr) = dialed.expect("connect").split();
            let mut peer = accepted.expect("accept");

            tokio::time::timeout(within, async {
                wr.write_all(b"ping").await.unwrap();
                let mut got = [0; 4];
                peer.read_exact(&mut got).await.unwrap();
                assert_eq!(&got, b"ping");
                peer.write_all(b"pong").await.unwrap();
                peer.shutdown().await.unwrap();
                let mut back = Vec::new();
                rd.read_to_end(&mut back).await.unwrap();
                assert_eq!(back, b"pong");
            })
            .await
            .expect("round trip within 10 s");
        });
    }

    #[test]
    fn connect_to_nobody_fails() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            // Port 1 on the loopback CID has no listener (or there is no vsock at all):
            // an error either way, never a stream, and never a hang.
            let dialed =
                tokio::time::timeout(Duration::from_secs(10), VsockStream::connect(CID_LOCAL, 1))
                    .await
                    .expect("an answer within 10 s");
            assert!(dialed.is_err());
        });
    }
}
