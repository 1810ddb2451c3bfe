//! The shared secret that authenticates both ends of the control link (PROTOCOL.md §8.2):
//! one type for the shim and control-link.
//!
//! The token never crosses the wire (only HMAC proofs over fresh nonces do, see
//! [`handshake`](crate::handshake)), and its `Debug` never prints it. Files and environment
//! variables hold it as a line: trailing newlines (`\n`, `\r\n`) are not part of it, so
//! `echo secret > token` works.
//!
//! [`Token::from_file`] reads a file as it is. The shim reads `--control-token-file` with a
//! loader of its own that also refuses a file another user could read or write.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The environment variable [`Token::from_default_env`] reads: the one the shim reads.
///
/// ```
/// assert_eq!(driver_protocol::token::TOKEN_ENV, "AGENT_SHIM_TOKEN");
/// ```
pub const TOKEN_ENV: &str = "AGENT_SHIM_TOKEN";

/// A control token. Cheap to clone; `Debug` shows its length only.
///
/// ```
/// use driver_protocol::Token;
///
/// let token = Token::from_bytes("s3cret")?;
/// assert_eq!(format!("{token:?}"), "Token(<6 bytes>)");
/// assert_eq!(Token::from_line(b"s3cret\r\n")?, token);
/// assert!(Token::from_bytes(b"").is_err());
/// # Ok::<(), driver_protocol::TokenError>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Arc<[u8]>);

/// Why a token could not be had.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The token is empty.
    #[error("the token is empty")]
    Empty,
    /// The token file could not be read.
    #[error("cannot read {}: {error}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The token file holds nothing but newlines.
    #[error("{} holds an empty token", path.display())]
    EmptyFile {
        /// The file.
        path: PathBuf,
    },
    /// The environment variable is not set.
    #[error("{var} is not set")]
    Unset {
        /// The variable.
        var: String,
    },
    /// The environment variable holds nothing but newlines.
    #[error("{var} is empty")]
    EmptyVar {
        /// The variable.
        var: String,
    },
}

impl Token {
    /// A token from bytes, as they are; an empty token is refused.
    pub fn from_bytes(bytes: impl AsRef<[u8]>) -> Result<Self, TokenError> {
        let bytes = bytes.as_ref();
        if bytes.is_empty() {
            return Err(TokenError::Empty);
        }
        Ok(Self(Arc::from(bytes)))
    }

    /// A token from a line: `bytes` without their trailing newlines (`\n`, `\r\n`); nothing
    /// left is refused.
    pub fn from_line(bytes: impl AsRef<[u8]>) -> Result<Self, TokenError> {
        Self::from_bytes(trim_newlines(bytes.as_ref()))
    }

    /// The contents of a file as a line ([`Token::from_line`]). No check of the file's
    /// owner or mode: that is the caller's (the shim's own loader makes them).
    ///
    /// ```no_run
    /// # use driver_protocol::Token;
    /// let token = Token::from_file("/run/secrets/agent-token")?;
    /// # Ok::<(), driver_protocol::TokenError>(())
    /// ```
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, TokenError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|error| TokenError::Read {
            path: path.to_owned(),
            error,
        })?;
        Self::from_line(&bytes).map_err(|_| TokenError::EmptyFile {
            path: path.to_owned(),
        })
    }

    /// The value of the environment variable `var`, as a line ([`Token::from_line`]).
    ///
    /// ```no_run
    /// # use driver_protocol::Token;
    /// let token = Token::from_env("MY_AGENT_TOKEN")?;
    /// # Ok::<(), driver_protocol::TokenError>(())
    /// ```
    pub fn from_env(var: &str) -> Result<Self, TokenError> {
        use std::os::unix::ffi::OsStrExt as _;
        let value = std::env::var_os(var).ok_or_else(|| TokenError::Unset { var: var.into() })?;
        Self::from_line(value.as_bytes()).map_err(|_| TokenError::EmptyVar { var: var.into() })
    }

    /// The value of [`TOKEN_ENV`] (`AGENT_SHIM_TOKEN`).
    ///
    /// ```no_run
    /// # use driver_protocol::Token;
    /// let token = Token::from_default_env()?;
    /// # Ok::<(), driver_protocol::TokenError>(())
    /// ```
    pub fn from_default_env() -> Result<Self, TokenError> {
        Self::from_env(TOKEN_ENV)
    }

    /// The secret bytes, for computing proofs ([`handshake::auth_proof`](crate::handshake::auth_proof)).
    pub fn secret(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token(<{} bytes>)", self.0.len())
    }
}

/// `bytes` without trailing `\n` and `\r`.
fn trim_newlines(mut bytes: &[u8]) -> &[u8] {
    while let [rest @ .., b'\n' | b'\r'] = bytes {
        bytes = rest;
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_loses_its_trailing_newlines() {
        let path = std::env::temp_dir().join(format!("dp-token-{}", std::process::id()));
        std::fs::write(&path, b"abc\r\n").unwrap();
        assert_eq!(Token::from_file(&path).unwrap().secret(), b"abc");
        std::fs::write(&path, b"abc\n\n").unwrap();
        assert_eq!(Token::from_file(&path).unwrap().secret(), b"abc");
        std::fs::write(&path, b"a\nb\n").unwrap();
        assert_eq!(Token::from_file(&path).unwrap().secret(), b"a\nb");
        std::fs::write(&path, b"\n").unwrap();
        let err = Token::from_file(&path).unwrap_err();
        assert!(matches!(err, TokenError::EmptyFile { .. }), "{err}");
        assert!(err.to_string().ends_with("holds an empty token"), "{err}");
        std::fs::remove_file(&path).unwrap();
        let err = Token::from_file(&path).unwrap_err();
        assert!(err.to_string().starts_with("cannot read "), "{err}");
    }

    #[test]
    fn bytes_are_kept_as_they_are_and_lines_lose_their_newlines() {
        assert_eq!(Token::from_bytes("a\n").unwrap().secret(), b"a\n");
        assert_eq!(Token::from_line("a\r\n").unwrap().secret(), b"a");
        assert!(matches!(Token::from_line("\r\n"), Err(TokenError::Empty)));
        assert!(matches!(Token::from_bytes(""), Err(TokenError::Empty)));
        assert_eq!(TokenError::Empty.to_string(), "the token is empty");
    }

    #[test]
    fn env_errors_name_the_variable() {
        let var = "DRIVER_PROTOCOL_TOKEN_TEST_UNSET_5f1c";
        assert_eq!(
            Token::from_env(var).unwrap_err().to_string(),
            format!("{var} is not set")
        );
    }

    #[test]
    fn debug_hides_the_secret() {
        let t = Token::from_bytes("hunter2").unwrap();
        assert!(!format!("{t:?}").contains("hunter2"));
    }
}
