//! The shared secret that authenticates both ends of the control link (PROTOCOL.md §8.2).

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use crate::Error;

/// The environment variable [`Token::from_default_env`] reads: the same one the shim reads.
///
/// ```
/// assert_eq!(control_link::TOKEN_ENV, "AGENT_SHIM_TOKEN");
/// ```
pub const TOKEN_ENV: &str = "AGENT_SHIM_TOKEN";

/// A control token. It never crosses the wire (only HMAC proofs do) and `Debug` never prints
/// it.
///
/// ```
/// use control_link::Token;
///
/// let token = Token::from_bytes("s3cret")?;
/// assert_eq!(format!("{token:?}"), "Token(<6 bytes>)");
/// # Ok::<(), control_link::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Arc<[u8]>);

impl Token {
    /// A token from bytes; an empty token is refused.
    ///
    /// ```
    /// # use control_link::Token;
    /// assert!(Token::from_bytes(b"").is_err());
    /// assert!(Token::from_bytes(vec![1, 2, 3]).is_ok());
    /// ```
    pub fn from_bytes(bytes: impl AsRef<[u8]>) -> Result<Self, Error> {
        let bytes = bytes.as_ref();
        if bytes.is_empty() {
            return Err(Error::Token("the token is empty".into()));
        }
        Ok(Self(Arc::from(bytes)))
    }

    /// The contents of a file, without its trailing newlines (`\n`, `\r\n`), so that
    /// `echo secret > token` works: the same rule as the shim's `--control-token-file`.
    ///
    /// ```no_run
    /// # use control_link::Token;
    /// let token = Token::from_file("/run/secrets/agent-token")?;
    /// # Ok::<(), control_link::Error>(())
    /// ```
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        let bytes = std::fs::read(path)
            .map_err(|e| Error::Token(format!("cannot read {}: {e}", path.display())))?;
        Self::from_bytes(trim_newlines(&bytes))
            .map_err(|_| Error::Token(format!("{} holds an empty token", path.display())))
    }

    /// The value of the environment variable `var`, without trailing newlines (as the shim
    /// reads `AGENT_SHIM_TOKEN`).
    ///
    /// ```no_run
    /// # use control_link::Token;
    /// let token = Token::from_env("MY_AGENT_TOKEN")?;
    /// # Ok::<(), control_link::Error>(())
    /// ```
    pub fn from_env(var: &str) -> Result<Self, Error> {
        use std::os::unix::ffi::OsStrExt as _;
        let value =
            std::env::var_os(var).ok_or_else(|| Error::Token(format!("{var} is not set")))?;
        Self::from_bytes(trim_newlines(value.as_bytes()))
            .map_err(|_| Error::Token(format!("{var} is empty")))
    }

    /// The value of [`TOKEN_ENV`] (`AGENT_SHIM_TOKEN`).
    ///
    /// ```no_run
    /// # use control_link::Token;
    /// let token = Token::from_default_env()?;
    /// # Ok::<(), control_link::Error>(())
    /// ```
    pub fn from_default_env() -> Result<Self, Error> {
        Self::from_env(TOKEN_ENV)
    }

    /// The secret bytes, for computing proofs.
    pub(crate) fn secret(&self) -> &[u8] {
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
    fn file_loses_its_trailing_newlines_like_the_shim() {
        let dir = std::env::temp_dir().join(format!("cl-token-{}", std::process::id()));
        std::fs::write(&dir, b"abc\r\n").unwrap();
        assert_eq!(Token::from_file(&dir).unwrap().secret(), b"abc");
        std::fs::write(&dir, b"abc\n\n").unwrap();
        assert_eq!(Token::from_file(&dir).unwrap().secret(), b"abc");
        std::fs::write(&dir, b"a\nb\n").unwrap();
        assert_eq!(Token::from_file(&dir).unwrap().secret(), b"a\nb");
        std::fs::write(&dir, b"\n").unwrap();
        assert!(Token::from_file(&dir).is_err());
        std::fs::remove_file(&dir).unwrap();
    }

    #[test]
    fn debug_hides_the_secret() {
        let t = Token::from_bytes("hunter2").unwrap();
        assert!(!format!("{t:?}").contains("hunter2"));
    }
}
