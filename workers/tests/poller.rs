//! The poller runtime over the in-memory source, under paused tokio time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::{envelope, events, until, TestSink};
use shared::memory_source::{MemorySource, MemorySourceConfig, REASON_MAX_RECEIVES};
use shared::source::{DeadLetter, Delivery, DeliveryId, SourceError};
use shared::{Sink, Source};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use workers::breaker::BreakerConfig;
use workers::core::REASON_UNDECODABLE;
use workers::{BreakerState, Metrics, Poller, PollerConfig};

fn source(max_receive_count: Option<u32>) -> Arc<MemorySource> {
    Arc::new(MemorySource::new(MemorySourceConfig {
        visibility_timeout: Duration::from_secs(30),
        max_receive_count,
        ..MemorySourceConfig::default()
    }))
}

fn config() -> PollerConfig {
    PollerConfig {
        receive_wait: Duration::from_secs(1),
        max_batch_wait: Duration::from_millis(200),
        max_events_per_sec: None,
        ..PollerConfig::default()
    }
}

fn start(
    source: &Arc<MemorySource>,
    sink: Arc<dyn Sink>,
    config: PollerConfig,
) -> (Arc<Metrics>, CancellationToken, JoinHandle<()>) {
    let poller = Poller::new(Arc::clone(source) as Arc<dyn Source>, sink, config).unwrap();
    let metrics = poller.metrics();
    let token = CancellationToken::new();
    let handle = tokio::spawn(poller.run(token.clone()));
    (metrics, token, handle)
}

