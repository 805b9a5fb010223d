//! The embedded pipeline end to end: `spillway dev` over HTTP, crash and restart, and a spike
//! absorbed by the queue while the store sees at most the write cap.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use ingest_api::IngestConfig;
use serde_json::{json, Value};
use shared::embedded::{Broker, QueueSource, TopicPublisher, DEV_QUEUE, DEV_TOPIC};
use shared::event::{AdEvent, EventId};
use shared::sink::{Sink, SinkError, WriteReport};
use shared::sqlite_sink::SqliteSink;
use shared::synthetic::SyntheticEvents;
use shared::{SystemClock, ValidationPolicy};
use tests::checker::check;
use tests::dev_process::{spillway_bin, DevProcess};
use tests::spawn_ingest;
use tests::sqlite_view::SqliteStoreView;
use time::format_description::well_known::Rfc3339;
use tokio_util::sync::CancellationToken;
use workers::{Poller, PollerConfig};

type Key = (String, String, String, String, String, String);
type Totals = (i64, i64, i64);

fn expected_rollups(events: &[Value]) -> BTreeMap<Key, Totals> {
    let mut out: BTreeMap<Key, Totals> = BTreeMap::new();
    for v in events {
        let ev = AdEvent::from_json(v.clone(), &ValidationPolicy::default(), &SystemClock).unwrap();
        let minute = ev
            .occurred_at
            .replace_second(0)
            .unwrap()
            .replace_nanosecond(0)
            .unwrap();
        let key = (
            minute.format(&Rfc3339).unwrap(),
            ev.advertiser_id.to_string(),
            ev.campaign_id.to_string(),
            ev.ad_id.to_string(),
            ev.event_type.as_str().to_owned(),
            ev.currency
                .as_ref()
                .map(|c| c.as_str().to_owned())
                .unwrap_or_default(),
        );
        let t = out.entry(key).or_default();
        t.0 += 1;
        t.1 += i64::try_from(ev.cost_micros.get()).unwrap();
        t.2 += ev
            .revenue_micros
            .map_or(0, |r| i64::try_from(r.get()).unwrap());
    }
    out
}

async fn stored_rollups(store: &SqliteSink) -> BTreeMap<Key, Totals> {
    store
        .rollups()
        .await
        .unwrap()
        .into_iter()
        .map(|r| {
            (
                (
                    r.minute,
                    r.advertiser_id,
                    r.campaign_id,
                    r.ad_id,
                    r.event_type,
                    r.currency,
                ),
                (r.events, r.cost_micros, r.revenue_micros),
            )
        })
        .collect()
}

