//! Restart policy, exponential backoff with jitter, and crash-loop detection.
//!
//! When the driver exits, the supervisor asks a [`Restarter`] what to do: restart it after
//! a delay, leave it stopped, or declare a crash loop. Keeping the decision here — pure, with
//! the clock passed in and a seeded PRNG — lets the arithmetic be tested exhaustively without
//! processes or sleeps.
//!
//! # Backoff
//!
//! The delay before the n-th consecutive restart is
//!
//! ```text
//! delay(n) = min(initial · factor^(n−1), max) · j      j uniform in [1 − jitter, 1 + jitter]
//! ```
//!
//! clamped to `[0, max · (1 + jitter)]`: the project's one backoff rule,
//! [`driver_protocol::Backoff`], at attempt n − 1. A run that lasted at least `reset_after` starts the
//! count over (n = 1 again). The defaults ([`BackoffConfig::default`]) are modelled on
//! Kubernetes' CrashLoopBackOff (10 s initial, ×2, 5 min cap, reset after 10 min of stable
//! running) but scaled down for an agent driver, which is a single process whose restart is
//! cheap and whose user is waiting: 200 ms initial, ×2, 30 s cap, ±10 % jitter (so a fleet of
//! sandboxes that lose a shared dependency at once does not retry in lock step), reset after
//! 60 s up.
//!
//! # Crash loop
//!
//! Restart times are kept for a sliding `window`. If a restart would be the `restarts`-th
//! within the window, the decision is [`Decision::CrashLoop`] instead, and it stays so until
//! [`Restarter::reset`] (`restart_driver`). `restarts = 0` disables detection. Defaults: 5
//! restarts within 60 s.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use driver_protocol::Backoff;

/// When the driver is restarted after it exits (`--restart`): parsed with the other flags.
pub use crate::cli::RestartPolicy;

/// Exponential backoff between restarts (`--backoff-*`): the project's one backoff rule
/// ([`Backoff`]) and when it starts over.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackoffConfig {
    /// The delays: `initial` before the first restart, `max` the cap (before jitter),
    /// `factor` per consecutive restart, ± `jitter`.
    pub delays: Backoff,
    /// A run at least this long resets the backoff.
    pub reset_after: Duration,
}

impl Default for BackoffConfig {
    /// 200 ms, ×2, capped at 30 s, ±10 %, reset after 60 s up.
    fn default() -> Self {
        Self {
            delays: Backoff {
                initial: Duration::from_millis(200),
                max: Duration::from_secs(30),
                factor: 2.0,
                jitter: 0.1,
            },
            reset_after: Duration::from_secs(60),
        }
    }
}

/// Crash-loop detection (`--crash-loop-*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrashLoopConfig {
    /// This many restarts within `window` is a crash loop (0 disables detection).
    pub restarts: u32,
    /// The sliding window.
    pub window: Duration,
}

impl Default for CrashLoopConfig {
    /// 5 restarts within 60 s.
    fn default() -> Self {
        Self {
            restarts: 5,
            window: Duration::from_secs(60),
        }
    }
}

/// What to do after the driver exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Launch it again after `delay`; it will be launch number `attempt` (the first launch is 1).
    Restart {
        /// The launch number of the restart.
        attempt: u32,
        /// How long to wait first.
        delay: Duration,
    },
    /// Do not restart (the policy says so).
    Stop,
    /// Crash loop: `restarts` restarts within `window`; no more until [`Restarter::reset`].
    CrashLoop {
        /// The configured restart count.
        restarts: u32,
        /// The configured window.
        window: Duration,
    },
}

/// Decides restarts: policy, backoff, crash loop. See the module docs.
#[derive(Debug, Clone)]
pub struct Restarter {
    policy: RestartPolicy,
    backoff: BackoffConfig,
    crash_loop: CrashLoopConfig,
    rng: XorShift64Star,
    /// Consecutive restarts since the last backoff reset (the exponent).
    consecutive: u32,
    /// The current launch number (1 = the first launch).
    launch: u32,
    /// Times of recent restarts, oldest first; at most `crash_loop.restarts` entries.
    recent: VecDeque<Instant>,
    /// A crash loop was declared and not yet cleared by `reset`.
    looped: bool,
    /// Restarts decided since the shim started.
    total: u32,
}

