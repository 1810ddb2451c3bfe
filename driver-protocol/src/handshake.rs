//! The handshake: `hello` each way, version negotiation, capabilities, and the control link's
//! token proof.
//!
//! Both ends send a [`Hello`] as their first frame without waiting for the other's, then each
//! calls [`negotiate`] on the pair. Both compute the same result: the highest version both
//! speak and the capabilities both offer. A failure is a [`HandshakeError`] whose
//! [`code`](HandshakeError::code) goes into the `error` reply sent before closing.
//!
//! ```
//! use driver_protocol::handshake::{negotiate, Negotiated};
//! use driver_protocol::message::{Hello, Role};
//!
//! let shim = Hello::new(Role::Shim, "agent-shim", "0.1.0").with_capabilities(["exec", "pty"]);
//! let driver = Hello::new(Role::Driver, "echo-driver", "1.2.3").with_capability("exec");
//! let n: Negotiated = negotiate(&shim, &driver)?;
//! assert_eq!(n.version, 1);
//! assert_eq!(n.capabilities, ["exec"]);
//! # Ok::<(), driver_protocol::handshake::HandshakeError>(())
//! ```
//!
//! # Authentication (control link)
//!
//! The control plane and the shim share a secret token that never crosses the wire. Each
//! puts a fresh random [`NONCE_LEN`]-byte `nonce` in its `hello`; then each sends
//! `auth{mac}` with `mac = `[`auth_proof`]`(token, own role, peer's nonce, own nonce)` and
//! checks the peer's with [`verify_proof`]. The role and the order of the nonces differ
//! between the two proofs, so neither side's proof can be reflected back as the other's.

use bytes::Bytes;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::message::{Hello, Role};
use crate::{ErrorCode, PROTOCOL_NAME, SUPPORTED_VERSIONS};

/// The length of a `hello` nonce, in bytes.
pub const NONCE_LEN: usize = 32;

/// The length of an `auth` proof (an HMAC-SHA256), in bytes.
pub const PROOF_LEN: usize = 32;

/// The domain-separation prefix of every proof.
const AUTH_CONTEXT: &[u8] = b"agent-shim-auth-v1\0";

impl Hello {
    /// A `hello` from this crate: protocol [`PROTOCOL_NAME`], every version in
    /// [`SUPPORTED_VERSIONS`], no capabilities, no agent id, no nonce.
    pub fn new(
        role: Role,
        software: impl Into<String>,
        software_version: impl Into<String>,
    ) -> Self {
        Self {
            protocol: PROTOCOL_NAME.to_owned(),
            versions: SUPPORTED_VERSIONS.to_vec(),
            role,
            software: software.into(),
            software_version: software_version.into(),
            capabilities: Vec::new(),
            agent_id: None,
            nonce: None,
            consumer: None,
            limits: None,
            cgroups: None,
            instance: None,
        }
    }

    /// Replaces the versions offered (for tests and for peers pinned to older versions).
    pub fn with_versions(mut self, versions: impl IntoIterator<Item = u32>) -> Self {
        self.versions = versions.into_iter().collect();
        self
    }

    /// Names the durable consumer this control client is (PROTOCOL.md §8.7).
    pub fn with_consumer(mut self, consumer: impl Into<String>) -> Self {
        self.consumer = Some(consumer.into());
        self
    }

    /// Adds one capability.
    pub fn with_capability(mut self, capability: impl Into<String>) -> Self {
        self.capabilities.push(capability.into());
        self
    }

    /// Adds capabilities.
    pub fn with_capabilities<S: Into<String>>(
        mut self,
        capabilities: impl IntoIterator<Item = S>,
    ) -> Self {
        self.capabilities
            .extend(capabilities.into_iter().map(Into::into));
        self
    }

    /// Sets the agent id (shim → control).
    pub fn with_agent_id(mut self, agent_id: impl Into<String>) -> Self {
        self.agent_id = Some(agent_id.into());
        self
    }

    /// Sets the authentication nonce (control link).
    pub fn with_nonce(mut self, nonce: [u8; NONCE_LEN]) -> Self {
        self.nonce = Some(Bytes::copy_from_slice(&nonce));
        self
    }
}

/// What both sides agreed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// The highest protocol version both speak.
    pub version: u32,
    /// The capabilities both offered, in our order, without duplicates.
    pub capabilities: Vec<String>,
    /// The peer's role.
    pub peer_role: Role,
}

impl Negotiated {
    /// Whether both sides offered `capability`.
    pub fn has(&self, capability: &str) -> bool {
        self.capabilities.iter().any(|c| c == capability)
    }
}

