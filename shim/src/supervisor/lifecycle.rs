//! The driver's lifecycle state machine.
//!
//! It exists so that every state change of the driver goes through one small, pure function
//! that can be tested transition by transition, and so that each change becomes exactly one
//! `state_changed{from, to}` event. The async supervisor feeds it [`Input`]s (things that
//! happened) and emits the returned [`StateChanged`]; an input that makes no sense in the
//! current state is refused with [`InvalidTransition`] rather than silently ignored.
//!
//! ```text
//!              Launched              Ready
//!   Exited ─────────────▶ Starting ─────────▶ Ready ◀────────────────────┐
//!    │ ▲ ▲                                    │  ▲                       │
//!    │ │ │                     PauseRequested │  │ PauseTimedOut         │ Resumed
//!    │ │ │                                    ▼  │                       │
//!    │ │ │                                   Pausing ────── Paused ───▶ Paused
//!    │ │ │
//!    │ │ └──────── Exited ────────────────────────── Starting, Ready, Pausing, Paused
//!    │ │
//!    │ │ Exited              StopRequested
//!    │ └────────── Stopping ◀──────────────── Starting, Ready, Pausing, Paused,
//!    │               ↺ StopRequested          Exited, Error
//!    │ CrashLoop
//!    ▼
//!   Error ───── Recover ─────▶ Exited              (Exited ↺ Recover)
//! ```
//!
//! The full table, which [`Lifecycle::apply`] implements and the tests check pair by pair:
//!
//! | from | input | to |
//! |---|---|---|
//! | `exited` | `Launched` | `starting` |
//! | `starting` | `Ready` | `ready` |
//! | `ready` | `PauseRequested` | `pausing` |
//! | `pausing` | `Paused` | `paused` |
//! | `pausing` | `PauseTimedOut` | `ready` |
//! | `paused` | `Resumed` | `ready` |
//! | `starting`, `ready`, `pausing`, `paused`, `exited`, `error` | `StopRequested` | `stopping` |
//! | `stopping` | `StopRequested` | (no change) |
//! | `starting`, `ready`, `pausing`, `paused`, `stopping` | `Exited` | `exited` |
//! | `exited` | `CrashLoop` | `error` |
//! | `error` | `Recover` | `exited` |
//! | `exited` | `Recover` | (no change) |
//!
//! Every other pair is an [`InvalidTransition`].

use driver_protocol::message::{DriverState, StateChanged};

/// Something that happened to the driver, fed to [`Lifecycle::apply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Input {
    /// The driver process was launched.
    Launched,
    /// The driver completed the handshake and sent `ready`.
    Ready,
    /// A `pause` was sent to the driver.
    PauseRequested,
    /// The driver answered `paused`.
    Paused,
    /// The driver did not answer `pause` within the pause timeout.
    PauseTimedOut,
    /// The driver answered `ready` to a `resume`.
    Resumed,
    /// The shim is shutting down (control `shutdown`, SIGTERM/SIGINT).
    StopRequested,
    /// The driver process exited (or was killed).
    Exited,
    /// Crash-loop detection tripped: no more restarts.
    CrashLoop,
    /// `restart_driver` was asked for: leave `error` so the driver can be launched again.
    Recover,
}

impl Input {
    /// Every input, for exhaustive tests.
    #[cfg(test)]
    const ALL: [Input; 10] = [
        Input::Launched,
        Input::Ready,
        Input::PauseRequested,
        Input::Paused,
        Input::PauseTimedOut,
        Input::Resumed,
        Input::StopRequested,
        Input::Exited,
        Input::CrashLoop,
        Input::Recover,
    ];
}

/// An input that is not valid in the current state; the state is left unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not valid in state {state:?}")]
pub struct InvalidTransition {
    /// The state the machine was (and still is) in.
    pub state: DriverState,
    /// The refused input.
    pub input: Input,
}

/// The driver's lifecycle: its current [`DriverState`] and the rules for changing it.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    state: DriverState,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self::new()
    }
}

impl Lifecycle {
    /// A lifecycle in state `exited`: nothing launched yet.
    pub fn new() -> Self {
        Self {
            state: DriverState::Exited,
        }
    }

    /// The current state.
    pub fn state(&self) -> DriverState {
        self.state
    }

