//! The write cap: a token bucket of events per second in front of the sink. With the
//! poller's limit on concurrent batches, this is what protects the downstream store.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use shared::metrics::Exposition;
use shared::{AdEvent, Sink, SinkError, WriteReport};

use crate::metrics::Metrics;
use tokio::sync::Mutex;
use tokio::time::Instant;

/// A token bucket of events: `rate_per_sec` tokens a second, holding at most `burst`.
///
/// Over any window of `t` seconds at most `burst + rate_per_sec · t` events pass, plus the
/// overdraft of one write larger than `burst` (it waits for a full bucket, then goes into
/// debt that later writes pay off).
#[derive(Debug)]
pub struct WriteCap {
    rate_per_sec: f64,
    burst: f64,
    // A tokio mutex held across the wait queues writers fairly, first come first served.
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl WriteCap {
    /// A bucket refilling `rate_per_sec` events a second (at least 1), holding at most `burst`
    /// (at least 1), full at the start.
    pub fn new(rate_per_sec: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate_per_sec: f64::from(rate_per_sec.max(1)),
            burst,
            state: Mutex::new(Bucket {
                tokens: burst,
                at: Instant::now(),
            }),
        }
    }

    /// Waits until `events` may be written, and takes them from the bucket.
    pub async fn acquire(&self, events: usize) {
        if events == 0 {
            return;
        }
        // Event counts are far below 2^52, where f64 stops being exact.
        #[allow(clippy::cast_precision_loss)]
        let want = events as f64;
        let mut b = self.state.lock().await;
        self.refill(&mut b);
        let need = want.min(self.burst);
        if b.tokens < need {
            let wait = Duration::from_secs_f64((need - b.tokens) / self.rate_per_sec);
            tokio::time::sleep(wait).await;
            self.refill(&mut b);
        }
        b.tokens -= want;
    }

    /// The largest write that fits the bucket at once.
    pub fn max_chunk(&self) -> usize {
        // The burst is built from a u32, so it converts back exactly.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let burst = self.burst as usize;
        burst.max(1)
    }

    fn refill(&self, b: &mut Bucket) {
        let now = Instant::now();
        let earned = now.duration_since(b.at).as_secs_f64() * self.rate_per_sec;
        b.tokens = (b.tokens + earned).min(self.burst);
        b.at = now;
    }
}

/// A sink that takes every write's events from a [`WriteCap`] before passing it on.
#[derive(Debug, Clone)]
pub struct CappedSink {
    inner: Arc<dyn Sink>,
    cap: Arc<WriteCap>,
    metrics: Option<Arc<Metrics>>,
}

impl CappedSink {
    /// Caps writes to `inner` with `cap`.
    pub fn new(inner: Arc<dyn Sink>, cap: Arc<WriteCap>) -> Self {
        Self {
            inner,
            cap,
            metrics: None,
        }
    }

    /// Counts in `metrics` what the chunks before a failed one stored: the failed write's
    /// report is lost with its error, and the retry finds those events as duplicates.
    #[must_use]
    pub fn counting(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }
}

#[async_trait]
impl Sink for CappedSink {
    async fn write(&self, events: &[AdEvent]) -> Result<WriteReport, SinkError> {
        // A write larger than the burst would put more than `rate + burst` events into one
        // second: it goes out in burst-sized chunks, each paying for itself first. A failure
        // part-way fails the batch; its redelivery finds the written chunks as duplicates.
        let mut report = WriteReport::default();
        for chunk in events.chunks(self.cap.max_chunk()) {
            self.cap.acquire(chunk.len()).await;
            match self.inner.write(chunk).await {
                Ok(r) => {
                    report.inserted += r.inserted;
                    report.duplicates += r.duplicates;
                }
                Err(e) => {
                    if let Some(m) = &self.metrics {
                        m.add_written(report.inserted as u64);
                        m.add_duplicates(report.duplicates as u64);
                    }
                    return Err(e);
                }
            }
        }
        Ok(report)
    }

    /// Not capped: a ping writes nothing.
    async fn ping(&self) -> Result<(), SinkError> {
        self.inner.ping().await
    }

