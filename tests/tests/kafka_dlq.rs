//! `spillway dlq` on a Kafka DLQ topic (librdkafka's mock cluster): a filtered replay moves
//! exactly the matching letters to the main topic, a rerun resends nothing (the replay group
//! remembers what it moved, even past the letters it skipped), and a poison event a worker
//! dead-lettered is re-ingested once the cause is fixed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{json, Value};
use shared::dlq::inspect::Filter;
use shared::dlq::replay::{export, replay, ReplayOptions, Target};
use shared::dlq::{DlqBroker, ATTR_REPLAY_COUNT};
use shared::event::AdEvent;
use shared::kafka::dlq::KafkaDlq;
use shared::kafka::{KafkaClientConfig, KafkaSource};
use shared::sink::{Sink, SinkError, WriteReport};
use shared::sqlite_sink::SqliteSink;
use shared::synthetic::SyntheticEvents;
use shared::Source;
use tests::checker::check;
use tests::dlq::{dead_letters, event_id, json_of, run_dlq, EVEN_ADVERTISER};
use tests::kafka::{
    committed_metadata, consumer_config, mock_cluster, produce_to, read_topic, ReadMessage,
    DLQ_TOPIC, TOPIC,
};
use tests::sqlite_view::SqliteStoreView;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use workers::{Poller, PollerConfig};

fn kafka_args(bootstrap: &str) -> Vec<String> {
    ["--broker", "kafka", "--kafka-bootstrap-servers", bootstrap]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
}

fn dlq(bootstrap: &str, rest: &[&str]) -> Value {
    let mut args: Vec<&str> = rest.to_vec();
    let k = kafka_args(bootstrap);
    args.extend(k.iter().map(String::as_str));
    json_of(&run_dlq(&args, &[]).unwrap()).unwrap()
}

