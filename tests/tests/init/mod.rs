//! Plain init mode: `agent-shim [OPTIONS] [--] CMD [ARGS...]`.

mod cli;
mod exit;
mod internal_signals;
mod memory;
mod passthrough;
mod reaping;
mod signals;
mod tty;
