//! In-memory token buckets for login and signup.
//!
//! Each key (a client IP, an email) has a bucket of `burst` tokens that
//! refills continuously; an attempt takes one token from every bucket it
//! names, or from none if any is empty. Memory is bounded: once the map is
//! large, buckets that have refilled completely are forgotten, which loses
//! nothing because a full bucket and a missing one behave the same.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Above this many tracked keys, full buckets are pruned.
const PRUNE_ABOVE: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// A set of token buckets keyed by text.
#[derive(Debug)]
pub struct RateLimiter {
    burst: f64,
    refill_every: Duration,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    /// `burst` attempts at once, then one more per `refill_every`.
    pub fn new(burst: u32, refill_every: Duration) -> Self {
        Self { burst: f64::from(burst), refill_every, buckets: Mutex::new(HashMap::new()) }
    }

    fn refilled(&self, b: Bucket, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        (b.tokens + elapsed / self.refill_every.as_secs_f64()).min(self.burst)
    }

    /// Takes one token from each key's bucket, or returns how long to wait
    /// until every one of them has a token again.
    pub fn check(&self, keys: &[String], now: Instant) -> Result<(), Duration> {
        // The map holds only plain numbers, so a panic elsewhere cannot
        // leave it inconsistent; keep using it.
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let mut wait = Duration::ZERO;
        for key in keys {
            if let Some(b) = buckets.get(key) {
                let tokens = self.refilled(*b, now);
                if tokens < 1.0 {
                    wait = wait.max(self.refill_every.mul_f64(1.0 - tokens));
                }
            }
        }
        if wait > Duration::ZERO {
            return Err(wait);
        }
        for key in keys {
            let tokens = match buckets.get(key) {
                Some(b) => self.refilled(*b, now),
                None => self.burst,
            };
            buckets.insert(key.clone(), Bucket { tokens: tokens - 1.0, at: now });
        }
        if buckets.len() > PRUNE_ABOVE {
            buckets.retain(|_, b| {
                let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
                b.tokens + elapsed / self.refill_every.as_secs_f64() < self.burst
            });
        }
        Ok(())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.buckets.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(k: &[&str]) -> Vec<String> {
        k.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn burst_then_refill() {
        let rl = RateLimiter::new(3, Duration::from_secs(6));
        let t0 = Instant::now();
        for _ in 0..3 {
            rl.check(&keys(&["ip"]), t0).unwrap();
        }
        let wait = rl.check(&keys(&["ip"]), t0).unwrap_err();
        assert_eq!(wait, Duration::from_secs(6));
        assert!(rl.check(&keys(&["ip"]), t0 + Duration::from_secs(5)).is_err());
        rl.check(&keys(&["ip"]), t0 + Duration::from_secs(6)).unwrap();
    }

    #[test]
    fn an_empty_bucket_blocks_without_draining_the_others() {
        let rl = RateLimiter::new(1, Duration::from_secs(6));
        let t0 = Instant::now();
        rl.check(&keys(&["email:a"]), t0).unwrap();
        // The IP bucket must not pay for an attempt that was refused.
        assert!(rl.check(&keys(&["ip", "email:a"]), t0).is_err());
        rl.check(&keys(&["ip", "email:b"]), t0).unwrap();
    }

    #[test]
    fn full_buckets_are_pruned() {
        let rl = RateLimiter::new(2, Duration::from_millis(1));
        let t0 = Instant::now();
        for i in 0..=PRUNE_ABOVE {
            rl.check(&[format!("k{i}")], t0).unwrap();
        }
        rl.check(&keys(&["last"]), t0 + Duration::from_secs(1)).unwrap();
        assert!(rl.len() <= 1, "{} buckets left", rl.len());
    }
}