async fn read(bootstrap: &str, topic: &'static str, n: usize) -> Vec<ReadMessage> {
    let b = bootstrap.to_owned();
    tokio::task::spawn_blocking(move || read_topic(&b, topic, 1, n, Duration::from_secs(20)))
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_replay_moves_the_matching_letters_once_and_a_rerun_resends_nothing() {
    let mock = mock_cluster(1).unwrap();
    let bootstrap = mock.bootstrap_servers().to_owned();
    let port = KafkaDlq::new(
        KafkaClientConfig::new(&bootstrap),
        "replay",
        Some(TOPIC.to_owned()),
    )
    .unwrap();
    let letters = dead_letters(200, 4, None);
    let out = port.publish(DLQ_TOPIC, &letters).await.unwrap();
    assert!(out.failed.is_empty());

    let stats = dlq(
        &bootstrap,
        &["stats", "--json", "--kafka-replay-group", "replay"],
    );
    println!("before: {stats}");
    let peek = port.peek(DLQ_TOPIC, 5).await.unwrap();
    assert_eq!(peek.len(), 5);
    assert_eq!(
        port.stats(DLQ_TOPIC).await.unwrap().visible,
        200,
        "peek consumed nothing"
    );

    // Export without --delete: every letter in the file, nothing moved.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dlq.ndjson");
    let export = dlq(
        &bootstrap,
        &[
            "export",
            "--out",
            file.to_str().unwrap(),
            "--json",
            "--kafka-replay-group",
            "replay",
        ],
    );
    println!("export: {export}");
    let lines = std::fs::read_to_string(&file).unwrap();
    assert_eq!(lines.lines().count(), 200, "{export}");
    assert_eq!(
        port.stats(DLQ_TOPIC).await.unwrap().visible,
        200,
        "export moved nothing"
    );

    let replay = [
        "replay",
        "--to",
        "source",
        "--advertiser",
        EVEN_ADVERTISER,
        "--json",
        "--kafka-replay-group",
        "replay",
    ];
    let run = dlq(&bootstrap, &replay);
    println!("first run: {run}");
    assert_eq!(run["moved"], 100, "{run}");
    assert_eq!(run["skipped_by_filter"], 100, "{run}");
    let again = dlq(&bootstrap, &replay);
    println!("rerun: {again}");
    assert_eq!(again["moved"], 0, "a rerun resends nothing: {again}");
    assert_eq!(
        port.stats(DLQ_TOPIC).await.unwrap().visible,
        100,
        "the odd half waits"
    );

    let moved = read(&bootstrap, TOPIC, 100).await;
    let even: BTreeSet<String> = letters
        .iter()
        .step_by(2)
        .map(|m| event_id(&m.body))
        .collect();
    let got: BTreeSet<String> = moved.iter().map(|m| event_id(&m.payload)).collect();
    assert_eq!(got, even);
    assert!(moved.iter().all(|m| m.headers[ATTR_REPLAY_COUNT] == "1"));

    // The rest, unfiltered; then nothing is left.
    let mut all = replay.to_vec();
    all.retain(|a| *a != "--advertiser" && *a != EVEN_ADVERTISER);
    let run = dlq(&bootstrap, &all);
    assert_eq!(run["moved"], 100, "{run}");
    assert_eq!(dlq(&bootstrap, &all)["moved"], 0);
    assert_eq!(port.stats(DLQ_TOPIC).await.unwrap().visible, 0);
    let everything = read(&bootstrap, TOPIC, 200).await;
    let ids: BTreeSet<String> = everything.iter().map(|m| event_id(&m.payload)).collect();
    assert_eq!(ids.len(), 200, "each letter on the main topic once");

    // `spillway stats` counts what is left to replay, as `spillway dlq stats` does; the topic
    // still keeps the 200 letters.
    let data_dir = tempfile::tempdir().unwrap();
    // A store to read (stats reads the workers' store and refuses one that is not there).
    shared::SqliteSink::open(data_dir.path().join(shared::settings::STORE_DB)).unwrap();
    let out = std::process::Command::new(tests::dev_process::spillway_bin().unwrap())
        .args([
            "stats",
            "--json",
            "--broker",
            "kafka",
            "--kafka-bootstrap-servers",
        ])
        .arg(&bootstrap)
        .args(["--kafka-replay-group", "replay", "--data-dir"])
        .arg(data_dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (&stats["dlq_depth"], &stats["dlq_letters"]),
        (&json!(0), &json!(200)),
        "{stats}"
    );
}

/// A mock cluster whose DLQ topic holds 20 letters, after which its next `n` requests of
/// kind `api` fail with `error`; and a DLQ port on it replaying in `group`.
async fn twenty_letters_then_failing(
    group: &str,
    api: rdkafka::types::RDKafkaApiKey,
    error: rdkafka::types::RDKafkaRespErr,
    n: usize,
) -> (shared::kafka::mock::MockKafka, KafkaDlq) {
    let mock = mock_cluster(1).unwrap();
    let port = KafkaDlq::new(
        KafkaClientConfig::new(mock.bootstrap_servers()),
        group,
        None,
    )
    .unwrap();
    let letters = dead_letters(20, 2, None);
    assert!(port
        .publish(DLQ_TOPIC, &letters)
        .await
        .unwrap()
        .failed
        .is_empty());
    mock.fail_requests(api, vec![error; n]).unwrap();
    (mock, port)
}

/// The replay producer ignored the producer flags (it ran on the defaults): with the main
/// topic refusing every produce, a replay waited the default 10 s delivery timeout whatever
/// `--kafka-delivery-timeout-ms` said. It now produces with the operator's flags, as ingest
/// does, and a refused send leaves its letter in the DLQ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_produces_with_the_delivery_timeout_it_was_given() {
    // Every produce after the 20 letters is refused with a retriable error.
    let (mock, port) = twenty_letters_then_failing(
        "replay",
        rdkafka::types::RDKafkaApiKey::Produce,
        rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
        20_000,
    )
    .await;
    let bootstrap = mock.bootstrap_servers().to_owned();

    let started = Instant::now();
    let mut args = vec![
        "replay",
        "--to",
        "source",
        "--json",
        "--kafka-replay-group",
        "replay",
        "--kafka-delivery-timeout-ms",
        "1000",
    ];
    let k = kafka_args(&bootstrap);
    args.extend(k.iter().map(String::as_str));
    let out = run_dlq(&args, &[]).unwrap();
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("replay took {took:?}: {stdout}\n{stderr}");
    let report: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["moved"], 0, "{report}");
    assert!(
        took < Duration::from_secs(7),
        "the send gave up after {took:?}: not the 1 s delivery timeout given"
    );
    assert!(
        stderr.contains("timed out") || stdout.contains("timed out"),
        "the refusal says the delivery timed out: {stdout}\n{stderr}"
    );
    assert_eq!(port.stats(DLQ_TOPIC).await.unwrap().visible, 20);
}

