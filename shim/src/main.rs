//! The `agent-shim` binary: parse the command line, set up logging, run, map the outcome to
//! an exit code. Everything else is the `agent_shim` library (`src/lib.rs`).

#[cfg(all(
    target_env = "musl",
    panic = "abort",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
mod unwinder;

use std::io::Write as _;
use std::process::ExitCode;

use agent_shim::{Action, LogFormat};

/// Exit code for a usage error.
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    // First thing, while the process has one thread: the control token leaves our
    // environment, so no child (driver, tool, plain-mode command) can ever inherit it.
    // SAFETY: no thread has been started yet.
    let token = unsafe { agent_shim::take_token() };
    let env = |k: &str| {
        if k == agent_shim::TOKEN_VAR {
            token.clone()
        } else {
            std::env::var_os(k)
        }
    };
    // The kernel's own init in a microVM: PID 1 must never exit (the kernel would panic and
    // the exit code would be lost), so every way out below powers the VM off instead.
    let detected = agent_shim::vm::detected();
    let action = match agent_shim::parse(std::env::args_os().skip(1), env) {
        Ok(action) => action,
        Err(err) => {
            // Nothing useful to do if stderr is gone.
            let _ = writeln!(
                std::io::stderr(),
                "agent-shim: {err}\n{}\nTry 'agent-shim --help' for more information.",
                agent_shim::USAGE
            );
            return exit(detected, i32::from(EXIT_USAGE));
        }
    };
    let cfg = match action {
        Action::Run(cfg) => cfg,
        Action::Help => return print_stdout(&agent_shim::help()),
        Action::Version => return print_stdout(&format!("{}\n", agent_shim::version())),
    };
    agent_shim::init_logging(&cfg);
    let vm = detected || cfg.vm.enabled;
    if vm {
        if let Err(err) = agent_shim::vm::setup(&cfg.vm) {
            report(&err, 125, cfg.log_format);
            agent_shim::vm::power_off(125);
        }
    }
    let code = agent_shim::run(&cfg).unwrap_or_else(|err| {
        let code = err.exit_code();
        report(&err, code, cfg.log_format);
        code
    });
    exit(vm, code)
}

/// Exits with `code`, or in a microVM powers it off with `code` on the console.
fn exit(vm: bool, code: i32) -> ExitCode {
    if vm {
        agent_shim::vm::power_off(code);
    }
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
