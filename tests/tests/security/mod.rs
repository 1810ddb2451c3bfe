//! Attacks from inside the sandbox, run against the real binary (in the spirit of
//! firecracker's `tests/integration_tests/security`): each test is the attack a tenant (the
//! driver, its tools, anything they start, as uid 1000 or as root in the container) would run
//! against PID 1, and asserts that PID 1 survives it, keeps serving, and keeps the control
//! plane's way in open. `docs/SECURITY.md` ("Tenant attacks on PID 1") names the test behind
//! each claim.

mod gate;
mod holes;
mod oom;
mod signals;
mod spawn;