impl Restarter {
    /// A restarter for a driver about to be launched for the first time; `seed` seeds the
    /// jitter (any value, 0 included).
    pub fn new(
        policy: RestartPolicy,
        backoff: BackoffConfig,
        crash_loop: CrashLoopConfig,
        seed: u64,
    ) -> Self {
        Self {
            policy,
            backoff,
            crash_loop,
            rng: XorShift64Star::new(seed),
            consecutive: 0,
            launch: 1,
            recent: VecDeque::new(),
            looped: false,
            total: 0,
        }
    }

    /// The driver exited at `now` after running `uptime`; `clean` = it exited 0 on its own.
    pub fn on_exit(&mut self, now: Instant, uptime: Duration, clean: bool) -> Decision {
        if self.looped {
            return self.crash_loop_decision();
        }
        match self.policy {
            RestartPolicy::Never => return Decision::Stop,
            RestartPolicy::OnFailure if clean => return Decision::Stop,
            RestartPolicy::OnFailure | RestartPolicy::Always => {}
        }
        if uptime >= self.backoff.reset_after {
            self.consecutive = 0;
        }
        if self.would_loop(now) {
            self.looped = true;
            return self.crash_loop_decision();
        }
        if self.crash_loop.restarts > 0 {
            self.recent.push_back(now);
        }
        self.consecutive = self.consecutive.saturating_add(1);
        self.launch = self.launch.saturating_add(1);
        self.total = self.total.saturating_add(1);
        let u = self.rng.next_unit();
        Decision::Restart {
            attempt: self.launch,
            // The n-th consecutive restart waits the backoff's attempt n - 1.
            delay: self
                .backoff
                .delays
                .delay(self.consecutive.saturating_sub(1), u),
        }
    }

    /// `restart_driver`: forget the crash-loop history and the backoff. The next launch is
    /// attempt 1 again.
    pub fn reset(&mut self) {
        self.consecutive = 0;
        self.launch = 1;
        self.recent.clear();
        self.looped = false;
    }

    /// Restarts decided since the shim started.
    pub fn restarts(&self) -> u32 {
        self.total
    }

    /// Drops restarts older than the window; true if one more would make a crash loop.
    fn would_loop(&mut self, now: Instant) -> bool {
        let limit = self.crash_loop.restarts;
        if limit == 0 {
            return false;
        }
        let window = self.crash_loop.window;
        while let Some(&t) = self.recent.front() {
            if now.saturating_duration_since(t) >= window {
                self.recent.pop_front();
            } else {
                break;
            }
        }
        // `recent` never holds `limit` entries: reaching `limit` is the crash loop.
        let with_this = u32::try_from(self.recent.len())
            .unwrap_or(u32::MAX)
            .saturating_add(1);
        with_this >= limit
    }

    fn crash_loop_decision(&self) -> Decision {
        Decision::CrashLoop {
            restarts: self.crash_loop.restarts,
            window: self.crash_loop.window,
        }
    }
}

/// xorshift64* (Vigna 2014): tiny, fast, good enough for jitter. Not for secrets.
#[derive(Debug, Clone)]
struct XorShift64Star {
    state: u64,
}

