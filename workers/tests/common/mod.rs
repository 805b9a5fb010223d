//! Helpers shared by the worker tests: events, envelopes, deliveries and test sinks.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use shared::envelope::{Envelope, PackedEvent, Packer};
use shared::event::EventId;
use shared::sink::MemorySink;
use shared::synthetic::SyntheticEvents;
use shared::{
    AdEvent, Delivery, DeliveryId, Sink, SinkError, SystemClock, ValidationPolicy, WriteReport,
};
use tokio::time::Instant;

/// `n` valid events from `seed`.
pub fn events(seed: u64, n: usize) -> Vec<AdEvent> {
    let mut g = SyntheticEvents::new(seed, 5);
    (0..n)
        .map(|_| {
            AdEvent::from_json(g.event(), &ValidationPolicy::structural(), &SystemClock).unwrap()
        })
        .collect()
}

/// One identity envelope holding `events`.
pub fn envelope(events: &[AdEvent]) -> Envelope {
    let packed: Vec<PackedEvent> = events
        .iter()
        .map(|e| PackedEvent::new(e).unwrap())
        .collect();
    let one_envelope = shared::envelope::EnvelopeConfig {
        split_by_type: false,
        ..Default::default()
    };
    let mut envs = Packer::new(one_envelope).pack("acme", &packed).unwrap();
    assert_eq!(envs.len(), 1);
    envs.remove(0)
}

/// A delivery of `body` with `attributes`, received `receive_count` times.
pub fn delivery(
    n: usize,
    body: &str,
    attributes: BTreeMap<String, String>,
    receive_count: u32,
) -> Delivery {
    Delivery {
        id: DeliveryId(format!("r-{n}")),
        message_id: format!("m-{n}"),
        body: body.to_owned(),
        attributes,
        receive_count,
        body_error: None,
    }
}

/// Waits (in tokio time) until `cond` holds, failing after `limit`.
pub async fn until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A sink in front of a [`MemorySink`] that can fail transiently or reject for chosen event
/// ids, take time per write, and records every write attempt.
#[derive(Debug, Default)]
pub struct TestSink {
    pub inner: MemorySink,
    pub transient_for: Mutex<HashSet<EventId>>,
    pub reject: Mutex<HashSet<EventId>>,
    /// Writes holding one of these panic (a bug in a sink, for the runtimes' isolation).
    pub panic_for: Mutex<HashSet<EventId>>,
    pub delay: Mutex<Duration>,
    /// Pings never answer (a black-holed store).
    pub ping_hangs: std::sync::atomic::AtomicBool,
    /// (start of the write, events) for every write that succeeded.
    pub log: Mutex<Vec<(Instant, usize)>>,
    pub attempts: AtomicUsize,
    in_flight: AtomicUsize,
    pub max_in_flight: AtomicUsize,
}

impl TestSink {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn with_delay(delay: Duration) -> Arc<Self> {
        let s = Self::default();
        *s.delay.lock().unwrap() = delay;
        Arc::new(s)
    }

    pub fn stored(&self) -> usize {
        self.inner.events().len()
    }
}

#[async_trait]
impl Sink for TestSink {
    async fn write(&self, events: &[AdEvent]) -> Result<WriteReport, SinkError> {
        let start = Instant::now();
        self.attempts.fetch_add(1, Ordering::SeqCst);
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let delay = *self.delay.lock().unwrap();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        let panics = self.panic_for.lock().unwrap().clone();
        if events.iter().any(|e| panics.contains(&e.event_id)) {
            panic!("test sink: panic on a chosen event");
        }
        let reject = self.reject.lock().unwrap().clone();
        if events.iter().any(|e| reject.contains(&e.event_id)) {
            return Err(SinkError::Rejected {
                store: "test".into(),
                message: "constraint".into(),
            });
        }
        let transient = self.transient_for.lock().unwrap().clone();
        if events.iter().any(|e| transient.contains(&e.event_id)) {
            return Err(SinkError::Unavailable {
                store: "test".into(),
                message: "timeout".into(),
            });
        }
        let report = self.inner.write(events).await?;
        self.log.lock().unwrap().push((start, events.len()));
        Ok(report)
    }

    async fn ping(&self) -> Result<(), SinkError> {
        if self.ping_hangs.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        self.inner.ping().await
    }
}
