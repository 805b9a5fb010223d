//! Counters of a worker runtime: cheap atomics behind an `Arc`, read by tests and rendered
//! at `GET /metrics` (`--metrics-listen`).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use shared::metrics::{Exposition, Histogram};

/// The circuit breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BreakerState {
    /// Receiving normally.
    #[default]
    Closed,
    /// The sink is down: not receiving until the cool-down ends.
    Open,
    /// Probing the sink once before receiving again.
    HalfOpen,
}

impl BreakerState {
    /// The name used in logs and stats.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            Self::Closed => 0,
            Self::Open => 1,
            Self::HalfOpen => 2,
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Open,
            2 => Self::HalfOpen,
            _ => Self::Closed,
        }
    }
}

/// Live counters; every field only grows, except the breaker state.
#[derive(Debug, Default)]
pub struct Metrics {
    received: AtomicU64,
    events_valid: AtomicU64,
    written: AtomicU64,
    duplicates: AtomicU64,
    acked: AtomicU64,
    dead_lettered: AtomicU64,
    retried: AtomicU64,
    requeued: AtomicU64,
    batches: AtomicU64,
    receive_errors: AtomicU64,
    settle_errors: AtomicU64,
    heartbeat_errors: AtomicU64,
    breaker_opened: AtomicU64,
    write_panics: AtomicU64,
    breaker_state: AtomicU8,
    write_seconds: Histogram,
    last_settled_unix_ms: AtomicU64,
    in_flight: AtomicU64,
    held: AtomicU64,
}

/// One batch being written and settled; counted in flight until dropped.
#[derive(Debug)]
pub struct InFlight<'a>(&'a Metrics);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A batch held while the store is down, counted until dropped.
#[derive(Debug)]
pub struct Held<'a>(&'a Metrics);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MetricsSnapshot {
    /// Deliveries received (redeliveries included).
    pub received: u64,
    /// Valid events decoded from them.
    pub events_valid: u64,
    /// Events stored for the first time.
    pub written: u64,
    /// Events the store already had (redeliveries).
    pub duplicates: u64,
    /// Deliveries deleted as done (those that also sent letters included).
    pub acked: u64,
    /// Letters sent to the DLQ.
    pub dead_lettered: u64,
    /// Deliveries handed back for a later retry.
    pub retried: u64,
    /// Lambda: records put back on the queue as new messages while the store was down.
    pub requeued: u64,
    /// Batches processed.
    pub batches: u64,
    /// Receive calls that failed.
    pub receive_errors: u64,
    /// Settle calls (ack, retry, dead-letter) that failed.
    pub settle_errors: u64,
    /// Visibility extensions of a batch being written that failed.
    pub heartbeat_errors: u64,
    /// Times the breaker opened.
    pub breaker_opened: u64,
    /// Batch writes that panicked (a bug; their deliveries were retried).
    pub write_panics: u64,
    /// The breaker's state now.
    pub breaker_state: BreakerState,
    /// Batches held now, their messages in flight, until the store is back.
    pub held: u64,
}

macro_rules! adders {
    ($($field:ident => $fn:ident),* $(,)?) => {
        $(
            /// Adds `n` to the counter of the same name.
            pub fn $fn(&self, n: u64) {
                self.$field.fetch_add(n, Ordering::Relaxed);
            }
        )*
    };
}

impl Metrics {
    /// Zeroed counters, breaker closed.
    pub fn new() -> Self {
        Self::default()
    }

    adders! {
        received => add_received,
        events_valid => add_events_valid,
        written => add_written,
        duplicates => add_duplicates,
        acked => add_acked,
        dead_lettered => add_dead_lettered,
        retried => add_retried,
        requeued => add_requeued,
        batches => add_batches,
        receive_errors => add_receive_errors,
        settle_errors => add_settle_errors,
        heartbeat_errors => add_heartbeat_errors,
        breaker_opened => add_breaker_opened,
        write_panics => add_write_panics,
    }

    /// Records the breaker's new state.
    pub fn set_breaker_state(&self, state: BreakerState) {
        self.breaker_state.store(state.to_u8(), Ordering::Relaxed);
    }

    /// The breaker's state now.
    pub fn breaker_state(&self) -> BreakerState {
        BreakerState::from_u8(self.breaker_state.load(Ordering::Relaxed))
    }