/// A DLQ topic that sends nothing for a while (a partition without a leader, a broker
/// restarting) used to end a replay as finished: an empty lease ends a run, so the report
/// said nothing was left to do and had no error, while letters were still unread. The lease
/// now fails, saying which partitions were not read to their end, and once the topic answers
/// again the letters are there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dlq_topic_that_stops_sending_fails_the_lease_instead_of_ending_the_run() {
    let (_mock, port) = twenty_letters_then_failing(
        "stall",
        rdkafka::types::RDKafkaApiKey::Fetch,
        rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
        30,
    )
    .await;
    let err = port
        .lease(DLQ_TOPIC, 10, Duration::from_secs(60))
        .await
        .unwrap_err()
        .to_string();
    println!("stalled lease: {err}");
    assert!(
        err.contains("no letter arrived for 5 s before the end of this run's window"),
        "{err}"
    );
    // The errors run out; the letters were never lost.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut leased = 0;
    while leased < 20 && Instant::now() < deadline {
        if let Ok(batch) = port.lease(DLQ_TOPIC, 10, Duration::from_secs(60)).await {
            leased += batch.len();
        }
    }
    assert_eq!(leased, 20);
}

/// A letter whose payload is not UTF-8 (a producer's Latin-1, say) can only be read lossily;
/// replaying or exporting that copy would launder the bad bytes into U+FFFD and delete the
/// original. Both leave it in the DLQ, bytes intact, and say why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_letter_that_is_not_utf8_is_neither_replayed_nor_exported_and_keeps_its_bytes() {
    let mock = mock_cluster(1).unwrap();
    let bootstrap = mock.bootstrap_servers().to_owned();
    let port = KafkaDlq::new(
        KafkaClientConfig::new(&bootstrap),
        "replay",
        Some(TOPIC.to_owned()),
    )
    .unwrap();
    let latin1 = b"{\"v\":1,\"events\":[{\"city\":\"Montr\xe9al\"}]}".to_vec();
    produce_to(&bootstrap, DLQ_TOPIC, 0, std::slice::from_ref(&latin1))
        .await
        .unwrap();
    let letters = dead_letters(4, 3, None);
    assert!(port
        .publish(DLQ_TOPIC, &letters)
        .await
        .unwrap()
        .failed
        .is_empty());
    let peeked = port.peek(DLQ_TOPIC, 1).await.unwrap();
    let why = peeked[0].body_error.clone().unwrap();
    assert!(why.contains("not UTF-8"), "{why}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dlq.ndjson");
    let export = dlq(
        &bootstrap,
        &[
            "export",
            "--out",
            file.to_str().unwrap(),
            "--delete",
            "--json",
            "--kafka-replay-group",
            "replay",
        ],
    );
    println!("export: {export}");
    assert_eq!(
        (&export["exported"], &export["left_unreadable"]),
        (&json!(4), &json!(1)),
        "{export}"
    );
    assert!(
        export["unreadable_reason"]
            .as_str()
            .unwrap()
            .contains("not UTF-8"),
        "{export}"
    );
    let replay = dlq(
        &bootstrap,
        &[
            "replay",
            "--to",
            "source",
            "--json",
            "--kafka-replay-group",
            "replay",
        ],
    );
    println!("replay: {replay}");
    assert_eq!(
        (&replay["moved"], &replay["refused_unreadable"]),
        (&json!(0), &json!(1)),
        "{replay}"
    );
    assert_eq!(port.stats(DLQ_TOPIC).await.unwrap().visible, 1);
    let still = read(&bootstrap, DLQ_TOPIC, 5).await;
    assert_eq!(still[0].payload_bytes, latin1, "its bytes are untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_that_leaves_every_other_letter_keeps_the_commit_metadata_under_kafkas_limit() {
    let mock = mock_cluster(1).unwrap();
    let bootstrap = mock.bootstrap_servers().to_owned();
    let port = KafkaDlq::new(
        KafkaClientConfig::new(&bootstrap),
        "replay",
        Some(TOPIC.to_owned()),
    )
    .unwrap();
    // 3,000 letters, the filter takes every other one: moving the 1,500 even ones past the
    // first odd one would need about 7,000 bytes of metadata; Kafka keeps 4,096.
    let letters = dead_letters(3_000, 11, None);
    for chunk in letters.chunks(500) {
        assert!(port
            .publish(DLQ_TOPIC, chunk)
            .await
            .unwrap()
            .failed
            .is_empty());
    }
    let target = Target::Queue(TOPIC.to_owned());
    let even = ReplayOptions {
        filter: Filter {
            advertisers: vec![EVEN_ADVERTISER.to_owned()],
            ..Filter::default()
        },
        concurrency: 4,
        ..ReplayOptions::default()
    };
    let run = |opts: ReplayOptions| {
        let port = KafkaDlq::new(
            KafkaClientConfig::new(&bootstrap),
            "replay",
            Some(TOPIC.to_owned()),
        )
        .unwrap();
        let target = target.clone();
        async move {
            replay(&port, DLQ_TOPIC, &target, &opts, None)
                .await
                .unwrap()
        }
    };
    let metadata = || {
        let b = bootstrap.clone();
        tokio::task::spawn_blocking(move || committed_metadata(&b, "replay", DLQ_TOPIC, 1))
    };

    let first = run(even.clone()).await;
    println!("first run: {:?}", first.counts);
    assert_eq!(first.error, None);
    let committed = metadata().await.unwrap().unwrap();
    let (position, text) = &committed[&0];
    assert_eq!(*position, 1, "the first odd letter holds the position");
    assert!(text.len() <= 4_000, "{} bytes of metadata", text.len());
    let c = &first.counts;
    assert!(
        c.moved > 100,
        "it moved letters past the first odd one: {c:?}"
    );
    // Letters read before the partition filled up are counted as left; how many more were
    // read by then depends on timing (moves complete concurrently), and what comes after is
    // not read in this run at all (it failed here once under load: 702 + 548 of 2,500 read).
    assert!(c.moved + c.left_by_broker_limit <= 1_500, "{c:?}");
    assert!(c.left_by_broker_limit > 0, "{c:?}");
    assert!(first.refusals[0].reason.contains("offset 1"), "{first:?}");

    // A rerun with the same filter resends nothing (and cannot move more past offset 1).
    let again = run(even.clone()).await;
    assert_eq!(again.error, None);
    assert_eq!(again.counts.moved, 0, "{:?}", again.counts);
    // Nor does `export --delete`: what it could not record stays out of the file.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("even.ndjson");
    let export_port = KafkaDlq::new(
        KafkaClientConfig::new(&bootstrap),
        "replay",
        Some(TOPIC.to_owned()),
    )
    .unwrap();
    let exported = export(&export_port, DLQ_TOPIC, &file, true, &even, None)
        .await
        .unwrap();
    assert_eq!(
        (exported.exported, exported.deleted),
        (0, 0),
        "{exported:?}"
    );
    assert!(exported.left_by_broker_limit > 0, "{exported:?}");
    let (_, text) = &metadata().await.unwrap().unwrap()[&0];
    assert!(text.len() <= 4_000, "{} bytes of metadata", text.len());
    // Without the filter the position moves on, and the rest follows; then nothing is left.
    let mut moved = first.counts.moved;
    for _ in 0..10 {
        let r = run(ReplayOptions {
            concurrency: 4,
            ..ReplayOptions::default()
        })
        .await;
        assert_eq!(r.error, None);
        let (_, text) = &metadata().await.unwrap().unwrap()[&0];
        assert!(text.len() <= 4_000, "{} bytes of metadata", text.len());
        moved += r.counts.moved;
        if r.counts.moved == 0 {
            break;
        }
    }
    assert_eq!(moved, 3_000);
    assert_eq!(port.stats(DLQ_TOPIC).await.unwrap().visible, 0);
    let everything = read(&bootstrap, TOPIC, 3_000).await;
    let ids: BTreeSet<String> = everything.iter().map(|m| event_id(&m.payload)).collect();
    assert_eq!(ids.len(), 3_000, "each letter on the main topic once");
}