/// Sends `n` envelopes of `per` events each; returns their message ids.
fn fill(source: &MemorySource, seed: u64, n: u64, per: usize) -> Vec<String> {
    (0..n)
        .map(|i| source.send_envelope(&envelope(&events(seed + i, per))))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn the_poller_writes_every_event_and_acks_each_batch_in_one_call() {
    let src = source(Some(5));
    fill(&src, 100, 40, 5);
    let sink = TestSink::new();
    let (metrics, token, handle) = start(&src, sink.clone(), config());
    until("queue drained", Duration::from_secs(60), || src.is_empty()).await;
    token.cancel();
    handle.await.unwrap();

    assert_eq!(sink.stored(), 200);
    let m = metrics.snapshot();
    assert_eq!(
        (m.received, m.acked, m.written, m.dead_lettered),
        (40, 40, 200, 0)
    );
    assert_eq!(src.ack_calls() as u64, m.batches);
    assert!(
        m.batches < 40,
        "deliveries were coalesced: {} batches",
        m.batches
    );
    assert_eq!(src.stale_receipts(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_write_that_panics_is_retried_and_its_neighbours_are_written_alone_on_redelivery() {
    let src = source(Some(3));
    let good = fill(&src, 500, 10, 4);
    let poison_events = events(900, 2);
    let poison = src.send_envelope(&envelope(&poison_events));
    let sink = TestSink::new();
    sink.panic_for
        .lock()
        .unwrap()
        .insert(poison_events[1].event_id);
    let config = PollerConfig {
        loops: 1,
        ..config()
    };
    let (metrics, token, handle) = start(&src, sink.clone(), config);
    until("queue drained", Duration::from_secs(600), || src.is_empty()).await;
    token.cancel();
    handle.await.unwrap();

    // The first write of all eleven panicked: all retried. On the redelivery the batch
    // panicked again and each delivery was written alone: the ten good ones are stored, and
    // only the poison kept panicking until its receive count sent it to the DLQ.
    assert_eq!(sink.stored(), 40);
    let dlq = src.dead_letters();
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].source_message_id, poison);
    assert_eq!(dlq[0].reason.code, REASON_MAX_RECEIVES);
    assert!(good.iter().all(|id| src.receive_count(id) <= Some(2)));
    // Three receives of the poison: its batch panicked (1), its batch again and then the
    // poison written alone (2), the poison alone (1); each panicking write counts.
    let m = metrics.snapshot();
    assert_eq!(m.write_panics, 4, "{m:?}");
    assert_eq!(m.written, 40);
    // Every event was stored by a delivery written alone: the "last batch written" gauge
    // must say the store took writes (it stayed at 0, and the staleness alert fired).
    let mut page = shared::metrics::Exposition::new();
    metrics.render(&mut page);
    let last = shared::metrics::value_of(
        &page.finish(),
        "spillway_worker_last_batch_written_timestamp_seconds",
    );
    assert!(last.is_some_and(|t| t > 1.7e9), "{last:?}");
}

/// A source around a real one whose first ack goes wrong: it panics (a bug outside the
/// write: settling) or fails (the broker timed out).
#[derive(Debug)]
struct FirstAckGoesWrong {
    inner: Arc<MemorySource>,
    panics: bool,
    done: AtomicBool,
}

impl FirstAckGoesWrong {
    fn around(inner: &Arc<MemorySource>, panics: bool) -> Arc<Self> {
        Arc::new(Self {
            inner: Arc::clone(inner),
            panics,
            done: AtomicBool::new(false),
        })
    }
}

#[async_trait]
impl Source for FirstAckGoesWrong {
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, SourceError> {
        self.inner.receive(max, wait).await
    }
    async fn ack(&self, ids: &[DeliveryId]) -> Result<(), SourceError> {
        if !self.done.swap(true, Ordering::SeqCst) {
            assert!(!self.panics, "the first ack panics");
            return Err(SourceError::Unavailable {
                queue: "memory".into(),
                message: "timed out".into(),
            });
        }
        self.inner.ack(ids).await
    }
    async fn retry_later(&self, items: &[(DeliveryId, Duration)]) -> Result<(), SourceError> {
        self.inner.retry_later(items).await
    }
    async fn extend(&self, ids: &[DeliveryId], by: Duration) -> Result<(), SourceError> {
        self.inner.extend(ids, by).await
    }
    async fn dead_letter(
        &self,
        id: &DeliveryId,
        letters: &[DeadLetter],
    ) -> Result<(), SourceError> {
        self.inner.dead_letter(id, letters).await
    }
}

/// A log writer on-call can read back: every line the poller logs, in one buffer.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// "Settled batch" said `acked=N` for a batch whose ack had failed (the count of acks
/// attempted): on-call read the batch as done while it was coming back as duplicates. It now
/// says what the broker took, as the acked counter does.
#[tokio::test(start_paused = true)]
async fn the_settled_batch_log_counts_only_acks_the_broker_took() {
    let logs = Captured::default();
    let writer = logs.clone();
    let _guard = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish(),
    );
    let src = source(Some(5));
    fill(&src, 1_200, 3, 2);
    let failing = FirstAckGoesWrong::around(&src, false);
    let sink = TestSink::new();
    let config = PollerConfig {
        loops: 1,
        ..config()
    };
    let poller = Poller::new(failing as Arc<dyn Source>, sink.clone(), config).unwrap();
    let metrics = poller.metrics();
    let token = CancellationToken::new();
    let handle = tokio::spawn(poller.run(token.clone()));
    until("queue drained", Duration::from_secs(600), || src.is_empty()).await;
    token.cancel();
    handle.await.unwrap();

    let m = metrics.snapshot();
    assert_eq!((m.settle_errors, m.acked), (1, 3), "{m:?}");
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let settled: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Settled batch"))
        .collect();
    assert_eq!(settled.len(), 2, "{text}");
    assert!(settled[0].contains("acked=0"), "{}", settled[0]);
    assert!(settled[1].contains("acked=3"), "{}", settled[1]);
}

/// The only receive loop dies of a panic while settling its first batch: the poller starts it
/// again, the unacked batch comes back after its visibility timeout, and everything is
/// stored once (the rewrite finds the events already stored).
#[tokio::test(start_paused = true)]
async fn a_receive_loop_that_dies_outside_a_write_is_started_again() {
    let src = source(Some(5));
    fill(&src, 700, 6, 5);
    let flaky = FirstAckGoesWrong::around(&src, true);
    let sink = TestSink::new();
    let config = PollerConfig {
        loops: 1,
        ..config()
    };
    let poller = Poller::new(flaky.clone() as Arc<dyn Source>, sink.clone(), config).unwrap();
    let metrics = poller.metrics();
    let token = CancellationToken::new();
    let handle = tokio::spawn(poller.run(token.clone()));
    until("queue drained", Duration::from_secs(600), || src.is_empty()).await;
    token.cancel();
    handle.await.unwrap();

    assert!(flaky.done.load(Ordering::SeqCst));
    assert_eq!(sink.stored(), 30);
    let m = metrics.snapshot();
    assert!(
        m.duplicates > 0,
        "the unacked batch was written again: {m:?}"
    );
    assert_eq!(m.written, 30);
    assert!(src.dead_letters().is_empty());
}

/// A DLQ that takes 10 s per call (Kafka waiting out its delivery timeout while the DLQ
/// topic has no leader), around a real source; counts the calls in flight at once.
#[derive(Debug)]
struct SlowDlq {
    inner: Arc<MemorySource>,
    in_flight: std::sync::atomic::AtomicUsize,
    most_at_once: std::sync::atomic::AtomicUsize,
    acks: std::sync::atomic::AtomicUsize,
    acks_before_a_letter: std::sync::atomic::AtomicUsize,
}

#[async_trait]
impl Source for SlowDlq {
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, SourceError> {
        self.inner.receive(max, wait).await
    }
    async fn ack(&self, ids: &[DeliveryId]) -> Result<(), SourceError> {
        self.acks.fetch_add(ids.len(), Ordering::SeqCst);
        self.inner.ack(ids).await
    }
    async fn retry_later(&self, items: &[(DeliveryId, Duration)]) -> Result<(), SourceError> {
        self.inner.retry_later(items).await
    }
    async fn extend(&self, ids: &[DeliveryId], by: Duration) -> Result<(), SourceError> {
        self.inner.extend(ids, by).await
    }
    async fn dead_letter(
        &self,
        id: &DeliveryId,
        letters: &[DeadLetter],
    ) -> Result<(), SourceError> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_at_once.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(10)).await;
        self.acks_before_a_letter
            .fetch_max(self.acks.load(Ordering::SeqCst), Ordering::SeqCst);
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.inner.dead_letter(id, letters).await
    }
}

