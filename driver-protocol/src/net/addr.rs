//! Control addresses: `unix:PATH`, `tcp:HOST:PORT`, `vsock:CID:PORT`.
//!
//! One type names every end of a control link: the address a shim listens on
//! (`--control-listen`) or dials (`--control-connect`), and the one a control plane connects
//! to or listens on. Parsing checks the form only; names are resolved when a socket is bound
//! or dialed.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// `VMADDR_CID_ANY`: listen on every context id of the machine (written `any`).
pub const VSOCK_CID_ANY: u32 = u32::MAX;

/// A control-link endpoint.
///
/// ```
/// use driver_protocol::net::Addr;
///
/// let a: Addr = "unix:/run/agent.sock".parse()?;
/// assert_eq!(a, Addr::Unix("/run/agent.sock".into()));
/// let t: Addr = "tcp:[::1]:7000".parse()?;
/// assert_eq!(t, Addr::Tcp { host: "::1".into(), port: 7000 });
/// assert_eq!(t.to_string(), "tcp:[::1]:7000");
/// let v: Addr = "vsock:any:5000".parse()?;
/// assert_eq!(v.to_string(), "vsock:any:5000");
/// assert!("http://x".parse::<Addr>().is_err());
/// # Ok::<(), driver_protocol::net::AddrError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Addr {
    /// A unix stream socket at this path.
    Unix(PathBuf),
    /// TCP: a host (IPv4 or IPv6 literal, or a name) and a port.
    Tcp {
        /// The host, without the brackets of an IPv6 literal.
        host: String,
        /// The port.
        port: u16,
    },
    /// vsock (virtio sockets between a microVM and its host).
    Vsock {
        /// The context id (2 = the host, 3+ = guests; [`VSOCK_CID_ANY`] for `any`, listening
        /// only).
        cid: u32,
        /// The port.
        port: u32,
    },
}

impl Addr {
    /// Whether the transport leaves the sandbox's own filesystem (TCP, vsock): such a
    /// control link always needs a token.
    ///
    /// ```
    /// # use driver_protocol::net::Addr;
    /// assert!("vsock:2:1024".parse::<Addr>()?.is_network());
    /// assert!(!Addr::Unix("/s".into()).is_network());
    /// # Ok::<(), driver_protocol::net::AddrError>(())
    /// ```
    pub fn is_network(&self) -> bool {
        !matches!(self, Self::Unix(_))
    }

    /// Whether the address may be used without a token: only a unix socket may (the
    /// converse of [`Self::is_network`]).
    ///
    /// ```
    /// # use driver_protocol::net::Addr;
    /// assert!(Addr::Unix("/s".into()).allows_insecure());
    /// assert!(!"tcp:h:1".parse::<Addr>()?.allows_insecure());
    /// # Ok::<(), driver_protocol::net::AddrError>(())
    /// ```
    pub fn allows_insecure(&self) -> bool {
        !self.is_network()
    }
}

/// A string that is not a control address: the text given and what is wrong with it.
///
/// ```
/// # use driver_protocol::net::Addr;
/// let err = "tcp:fe80::1:5".parse::<Addr>().unwrap_err();
/// assert_eq!(err.addr(), "tcp:fe80::1:5");
/// assert!(err.reason().contains("brackets"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddrError {
    addr: String,
    reason: String,
    /// No `unix:`, `tcp:` or `vsock:` prefix at all.
    unknown_scheme: bool,
}

impl AddrError {
    fn new(addr: &str, reason: String) -> Self {
        Self {
            addr: addr.to_owned(),
            reason,
            unknown_scheme: false,
        }
    }

    /// The text given (without surrounding whitespace).
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// What is wrong with it.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for AddrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.unknown_scheme {
            write!(
                f,
                "invalid control address {:?} ({})",
                self.addr, self.reason
            )
        } else {
            write!(f, "{}: {}", self.addr, self.reason)
        }
    }
}

impl std::error::Error for AddrError {}

impl FromStr for Addr {
    type Err = AddrError;