fn stats(dir: &std::path::Path) -> Value {
    let out = Command::new(spillway_bin().unwrap())
        .args(["stats", "--json", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Polls until the store holds `n` events and the queue is empty.
async fn wait_drained(
    dir: &std::path::Path,
    store: &SqliteSink,
    n: u64,
    timeout: Duration,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let s = stats(dir);
        let stored = store.events_stored().await.unwrap();
        if stored >= n && s["queue_depth"] == 0 && s["in_flight"] == 0 {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "not drained in {timeout:?}: stored {stored}, stats {s}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_holds_exactly_the_valid_unique_events_and_rollups_match_the_posted_sums() {
    let dir = tempfile::tempdir().unwrap();
    let dev = DevProcess::start(dir.path(), &[]).unwrap();
    let client = reqwest::Client::new();
    let mut g = SyntheticEvents::new(11, 7);
    let valid: Vec<Value> = (0..1000).map(|_| g.event()).collect();
    let mut posted_invalid = 0;
    for (i, chunk) in valid.chunks(100).enumerate() {
        let mut body: Vec<Value> = chunk.to_vec();
        // A bad event, a duplicate inside the request, and a resend of an earlier request.
        let mut bad = chunk[0].clone();
        bad["event_id"] = json!(format!("bad-{i}"));
        body.push(bad);
        posted_invalid += 1;
        body.push(chunk[1].clone());
        let resp = client
            .post(dev.events_url())
            .bearer_auth(&dev.key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202);
        let report: Value = resp.json().await.unwrap();
        assert_eq!(report["accepted"], 101);
        assert_eq!(report["rejected"].as_array().unwrap().len(), 1);
        if i % 3 == 0 {
            let again = client
                .post(dev.events_url())
                .bearer_auth(&dev.key)
                .json(&chunk)
                .send()
                .await
                .unwrap();
            assert_eq!(again.status(), 202);
        }
    }
    assert_eq!(posted_invalid, 10);

    let store = SqliteSink::open(dir.path().join("store.db")).unwrap();
    let s = wait_drained(dir.path(), &store, 1000, Duration::from_secs(60)).await;
    assert_eq!(
        store.events_stored().await.unwrap(),
        1000,
        "each valid event stored once"
    );
    let ids: Vec<EventId> = valid
        .iter()
        .map(|v| EventId::parse(v["event_id"].as_str().unwrap()).unwrap())
        .collect();
    assert_eq!(store.count_ids(&ids).await.unwrap(), 1000);
    assert_eq!(stored_rollups(&store).await, expected_rollups(&valid));
    assert_eq!(s["dlq_depth"], 0);
    assert_eq!(s["events_stored"], 1000);

    // `/metrics` on the dev port tells the same story: 14 answers of 202, 1,410 events
    // accepted (in-request duplicates and resends included), 10 rejected, 1,000 stored once.
    let page = client
        .get(format!("http://{}/metrics", dev.addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let v = |series: &str| {
        shared::metrics::value_of(&page, series)
            .unwrap_or_else(|| panic!("{series} missing from\n{page}"))
    };
    assert_eq!(v(r#"spillway_ingest_responses_total{status="202"}"#), 14.0);
    assert_eq!(v("spillway_ingest_events_accepted_total"), 1410.0);
    assert_eq!(v("spillway_ingest_events_rejected_total"), 10.0);
    assert_eq!(v("spillway_worker_events_written_total"), 1000.0);
    assert_eq!(v("spillway_worker_events_duplicate_total"), 410.0);
    assert_eq!(v("spillway_worker_dead_letters_total"), 0.0);
    dev.terminate(Duration::from_secs(30)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dev_process_killed_with_sigkill_during_load_loses_no_acknowledged_event() {
    let dir = tempfile::tempdir().unwrap();
    let addr = DevProcess::free_addr().unwrap().to_string();
    // Short visibility so anything a killed process held comes back within the test.
    let fast = [
        "--visibility-timeout-secs",
        "3",
        "--heartbeat-secs",
        "1",
        "--batch-max-wait-ms",
        "200",
    ];
    let dev = DevProcess::start_on(dir.path(), &addr, &fast).unwrap();
    let ids_file = dir.path().join("acked.ids");
    let mut loadgen = Command::new(spillway_bin().unwrap())
        .args([
            "loadgen",
            "--url",
            &format!("http://{addr}/v1/events"),
            "--api-key",
            &dev.key,
        ])
        .args([
            "--rate",
            "3000",
            "--duration",
            "9s",
            "--batch-size",
            "50",
            "--concurrency",
            "4",
        ])
        .args([
            "--duplicate-fraction",
            "0.1",
            "--max-retries",
            "20",
            "--max-retry-wait",
            "1s",
        ])
        .arg("--ids-out")
        .arg(&ids_file)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut dev = Some(dev);
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        dev.take().unwrap().kill().unwrap();
        dev = Some(DevProcess::start_on(dir.path(), &addr, &fast).unwrap());
    }
    assert!(loadgen.wait().unwrap().success());

    let acked: BTreeSet<String> = std::fs::read_to_string(&ids_file)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert!(
        acked.len() > 5_000,
        "only {} events acknowledged",
        acked.len()
    );
    let store = SqliteSink::open(dir.path().join("store.db")).unwrap();
    let s = wait_drained(
        dir.path(),
        &store,
        u64::try_from(acked.len()).unwrap(),
        Duration::from_secs(90),
    )
    .await;
    let ids: Vec<EventId> = acked.iter().map(|i| EventId::parse(i).unwrap()).collect();
    let found = store.count_ids(&ids).await.unwrap();
    let stored = store.events_stored().await.unwrap();
    let rollup_events: i64 = store
        .rollups()
        .await
        .unwrap()
        .iter()
        .map(|r| r.events)
        .sum();
    println!(
        "acknowledged {} found {found} stored {stored} rollup events {rollup_events}",
        acked.len()
    );
    assert_eq!(found, acked.len(), "lost = acknowledged but not stored");
    assert_eq!(
        u64::try_from(rollup_events).unwrap(),
        stored,
        "each stored event counted once"
    );
    // The whole check: every rollup row equal to its recomputation from the raw events (a
    // sum alone would let one key counted twice and another short by one pass). Not the
    // content against what loadgen sent: requests in flight at a kill were published
    // without an answer, so the store rightly holds events loadgen never saw acknowledged.
    let uuids: Vec<uuid::Uuid> = ids.iter().map(|e| e.as_uuid()).collect();
    let view = SqliteStoreView::new(dir.path().join("store.db"));
    let verdict = check(&view, &uuids, None).await.unwrap();
    assert!(verdict.is_clean(), "{verdict}");
    assert_eq!(s["dlq_depth"], 0, "no valid message dead-lettered");
    let status = dev
        .take()
        .unwrap()
        .terminate(Duration::from_secs(30))
        .unwrap();
    assert!(status.success(), "SIGTERM drains and exits 0: {status}");
}

/// A sink that records when each write happened, around the real SQLite sink.
#[derive(Debug)]
struct RecordingSink {
    inner: SqliteSink,
    /// Each write: when it was sent to the store, when the store committed it, its events.
    writes: Mutex<Vec<(Instant, Instant, usize)>>,
}

#[async_trait]
impl Sink for RecordingSink {
    async fn write(&self, events: &[AdEvent]) -> Result<WriteReport, SinkError> {
        let sent = Instant::now();
        let report = self.inner.write(events).await?;
        self.writes
            .lock()
            .unwrap()
            .push((sent, Instant::now(), events.len()));
        Ok(report)
    }

    async fn ping(&self) -> Result<(), SinkError> {
        self.inner.ping().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_at_20x_the_write_cap_is_absorbed_by_the_queue_and_the_store_sees_at_most_the_cap()
{
    const CAP: u32 = 200;
    const BURST_EVENTS: usize = 4_000; // 20 × the cap, posted as fast as possible
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(dir.path().join("broker.db")).unwrap();
    broker.dev_topology().await.unwrap();
    let sink = Arc::new(RecordingSink {
        inner: SqliteSink::open(dir.path().join("store.db")).unwrap(),
        writes: Mutex::new(Vec::new()),
    });
    let config = PollerConfig {
        max_events_per_sec: Some(CAP),
        burst_events: CAP / 20, // any 1 s window: at most cap + 5%
        max_batch_events: usize::try_from(CAP / 20).unwrap(),
        max_batch_wait: Duration::from_millis(100),
        ..PollerConfig::default()
    };
    let poller = Poller::new(
        Arc::new(QueueSource::new(broker.clone(), DEV_QUEUE)),
        sink.clone(),
        config,
    )
    .unwrap();
    let stop = CancellationToken::new();
    let workers = tokio::spawn(poller.run(stop.clone()));
    let app = spawn_ingest(
        Arc::new(TopicPublisher::new(broker.clone(), DEV_TOPIC)),
        IngestConfig::default(),
    )
    .await
    .unwrap();

    let mut g = SyntheticEvents::new(5, 3);
    let events: Vec<Value> = (0..BURST_EVENTS).map(|_| g.event()).collect();
    // Bodies are serialised before the clock starts: the burst rate is what ingest accepts,
    // not how fast this (debug-built) test encodes JSON on a busy machine.
    let bodies: Vec<Vec<u8>> = events
        .chunks(200)
        .map(|chunk| serde_json::to_vec(chunk).unwrap())
        .collect();
    let started = Instant::now();
    let posts = bodies.into_iter().map(|body| {
        app.post_events()
            .header("content-type", "application/json")
            .body(body)
            .send()
    });
    for resp in futures::future::join_all(posts).await {
        assert_eq!(resp.unwrap().status(), 202);
    }
    let burst_secs = started.elapsed().as_secs_f64();
    let peak_depth = broker.queue_stats(DEV_QUEUE).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while sink.inner.events_stored().await.unwrap() < BURST_EVENTS as u64 {
        assert!(Instant::now() < deadline, "backlog not drained");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let drain_secs = started.elapsed().as_secs_f64();
    stop.cancel();
    workers.await.unwrap();
    app.shutdown().await.unwrap();

    // The cap governs what is sent to the store: the most events sent in any 1 s window.
    // Commits are also shown; they bunch up by the store's own fsync jitter (a commit
    // delayed by 10 ms puts 1.01 s of sends in the window after it).
    let writes = sink.writes.lock().unwrap().clone();
    let max_window = |at: fn(&(Instant, Instant, usize)) -> Instant| {
        let mut times: Vec<(Instant, usize)> = writes.iter().map(|w| (at(w), w.2)).collect();
        times.sort_by_key(|(t, _)| *t);
        let mut max = 0;
        for (i, (t0, _)) in times.iter().enumerate() {
            let in_window: usize = times[i..]
                .iter()
                .take_while(|(t, _)| t.duration_since(*t0) < Duration::from_secs(1))
                .map(|(_, n)| n)
                .sum();
            max = max.max(in_window);
        }
        max
    };
    let (max_sent, max_committed) = (max_window(|w| w.0), max_window(|w| w.1));
    #[allow(clippy::cast_precision_loss)]
    let ingest_rate = BURST_EVENTS as f64 / burst_secs;
    println!(
        "spike: {BURST_EVENTS} events accepted in {burst_secs:.2} s ({ingest_rate:.0} events/s, \
         {:.1}x the cap); queue depth after the burst {} visible + {} in flight; \
         store max {max_sent} events sent in any 1 s window (cap {CAP}), {max_committed} committed; \
         drained in {drain_secs:.1} s",
        ingest_rate / f64::from(CAP),
        peak_depth.visible,
        peak_depth.in_flight,
    );
    assert!(
        ingest_rate > f64::from(CAP) * 20.0,
        "the burst must reach 20x the cap"
    );
    assert!(
        max_sent <= usize::try_from(CAP + CAP / 20).unwrap(),
        "store was sent {max_sent} in 1 s"
    );
    assert_eq!(
        sink.inner.events_stored().await.unwrap(),
        BURST_EVENTS as u64,
        "nothing lost"
    );
    assert!(
        peak_depth.visible + peak_depth.in_flight > 0,
        "the queue absorbed the burst"
    );
}

/// A store that can be switched off (every write fails transiently) and on again.
#[derive(Debug)]
struct SwitchableSink {
    inner: SqliteSink,
    down: std::sync::atomic::AtomicBool,
    failed_writes: std::sync::atomic::AtomicUsize,
}

#[async_trait]
impl Sink for SwitchableSink {
    async fn write(&self, events: &[AdEvent]) -> Result<WriteReport, SinkError> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            self.failed_writes
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            return Err(SinkError::Unavailable {
                store: "test".into(),
                message: "switched off".into(),
            });
        }
        self.inner.write(events).await
    }

    async fn ping(&self) -> Result<(), SinkError> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(SinkError::Unavailable {
                store: "test".into(),
                message: "switched off".into(),
            });
        }
        self.inner.ping().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_longer_than_redrive_opens_the_breaker_and_sends_no_valid_message_to_the_dlq(
) {
    use shared::embedded::{QueueConfig, Subscription};
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(dir.path().join("broker.db")).unwrap();
    broker.declare_topic("t").await.unwrap();
    broker
        .declare_queue("q-dlq", QueueConfig::default())
        .await
        .unwrap();
    // Redrive after 3 receives with a 2 s visibility: an outage of 12 s is far longer than
    // max_receive_count × visibility, so without the breaker every message would be burned.
    let queue = QueueConfig {
        visibility_timeout: Duration::from_secs(2),
        max_receive_count: Some(3),
        dlq: Some("q-dlq".into()),
        ..QueueConfig::default()
    };
    broker.declare_queue("q", queue).await.unwrap();
    broker
        .subscribe(
            "t",
            "q",
            Subscription {
                filter_types: None,
                raw_delivery: true,
            },
        )
        .await
        .unwrap();
    let sink = Arc::new(SwitchableSink {
        inner: SqliteSink::open(dir.path().join("store.db")).unwrap(),
        down: std::sync::atomic::AtomicBool::new(true),
        failed_writes: std::sync::atomic::AtomicUsize::new(0),
    });
    let config = PollerConfig {
        visibility_timeout: Duration::from_secs(2),
        heartbeat_every: Duration::from_millis(700),
        max_batch_wait: Duration::from_millis(100),
        receive_wait: Duration::from_millis(500),
        max_events_per_sec: None,
        breaker: workers::breaker::BreakerConfig {
            failure_threshold: 2,
            cooldown: Duration::from_secs(1),
            max_cooldown: Duration::from_secs(2),
        },
        ..PollerConfig::default()
    };
    let poller = Poller::new(
        Arc::new(QueueSource::new(broker.clone(), "q")),
        sink.clone(),
        config,
    )
    .unwrap();
    let metrics = poller.metrics();
    let stop = CancellationToken::new();
    let workers = tokio::spawn(poller.run(stop.clone()));
    let app = spawn_ingest(
        Arc::new(TopicPublisher::new(broker.clone(), "t")),
        IngestConfig::default(),
    )
    .await
    .unwrap();
    let mut g = SyntheticEvents::new(9, 4);
    let events: Vec<Value> = (0..600).map(|_| g.event()).collect();
    for chunk in events.chunks(100) {
        assert_eq!(
            app.post_events().json(chunk).send().await.unwrap().status(),
            202
        );
    }
    tokio::time::sleep(Duration::from_secs(12)).await;
    let during = metrics.snapshot();
    let dlq_during = broker.queue_stats("q-dlq").await.unwrap();
    sink.down.store(false, std::sync::atomic::Ordering::SeqCst);

    let deadline = Instant::now() + Duration::from_secs(60);
    while sink.inner.events_stored().await.unwrap() < 600 {
        assert!(
            Instant::now() < deadline,
            "backlog not drained after the store came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.cancel();
    workers.await.unwrap();
    app.shutdown().await.unwrap();
    let dlq = broker.queue_stats("q-dlq").await.unwrap();
    println!(
        "outage: {} failed writes in 12 s, breaker opened {} times; DLQ during {} after {}",
        sink.failed_writes.load(std::sync::atomic::Ordering::SeqCst),
        during.breaker_opened,
        dlq_during.visible + dlq_during.in_flight,
        dlq.visible + dlq.in_flight,
    );
    assert!(
        during.breaker_opened >= 1,
        "the breaker opened during the outage"
    );
    assert_eq!(
        dlq.visible + dlq.in_flight + dlq.delayed,
        0,
        "no valid message reached the DLQ"
    );
    assert_eq!(sink.inner.events_stored().await.unwrap(), 600);
    let rollup_events: i64 = sink
        .inner
        .rollups()
        .await
        .unwrap()
        .iter()
        .map(|r| r.events)
        .sum();
    assert_eq!(rollup_events, 600);
}
