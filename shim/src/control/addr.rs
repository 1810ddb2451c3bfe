//! Control addresses: `unix:PATH`, `tcp:HOST:PORT`, `vsock:CID:PORT`.
//!
//! One type names both ends the shim can take: the address it listens on
//! (`--control-listen`) and the one it dials (`--control-connect`). It is driver-protocol's
//! [`Addr`](driver_protocol::net::Addr), the very type control-link parses, so that the two
//! ends of a control link can never disagree on the syntax.

pub use driver_protocol::net::Addr as ControlAddr;
