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

    /// A limiter with this one's rate and burst for a new list of keys: key `i` of the new
    /// list keeps the bucket of key `old_index[i]` of this one (a key kept across a reload
    /// keeps its debt), a new key starts full.
    pub fn for_keys(&self, old_index: &[Option<usize>]) -> Self {
        let old = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        let buckets = old_index
            .iter()
            .map(|i| {
                i.and_then(|i| old.get(i).copied()).unwrap_or(Bucket {
                    tokens: self.burst,
                    updated: now,
                })
            })
            .collect();
        Self {
            events_per_sec: self.events_per_sec,
            burst: self.burst,
            buckets: Mutex::new(buckets),
        }
    }

    /// Charges `n` events to key `key`'s bucket, or nothing and returns how long until the
    /// request would pass.
    ///
    /// A request passes when the bucket holds `n` tokens, or, for a request larger than the
    /// burst, when the bucket is full. It is charged all `n`: the bucket goes into debt, and
    /// later requests wait until the rate has paid it back, so no request size gets more than
    /// the configured rate.
    ///
    /// # Errors
    /// The wait, when the request cannot pass yet.
    pub fn try_take(&self, key: usize, n: usize) -> Result<(), Duration> {
        self.take_at(key, n, Instant::now())
    }

    /// [`Self::try_take`] for a request's `accepted` events that also carried `rejected`
    /// ones: refused, it is charged for the rejected (validating them was work) and the wait
    /// covers that charge too, so a client waiting as told finds the tokens it needs. The
    /// wait used to cover the accepted events only, the charge then took the difference back,
    /// and the retry of a request with rejected items was refused for good.
    ///
    /// When it passes, the rejected items are left to [`Self::charge`] once the request is
    /// answered (charged before the take, they would keep a request larger than the burst
    /// out even from a full bucket).
    ///
    /// # Errors
    /// The wait, when the request cannot pass yet.
    pub fn try_take_with_rejected(
        &self,
        key: usize,
        accepted: usize,
        rejected: usize,
    ) -> Result<(), Duration> {
        self.take_with_rejected_at(key, accepted, rejected, Instant::now())
    }

    /// Whether key `key` may send at all: refuses a bucket that is empty or in debt, so that
    /// an exhausted key is turned away before its body is read.
    ///
    /// # Errors
    /// The wait until the bucket holds a token again.
    pub fn check(&self, key: usize) -> Result<(), Duration> {
        self.check_at(key, Instant::now())
    }

    fn take_at(&self, key: usize, n: usize, now: Instant) -> Result<(), Duration> {
        self.take_with_rejected_at(key, n, 0, now)
    }

    fn take_with_rejected_at(
        &self,
        key: usize,
        accepted: usize,
        rejected: usize,
        now: Instant,
    ) -> Result<(), Duration> {
        #[allow(clippy::cast_precision_loss)]
        let (n, rejected) = (accepted as f64, rejected as f64);
        self.with_bucket(key, now, |b| {
            let need = n.min(self.burst);
            if b.tokens >= need {
                b.tokens -= n;
                Ok(())
            } else {
                b.tokens -= rejected;
                Err(self.wait_for(need - b.tokens))
            }
        })
    }

    /// Charges key `key` for `n` items it sent that were rejected: not refused (they are
    /// answered already), but the bucket may go into debt, so a key that floods invalid
    /// events is turned away (`check`) like one that floods valid ones.
    pub fn charge(&self, key: usize, n: usize) {
        #[allow(clippy::cast_precision_loss)]
        let n = n as f64;
        let _ = self.with_bucket(key, Instant::now(), |b| {
            b.tokens -= n;
            Ok(())
        });
    }

    fn check_at(&self, key: usize, now: Instant) -> Result<(), Duration> {
        self.with_bucket(key, now, |b| {
            if b.tokens >= 1.0 {
                Ok(())
            } else {
                Err(self.wait_for(1.0 - b.tokens))
            }
        })
    }

    /// Refills key `key`'s bucket up to `now` and runs `f` on it; unlimited when the rate is 0.
    fn with_bucket(
        &self,
        key: usize,
        now: Instant,
        f: impl FnOnce(&mut Bucket) -> Result<(), Duration>,
    ) -> Result<(), Duration> {
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
        f(b)
    }

    fn wait_for(&self, tokens: f64) -> Duration {
        Duration::from_secs_f64(tokens / self.events_per_sec)
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
        assert!(off.check_at(0, t0).is_ok());
    }

    #[test]
    fn a_request_larger_than_the_burst_is_charged_in_full() {
        // 100 events/s, burst 100: one request of 1,000 passes on a full bucket and leaves
        // a debt of 900, paid back in 9 s, then 1 s more to fill the bucket again.
        let rl = RateLimiter::new(100, 100, 1);
        let t0 = Instant::now();
        assert!(rl.take_at(0, 1_000, t0).is_ok());
        let at = |ms| t0 + Duration::from_millis(ms);
        let wait = rl.take_at(0, 1_000, at(1_000)).unwrap_err();
        assert!((wait.as_secs_f64() - 9.0).abs() < 0.01, "{wait:?}");
        assert!(rl.take_at(0, 1, at(9_000)).is_err());
        assert!(rl.take_at(0, 1_000, at(10_000)).is_ok());
    }

    #[test]
    fn a_refused_request_with_rejected_items_passes_when_retried_after_its_wait() {
        // 100 events/s, burst 1,000; requests of 800 valid and 200 invalid events. The
        // client waits what it is told, rounded up to whole seconds as `Retry-After` is.
        let rl = RateLimiter::new(100, 1_000, 1);
        let t0 = Instant::now();
        assert!(rl.take_with_rejected_at(0, 800, 200, t0).is_ok());
        rl.charge(0, 200);
        let mut at = t0;
        for _ in 0..2 {
            match rl.take_with_rejected_at(0, 800, 200, at) {
                Ok(()) => return,
                Err(wait) => {
                    at += Duration::from_secs(wait.as_secs() + u64::from(wait.subsec_nanos() > 0));
                }
            }
        }
        panic!("still refused after two waits");
    }

    #[test]
    fn check_refuses_an_empty_or_indebted_bucket_and_charges_nothing() {
        let rl = RateLimiter::new(10, 10, 1);
        let t0 = Instant::now();
        assert!(rl.check_at(0, t0).is_ok());
        assert!(rl.check_at(0, t0).is_ok(), "check charges nothing");
        assert!(rl.take_at(0, 10, t0).is_ok());
        let wait = rl.check_at(0, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.1).abs() < 0.01, "{wait:?}");
        assert!(rl.check_at(0, t0 + Duration::from_millis(100)).is_ok());
    }
}
