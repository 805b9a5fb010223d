//! The circuit breaker: after consecutive transient sink failures it stops the receive loops,
//! so valid messages are not burned into the DLQ by receive counts while the sink is down.
//!
//! When open, it probes the sink after a cool-down by rewriting a few valid events from the
//! last failed batch (writes are idempotent, so this stores nothing twice) instead of
//! receiving: no message's receive count grows while the sink is down. A successful probe
//! closes it; a failed one opens it again for twice the cool-down, up to a maximum.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use shared::{AdEvent, Sink};
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::core::{BatchOutcome, SinkHealth};
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
    samples: Vec<AdEvent>,
}

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
    Probe(Vec<AdEvent>),
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
                if !outcome.sample_events.is_empty() {
                    inner.samples.clone_from(&outcome.sample_events);
                }
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

    async fn probe(&self, sink: &dyn Sink, samples: &[AdEvent]) {
        let mut guard = ProbeGuard {
            breaker: self,
            settled: false,
        };
        if samples.is_empty() {
            // Nothing to probe with: fail open rather than stall forever.
            warn!("No events to probe the sink with; closing the breaker");
            guard.settled = true;
            self.close();
            return;
        }
        let result = sink.write(samples).await;
        guard.settled = true;
        match result {
            Err(e) if e.is_transient() => {
                let mut inner = self.lock();
                inner.cooldown = (inner.cooldown * 2).min(self.config.max_cooldown);
                warn!(error = %e, cooldown_ms = inner.cooldown.as_millis(), "Sink probe failed; breaker stays open");
                self.open(&mut inner);
            }
            Ok(report) => {
                // The probe stored these events; their redeliveries count as duplicates.
                self.metrics.add_written(report.inserted as u64);
                self.metrics.add_duplicates(report.duplicates as u64);
                info!(events = samples.len(), "Sink probe succeeded");
                self.close();
            }
            // The sink answered; a refusal is the data's problem, which the core handles.
            Err(e) => {
                info!(error = %e, "Sink probe answered with a refusal; the sink is up");
                self.close();
            }
        }
    }

    fn open(&self, inner: &mut Inner) {
        inner.state = BreakerState::Open;
        inner.open_until = Instant::now() + inner.cooldown;
        self.metrics.set_breaker_state(BreakerState::Open);
        self.metrics.add_breaker_opened(1);
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
