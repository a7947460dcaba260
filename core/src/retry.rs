//! Retry math: exponential backoff with jitter, owned by the runtime.
//!
//! The `backoff` crate is not used: it is unmaintained (RUSTSEC-2025-0012), pulls the
//! unmaintained `instant` crate (RUSTSEC-2024-0384), and a retry loop around a future is
//! the wrong shape for a durable saga. After a crash a retry must be re-armed from the
//! database, so the delay is computed here, purely, and the caller persists the due time.
//!
//! The random draw is an input ([`Jitter`]), never drawn here, so the machine that calls
//! [`RetryPolicy::next_delay`] stays deterministic and testable.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A random draw in `[0, 1)`, supplied by the caller (the actor shell draws it; tests
/// choose it). Values outside the range are clamped.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Default, Serialize, Deserialize)]
pub struct Jitter(f64);

impl Jitter {
    /// No randomness: the delay is the full exponential cap.
    pub const NONE: Jitter = Jitter(0.0);

    /// Wraps a draw, clamping it into `[0, 1)`; NaN becomes 0.
    pub fn new(draw: f64) -> Self {
        if draw.is_nan() {
            return Jitter(0.0);
        }
        Jitter(draw.clamp(0.0, 1.0 - f64::EPSILON))
    }

    /// The draw, in `[0, 1)`.
    pub fn value(self) -> f64 {
        self.0
    }
}

/// How a step (or a compensation) is retried.
///
/// The delay before attempt `n + 1` (after `n` failed attempts) is
/// `cap = min(max_delay, initial_delay * multiplier^(n - 1))`, then jittered:
/// `delay = cap * (1 - jitter * draw)`. With `jitter = 1.0` (the default) this is
/// "full jitter" (`random(0, cap]`), which spreads a thundering herd of retries best;
/// with `jitter = 0.0` the delay is exactly the exponential curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RetryPolicy {
    /// Total attempts, the first one included. `1` means "never retry". Default: 5.
    pub max_attempts: u32,
    /// Cap of the delay after the first failure. Default: 100 ms.
    #[serde(with = "crate::serde_millis")]
    pub initial_delay: Duration,
    /// Growth of the cap per further failure, `>= 1.0`. Default: 2.0.
    pub multiplier: f64,
    /// Upper bound of every delay, `>= initial_delay`. Default: 10 s.
    #[serde(with = "crate::serde_millis")]
    pub max_delay: Duration,
    /// Fraction of the cap that is randomised, in `[0, 1]`. Default: 1.0 (full jitter).
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_delay: Duration::from_millis(100),
            multiplier: 2.0,
            max_delay: Duration::from_secs(10),
            jitter: 1.0,
        }
    }
}

/// Why a [`RetryPolicy`] is not usable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// `max_attempts` is zero: the step could never run.
    #[error("max_attempts must be at least 1 (got 0)")]
    ZeroAttempts,
    /// `max_delay` is shorter than `initial_delay`.
    #[error("max_delay ({max:?}) is below initial_delay ({initial:?})")]
    MaxBelowInitial {
        /// The configured initial delay.
        initial: Duration,
        /// The configured maximum delay.
        max: Duration,
    },
    /// `multiplier` is below 1, NaN or infinite.
    #[error("multiplier must be a finite number >= 1.0 (got {0})")]
    BadMultiplier(f64),
    /// `jitter` is outside `[0, 1]`.
    #[error("jitter must be within [0, 1] (got {0})")]
    BadJitter(f64),
}

