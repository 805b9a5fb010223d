//! The poller runtime over the real SQS source, against LocalStack: redrive of transient
//! failures after `maxReceiveCount` with growing delays, permanent failures dead-lettered on
//! the first receive with their reason, the visibility heartbeat of a long batch, SIGTERM of
//! `spillway-worker` during a drain, and the request-efficiency figure (API calls per event).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use ingest_api::IngestConfig;
use serde_json::{json, Value};
use shared::aws::sns::{SnsConfig, SnsPublisher};
use shared::aws::sqs::{SqsConfig, SqsSource};
use shared::event::{AdEvent, EventId};
use shared::source::{
    DeadLetter, Delivery, DeliveryId, Source, SourceError, ATTR_ERROR_CODE, ATTR_ERROR_MESSAGE,
};
use shared::sqlite_sink::SqliteSink;
use shared::synthetic::SyntheticEvents;
use shared::{Sink, SinkError, WriteReport};
use tests::localstack::{self, create_queue, create_topology, queue_depth};
use tokio_util::sync::CancellationToken;
use workers::breaker::BreakerConfig;
use workers::{CoreConfig, Poller, PollerConfig};

fn events(seed: u64, n: usize) -> Vec<Value> {
    let mut g = SyntheticEvents::new(seed, 5);
    (0..n).map(|_| g.event()).collect()
}

fn id_of(event: &Value) -> EventId {
    EventId::parse(event["event_id"].as_str().unwrap()).unwrap()
}

fn ids_of(events: &[Value]) -> Vec<EventId> {
    events.iter().map(id_of).collect()
}

/// A raw-delivery envelope body holding `events`.
fn envelope(events: &[Value]) -> String {
    json!({"v": 1, "events": events}).to_string()
}

fn sqs_source(config: &aws_config::SdkConfig, queue_url: &str, dlq_url: &str) -> SqsSource {
    SqsSource::new(
        shared::aws::sqs_client(config),
        SqsConfig {
            queue_url: queue_url.to_owned(),
            dlq_url: Some(dlq_url.to_owned()),
        },
    )
}

/// What the poller did through the source: every receive (message id, receive count, when)
/// and every retry-later (message id, delay), forwarded to the real SQS source.
#[derive(Debug)]
struct RecordingSource {
    inner: SqsSource,
    receipts: Mutex<BTreeMap<DeliveryId, String>>,
    receives: Mutex<Vec<(String, u32, Instant)>>,
    retries: Mutex<Vec<(String, Duration)>>,
    extends: AtomicUsize,
}

impl RecordingSource {
    fn new(inner: SqsSource) -> Self {
        Self {
            inner,
            receipts: Mutex::default(),
            receives: Mutex::default(),
            retries: Mutex::default(),
            extends: AtomicUsize::new(0),
        }
    }

    /// Receives of one message, with their receive counts and times.
    fn receives_of(&self, message_id: &str) -> Vec<(u32, Instant)> {
        self.receives
            .lock()
            .unwrap()
            .iter()
            .filter(|(m, _, _)| m == message_id)
            .map(|(_, n, at)| (*n, *at))
            .collect()
    }

    fn retries_of(&self, message_id: &str) -> Vec<Duration> {
        self.retries
            .lock()
            .unwrap()
            .iter()
            .filter(|(m, _)| m == message_id)
            .map(|(_, d)| *d)
            .collect()
    }
}

#[async_trait]
impl Source for RecordingSource {
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, SourceError> {
        let got = self.inner.receive(max, wait).await?;
        let now = Instant::now();
        for d in &got {
            self.receipts
                .lock()
                .unwrap()
                .insert(d.id.clone(), d.message_id.clone());
            self.receives
                .lock()
                .unwrap()
                .push((d.message_id.clone(), d.receive_count, now));
        }
        Ok(got)
    }

    async fn ack(&self, ids: &[DeliveryId]) -> Result<(), SourceError> {
        self.inner.ack(ids).await
    }

    async fn retry_later(&self, items: &[(DeliveryId, Duration)]) -> Result<(), SourceError> {
        {
            let receipts = self.receipts.lock().unwrap();
            let mut retries = self.retries.lock().unwrap();
            for (id, delay) in items {
                retries.push((receipts.get(id).cloned().unwrap_or_default(), *delay));
            }
        }
        self.inner.retry_later(items).await
    }

