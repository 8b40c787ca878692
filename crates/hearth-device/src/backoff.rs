//! Reconnect timing: capped exponential backoff with full jitter.
//!
//! After the n-th consecutive failure (counting from 0) the agent sleeps a
//! uniformly random time in `[0, min(CAP, BASE · 2ⁿ)]` ("full jitter", as in
//! the AWS architecture blog's analysis): a fleet of devices that lost the
//! cloud at the same moment then spreads its reconnects instead of
//! hammering the cloud in waves. A link that stayed up for [`STABLE_AFTER`]
//! resets the sequence, so one dropped link reconnects quickly while a
//! flapping cloud is not dialled in a tight loop.

use std::time::Duration;

use rand::Rng;

/// The first cap.
pub const BASE: Duration = Duration::from_secs(1);
/// The largest cap.
pub const CAP: Duration = Duration::from_secs(60);
/// A link that stayed up at least this long resets the backoff.
pub const STABLE_AFTER: Duration = Duration::from_secs(30);

/// Reconnect state: the number of consecutive failures.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// A fresh backoff (no failures yet).
    pub fn new() -> Self {
        Self::default()
    }

    /// The upper bound of the next sleep: `min(CAP, BASE · 2ⁿ)`.
    pub fn cap(&self) -> Duration {
        // 2^6 s already exceeds the 60 s cap, so larger exponents only risk overflow.
        let factor = 1u32 << self.failures.min(6);
        BASE.saturating_mul(factor).min(CAP)
    }

    /// The next sleep, with randomness injected: `pick` gets the cap and
    /// returns a value in `[0, cap]`; anything larger is clamped to the cap.
    pub fn next_delay_with(&mut self, pick: impl FnOnce(Duration) -> Duration) -> Duration {
        let cap = self.cap();
        self.failures = self.failures.saturating_add(1);
        pick(cap).min(cap)
    }

    /// The next sleep, drawn uniformly from `[0, cap]` with `rng`.
    pub fn next_delay<R: Rng + ?Sized>(&mut self, rng: &mut R) -> Duration {
        self.next_delay_with(|cap| rng.gen_range(Duration::ZERO..=cap))
    }

    /// The next sleep after the cloud asked for none shorter than `hint`
    /// (its busy frame): drawn uniformly from `[hint, hint + cap]`, so
    /// devices turned away at once still spread out. The hint is capped at
    /// [`CAP`]: it comes from whoever holds the cloud's TLS key, and a
    /// device must not be told to stay away for hours.
    pub fn next_delay_after<R: Rng + ?Sized>(&mut self, hint: Duration, rng: &mut R) -> Duration {
        hint.min(CAP) + self.next_delay(rng)
    }

    /// Records that a link was up for `up_for` before it closed.
    pub fn link_closed(&mut self, up_for: Duration) {
        if up_for >= STABLE_AFTER {
            self.failures = 0;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn a_busy_hint_is_a_floor_under_the_jitter_and_is_itself_capped() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut b = Backoff::new();
        for _ in 0..50 {
            let d = b.next_delay_after(secs(10), &mut rng);
            assert!(d >= secs(10) && d <= secs(10) + CAP, "{d:?}");
        }
        let mut b = Backoff::new();
        let d = b.next_delay_after(secs(86_400), &mut rng);
        assert!(d >= CAP && d <= CAP + BASE, "a day is capped: {d:?}");
    }

    #[test]
    fn caps_double_from_one_second_up_to_sixty() {
        let mut b = Backoff::new();
        let caps: Vec<Duration> = (0..10).map(|_| b.next_delay_with(|cap| cap)).collect();
        let want: Vec<Duration> = [1, 2, 4, 8, 16, 32, 60, 60, 60, 60].into_iter().map(secs).collect();
        assert_eq!(caps, want);
    }

    #[test]
    fn cap_never_overflows_after_many_failures() {
        let mut b = Backoff { failures: u32::MAX - 1 };
        assert_eq!(b.next_delay_with(|cap| cap), CAP);
        assert_eq!(b.next_delay_with(|cap| cap), CAP);
    }

    #[test]
    fn injected_values_are_clamped_to_the_cap() {
        let mut b = Backoff::new();
        assert_eq!(b.next_delay_with(|_| Duration::MAX), secs(1));
        assert_eq!(b.next_delay_with(|_| Duration::ZERO), Duration::ZERO);
        assert_eq!(b.next_delay_with(|cap| cap / 2), secs(2));
    }

    #[test]
    fn full_jitter_spans_zero_to_cap() {
        let mut rng = StdRng::seed_from_u64(7);
        for failures in 0..9 {
            let probe = Backoff { failures };
            let cap = probe.cap();
            let draws: Vec<Duration> = (0..2000)
                .map(|_| {
                    let mut b = probe.clone();
                    b.next_delay(&mut rng)
                })
                .collect();
            assert!(draws.iter().all(|d| *d <= cap), "a draw exceeded the cap {cap:?}");
            // Uniform over [0, cap]: 2000 draws come close to both ends.
            let (min, max) = (draws.iter().min().copied(), draws.iter().max().copied());
            assert!(min.is_some_and(|m| m < cap / 50), "min {min:?} for cap {cap:?}");
            assert!(max.is_some_and(|m| m > cap - cap / 50), "max {max:?} for cap {cap:?}");
        }
    }

    #[test]
    fn a_stable_link_resets_and_a_short_one_does_not() {
        let mut b = Backoff::new();
        for _ in 0..5 {
            b.next_delay_with(|cap| cap);
        }
        b.link_closed(secs(29));
        assert_eq!(b.cap(), secs(32));
        b.link_closed(STABLE_AFTER);
        assert_eq!(b.cap(), BASE);
    }
}
