//! agent-shim: PID 1 of an agent sandbox.

fn main() {}