/// A handshake failed; the connection is closed after an `error` with [`Self::code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The peer's `hello` names another protocol.
    #[error("peer speaks protocol {got:?}, not {PROTOCOL_NAME:?}")]
    WrongProtocol {
        /// The protocol the peer named.
        got: String,
    },
    /// No version is spoken by both sides.
    #[error("no common protocol version (ours: {ours:?}, theirs: {theirs:?})")]
    UnsupportedVersion {
        /// The versions we speak.
        ours: Vec<u32>,
        /// The versions the peer speaks.
        theirs: Vec<u32>,
    },
    /// The two roles cannot talk to each other: exactly one end of every link is the shim.
    #[error("a {theirs:?} cannot talk to a {ours:?}")]
    RoleMismatch {
        /// Our role.
        ours: Role,
        /// The peer's role.
        theirs: Role,
    },
    /// The first message was not `hello`.
    #[error("expected hello, got {type_name:?}")]
    NotHello {
        /// The `type` received.
        type_name: String,
    },
    /// A nonce is missing or does not have [`NONCE_LEN`] bytes.
    #[error("nonce must be {NONCE_LEN} bytes, got {len:?}")]
    BadNonce {
        /// The length received; `None` when the nonce is missing.
        len: Option<usize>,
    },
    /// The peer's proof of the token is wrong or missing.
    #[error("authentication failed")]
    Unauthorized,
}

impl HandshakeError {
    /// The protocol error code a peer should receive for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::WrongProtocol { .. } | Self::BadNonce { .. } => ErrorCode::Malformed,
            Self::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            Self::RoleMismatch { .. } => ErrorCode::Invalid,
            Self::NotHello { .. } => ErrorCode::InvalidState,
            Self::Unauthorized => ErrorCode::Unauthorized,
        }
    }
}

/// Checks the peer's `hello` against ours and computes what both agree on.
///
/// The protocol must be [`PROTOCOL_NAME`]; exactly one side must be the shim; the version is
/// the highest in both lists; the capabilities are those in both lists.
pub fn negotiate(ours: &Hello, theirs: &Hello) -> Result<Negotiated, HandshakeError> {
    if theirs.protocol != PROTOCOL_NAME {
        return Err(HandshakeError::WrongProtocol {
            got: theirs.protocol.clone(),
        });
    }
    if (ours.role == Role::Shim) == (theirs.role == Role::Shim) {
        return Err(HandshakeError::RoleMismatch {
            ours: ours.role,
            theirs: theirs.role,
        });
    }
    let version = ours
        .versions
        .iter()
        .filter(|v| theirs.versions.contains(v))
        .max()
        .copied()
        .ok_or_else(|| HandshakeError::UnsupportedVersion {
            ours: ours.versions.clone(),
            theirs: theirs.versions.clone(),
        })?;
    let mut capabilities: Vec<String> = Vec::new();
    for c in &ours.capabilities {
        if theirs.capabilities.contains(c) && !capabilities.contains(c) {
            capabilities.push(c.clone());
        }
    }
    Ok(Negotiated {
        version,
        capabilities,
        peer_role: theirs.role,
    })
}

/// The nonce of a `hello`, checked to be [`NONCE_LEN`] bytes.
pub fn hello_nonce(hello: &Hello) -> Result<[u8; NONCE_LEN], HandshakeError> {
    let nonce = hello
        .nonce
        .as_ref()
        .ok_or(HandshakeError::BadNonce { len: None })?;
    <[u8; NONCE_LEN]>::try_from(&nonce[..]).map_err(|_| HandshakeError::BadNonce {
        len: Some(nonce.len()),
    })
}

fn role_name(role: Role) -> &'static [u8] {
    match role {
        Role::Driver => b"driver",
        Role::Shim => b"shim",
        Role::Control => b"control",
    }
}

fn proof_mac(token: &[u8], sender: Role, peer_nonce: &[u8], own_nonce: &[u8]) -> Hmac<Sha256> {
    let mut mac = hmac_sha256(token);
    for part in [
        AUTH_CONTEXT,
        role_name(sender),
        b"\0",
        peer_nonce,
        own_nonce,
    ] {
        mac.update(part);
    }
    mac
}

fn hmac_sha256(key: &[u8]) -> Hmac<Sha256> {
    // HMAC accepts keys of any length (long ones are hashed first): this cannot fail.
    match Hmac::<Sha256>::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    }
}

/// The `auth` proof that `sender` knows `token`:
///
/// ```text
/// HMAC-SHA256(key = token,
///             "agent-shim-auth-v1\0" || role name of sender || "\0" || peer_nonce || own_nonce)
/// ```
///
/// with the role name `driver`, `shim` or `control`, `peer_nonce` the nonce of the *other*
/// side's `hello` and `own_nonce` the sender's own.
pub fn auth_proof(
    token: &[u8],
    sender: Role,
    peer_nonce: &[u8],
    own_nonce: &[u8],
) -> [u8; PROOF_LEN] {
    proof_mac(token, sender, peer_nonce, own_nonce)
        .finalize()
        .into_bytes()
        .into()
}

