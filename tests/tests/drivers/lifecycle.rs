//! Start, handshake, end of stream, shutdown when idle, and a bad start.

use anyhow::ensure;
use driver_protocol::message::{DriverToShim, Hello, Role, Shutdown};
use driver_protocol::ErrorCode;

use super::{conformance, recv, FakeShim, PATIENCE};
use crate::support::poll_until;

conformance! {
    fn handshake_then_ready(driver: Driver) -> Result<()> {
        // `start` checks the driver's hello and the first ready.
        let mut shim = FakeShim::start(driver)?;
        shim.ping()?;
        shim.ping()?;
        ensure!(shim.alive(), "driver exited after the handshake\n{}", shim.context());
        Ok(())
    }

    fn says_started_on_stdout_and_stderr(driver: Driver) -> Result<()> {
        let shim = FakeShim::start(driver)?;
        let both = poll_until(PATIENCE, || {
            (shim.stdout().lines().any(|l| l == "echo-driver: started")
                && shim.stderr().lines().any(|l| l == "echo-driver: started"))
            .then_some(())
        });
        ensure!(
            both.is_some(),
            "no `echo-driver: started` line on both streams; stdout: {:?}\n{}",
            shim.stdout(),
            shim.context()
        );
        Ok(())
    }

    fn end_of_stream_exits_0(driver: Driver) -> Result<()> {
        let mut shim = FakeShim::start(driver)?;
        shim.ping()?;
        shim.close()?;
        shim.expect_exit(0)
    }

    fn end_of_stream_before_hello_exits_0(driver: Driver) -> Result<()> {
        let mut shim = FakeShim::spawn(driver, &[])?;
        shim.expect_driver_hello()?;
        shim.close()?;
        shim.expect_exit(0)
    }

    fn incompatible_hello_is_refused_with_exit_3(driver: Driver) -> Result<()> {
        let mut shim = FakeShim::spawn(driver, &[])?;
        shim.send(Hello::new(Role::Shim, "fake-shim", "0").with_versions([99]))?;
        shim.expect_driver_hello()?;
        let err = recv!(shim, DriverToShim::Error(e) => e);
        ensure!(err.code == ErrorCode::UnsupportedVersion && err.re.is_none(), "{err:?}");
        shim.expect_exit(3)
    }

    fn hello_of_another_protocol_is_malformed(driver: Driver) -> Result<()> {
        let mut shim = FakeShim::spawn(driver, &[])?;
        let mut hello = Hello::new(Role::Shim, "fake-shim", "0");
        hello.protocol = "http".into();
        shim.send(hello)?;
        shim.expect_driver_hello()?;
        let err = recv!(shim, DriverToShim::Error(e) => e);
        ensure!(err.code == ErrorCode::Malformed, "{err:?}");
        shim.expect_exit(3)
    }

    fn malformed_frame_is_refused_with_exit_3(driver: Driver) -> Result<()> {
        let mut shim = FakeShim::start(driver)?;
        shim.send_value(&rmpv::Value::from(5))?;
        let err = recv!(shim, DriverToShim::Error(e) => e);
        ensure!(err.code == ErrorCode::Malformed, "{err:?}");
        shim.expect_exit(3)
    }

    fn shutdown_when_idle_exits_with_echo_exit_code(driver: Driver) -> Result<()> {
        for (envs, want) in [(&[][..], 0), (&[("ECHO_EXIT_CODE", "17")][..], 17)] {
            let mut shim = FakeShim::start_with(driver, envs)?;
            let id = shim.id();
            shim.send(Shutdown { id, grace_ms: Some(5000), reason: None })?;
            let ok = recv!(shim, DriverToShim::Ok(ok) => ok);
            ensure!(ok.re == id, "{ok:?}");
            shim.expect_exit(want)?;
        }
        Ok(())
    }

    fn missing_fd_exits_2(driver: Driver) -> Result<()> {
        let mut shim = FakeShim::spawn_without_fd(driver)?;
        shim.expect_exit(2)?;
        let named = poll_until(PATIENCE, || shim.stderr().contains("AGENT_SHIM_FD").then_some(()));
        ensure!(named.is_some(), "no message naming AGENT_SHIM_FD\n{}", shim.context());
        Ok(())
    }
}
