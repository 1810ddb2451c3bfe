//! `set_clock` and `resume{unix_ms}` in a VM (the one place a test may move the clock: it is
//! the guest's own): the clock moves, `clock_set` reports the jump, a time the kernel refuses
//! is `invalid` and the shim carries on; with `resume`, the clock is set before the driver
//! wakes, and only when the driver is paused.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context as _, Result};
use driver_protocol::message::{
    ClockSet, DriverState, Event, Log, Pause, Resume, SetClock, ShimToControl,
};
use driver_protocol::ErrorCode;

use super::{cgroup::booted, require_vm, shutdown, VM_PATIENCE};
use crate::support::control::ControlClient;

/// One hour, in milliseconds.
const HOUR_MS: i64 = 3_600_000;

/// How far the guest's clock may be from the host's (it starts from the emulated RTC, in
/// whole seconds, and TCG is slow).
const SLACK_MS: i64 = 120_000;

fn now_ms() -> Result<u64> {
    Ok(u64::try_from(
        SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis(),
    )?)
}

/// Sets the clock to `unix_ms`: the reply, and the `clock_set` event if it was `ok`.
fn set_clock(ctl: &mut ControlClient, unix_ms: u64) -> Result<(ShimToControl, Option<ClockSet>)> {
    let id = ctl.id();
    let reply = ctl.request_within(id, SetClock { id, unix_ms }, VM_PATIENCE)?;
    if !matches!(reply, ShimToControl::Ok(_)) {
        return Ok((reply, None));
    }
    let (ev, _) = ctl.wait_event(|e| matches!(e, Event::ClockSet(_)), VM_PATIENCE)?;
    let Event::ClockSet(set) = ev.event else {
        unreachable!("matched above")
    };
    Ok((reply, Some(set)))
}

#[test]
fn set_clock_moves_the_guests_clock_and_reports_the_jump() -> Result<()> {
    require_vm!();
    let (mut vm, mut ctl) = booted()?;

    // An hour ahead: the jump is about +1 h.
    let ahead = now_ms()? + 3_600_000;
    let (_, set) = set_clock(&mut ctl, ahead)?;
    let set = set.context("no clock_set")?;
    ensure!(set.unix_ms == ahead, "{set:?}");
    ensure!(
        (set.jump_ms - HOUR_MS).abs() < SLACK_MS,
        "jump {} ms",
        set.jump_ms
    );

    // Back to the host's time: about -1 h, so the first one took effect.
    let (_, set) = set_clock(&mut ctl, now_ms()?)?;
    let set = set.context("no clock_set")?;
    ensure!(
        (set.jump_ms + HOUR_MS).abs() < SLACK_MS,
        "jump {} ms",
        set.jump_ms
    );

    // A time the kernel refuses: `invalid`, no event, and the shim carries on.
    let (reply, set) = set_clock(&mut ctl, u64::MAX)?;
    ensure!(
        matches!(&reply, ShimToControl::Error(e) if e.code == ErrorCode::Invalid),
        "{reply:?}"
    );
    ensure!(set.is_none());
    let quiet = ctl.events_for(Duration::from_millis(500))?;
    ensure!(
        !quiet.iter().any(|s| matches!(s.event, Event::ClockSet(_))),
        "a refused set_clock sent clock_set"
    );
    ctl.status_within(VM_PATIENCE)?;

    shutdown(&mut ctl)?;
    let (code, _) = vm.wait_power_off()?;
    ensure!(code == 0);
    Ok(())
}

/// `resume{unix_ms}`: the reply, and the `clock_set` event if it was `ok`.
fn resume_at(ctl: &mut ControlClient, unix_ms: u64) -> Result<ShimToControl> {
    let id = ctl.id();
    ctl.request_within(
        id,
        Resume {
            unix_ms: Some(unix_ms),
            ..Resume::new(id)
        },
        VM_PATIENCE,
    )
}

/// Pauses the driver and waits for `paused`.
fn pause(ctl: &mut ControlClient) -> Result<()> {
    let id = ctl.id();
    let reply = ctl.request_within(
        id,
        Pause {
            id,
            timeout_ms: None,
        },
        VM_PATIENCE,
    )?;
    ensure!(matches!(reply, ShimToControl::Ok(_)), "pause: {reply:?}");
    ctl.wait_event(|e| matches!(e, Event::Paused(_)), VM_PATIENCE)?;
    Ok(())
}

#[test]
fn resume_with_a_time_sets_the_clock_before_the_driver_wakes() -> Result<()> {
    require_vm!();
    let (mut vm, mut ctl) = booted()?;

    // Not paused: `invalid_state`, and the clock is left alone (no `clock_set`).
    let reply = resume_at(&mut ctl, now_ms()? + 3 * HOUR_MS as u64)?;
    ensure!(
        matches!(&reply, ShimToControl::Error(e) if e.code == ErrorCode::InvalidState),
        "{reply:?}"
    );

    // Paused; a time the kernel refuses: `invalid`, no `clock_set`, the driver still paused.
    pause(&mut ctl)?;
    let reply = resume_at(&mut ctl, u64::MAX)?;
    ensure!(
        matches!(&reply, ShimToControl::Error(e) if e.code == ErrorCode::Invalid),
        "{reply:?}"
    );
    let quiet = ctl.events_for(Duration::from_millis(500))?;
    ensure!(
        !quiet.iter().any(|s| matches!(s.event, Event::ClockSet(_))),
        "a refused resume sent clock_set: {quiet:?}"
    );
    let st = ctl.status_within(VM_PATIENCE)?;
    ensure!(st.state == DriverState::Paused, "{st:?}");

    // As after a snapshot restore: the clock an hour ahead, set with the resume. The
    // `clock_set` comes before the driver wakes, and the driver, told how long it slept on
    // the corrected clock, says about an hour.
    let ahead = now_ms()? + HOUR_MS as u64;
    let reply = resume_at(&mut ctl, ahead)?;
    ensure!(matches!(reply, ShimToControl::Ok(_)), "{reply:?}");
    let (set, _) = ctl.wait_event(|e| matches!(e, Event::ClockSet(_)), VM_PATIENCE)?;
    let Event::ClockSet(ClockSet { unix_ms, jump_ms }) = set.event else {
        unreachable!("matched above")
    };
    ensure!(unix_ms == ahead, "clock_set for {unix_ms}");
    ensure!((jump_ms - HOUR_MS).abs() < SLACK_MS, "jump {jump_ms} ms");
    let (log, before) = ctl.wait_event(
        |e| matches!(e, Event::Log(Log { text, .. }) if text.starts_with("resumed after")),
        VM_PATIENCE,
    )?;
    ensure!(
        log.seq > set.seq,
        "the driver woke before the clock was set"
    );
    let Event::Log(Log { text, .. }) = &log.event else {
        unreachable!("matched above")
    };
    let slept: i64 = text
        .trim_start_matches("resumed after ")
        .trim_end_matches(" ms")
        .parse()
        .with_context(|| format!("the driver's log {text:?}"))?;
    ensure!((slept - HOUR_MS).abs() < SLACK_MS, "slept {slept} ms");
    ensure!(
        !before.iter().any(|s| matches!(s.event, Event::ClockSet(_))),
        "two clock_set events: {before:?}"
    );
    let (_, _) = ctl.wait_event(
        |e| matches!(e, Event::StateChanged(c) if c.to == DriverState::Ready),
        VM_PATIENCE,
    )?;

    shutdown(&mut ctl)?;
    let (code, _) = vm.wait_power_off()?;
    ensure!(code == 0);
    Ok(())
}