/// A store with a bug: it refuses, permanently, every event of one advertiser.
#[derive(Debug)]
struct RefusesAdvertiser {
    inner: SqliteSink,
    advertiser: String,
}

#[async_trait]
impl Sink for RefusesAdvertiser {
    async fn write(&self, events: &[AdEvent]) -> Result<WriteReport, SinkError> {
        if events
            .iter()
            .any(|e| e.advertiser_id.as_str() == self.advertiser)
        {
            return Err(SinkError::Rejected {
                store: "buggy".into(),
                message: format!("cannot store advertiser {}", self.advertiser),
            });
        }
        self.inner.write(events).await
    }

    async fn ping(&self) -> Result<(), SinkError> {
        self.inner.ping().await
    }
}

async fn run_until_stored(bootstrap: &str, store_path: &Path, sink: Arc<dyn Sink>, n: u64) {
    let source = Arc::new(KafkaSource::new(&consumer_config(bootstrap, "workers")).unwrap());
    let poller = Poller::new(
        source as Arc<dyn Source>,
        sink,
        PollerConfig {
            receive_wait: Duration::from_secs(1),
            max_batch_wait: Duration::from_millis(100),
            max_events_per_sec: None,
            ..PollerConfig::default()
        },
    )
    .unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(poller.run(stop.clone()));
    let store = SqliteSink::open(store_path).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while store.events_stored().await.unwrap() < n {
        assert!(
            Instant::now() < deadline,
            "stored {}",
            store.events_stored().await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let the batch that dead-letters settle before stopping.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lettered_event_is_re_ingested_from_the_dlq_topic_once_the_cause_is_fixed() {
    let mock = mock_cluster(1).unwrap();
    let bootstrap = mock.bootstrap_servers().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let store_path = dir.path().join("store.db");
    let mut g = SyntheticEvents::new(12, 3);
    let mut events: Vec<Value> = (0..6).map(|_| g.event()).collect();
    events[5]["advertiser_id"] = json!("adv-bug");
    let bodies: Vec<String> = events
        .iter()
        .map(|e| json!({"v": 1, "events": [e]}).to_string())
        .collect();
    produce_to(&bootstrap, TOPIC, 0, &bodies).await.unwrap();

    // The buggy store refuses one event: it goes to the DLQ topic, the rest is stored.
    let buggy = Arc::new(RefusesAdvertiser {
        inner: SqliteSink::open(&store_path).unwrap(),
        advertiser: "adv-bug".into(),
    });
    run_until_stored(&bootstrap, &store_path, buggy, 5).await;
    let letters = read(&bootstrap, DLQ_TOPIC, 1).await;
    assert_eq!(letters[0].headers["spillway-error-code"], "sink_rejected");

    // Fixed: replay the DLQ topic to the main topic, and the fixed worker stores it.
    let run = dlq(&bootstrap, &["replay", "--to", "source", "--json"]);
    assert_eq!(run["moved"], 1, "{run}");
    run_until_stored(
        &bootstrap,
        &store_path,
        Arc::new(SqliteSink::open(&store_path).unwrap()),
        6,
    )
    .await;
    let ids: Vec<Uuid> = events
        .iter()
        .map(|e| Uuid::parse_str(e["event_id"].as_str().unwrap()).unwrap())
        .collect();
    let report = check(&SqliteStoreView::new(&store_path), &ids, Some(&ids))
        .await
        .unwrap();
    assert!(report.is_clean(), "{report:?}");
}