    /// Applies `input`: `Ok(Some(change))` when the state changed (emit it as a
    /// `state_changed` event), `Ok(None)` when the input is valid but changes nothing (e.g.
    /// `StopRequested` while already `stopping`), `Err` when the input is not valid in the
    /// current state (which is then unchanged).
    pub fn apply(&mut self, input: Input) -> Result<Option<StateChanged>, InvalidTransition> {
        let from = self.state;
        let to = next(from, input).ok_or(InvalidTransition { state: from, input })?;
        if to == from {
            return Ok(None);
        }
        self.state = to;
        Ok(Some(StateChanged { from, to }))
    }
}

/// The transition table: the state after `input` in `state`, or `None` if not allowed.
fn next(state: DriverState, input: Input) -> Option<DriverState> {
    use DriverState as S;
    use Input as I;
    let to = match (state, input) {
        (S::Exited, I::Launched) => S::Starting,
        (S::Starting, I::Ready) => S::Ready,
        (S::Ready, I::PauseRequested) => S::Pausing,
        (S::Pausing, I::Paused) => S::Paused,
        (S::Pausing, I::PauseTimedOut) => S::Ready,
        (S::Paused, I::Resumed) => S::Ready,
        (
            S::Starting | S::Ready | S::Pausing | S::Paused | S::Exited | S::Error | S::Stopping,
            I::StopRequested,
        ) => S::Stopping,
        (S::Starting | S::Ready | S::Pausing | S::Paused | S::Stopping, I::Exited) => S::Exited,
        (S::Exited, I::CrashLoop) => S::Error,
        (S::Error | S::Exited, I::Recover) => S::Exited,
        _ => return None,
    };
    Some(to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use DriverState as S;

    const STATES: [DriverState; 7] = [
        S::Starting,
        S::Ready,
        S::Pausing,
        S::Paused,
        S::Stopping,
        S::Exited,
        S::Error,
    ];

    /// Every valid (from, input, to) triple; `to == from` means "valid, no change".
    const VALID: &[(DriverState, Input, DriverState)] = &[
        (S::Exited, Input::Launched, S::Starting),
        (S::Starting, Input::Ready, S::Ready),
        (S::Ready, Input::PauseRequested, S::Pausing),
        (S::Pausing, Input::Paused, S::Paused),
        (S::Pausing, Input::PauseTimedOut, S::Ready),
        (S::Paused, Input::Resumed, S::Ready),
        (S::Starting, Input::StopRequested, S::Stopping),
        (S::Ready, Input::StopRequested, S::Stopping),
        (S::Pausing, Input::StopRequested, S::Stopping),
        (S::Paused, Input::StopRequested, S::Stopping),
        (S::Exited, Input::StopRequested, S::Stopping),
        (S::Error, Input::StopRequested, S::Stopping),
        (S::Stopping, Input::StopRequested, S::Stopping),
        (S::Starting, Input::Exited, S::Exited),
        (S::Ready, Input::Exited, S::Exited),
        (S::Pausing, Input::Exited, S::Exited),
        (S::Paused, Input::Exited, S::Exited),
        (S::Stopping, Input::Exited, S::Exited),
        (S::Exited, Input::CrashLoop, S::Error),
        (S::Error, Input::Recover, S::Exited),
        (S::Exited, Input::Recover, S::Exited),
    ];

    /// A lifecycle forced into `state` (reached through valid inputs, so the test also
    /// exercises the path).
    fn at(state: DriverState) -> Lifecycle {
        let path: &[Input] = match state {
            S::Exited => &[],
            S::Starting => &[Input::Launched],
            S::Ready => &[Input::Launched, Input::Ready],
            S::Pausing => &[Input::Launched, Input::Ready, Input::PauseRequested],
            S::Paused => &[
                Input::Launched,
                Input::Ready,
                Input::PauseRequested,
                Input::Paused,
            ],
            S::Stopping => &[Input::Launched, Input::StopRequested],
            S::Error => &[Input::CrashLoop],
        };
        let mut l = Lifecycle::new();
        for &input in path {
            l.apply(input).unwrap();
        }
        assert_eq!(l.state(), state);
        l
    }

    fn check(from: DriverState, input: Input, to: DriverState) {
        let mut l = at(from);
        let got = l.apply(input).unwrap();
        if from == to {
            assert_eq!(got, None, "{from:?} --{input:?}--> should not change");
        } else {
            assert_eq!(got, Some(StateChanged { from, to }));
        }
        assert_eq!(l.state(), to);
    }

    #[test]
    fn starts_exited() {
        assert_eq!(Lifecycle::new().state(), S::Exited);
        assert_eq!(Lifecycle::default().state(), S::Exited);
    }

    #[test]
    fn exited_launched_starting() {
        check(S::Exited, Input::Launched, S::Starting);
    }

    #[test]
    fn starting_ready_ready() {
        check(S::Starting, Input::Ready, S::Ready);
    }

    #[test]
    fn ready_pause_requested_pausing() {
        check(S::Ready, Input::PauseRequested, S::Pausing);
    }

    #[test]
    fn pausing_paused_paused() {
        check(S::Pausing, Input::Paused, S::Paused);
    }

    #[test]
    fn pausing_timed_out_ready() {
        check(S::Pausing, Input::PauseTimedOut, S::Ready);
    }

    #[test]
    fn paused_resumed_ready() {
        check(S::Paused, Input::Resumed, S::Ready);
    }

    #[test]
    fn running_states_stop_requested_stopping() {
        for from in [S::Starting, S::Ready, S::Pausing, S::Paused] {
            check(from, Input::StopRequested, S::Stopping);
        }
    }

    #[test]
    fn exited_and_error_stop_requested_stopping() {
        check(S::Exited, Input::StopRequested, S::Stopping);
        check(S::Error, Input::StopRequested, S::Stopping);
    }

    #[test]
    fn stopping_stop_requested_no_change() {
        check(S::Stopping, Input::StopRequested, S::Stopping);
    }

    #[test]
    fn live_states_exited_exited() {
        for from in [S::Starting, S::Ready, S::Pausing, S::Paused, S::Stopping] {
            check(from, Input::Exited, S::Exited);
        }
    }

    #[test]
    fn exited_crash_loop_error() {
        check(S::Exited, Input::CrashLoop, S::Error);
    }

    #[test]
    fn error_recover_exited() {
        check(S::Error, Input::Recover, S::Exited);
    }

    #[test]
    fn exited_recover_no_change() {
        check(S::Exited, Input::Recover, S::Exited);
    }

    #[test]
    fn every_other_pair_is_rejected_and_keeps_the_state() {
        let mut rejected = 0;
        for from in STATES {
            for input in Input::ALL {
                if VALID.iter().any(|&(f, i, _)| f == from && i == input) {
                    continue;
                }
                let mut l = at(from);
                let err = l.apply(input).unwrap_err();
                assert_eq!(
                    err,
                    InvalidTransition { state: from, input },
                    "{from:?} --{input:?}"
                );
                assert_eq!(l.state(), from);
                rejected += 1;
            }
        }
        // 7 states × 10 inputs, minus the valid pairs.
        assert_eq!(rejected, STATES.len() * Input::ALL.len() - VALID.len());
    }

    #[test]
    fn every_valid_pair_matches_the_table() {
        for &(from, input, to) in VALID {
            check(from, input, to);
        }
    }

    #[test]
    fn a_full_life() {
        let mut l = Lifecycle::new();
        let seq = [
            (Input::Launched, S::Starting),
            (Input::Ready, S::Ready),
            (Input::PauseRequested, S::Pausing),
            (Input::Paused, S::Paused),
            (Input::Resumed, S::Ready),
            (Input::Exited, S::Exited),
            (Input::CrashLoop, S::Error),
            (Input::Recover, S::Exited),
            (Input::Launched, S::Starting),
            (Input::StopRequested, S::Stopping),
            (Input::Exited, S::Exited),
        ];
        for (input, to) in seq {
            let from = l.state();
            assert_eq!(l.apply(input).unwrap(), Some(StateChanged { from, to }));
        }
    }

    #[test]
    fn error_message_is_readable() {
        let e = InvalidTransition {
            state: S::Paused,
            input: Input::Launched,
        };
        assert_eq!(e.to_string(), "Launched is not valid in state Paused");
    }
}
