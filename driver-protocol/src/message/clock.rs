//! The microVM's messages: the control plane sets the clock (after a snapshot restore or a
//! long pause the VM's clock is wrong), the shim reports the jump it corrected, and the
//! shim's last event carries the exit code it is about to exit (or power the VM off) with.

use serde::{Deserialize, Serialize};

use super::fields;
use super::RequestId;

/// `set_clock`: set the sandbox's wall clock (`CLOCK_REALTIME`) to `unix_ms`. The reply is
/// `ok`, and a `clock_set` event reports the jump.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetClock {
    /// The request id.
    pub id: RequestId,
    /// The time to set, in milliseconds since the Unix epoch (UTC).
    pub unix_ms: u64,
}

fields!(SetClock {
    id: req,
    unix_ms: req
});

/// `clock_set` (event): the shim set the wall clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockSet {
    /// The time set, in milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// How far the clock moved: the time set minus the time it read just before
    /// (positive: the clock was behind, as after a snapshot restore).
    pub jump_ms: i64,
}

fields!(ClockSet {
    unix_ms: req,
    jump_ms: req
});

/// `shim_exiting` (event): the shim is about to exit (in a microVM: to power the VM off)
/// with `code`; always its last event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShimExiting {
    /// The shim's exit code (the driver's, after `--remap-exit`; 128+N for signal N).
    pub code: i32,
}

fields!(ShimExiting { code: req });

#[cfg(test)]
mod tests {
    use super::super::{ControlToShim, DriverToShim, Message as _};

    fn set_clock_body() -> Vec<u8> {
        let map = rmpv::Value::Map(vec![
            ("type".into(), "set_clock".into()),
            ("id".into(), 1.into()),
            ("unix_ms".into(), 5.into()),
        ]);
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, &map).unwrap();
        out
    }

    #[test]
    fn only_the_control_plane_can_set_the_clock() {
        assert!(matches!(
            ControlToShim::decode(&set_clock_body()),
            Ok(ControlToShim::SetClock(_))
        ));
        // From a driver it is an unknown type, answered `unsupported`.
        assert!(matches!(
            DriverToShim::decode(&set_clock_body()),
            Ok(DriverToShim::Unknown(_))
        ));
    }
}
