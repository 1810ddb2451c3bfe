//! A resume from a cursor past the shim's last seq (a control plane that knew an earlier
//! shim behind the same address) still gets every buffered event, and frees none.

use std::time::Duration;

use anyhow::{ensure, Result};

use super::Setup;
use crate::support::control::{ControlClient, Target};
use crate::support::{is_root, Mode, PATIENCE};

fn one_mode() -> Mode {
    if is_root() {
        Mode::Pid1
    } else {
        Mode::Subreaper
    }
}

/// A control plane whose persisted cursor is past this shim's last seq (it knew an earlier
/// shim behind the same address) must still get this shim's buffered events: PROTOCOL says
/// "stream from what exists", and control-link's "follow a restarted shim" relies on it.
#[test]
fn resume_past_the_last_seq_sends_every_buffered_event() -> Result<()> {
    let mut sup = Setup::new(one_mode()).start()?;
    let before = sup.status_until("events buffered", |s| s.buffered_events >= 2)?;
    sup.ctl.kill();
    let target = Target::Unix(sup.sock.clone());
    let mut late = ControlClient::connect_to(&target, None, PATIENCE)?;
    late.resume_from(before.last_seq + 1000)?;
    // Whatever arrives (the client's own seq check may reject seq 1: that still proves
    // delivery), something must arrive.
    // The client's own seq check rejects seq 2 after 1006: that still proves delivery.
    let got = late.try_next_stamped(Duration::from_secs(2));
    ensure!(
        !matches!(got, Ok(None)),
        "the {} buffered events of this shim were never sent",
        before.buffered_events
    );
    // And nothing was acknowledged by the stale cursor: another client still finds them.
    let mut probe = ControlClient::connect_to(&target, None, PATIENCE)?;
    let status = probe.status()?;
    ensure!(
        status.buffered_events >= before.buffered_events,
        "a resume_from past the last seq freed events: {} buffered before, {} after",
        before.buffered_events,
        status.buffered_events
    );
    drop(late);
    Ok(())
}
