#![doc = include_str!("../README.md")]
//!
//! # The library
//!
//! The `agent-shim` binary (`src/main.rs`) is a thin shell around this library: it takes the
//! control token out of the environment, [`parse`]s the command line, sets up logging and
//! calls [`run`], then maps the outcome to an exit code. Everything else (plain init mode,
//! supervisor mode, the control link) lives in the modules here, private to the crate; the
//! fuzz targets in `shim/fuzz` link this library with `--cfg fuzzing`, which adds the
//! `fuzz` entry points.
// The modules are private and their docs link to one another freely; the public items
// re-exported below carry such links too (`cargo doc --document-private-items` resolves them).
#![allow(rustdoc::private_intra_doc_links)]

mod cgroups;
mod cli;
mod control;
mod driver;
mod exec;
mod fs;
mod init;
mod limits;
mod logging;
mod metrics;
mod oom;
mod reaper;
mod signals;
mod spare;
mod spawn;
mod supervisor;
mod sys;
pub mod vm;

use std::ffi::OsString;

use thiserror::Error;

pub use cli::{help, parse, version, Action, Config, UsageError, TOKEN_VAR, USAGE};
pub use init::InitError;
pub use logging::LogFormat;
pub use supervisor::SupervisorError;

/// Why the shim could not run its command at all (a failure of the command itself is its
/// exit code, not an error).
#[derive(Debug, Error)]
pub enum Error {
    /// Plain init mode failed.
    #[error(transparent)]
    Init(#[from] InitError),
    /// Supervisor mode failed.
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
}

impl Error {
    /// The shim's exit code for this error: 127 command not found, 126 not executable, 125
    /// any other failure of the shim itself.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Init(e) => e.exit_code(),
            Self::Supervisor(e) => e.exit_code(),
        }
    }
}

/// Takes the control token (`AGENT_SHIM_TOKEN`) out of the process environment, so that no
/// child (driver, tool, plain-mode command) can ever inherit it; what [`parse`] should see
/// for [`TOKEN_VAR`].
///
/// # Safety
///
/// The process must be single-threaded: call it first thing in `main`, before anything
/// could start a thread or read the environment.
pub unsafe fn take_token() -> Option<OsString> {
    // SAFETY: the caller promises the process is single-threaded.
    unsafe { sys::take_env_secret(c"AGENT_SHIM_TOKEN") }
}

/// Installs the shim's own tracing subscriber on stderr, at `cfg.log_level` in
/// `cfg.log_format`.
pub fn init_logging(cfg: &Config) {
    logging::init(&cfg.log_level, cfg.log_format);
}

/// Runs `cfg.command` on the real kernel, in supervisor mode when `cfg` asks for a driver, a
/// control link or `--supervise`, in plain init mode otherwise; returns the exit code the
/// shim should exit with.
pub fn run(cfg: &Config) -> Result<i32, Error> {
    if cfg.supervisor_mode() {
        Ok(supervisor::run(cfg)?)
    } else {
        Ok(init::run(cfg)?)
    }
}

/// The fuzz targets' entry points (`shim/fuzz`); only with `--cfg fuzzing`, which
/// cargo-fuzz sets.
#[cfg(fuzzing)]
pub mod fuzz {
    /// One input through the supervisor core (`shim/src/supervisor/core/fuzz.rs`).
    pub fn supervisor_core(data: &[u8]) {
        crate::supervisor::core::fuzz::run(data);
    }

    /// One input through the control side (`shim/src/control/fuzz.rs`).
    pub fn control_link(data: &[u8]) {
        crate::control::fuzz::run(data);
    }
}
