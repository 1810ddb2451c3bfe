//! Capped exponential backoff with jitter: one rule for every retry in the project.
//!
//! The shim's restart policy (`--backoff-*`), the shim's dial-out (`--control-connect`) and
//! control-link's reconnect all wait by it. The delay before retry `attempt` (0 = the first)
//! is
//!
//! ```text
//!   base  = min(initial · factor^attempt, max)
//!   delay = base · (1 − jitter + 2 · jitter · unit)      unit uniform in [0, 1)
//! ```
//!
//! so each delay is drawn uniformly within ± `jitter` of its base, and never exceeds
//! `max · (1 + jitter)`. The caller draws `unit` (from the kernel, or a seeded generator in
//! tests): this crate holds no randomness. Every input is total: a NaN or infinite `factor`,
//! `jitter` or `unit`, a zero or huge `initial` or `max`, give a delay, never a panic.

use std::time::Duration;

/// Capped exponential backoff with ± jitter (see the [module docs](self)).
///
/// ```
/// use std::time::Duration;
/// use driver_protocol::Backoff;
///
/// let b = Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(1), factor: 2.0, jitter: 0.0 };
/// assert_eq!(b.delay(0, 0.5), Duration::from_millis(100));
/// assert_eq!(b.delay(2, 0.5), Duration::from_millis(400));
/// assert_eq!(b.delay(30, 0.5), Duration::from_secs(1));
///
/// let j = Backoff { jitter: 0.2, ..b };
/// assert_eq!(j.delay(0, 0.0), Duration::from_millis(80));
/// assert_eq!(j.delay(0, 1.0), Duration::from_millis(120));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// The first delay (before jitter).
    pub initial: Duration,
    /// The cap on the delay (before jitter).
    pub max: Duration,
    /// The multiplier per attempt (values below 1, and NaN, count as 1).
    pub factor: f64,
    /// ± this fraction of random jitter: 0 = none, 0.2 = ± 20 % (clamped to `[0, 1]`; NaN
    /// counts as 0).
    pub jitter: f64,
}

impl Default for Backoff {
    /// A reconnect's: 100 ms, doubling, capped at 5 s, ± 20 %.
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
            factor: 2.0,
            jitter: 0.2,
        }
    }
}

impl Backoff {
    /// The delay before retry `attempt` (0 = the first), for a draw `unit` in `[0, 1)`
    /// (clamped; NaN counts as 0) that places it within the jitter.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let initial = self.initial.as_secs_f64();
        let max = self.max.as_secs_f64();
        // NaN fails `>= 1.0`, so it counts as 1 as well.
        let factor = if self.factor >= 1.0 { self.factor } else { 1.0 };
        let jitter = if self.jitter.is_nan() {
            0.0
        } else {
            self.jitter.clamp(0.0, 1.0)
        };
        let unit = if unit.is_nan() {
            0.0
        } else {
            unit.clamp(0.0, 1.0)
        };
        // Beyond ~1100 the power is infinite for any factor > 1 anyway; keep `powi` in range.
        let exp = i32::try_from(attempt.min(2048)).unwrap_or(2048);
        let grown = initial * factor.powi(exp);
        // inf · 0 (factor = inf, initial = 0) is NaN: the cap.
        let base = if grown.is_nan() { max } else { grown.min(max) };
        let spread = 1.0 - jitter + 2.0 * jitter * unit;
        let upper = max * (1.0 + jitter);
        let secs = (base * spread).min(upper).max(0.0);
        Duration::try_from_secs_f64(secs).unwrap_or(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn curve(initial_ms: u32, max_ms: u32, factor: f64, jitter: f64) -> Backoff {
        Backoff {
            initial: MS * initial_ms,
            max: MS * max_ms,
            factor,
            jitter,
        }
    }

    #[test]
    fn grows_by_the_factor_up_to_the_cap() {
        let b = curve(100, 1000, 2.0, 0.0);
        let got: Vec<u128> = (0..7).map(|n| b.delay(n, 0.3).as_millis()).collect();
        assert_eq!(got, [100, 200, 400, 800, 1000, 1000, 1000]);
        let b = curve(300, 1000, 3.0, 0.0);
        let got: Vec<u128> = (0..3).map(|n| b.delay(n, 0.3).as_millis()).collect();
        assert_eq!(got, [300, 900, 1000]);
    }

    #[test]
    fn jitter_spreads_evenly_around_the_base() {
        let b = curve(1000, 1000, 2.0, 0.25);
        assert_eq!(b.delay(0, 0.0), MS * 750);
        assert_eq!(b.delay(0, 0.5), MS * 1000);
        assert_eq!(b.delay(0, 1.0), MS * 1250);
        // Out-of-range draws are clamped, NaN is the low end.
        assert_eq!(b.delay(0, -3.0), MS * 750);
        assert_eq!(b.delay(0, 7.0), MS * 1250);
        assert_eq!(b.delay(0, f64::NAN), MS * 750);
    }

    #[test]
    fn a_factor_below_one_counts_as_one_and_initial_above_max_is_capped() {
        assert_eq!(curve(300, 1000, 0.1, 0.0).delay(5, 0.0), MS * 300);
        assert_eq!(curve(300, 1000, f64::NAN, 0.0).delay(5, 0.0), MS * 300);
        assert_eq!(curve(5000, 1000, 2.0, 0.0).delay(0, 0.0), MS * 1000);
    }

    #[test]
    fn absurd_inputs_stay_within_the_bound() {
        let huge = Duration::MAX;
        let curves = [
            curve(100, 1000, -3.0, f64::NAN),
            curve(100, 1000, f64::INFINITY, f64::INFINITY),
            curve(100, 1000, f64::NEG_INFINITY, f64::NEG_INFINITY),
            curve(0, 0, f64::INFINITY, 5.0),
            curve(1000, 10, 2.0, -1.0),
            Backoff {
                initial: huge,
                max: huge,
                factor: f64::MAX,
                jitter: 1.0,
            },
            Backoff {
                initial: Duration::ZERO,
                max: Duration::ZERO,
                factor: 0.0,
                jitter: 0.0,
            },
        ];
        for b in curves {
            let jitter = if b.jitter.is_nan() {
                0.0
            } else {
                b.jitter.clamp(0.0, 1.0)
            };
            let bound = b.max.as_secs_f64() * (1.0 + jitter);
            for attempt in [0, 1, 2, 63, 64, 1100, 2048, u32::MAX] {
                for unit in [0.0, 0.5, 0.999, f64::INFINITY, f64::NAN] {
                    let d = b.delay(attempt, unit);
                    assert!(
                        d.as_secs_f64() <= bound * (1.0 + 1e-9) || d == b.max,
                        "{b:?} {attempt} {unit}: {d:?}"
                    );
                }
            }
        }
    }
}
