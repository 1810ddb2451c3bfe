//! Who a connection comes from, as far as the [gate](super::gate) is concerned: its
//! *source*.
//!
//! The one thing a source must capture is **inside versus outside**. Everything inside the
//! sandbox is the tenant's, and the tenant can pick any of its addresses: every loopback
//! address (all of 127/8 can be bound without privilege, and `::1`), every address of the
//! sandbox's own interfaces, a unix socket from any process of its pid namespace. All of these
//! are **one** source, [`Source::Inside`], so that no choice of address gives the tenant more
//! than one share of the gate.
//!
//! | transport | peer | source |
//! |---|---|---|
//! | TCP | loopback, the accepted socket's own local address, any address of our interfaces (IPv4-mapped IPv6 normalised) | `Inside` |
//! | TCP | IPv4 from elsewhere | its /24 |
//! | TCP | IPv6 from elsewhere | its /64 |
//! | unix | a process visible in our pid namespace (`SO_PEERCRED` pid ≠ 0), or credentials unknown | `Inside` |
//! | unix | a process outside our pid namespace (pid 0: the host, a sidecar of another namespace) | by uid |
//! | vsock | any (only the host reaches a guest's listener) | one source |
//!
//! A peer outside is grouped by network so that one attacker outside with many addresses is
//! one source too; the price is that peers of one /24 (pods of one node, say) share a share.
//! A shim that does not run in a pid namespace of its own sees every unix client's pid: all of
//! them are the inside, one source (the socket is root's, mode 0600, anyway).
//! Likewise a sandbox that shares the host's network namespace (`--network host`) cannot tell
//! a control plane on the host's loopback from the tenant: both are the inside. A control
//! plane there should use a unix socket from outside the pid namespace, or vsock.
//!
//! A tenant with `CAP_NET_ADMIN` that adds the control plane's address to its own interface
//! would make it the inside too, but it has then broken the route to the control plane
//! anyway (replies to that address stay local).
//!
//! The sandbox's own addresses are read with `getifaddrs(3)` at most every
//! [`REFRESH_EVERY`], and only for a peer that is neither loopback nor the accepted socket's
//! local address.

use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// How long the list of the sandbox's own addresses is trusted.
pub(super) const REFRESH_EVERY: Duration = Duration::from_secs(2);

/// The most interface addresses kept.
const MAX_OWN: usize = 1024;

/// A source of connections (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Source {
    /// Anything inside the sandbox.
    Inside,
    /// An IPv4 /24 outside.
    Net4([u8; 3]),
    /// An IPv6 /64 outside.
    Net6([u8; 8]),
    /// A unix client outside our pid namespace, by uid.
    Uid(u32),
    /// Any vsock client.
    Vsock,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Inside => f.write_str("inside"),
            Self::Net4([a, b, c]) => write!(f, "{a}.{b}.{c}.0/24"),
            Self::Net6(p) => {
                let mut full = [0u8; 16];
                full[..8].copy_from_slice(p);
                write!(f, "{}/64", std::net::Ipv6Addr::from(full))
            }
            Self::Uid(uid) => write!(f, "uid {uid}"),
            Self::Vsock => f.write_str("vsock"),
        }
    }
}

/// Classifies peers; remembers the sandbox's own addresses for a while.
#[derive(Debug, Default)]
pub(super) struct Classifier {
    own: Vec<IpAddr>,
    read_at: Option<Instant>,
}

impl Classifier {
    /// The source of a TCP peer at `peer`, accepted on local address `local`.
    pub(super) fn tcp(&mut self, peer: IpAddr, local: Option<IpAddr>, now: Instant) -> Source {
        let peer = peer.to_canonical();
        if peer.is_loopback()
            || peer.is_unspecified()
            || local.map(|l| l.to_canonical()) == Some(peer)
        {
            return Source::Inside;
        }
        if self
            .read_at
            .is_none_or(|at| now.saturating_duration_since(at) >= REFRESH_EVERY)
        {
            self.read_at = Some(now);
            match own_addresses() {
                Ok(own) => self.own = own,
                Err(err) => tracing::debug!(error = %err, "getifaddrs failed"),
            }
        }
        if self.own.contains(&peer) {
            return Source::Inside;
        }
        outside(peer)
    }

