#![doc = include_str!("../README.md")]

mod cli;
mod control;
mod driver;
mod exec;
mod init;
mod limits;
mod logging;
mod oom;
mod reaper;
mod signals;
mod spawn;
mod supervisor;
mod sys;
#[cfg(all(
    target_env = "musl",
    panic = "abort",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
mod unwinder;

use std::io::Write as _;
use std::process::ExitCode;

use cli::{Action, LogFormat};

/// Exit code for a usage error.
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    // First thing, while the process has one thread: the control token leaves our
    // environment, so no child (driver, tool, plain-mode command) can ever inherit it.
    // SAFETY: no thread has been started yet.
    let token = unsafe { sys::take_env_secret(c"AGENT_SHIM_TOKEN") };
    let env = |k: &str| {
        if k == cli::TOKEN_VAR {
            token.clone()
        } else {
            std::env::var_os(k)
        }
    };
    let action = match cli::parse(std::env::args_os().skip(1), env) {
        Ok(action) => action,
        Err(err) => {
            // Nothing useful to do if stderr is gone.
            let _ = writeln!(
                std::io::stderr(),
                "agent-shim: {err}\n{}\nTry 'agent-shim --help' for more information.",
                cli::USAGE
            );
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let cfg = match action {
        Action::Run(cfg) => cfg,
        Action::Help => return print_stdout(&cli::help()),
        Action::Version => return print_stdout(&format!("{}\n", cli::version())),
    };
    logging::init(&cfg.log_level, cfg.log_format);
    let fail = |err: &dyn std::error::Error, code: i32| {
        report(err, code, cfg.log_format);
        code
    };
    let code = if cfg.supervisor_mode() {
        supervisor::run(&cfg).unwrap_or_else(|e| fail(&e, e.exit_code()))
    } else {
        init::run(&cfg).unwrap_or_else(|e| fail(&e, e.exit_code()))
    };
    ExitCode::from(u8::try_from(code).unwrap_or(u8::MAX))
}

/// Prints a fatal error: a shell-like line in text mode (so it is visible whatever the log
/// level), an `error` event in JSON mode (so stderr stays JSON lines).
fn report(err: &dyn std::error::Error, exit_code: i32, format: LogFormat) {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        msg = format!("{msg}: {s}");
        source = s.source();
    }
    match format {
        LogFormat::Text => {
            let _ = writeln!(std::io::stderr(), "agent-shim: {msg}");
        }
        LogFormat::Json => tracing::error!(exit_code, "{msg}"),
    }
}

fn print_stdout(text: &str) -> ExitCode {
    match std::io::stdout().write_all(text.as_bytes()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}
