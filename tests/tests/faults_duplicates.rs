//! Faults that deliver the same events more than once, against PostgreSQL:
//!
//! - Duplicate storm: a `Source` decorator over the real embedded queue delivers every
//!   message three times (once more in the same receive, once more later, after the ack).
//!   The rollups must equal those of a single-delivery run of the same messages exactly.
//! - Ambiguous acknowledgement: a TCP proxy in front of the real ingest API drops the answer
//!   of a fraction of requests after the server took them; the client sends those requests
//!   again whole. The store must hold one row per `event_id`, with consistent rollups.
//!
//! Sizes scale with `SPILLWAY_FAULTS_SCALE`; see README "Fault tests".
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use ingest_api::IngestConfig;
use shared::embedded::{Broker, QueueSource, TopicPublisher};
use shared::{PostgresConfig, PostgresSink, Source};
use tests::checker::{check, ensure_content, PostgresStoreView, StoreView};
use tests::faults::{
    post_load, synthetic_envelopes as envelopes, DroppingProxy, LoadPlan, TripleSource,
};
use tests::pipeline::{declare_topology, wait_drained, QUEUE, TOPIC};
use tests::postgres::TestDb;
use tests::{spawn_ingest, TEST_KEY};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use workers::{Metrics, MetricsSnapshot, Poller, PollerConfig};

