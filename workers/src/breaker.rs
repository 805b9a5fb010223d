//! The circuit breaker: after consecutive transient sink failures it stops the receive loops,
//! so valid messages are not burned into the DLQ by receive counts while the sink is down.
//!
//! When open, it probes the sink after a cool-down instead of receiving, so no message's
//! receive count grows while the sink is down. The probe asks two questions:
//!
//! 1. Does the store answer at all? ([`Sink::ping`]) No: it stays open.
//! 2. Does it take writes? It rewrites a few valid events of each of the last failed
//!    messages, one message at a time (writes are idempotent, so nothing is stored twice).
//!    One write succeeding (or refused for its data) closes it: the store works, and what
//!    failed is particular to some messages. Every write failing, for **two or more
//!    different messages**, keeps it open: the store refuses writes whatever the data (a
//!    missing table, a full disk, lock timeouts everywhere).
//!
//! When the failures all came from **one** message and the store answers, the breaker closes
//! even if that message's events still fail: with one message nothing tells a store that
//! refuses every write from a message the store chokes on, and staying open would stall the
//! worker forever, the message never reaching its DLQ. Closing lets its receive count grow
//! until the queue's redrive moves it to the DLQ (the price: a store that answers but refuses
//! every write, while only one message is in the queue, lets that message go to the DLQ).
//! A failed probe opens it again for twice the cool-down, up to a maximum.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use shared::Sink;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::core::{BatchOutcome, ProbeSample, SinkHealth};
use crate::metrics::{BreakerState, Metrics};

/// When the breaker opens and how long it waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive transiently failed batches that open it. Default 3.
    pub failure_threshold: u32,
    /// First wait before probing the sink. Default 5 s.
    pub cooldown: Duration,
    /// Longest wait between probes (the wait doubles after each failed probe). Default 60 s.
    pub max_cooldown: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 3,
            cooldown: Duration::from_secs(5),
            max_cooldown: Duration::from_secs(60),
        }
    }
}

#[derive(Debug)]
struct Inner {
    state: BreakerState,
    failures: u32,
    open_until: Instant,
    cooldown: Duration,
    /// Samples of the messages that failed since the last healthy write, one per message,
    /// the most recent last.
    samples: Vec<ProbeSample>,
}

/// How many failed messages the breaker keeps samples of.
pub const PROBE_MESSAGES: usize = 4;

/// A circuit breaker shared by the receive loops of one runtime.
#[derive(Debug)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    inner: Mutex<Inner>,
    changed: Notify,
    metrics: Arc<Metrics>,
}

enum Step {
    Ready,
    Probe(Vec<ProbeSample>),
    WaitUntil(Instant),
    WaitForProbe,
}

