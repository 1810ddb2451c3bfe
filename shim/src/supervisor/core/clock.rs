//! `set_clock`: the control plane sets the wall clock (a microVM's is wrong after a snapshot
//! restore or a long pause). The shell sets it (a syscall) and hands the outcome here; the
//! reply is `ok` and a `clock_set` event reports the jump, or the reply is the error.

use std::time::Instant;

use driver_protocol::message::{ClockSet, ShimToControl};
use driver_protocol::ErrorCode;
use tracing::info;

use super::{err, ok, Core};

impl Core {
    /// The shell set the clock to `unix_ms` for request `id`: `jump_ms` is how far it moved,
    /// or why it could not.
    pub fn clock_set(
        &mut self,
        id: u64,
        unix_ms: u64,
        jump_ms: std::io::Result<i64>,
        now: Instant,
    ) -> ShimToControl {
        match jump_ms {
            Ok(jump_ms) => {
                info!("clock set to {unix_ms} ms, a jump of {jump_ms} ms");
                self.activity(now);
                self.event(ClockSet { unix_ms, jump_ms });
                ok(id)
            }
            Err(e) => {
                info!("cannot set the clock to {unix_ms} ms: {e}");
                let code = if e.raw_os_error() == Some(libc::EINVAL) {
                    ErrorCode::Invalid
                } else {
                    ErrorCode::Internal
                };
                err(id, code, &format!("cannot set the clock: {e}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use driver_protocol::message::Event;

    use super::*;
    use crate::supervisor::core::testkit::events;

    #[test]
    fn a_set_clock_is_ok_and_reports_the_jump() {
        let t0 = Instant::now();
        let mut core = Core::new(7, &Default::default(), t0, 1);
        let reply = core.clock_set(5, 1_000, Ok(-42), t0);
        assert_eq!(reply, ok(5));
        let outs = core.take_outputs();
        assert!(matches!(
            events(&outs)[..],
            [Event::ClockSet(ClockSet {
                unix_ms: 1_000,
                jump_ms: -42
            })]
        ));
    }

    #[test]
    fn a_refused_set_clock_is_an_error_and_no_event() {
        let t0 = Instant::now();
        let mut core = Core::new(7, &Default::default(), t0, 1);
        let reply = core.clock_set(
            5,
            u64::MAX,
            Err(std::io::Error::from_raw_os_error(libc::EINVAL)),
            t0,
        );
        assert!(matches!(reply, ShimToControl::Error(e) if e.code == ErrorCode::Invalid));
        assert!(events(&core.take_outputs()).is_empty());
    }
}
