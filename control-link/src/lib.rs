#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

pub use driver_protocol as protocol;