impl XorShift64Star {
    fn new(seed: u64) -> Self {
        // SplitMix64 scrambles the seed so that nearby seeds give unrelated streams; the
        // state must never be 0 (xorshift's fixed point).
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Self {
            state: if z == 0 { 0x9E37_79B9_7F4A_7C15 } else { z },
        }
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[0, 1)`.
    fn next_unit(&mut self) -> f64 {
        // The top 53 bits fill an f64 mantissa exactly.
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn cfg(initial_ms: u64, max_ms: u64, factor: f64, jitter: f64) -> BackoffConfig {
        BackoffConfig {
            delays: Backoff {
                initial: MS * initial_ms as u32,
                max: MS * max_ms as u32,
                factor,
                jitter,
            },
            reset_after: Duration::from_secs(60),
        }
    }

    fn no_loop() -> CrashLoopConfig {
        CrashLoopConfig {
            restarts: 0,
            window: Duration::from_secs(60),
        }
    }

    fn delay_of(d: Decision) -> Duration {
        match d {
            Decision::Restart { delay, .. } => delay,
            other => panic!("expected a restart, got {other:?}"),
        }
    }

    #[test]
    fn policy_parses_and_displays() {
        for (s, p) in [
            ("never", RestartPolicy::Never),
            ("on-failure", RestartPolicy::OnFailure),
            ("always", RestartPolicy::Always),
        ] {
            assert_eq!(s.parse::<RestartPolicy>().unwrap(), p);
            assert_eq!(p.to_string(), s);
        }
        let err = "sometimes".parse::<RestartPolicy>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid restart policy \"sometimes\" (expected never, on-failure or always)"
        );
        assert!("Always".parse::<RestartPolicy>().is_err());
        assert_eq!(RestartPolicy::default(), RestartPolicy::OnFailure);
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let b = BackoffConfig::default();
        assert_eq!(b.delays.initial, MS * 200);
        assert_eq!(b.delays.max, Duration::from_secs(30));
        assert_eq!(b.delays.factor, 2.0);
        assert_eq!(b.delays.jitter, 0.1);
        assert_eq!(b.reset_after, Duration::from_secs(60));
        let c = CrashLoopConfig::default();
        assert_eq!((c.restarts, c.window), (5, Duration::from_secs(60)));
    }

    #[test]
    fn never_stops() {
        let mut r = Restarter::new(RestartPolicy::Never, cfg(100, 1000, 2.0, 0.0), no_loop(), 1);
        let now = Instant::now();
        assert_eq!(r.on_exit(now, MS, false), Decision::Stop);
        assert_eq!(r.on_exit(now, MS, true), Decision::Stop);
        assert_eq!(r.restarts(), 0);
    }

    #[test]
    fn on_failure_stops_on_clean_exit_only() {
        let mut r = Restarter::new(
            RestartPolicy::OnFailure,
            cfg(100, 1000, 2.0, 0.0),
            no_loop(),
            1,
        );
        let now = Instant::now();
        assert_eq!(r.on_exit(now, MS, true), Decision::Stop);
        assert_eq!(
            r.on_exit(now, MS, false),
            Decision::Restart {
                attempt: 2,
                delay: MS * 100
            }
        );
        assert_eq!(r.restarts(), 1);
    }

    #[test]
    fn always_restarts_on_clean_exit_too() {
        let mut r = Restarter::new(
            RestartPolicy::Always,
            cfg(100, 1000, 2.0, 0.0),
            no_loop(),
            1,
        );
        let now = Instant::now();
        assert!(matches!(
            r.on_exit(now, MS, true),
            Decision::Restart { attempt: 2, .. }
        ));
        assert!(matches!(
            r.on_exit(now, MS, false),
            Decision::Restart { attempt: 3, .. }
        ));
        assert_eq!(r.restarts(), 2);
    }

    #[test]
    fn delays_double_up_to_the_cap_without_jitter() {
        let mut r = Restarter::new(
            RestartPolicy::Always,
            cfg(100, 1000, 2.0, 0.0),
            no_loop(),
            7,
        );
        let t0 = Instant::now();
        let got: Vec<(u32, u64)> = (0..7)
            .map(|i| match r.on_exit(t0 + MS * i, MS, false) {
                Decision::Restart { attempt, delay } => (attempt, delay.as_millis() as u64),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            got,
            [
                (2, 100),
                (3, 200),
                (4, 400),
                (5, 800),
                (6, 1000),
                (7, 1000),
                (8, 1000)
            ]
        );
    }

    #[test]
    fn jitter_stays_within_bounds_and_spreads() {
        let mut r = Restarter::new(
            RestartPolicy::Always,
            cfg(1000, 1000, 2.0, 0.25),
            no_loop(),
            42,
        );
        let t0 = Instant::now();
        let (mut lo, mut hi) = (Duration::MAX, Duration::ZERO);
        let mut sum = 0.0;
        let draws = 10_000;
        for i in 0..draws {
            let d = delay_of(r.on_exit(t0 + MS * i, MS, false));
            assert!(d >= MS * 750 && d <= MS * 1250, "{d:?}");
            lo = lo.min(d);
            hi = hi.max(d);
            sum += d.as_secs_f64();
        }
        // Uniform over [750, 1250] ms: the extremes get close, the mean is near 1 s.
        assert!(lo < MS * 760, "min {lo:?}");
        assert!(hi > MS * 1240, "max {hi:?}");
        let mean = sum / f64::from(draws);
        assert!((mean - 1.0).abs() < 0.01, "mean {mean}");
    }

    #[test]
    fn seeds_give_different_streams_and_zero_works() {
        let run = |seed| {
            let mut r = Restarter::new(
                RestartPolicy::Always,
                cfg(1000, 1000, 1.0, 0.5),
                no_loop(),
                seed,
            );
            let t0 = Instant::now();
            (0..8)
                .map(|i| delay_of(r.on_exit(t0 + MS * i, MS, false)))
                .collect::<Vec<_>>()
        };
        let zero = run(0);
        // Seed 0 is not stuck: the draws vary.
        assert!(zero.windows(2).any(|w| w[0] != w[1]), "{zero:?}");
        assert_ne!(zero, run(1));
        assert_eq!(run(1), run(1));
    }

    #[test]
    fn rng_is_uniform_in_unit_interval() {
        let mut rng = XorShift64Star::new(0);
        let mut buckets = [0u32; 10];
        for _ in 0..100_000 {
            let u = rng.next_unit();
            assert!((0.0..1.0).contains(&u));
            buckets[(u * 10.0) as usize] += 1;
        }
        for b in buckets {
            assert!((9_000..11_000).contains(&b), "{buckets:?}");
        }
    }

    #[test]
    fn a_stable_run_resets_the_backoff() {
        let mut b = cfg(100, 10_000, 2.0, 0.0);
        b.reset_after = Duration::from_secs(10);
        let mut r = Restarter::new(RestartPolicy::Always, b, no_loop(), 3);
        let t0 = Instant::now();
        assert_eq!(delay_of(r.on_exit(t0, MS, false)), MS * 100);
        assert_eq!(delay_of(r.on_exit(t0, MS, false)), MS * 200);
        assert_eq!(delay_of(r.on_exit(t0, MS, false)), MS * 400);
        // Just short of the reset: keeps growing.
        let almost = Duration::from_secs(10) - MS;
        assert_eq!(delay_of(r.on_exit(t0, almost, false)), MS * 800);
        // Exactly the reset time: starts over.
        let d = r.on_exit(t0, Duration::from_secs(10), false);
        assert_eq!(
            d,
            Decision::Restart {
                attempt: 6,
                delay: MS * 100
            }
        );
        assert_eq!(delay_of(r.on_exit(t0, MS, false)), MS * 200);
    }

    #[test]
    fn crash_loop_at_exactly_n_restarts_in_the_window() {
        let loop_cfg = CrashLoopConfig {
            restarts: 3,
            window: Duration::from_secs(10),
        };
        let mut r = Restarter::new(RestartPolicy::Always, cfg(100, 1000, 2.0, 0.0), loop_cfg, 9);
        let t0 = Instant::now();
        assert!(matches!(r.on_exit(t0, MS, false), Decision::Restart { .. }));
        assert!(matches!(
            r.on_exit(t0 + Duration::from_secs(1), MS, false),
            Decision::Restart { .. }
        ));
        let looped = Decision::CrashLoop {
            restarts: 3,
            window: Duration::from_secs(10),
        };
        assert_eq!(r.on_exit(t0 + Duration::from_secs(2), MS, false), looped);
        assert!(r.looped);
        assert_eq!(r.restarts(), 2);
        // Sticky: even much later, even after a long run, even a clean exit.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(r.on_exit(later, Duration::from_secs(3600), true), looped);
        assert_eq!(r.restarts(), 2);
    }

    #[test]
    fn restarts_outside_the_window_do_not_count() {
        let loop_cfg = CrashLoopConfig {
            restarts: 3,
            window: Duration::from_secs(10),
        };
        let mut r = Restarter::new(RestartPolicy::Always, cfg(100, 1000, 2.0, 0.0), loop_cfg, 9);
        let t0 = Instant::now();
        // One restart every 5 s: at most two (t-5, t) within any 10 s window ⇒ never 3.
        for i in 0..20 {
            let d = r.on_exit(t0 + Duration::from_secs(5 * i), MS, false);
            assert!(matches!(d, Decision::Restart { .. }), "at {i}: {d:?}");
        }
        // Then a quick one: t-5, t-0 and now within 10 s ⇒ the third.
        let d = r.on_exit(t0 + Duration::from_secs(95) + MS, MS, false);
        assert!(
            matches!(d, Decision::CrashLoop { restarts: 3, .. }),
            "{d:?}"
        );
    }

    #[test]
    fn reset_clears_the_crash_loop_and_the_backoff() {
        let loop_cfg = CrashLoopConfig {
            restarts: 2,
            window: Duration::from_secs(10),
        };
        let mut r = Restarter::new(RestartPolicy::Always, cfg(100, 1000, 2.0, 0.0), loop_cfg, 9);
        let t0 = Instant::now();
        assert_eq!(delay_of(r.on_exit(t0, MS, false)), MS * 100);
        assert!(matches!(
            r.on_exit(t0, MS, false),
            Decision::CrashLoop { .. }
        ));
        r.reset();
        assert!(!r.looped);
        // Same instant: the history is gone, the backoff and the attempt start over.
        assert_eq!(
            r.on_exit(t0, MS, false),
            Decision::Restart {
                attempt: 2,
                delay: MS * 100
            }
        );
        assert!(matches!(
            r.on_exit(t0, MS, false),
            Decision::CrashLoop { .. }
        ));
        // The lifetime count keeps what was decided.
        assert_eq!(r.restarts(), 2);
    }

    #[test]
    fn crash_loop_of_one_trips_on_the_first_restart() {
        let loop_cfg = CrashLoopConfig {
            restarts: 1,
            window: Duration::ZERO,
        };
        let mut r = Restarter::new(RestartPolicy::Always, cfg(100, 1000, 2.0, 0.0), loop_cfg, 9);
        assert!(matches!(
            r.on_exit(Instant::now(), MS, false),
            Decision::CrashLoop { restarts: 1, .. }
        ));
    }

    #[test]
    fn crash_loop_history_stays_bounded() {
        let loop_cfg = CrashLoopConfig {
            restarts: 4,
            window: Duration::from_secs(1),
        };
        let mut r = Restarter::new(RestartPolicy::Always, cfg(1, 1, 2.0, 0.0), loop_cfg, 9);
        let t0 = Instant::now();
        for i in 0..10_000u32 {
            let d = r.on_exit(t0 + Duration::from_secs(u64::from(i)), MS, false);
            assert!(matches!(d, Decision::Restart { .. }));
            assert!(r.recent.len() < 4);
        }
    }

    #[test]
    fn absurd_configs_do_not_panic() {
        let huge = Duration::MAX;
        let configs = [
            cfg(100, 1000, 0.5, 0.0),
            cfg(100, 1000, -3.0, 0.0),
            cfg(100, 1000, f64::NAN, f64::NAN),
            cfg(100, 1000, f64::INFINITY, f64::INFINITY),
            cfg(100, 1000, f64::NEG_INFINITY, f64::NEG_INFINITY),
            cfg(0, 0, f64::INFINITY, 5.0),
            cfg(1000, 10, 2.0, -1.0),
            BackoffConfig {
                delays: Backoff {
                    initial: huge,
                    max: huge,
                    factor: f64::MAX,
                    jitter: 1.0,
                },
                reset_after: huge,
            },
            BackoffConfig {
                delays: Backoff {
                    initial: Duration::ZERO,
                    max: Duration::ZERO,
                    factor: 0.0,
                    jitter: 0.0,
                },
                reset_after: Duration::ZERO,
            },
        ];
        let t0 = Instant::now();
        for b in configs {
            for seed in [0, 1, u64::MAX] {
                let mut r = Restarter::new(
                    RestartPolicy::Always,
                    b,
                    CrashLoopConfig {
                        restarts: u32::MAX,
                        window: huge,
                    },
                    seed,
                );
                for i in 0..3000 {
                    let d = delay_of(r.on_exit(t0 + MS * i, MS, false));
                    let jitter = if b.delays.jitter.is_nan() {
                        0.0
                    } else {
                        b.delays.jitter.clamp(0.0, 1.0)
                    };
                    let bound = b.delays.max.as_secs_f64() * (1.0 + jitter);
                    assert!(
                        d.as_secs_f64() <= bound * (1.0 + 1e-9) || d == b.delays.max,
                        "{b:?}: {d:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn factor_below_one_counts_as_one() {
        let mut r = Restarter::new(
            RestartPolicy::Always,
            cfg(300, 1000, 0.1, 0.0),
            no_loop(),
            1,
        );
        let t0 = Instant::now();
        for _ in 0..5 {
            assert_eq!(delay_of(r.on_exit(t0, MS, false)), MS * 300);
        }
    }

    #[test]
    fn initial_above_max_is_capped() {
        let mut r = Restarter::new(
            RestartPolicy::Always,
            cfg(5000, 1000, 2.0, 0.0),
            no_loop(),
            1,
        );
        assert_eq!(delay_of(r.on_exit(Instant::now(), MS, false)), MS * 1000);
    }

    #[test]
    fn counters_saturate() {
        let mut r = Restarter::new(RestartPolicy::Always, cfg(1, 10, 2.0, 0.0), no_loop(), 1);
        r.launch = u32::MAX - 1;
        r.total = u32::MAX - 1;
        r.consecutive = u32::MAX - 1;
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(
                r.on_exit(t0, MS, false),
                Decision::Restart {
                    attempt: u32::MAX,
                    delay: MS * 10
                }
            );
        }
        assert_eq!(r.restarts(), u32::MAX);
    }
}
