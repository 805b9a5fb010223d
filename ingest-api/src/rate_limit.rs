//! A token bucket per API key, charged one token per event.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Per-key token buckets. A rate of 0 disables limiting.
#[derive(Debug)]
pub struct RateLimiter {
    events_per_sec: f64,
    burst: f64,
    buckets: Mutex<Vec<Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl RateLimiter {
    /// `events_per_sec` sustained per key, up to `burst` at once; `keys` buckets.
    pub fn new(events_per_sec: u32, burst: u32, keys: usize) -> Self {
        let burst = f64::from(burst.max(events_per_sec).max(1));
        let now = Instant::now();
        Self {
            events_per_sec: f64::from(events_per_sec),
            burst,
            buckets: Mutex::new(vec![
                Bucket {
                    tokens: burst,
                    updated: now
                };
                keys
            ]),
        }
    }

    /// Takes `n` tokens from key `key`'s bucket, or none and returns how long until they
    /// would be there.
    ///
    /// # Errors
    /// The wait, when the bucket holds fewer than `n` tokens.
    pub fn try_take(&self, key: usize, n: usize) -> Result<(), Duration> {
        self.take_at(key, n, Instant::now())
    }

    fn take_at(&self, key: usize, n: usize, now: Instant) -> Result<(), Duration> {
        if self.events_per_sec <= 0.0 {
            return Ok(());
        }
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(b) = buckets.get_mut(key) else {
            return Ok(());
        };
        let elapsed = now.saturating_duration_since(b.updated).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.events_per_sec).min(self.burst);
        b.updated = now;
        // A request larger than the burst could never pass: charge it the whole bucket.
        #[allow(clippy::cast_precision_loss)]
        let need = (n as f64).min(self.burst);
        if b.tokens >= need {
            b.tokens -= need;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (need - b.tokens) / self.events_per_sec,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_refills_at_the_rate() {
        let rl = RateLimiter::new(100, 200, 1);
        let t0 = Instant::now();
        assert!(rl.take_at(0, 200, t0).is_ok());
        let wait = rl.take_at(0, 50, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.5).abs() < 0.01, "{wait:?}");
        assert!(rl.take_at(0, 50, t0 + Duration::from_millis(500)).is_ok());
    }

    #[test]
    fn keys_have_separate_buckets_and_zero_means_unlimited() {
        let rl = RateLimiter::new(10, 10, 2);
        let t0 = Instant::now();
        assert!(rl.take_at(0, 10, t0).is_ok());
        assert!(rl.take_at(0, 1, t0).is_err());
        assert!(rl.take_at(1, 10, t0).is_ok());
        let off = RateLimiter::new(0, 0, 1);
        assert!(off.take_at(0, 1_000_000, t0).is_ok());
    }
}