/// Settling sent a batch's letters one after the other, before acknowledging its good
/// messages: with a DLQ taking the delivery timeout per call, 40 letters held the loop for
/// minutes (on Kafka past `max.poll.interval.ms`, out of the group) and the stored events
/// unacknowledged. They are sent at once, after the acks.
#[tokio::test(start_paused = true)]
async fn a_batch_s_letters_are_sent_at_once_after_its_good_messages_are_acked() {
    let src = source(Some(5));
    let bad: Vec<String> = (0..5)
        .map(|_| src.send("garbage", BTreeMap::new()))
        .collect();
    fill(&src, 1_300, 5, 2);
    let slow = Arc::new(SlowDlq {
        inner: Arc::clone(&src),
        in_flight: 0.into(),
        most_at_once: 0.into(),
        acks: 0.into(),
        acks_before_a_letter: 0.into(),
    });
    let sink = TestSink::new();
    let config = PollerConfig {
        loops: 1,
        ..config()
    };
    let poller = Poller::new(slow.clone() as Arc<dyn Source>, sink.clone(), config).unwrap();
    let token = CancellationToken::new();
    let handle = tokio::spawn(poller.run(token.clone()));
    until("queue drained", Duration::from_secs(600), || src.is_empty()).await;
    token.cancel();
    handle.await.unwrap();

    assert_eq!(src.dead_letters().len(), bad.len());
    assert_eq!(sink.stored(), 10);
    assert_eq!(slow.most_at_once.load(Ordering::SeqCst), bad.len());
    assert_eq!(slow.acks_before_a_letter.load(Ordering::SeqCst), 5);
}

#[tokio::test(start_paused = true)]
async fn an_undecodable_message_is_dead_lettered_on_its_first_receive() {
    let src = source(Some(5));
    let id = src.send("garbage", BTreeMap::new());
    let sink = TestSink::new();
    let (metrics, token, handle) = start(&src, sink.clone(), config());
    until("dead-lettered", Duration::from_secs(60), || {
        !src.dead_letters().is_empty()
    })
    .await;
    token.cancel();
    handle.await.unwrap();

    let dlq = src.dead_letters();
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].source_message_id, id);
    assert_eq!(dlq[0].reason.code, REASON_UNDECODABLE);
    assert_eq!(
        dlq[0].attributes[shared::source::ATTR_ERROR_CODE],
        REASON_UNDECODABLE
    );
    assert_eq!(metrics.snapshot().received, 1);
    assert!(src.is_empty());
    // Nothing was written: the "store last took a batch" gauge must not say it did.
    let mut page = shared::metrics::Exposition::new();
    metrics.render(&mut page);
    assert_eq!(
        shared::metrics::value_of(
            &page.finish(),
            "spillway_worker_last_batch_written_timestamp_seconds"
        ),
        Some(0.0)
    );
}