    fn render_metrics(&self, page: &mut Exposition) {
        self.inner.render_metrics(page);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_full_bucket_passes_its_burst_at_once_then_paces_at_the_rate() {
        let cap = WriteCap::new(100, 10);
        let start = Instant::now();
        cap.acquire(10).await;
        assert_eq!(Instant::now(), start);
        cap.acquire(10).await;
        let waited = Instant::now() - start;
        assert!(
            (Duration::from_millis(99)..=Duration::from_millis(101)).contains(&waited),
            "{waited:?}"
        );
    }

    #[derive(Debug, Default)]
    struct Timed(std::sync::Mutex<Vec<(Instant, usize)>>);

    #[async_trait]
    impl Sink for Timed {
        async fn write(&self, events: &[AdEvent]) -> Result<WriteReport, SinkError> {
            self.0.lock().unwrap().push((Instant::now(), events.len()));
            Ok(WriteReport {
                inserted: events.len(),
                duplicates: 0,
            })
        }

        async fn ping(&self) -> Result<(), SinkError> {
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_capped_sink_splits_a_large_write_so_no_second_holds_more_than_rate_plus_burst() {
        let inner = Arc::new(Timed::default());
        let sink = CappedSink::new(inner.clone(), Arc::new(WriteCap::new(100, 5)));
        let mut g = shared::synthetic::SyntheticEvents::new(1, 1);
        let events: Vec<AdEvent> = (0..300)
            .map(|_| {
                AdEvent::from_json(
                    g.event(),
                    &shared::ValidationPolicy::default(),
                    &shared::SystemClock,
                )
                .unwrap()
            })
            .collect();
        let report = sink.write(&events).await.unwrap();
        assert_eq!(report.inserted, 300);
        let writes = inner.0.lock().unwrap().clone();
        assert!(writes.iter().all(|(_, n)| *n <= 5));
        for (i, (t0, _)) in writes.iter().enumerate() {
            let in_second: usize = writes[i..]
                .iter()
                .take_while(|(t, _)| *t - *t0 < Duration::from_secs(1))
                .map(|(_, n)| n)
                .sum();
            assert!(in_second <= 105, "{in_second} events in one second");
        }
    }

    /// Fails every write after the first `ok` ones.
    #[derive(Debug)]
    struct FailsAfter(std::sync::atomic::AtomicUsize);

    #[async_trait]
    impl Sink for FailsAfter {
        async fn write(&self, events: &[AdEvent]) -> Result<WriteReport, SinkError> {
            let left = self.0.load(std::sync::atomic::Ordering::SeqCst);
            if left == 0 {
                return Err(SinkError::Unavailable {
                    store: "test".into(),
                    message: "gone".into(),
                });
            }
            self.0.store(left - 1, std::sync::atomic::Ordering::SeqCst);
            Ok(WriteReport {
                inserted: events.len(),
                duplicates: 0,
            })
        }

        async fn ping(&self) -> Result<(), SinkError> {
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn what_the_chunks_before_a_failed_one_stored_is_counted_as_written() {
        let metrics = Arc::new(Metrics::new());
        let inner = Arc::new(FailsAfter(std::sync::atomic::AtomicUsize::new(2)));
        let sink = CappedSink::new(inner, Arc::new(WriteCap::new(1_000, 5)))
            .counting(Arc::clone(&metrics));
        let mut g = shared::synthetic::SyntheticEvents::new(2, 1);
        let events: Vec<AdEvent> = (0..12)
            .map(|_| {
                AdEvent::from_json(
                    g.event(),
                    &shared::ValidationPolicy::default(),
                    &shared::SystemClock,
                )
                .unwrap()
            })
            .collect();
        assert!(sink.write(&events).await.is_err());
        assert_eq!(
            metrics.snapshot().written,
            10,
            "two chunks of 5 were stored"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_larger_than_the_burst_goes_into_debt_that_the_next_write_pays() {
        let cap = WriteCap::new(100, 10);
        cap.acquire(50).await;
        let start = Instant::now();
        cap.acquire(1).await;
        let waited = Instant::now() - start;
        // 40 tokens of debt plus the one wanted, at 100 a second.
        assert!(
            (Duration::from_millis(409)..=Duration::from_millis(411)).contains(&waited),
            "{waited:?}"
        );
    }
}
