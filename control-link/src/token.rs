//! The shared secret that authenticates both ends of the control link (PROTOCOL.md §8.2):
//! driver-protocol's [`Token`], the one type the shim uses too.
//!
//! ```
//! use control_link::Token;
//!
//! let token = Token::from_bytes("s3cret")?;
//! assert_eq!(format!("{token:?}"), "Token(<6 bytes>)");
//! assert_eq!(control_link::TOKEN_ENV, "AGENT_SHIM_TOKEN");
//! # Ok::<(), control_link::Error>(())
//! ```

pub use driver_protocol::token::{Token, TOKEN_ENV};

use crate::Error;

impl From<driver_protocol::TokenError> for Error {
    /// A token that could not be had is [`Error::Token`], with the same text as ever.
    fn from(e: driver_protocol::TokenError) -> Self {
        Error::Token(e.to_string())
    }
}