    /// Counts a batch in flight (being written and settled) until the guard is dropped.
    pub fn batch_in_flight(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self)
    }

    /// Counts a batch held while the store is down until the guard is dropped.
    pub fn batch_held(&self) -> Held<'_> {
        self.held.fetch_add(1, Ordering::Relaxed);
        Held(self)
    }

    /// Counts how long one batch took to write (write-cap waits and per-event retries
    /// included); `stored` when the store took it (no transient failure), which makes it the
    /// latest batch written.
    pub fn observe_batch_write(&self, took: Duration, stored: bool) {
        self.write_seconds.observe(took);
        if stored {
            self.mark_stored();
        }
    }

    /// Records that the store took a write now (the latest batch written).
    pub fn mark_stored(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let ms = u64::try_from(now.as_millis()).unwrap_or(u64::MAX);
        self.last_settled_unix_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// Writes the counters, the breaker's state and the write latencies into `page`.
    #[allow(clippy::cast_precision_loss)]
    pub fn render(&self, page: &mut Exposition) {
        let m = self.snapshot();
        let counters: [(&str, &str, u64); 13] = [
            (
                "spillway_worker_deliveries_received_total",
                "Deliveries (queue messages) received, redeliveries included.",
                m.received,
            ),
            (
                "spillway_worker_events_valid_total",
                "Valid events decoded from the deliveries received.",
                m.events_valid,
            ),
            (
                "spillway_worker_events_written_total",
                "Events stored for the first time.",
                m.written,
            ),
            (
                "spillway_worker_events_duplicate_total",
                "Events the store already had (redeliveries); they changed nothing.",
                m.duplicates,
            ),
            (
                "spillway_worker_deliveries_acked_total",
                "Deliveries deleted from the queue as done.",
                m.acked,
            ),
            (
                "spillway_worker_dead_letters_total",
                "Letters sent to the dead-letter queue (permanent failures).",
                m.dead_lettered,
            ),
            (
                "spillway_worker_deliveries_retried_total",
                "Deliveries handed back to the queue for a later retry.",
                m.retried,
            ),
            (
                "spillway_worker_batches_total",
                "Batches processed.",
                m.batches,
            ),
            (
                "spillway_worker_receive_errors_total",
                "Receive calls to the queue that failed.",
                m.receive_errors,
            ),
            (
                "spillway_worker_settle_errors_total",
                "Ack, retry or dead-letter calls that failed.",
                m.settle_errors,
            ),
            (
                "spillway_worker_heartbeat_errors_total",
                "Visibility extensions of batches being written that failed (their messages may be delivered again meanwhile, to be written once more: duplicates the store absorbs).",
                m.heartbeat_errors,
            ),
            (
                "spillway_worker_breaker_opened_total",
                "Times the circuit breaker opened (the store kept failing; receiving paused).",
                m.breaker_opened,
            ),
            (
                "spillway_worker_write_panics_total",
                "Batch writes that panicked (a bug); their deliveries were retried.",
                m.write_panics,
            ),
        ];
        for (name, help, value) in counters {
            page.counter(name, help, value);
        }
        let state = m.breaker_state;
        let is = |s: BreakerState| if state == s { 1.0 } else { 0.0 };
        page.gauges(
            "spillway_worker_breaker_state",
            "The circuit breaker's state: 1 for the current one.",
            "state",
            &[
                ("closed", is(BreakerState::Closed)),
                ("open", is(BreakerState::Open)),
                ("half_open", is(BreakerState::HalfOpen)),
            ],
        );
        page.gauge(
            "spillway_worker_batches_in_flight",
            "Batches being written or settled now.",
            self.in_flight.load(Ordering::Relaxed) as f64,
        );
        page.gauge(
            "spillway_worker_batches_held",
            "Batches whose write failed while the store is down, held (their messages in flight, receive counts unchanged) until it is back.",
            self.held.load(Ordering::Relaxed) as f64,
        );
        page.histogram(
            "spillway_worker_batch_write_seconds",
            "Time to write one batch to the store, write-cap waits included.",
            &self.write_seconds,
        );
        let last = self.last_settled_unix_ms.load(Ordering::Relaxed);
        page.gauge(
            "spillway_worker_last_batch_written_timestamp_seconds",
            "When the store last took a batch (Unix time; 0 before the first). Alert when it lags while the queue holds messages.",
            last as f64 / 1000.0,
        );
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MetricsSnapshot {
            received: get(&self.received),
            events_valid: get(&self.events_valid),
            written: get(&self.written),
            duplicates: get(&self.duplicates),
            acked: get(&self.acked),
            dead_lettered: get(&self.dead_lettered),
            retried: get(&self.retried),
            requeued: get(&self.requeued),
            batches: get(&self.batches),
            receive_errors: get(&self.receive_errors),
            settle_errors: get(&self.settle_errors),
            heartbeat_errors: get(&self.heartbeat_errors),
            breaker_opened: get(&self.breaker_opened),
            write_panics: get(&self.write_panics),
            breaker_state: self.breaker_state(),
            held: get(&self.held),
        }
    }
}
