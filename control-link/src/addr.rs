//! The byte streams behind a control address (`unix:PATH`, `tcp:HOST:PORT` or
//! `vsock:CID:PORT`): dialing one, or binding and accepting on one.
//!
//! The address type itself is driver-protocol's [`Addr`], the one the shim parses its
//! `--control-listen` / `--control-connect` with, so that both ends agree on the syntax.

use std::io;

use driver_protocol::net::{Addr, AddrError, VsockListener, VsockStream};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::Error;

/// Connections waiting to be accepted on a vsock listener (as many as tokio's TCP
/// listeners allow).
const VSOCK_BACKLOG: u32 = 1024;

impl From<AddrError> for Error {
    fn from(err: AddrError) -> Self {
        Error::InvalidAddr {
            addr: err.addr().to_owned(),
            reason: err.reason().to_owned(),
        }
    }
}

/// Dials `addr`.
pub(crate) async fn dial(addr: &Addr) -> io::Result<BoxIo> {
    Ok(match addr {
        Addr::Unix(path) => Box::new(UnixStream::connect(path).await?),
        Addr::Tcp { host, port } => {
            let s = TcpStream::connect((host.as_str(), *port)).await?;
            s.set_nodelay(true)?;
            Box::new(s)
        }
        Addr::Vsock { cid, port } => Box::new(VsockStream::connect(*cid, *port).await?),
    })
}

/// Binds a listener on `addr` (a stale unix socket file is replaced).
pub(crate) async fn bind(addr: &Addr) -> io::Result<Bound> {
    Ok(match addr {
        Addr::Unix(path) => {
            if std::fs::symlink_metadata(path)
                .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
            {
                std::fs::remove_file(path)?;
            }
            Bound::Unix(UnixListener::bind(path)?)
        }
        Addr::Tcp { host, port } => Bound::Tcp(TcpListener::bind((host.as_str(), *port)).await?),
        Addr::Vsock { cid, port } => Bound::Vsock(VsockListener::bind(*cid, *port, VSOCK_BACKLOG)?),
    })
}

/// A byte stream to a shim, whatever the transport.
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A boxed [`Io`].
pub(crate) type BoxIo = Box<dyn Io>;

/// A bound listening socket.
#[derive(Debug)]
pub(crate) enum Bound {
    Unix(UnixListener),
    Tcp(TcpListener),
    Vsock(VsockListener),
}

impl Bound {
    /// Accepts one connection.
    pub(crate) async fn accept(&self) -> io::Result<BoxIo> {
        Ok(match self {
            Self::Unix(l) => Box::new(l.accept().await?.0),
            Self::Tcp(l) => {
                let (s, _) = l.accept().await?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
            Self::Vsock(l) => Box::new(l.accept().await?),
        })
    }

    /// The address actually bound (a TCP port 0 becomes the real port).
    pub(crate) fn local_addr(&self, asked: &Addr) -> Addr {
        match (self, asked) {
            (Self::Tcp(l), Addr::Tcp { host, .. }) => match l.local_addr() {
                Ok(a) => Addr::Tcp {
                    host: host.clone(),
                    port: a.port(),
                },
                Err(_) => asked.clone(),
            },
            _ => asked.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_errors_are_invalid_addr() {
        let err: Error = "tcp:h:99999".parse::<Addr>().unwrap_err().into();
        match err {
            Error::InvalidAddr { addr, reason } => {
                assert_eq!(addr, "tcp:h:99999");
                assert_eq!(reason, "invalid port \"99999\"");
            }
            other => panic!("not InvalidAddr: {other:?}"),
        }
    }
}
