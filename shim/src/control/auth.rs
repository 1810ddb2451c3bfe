//! Authentication of the control link (PROTOCOL.md §8.2): the token, the nonces, and the
//! handshake every connection goes through before it may become the live one.
//!
//! ```text
//!  shim sends hello{nonce: Ns}          (fresh 32 random bytes per connection)
//!  AwaitHello ── control hello ──► checks: protocol, version, role; with a token a 32-byte
//!      │                           nonce Nc (absent: unauthorized, wrong length: malformed)
//!      ▼
//!  AwaitAuth ─── auth{mac} ──────► mac = proof("control", Ns, Nc)? else unauthorized
//!      │                           shim sends auth{proof("shim", Nc, Ns)}
//!      ▼
//!  Live          (without a token — an insecure unix socket — straight from AwaitHello)
//! ```
//!
//! [`Handshake`] is the pure state machine (unit-tested without sockets); the connection
//! feeds it the peer's first messages and sends what it returns.

use std::io::{self, Read as _};
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use driver_protocol::handshake::{self, NONCE_LEN};
use driver_protocol::message::{Auth, ControlToShim, Hello, Message as _, Role};
use driver_protocol::ErrorCode;
use thiserror::Error;

/// The largest token file read.
const MAX_TOKEN: u64 = 64 * 1024;

/// The shared secret of the control link: driver-protocol's, one type for both ends. Its
/// `Debug` never shows it.
pub use driver_protocol::Token;

/// Reads the control token file (`--control-token-file`): its contents as a line (trailing
/// newlines are not part of the token), from a regular file owned by us (or root) and
/// neither group- nor other-accessible (mode & 0o077 == 0), so that no non-root process of
/// the sandbox can read it. (driver-protocol's `Token::from_file` makes none of these
/// checks: the shim never uses it.)
pub fn read_token_file(path: &Path) -> Result<Token, TokenError> {
    let display = path.display().to_string();
    let io_err = |source| TokenError::Read {
        path: display.clone(),
        source,
    };
    // The checks are made on the opened file, not on the path: no window between them.
    // Non-blocking: a FIFO put in its place opens at once, and is refused as not a file.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(io_err)?;
    let meta = file.metadata().map_err(io_err)?;
    if !meta.is_file() {
        return Err(TokenError::NotAFile { path: display });
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(TokenError::Permissions {
            path: display,
            mode,
        });
    }
    // SAFETY: geteuid cannot fail and has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != euid && meta.uid() != 0 {
        return Err(TokenError::Owner {
            path: display,
            uid: meta.uid(),
        });
    }
    let mut bytes = Vec::new();
    (&mut file)
        .take(MAX_TOKEN + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    if bytes.len() as u64 > MAX_TOKEN {
        return Err(TokenError::TooLong { path: display });
    }
    Token::from_line(bytes).map_err(|_| TokenError::Empty)
}

/// Why the token could not be loaded; the shim does not start.
#[derive(Debug, Error)]
pub enum TokenError {
    /// The token (file contents or variable) is empty.
    #[error("the control token is empty")]
    Empty,
    /// The token file could not be read.
    #[error("cannot read the control token file {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The token file is not a regular file.
    #[error("the control token file {path} is not a regular file")]
    NotAFile {
        /// The file.
        path: String,
    },
    /// The token file is group- or other-accessible.
    #[error(
        "the control token file {path} has mode {mode:04o}: it must be readable by its owner \
         only (chmod 600)"
    )]
    Permissions {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// The token file belongs to another user.
    #[error("the control token file {path} belongs to uid {uid}: it must be ours or root's")]
    Owner {
        /// The file.
        path: String,
        /// Its owner.
        uid: u32,
    },
    /// The token file is over 64 KiB.
    #[error("the control token file {path} is over 64 KiB")]
    TooLong {
        /// The file.
        path: String,
    },
}

/// `NONCE_LEN` fresh random bytes from the kernel (`getrandom(2)`).
pub(super) fn nonce() -> io::Result<[u8; NONCE_LEN]> {
    let mut out = [0u8; NONCE_LEN];
    crate::sys::getrandom(&mut out)?;
    Ok(out)
}

/// A handshake failure: the code and message of the `error` sent before closing.
pub(super) type Refusal = (ErrorCode, String);

