//! The Kafka transport end to end on librdkafka's mock cluster: HTTP → Kafka → a consumer group
//! of two workers → the SQLite store, and a poison message → the DLQ topic.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ingest_api::IngestConfig;
use serde_json::{json, Value};
use shared::envelope::{EnvelopeConfig, ATTR_PARTITION_KEY};
use shared::kafka::{KafkaPublisher, KafkaSource, HEADER_ORIGINAL_OFFSET, HEADER_ORIGINAL_TOPIC};
use shared::source::{ATTR_ERROR_CODE, ATTR_ERROR_MESSAGE};
use shared::sqlite_sink::SqliteSink;
use shared::synthetic::SyntheticEvents;
use shared::{Sink, Source};
use tests::checker::check;
use tests::kafka::{
    committed_offsets, consumer_config, mock_cluster, produce_to, producer_config, read_topic,
    DLQ_TOPIC, TOPIC,
};
use tests::spawn_ingest;
use tests::sqlite_view::SqliteStoreView;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use workers::{Poller, PollerConfig};

/// A worker: a Kafka source in `group` drained by the poller into the store at `store`.
struct Worker {
    source: Arc<KafkaSource>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Worker {
    fn start(bootstrap: &str, group: &str, store: &Path) -> Self {
        let source = Arc::new(KafkaSource::new(&consumer_config(bootstrap, group)).unwrap());
        let sink: Arc<dyn Sink> = Arc::new(SqliteSink::open(store).unwrap());
        let config = PollerConfig {
            receive_wait: Duration::from_secs(1),
            max_batch_wait: Duration::from_millis(200),
            max_events_per_sec: None,
            ..PollerConfig::default()
        };
        let poller = Poller::new(source.clone() as Arc<dyn Source>, sink, config).unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(poller.run(stop.clone()));
        Self { source, stop, task }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap();
    }
}

async fn wait_stored(store: &SqliteSink, n: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let stored = store.events_stored().await.unwrap();
        if stored >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "stored {stored} of {n} within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ids_of(events: &[Value]) -> Vec<Uuid> {
    events
        .iter()
        .map(|e| Uuid::parse_str(e["event_id"].as_str().unwrap()).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_to_kafka_to_a_group_of_two_workers_stores_each_valid_unique_event_once() {
    let mock = mock_cluster(4).unwrap();
    let bootstrap = mock.bootstrap_servers().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let store_path = dir.path().join("store.db");
    let store = SqliteSink::open(&store_path).unwrap();

    let publisher = Arc::new(KafkaPublisher::new(&producer_config(&bootstrap)).unwrap());
    let app = spawn_ingest(
        publisher,
        IngestConfig {
            envelope: EnvelopeConfig {
                key_buckets: 32,
                ..EnvelopeConfig::default()
            },
            ..IngestConfig::default()
        },
    )
    .await
    .unwrap();
    let w1 = Worker::start(&bootstrap, "e2e", &store_path);
    let w2 = Worker::start(&bootstrap, "e2e", &store_path);

    let mut g = SyntheticEvents::new(21, 7);
    let valid: Vec<Value> = (0..2_000).map(|_| g.event()).collect();
    let mut rejected = 0;
    for (i, chunk) in valid.chunks(100).enumerate() {
        let mut body = chunk.to_vec();
        // A bad event and a duplicate inside the request.
        let mut bad = chunk[0].clone();
        bad["event_id"] = json!(format!("bad-{i}"));
        body.push(bad);
        body.push(chunk[1].clone());
        let sends = if i % 5 == 0 { 2 } else { 1 }; // a client resending a whole request
        for _ in 0..sends {
            let resp = app.post_events().json(&body).send().await.unwrap();
            assert_eq!(resp.status(), 202);
            let report: Value = resp.json().await.unwrap();
            rejected += report["rejected"].as_array().unwrap().len();
        }
    }
    assert_eq!(rejected, 24, "one bad event per request, resends included");

    wait_stored(&store, 2_000, Duration::from_secs(90)).await;
    // Let late duplicates, if any, land before counting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let p1 = w1.source.assigned_partitions();
    let p2 = w2.source.assigned_partitions();
    let ids = ids_of(&valid);
    let report = check(&SqliteStoreView::new(&store_path), &ids, Some(&ids))
        .await
        .unwrap();
    println!("two workers: partitions {p1:?} + {p2:?}; {report:?}");
    assert_eq!(report.lost, 0, "{report:?}");
    assert_eq!(report.unexpected, Some(0), "{report:?}");
    assert_eq!(report.duplicated, 0, "{report:?}");
    assert!(report.rollups_consistent, "{report:?}");
    assert_eq!(report.stored, 2_000);
    assert!(
        !p1.is_empty() && !p2.is_empty(),
        "both members of the group got partitions: {p1:?} / {p2:?}"
    );
    let all: BTreeSet<i32> = p1.iter().chain(&p2).copied().collect();
    assert_eq!(all, (0..4).collect(), "every partition is owned once");

    // Every valid event went out under its campaign's key: read the topic back.
    let messages = tokio::task::spawn_blocking({
        let b = bootstrap.clone();
        move || read_topic(&b, TOPIC, 4, 1, Duration::from_secs(10))
    })
    .await
    .unwrap()
    .unwrap();
    assert!(messages[0].headers.contains_key(ATTR_PARTITION_KEY));
    assert_eq!(
        messages[0].key.as_deref(),
        Some(messages[0].headers[ATTR_PARTITION_KEY].as_str())
    );

    // `spillway stats --broker kafka` sees the group caught up and the store full.
    let deadline = Instant::now() + Duration::from_secs(20);
    let stats = loop {
        let out = std::process::Command::new(tests::dev_process::spillway_bin().unwrap())
            .args(["stats", "--json", "--broker", "kafka"])
            .args([
                "--kafka-bootstrap-servers",
                &bootstrap,
                "--kafka-group",
                "e2e",
            ])
            .args(["--sink", "sqlite", "--sqlite-path"])
            .arg(&store_path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stats: Value = serde_json::from_slice(&out.stdout).unwrap();
        if stats["lag"] == 0 || Instant::now() > deadline {
            break stats;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(stats["lag"], 0, "{stats}");
    assert_eq!(stats["partitions"].as_array().unwrap().len(), 4, "{stats}");
    assert_eq!(stats["events_stored"], 2_000, "{stats}");
    assert_eq!(stats["dlq_depth"], 0, "{stats}");

    w1.stop().await;
    w2.stop().await;
    app.shutdown().await.unwrap();
}

/// A worker whose DLQ topic does not exist (a typo in `--kafka-dlq-topic`, or a cluster that
/// creates no topics on demand) used to start: each poison message's letter then failed and
/// was retried every few seconds for good, holding its partition's committed offset and
/// stalling a receive loop for the delivery timeout each time. It is refused at start,
/// naming the topic and the flag; so is a missing `--topic`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_topic_or_dlq_topic_does_not_exist_is_refused_at_start() {
    let mock = mock_cluster(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let run = |topic: &str, dlq: &str| {
        let out = std::process::Command::new(tests::pipeline::binary("spillway-worker").unwrap())
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--broker", "kafka", "--kafka-bootstrap-servers"])
            .arg(mock.bootstrap_servers())
            .args([
                "--topic",
                topic,
                "--kafka-dlq-topic",
                dlq,
                "--sink",
                "sqlite",
            ])
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stderr) = run(TOPIC, "events-dlg");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(r#"topic "events-dlg" (--kafka-dlq-topic) does not exist on the cluster"#),
        "{stderr}"
    );
    let (code, stderr) = run("evnets", DLQ_TOPIC);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(r#"topic "evnets" (--topic) does not exist"#),
        "{stderr}"
    );
}

/// Runs `bin` with `args` against a mock cluster that refuses the first producer id asked for
/// (fatal to an idempotent producer), and returns its stderr once it has exited with 1.
async fn exit_of_a_process_whose_producer_is_refused(bin: &str, args: &[&str]) -> String {
    exit_of_a_process_refused(
        rdkafka::types::RDKafkaApiKey::InitProducerId,
        rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_CLUSTER_AUTHORIZATION_FAILED,
        bin,
        args,
    )
    .await
}

/// Runs `bin` with `args` against a mock cluster that answers the first `request` with
/// `error`, and returns its stderr once it has exited with 1.
async fn exit_of_a_process_refused(
    request: rdkafka::types::RDKafkaApiKey,
    error: rdkafka::types::RDKafkaRespErr,
    bin: &str,
    args: &[&str],
) -> String {
    let mock = mock_cluster(1).unwrap();
    mock.fail_requests(request, vec![error]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(tests::pipeline::binary(bin).unwrap())
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--broker", "kafka", "--kafka-bootstrap-servers"])
        .arg(mock.bootstrap_servers())
        .args(args)
        .env("SPILLWAY_LOG_FORMAT", "text")
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("{bin} still running 30 s after its producer id was refused");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{bin}: {stderr}");
    stderr
}

/// Not ready was not enough: nothing restarts a pod that is only out of its Service, so
/// `spillway-ingest` stayed up answering 503 until someone restarted it by hand (and every
/// replica meets the same refusal). It now stops and exits with an error once its producer
/// is in the fatal state, so its supervisor starts a new process with a new producer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spillway_ingest_exits_with_an_error_once_its_producer_is_in_a_fatal_state() {
    let stderr = exit_of_a_process_whose_producer_is_refused(
        "spillway-ingest",
        &["--topic", TOPIC, "--listen", "127.0.0.1:0"],
    )
    .await;
    assert!(
        stderr.contains("Kafka producer hit a fatal error"),
        "{stderr}"
    );
}

/// The same for a worker whose DLQ producer is in the fatal state: no letter could be sent
/// again, so a poison message held its partition, retried for good, with the worker alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spillway_worker_exits_with_an_error_once_its_dlq_producer_is_in_a_fatal_state() {
    let stderr = exit_of_a_process_whose_producer_is_refused(
        "spillway-worker",
        &[
            "--topic",
            TOPIC,
            "--kafka-group",
            "fatal",
            "--sink",
            "sqlite",
        ],
    )
    .await;
    assert!(
        stderr.contains("Kafka DLQ producer hit a fatal error"),
        "{stderr}"
    );
}

/// A worker fenced out of its group (static membership: another member joined with the same
/// `group.instance.id`) has a consumer in librdkafka's fatal state: it receives nothing again.
/// It used to idle on, alive and ready, its partitions unread; it now exits with an error
/// naming the likely cause, so its supervisor restarts it and an operator sees why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spillway_worker_exits_with_an_error_once_its_consumer_is_fenced() {
    let stderr = exit_of_a_process_refused(
        rdkafka::types::RDKafkaApiKey::JoinGroup,
        rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_FENCED_INSTANCE_ID,
        "spillway-worker",
        &[
            "--topic",
            TOPIC,
            "--kafka-group",
            "fenced",
            "--kafka-config",
            "group.instance.id=worker-1",
            "--sink",
            "sqlite",
        ],
    )
    .await;
    assert!(
        stderr.contains("Kafka consumer hit a fatal error") && stderr.contains("group.instance.id"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_goes_to_the_dlq_topic_with_its_reason_and_origin_and_the_offset_moves_on()
{
    let mock = mock_cluster(1).unwrap();
    let bootstrap = mock.bootstrap_servers().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let store_path = dir.path().join("store.db");
    let store = SqliteSink::open(&store_path).unwrap();

    let mut g = SyntheticEvents::new(5, 3);
    let good: Vec<Value> = (0..4).map(|_| g.event()).collect();
    let mut bad = g.event();
    bad["event_id"] = json!("nope");
    let bodies = [
        "this is not an envelope".to_owned(),
        json!({"v": 1, "events": [good[0], bad]}).to_string(),
        json!({"v": 1, "events": [good[1], good[2], good[3]]}).to_string(),
    ];
    // A valid envelope but for one Latin-1 byte in an attribute value: read lossily, it
    // would be stored with U+FFFD in place of the byte.
    let mut latin1 = g.event();
    latin1["attributes"] = json!({"city": "Montr@al"});
    let text = json!({"v": 1, "events": [latin1]}).to_string();
    let (head, tail) = text.split_once("Montr@al").unwrap();
    let latin1 = [head.as_bytes(), b"Montr\xe9al", tail.as_bytes()].concat();
    let mut payloads: Vec<Vec<u8>> = bodies.iter().map(|b| b.clone().into_bytes()).collect();
    payloads.push(latin1.clone());
    produce_to(&bootstrap, TOPIC, 0, &payloads).await.unwrap();

    let w = Worker::start(&bootstrap, "poison", &store_path);
    wait_stored(&store, 4, Duration::from_secs(60)).await;

    // The offset moved past the poison and the split-out bad event.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let b = bootstrap.clone();
        let committed =
            tokio::task::spawn_blocking(move || committed_offsets(&b, "poison", TOPIC, 1))
                .await
                .unwrap()
                .unwrap();
        if committed.get(&0) == Some(&4) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "committed {committed:?}, want partition 0 at 4"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let letters = tokio::task::spawn_blocking({
        let b = bootstrap.clone();
        move || read_topic(&b, DLQ_TOPIC, 1, 3, Duration::from_secs(20))
    })
    .await
    .unwrap()
    .unwrap();
    let by_offset: BTreeMap<String, _> = letters
        .iter()
        .map(|m| (m.headers[HEADER_ORIGINAL_OFFSET].clone(), m))
        .collect();
    let poison = by_offset["0"];
    assert_eq!(poison.payload, bodies[0], "the poison travels unchanged");
    assert_eq!(poison.headers[ATTR_ERROR_CODE], "undecodable");
    assert!(!poison.headers[ATTR_ERROR_MESSAGE].is_empty());
    assert_eq!(poison.headers[HEADER_ORIGINAL_TOPIC], TOPIC);
    assert_eq!(poison.headers["spillway-original-partition"], "0");
    let split = by_offset["1"];
    assert_eq!(split.headers[ATTR_ERROR_CODE], "invalid_event");
    assert!(
        split.payload.contains("\"nope\""),
        "only the bad event is in the letter: {}",
        split.payload
    );
    assert!(!split
        .payload
        .contains(good[0]["event_id"].as_str().unwrap()));
    let unreadable = by_offset["3"];
    assert_eq!(
        unreadable.payload_bytes, latin1,
        "the bytes travel unchanged"
    );
    assert_eq!(unreadable.headers[ATTR_ERROR_CODE], "undecodable");
    assert!(
        unreadable.headers[ATTR_ERROR_MESSAGE].contains("not UTF-8"),
        "{:?}",
        unreadable.headers
    );

    let ids = ids_of(&good);
    let report = check(&SqliteStoreView::new(&store_path), &ids, Some(&ids))
        .await
        .unwrap();
    assert!(report.is_clean(), "{report:?}");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spillway_dev_on_kafka_without_bootstrap_servers_runs_on_an_in_process_mock_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let dev = tests::dev_process::DevProcess::start(
        dir.path(),
        &[
            "--broker",
            "kafka",
            "--receive-wait-secs",
            "1",
            "--batch-max-wait-ms",
            "200",
        ],
    )
    .unwrap();
    let client = reqwest::Client::new();
    let mut g = SyntheticEvents::new(9, 4);
    let events: Vec<Value> = (0..300).map(|_| g.event()).collect();
    for chunk in events.chunks(100) {
        let resp = client
            .post(dev.events_url())
            .bearer_auth(&dev.key)
            .json(&chunk)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202, "{}", resp.text().await.unwrap());
    }
    let store = SqliteSink::open(dir.path().join("store.db")).unwrap();
    wait_stored(&store, 300, Duration::from_secs(60)).await;
    let status = dev.terminate(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "{status:?}");
    let ids = ids_of(&events);
    let report = check(
        &SqliteStoreView::new(dir.path().join("store.db")),
        &ids,
        Some(&ids),
    )
    .await
    .unwrap();
    assert!(report.is_clean(), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_answers_503_while_kafka_is_down_and_202_once_it_is_back() {
    let mock = mock_cluster(1).unwrap();
    let bootstrap = mock.bootstrap_servers().to_owned();
    let mut config = producer_config(&bootstrap);
    config.delivery_timeout = Duration::from_secs(2);
    let publisher = Arc::new(KafkaPublisher::new(&config).unwrap());
    let app = spawn_ingest(
        publisher,
        IngestConfig {
            publish_attempts: 2,
            publish_backoff: Duration::from_millis(50),
            // One envelope per request, so the topic holds one message per 202.
            envelope: EnvelopeConfig {
                split_by_type: false,
                ..EnvelopeConfig::default()
            },
            ..IngestConfig::default()
        },
    )
    .await
    .unwrap();
    let mut g = SyntheticEvents::new(31, 2);
    let first: Vec<Value> = (0..10).map(|_| g.event()).collect();
    let resp = app.post_events().json(&first).send().await.unwrap();
    assert_eq!(resp.status(), 202);

    mock.broker_down(1).unwrap();
    let second: Vec<Value> = (0..10).map(|_| g.event()).collect();
    let started = Instant::now();
    let resp = app.post_events().json(&second).send().await.unwrap();
    assert_eq!(
        resp.status(),
        503,
        "no delivery report, no 2xx: {}",
        resp.text().await.unwrap()
    );
    println!("503 after {:?} with the broker down", started.elapsed());

    mock.broker_up(1).unwrap();
    // The client retries the same request: safe, event_id is the idempotency key.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let resp = app.post_events().json(&second).send().await.unwrap();
        if resp.status() == 202 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still {} after the broker came back",
            resp.status()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let messages = tokio::task::spawn_blocking({
        let b = bootstrap.clone();
        move || read_topic(&b, TOPIC, 1, 2, Duration::from_secs(20))
    })
    .await
    .unwrap()
    .unwrap();
    let published: String = messages.iter().map(|m| m.payload.as_str()).collect();
    for e in first.iter().chain(&second) {
        assert!(published.contains(e["event_id"].as_str().unwrap()));
    }
    app.shutdown().await.unwrap();
}

/// An idempotent producer whose producer id the cluster refuses is in librdkafka's fatal
/// state: every publish fails from then on, for good. `/readyz` only fetched metadata, which
/// still answered, so the pod stayed ready, answering 503 to everything, and nothing
/// replaced it. It is not ready now, and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_in_a_fatal_state_makes_ingest_not_ready() {
    let mock = mock_cluster(1).unwrap();
    mock.fail_requests(
        rdkafka::types::RDKafkaApiKey::InitProducerId,
        vec![rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_CLUSTER_AUTHORIZATION_FAILED],
    )
    .unwrap();
    let publisher =
        Arc::new(KafkaPublisher::new(&producer_config(mock.bootstrap_servers())).unwrap());
    let app = spawn_ingest(publisher.clone(), IngestConfig::default())
        .await
        .unwrap();
    let mut g = SyntheticEvents::new(41, 3);
    let resp = app.post_events().json(&g.event()).send().await.unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    let deadline = Instant::now() + Duration::from_secs(10);
    let reason = loop {
        match shared::Publisher::ready(publisher.as_ref()).await {
            Err(e) if e.to_string().contains("fatal error") => break e.to_string(),
            outcome => assert!(
                Instant::now() < deadline,
                "still {outcome:?} 10 s after the producer id was refused"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(reason.contains("restart"), "{reason}");
    // Past the 2 s readiness cache, the endpoint says the same.
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let ready = app
        .client
        .get(format!("http://{}/readyz", app.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    app.shutdown().await.unwrap();
}
