//! A small vsock stream and listener on `libc` and tokio's `AsyncFd`: `AF_VSOCK` sockets are
//! ordinary non-blocking stream sockets, so readiness-driven `read`/`write` is all it takes.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is checked before use.
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
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn register(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the `OwnedFd` is moved into the `AsyncFd`, so the descriptor stays open and the
    // same for the `AsyncFd`'s whole life.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into_parts().1)
}

fn sockaddr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A connected vsock stream.
#[derive(Debug)]
pub(crate) struct VsockStream {
    fd: AsyncFd<OwnedFd>,
}

impl VsockStream {
    /// Connects to `cid:port` without blocking the runtime.
    pub(crate) async fn connect(cid: u32, port: u32) -> io::Result<Self> {
        let fd = socket()?;
        let addr = sockaddr(cid, port);
        // SAFETY: `addr` is a valid sockaddr_vm and the length is its size.
        let ret = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                std::ptr::from_ref(&addr).cast(),
                size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if ret < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINPROGRESS) {
                return Err(err);
            }
        }
        let fd = register(fd, Interest::READABLE | Interest::WRITABLE)?;
        if ret < 0 {
            let mut guard = fd.writable().await?;
            guard.clear_ready();
            socket_error(fd.get_ref().as_raw_fd())?;
        }
        Ok(Self { fd })
    }
}

fn socket_error(fd: RawFd) -> io::Result<()> {
    let mut err: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `err` and `len` are valid for writes of their sizes.
    check(unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            std::ptr::from_mut(&mut err).cast(),
            &mut len,
        )
    })?;
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
            let res = guard.try_io(|fd| {
                // SAFETY: `unfilled` is valid for writes of its length.
                let n = unsafe {
                    libc::read(fd.as_raw_fd(), unfilled.as_mut_ptr().cast(), unfilled.len())
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match res {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
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
            let res = guard.try_io(|fd| {
                // SAFETY: `data` is valid for reads of its length.
                let n = unsafe {
                    libc::send(
                        fd.as_raw_fd(),
                        data.as_ptr().cast(),
                        data.len(),
                        libc::MSG_NOSIGNAL,
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match res {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // SAFETY: plain syscall on a descriptor we own.
        Poll::Ready(check(unsafe {
            libc::shutdown(self.fd.get_ref().as_raw_fd(), libc::SHUT_WR)
        }))
    }
}

/// A listening vsock socket.
#[derive(Debug)]
pub(crate) struct VsockListener {
    fd: AsyncFd<OwnedFd>,
}

impl VsockListener {
    /// Binds `cid:port` (use `u32::MAX`, `VMADDR_CID_ANY`, for any) and listens.
    pub(crate) fn bind(cid: u32, port: u32) -> io::Result<Self> {
        let fd = socket()?;
        let addr = sockaddr(cid, port);
        // SAFETY: `addr` is a valid sockaddr_vm and the length is its size.
        check(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::from_ref(&addr).cast(),
                size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        })?;
        // SAFETY: plain syscall on a descriptor we own.
        check(unsafe { libc::listen(fd.as_raw_fd(), 1024) })?;
        Ok(Self {
            fd: register(fd, Interest::READABLE)?,
        })
    }

    /// Accepts one connection.
    pub(crate) async fn accept(&self) -> io::Result<VsockStream> {
        loop {
            let mut guard = self.fd.readable().await?;
            let res = guard.try_io(|fd| {
                // SAFETY: null address arguments are allowed; flags are valid.
                let n = unsafe {
                    libc::accept4(
                        fd.as_raw_fd(),
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    // SAFETY: `n` is a fresh descriptor that nothing else owns.
                    Ok(unsafe { OwnedFd::from_raw_fd(n) })
                }
            });
            match res {
                Ok(Ok(fd)) => {
                    return Ok(VsockStream {
                        fd: register(fd, Interest::READABLE | Interest::WRITABLE)?,
                    })
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}
