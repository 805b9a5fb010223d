//! Fault: PostgreSQL crashes and restarts, then stays down for longer than
//! `max_receive_count × visibility timeout`, while load keeps coming in.
//!
//! The store is a private PostgreSQL server started by the test (`initdb` into a temporary
//! directory, its own port), so stopping it disturbs no other test. Ingest (the real router
//! over the embedded broker), the poller (the real `PostgresSink`, the real queue with
//! redrive) and the load run in this process. The circuit breaker must open, no valid message
//! may reach the DLQ, the backlog must drain after recovery, and the checker must find
//! lost = 0, unexpected = 0, duplicated = 0 and consistent rollups.
//!
//! Sizes scale with `SPILLWAY_FAULTS_SCALE`; see README "Fault tests".
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ingest_api::IngestConfig;
use shared::embedded::{QueueSource, TopicPublisher};
use shared::{PostgresConfig, PostgresSink};
use tests::checker::{check, ensure_content, PostgresStoreView};
use tests::faults::{post_load, LoadPlan};
use tests::pipeline::{declare_topology, wait_drained, DLQ, QUEUE, TOPIC};
use tests::postgres::PrivatePostgres;
use tests::{spawn_ingest, TEST_KEY};
use tokio_util::sync::CancellationToken;
use workers::breaker::BreakerConfig;
use workers::{BreakerState, CoreConfig, Poller, PollerConfig};

