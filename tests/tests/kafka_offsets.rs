//! Kafka offsets on librdkafka's mock cluster: out-of-order completion never lets the committed
//! position pass unfinished work, across a crash; a retried message comes back after its
//! backoff while its partition's neighbours and other partitions move on.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{json, Value};
use shared::event::AdEvent;
use shared::kafka::KafkaSource;
use shared::sink::{Sink, SinkError, WriteReport};
use shared::sqlite_sink::SqliteSink;
use shared::synthetic::SyntheticEvents;
use shared::{Delivery, DeliveryId, Source};
use tests::checker::check;
use tests::kafka::{committed_offsets, consumer_config, mock_cluster, produce_to, TOPIC};
use tests::sqlite_view::SqliteStoreView;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use workers::{Poller, PollerConfig};

fn offset_of(d: &Delivery) -> (i32, i64) {
    let mut it = d.message_id.rsplitn(3, ':');
    let o = it.next().unwrap().parse().unwrap();
    let p = it.next().unwrap().parse().unwrap();
    (p, o)
}

async fn receive_n(source: &KafkaSource, n: usize, timeout: Duration) -> Vec<Delivery> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < n {
        assert!(
            Instant::now() < deadline,
            "received {} of {n} in {timeout:?}",
            out.len()
        );
        out.extend(
            source
                .receive(n - out.len(), Duration::from_millis(500))
                .await
                .unwrap(),
        );
    }
    out
}

async fn committed(bootstrap: &str, group: &str, partitions: i32) -> BTreeMap<i32, i64> {
    let (b, g) = (bootstrap.to_owned(), group.to_owned());
    tokio::task::spawn_blocking(move || committed_offsets(&b, &g, TOPIC, partitions))
        .await
        .unwrap()
        .unwrap()
}

async fn commit(source: &Arc<KafkaSource>) {
    let s = Arc::clone(source);
    tokio::task::spawn_blocking(move || s.commit())
        .await
        .unwrap()
        .unwrap();
}

