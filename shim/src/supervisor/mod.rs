//! Supervisor mode: the shim as the supervisor of an agent driver.
//!
//! [`run`] blocks signals exactly like plain mode, then runs a tokio current-thread runtime
//! whose one loop (the *shell*, in `shell/`) does all the I/O — signals from a `signalfd`,
//! the driver's socket and its stdout/stderr, the control server, the nearest timer — and
//! hands every input to the synchronous [`core::Core`], which decides. The pure pieces live in
//! [`lifecycle`], [`restart`], [`tasks`] and [`loglines`].
//!
//! ```text
//!  block signals ─► runtime + LocalSet ─► control server ─► launch driver
//!  loop select! { signalfd | control command | driver socket (unless the event buffer is
//!                 full) | driver socket writable | driver stdout/stderr | nearest deadline }
//!  core says exit ─► deliver buffered events (≤ 2 s) ─► (PID 1) cleanup ─► exit code
//! ```

pub mod core;
pub mod lifecycle;
pub mod loglines;
pub mod restart;
mod shell;
pub mod tasks;

use nix::errno::Errno;
use thiserror::Error;
use tracing::{info, info_span, warn, Instrument as _};

use crate::cli::{Config, TokenSource};
use crate::control::{read_token_file, Token, TokenError};
use crate::reaper::Reaper;
use crate::signals;
use crate::sys::{Real, Sys};

use self::shell::shell;

/// Why supervisor mode could not run at all.
#[derive(Debug, Error)]
pub enum SupervisorError {
    /// Blocking the signals failed.
    #[error("cannot block signals")]
    Signals(#[source] Errno),
    /// The signalfd could not be created or registered.
    #[error("cannot create a signalfd")]
    Signalfd(#[source] std::io::Error),
    /// The async runtime could not be built.
    #[error("cannot start the runtime")]
    Runtime(#[source] std::io::Error),
    /// The control socket could not be bound.
    #[error("cannot listen on the control socket")]
    Control(#[source] std::io::Error),
    /// The control token could not be loaded.
    #[error("no control token")]
    Token(#[source] TokenError),
}

impl SupervisorError {
    /// The shim's exit code for this error (125, like any failure of the shim itself).
    pub fn exit_code(&self) -> i32 {
        125
    }
}

/// Who a tracked pid belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owner {
    /// The agent driver.
    Driver,
    /// A tool process, by exec id.
    Exec(u64),
}

/// Runs supervisor mode on the real kernel; returns the exit code.
pub fn run(cfg: &Config) -> Result<i32, SupervisorError> {
    let sys = Real;
    let span = info_span!("supervisor");
    let _enter = span.enter();
    let token = load_token(cfg)?;
    let own_pid = sys.getpid();
    let pid1 = own_pid == 1;
    if !pid1 {
        if let Err(err) = sys.set_child_subreaper() {
            warn!(%err, "cannot become a child subreaper: orphans will not be reaped by us");
        }
    }
    let original_mask = signals::block_all(&sys).map_err(SupervisorError::Signals)?;
    crate::oom::protect_self(crate::oom::Report::Warn);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(SupervisorError::Runtime)?;
    let local = tokio::task::LocalSet::new();
    let mut reaper = Reaper::new();
    let outcome = local.block_on(
        &rt,
        shell(cfg, token, original_mask, &mut reaper).instrument(info_span!("loop")),
    );
    drop(local);
    drop(rt);
    // The control socket file went with the control server (only if it was still ours).
    let (code, kill_deadline) = outcome?;
    let set = signals::handled_set();
    let mut drain = || reaper.drain(&sys, |_, _, _| {}).no_children;
    if pid1 {
        crate::init::cleanup_after_child(&sys, cfg, &set, kill_deadline, &mut drain);
    } else {
        drain();
    }
    info!(code, "exiting");
    Ok(code)
}

/// The control token, loaded (and its file checked) before anything starts; `None` without a
/// control link or without a token.
fn load_token(cfg: &Config) -> Result<Option<Token>, SupervisorError> {
    if cfg.sup.control_listen.is_none() && cfg.sup.control_connect.is_none() {
        return Ok(None);
    }
    match &cfg.sup.control_token {
        Some(TokenSource::File(path)) => read_token_file(path)
            .map(Some)
            .map_err(SupervisorError::Token),
        Some(TokenSource::Env(token)) => Ok(Some(token.clone())),
        None => Ok(None),
    }
}

impl From<&Config> for core::Settings {
    /// The part of the command line the core decides with.
    fn from(cfg: &Config) -> Self {
        core::Settings {
            command: cfg.command.clone(),
            grace: cfg.grace,
            rewrites: cfg.rewrites.clone(),
            remap_exit: cfg.remap_exit.clone(),
            allow_internal_signals: cfg.allow_internal_signals,
            opts: cfg.sup.core.clone(),
        }
    }
}

impl Default for core::Settings {
    /// The flags' defaults, with no command.
    fn default() -> Self {
        core::Settings::from(&Config::default())
    }
}