/// Checks a proof made by [`auth_proof`] with the same arguments, in constant time.
///
/// `sender` is the role of the side that sent the proof; the nonces are from its point of
/// view (`peer_nonce` is the verifier's own nonce).
pub fn verify_proof(
    token: &[u8],
    sender: Role,
    peer_nonce: &[u8],
    own_nonce: &[u8],
    proof: &[u8],
) -> bool {
    proof_mac(token, sender, peer_nonce, own_nonce)
        .verify_slice(proof)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 2.
        let mut mac = hmac_sha256(b"Jefe");
        mac.update(b"what do ya want ");
        mac.update(b"for nothing?");
        assert_eq!(
            hex(&mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than the block size.
        let mut mac = hmac_sha256(&[0xaa; 131]);
        mac.update(b"Test Using Larger Than Block-Size Key - Hash Key First");
        assert_eq!(
            hex(&mac.finalize().into_bytes()),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn proof_is_hmac_over_the_documented_message() {
        let (peer, own) = ([1u8; NONCE_LEN], [2u8; NONCE_LEN]);
        let mut msg = b"agent-shim-auth-v1\0control\0".to_vec();
        msg.extend_from_slice(&peer);
        msg.extend_from_slice(&own);
        let mut mac = hmac_sha256(b"secret");
        mac.update(&msg);
        let want: [u8; 32] = mac.finalize().into_bytes().into();
        let proof = auth_proof(b"secret", Role::Control, &peer, &own);
        assert_eq!(proof, want);
        // The worked example quoted in docs/PROTOCOL.md.
        assert_eq!(
            hex(&proof),
            "9816c203fe7f74f7ccd3e2156de97605a22f24f8ad0b134dc1d5b1bedac39056"
        );
    }

    #[test]
    fn verify_accepts_only_the_right_proof() {
        let (a, b) = ([7u8; NONCE_LEN], [9u8; NONCE_LEN]);
        let proof = auth_proof(b"tok", Role::Shim, &a, &b);
        assert!(verify_proof(b"tok", Role::Shim, &a, &b, &proof));
        assert!(!verify_proof(b"tok2", Role::Shim, &a, &b, &proof));
        assert!(!verify_proof(b"tok", Role::Control, &a, &b, &proof));
        // A reflected proof (nonces swapped) does not verify.
        assert!(!verify_proof(b"tok", Role::Shim, &b, &a, &proof));
        assert!(!verify_proof(b"tok", Role::Shim, &a, &b, &proof[..31]));
        assert!(!verify_proof(b"tok", Role::Shim, &a, &b, &[]));
    }

    #[test]
    fn negotiation_picks_the_highest_common_version() {
        let shim = Hello::new(Role::Shim, "s", "1").with_versions([1, 2, 3]);
        let ctl = Hello::new(Role::Control, "c", "1").with_versions([2, 3, 4]);
        assert_eq!(negotiate(&shim, &ctl).unwrap().version, 3);
        assert_eq!(negotiate(&ctl, &shim).unwrap().version, 3);
        let old = Hello::new(Role::Driver, "d", "1").with_versions([0]);
        let err = negotiate(&shim, &old).unwrap_err();
        assert_eq!(err.code(), ErrorCode::UnsupportedVersion);
        assert_eq!(err.code().as_str(), "unsupported_version");
    }

    #[test]
    fn negotiation_intersects_capabilities_in_our_order() {
        let shim = Hello::new(Role::Shim, "s", "1").with_capabilities(["c", "a", "b", "a"]);
        let drv = Hello::new(Role::Driver, "d", "1").with_capabilities(["a", "c", "z"]);
        let n = negotiate(&shim, &drv).unwrap();
        assert_eq!(n.capabilities, ["c", "a"]);
        assert_eq!(n.peer_role, Role::Driver);
        assert!(n.has("a") && !n.has("b"));
    }

    #[test]
    fn negotiation_errors_have_stable_codes() {
        let shim = Hello::new(Role::Shim, "s", "1");
        let mut other = Hello::new(Role::Driver, "d", "1");
        other.protocol = "http".into();
        assert_eq!(
            negotiate(&shim, &other).unwrap_err().code().as_str(),
            "malformed"
        );
        let two_shims = negotiate(&shim, &Hello::new(Role::Shim, "s", "1")).unwrap_err();
        assert_eq!(two_shims.code().as_str(), "invalid");
        let no_shim = Hello::new(Role::Control, "c", "1");
        assert!(negotiate(&no_shim, &Hello::new(Role::Driver, "d", "1")).is_err());
        assert_eq!(HandshakeError::Unauthorized.code().as_str(), "unauthorized");
        let not_hello = HandshakeError::NotHello {
            type_name: "ping".into(),
        };
        assert_eq!(not_hello.code().as_str(), "invalid_state");
    }

    #[test]
    fn nonces_must_have_32_bytes() {
        let h = Hello::new(Role::Control, "c", "1");
        assert_eq!(hello_nonce(&h), Err(HandshakeError::BadNonce { len: None }));
        let h = h.with_nonce([5; NONCE_LEN]);
        assert_eq!(hello_nonce(&h).unwrap(), [5; NONCE_LEN]);
        let mut h = h;
        h.nonce = Some(Bytes::from_static(&[1, 2, 3]));
        assert_eq!(
            hello_nonce(&h),
            Err(HandshakeError::BadNonce { len: Some(3) })
        );
    }
}