    /// The source of a unix peer with credentials `(uid, pid)`, if known.
    pub(super) fn unix(cred: Option<(u32, Option<i32>)>) -> Source {
        match cred {
            // pid 0: the peer is in no pid namespace we can see, i.e. outside the sandbox.
            Some((uid, Some(0))) => Source::Uid(uid),
            _ => Source::Inside,
        }
    }
}

/// An outside peer's network.
fn outside(peer: IpAddr) -> Source {
    match peer {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            Source::Net4([a, b, c])
        }
        IpAddr::V6(v6) => {
            let mut prefix = [0u8; 8];
            prefix.copy_from_slice(&v6.octets()[..8]);
            Source::Net6(prefix)
        }
    }
}

/// The addresses of the sandbox's interfaces (`getifaddrs(3)`), at most [`MAX_OWN`].
fn own_addresses() -> std::io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `head` is a valid place for the list's address; on success the list is ours
    // until freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() && out.len() < MAX_OWN {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let node = unsafe { &*cur };
        if !node.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr whose family says its true type; the
            // reads below use the type the family names.
            let family = i32::from(unsafe { (*node.ifa_addr).sa_family });
            if family == libc::AF_INET {
                // SAFETY: an AF_INET address is a sockaddr_in.
                let sin = unsafe { &*node.ifa_addr.cast::<libc::sockaddr_in>() };
                out.push(IpAddr::from(
                    u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                ));
            } else if family == libc::AF_INET6 {
                // SAFETY: an AF_INET6 address is a sockaddr_in6.
                let sin6 = unsafe { &*node.ifa_addr.cast::<libc::sockaddr_in6>() };
                out.push(IpAddr::from(sin6.sin6_addr.s6_addr).to_canonical());
            }
        }
        cur = node.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once; no reference into it remains.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_own_and_mapped_addresses_are_the_inside_others_group_by_network() {
        let mut c = Classifier::default();
        let now = Instant::now();
        let local: IpAddr = [10, 9, 0, 2].into();
        let tcp = |c: &mut Classifier, ip: &str| c.tcp(ip.parse().unwrap(), Some(local), now);
        for inside in [
            "127.0.0.1",
            "127.3.200.9",
            "::1",
            "::ffff:127.0.0.5",
            "10.9.0.2",
            "::ffff:10.9.0.2",
        ] {
            assert_eq!(tcp(&mut c, inside), Source::Inside, "{inside}");
        }
        assert_eq!(tcp(&mut c, "10.9.0.1"), Source::Net4([10, 9, 0]));
        assert_eq!(tcp(&mut c, "::ffff:10.9.0.77"), Source::Net4([10, 9, 0]));
        assert_eq!(tcp(&mut c, "192.168.4.1"), Source::Net4([192, 168, 4]));
        assert_eq!(
            tcp(&mut c, "2001:db8:1:2:aaaa::1"),
            tcp(&mut c, "2001:db8:1:2:bbbb::9")
        );
        assert_ne!(
            tcp(&mut c, "2001:db8:1:2::1"),
            tcp(&mut c, "2001:db8:1:3::1")
        );
        assert_eq!(
            tcp(&mut c, "2001:db8:1:2::1").to_string(),
            "2001:db8:1:2::/64"
        );
    }

    #[test]
    fn every_address_of_our_interfaces_is_the_inside() {
        let own = own_addresses().unwrap();
        assert!(own.iter().any(IpAddr::is_loopback), "{own:?}");
        let mut c = Classifier::default();
        for ip in own {
            assert_eq!(c.tcp(ip, None, Instant::now()), Source::Inside, "{ip}");
        }
    }

    #[test]
    fn unix_peers_outside_our_pid_namespace_count_by_uid() {
        assert_eq!(Classifier::unix(Some((0, Some(0)))), Source::Uid(0));
        assert_eq!(Classifier::unix(Some((1000, Some(0)))), Source::Uid(1000));
        assert_eq!(Classifier::unix(Some((0, Some(42)))), Source::Inside);
        assert_eq!(Classifier::unix(Some((1000, None))), Source::Inside);
        assert_eq!(Classifier::unix(None), Source::Inside);
    }
}