impl CircuitBreaker {
    /// A closed breaker reporting its state to `metrics`.
    pub fn new(config: BreakerConfig, metrics: Arc<Metrics>) -> Self {
        metrics.set_breaker_state(BreakerState::Closed);
        Self {
            config,
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                failures: 0,
                open_until: Instant::now(),
                cooldown: config.cooldown,
                samples: Vec::new(),
            }),
            changed: Notify::new(),
            metrics,
        }
    }

    /// The state now.
    pub fn state(&self) -> BreakerState {
        self.lock().state
    }

    /// Counts a batch's outcome: a transient failure towards opening, a healthy write closes.
    pub fn record(&self, outcome: &BatchOutcome) {
        match outcome.sink_health {
            SinkHealth::Untouched => {}
            SinkHealth::Healthy => self.close(),
            SinkHealth::Unavailable => {
                let mut inner = self.lock();
                for sample in &outcome.samples {
                    inner.samples.retain(|s| s.message_id != sample.message_id);
                    inner.samples.push(sample.clone());
                }
                let excess = inner.samples.len().saturating_sub(PROBE_MESSAGES);
                inner.samples.drain(..excess);
                inner.failures += 1;
                if inner.state == BreakerState::Closed
                    && inner.failures >= self.config.failure_threshold
                {
                    inner.cooldown = self.config.cooldown;
                    self.open(&mut inner);
                }
            }
        }
    }

    /// Opens a closed breaker now, whatever the count of failures: the poller found the
    /// store not answering after a failed write.
    pub fn trip(&self) {
        let mut inner = self.lock();
        if inner.state == BreakerState::Closed {
            inner.cooldown = self.config.cooldown;
            self.open(&mut inner);
        }
    }

    /// Returns once the breaker is closed; while open, waits and probes `sink` after each
    /// cool-down. Cancel-safe: a probe dropped half-way reopens the breaker.
    pub async fn ready(&self, sink: &dyn Sink) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let step = {
                let mut inner = self.lock();
                match inner.state {
                    BreakerState::Closed => Step::Ready,
                    BreakerState::HalfOpen => Step::WaitForProbe,
                    BreakerState::Open if Instant::now() < inner.open_until => {
                        Step::WaitUntil(inner.open_until)
                    }
                    BreakerState::Open => {
                        inner.state = BreakerState::HalfOpen;
                        self.metrics.set_breaker_state(BreakerState::HalfOpen);
                        Step::Probe(inner.samples.clone())
                    }
                }
            };
            match step {
                Step::Ready => return,
                Step::WaitForProbe => changed.await,
                Step::WaitUntil(at) => {
                    tokio::select! {
                        () = changed => {}
                        () = tokio::time::sleep_until(at) => {}
                    }
                }
                Step::Probe(samples) => self.probe(sink, &samples).await,
            }
        }
    }

    async fn probe(&self, sink: &dyn Sink, samples: &[ProbeSample]) {
        let mut guard = ProbeGuard {
            breaker: self,
            settled: false,
        };
        let verdict = self.judge(sink, samples).await;
        guard.settled = true;
        match verdict {
            Err(why) => {
                let mut inner = self.lock();
                inner.cooldown = (inner.cooldown * 2).min(self.config.max_cooldown);
                warn!(reason = %why, cooldown_ms = inner.cooldown.as_millis(), "Sink probe failed; breaker stays open");
                self.open(&mut inner);
            }
            Ok(why) => {
                info!(reason = %why, "Sink probe passed");
                self.close();
            }
        }
    }

    /// Whether the store is up (`Ok`, with why) or down (`Err`, with why).
    async fn judge(&self, sink: &dyn Sink, samples: &[ProbeSample]) -> Result<String, String> {
        if let Err(e) = sink.ping().await {
            return Err(format!("the store does not answer: {e}"));
        }
        let mut last_error = None;
        for sample in samples {
            match sink.write(&sample.events).await {
                Ok(report) => {
                    // The probe stored these events; their redeliveries count as duplicates.
                    self.metrics.add_written(report.inserted as u64);
                    self.metrics.add_duplicates(report.duplicates as u64);
                    return Ok(format!(
                        "the store answers and took the events of message {}",
                        sample.message_id
                    ));
                }
                // The store answered; a refusal is the data's problem, which the core handles.
                Err(e) if !e.is_transient() => {
                    return Ok(format!("the store answers and refused data: {e}"));
                }
                Err(e) => last_error = Some(e),
            }
        }
        match (samples.len(), last_error) {
            (0, _) | (_, None) => Ok("the store answers".into()),
            (1, Some(e)) => Ok(format!(
                "the store answers; only message {} fails ({e}), its receive count decides",
                samples[0].message_id
            )),
            (n, Some(e)) => Err(format!(
                "the store answers but refused the events of all {n} failed messages: {e}"
            )),
        }
    }

    fn open(&self, inner: &mut Inner) {
        // An opening is a closed breaker opening: a failed probe keeps it open (one outage
        // is one opening, however many probes it takes).
        if inner.state == BreakerState::Closed {
            self.metrics.add_breaker_opened(1);
        }
        inner.state = BreakerState::Open;
        inner.open_until = Instant::now() + inner.cooldown;
        self.metrics.set_breaker_state(BreakerState::Open);
        warn!(
            failures = inner.failures,
            cooldown_ms = inner.cooldown.as_millis(),
            "Circuit breaker open; receiving paused"
        );
        self.changed.notify_waiters();
    }

    fn close(&self) {
        let mut inner = self.lock();
        inner.failures = 0;
        inner.samples.clear();
        if inner.state != BreakerState::Closed {
            inner.state = BreakerState::Closed;
            inner.cooldown = self.config.cooldown;
            self.metrics.set_breaker_state(BreakerState::Closed);
            info!("Circuit breaker closed; receiving resumed");
            self.changed.notify_waiters();
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Reopens the breaker if a probe is dropped before it settles (its loop was cancelled).
struct ProbeGuard<'a> {
    breaker: &'a CircuitBreaker,
    settled: bool,
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if !self.settled {
            let mut inner = self.breaker.lock();
            if inner.state == BreakerState::HalfOpen {
                self.breaker.open(&mut inner);
            }
        }
    }
}