    async fn extend(&self, ids: &[DeliveryId], by: Duration) -> Result<(), SourceError> {
        self.extends.fetch_add(1, Ordering::SeqCst);
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

/// A store that fails transiently whenever a write holds one given event, after writing the
/// others (so they are stored, and count as duplicates when redelivered).
#[derive(Debug)]
struct FailsForOneEvent {
    inner: Arc<SqliteSink>,
    poison: EventId,
    failures: Mutex<Vec<Instant>>,
}

#[async_trait]
impl Sink for FailsForOneEvent {
    async fn write(&self, events: &[AdEvent]) -> Result<WriteReport, SinkError> {
        if !events.iter().any(|e| e.event_id == self.poison) {
            return self.inner.write(events).await;
        }
        let others: Vec<AdEvent> = events
            .iter()
            .filter(|e| e.event_id != self.poison)
            .cloned()
            .collect();
        if !others.is_empty() {
            self.inner.write(&others).await?;
        }
        self.failures.lock().unwrap().push(Instant::now());
        Err(SinkError::Unavailable {
            store: "test".into(),
            message: format!("row of {} is locked", self.poison),
        })
    }

    async fn ping(&self) -> Result<(), SinkError> {
        self.inner.ping().await
    }
}

/// A store whose every write takes `delay` first.
#[derive(Debug)]
struct SlowSink {
    inner: Arc<SqliteSink>,
    delay: Duration,
    writes: AtomicUsize,
}

#[async_trait]
impl Sink for SlowSink {
    async fn write(&self, events: &[AdEvent]) -> Result<WriteReport, SinkError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        self.inner.write(events).await
    }

    async fn ping(&self) -> Result<(), SinkError> {
        self.inner.ping().await
    }
}

/// Receives from a DLQ until `want` messages arrived or `timeout` passed, without deleting.
async fn dlq_messages(dlq: &SqsSource, want: usize, timeout: Duration) -> Vec<(Delivery, Instant)> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    while got.len() < want && Instant::now() < deadline {
        for d in dlq.receive(10, Duration::from_secs(1)).await.unwrap() {
            got.push((d, Instant::now()));
        }
    }
    got
}