impl RetryPolicy {
    /// A policy that never retries.
    pub fn no_retry() -> Self {
        RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        }
    }

    /// Checks the policy's invariants.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.max_attempts == 0 {
            return Err(PolicyError::ZeroAttempts);
        }
        if self.max_delay < self.initial_delay {
            return Err(PolicyError::MaxBelowInitial {
                initial: self.initial_delay,
                max: self.max_delay,
            });
        }
        if !self.multiplier.is_finite() || self.multiplier < 1.0 {
            return Err(PolicyError::BadMultiplier(self.multiplier));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(PolicyError::BadJitter(self.jitter));
        }
        Ok(())
    }

    /// The delay before the next attempt, after `failed_attempts` attempts have failed,
    /// or `None` when the budget is spent (`failed_attempts >= max_attempts`).
    ///
    /// Pure: the same inputs always give the same delay. The result never exceeds
    /// `max_delay` and never goes below `cap * (1 - jitter)`.
    pub fn next_delay(&self, failed_attempts: u32, jitter: Jitter) -> Option<Duration> {
        if failed_attempts == 0 || failed_attempts >= self.max_attempts {
            return None;
        }
        Some(self.jittered(self.cap(failed_attempts), jitter))
    }

    /// The un-jittered cap after `failed_attempts` failures (at least one).
    pub fn cap(&self, failed_attempts: u32) -> Duration {
        let exponent = failed_attempts.saturating_sub(1).min(1_000) as i32;
        let max = self.max_delay.as_secs_f64();
        let raw = self.initial_delay.as_secs_f64() * self.multiplier.powi(exponent);
        // `powi` may overflow to infinity: min() with a finite max keeps it finite.
        Duration::from_secs_f64(if raw.is_finite() { raw.min(max) } else { max })
    }

    fn jittered(&self, cap: Duration, jitter: Jitter) -> Duration {
        let factor = 1.0 - self.jitter.clamp(0.0, 1.0) * jitter.value();
        cap.mul_f64(factor.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 6,
            initial_delay: Duration::from_millis(100),
            multiplier: 2.0,
            max_delay: Duration::from_millis(1_000),
            jitter: 1.0,
        }
    }

    #[test]
    fn exponential_curve_is_capped() {
        let p = RetryPolicy {
            jitter: 0.0,
            ..policy()
        };
        let delays: Vec<_> = (1..6)
            .map(|n| p.next_delay(n, Jitter::new(0.7)).map(|d| d.as_millis()))
            .collect();
        assert_eq!(
            delays,
            vec![Some(100), Some(200), Some(400), Some(800), Some(1000)]
        );
    }

    #[test]
    fn budget_is_never_exceeded() {
        let p = policy();
        assert_eq!(p.next_delay(0, Jitter::NONE), None);
        assert!(p.next_delay(5, Jitter::NONE).is_some());
        assert_eq!(p.next_delay(6, Jitter::NONE), None);
        assert_eq!(p.next_delay(60, Jitter::NONE), None);
        assert_eq!(RetryPolicy::no_retry().next_delay(1, Jitter::NONE), None);
    }

    #[test]
    fn full_jitter_spans_zero_to_cap() {
        let p = policy();
        assert_eq!(
            p.next_delay(1, Jitter::NONE),
            Some(Duration::from_millis(100))
        );
        let near_one = p.next_delay(1, Jitter::new(0.999_999)).expect("delay");
        assert!(near_one < Duration::from_millis(1));
    }

    #[test]
    fn validation_names_the_problem() {
        let bad = RetryPolicy {
            max_attempts: 0,
            ..policy()
        };
        assert_eq!(bad.validate(), Err(PolicyError::ZeroAttempts));
        let bad = RetryPolicy {
            max_delay: Duration::from_millis(10),
            ..policy()
        };
        assert!(matches!(
            bad.validate(),
            Err(PolicyError::MaxBelowInitial { .. })
        ));
        let bad = RetryPolicy {
            multiplier: 0.5,
            ..policy()
        };
        assert_eq!(bad.validate(), Err(PolicyError::BadMultiplier(0.5)));
        let bad = RetryPolicy {
            jitter: 1.5,
            ..policy()
        };
        assert_eq!(bad.validate(), Err(PolicyError::BadJitter(1.5)));
        assert_eq!(policy().validate(), Ok(()));
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        let p = RetryPolicy {
            max_attempts: u32::MAX,
            multiplier: 10.0,
            jitter: 0.0,
            ..policy()
        };
        assert_eq!(
            p.next_delay(u32::MAX - 1, Jitter::NONE),
            Some(Duration::from_millis(1000))
        );
    }

    mod props {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            /// For any valid policy and any draw, a delay stays within
            /// [cap * (1 - jitter), cap] and never above max_delay; no delay past the budget.
            #[test]
            fn delay_within_bounds(
                attempts in 1u32..20,
                initial_ms in 1u64..5_000,
                extra_ms in 0u64..60_000,
                multiplier in 1.0f64..10.0,
                jitter_frac in 0.0f64..=1.0,
                failed in 0u32..40,
                draw in 0.0f64..1.0,
            ) {
                let p = RetryPolicy {
                    max_attempts: attempts,
                    initial_delay: Duration::from_millis(initial_ms),
                    multiplier,
                    max_delay: Duration::from_millis(initial_ms + extra_ms),
                    jitter: jitter_frac,
                };
                prop_assert!(p.validate().is_ok());
                match p.next_delay(failed, Jitter::new(draw)) {
                    None => prop_assert!(failed == 0 || failed >= attempts),
                    Some(d) => {
                        prop_assert!(failed >= 1 && failed < attempts);
                        let cap = p.cap(failed);
                        prop_assert!(cap <= p.max_delay);
                        prop_assert!(d <= cap);
                        let floor = cap.mul_f64(1.0 - jitter_frac);
                        // one nanosecond of float rounding either way
                        prop_assert!(d + Duration::from_nanos(1) >= floor);
                    }
                }
            }
        }
    }
}