/// A batch whose every event the store refused (a constraint added to `ad_events`, say)
/// used to move the "store last took a batch" gauge: the store had answered. With all the
/// traffic going to the DLQ, the staleness alert README "Metrics" builds on it stayed quiet.
#[tokio::test(start_paused = true)]
async fn a_batch_the_store_refused_whole_does_not_count_as_written() {
    let src = source(Some(5));
    let refused = events(1_400, 3);
    src.send_envelope(&envelope(&refused));
    let sink = TestSink::new();
    sink.reject
        .lock()
        .unwrap()
        .extend(refused.iter().map(|e| e.event_id));
    let (metrics, token, handle) = start(&src, sink.clone(), config());
    until("dead-lettered", Duration::from_secs(60), || {
        !src.dead_letters().is_empty()
    })
    .await;
    let gauge = || {
        let mut page = shared::metrics::Exposition::new();
        metrics.render(&mut page);
        shared::metrics::value_of(
            &page.finish(),
            "spillway_worker_last_batch_written_timestamp_seconds",
        )
        .unwrap()
    };
    assert_eq!(gauge(), 0.0, "every event of the batch was refused");
    fill(&src, 1_410, 1, 2);
    until("stored", Duration::from_secs(60), || sink.stored() == 2).await;
    token.cancel();
    handle.await.unwrap();
    assert!(gauge() > 1.7e9, "a batch was stored");
}