fn envelopes(n: usize, per: usize, seed: u64) -> (Vec<String>, Vec<Vec<Value>>) {
    let mut g = SyntheticEvents::new(seed, 3);
    let events: Vec<Vec<Value>> = (0..n)
        .map(|_| (0..per).map(|_| g.event()).collect())
        .collect();
    let bodies = events
        .iter()
        .map(|evs| json!({"v": 1, "events": evs}).to_string())
        .collect();
    (bodies, events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_offset_holds_the_committed_position_and_comes_back_after_a_crash() {
    let mock = mock_cluster(1).unwrap();
    let bootstrap = mock.bootstrap_servers().to_owned();
    let (bodies, _) = envelopes(20, 1, 1);
    produce_to(&bootstrap, TOPIC, 0, &bodies).await.unwrap();

    let a = Arc::new(KafkaSource::new(&consumer_config(&bootstrap, "ooo")).unwrap());
    let mut got = receive_n(&a, 20, Duration::from_secs(30)).await;
    got.sort_by_key(offset_of);
    assert_eq!(
        got.iter().map(|d| offset_of(d).1).collect::<Vec<_>>(),
        (0..20).collect::<Vec<_>>()
    );
    // Offset 5 is slow; everything after it finishes first, in reverse order, one by one.
    let slow = got.remove(5);
    for d in got.iter().rev() {
        a.ack(std::slice::from_ref(&d.id)).await.unwrap();
    }
    commit(&a).await;
    assert_eq!(
        committed(&bootstrap, "ooo", 1).await,
        BTreeMap::from([(0, 5)]),
        "the position stops at the unfinished offset"
    );

    // Crash before offset 5 finishes: the member goes away without acking it.
    drop(slow);
    drop(a);
    let b = Arc::new(KafkaSource::new(&consumer_config(&bootstrap, "ooo")).unwrap());
    let again = receive_n(&b, 15, Duration::from_secs(30)).await;
    let offsets: BTreeSet<i64> = again.iter().map(|d| offset_of(d).1).collect();
    assert_eq!(
        offsets,
        (5..20).collect(),
        "nothing in [5, …) is lost after the restart"
    );
    let ids: Vec<DeliveryId> = again.iter().map(|d| d.id.clone()).collect();
    b.ack(&ids).await.unwrap();
    commit(&b).await;
    assert_eq!(
        committed(&bootstrap, "ooo", 1).await,
        BTreeMap::from([(0, 20)])
    );
}

/// A store that never finishes a write holding `slow_event` (a batch stuck in a slow call),
/// and writes everything else to SQLite.
#[derive(Debug)]
struct SlowOnOne {
    inner: SqliteSink,
    slow_event: Uuid,
    stuck: AtomicBool,
}

#[async_trait]
impl Sink for SlowOnOne {
    async fn write(&self, events: &[AdEvent]) -> Result<WriteReport, SinkError> {
        if events
            .iter()
            .any(|e| e.event_id.as_uuid() == self.slow_event)
        {
            self.stuck.store(true, Ordering::SeqCst);
            let never: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(std::future::pending());
            never.await;
        }
        self.inner.write(events).await
    }

    async fn ping(&self) -> Result<(), SinkError> {
        self.inner.ping().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_while_a_slow_batch_runs_loses_nothing_from_its_offset_on() {
    let mock = mock_cluster(1).unwrap();
    let bootstrap = mock.bootstrap_servers().to_owned();
    let (bodies, events) = envelopes(30, 10, 2);
    produce_to(&bootstrap, TOPIC, 0, &bodies).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store_path = dir.path().join("store.db");
    let store = SqliteSink::open(&store_path).unwrap();
    let slow_at = 7;
    let slow_event = Uuid::parse_str(events[slow_at][0]["event_id"].as_str().unwrap()).unwrap();

    // One envelope per batch, three batches at once: the one at offset 7 hangs, the
    // others finish around it.
    let config = PollerConfig {
        loops: 3,
        max_concurrent_batches: 3,
        max_batch_messages: 1,
        receive_max_messages: 1,
        receive_wait: Duration::from_secs(1),
        max_batch_wait: Duration::from_millis(50),
        max_events_per_sec: None,
        ..PollerConfig::default()
    };
    let slow = Arc::new(SlowOnOne {
        inner: SqliteSink::open(&store_path).unwrap(),
        slow_event,
        stuck: AtomicBool::new(false),
    });
    // The first worker runs on a runtime of its own, so that "crashing" it (shutting that
    // runtime down) drops every task it had, as a dying process would.
    let doomed = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    doomed.spawn({
        let (bootstrap, slow, config) = (bootstrap.clone(), slow.clone(), config.clone());
        async move {
            let source = Arc::new(KafkaSource::new(&consumer_config(&bootstrap, "crash")).unwrap());
            let poller = Poller::new(source.clone() as Arc<dyn Source>, slow, config).unwrap();
            let _ = tx.send(source);
            poller.run(CancellationToken::new()).await;
        }
    });
    let source = rx.await.unwrap();

    // Everything but the slow envelope gets stored (two loops keep going around it).
    let deadline = Instant::now() + Duration::from_secs(60);
    while store.events_stored().await.unwrap() < 290 {
        assert!(
            Instant::now() < deadline,
            "stored {}",
            store.events_stored().await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(slow.stuck.load(Ordering::SeqCst));
    commit(&source).await;
    let held = committed(&bootstrap, "crash", 1).await;
    assert_eq!(
        held,
        BTreeMap::from([(0, slow_at as i64)]),
        "later batches finished, the position waits at the slow one"
    );

    // Crash: the worker dies with the slow batch unfinished. Its tasks let go of the source
    // as the runtime winds down; wait for that, so the old member has left the group before
    // the new one joins (else a rebalance mid-run would re-read a few offsets twice).
    doomed.shutdown_background();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Arc::strong_count(&source) > 1 {
        assert!(
            Instant::now() < deadline,
            "the aborted poller still holds the source"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(source);

    let source = Arc::new(KafkaSource::new(&consumer_config(&bootstrap, "crash")).unwrap());
    let poller = Poller::new(
        source.clone() as Arc<dyn Source>,
        Arc::new(SqliteSink::open(&store_path).unwrap()),
        config,
    )
    .unwrap();
    let metrics = poller.metrics();
    let stop = CancellationToken::new();
    let task = tokio::spawn(poller.run(stop.clone()));
    // Until everything is stored and the restart has settled as many messages as it should
    // re-read: stopping as soon as the slow envelope lands would cut the re-read short (its
    // write can finish before the other loops have received the rest).
    let re_read = (30 - slow_at) as u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while store.events_stored().await.unwrap() < 300 || metrics.snapshot().acked < re_read {
        assert!(
            Instant::now() < deadline,
            "the slow envelope never landed or the re-read stopped short: {:?}",
            metrics.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    task.await.unwrap();
    let m = metrics.snapshot();
    println!("after restart: {m:?}");
    assert_eq!(
        m.received, re_read,
        "the restart re-read exactly [slow offset, end)"
    );
    let ids: Vec<Uuid> = events
        .iter()
        .flatten()
        .map(|e| Uuid::parse_str(e["event_id"].as_str().unwrap()).unwrap())
        .collect();
    let report = check(&SqliteStoreView::new(&store_path), &ids, Some(&ids))
        .await
        .unwrap();
    assert!(report.is_clean(), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_message_comes_back_after_its_backoff_while_other_partitions_move_on() {
    let mock = mock_cluster(2).unwrap();
    let bootstrap = mock.bootstrap_servers().to_owned();
    let (bodies, _) = envelopes(10, 1, 3);
    produce_to(&bootstrap, TOPIC, 0, &bodies[..5])
        .await
        .unwrap();
    produce_to(&bootstrap, TOPIC, 1, &bodies[5..])
        .await
        .unwrap();

    let s = Arc::new(KafkaSource::new(&consumer_config(&bootstrap, "retry")).unwrap());
    let got = receive_n(&s, 10, Duration::from_secs(30)).await;
    let (retried, rest): (Vec<_>, Vec<_>) = got.into_iter().partition(|d| offset_of(d) == (0, 0));
    assert_eq!(retried.len(), 1);
    let backoff = Duration::from_millis(800);
    let asked = Instant::now();
    s.retry_later(&[(retried[0].id.clone(), backoff)])
        .await
        .unwrap();
    let ids: Vec<DeliveryId> = rest.iter().map(|d| d.id.clone()).collect();
    s.ack(&ids).await.unwrap();
    commit(&s).await;
    assert_eq!(
        committed(&bootstrap, "retry", 2).await,
        BTreeMap::from([(0, 0), (1, 5)]),
        "partition 1 moved on; partition 0 waits at the retried offset 0"
    );

    let back = receive_n(&s, 1, Duration::from_secs(10)).await;
    assert!(asked.elapsed() >= backoff, "came back before its backoff");
    assert_eq!(offset_of(&back[0]), (0, 0));
    assert_eq!(back[0].receive_count, 2);
    assert_eq!(back[0].body, retried[0].body);
    s.ack(&[back[0].id.clone()]).await.unwrap();
    commit(&s).await;
    assert_eq!(
        committed(&bootstrap, "retry", 2).await,
        BTreeMap::from([(0, 5), (1, 5)])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_out_of_receives_goes_to_the_dlq_topic_and_its_partition_moves_on() {
    let mock = mock_cluster(1).unwrap();
    let bootstrap = mock.bootstrap_servers().to_owned();
    let (bodies, _) = envelopes(3, 1, 4);
    produce_to(&bootstrap, TOPIC, 0, &bodies).await.unwrap();

    let mut config = consumer_config(&bootstrap, "redrive");
    config.max_receives = 3;
    let s = Arc::new(KafkaSource::new(&config).unwrap());
    let got = receive_n(&s, 3, Duration::from_secs(30)).await;
    let (failing, rest): (Vec<_>, Vec<_>) = got.into_iter().partition(|d| offset_of(d) == (0, 0));
    let ids: Vec<DeliveryId> = rest.iter().map(|d| d.id.clone()).collect();
    s.ack(&ids).await.unwrap();

    // It fails every time it is tried: received 3 times, then never handed out again.
    let mut last = failing[0].clone();
    for count in 2..=3 {
        s.retry_later(&[(last.id.clone(), Duration::from_millis(50))])
            .await
            .unwrap();
        last = receive_n(&s, 1, Duration::from_secs(10)).await.remove(0);
        assert_eq!((offset_of(&last), last.receive_count), ((0, 0), count));
    }
    s.retry_later(&[(last.id.clone(), Duration::from_millis(50))])
        .await
        .unwrap();
    let after = s.receive(10, Duration::from_secs(2)).await.unwrap();
    assert!(after.is_empty(), "handed out a 4th time: {after:?}");

    let b = bootstrap.clone();
    let dlq = tokio::task::spawn_blocking(move || {
        tests::kafka::read_topic(&b, tests::kafka::DLQ_TOPIC, 1, 1, Duration::from_secs(20))
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].payload, bodies[0], "the message, unchanged");
    assert_eq!(dlq[0].headers["spillway-error-code"], "max_receives");
    assert!(
        dlq[0].headers["spillway-error-message"].contains("received 3 times"),
        "{:?}",
        dlq[0].headers
    );
    assert_eq!(dlq[0].headers["spillway-original-offset"], "0");
    // The poller's dead_letters_total never sees this letter: the source counts it (it used
    // to be counted nowhere).
    let mut page = shared::metrics::Exposition::new();
    s.render_metrics(&mut page);
    let page = page.finish();
    let value = |series| shared::metrics::value_of(&page, series);
    assert_eq!(
        value("spillway_kafka_dlq_redriven_total"),
        Some(1.0),
        "{page}"
    );
    assert_eq!(
        value("spillway_kafka_dlq_redrive_failures_total"),
        Some(0.0),
        "{page}"
    );
    commit(&s).await;
    assert_eq!(
        committed(&bootstrap, "redrive", 1).await,
        BTreeMap::from([(0, 3)]),
        "the partition's position passed the dead-lettered offset"
    );
}

/// The worker's letters whose DLQ produce failed are what goes to the DLQ when the message
/// comes due again, with their reasons: not the message whole as `max_receives` (its last
/// receive used), which would lose them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn letters_whose_produce_failed_are_sent_again_with_their_reasons() {
    let mock = mock_cluster(1).unwrap();
    let bootstrap = mock.bootstrap_servers().to_owned();
    let (bodies, _) = envelopes(1, 1, 5);
    produce_to(&bootstrap, TOPIC, 0, &bodies).await.unwrap();
    let mut config = consumer_config(&bootstrap, "unsent");
    config.max_receives = 1;
    config.dlq_producer.delivery_timeout = Duration::from_secs(2);
    let s = Arc::new(KafkaSource::new(&config).unwrap());
    let got = receive_n(&s, 1, Duration::from_secs(30)).await;
    let letter = shared::DeadLetter {
        body: got[0].body.clone(),
        attributes: got[0].attributes.clone(),
        reason: shared::DeadLetterReason {
            code: "invalid_event".into(),
            message: "/events/0/type: not a type".into(),
        },
    };
    mock.broker_down(1).unwrap();
    s.dead_letter(&got[0].id, std::slice::from_ref(&letter))
        .await
        .unwrap_err();
    mock.broker_up(1).unwrap();
    // Due again 5 s later: produced from receive, never handed out.
    let deadline = Instant::now() + Duration::from_secs(30);
    while committed(&bootstrap, "unsent", 1).await.get(&0) != Some(&1) {
        assert!(Instant::now() < deadline, "offset 0 never finished");
        // The consumer reports the outage it saw as an error first; the poller retries.
        let more = s
            .receive(10, Duration::from_millis(500))
            .await
            .unwrap_or_default();
        // The outage can cost the consumer its place in the group: a new assignment hands
        // the unfinished offset out again under a new delivery id, to be decided again (as a
        // worker would; a duplicate letter at worst). The same delivery never comes back.
        for d in more {
            assert_ne!(d.id, got[0].id, "handed out again: {d:?}");
            s.dead_letter(&d.id, std::slice::from_ref(&letter))
                .await
                .unwrap();
        }
        commit(&s).await;
    }
    let b = bootstrap.clone();
    let dlq = tokio::task::spawn_blocking(move || {
        tests::kafka::read_topic(&b, tests::kafka::DLQ_TOPIC, 1, 1, Duration::from_secs(20))
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].headers["spillway-error-code"], "invalid_event");
    assert_eq!(dlq[0].payload, bodies[0]);
}

/// The page `source` renders, once `series` shows `want`. Statistics come every 100 ms here,
/// served while the consumer polls, as the poller's receive loops keep it doing.
async fn lag_page(source: &KafkaSource, series: &str, want: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let more = source
            .receive(10, Duration::from_millis(100))
            .await
            .unwrap();
        assert!(more.is_empty(), "every message was already received");
        let mut page = shared::metrics::Exposition::new();
        source.render_metrics(&mut page);
        let page = page.finish();
        if shared::metrics::value_of(&page, series) == Some(want) {
            return page;
        }
        assert!(
            Instant::now() < deadline,
            "{series} never became {want}:\n{page}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_lag_of_each_owned_partition_is_rendered_for_metrics() {
    let mock = mock_cluster(1).unwrap();
    let bootstrap = mock.bootstrap_servers().to_owned();
    let (bodies, _) = envelopes(20, 1, 7);
    produce_to(&bootstrap, TOPIC, 0, &bodies).await.unwrap();
    let mut config = consumer_config(&bootstrap, "lag");
    config
        .client
        .extra
        .insert("statistics.interval.ms".into(), "100".into());
    let source = Arc::new(KafkaSource::new(&config).unwrap());
    let mut got = receive_n(&source, 20, Duration::from_secs(30)).await;
    got.sort_by_key(offset_of);

    // Offsets 0..5 done and committed: 15 of the 20 are still behind the group.
    let done: Vec<DeliveryId> = got[..5].iter().map(|d| d.id.clone()).collect();
    source.ack(&done).await.unwrap();
    commit(&source).await;
    let series = r#"spillway_kafka_consumer_lag{partition="0"}"#;
    lag_page(&source, series, 15.0).await;

    let rest: Vec<DeliveryId> = got[5..].iter().map(|d| d.id.clone()).collect();
    source.ack(&rest).await.unwrap();
    commit(&source).await;
    let page = lag_page(&source, series, 0.0).await;
    assert!(
        page.contains("# TYPE spillway_kafka_consumer_lag gauge"),
        "{page}"
    );
}

/// A worker whose first batch cannot be written (the store is down at deploy) never commits;
/// librdkafka then reports no lag, and the gauge must still show the backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_the_groups_first_commit_the_whole_partition_counts_as_lag() {
    let mock = mock_cluster(1).unwrap();
    let bootstrap = mock.bootstrap_servers().to_owned();
    let (bodies, _) = envelopes(20, 1, 8);
    produce_to(&bootstrap, TOPIC, 0, &bodies).await.unwrap();
    let mut config = consumer_config(&bootstrap, "lag-before-commit");
    config
        .client
        .extra
        .insert("statistics.interval.ms".into(), "100".into());
    let source = Arc::new(KafkaSource::new(&config).unwrap());
    let got = receive_n(&source, 20, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 20);
    // Nothing acked, nothing committed.
    let series = r#"spillway_kafka_consumer_lag{partition="0"}"#;
    lag_page(&source, series, 20.0).await;
}
