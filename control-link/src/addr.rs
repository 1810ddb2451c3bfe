//! Where a shim is: `unix:PATH`, `tcp:HOST:PORT` or `vsock:CID:PORT`, and the byte streams
//! behind each.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::str::FromStr;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::vsock::{VsockListener, VsockStream};
use crate::Error;

/// A control-link address, in the shim's own `--control-listen` / `--control-connect`
/// syntax.
///
/// ```
/// use control_link::Addr;
///
/// let a: Addr = "unix:/run/agent.sock".parse()?;
/// assert_eq!(a, Addr::Unix("/run/agent.sock".into()));
/// let t: Addr = "tcp:[::1]:7000".parse()?;
/// assert_eq!(t.to_string(), "tcp:[::1]:7000");
/// let v: Addr = "vsock:3:5000".parse()?;
/// assert_eq!(v, Addr::Vsock { cid: 3, port: 5000 });
/// assert!("http://x".parse::<Addr>().is_err());
/// # Ok::<(), control_link::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Addr {
    /// A unix stream socket at this path.
    Unix(PathBuf),
    /// A TCP address: a host name or IP address, and a port.
    Tcp {
        /// The host name or IP address (IPv6 without brackets).
        host: String,
        /// The port.
        port: u16,
    },
    /// A vsock address (a VM's context id and a port).
    Vsock {
        /// The context id (2 = the host, 3+ = guests).
        cid: u32,
        /// The port.
        port: u32,
    },
}

impl Addr {
    /// Whether the address may be used without a token (only unix sockets may).
    ///
    /// ```
    /// # use control_link::Addr;
    /// assert!(Addr::Unix("/s".into()).allows_insecure());
    /// assert!(!"tcp:h:1".parse::<Addr>()?.allows_insecure());
    /// # Ok::<(), control_link::Error>(())
    /// ```
    pub fn allows_insecure(&self) -> bool {
        matches!(self, Self::Unix(_))
    }

    /// Dials the address.
    pub(crate) async fn dial(&self) -> io::Result<BoxIo> {
        Ok(match self {
            Self::Unix(path) => Box::new(UnixStream::connect(path).await?),
            Self::Tcp { host, port } => {
                let s = TcpStream::connect((host.as_str(), *port)).await?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
            Self::Vsock { cid, port } => Box::new(VsockStream::connect(*cid, *port).await?),
        })
    }

    /// Binds a listener on the address (a stale unix socket file is replaced).
    pub(crate) async fn bind(&self) -> io::Result<Bound> {
        Ok(match self {
            Self::Unix(path) => {
                if std::fs::symlink_metadata(path)
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                {
                    std::fs::remove_file(path)?;
                }
                Bound::Unix(UnixListener::bind(path)?)
            }
            Self::Tcp { host, port } => {
                Bound::Tcp(TcpListener::bind((host.as_str(), *port)).await?)
            }
            Self::Vsock { cid, port } => Bound::Vsock(VsockListener::bind(*cid, *port)?),
        })
    }
}

impl FromStr for Addr {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = |reason: &str| Error::InvalidAddr {
            addr: s.to_owned(),
            reason: reason.to_owned(),
        };
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad("unix: needs a path"));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = s.strip_prefix("tcp:") {
            let (host, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| bad("expected tcp:HOST:PORT"))?;
            let host = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host);
            if host.is_empty() {
                return Err(bad("the host is empty"));
            }
            let port = port
                .parse()
                .map_err(|_| bad("the port is not a number 0-65535"))?;
            return Ok(Self::Tcp {
                host: host.to_owned(),
                port,
            });
        }
        if let Some(rest) = s.strip_prefix("vsock:") {
            let (cid, port) = rest
                .split_once(':')
                .ok_or_else(|| bad("expected vsock:CID:PORT"))?;
            let cid = cid.parse().map_err(|_| bad("the cid is not a u32"))?;
            let port = port.parse().map_err(|_| bad("the port is not a u32"))?;
            return Ok(Self::Vsock { cid, port });
        }
        Err(bad("expected unix:PATH, tcp:HOST:PORT or vsock:CID:PORT"))
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
            Self::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            Self::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            Self::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
        }
    }
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
    fn addresses_round_trip() {
        for s in [
            "unix:/tmp/a b.sock",
            "tcp:localhost:80",
            "tcp:127.0.0.1:0",
            "tcp:[::1]:7000",
            "vsock:2:1024",
        ] {
            let a: Addr = s.parse().unwrap();
            assert_eq!(a.to_string(), s);
        }
        for bad in [
            "unix:",
            "tcp:host",
            "tcp::80",
            "tcp:h:99999",
            "vsock:x:1",
            "vsock:1",
            "x",
        ] {
            assert!(bad.parse::<Addr>().is_err(), "{bad}");
        }
    }
}