fn scale() -> u64 {
    std::env::var("SPILLWAY_FAULTS_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
        .max(1)
}

const VISIBILITY: Duration = Duration::from_secs(2);
const MAX_RECEIVES: u32 = 4;

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_crashing_and_staying_down_past_the_redrive_sends_no_valid_message_to_the_dlq() {
    let Some(pg) = blocking(PrivatePostgres::start).await else {
        return;
    };
    let pg = Arc::new(pg);
    let outage = (VISIBILITY * MAX_RECEIVES) * 2 * u32::try_from(scale()).unwrap();
    let load_secs = 14 + outage.as_secs();

    let dir = tempfile::tempdir().unwrap();
    let broker = declare_topology(dir.path(), VISIBILITY, MAX_RECEIVES)
        .await
        .unwrap();
    let app = spawn_ingest(
        Arc::new(TopicPublisher::new(broker.clone(), TOPIC)),
        IngestConfig::default(),
    )
    .await
    .unwrap();
    let sink = PostgresSink::new(&PostgresConfig {
        max_connections: 4,
        connect_timeout: Duration::from_secs(2),
        statement_timeout: Duration::from_secs(5),
        ..PostgresConfig::new(pg.url())
    })
    .unwrap();
    sink.migrate().await.unwrap();
    let poller = Poller::new(
        Arc::new(QueueSource::new(broker.clone(), QUEUE)),
        Arc::new(sink),
        PollerConfig {
            loops: 2,
            receive_wait: Duration::from_secs(1),
            max_batch_wait: Duration::from_millis(200),
            visibility_timeout: VISIBILITY,
            heartbeat_every: Duration::from_secs(1),
            max_events_per_sec: None,
            breaker: BreakerConfig {
                failure_threshold: 2,
                cooldown: Duration::from_secs(1),
                max_cooldown: Duration::from_secs(4),
            },
            core: CoreConfig {
                min_retry_delay: Duration::from_secs(1),
                max_retry_delay: Duration::from_secs(4),
                ..CoreConfig::default()
            },
            ..PollerConfig::default()
        },
    )
    .unwrap();
    let metrics = poller.metrics();
    let stop = CancellationToken::new();
    let worker = tokio::spawn(poller.run(stop.clone()));

    // Watch the breaker and the backlog while the store is down.
    let down = Arc::new(AtomicBool::new(false));
    let open_while_down = Arc::new(AtomicBool::new(false));
    let peak_backlog = Arc::new(AtomicU64::new(0));
    let watcher = {
        let (metrics, broker) = (Arc::clone(&metrics), broker.clone());
        let (down, open, peak) = (
            Arc::clone(&down),
            Arc::clone(&open_while_down),
            Arc::clone(&peak_backlog),
        );
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                if down.load(Ordering::SeqCst)
                    && metrics.snapshot().breaker_state != BreakerState::Closed
                {
                    open.store(true, Ordering::SeqCst);
                }
                if let Ok(s) = broker.queue_stats(QUEUE).await {
                    peak.fetch_max(s.visible + s.in_flight + s.delayed, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    // Load: 500 events/s in batches of 50 for the whole run.
    let plan = LoadPlan {
        url: app.events_url(),
        key: TEST_KEY.into(),
        batches: usize::try_from(load_secs * 10).unwrap(),
        batch_size: 50,
        rate: 500,
        concurrency: 4,
        max_attempts: 3,
        seed: rand::random(),
    };
    let client = reqwest::Client::new();
    let load = tokio::spawn(async move { post_load(&client, &plan).await });

    // The faults: a crash and restart at 4 s, then a long stop at 9 s.
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let p = Arc::clone(&pg);
    blocking(move || {
        p.stop("immediate")?;
        p.start_again()
    })
    .await
    .unwrap();
    let restarted_at = started.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let p = Arc::clone(&pg);
    blocking(move || p.stop("fast")).await.unwrap();
    down.store(true, Ordering::SeqCst);
    let stopped_at = started.elapsed();
    let at_stop = metrics.snapshot();
    tokio::time::sleep(outage).await;
    let during = metrics.snapshot();
    let dlq_during = broker.queue_stats(DLQ).await.unwrap();
    let p = Arc::clone(&pg);
    blocking(move || p.start_again()).await.unwrap();
    down.store(false, Ordering::SeqCst);
    let recovered = Instant::now();
    let backlog_at_recovery = broker.queue_stats(QUEUE).await.unwrap();

    let posted = load.await.unwrap();
    wait_drained(&broker, QUEUE, Duration::from_secs(180))
        .await
        .unwrap();
    let drained_in = recovered.elapsed();
    stop.cancel();
    worker.await.unwrap();
    watcher.await.unwrap();
    app.shutdown().await.unwrap();

    let m = metrics.snapshot();
    let dlq = broker.queue_stats(DLQ).await.unwrap();
    let view = PostgresStoreView::connect(&pg.url()).await.unwrap();
    let verdict = check(&view, &posted.acked, Some(&posted.attempted))
        .await
        .unwrap();
    assert_eq!(posted.acked_events.len(), posted.acked.len());
    ensure_content(&view, &posted.acked_events).await.unwrap();
    eprintln!(
        "PostgreSQL outage: crash+restart at {:.1} s, stopped at {:.1} s for {:.0} s \
         (max_receive_count {MAX_RECEIVES} × visibility {} s = {} s); {} events acknowledged \
         ({} requests, {} retried); breaker opened {} times, open while down: {}; {} receives \
         during the outage; backlog {} messages at recovery (peak {}), drained {:.1} s after \
         recovery; DLQ depth {} during, {} after; {} events written, {} duplicates\n{verdict}",
        restarted_at.as_secs_f64(),
        stopped_at.as_secs_f64(),
        outage.as_secs_f64(),
        VISIBILITY.as_secs(),
        (VISIBILITY * MAX_RECEIVES).as_secs(),
        posted.acked.len(),
        posted.requests,
        posted.retries,
        m.breaker_opened,
        open_while_down.load(Ordering::SeqCst),
        during.received - at_stop.received,
        backlog_at_recovery.visible + backlog_at_recovery.in_flight + backlog_at_recovery.delayed,
        peak_backlog.load(Ordering::SeqCst),
        drained_in.as_secs_f64(),
        dlq_during.visible,
        dlq.visible + dlq.in_flight + dlq.delayed,
        m.written,
        m.duplicates,
    );
    assert_eq!(posted.given_up, 0, "ingest does not depend on the store");
    assert!(m.breaker_opened >= 1, "the breaker opened");
    assert!(
        open_while_down.load(Ordering::SeqCst),
        "the breaker was open while the store was down"
    );
    assert_eq!(m.dead_lettered, 0, "the worker dead-lettered nothing");
    assert_eq!(
        dlq.visible + dlq.in_flight + dlq.delayed,
        0,
        "no valid message reached the DLQ"
    );
    assert!(
        backlog_at_recovery.visible + backlog_at_recovery.delayed > 0,
        "a backlog built up during the outage"
    );
    // "Stops receiving": only the breaker's probes take messages while the store is down, a
    // small fraction of what arrives (measured: 18–24 deliveries against ~1,000 messages).
    let received_down = during.received - at_stop.received;
    let backlog =
        backlog_at_recovery.visible + backlog_at_recovery.in_flight + backlog_at_recovery.delayed;
    assert!(
        received_down * 10 < backlog,
        "the breaker stopped receiving: {received_down} deliveries while {backlog} messages waited"
    );
    assert_eq!(verdict.lost, 0, "{verdict}");
    assert_eq!(verdict.unexpected, Some(0), "{verdict}");
    assert_eq!(verdict.duplicated, 0, "{verdict}");
    assert!(verdict.rollups_consistent, "{verdict}");
    assert_eq!(verdict.stored, posted.acked.len(), "{verdict}");
}