fn scale() -> usize {
    std::env::var("SPILLWAY_FAULTS_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
        .max(1)
}

fn poller_config() -> PollerConfig {
    PollerConfig {
        loops: 2,
        receive_wait: Duration::from_millis(500),
        max_batch_wait: Duration::from_millis(100),
        max_events_per_sec: None,
        ..PollerConfig::default()
    }
}

async fn postgres_sink(url: &str) -> Arc<PostgresSink> {
    let sink = PostgresSink::new(&PostgresConfig {
        max_connections: 4,
        ..PostgresConfig::new(url)
    })
    .unwrap();
    sink.migrate().await.unwrap();
    Arc::new(sink)
}

/// Runs a poller over `source` into `url` until `done` holds for its metrics.
async fn drain(
    source: Arc<dyn Source>,
    url: &str,
    done: impl Fn(&MetricsSnapshot) -> bool,
) -> (MetricsSnapshot, Duration) {
    let poller = Poller::new(source, postgres_sink(url).await, poller_config()).unwrap();
    let metrics: Arc<Metrics> = poller.metrics();
    let stop = CancellationToken::new();
    let started = Instant::now();
    let worker = tokio::spawn(poller.run(stop.clone()));
    let deadline = started + Duration::from_secs(180);
    while !done(&metrics.snapshot()) {
        assert!(
            Instant::now() < deadline,
            "not drained in time: {:?}",
            metrics.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = started.elapsed();
    stop.cancel();
    worker.await.unwrap();
    (metrics.snapshot(), took)
}

async fn broker_with(dir: &std::path::Path, envs: &[shared::envelope::Envelope]) -> Broker {
    let broker = declare_topology(dir, Duration::from_secs(10), 5)
        .await
        .unwrap();
    broker.publish(TOPIC, envs).await.unwrap();
    broker
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_storm_leaves_rollups_equal_to_the_single_delivery_run() {
    let (Some(single_db), Some(triple_db)) = (TestDb::create().await, TestDb::create().await)
    else {
        return;
    };
    let (events, envs) = envelopes(3_000 * scale()).unwrap();
    let messages = envs.len() as u64;
    let ids: Vec<Uuid> = events.iter().map(|e| e.event_id.as_uuid()).collect();

    let single_dir = tempfile::tempdir().unwrap();
    let single_broker = broker_with(single_dir.path(), &envs).await;
    let (single, single_took) = drain(
        Arc::new(QueueSource::new(single_broker.clone(), QUEUE)),
        &single_db.url,
        |m| m.acked >= messages,
    )
    .await;

    let triple_dir = tempfile::tempdir().unwrap();
    let triple_broker = broker_with(triple_dir.path(), &envs).await;
    let triple_source = Arc::new(TripleSource::new(Arc::new(QueueSource::new(
        triple_broker.clone(),
        QUEUE,
    ))));
    let (triple, triple_took) = drain(triple_source.clone(), &triple_db.url, |m| {
        m.acked >= 3 * messages
    })
    .await;
    wait_drained(&single_broker, QUEUE, Duration::from_secs(5))
        .await
        .unwrap();
    wait_drained(&triple_broker, QUEUE, Duration::from_secs(5))
        .await
        .unwrap();

    let single_view = PostgresStoreView::connect(&single_db.url).await.unwrap();
    let triple_view = PostgresStoreView::connect(&triple_db.url).await.unwrap();
    let single_verdict = check(&single_view, &ids, Some(&ids)).await.unwrap();
    let triple_verdict = check(&triple_view, &ids, Some(&ids)).await.unwrap();
    let single_rollups = single_view.rollups().await.unwrap();
    let triple_rollups = triple_view.rollups().await.unwrap();
    eprintln!(
        "duplicate storm: {} events in {messages} messages; single delivery: {} receives, {} \
         written, {} duplicates in {:.1} s; three deliveries: {} receives ({} copies), {} \
         written, {} duplicates in {:.1} s; {} rollup rows ({} events, {} cost micros), \
         identical: {}\n{triple_verdict}",
        events.len(),
        single.received,
        single.written,
        single.duplicates,
        single_took.as_secs_f64(),
        triple.received,
        triple_source.copies_delivered(),
        triple.written,
        triple.duplicates,
        triple_took.as_secs_f64(),
        triple_rollups.len(),
        triple_rollups.values().map(|t| t.events).sum::<i64>(),
        triple_rollups.values().map(|t| t.cost_micros).sum::<i64>(),
        single_rollups == triple_rollups,
    );
    assert!(single_verdict.is_clean(), "{single_verdict}");
    assert!(triple_verdict.is_clean(), "{triple_verdict}");
    assert_eq!(triple_source.copies_delivered(), 2 * messages);
    assert_eq!(
        triple_source.copies_after_ack(),
        messages,
        "one copy of each message came after its ack"
    );
    assert_eq!(triple.received, 3 * messages, "every message three times");
    assert_eq!(
        triple.written,
        events.len() as u64,
        "each event stored once"
    );
    assert_eq!(
        triple.duplicates,
        2 * events.len() as u64,
        "the copies changed nothing"
    );
    assert!(single_rollups.len() > 100, "rollups span many keys");
    assert!(
        single_rollups.values().any(|t| t.events > 1),
        "rollup rows sum several events"
    );
    assert_eq!(single_rollups, triple_rollups, "rollups identical");
    // And equal to what the events sent add up to, not only to each other.
    ensure_content(&triple_view, &events).await.unwrap();
    assert_eq!(
        single_view.stored_ids().await.unwrap().len(),
        triple_view.stored_ids().await.unwrap().len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_resent_after_a_dropped_answer_are_stored_once_per_event_id() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    const PER_REQUEST: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let broker = declare_topology(dir.path(), Duration::from_secs(10), 5)
        .await
        .unwrap();
    let app = spawn_ingest(
        Arc::new(TopicPublisher::new(broker.clone(), TOPIC)),
        IngestConfig::default(),
    )
    .await
    .unwrap();
    let proxy = DroppingProxy::start(app.addr, 0.3).await.unwrap();
    // One connection per request, so the proxy's choice is per request.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let plan = LoadPlan {
        url: format!("http://{}/v1/events", proxy.addr),
        key: TEST_KEY.into(),
        batches: 200 * scale(),
        batch_size: PER_REQUEST,
        rate: 0,
        concurrency: 8,
        max_attempts: 20,
        seed: rand::random(),
    };
    let posted = post_load(&client, &plan).await;

    let source = Arc::new(QueueSource::new(broker.clone(), QUEUE));
    let published = broker.queue_stats(QUEUE).await.unwrap().visible;
    let (m, took) = drain(source, &db.url, |m| m.acked >= published).await;
    wait_drained(&broker, QUEUE, Duration::from_secs(5))
        .await
        .unwrap();
    app.shutdown().await.unwrap();

    let view = PostgresStoreView::connect(&db.url).await.unwrap();
    let verdict = check(&view, &posted.acked, Some(&posted.attempted))
        .await
        .unwrap();
    let rows = view.stored_ids().await.unwrap();
    let distinct: std::collections::HashSet<_> = rows.iter().collect();
    eprintln!(
        "ambiguous acknowledgement: {} requests for {} batches of {PER_REQUEST}, {} answers \
         dropped by the proxy after the server took the request, {} resent; {} envelopes \
         published; worker wrote {} events and found {} duplicates in {:.1} s; {} rows for {} \
         distinct ids\n{verdict}",
        posted.requests,
        plan.batches,
        proxy.dropped(),
        posted.retries,
        published,
        m.written,
        m.duplicates,
        took.as_secs_f64(),
        rows.len(),
        distinct.len(),
    );
    assert_eq!(posted.given_up, 0, "every batch acknowledged in the end");
    assert!(proxy.dropped() > 0, "answers were dropped");
    assert!(posted.retries >= proxy.dropped());
    // Each dropped answer was a request the server took: its events were published again.
    assert!(
        m.duplicates >= proxy.dropped() * PER_REQUEST as u64,
        "the resent events reached the store as duplicates: {m:?}"
    );
    assert_eq!(rows.len(), distinct.len(), "one row per event_id");
    assert_eq!(rows.len(), plan.batches * PER_REQUEST);
    assert_eq!(posted.acked_events.len(), posted.acked.len());
    ensure_content(&view, &posted.acked_events).await.unwrap();
    assert_eq!(verdict.lost, 0, "{verdict}");
    assert_eq!(verdict.unexpected, Some(0), "{verdict}");
    assert_eq!(verdict.duplicated, 0, "{verdict}");
    assert!(verdict.rollups_consistent, "{verdict}");
}
