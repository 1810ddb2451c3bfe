//! End-to-end tests that run the real binaries: agent-shim as PID 1 of a fresh PID namespace
//! (`unshare --pid --fork --mount-proc`) and as a plain subreaper, with the `probe` binary
//! (`src/bin/probe.rs`) as its child to check from the inside what it promises.
//!
//! The shim binary comes from `$AGENT_SHIM_BIN` or the target dir (see `support::shim_bin`).

mod support;

mod init;

mod drivers;

mod supervisor;

mod control_link;

mod docker;

mod security;

mod files;
mod resources;
mod sessions;
mod vm;