fn test_poller_config() -> PollerConfig {
    PollerConfig {
        loops: 1,
        receive_wait: Duration::from_secs(1),
        max_batch_wait: Duration::from_millis(200),
        max_events_per_sec: None,
        core: CoreConfig {
            min_retry_delay: Duration::from_secs(1),
            retry_jitter: 0.0,
            ..CoreConfig::default()
        },
        ..PollerConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_failure_reaches_the_dlq_after_max_receives_with_growing_delays() {
    if !localstack::available().await {
        return;
    }
    let config = localstack::sdk_config().await;
    let sqs = shared::aws::sqs_client(&config);
    let name = format!("spillway-test-redrive-{}", localstack::suffix());
    let (queue_url, _, dlq_url) = create_queue(&sqs, &name, 30, 3).await.unwrap();

    // One envelope holds the event the store keeps failing on, with two good ones; three
    // more envelopes are good.
    let poison_envelope = events(11, 3);
    let good: Vec<Vec<Value>> = (0..3).map(|i| events(20 + i, 3)).collect();
    let poison = id_of(&poison_envelope[0]);
    let poison_body = envelope(&poison_envelope);
    let poison_message_id = sqs
        .send_message()
        .queue_url(&queue_url)
        .message_body(&poison_body)
        .send()
        .await
        .unwrap()
        .message_id()
        .unwrap()
        .to_owned();
    for g in &good {
        sqs.send_message()
            .queue_url(&queue_url)
            .message_body(envelope(g))
            .send()
            .await
            .unwrap();
    }

    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteSink::open(dir.path().join("store.db")).unwrap());
    let sink = Arc::new(FailsForOneEvent {
        inner: store.clone(),
        poison,
        failures: Mutex::default(),
    });
    let source = Arc::new(RecordingSource::new(sqs_source(
        &config, &queue_url, &dlq_url,
    )));
    let poller_config = PollerConfig {
        // One message per batch: the failing message does not drag others with it.
        receive_max_messages: 1,
        max_batch_messages: 1,
        // A low threshold: this one message's failures open the breaker; its probe finds the
        // store answering and only this message failing, so it closes again and the message
        // goes on to its DLQ (it used to stall here, the probe failing on the same events).
        breaker: BreakerConfig {
            failure_threshold: 2,
            cooldown: Duration::from_secs(1),
            max_cooldown: Duration::from_secs(2),
        },
        ..test_poller_config()
    };
    let poller = Poller::new(source.clone(), sink.clone(), poller_config).unwrap();
    let metrics = poller.metrics();
    let stop = CancellationToken::new();
    let worker = tokio::spawn(poller.run(stop.clone()));

    let dlq = SqsSource::new(
        sqs.clone(),
        SqsConfig {
            queue_url: dlq_url.clone(),
            dlq_url: None,
        },
    );
    let dead = dlq_messages(&dlq, 1, Duration::from_secs(40)).await;
    // Any further receive would show a second letter or a 4th attempt.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), worker)
        .await
        .unwrap()
        .unwrap();

    assert_eq!(dead.len(), 1, "the failing message reached the DLQ");
    let (letter, dead_at) = &dead[0];
    assert_eq!(
        letter.body, poison_body,
        "SQS redrive moves the message as is"
    );
    assert_eq!(letter.message_id, poison_message_id);
    assert!(
        !letter.attributes.contains_key(ATTR_ERROR_CODE),
        "redriven by SQS, not dead-lettered by the worker"
    );

    let receives = source.receives_of(&poison_message_id);
    let counts: Vec<u32> = receives.iter().map(|(n, _)| *n).collect();
    assert_eq!(counts, vec![1, 2, 3], "received maxReceiveCount times");
    let failures = sink.failures.lock().unwrap().clone();
    let opened = usize::try_from(metrics.snapshot().breaker_opened).unwrap();
    assert!(opened >= 1, "this message's failures opened the breaker");
    assert_eq!(
        failures.len(),
        3 + opened,
        "one failed write per receive, and one per breaker probe"
    );
    assert_eq!(
        source.retries_of(&poison_message_id),
        vec![
            Duration::from_secs(1),
            Duration::from_secs(2),
            Duration::from_secs(4)
        ],
        "the delay doubles per receive"
    );
    let gaps: Vec<Duration> = receives
        .windows(2)
        .map(|w| w[1].1 - w[0].1)
        .chain(std::iter::once(*dead_at - receives[2].1))
        .collect();
    eprintln!(
        "receive gaps of the failing message: {gaps:?} (the last one: until it reached the DLQ)"
    );
    for (gap, delay) in gaps.iter().zip([1.0, 2.0, 4.0]) {
        assert!(
            gap.as_secs_f64() >= delay - 0.2,
            "hidden for its delay: {gaps:?}"
        );
        assert!(
            gap.as_secs_f64() < delay + 3.0,
            "back soon after its delay: {gaps:?}"
        );
    }

    let mut stored = ids_of(&poison_envelope[1..]);
    for g in &good {
        stored.extend(ids_of(g));
    }
    assert_eq!(store.count_ids(&stored).await.unwrap(), stored.len());
    assert_eq!(store.count_ids(&[poison]).await.unwrap(), 0);
    assert_eq!(store.events_stored().await.unwrap(), stored.len() as u64);
    assert_eq!(queue_depth(&sqs, &queue_url).await.unwrap(), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failures_reach_the_dlq_on_the_first_receive_with_their_reason() {
    if !localstack::available().await {
        return;
    }
    let config = localstack::sdk_config().await;
    let sqs = shared::aws::sqs_client(&config);
    let name = format!("spillway-test-perm-{}", localstack::suffix());
    let (queue_url, _, dlq_url) = create_queue(&sqs, &name, 30, 3).await.unwrap();

    let undecodable = "{\"v\":1,\"events\":[oops";
    sqs.send_message()
        .queue_url(&queue_url)
        .message_body(undecodable)
        .send()
        .await
        .unwrap();
    let mut mixed = events(31, 3);
    mixed[1]["currency"] = json!("usd");
    let bad_id = mixed[1]["event_id"].as_str().unwrap().to_owned();
    sqs.send_message()
        .queue_url(&queue_url)
        .message_body(envelope(&mixed))
        .send()
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteSink::open(dir.path().join("store.db")).unwrap());
    let source = Arc::new(RecordingSource::new(sqs_source(
        &config, &queue_url, &dlq_url,
    )));
    let poller = Poller::new(source.clone(), store.clone(), test_poller_config()).unwrap();
    let stop = CancellationToken::new();
    let worker = tokio::spawn(poller.run(stop.clone()));
    let dlq = SqsSource::new(
        sqs.clone(),
        SqsConfig {
            queue_url: dlq_url.clone(),
            dlq_url: None,
        },
    );
    let dead = dlq_messages(&dlq, 2, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), worker)
        .await
        .unwrap()
        .unwrap();

    assert_eq!(dead.len(), 2, "both failures reached the DLQ");
    let by_code: BTreeMap<String, &Delivery> = dead
        .iter()
        .map(|(d, _)| (d.attributes[ATTR_ERROR_CODE].clone(), d))
        .collect();
    let letter = by_code["undecodable"];
    assert_eq!(letter.body, undecodable);
    assert!(!letter.attributes[ATTR_ERROR_MESSAGE].is_empty());
    let letter = by_code["invalid_event"];
    let split: Value = serde_json::from_str(&letter.body).unwrap();
    assert_eq!(
        split["events"].as_array().unwrap().len(),
        1,
        "split out alone"
    );
    assert_eq!(split["events"][0]["event_id"], bad_id.as_str());
    assert!(
        letter.attributes[ATTR_ERROR_MESSAGE].contains("currency"),
        "{:?}",
        letter.attributes
    );

    let receives = source.receives.lock().unwrap().clone();
    assert_eq!(
        receives.len(),
        2,
        "each message received once: {receives:?}"
    );
    assert!(receives.iter().all(|(_, n, _)| *n == 1));
    assert!(source.retries.lock().unwrap().is_empty(), "nothing retried");
    let good = [id_of(&mixed[0]), id_of(&mixed[2])];
    assert_eq!(
        store.count_ids(&good).await.unwrap(),
        2,
        "the good events are written"
    );
    assert_eq!(store.events_stored().await.unwrap(), 2);
    assert_eq!(queue_depth(&sqs, &queue_url).await.unwrap(), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_running_three_visibility_timeouts_is_not_redelivered() {
    if !localstack::available().await {
        return;
    }
    let config = localstack::sdk_config().await;
    let sqs = shared::aws::sqs_client(&config);
    let name = format!("spillway-test-beat-{}", localstack::suffix());
    let (queue_url, _, dlq_url) = create_queue(&sqs, &name, 2, 5).await.unwrap();
    let batch = events(41, 5);
    let message_id = sqs
        .send_message()
        .queue_url(&queue_url)
        .message_body(envelope(&batch))
        .send()
        .await
        .unwrap()
        .message_id()
        .unwrap()
        .to_owned();

    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteSink::open(dir.path().join("store.db")).unwrap());
    let sink = Arc::new(SlowSink {
        inner: store.clone(),
        delay: Duration::from_secs(6),
        writes: AtomicUsize::new(0),
    });
    let source = Arc::new(RecordingSource::new(sqs_source(
        &config, &queue_url, &dlq_url,
    )));
    let poller_config = PollerConfig {
        // A second loop keeps polling while the first one writes: it would get a redelivery.
        loops: 2,
        visibility_timeout: Duration::from_secs(2),
        heartbeat_every: Duration::from_secs(1),
        ..test_poller_config()
    };
    let poller = Poller::new(source.clone(), sink.clone(), poller_config).unwrap();
    let metrics = poller.metrics();
    let stop = CancellationToken::new();
    let worker = tokio::spawn(poller.run(stop.clone()));
    let deadline = Instant::now() + Duration::from_secs(30);
    while metrics.snapshot().acked < 1 {
        assert!(Instant::now() < deadline, "the batch was not settled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A lapse would have shown as a second receive during the write; wait past one more
    // visibility timeout to see none after it either.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), worker)
        .await
        .unwrap()
        .unwrap();

    assert_eq!(
        source.receives_of(&message_id).len(),
        1,
        "never redelivered while it ran"
    );
    assert_eq!(sink.writes.load(Ordering::SeqCst), 1, "written once");
    let extends = source.extends.load(Ordering::SeqCst);
    assert!(extends >= 4, "heartbeats every second: {extends}");
    assert_eq!(store.count_ids(&ids_of(&batch)).await.unwrap(), 5);
    let m = metrics.snapshot();
    assert_eq!((m.written, m.duplicates), (5, 0));
    assert_eq!(queue_depth(&sqs, &queue_url).await.unwrap(), (0, 0));
}

/// `spillway-worker --broker aws …` as a child process, its logs in a file.
#[derive(Debug)]
struct WorkerProcess {
    child: Child,
}

impl WorkerProcess {
    fn start(data_dir: &Path, queue_url: &str, dlq_url: &str, log: &Path, extra: &[&str]) -> Self {
        let bin = tests::dev_process::bin_dir()
            .unwrap()
            .join("spillway-worker");
        assert!(
            bin.exists(),
            "{} is missing: run `cargo build --workspace --bins` (make test does)",
            bin.display()
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(bin)
            .args(["--broker", "aws", "--sink", "sqlite"])
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--queue-url", queue_url, "--dlq-url", dlq_url])
            .args(["--receive-wait-secs", "1"])
            .args(extra)
            .env("AWS_ENDPOINT_URL", localstack::endpoint())
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("SPILLWAY_LOG_FORMAT", "text")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Self { child }
    }

    /// SIGTERM, then waits up to `timeout`; `None` when it did not exit in time.
    fn terminate(&mut self, timeout: Duration) -> Option<(ExitStatus, Duration)> {
        let sent = Instant::now();
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -TERM failed");
        while sent.elapsed() < timeout {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some((status, sent.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_drain_loses_and_doubles_nothing() {
    if !localstack::available().await {
        return;
    }
    const EVENTS: usize = 3_000;
    let config = localstack::sdk_config().await;
    let topo = create_topology(&config, true, 10, 5).await.unwrap();
    let sqs = shared::aws::sqs_client(&config);
    let publisher = Arc::new(SnsPublisher::new(
        shared::aws::sns_client(&config),
        SnsConfig::new(&topo.topic_arn),
    ));
    let app = tests::spawn_ingest(publisher, IngestConfig::default())
        .await
        .unwrap();
    let posted = events(51, EVENTS);
    for chunk in posted.chunks(100) {
        let resp = app.post_events().json(chunk).send().await.unwrap();
        assert_eq!(resp.status(), 202);
    }
    app.shutdown().await.unwrap();
    let ids = ids_of(&posted);

    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("worker.log");
    let store_path = dir.path().join("store.db");
    let watch = SqliteSink::open(&store_path).unwrap();
    // A write cap and small batches slow the drain down so that SIGTERM lands in its middle.
    let mut worker = WorkerProcess::start(
        dir.path(),
        &topo.queue_url,
        &topo.dlq_url,
        &log,
        &[
            "--write-cap-eps",
            "400",
            "--write-burst",
            "100",
            "--batch-max-events",
            "200",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while watch.events_stored().await.unwrap() < 400 {
        assert!(
            Instant::now() < deadline,
            "the worker did not start draining:\n{}",
            log_tail(&log)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, took) = worker
        .terminate(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("no exit within 20 s of SIGTERM:\n{}", log_tail(&log)));
    assert!(
        status.success(),
        "exit status {status}:\n{}",
        log_tail(&log)
    );
    let at_stop = watch.events_stored().await.unwrap();
    let (visible, in_flight) = queue_depth(&sqs, &topo.queue_url).await.unwrap();
    eprintln!(
        "SIGTERM: exit 0 after {took:?}; {at_stop} of {EVENTS} events stored; queue: {visible} visible, {in_flight} in flight"
    );
    assert!(
        (at_stop as usize) < EVENTS,
        "SIGTERM came after the drain ended; nothing was shown"
    );
    drop(worker);

    let mut worker = WorkerProcess::start(dir.path(), &topo.queue_url, &topo.dlq_url, &log, &[]);
    let deadline = Instant::now() + Duration::from_secs(45);
    while watch.events_stored().await.unwrap() < EVENTS as u64 {
        assert!(
            Instant::now() < deadline,
            "the restarted worker did not finish the drain:\n{}",
            log_tail(&log)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Let a stray redelivery show up as a double count; there must be none.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, _) = worker
        .terminate(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("no exit within 20 s of SIGTERM:\n{}", log_tail(&log)));
    assert!(status.success(), "exit status {status}");

    assert_eq!(
        watch.count_ids(&ids).await.unwrap(),
        EVENTS,
        "every event stored"
    );
    assert_eq!(
        watch.events_stored().await.unwrap(),
        EVENTS as u64,
        "and nothing else"
    );
    let rollup_events: i64 = watch
        .rollups()
        .await
        .unwrap()
        .iter()
        .map(|r| r.events)
        .sum();
    assert_eq!(rollup_events, EVENTS as i64, "each event counted once");
    assert_eq!(queue_depth(&sqs, &topo.queue_url).await.unwrap(), (0, 0));
    assert_eq!(queue_depth(&sqs, &topo.dlq_url).await.unwrap(), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_events_take_a_few_thousand_sns_and_sqs_calls() {
    if !localstack::available().await {
        return;
    }
    const EVENTS: usize = 20_000;
    const PER_POST: usize = 100;
    let config = localstack::sdk_config().await;
    let topo = create_topology(&config, true, 30, 5).await.unwrap();
    let publisher = Arc::new(SnsPublisher::new(
        shared::aws::sns_client(&config),
        SnsConfig::new(&topo.topic_arn),
    ));
    let source = Arc::new(sqs_source(&config, &topo.queue_url, &topo.dlq_url));
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteSink::open(dir.path().join("store.db")).unwrap());
    let poller = Poller::new(
        source.clone(),
        store.clone(),
        PollerConfig {
            receive_wait: Duration::from_secs(1),
            max_events_per_sec: None,
            ..PollerConfig::default()
        },
    )
    .unwrap();
    let stop = CancellationToken::new();
    let worker = tokio::spawn(poller.run(stop.clone()));
    let app = tests::spawn_ingest(publisher.clone(), IngestConfig::default())
        .await
        .unwrap();

    let posted = events(61, EVENTS);
    let bytes: usize = posted.iter().map(|e| e.to_string().len()).sum();
    let started = Instant::now();
    for chunk in posted.chunks(PER_POST) {
        let resp = app.post_events().json(chunk).send().await.unwrap();
        assert_eq!(resp.status(), 202);
    }
    let deadline = Instant::now() + Duration::from_secs(50);
    while store.events_stored().await.unwrap() < EVENTS as u64 {
        assert!(Instant::now() < deadline, "events did not reach the store");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let elapsed = started.elapsed();
    // Counted before shutdown; the idle long polls after the drain are not per-event work.
    let sns = publisher.calls();
    let sqs = source.calls();
    stop.cancel();
    worker.await.unwrap();
    app.shutdown().await.unwrap();

    let total = sns.total() + sqs.total();
    #[allow(clippy::cast_precision_loss)]
    let per_million = total as f64 * 1_000_000.0 / EVENTS as f64;
    let naive = 3.0 * 1_000_000.0;
    eprintln!(
        "{EVENTS} events of {} bytes on average, {PER_POST} per POST, drained in {elapsed:?}",
        bytes / EVENTS
    );
    eprintln!("SNS calls: {:?}", sns.0);
    eprintln!("SQS calls: {:?}", sqs.0);
    eprintln!(
        "{total} calls = {per_million:.0} per 1,000,000 events vs {naive:.0} one-call-per-event ({:.0}x fewer)",
        naive / per_million
    );
    assert_eq!(store.events_stored().await.unwrap(), EVENTS as u64);
    assert_eq!(
        sns.get("PublishBatch"),
        (EVENTS / PER_POST) as u64,
        "one PublishBatch per POST"
    );
    assert!(
        sqs.get("DeleteMessageBatch") < sqs.get("ReceiveMessage"),
        "deletes are batched"
    );
    #[allow(clippy::cast_precision_loss)]
    let per_event = total as f64 / EVENTS as f64;
    assert!(per_event < 0.1, "{per_event} API calls per event");
}
