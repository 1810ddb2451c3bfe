//! Control addresses: `unix:PATH`, `tcp:HOST:PORT`, `vsock:CID:PORT`.
//!
//! One type names both ends the shim can take: the address it listens on
//! (`--control-listen`) and the one it dials (`--control-connect`). Parsing checks the form
//! only; names are resolved when a socket is bound or dialed.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// `VMADDR_CID_ANY`: listen on every context id of the machine.
pub const VSOCK_CID_ANY: u32 = u32::MAX;

/// A control endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlAddr {
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
        /// The context id ([`VSOCK_CID_ANY`] for `any`, listening only).
        cid: u32,
        /// The port.
        port: u32,
    },
}

impl ControlAddr {
    /// Whether the transport leaves the sandbox's own filesystem (TCP, vsock): such a
    /// control link always needs a token.
    pub fn is_network(&self) -> bool {
        !matches!(self, Self::Unix(_))
    }
}

impl FromStr for ControlAddr {
    type Err = String;

    /// Parses `unix:PATH`, `tcp:HOST:PORT` (`[v6]` in brackets) or `vsock:CID:PORT` (CID a
    /// number, or `any`).
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(format!("{s}: unix: needs a path"));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = s.strip_prefix("tcp:") {
            let (host, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| format!("{s}: expected tcp:HOST:PORT"))?;
            let host = match host.strip_prefix('[') {
                Some(v6) => v6
                    .strip_suffix(']')
                    .filter(|h| h.parse::<std::net::Ipv6Addr>().is_ok())
                    .ok_or_else(|| format!("{s}: bad IPv6 address in brackets"))?,
                None if host.contains(':') => {
                    return Err(format!(
                        "{s}: an IPv6 address goes in brackets: tcp:[::1]:PORT"
                    ))
                }
                None => host,
            };
            if host.is_empty() {
                return Err(format!(
                    "{s}: tcp: needs a host (0.0.0.0 for every address)"
                ));
            }
            let port = port
                .parse::<u16>()
                .map_err(|_| format!("{s}: invalid port {port:?}"))?;
            return Ok(Self::Tcp {
                host: host.to_owned(),
                port,
            });
        }
        if let Some(rest) = s.strip_prefix("vsock:") {
            let (cid, port) = rest
                .split_once(':')
                .ok_or_else(|| format!("{s}: expected vsock:CID:PORT"))?;
            let cid = match cid {
                "any" => VSOCK_CID_ANY,
                n => n
                    .parse::<u32>()
                    .map_err(|_| format!("{s}: invalid vsock CID {cid:?} (a number, or any)"))?,
            };
            let port = port
                .parse::<u32>()
                .map_err(|_| format!("{s}: invalid vsock port {port:?}"))?;
            return Ok(Self::Vsock { cid, port });
        }
        Err(format!(
            "invalid control address {s:?} (expected unix:PATH, tcp:HOST:PORT or vsock:CID:PORT)"
        ))
    }
}

impl fmt::Display for ControlAddr {
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
