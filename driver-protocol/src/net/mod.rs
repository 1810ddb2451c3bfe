//! Where a control link runs (feature `net`): the `unix:` / `tcp:` / `vsock:` address both
//! ends of the link write and parse, and a small vsock stream and listener.
//!
//! Both ends of the control link need these, the shim (`--control-listen`,
//! `--control-connect`) and a control plane (`control-link`), and they must agree on the
//! syntax to the byte, so they live here, once. They sit behind the `net` feature (which
//! pulls tokio's `net` and `libc`) so that a driver that only speaks the codec pays for
//! neither.

mod addr;
mod vsock;

pub use addr::{Addr, AddrError, VSOCK_CID_ANY};
pub use vsock::{VsockListener, VsockStream};
