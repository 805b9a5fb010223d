//! Counters of a worker runtime: cheap atomics behind an `Arc`, read by `spillway stats` and
//! by tests.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

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
    batches: AtomicU64,
    receive_errors: AtomicU64,
    settle_errors: AtomicU64,
    breaker_opened: AtomicU64,
    breaker_state: AtomicU8,
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
    /// Batches processed.
    pub batches: u64,
    /// Receive calls that failed.
    pub receive_errors: u64,
    /// Settle calls (ack, retry, dead-letter) that failed.
    pub settle_errors: u64,
    /// Times the breaker opened.
    pub breaker_opened: u64,
    /// The breaker's state now.
    pub breaker_state: BreakerState,
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
        batches => add_batches,
        receive_errors => add_receive_errors,
        settle_errors => add_settle_errors,
        breaker_opened => add_breaker_opened,
    }

    /// Records the breaker's new state.
    pub fn set_breaker_state(&self, state: BreakerState) {
        self.breaker_state.store(state.to_u8(), Ordering::Relaxed);
    }

    /// The breaker's state now.
    pub fn breaker_state(&self) -> BreakerState {
        BreakerState::from_u8(self.breaker_state.load(Ordering::Relaxed))
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
            batches: get(&self.batches),
            receive_errors: get(&self.receive_errors),
            settle_errors: get(&self.settle_errors),
            breaker_opened: get(&self.breaker_opened),
            breaker_state: self.breaker_state(),
        }
    }
}