/// What the handshake wants done after a message.
#[derive(Debug, PartialEq)]
pub(super) enum Step {
    /// Wait for the next message.
    Continue,
    /// Authenticated (or no token): send these messages (our `auth`, if any), then the
    /// connection may become the live one.
    Live {
        /// The peer's `hello`.
        hello: Box<Hello>,
        /// Our `auth`, to send before anything else.
        auth: Option<Auth>,
    },
}

#[derive(Debug)]
enum State {
    AwaitHello,
    AwaitAuth {
        hello: Box<Hello>,
        peer_nonce: [u8; NONCE_LEN],
    },
    Done,
}

/// One connection's handshake, from the shim's side.
#[derive(Debug)]
pub(super) struct Handshake {
    /// Our hello (with our nonce when there is a token).
    ours: Hello,
    token: Option<Token>,
    nonce: [u8; NONCE_LEN],
    state: State,
}

impl Handshake {
    /// A handshake whose `hello` is `template` plus, with a token, `nonce`.
    pub(super) fn new(template: &Hello, token: Option<Token>, nonce: [u8; NONCE_LEN]) -> Self {
        let mut ours = template.clone();
        if token.is_some() {
            ours = ours.with_nonce(nonce);
        }
        Self {
            ours,
            token,
            nonce,
            state: State::AwaitHello,
        }
    }

    /// The `hello` to send first.
    pub(super) fn hello(&self) -> &Hello {
        &self.ours
    }

    /// Takes the peer's next message.
    pub(super) fn on_message(&mut self, msg: ControlToShim) -> Result<Step, Refusal> {
        match std::mem::replace(&mut self.state, State::Done) {
            State::AwaitHello => self.on_hello(msg),
            State::AwaitAuth { hello, peer_nonce } => self.on_auth(msg, hello, &peer_nonce),
            State::Done => Err((ErrorCode::InvalidState, "the handshake is over".to_owned())),
        }
    }

    fn on_hello(&mut self, msg: ControlToShim) -> Result<Step, Refusal> {
        let ControlToShim::Hello(hello) = msg else {
            return Err((
                ErrorCode::InvalidState,
                format!("expected hello, got {}", msg.type_name()),
            ));
        };
        let negotiated =
            handshake::negotiate(&self.ours, &hello).map_err(|e| (e.code(), e.to_string()))?;
        if negotiated.peer_role != Role::Control {
            let msg = format!("a {:?} cannot use the control link", negotiated.peer_role);
            return Err((ErrorCode::Invalid, msg.to_lowercase()));
        }
        if self.token.is_none() {
            return Ok(Step::Live {
                hello: Box::new(hello),
                auth: None,
            });
        }
        let peer_nonce = match handshake::hello_nonce(&hello) {
            Ok(nonce) => nonce,
            Err(handshake::HandshakeError::BadNonce { len: None }) => {
                return Err((
                    ErrorCode::Unauthorized,
                    "authentication required: hello has no nonce".to_owned(),
                ))
            }
            Err(err) => return Err((err.code(), err.to_string())),
        };
        self.state = State::AwaitAuth {
            hello: Box::new(hello),
            peer_nonce,
        };
        Ok(Step::Continue)
    }

    fn on_auth(
        &mut self,
        msg: ControlToShim,
        hello: Box<Hello>,
        peer_nonce: &[u8; NONCE_LEN],
    ) -> Result<Step, Refusal> {
        let ControlToShim::Auth(auth) = msg else {
            return Err((
                ErrorCode::Unauthorized,
                format!(
                    "authentication required: expected auth, got {}",
                    msg.type_name()
                ),
            ));
        };
        let Some(token) = self.token.as_ref() else {
            return Err((ErrorCode::Internal, "no token".to_owned()));
        };
        // The control plane's proof: its role, our nonce as its peer's, its own.
        let ok = handshake::verify_proof(
            token.secret(),
            Role::Control,
            &self.nonce,
            peer_nonce,
            &auth.mac,
        );
        if !ok {
            return Err((ErrorCode::Unauthorized, "authentication failed".to_owned()));
        }
        let mac = handshake::auth_proof(token.secret(), Role::Shim, peer_nonce, &self.nonce);
        Ok(Step::Live {
            hello,
            auth: Some(Auth {
                mac: bytes::Bytes::copy_from_slice(&mac),
            }),
        })
    }
}
