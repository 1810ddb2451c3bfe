//! vsock streams (`AF_VSOCK`): the control link of a shim inside a microVM.
//!
//! The transport itself is driver-protocol's (feature `net`), shared with control-link: a
//! small stream and listener on tokio's `AsyncFd` and `libc`, no extra crate in the static
//! binary.

pub(super) use driver_protocol::net::{VsockListener, VsockStream};

/// Connections waiting to be accepted on a vsock listener.
pub(super) const BACKLOG: u32 = 128;