#[tokio::test(start_paused = true)]
async fn a_message_failing_transiently_is_retried_with_growing_delays_then_redriven_by_max_receives(
) {
    let src = source(Some(4));
    let bad = events(7, 1);
    let id = src.send_envelope(&envelope(&bad));
    let sink = TestSink::new();
    sink.transient_for.lock().unwrap().insert(bad[0].event_id);
    let cfg = PollerConfig {
        // Keep the breaker out of it: this is about one message's retries.
        breaker: BreakerConfig {
            failure_threshold: 100,
            ..BreakerConfig::default()
        },
        ..config()
    };
    let (metrics, token, handle) = start(&src, sink.clone(), cfg);
    until("redriven", Duration::from_secs(600), || {
        !src.dead_letters().is_empty()
    })
    .await;
    token.cancel();
    handle.await.unwrap();

    let delays = src.retry_delays(&id);
    assert_eq!(delays.len(), 4, "{delays:?}");
    for (i, d) in delays.iter().enumerate() {
        let base = Duration::from_secs(1 << i);
        assert!(
            *d <= base && *d >= base.mul_f64(0.8).max(Duration::from_secs(1)),
            "{delays:?}"
        );
    }
    assert!(delays.windows(2).all(|w| w[1] > w[0]), "{delays:?}");
    let dlq = src.dead_letters();
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].reason.code, REASON_MAX_RECEIVES);
    assert_eq!(metrics.snapshot().retried, 4);
    assert_eq!(sink.stored(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_sink_outage_opens_the_breaker_so_no_valid_message_reaches_the_dlq() {
    let src = source(Some(3));
    let ids = fill(&src, 200, 30, 5);
    let sink = TestSink::new();
    sink.inner.set_fail_always(true);
    let cfg = PollerConfig {
        max_batch_messages: 5,
        breaker: BreakerConfig {
            failure_threshold: 2,
            cooldown: Duration::from_secs(5),
            max_cooldown: Duration::from_secs(20),
        },
        ..config()
    };
    let (metrics, token, handle) = start(&src, sink.clone(), cfg);

    // Ten minutes of outage: far longer than max_receive_count × the retry delays.
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(metrics.snapshot().breaker_state, BreakerState::Open);
    assert!(src.dead_letters().is_empty());
    let most = ids
        .iter()
        .filter_map(|id| src.receive_count(id))
        .max()
        .unwrap();
    assert!(
        most < 3,
        "a message was received {most} times during the outage"
    );
    let received_during_outage = metrics.snapshot().received;
    assert!(
        received_during_outage <= 20,
        "{received_during_outage} receives while the sink was down"
    );

    sink.inner.set_fail_always(false);
    until("queue drained", Duration::from_secs(600), || src.is_empty()).await;
    token.cancel();
    handle.await.unwrap();

    assert!(src.dead_letters().is_empty());
    assert_eq!(sink.stored(), 150);
    let m = metrics.snapshot();
    assert_eq!(m.written, 150, "each event stored exactly once");
    assert_eq!(m.breaker_state, BreakerState::Closed);
    assert_eq!(
        m.breaker_opened, 1,
        "one outage is one opening, however many probes failed"
    );
}

#[tokio::test(start_paused = true)]
async fn a_lone_message_failing_on_its_own_opens_the_breaker_yet_reaches_the_dlq_by_receive_count()
{
    // Regression: the probe used to rewrite this message's own events, fail, and keep the
    // breaker open forever: the worker stopped receiving and the message never reached its
    // DLQ. Now the probe finds the store answering and only this message failing, and closes.
    let src = source(Some(3));
    let bad = events(41, 3);
    let id = src.send_envelope(&envelope(&bad));
    let sink = TestSink::new();
    sink.transient_for.lock().unwrap().insert(bad[1].event_id);
    let cfg = PollerConfig {
        max_batch_messages: 1,
        breaker: BreakerConfig {
            failure_threshold: 2,
            cooldown: Duration::from_secs(5),
            max_cooldown: Duration::from_secs(20),
        },
        ..config()
    };
    let (metrics, token, handle) = start(&src, sink.clone(), cfg);
    until("redriven to the DLQ", Duration::from_secs(300), || {
        !src.dead_letters().is_empty()
    })
    .await;
    assert!(
        metrics.snapshot().breaker_opened >= 1,
        "two failures in a row opened the breaker"
    );
    let dlq = src.dead_letters();
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].source_message_id, id);
    assert_eq!(dlq[0].reason.code, REASON_MAX_RECEIVES);

    // The worker still receives: a good message sent now is stored.
    let good = events(42, 4);
    src.send_envelope(&envelope(&good));
    until("the good message stored", Duration::from_secs(60), || {
        src.is_empty()
    })
    .await;
    token.cancel();
    handle.await.unwrap();
    let stored = sink.inner.events();
    assert!(good.iter().all(|e| stored.contains_key(&e.event_id)));
    assert!(!stored.contains_key(&bad[1].event_id));
    assert_eq!(metrics.snapshot().breaker_state, BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_store_that_answers_but_fails_every_write_keeps_the_breaker_open() {
    // The store answers a ping but every write fails (a missing table, a full disk): the
    // probe's writes fail for several different messages, so the breaker stays open and no
    // receive count climbs to the redrive.
    let src = source(Some(3));
    let per_message: Vec<_> = (0..4).map(|i| events(50 + i, 3)).collect();
    let ids: Vec<String> = per_message
        .iter()
        .map(|evs| src.send_envelope(&envelope(evs)))
        .collect();
    let sink = TestSink::new();
    sink.transient_for
        .lock()
        .unwrap()
        .extend(per_message.iter().flatten().map(|e| e.event_id));
    let cfg = PollerConfig {
        breaker: BreakerConfig {
            failure_threshold: 2,
            cooldown: Duration::from_secs(5),
            max_cooldown: Duration::from_secs(20),
        },
        ..config()
    };
    let (metrics, token, handle) = start(&src, sink.clone(), cfg);
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(metrics.snapshot().breaker_state, BreakerState::Open);
    assert!(src.dead_letters().is_empty());
    let most = ids
        .iter()
        .filter_map(|id| src.receive_count(id))
        .max()
        .unwrap();
    assert!(most < 3, "a message was received {most} times");

    sink.transient_for.lock().unwrap().clear();
    until("queue drained", Duration::from_secs(600), || src.is_empty()).await;
    token.cancel();
    handle.await.unwrap();
    assert!(src.dead_letters().is_empty());
    assert_eq!(sink.stored(), 12);
}

#[tokio::test(start_paused = true)]
async fn the_write_cap_holds_events_per_second_and_concurrent_batches() {
    let src = source(Some(5));
    fill(&src, 300, 100, 10);
    let sink = TestSink::with_delay(Duration::from_millis(20));
    let cfg = PollerConfig {
        loops: 3,
        receive_max_messages: 1,
        max_batch_messages: 1,
        max_concurrent_batches: 2,
        max_events_per_sec: Some(200),
        burst_events: 10,
        ..config()
    };
    let start_at = Instant::now();
    let (_metrics, token, handle) = start(&src, sink.clone(), cfg);
    until("queue drained", Duration::from_secs(60), || src.is_empty()).await;
    token.cancel();
    handle.await.unwrap();

    assert_eq!(sink.stored(), 1000);
    let log = sink.log.lock().unwrap().clone();
    for (t, _) in &log {
        let in_window: usize = log
            .iter()
            .filter(|(u, _)| *u >= *t && *u < *t + Duration::from_secs(1))
            .map(|(_, n)| n)
            .sum();
        assert!(
            in_window <= 210,
            "{in_window} events in the second from {:?}",
            *t - start_at
        );
    }
    let took = log.last().unwrap().0 - start_at;
    assert!(
        took >= Duration::from_millis(4_900),
        "1000 events at 200/s took only {took:?}"
    );
    assert!(sink.max_in_flight.load(Ordering::SeqCst) <= 2);
}

#[tokio::test(start_paused = true)]
async fn the_heartbeat_keeps_a_slow_batch_invisible_until_it_is_acked() {
    let src = Arc::new(MemorySource::new(MemorySourceConfig {
        visibility_timeout: Duration::from_secs(3),
        max_receive_count: Some(5),
        ..MemorySourceConfig::default()
    }));
    let id = src.send_envelope(&envelope(&events(400, 3)));
    let sink = TestSink::with_delay(Duration::from_secs(10));
    let cfg = PollerConfig {
        visibility_timeout: Duration::from_secs(3),
        heartbeat_every: Duration::from_secs(1),
        ..config()
    };
    let (metrics, token, handle) = start(&src, sink.clone(), cfg);
    until("acked", Duration::from_secs(60), || src.is_empty()).await;
    token.cancel();
    handle.await.unwrap();

    // Without the heartbeat the second loop would receive it again after 3 s.
    assert_eq!(metrics.snapshot().received, 1);
    assert_eq!(sink.attempts.load(Ordering::SeqCst), 1);
    assert!(src.extend_calls() >= 8, "{} extensions", src.extend_calls());
    assert_eq!(src.stale_receipts(), 0);
    assert_eq!(src.deleted(), vec![id]);
}

/// A failed extension was only a log line: the messages of the batch being written may come
/// back meanwhile and be written again, and nothing counted that it was happening.
#[tokio::test(start_paused = true)]
async fn failed_heartbeats_are_counted() {
    let src = Arc::new(MemorySource::new(MemorySourceConfig {
        visibility_timeout: Duration::from_secs(30),
        max_receive_count: Some(5),
        ..MemorySourceConfig::default()
    }));
    src.send_envelope(&envelope(&events(402, 3)));
    let sink = TestSink::with_delay(Duration::from_secs(10));
    let cfg = PollerConfig {
        loops: 1,
        visibility_timeout: Duration::from_secs(30),
        heartbeat_every: Duration::from_secs(1),
        ..config()
    };
    let (metrics, token, handle) = start(&src, sink.clone(), cfg);
    until("received", Duration::from_secs(60), || src.in_flight() == 1).await;
    src.set_unavailable(true);
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    src.set_unavailable(false);
    until("acked", Duration::from_secs(60), || src.is_empty()).await;
    token.cancel();
    handle.await.unwrap();
    let failed = metrics.snapshot().heartbeat_errors;
    assert!((2..=4).contains(&failed), "{failed} failed extensions");
    let mut page = shared::metrics::Exposition::new();
    metrics.render(&mut page);
    assert_eq!(
        shared::metrics::value_of(&page.finish(), "spillway_worker_heartbeat_errors_total"),
        Some(failed as f64)
    );
}

#[tokio::test(start_paused = true)]
async fn aborting_the_poller_mid_batch_stops_the_heartbeat_and_releases_the_source() {
    let src = Arc::new(MemorySource::new(MemorySourceConfig {
        visibility_timeout: Duration::from_secs(3),
        max_receive_count: Some(5),
        ..MemorySourceConfig::default()
    }));
    src.send_envelope(&envelope(&events(401, 3)));
    let sink = TestSink::with_delay(Duration::from_secs(600));
    let cfg = PollerConfig {
        visibility_timeout: Duration::from_secs(3),
        heartbeat_every: Duration::from_secs(1),
        ..config()
    };
    let (_metrics, _token, handle) = start(&src, sink, cfg);
    until("two extensions", Duration::from_secs(10), || {
        src.extend_calls() >= 2
    })
    .await;
    handle.abort();
    assert!(handle.await.unwrap_err().is_cancelled());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let after_abort = src.extend_calls();
    tokio::time::sleep(Duration::from_secs(10)).await;

    // A detached heartbeat would have extended ten more times and still hold the source.
    assert_eq!(src.extend_calls(), after_abort);
    assert_eq!(Arc::strong_count(&src), 1);
}

#[tokio::test(start_paused = true)]
async fn shutdown_stops_receiving_and_finishes_and_acks_the_batches_in_flight() {
    let src = source(Some(5));
    let ids = fill(&src, 500, 5, 4);
    let sink = TestSink::with_delay(Duration::from_secs(5));
    let cfg = PollerConfig {
        loops: 1,
        receive_max_messages: 1,
        max_batch_messages: 1,
        ..config()
    };
    let (metrics, token, handle) = start(&src, sink.clone(), cfg);
    until("a write in flight", Duration::from_secs(10), || {
        sink.attempts.load(Ordering::SeqCst) == 1
    })
    .await;
    token.cancel();
    let cancelled_at = Instant::now();
    handle.await.unwrap();

    assert!(
        Instant::now() - cancelled_at >= Duration::from_secs(4),
        "run returned before its batch finished"
    );
    assert_eq!(sink.stored(), 4);
    assert_eq!(src.deleted(), vec![ids[0].clone()]);
    let m = metrics.snapshot();
    assert_eq!((m.received, m.acked), (1, 1));
    assert_eq!(src.len(), 4);
    assert!(ids[1..].iter().all(|id| src.receive_count(id) == Some(0)));
}

#[tokio::test(start_paused = true)]
async fn sns_wrapped_messages_are_drained_like_raw_ones() {
    let src = source(Some(5));
    let evs = events(600, 3);
    let env = envelope(&evs);
    let note = serde_json::json!({"Type": "Notification", "MessageId": "n1", "Message": env.body})
        .to_string();
    src.send(note, BTreeMap::new());
    let sink = TestSink::new();
    let (_metrics, token, handle) = start(&src, sink.clone(), config());
    until("drained", Duration::from_secs(60), || src.is_empty()).await;
    token.cancel();
    handle.await.unwrap();
    assert_eq!(sink.stored(), 3);
    assert!(src.dead_letters().is_empty());
}

#[test]
fn a_heartbeat_not_under_the_visibility_timeout_is_refused() {
    let cfg = PollerConfig {
        heartbeat_every: Duration::from_secs(30),
        ..PollerConfig::default()
    };
    let err = cfg.validate().unwrap_err().to_string();
    assert!(
        err.contains("--heartbeat-secs") && err.contains("--visibility-timeout-secs"),
        "{err}"
    );
    // Zero used to read "heartbeat_every (0 ms) must be shorter than visibility_timeout".
    let zero = PollerConfig {
        heartbeat_every: Duration::ZERO,
        ..PollerConfig::default()
    };
    let err = zero.validate().unwrap_err().to_string();
    assert!(
        err.contains("--heartbeat-secs") && err.contains("longer than zero"),
        "{err}"
    );
    assert!(PollerConfig::default().validate().is_ok());
}

#[test]
fn a_zero_receive_wait_or_breaker_cooldown_is_refused_rather_than_spinning() {
    let zero_wait = PollerConfig {
        receive_wait: Duration::ZERO,
        ..PollerConfig::default()
    };
    let err = zero_wait.validate().unwrap_err().to_string();
    assert!(
        err.contains("receive_wait") && err.contains("tight loop"),
        "{err}"
    );
    for breaker in [
        BreakerConfig {
            cooldown: Duration::ZERO,
            ..BreakerConfig::default()
        },
        BreakerConfig {
            max_cooldown: Duration::ZERO,
            ..BreakerConfig::default()
        },
    ] {
        let cfg = PollerConfig {
            breaker,
            ..PollerConfig::default()
        };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(
            err.contains("cooldown") && err.contains("without pause"),
            "{err}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn the_metrics_page_shows_the_breaker_open_during_an_outage_and_the_drain_after_it() {
    use shared::metrics::{render_all, value_of};
    let src = source(Some(3));
    fill(&src, 300, 10, 5);
    let sink = TestSink::new();
    sink.inner.set_fail_always(true);
    let cfg = PollerConfig {
        max_batch_messages: 5,
        max_concurrent_batches: 3,
        breaker: BreakerConfig {
            failure_threshold: 2,
            cooldown: Duration::from_secs(5),
            max_cooldown: Duration::from_secs(20),
        },
        ..config()
    };
    let poller = Poller::new(Arc::clone(&src) as Arc<dyn Source>, sink.clone(), cfg).unwrap();
    let page = poller.metrics_page();
    let token = CancellationToken::new();
    let handle = tokio::spawn(poller.run(token.clone()));
    let scrape = || render_all(&[Arc::clone(&page)]);
    let v = |page: &str, series: &str| {
        value_of(page, series).unwrap_or_else(|| panic!("{series} missing from\n{page}"))
    };

    tokio::time::sleep(Duration::from_secs(60)).await;
    let during = scrape();
    assert_eq!(
        v(&during, r#"spillway_worker_breaker_state{state="open"}"#),
        1.0
    );
    assert_eq!(
        v(&during, r#"spillway_worker_breaker_state{state="closed"}"#),
        0.0
    );
    assert!(v(&during, "spillway_worker_breaker_opened_total") >= 1.0);
    assert_eq!(v(&during, "spillway_worker_events_written_total"), 0.0);
    assert!(v(&during, "spillway_worker_batch_write_seconds_count") >= 1.0);
    assert!(
        v(&during, "spillway_worker_batches_held") >= 1.0,
        "the failed batch is held while the store is down"
    );
    assert_eq!(
        v(
            &during,
            "spillway_worker_last_batch_written_timestamp_seconds"
        ),
        0.0,
        "no batch was stored yet"
    );

    sink.inner.set_fail_always(false);
    until("queue drained", Duration::from_secs(600), || src.is_empty()).await;
    let after = scrape();
    token.cancel();
    handle.await.unwrap();
    assert_eq!(
        v(&after, r#"spillway_worker_breaker_state{state="closed"}"#),
        1.0
    );
    assert_eq!(v(&after, "spillway_worker_events_written_total"), 50.0);
    assert_eq!(v(&after, "spillway_worker_deliveries_acked_total"), 10.0);
    assert_eq!(v(&after, "spillway_worker_dead_letters_total"), 0.0);
    assert_eq!(v(&after, "spillway_worker_batches_held"), 0.0);
    assert_eq!(v(&after, "spillway_worker_max_concurrent_batches"), 3.0);
    assert_eq!(v(&after, "spillway_worker_batches_in_flight"), 0.0);
    assert!(
        v(
            &after,
            "spillway_worker_last_batch_written_timestamp_seconds"
        ) > 1.7e9
    );
}

/// A store outage with the shipped defaults (breaker after 3 failed batches, two receive
/// loops, a redrive policy of 5 receives) on two worker replicas, while the queue holds less
/// than a batch: every failed batch is the same few messages again. Settled at once, each
/// failure used up a receive, and the messages reached the DLQ during the outage (each
/// replica's breaker needed 3 failures of its own). Now a failed batch is held, in flight,
/// while the store is down: for an outage in which the store does not answer at all, and for
/// one in which it answers but fails every write.
#[tokio::test(start_paused = true)]
async fn an_outage_with_the_default_settings_and_two_replicas_sends_no_valid_message_to_the_dlq() {
    for answers in [false, true] {
        let src = source(Some(5));
        let ids = fill(&src, 3_000, 3, 4);
        let sink = TestSink::new();
        if answers {
            sink.transient_for.lock().unwrap().extend(
                (0..3)
                    .flat_map(|i| events(3_000 + i, 4))
                    .map(|e| e.event_id),
            );
        } else {
            sink.inner.set_fail_always(true);
        }
        let replicas: Vec<_> = (0..2)
            .map(|_| start(&src, sink.clone(), PollerConfig::default()))
            .collect();
        tokio::time::sleep(Duration::from_secs(600)).await;
        let most = ids
            .iter()
            .filter_map(|id| src.receive_count(id))
            .max()
            .unwrap_or(0);
        assert!(
            src.dead_letters().is_empty(),
            "answers {answers}: valid messages dead-lettered by the outage (most receives {most})"
        );
        assert!(
            most <= 2,
            "answers {answers}: a message was received {most} times"
        );
        let held: u64 = replicas.iter().map(|(m, _, _)| m.snapshot().held).sum();
        assert_eq!(held, 1, "answers {answers}: the failed batch is held");
        sink.inner.set_fail_always(false);
        sink.transient_for.lock().unwrap().clear();
        until("queue drained", Duration::from_secs(600), || src.is_empty()).await;
        for (_, token, handle) in replicas {
            token.cancel();
            handle.await.unwrap();
        }
        assert!(src.dead_letters().is_empty());
        assert_eq!(sink.stored(), 12, "answers {answers}");
    }
}