    /// Parses `unix:PATH`, `tcp:HOST:PORT` (`[v6]` in brackets) or `vsock:CID:PORT` (CID a
    /// number, or `any`).
    fn from_str(s: &str) -> Result<Self, AddrError> {
        let s = s.trim();
        let bad = |reason: String| AddrError::new(s, reason);
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad("unix: needs a path".to_owned()));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = s.strip_prefix("tcp:") {
            let (host, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| bad("expected tcp:HOST:PORT".to_owned()))?;
            let host = match host.strip_prefix('[') {
                Some(v6) => v6
                    .strip_suffix(']')
                    .filter(|h| h.parse::<std::net::Ipv6Addr>().is_ok())
                    .ok_or_else(|| bad("bad IPv6 address in brackets".to_owned()))?,
                None if host.contains(':') => {
                    return Err(bad(
                        "an IPv6 address goes in brackets: tcp:[::1]:PORT".to_owned()
                    ))
                }
                None => host,
            };
            if host.is_empty() {
                return Err(bad(
                    "tcp: needs a host (0.0.0.0 for every address)".to_owned()
                ));
            }
            let port = port
                .parse::<u16>()
                .map_err(|_| bad(format!("invalid port {port:?}")))?;
            return Ok(Self::Tcp {
                host: host.to_owned(),
                port,
            });
        }
        if let Some(rest) = s.strip_prefix("vsock:") {
            let (cid, port) = rest
                .split_once(':')
                .ok_or_else(|| bad("expected vsock:CID:PORT".to_owned()))?;
            let cid = match cid {
                "any" => VSOCK_CID_ANY,
                n => n
                    .parse::<u32>()
                    .map_err(|_| bad(format!("invalid vsock CID {cid:?} (a number, or any)")))?,
            };
            let port = port
                .parse::<u32>()
                .map_err(|_| bad(format!("invalid vsock port {port:?}")))?;
            return Ok(Self::Vsock { cid, port });
        }
        Err(AddrError {
            unknown_scheme: true,
            ..bad("expected unix:PATH, tcp:HOST:PORT or vsock:CID:PORT".to_owned())
        })
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
            Self::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            Self::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            Self::Vsock { cid, port } if *cid == VSOCK_CID_ANY => write!(f, "vsock:any:{port}"),
            Self::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
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
            "unix:/x",
            "tcp:localhost:80",
            "tcp:127.0.0.1:0",
            "tcp:[::1]:7000",
            "vsock:2:1024",
            "vsock:any:9",
        ] {
            let a: Addr = s.parse().unwrap();
            assert_eq!(a.to_string(), s);
            assert_eq!(a.is_network(), !s.starts_with("unix:"));
            assert_eq!(a.allows_insecure(), !a.is_network());
        }
        assert_eq!(
            " vsock:3:5\n".parse::<Addr>(),
            Ok(Addr::Vsock { cid: 3, port: 5 })
        );
        for bad in [
            "unix:",
            "/x",
            "x",
            "tcp:host",
            "tcp:h",
            "tcp::80",
            "tcp::1",
            "tcp:h:-1",
            "tcp:h:99999",
            "tcp:[nope]:1",
            "tcp:fe80::1:5",
            "vsock:x:1",
            "vsock:a:1",
            "vsock:1",
            "vsock:1:-1",
        ] {
            assert!(bad.parse::<Addr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn error_messages() {
        let msg = |s: &str| s.parse::<Addr>().unwrap_err().to_string();
        assert_eq!(msg("unix:"), "unix:: unix: needs a path");
        assert_eq!(msg("tcp:h"), "tcp:h: expected tcp:HOST:PORT");
        assert_eq!(
            msg("tcp:fe80::1:5"),
            "tcp:fe80::1:5: an IPv6 address goes in brackets: tcp:[::1]:PORT"
        );
        assert_eq!(msg("tcp:[x]:5"), "tcp:[x]:5: bad IPv6 address in brackets");
        assert_eq!(
            msg("tcp::5"),
            "tcp::5: tcp: needs a host (0.0.0.0 for every address)"
        );
        assert_eq!(msg("tcp:h:x"), "tcp:h:x: invalid port \"x\"");
        assert_eq!(
            msg("vsock:a:1"),
            "vsock:a:1: invalid vsock CID \"a\" (a number, or any)"
        );
        assert_eq!(msg("vsock:1:p"), "vsock:1:p: invalid vsock port \"p\"");
        assert_eq!(
            msg(" http://x "),
            "invalid control address \"http://x\" \
             (expected unix:PATH, tcp:HOST:PORT or vsock:CID:PORT)"
        );
        let err = "vsock:1".parse::<Addr>().unwrap_err();
        assert_eq!(
            (err.addr(), err.reason()),
            ("vsock:1", "expected vsock:CID:PORT")
        );
    }
}
