//! The compiled `spillway-worker` run as a Lambda function against the Runtime API emulator:
//! real SQS batches in, the exact `batchItemFailures` out; permanent failures in a real DLQ
//! (LocalStack); a transient store failure made real by a PostgreSQL row lock; a store
//! outage longer than the queue's redrive allows, with the records requeued instead.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, Message, MessageAttributeValue, MessageSystemAttributeName,
};
use serde_json::{json, Value};
use shared::envelope::{ContentEncoding, EnvelopeConfig, PackedEvent, Packer};
use shared::synthetic::SyntheticEvents;
use shared::{AdEvent, PostgresConfig, PostgresSink, SystemClock, ValidationPolicy};
use tests::checker::{check, PostgresStoreView};
use tests::dev_process::bin_dir;
use tests::lambda_emulator::{LambdaFunction, Outcome, RuntimeApi};
use tests::lambda_events::{sns_notification, sqs_event, sqs_record};
use tests::localstack;
use tests::postgres::{connect, PrivatePostgres, TestDb};

const POISON: &str = "{\"v\":1,\"events\":[{\"event_id\": 42"; // cut short: not JSON

fn worker_bin() -> PathBuf {
    let path = bin_dir().unwrap().join("spillway-worker");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --bins` (make test does)",
        path.display()
    );
    path
}

fn events(seed: u64, n: usize) -> Vec<AdEvent> {
    let mut g = SyntheticEvents::new(seed, 3);
    (0..n)
        .map(|_| {
            AdEvent::from_json(g.event(), &ValidationPolicy::structural(), &SystemClock).unwrap()
        })
        .collect()
}

/// One envelope (body, attributes) of `events`, identity or zstd.
fn envelope(events: &[AdEvent], zstd: bool) -> (String, BTreeMap<String, String>) {
    let packed: Vec<_> = events
        .iter()
        .map(|e| PackedEvent::new(e).unwrap())
        .collect();
    let cfg = EnvelopeConfig {
        split_by_type: false,
        encoding: if zstd {
            ContentEncoding::Zstd
        } else {
            ContentEncoding::Identity
        },
        ..EnvelopeConfig::default()
    };
    let env = Packer::new(cfg).pack("acme", &packed).unwrap().remove(0);
    (env.body, env.attributes)
}

/// Ten message bodies: raw envelopes, SNS-wrapped ones (one zstd), the poison record at 3.
/// Returns (body, attributes, events) per record.
fn ten_messages(seed: u64) -> Vec<(String, BTreeMap<String, String>, Vec<AdEvent>)> {
    (0..10_u64)
        .map(|i| {
            let evs = events(seed + i, 3);
            if i == 3 {
                return (POISON.to_owned(), BTreeMap::new(), Vec::new());
            }
            let (body, attrs) = envelope(&evs, i == 7);
            if i % 2 == 1 {
                // SNS-wrapped: the attributes travel inside the notification.
                (sns_notification(&body, &attrs), BTreeMap::new(), evs)
            } else {
                (body, attrs, evs)
            }
        })
        .collect()
}

/// Holds a row lock on `event_id` in `ad_events` (an uncommitted insert): the worker's
/// insert of that event waits on it until the statement timeout, a transient failure.
async fn lock_event(db: &TestDb, event_id: &str) -> tokio_postgres::Client {
    let client = connect(&db.url).await.unwrap();
    client.batch_execute("BEGIN").await.unwrap();
    client
        .execute(
            "INSERT INTO ad_events (event_id, type, occurred_at, advertiser_id, campaign_id, ad_id, cost_micros) \
             VALUES ($1::text::uuid, 'click', now(), 'lock', 'lock', 'lock', 0)",
            &[&event_id],
        )
        .await
        .unwrap();
    client
}

async fn stored_ids(db: &TestDb) -> BTreeSet<String> {
    let client = connect(&db.url).await.unwrap();
    client
        .query("SELECT event_id::text FROM ad_events", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect()
}

async fn migrated(db: &TestDb) {
    PostgresSink::new(&PostgresConfig::new(db.url.clone()))
        .unwrap()
        .migrate()
        .await
        .unwrap();
}

fn failure_ids(response: &Value) -> Vec<String> {
    response["batchItemFailures"]
        .as_array()
        .expect("batchItemFailures")
        .iter()
        .map(|f| f["itemIdentifier"].as_str().unwrap().to_owned())
        .collect()
}

/// Sends each (body, attributes) to the queue as the topic's subscription would.
async fn send_all(
    sqs: &aws_sdk_sqs::Client,
    queue_url: &str,
    messages: &[(String, BTreeMap<String, String>, Vec<AdEvent>)],
) {
    for (i, (body, attrs, _)) in messages.iter().enumerate() {
        let mut send = sqs.send_message().queue_url(queue_url).message_body(body);
        for (k, v) in attrs {
            send = send.message_attributes(
                k,
                MessageAttributeValue::builder()
                    .data_type("String")
                    .string_value(v)
                    .build()
                    .unwrap(),
            );
        }
        let id = send.send().await.unwrap().message_id().unwrap().to_owned();
        assert!(!id.is_empty(), "message {i}");
    }
}

/// Receives up to ten messages as an event source mapping does (system and message
/// attributes), waiting up to `wait_secs`, hidden for `visibility_secs`.
async fn receive(
    sqs: &aws_sdk_sqs::Client,
    queue_url: &str,
    wait_secs: i32,
    visibility_secs: i32,
) -> Vec<Message> {
    sqs.receive_message()
        .queue_url(queue_url)
        .max_number_of_messages(10)
        .wait_time_seconds(wait_secs)
        .visibility_timeout(visibility_secs)
        .message_system_attribute_names(MessageSystemAttributeName::All)
        .message_attribute_names("All")
        .send()
        .await
        .unwrap()
        .messages()
        .to_vec()
}

/// A received message as the SQS record an event source mapping hands the function.
fn to_record(m: &Message, queue_arn: &str) -> Value {
    let attrs: BTreeMap<String, String> = m
        .message_attributes()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| v.string_value().map(|s| (k.clone(), s.to_owned())))
        .collect();
    let mut r = sqs_record(m.message_id().unwrap(), m.body().unwrap(), &attrs, 1);
    r["receiptHandle"] = json!(m.receipt_handle().unwrap());
    r["eventSourceARN"] = json!(queue_arn);
    let system: serde_json::Map<String, Value> = m
        .attributes()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.as_str().to_owned(), json!(v)))
        .collect();
    r["attributes"] = Value::Object(system);
    r
}

/// Deletes the received messages not in `failures` (the event source mapping's job).
async fn delete_successes(
    sqs: &aws_sdk_sqs::Client,
    queue_url: &str,
    received: &[Message],
    failures: &[String],
) {
    let entries: Vec<_> = received
        .iter()
        .filter(|m| !failures.contains(&m.message_id().unwrap().to_owned()))
        .enumerate()
        .map(|(i, m)| {
            DeleteMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(m.receipt_handle().unwrap())
                .build()
                .unwrap()
        })
        .collect();
    for chunk in entries.chunks(10) {
        let deleted = sqs
            .delete_message_batch()
            .queue_url(queue_url)
            .set_entries(Some(chunk.to_vec()))
            .send()
            .await
            .unwrap();
        assert!(deleted.failed().is_empty());
    }
}

/// Invokes the function with `event` (30 s to run) and returns its answer.
async fn answer(api: &RuntimeApi, event: &Value) -> Value {
    api.invoke(event, Duration::from_secs(30))
        .await
        .unwrap()
        .response()
        .unwrap()
}

/// Starts the worker as a Lambda function with `env` and waits until it asks for work.
async fn start_ready(api: &RuntimeApi, env: &[(&str, &str)]) -> LambdaFunction {
    let mut f = LambdaFunction::start(&worker_bin(), api, env).unwrap();
    f.wait_ready(api, Duration::from_secs(30)).await.unwrap();
    f
}

/// Starts the worker as a Lambda function on PostgreSQL with a 1 s statement timeout.
async fn start_worker(api: &RuntimeApi, db: &TestDb, dlq_url: &str) -> LambdaFunction {
    start_ready(
        api,
        &[
            ("SPILLWAY_SINK", "postgres"),
            ("DATABASE_URL", &db.url),
            ("SPILLWAY_PG_STATEMENT_TIMEOUT_SECS", "1"),
            ("SPILLWAY_DLQ_URL", dlq_url),
            ("SPILLWAY_BROKER", "aws"),
        ],
    )
    .await
}

#[tokio::test]
async fn a_batch_of_ten_with_a_poison_record_and_a_locked_row_reports_exactly_the_locked_record() {
    if !localstack::available().await {
        return;
    }
    let Some(db) = TestDb::create().await else {
        return;
    };
    migrated(&db).await;
    let sqs = aws_sdk_sqs::Client::new(&localstack::sdk_config().await);
    let name = format!("lambda-worker-{}", localstack::suffix());
    let (_queue, _arn, dlq_url) = localstack::create_queue(&sqs, &name, 30, 5).await.unwrap();

    let messages = ten_messages(1_000);
    let records: Vec<Value> = messages
        .iter()
        .enumerate()
        .map(|(i, (body, attrs, _))| sqs_record(&format!("msg-{i}"), body, attrs, 1))
        .collect();
    let locked = messages[6].2[1].event_id.to_string();
    let lock = lock_event(&db, &locked).await;

    let api = RuntimeApi::start("spillway-worker").await.unwrap();
    let mut worker = LambdaFunction::start_capturing(
        &worker_bin(),
        &api,
        &[
            ("SPILLWAY_SINK", "postgres"),
            ("DATABASE_URL", &db.url),
            ("SPILLWAY_PG_STATEMENT_TIMEOUT_SECS", "1"),
            ("SPILLWAY_DLQ_URL", &dlq_url),
            ("SPILLWAY_BROKER", "aws"),
            ("SPILLWAY_EMF_NAMESPACE", "SpillwayTest"),
        ],
    )
    .unwrap();
    worker
        .wait_ready(&api, Duration::from_secs(30))
        .await
        .unwrap();
    let out = answer(&api, &sqs_event(&records)).await;
    assert_eq!(
        out,
        json!({"batchItemFailures": [{"itemIdentifier": "msg-6"}]})
    );

    // Everything but record 6 (and the poison record) is stored; record 6's events are not.
    let stored = stored_ids(&db).await;
    for (i, (_, _, evs)) in messages.iter().enumerate() {
        for e in evs {
            let id = e.event_id.to_string();
            assert_eq!(stored.contains(&id), i != 6, "record {i}");
        }
    }
    // The poison record is in the DLQ with its reason, once.
    let dlq = sqs
        .receive_message()
        .queue_url(&dlq_url)
        .max_number_of_messages(10)
        .wait_time_seconds(2)
        .message_attribute_names("All")
        .send()
        .await
        .unwrap();
    let letters = dlq.messages();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].body(), Some(POISON));
    let code = letters[0].message_attributes().unwrap()["spillway-error-code"]
        .string_value()
        .unwrap();
    assert_eq!(code, "undecodable");

    // The lock goes away; the retried record is stored by the next invocation.
    lock.batch_execute("ROLLBACK").await.unwrap();
    let retry = sqs_event(&[sqs_record("msg-6", &messages[6].0, &messages[6].1, 2)]);
    let out = answer(&api, &retry).await;
    assert_eq!(out, json!({"batchItemFailures": []}));
    assert_eq!(stored_ids(&db).await.len(), 27);

    // One Embedded Metric Format line per invocation on stdout, as CloudWatch reads them.
    let emf = emf_lines(&worker).await;
    assert_eq!(emf.len(), 2, "{emf:?}");
    let metrics = &emf[0]["_aws"]["CloudWatchMetrics"][0];
    assert_eq!(metrics["Namespace"], "SpillwayTest");
    assert_eq!(metrics["Dimensions"], json!([["FunctionName"]]));
    assert_eq!(emf[0]["FunctionName"], "spillway-worker");
    let counts = |v: &Value| {
        workers::emf::METRICS.map(|k| {
            v[k].as_u64()
                .unwrap_or_else(|| panic!("{k} missing from {v}"))
        })
    };
    // 8 records of 3 events stored, the poison record dead-lettered, the locked one retried.
    assert_eq!(counts(&emf[0]), [10, 24, 0, 1, 1, 0, 0, 0, 1]);
    assert_eq!(counts(&emf[1]), [1, 3, 0, 0, 0, 0, 0, 0, 0]);
}

/// The Embedded Metric Format lines the function has written to stdout, parsed.
async fn emf_lines(f: &LambdaFunction) -> Vec<Value> {
    // The reader thread may still be a line behind the last answer.
    tokio::time::sleep(Duration::from_millis(200)).await;
    f.stdout_lines()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("_aws").is_some())
        .collect()
}

#[tokio::test]
async fn records_not_started_before_the_deadline_minus_the_margin_are_all_reported() {
    let dir = tempfile::tempdir().unwrap();
    let api = RuntimeApi::start("spillway-worker").await.unwrap();
    let _worker = start_ready(
        &api,
        &[
            ("SPILLWAY_SINK", "sqlite"),
            ("SPILLWAY_DATA_DIR", dir.path().to_str().unwrap()),
            ("SPILLWAY_LAMBDA_DEADLINE_MARGIN_MS", "2000"),
        ],
    )
    .await;
    let records: Vec<Value> = ten_messages(2_000)
        .iter()
        .enumerate()
        .map(|(i, (body, attrs, _))| sqs_record(&format!("late-{i}"), body, attrs, 1))
        .collect();
    // 1 s left is under the 2 s margin: nothing may start. Every record is retried, so the
    // invocation fails (an event source mapping without ReportBatchItemFailures would delete
    // a batch answered with a list of them).
    let out = api
        .invoke(&sqs_event(&records), Duration::from_secs(1))
        .await
        .unwrap();
    let Outcome::Error { body, .. } = out else {
        panic!("expected an invocation error, got {out:?}");
    };
    assert!(
        body["errorMessage"]
            .as_str()
            .is_some_and(|m| m.contains("all 10 record(s) are to be retried")),
        "{body}"
    );
    // With time to spare the same batch is stored; no DLQ is configured, so the poison record
    // is left to the queue's redrive policy.
    let out = answer(&api, &sqs_event(&records)).await;
    assert_eq!(failure_ids(&out), ["late-3"]);
}

#[tokio::test]
async fn a_worker_that_cannot_open_its_store_reports_an_init_error_and_exits() {
    let api = RuntimeApi::start("spillway-worker").await.unwrap();
    let mut worker = LambdaFunction::start(
        &worker_bin(),
        &api,
        &[
            ("SPILLWAY_SINK", "sqlite"),
            (
                "SPILLWAY_SQLITE_PATH",
                "/proc/spillway-no-such-dir/store.db",
            ),
        ],
    )
    .unwrap();
    let code = worker.wait_exit(Duration::from_secs(30)).await.unwrap();
    assert_ne!(code, Some(0));
    let (error_type, body) = api.init_error().expect("an /init/error report");
    assert_eq!(error_type.as_deref(), Some("Runtime.InitError"));
    assert!(
        body["errorMessage"]
            .as_str()
            .unwrap()
            .contains("opening the store"),
        "{body}"
    );
    assert_eq!(
        api.next_calls(),
        0,
        "no invocation is asked for after a failed init"
    );
}

#[tokio::test]
async fn an_event_that_is_not_an_sqs_batch_fails_the_invocation_and_the_function_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let api = RuntimeApi::start("spillway-worker").await.unwrap();
    let _worker = start_ready(&api, &[("SPILLWAY_DATA_DIR", dir.path().to_str().unwrap())]).await;
    let out = api
        .invoke(&json!({"Records": "nope"}), Duration::from_secs(10))
        .await
        .unwrap();
    assert!(matches!(out, Outcome::Error { .. }), "{out:?}");
    let (body, attrs, _) = &ten_messages(3_000)[0];
    let ok = api
        .invoke(
            &sqs_event(&[sqs_record("m-0", body, attrs, 1)]),
            Duration::from_secs(10),
        )
        .await
        .unwrap()
        .response()
        .unwrap();
    assert_eq!(ok, json!({"batchItemFailures": []}));
}

/// What an event source mapping does, with a real queue: receive, hand the batch to the
/// function, delete what it did not report. The messages left are exactly those reported.
#[tokio::test]
async fn the_failures_reported_for_a_real_sqs_batch_are_the_messages_left_in_the_queue() {
    if !localstack::available().await {
        return;
    }
    let Some(db) = TestDb::create().await else {
        return;
    };
    migrated(&db).await;
    let sqs = aws_sdk_sqs::Client::new(&localstack::sdk_config().await);
    let name = format!("lambda-esm-{}", localstack::suffix());
    let (queue_url, queue_arn, dlq_url) =
        localstack::create_queue(&sqs, &name, 3, 5).await.unwrap();
    let messages = ten_messages(4_000);
    send_all(&sqs, &queue_url, &messages).await;
    let locked = messages[2].2[0].event_id.to_string();
    let lock = lock_event(&db, &locked).await;

    // Receive the ten, as the event source mapping would, and turn them into an SqsEvent.
    let mut received = Vec::new();
    for _ in 0..20 {
        if received.len() >= 10 {
            break;
        }
        received.extend(receive(&sqs, &queue_url, 1, 8).await);
    }
    assert_eq!(received.len(), 10);
    let records: Vec<Value> = received.iter().map(|m| to_record(m, &queue_arn)).collect();
    let by_body: BTreeMap<&str, &str> = received
        .iter()
        .map(|m| (m.body().unwrap(), m.message_id().unwrap()))
        .collect();
    let locked_id = by_body[messages[2].0.as_str()].to_owned();

    let api = RuntimeApi::start("spillway-worker").await.unwrap();
    let _worker = start_worker(&api, &db, &dlq_url).await;
    let out = answer(&api, &sqs_event(&records)).await;
    let failures = failure_ids(&out);
    assert_eq!(failures, std::slice::from_ref(&locked_id));

    delete_successes(&sqs, &queue_url, &received, &failures).await;

    // The reported message comes back once its visibility lapses; nothing else is left.
    lock.batch_execute("ROLLBACK").await.unwrap();
    let mut left = Vec::new();
    for _ in 0..40 {
        let out = sqs
            .receive_message()
            .queue_url(&queue_url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .send()
            .await
            .unwrap();
        left.extend(
            out.messages()
                .iter()
                .map(|m| m.message_id().unwrap().to_owned()),
        );
        if !left.is_empty() {
            // Give stragglers a moment, then stop.
            let more = sqs
                .receive_message()
                .queue_url(&queue_url)
                .max_number_of_messages(10)
                .wait_time_seconds(1)
                .send()
                .await
                .unwrap();
            left.extend(
                more.messages()
                    .iter()
                    .map(|m| m.message_id().unwrap().to_owned()),
            );
            break;
        }
    }
    assert_eq!(left, [locked_id]);
    // The poison message went to the DLQ; the store holds every valid event but the locked
    // record's.
    let dlq_depth = localstack::queue_depth(&sqs, &dlq_url).await.unwrap();
    assert_eq!(dlq_depth.0, 1);
    let stored = stored_ids(&db).await;
    assert_eq!(stored.len(), 8 * 3);
    assert!(!stored.contains(&locked));
}

/// The most `spillway-requeues` among `received`.
fn most_requeues(received: &[Message]) -> u32 {
    received
        .iter()
        .filter_map(|m| m.message_attributes()?.get("spillway-requeues"))
        .filter_map(|v| v.string_value()?.parse().ok())
        .max()
        .unwrap_or(0)
}

/// One turn of an event source mapping: receive up to ten messages, hand them to the function
/// as an SQS event, delete what it did not report. Returns the messages received.
async fn esm_turn(
    sqs: &aws_sdk_sqs::Client,
    api: &RuntimeApi,
    queue_url: &str,
    queue_arn: &str,
    visibility_secs: i32,
) -> Vec<Message> {
    let received = receive(sqs, queue_url, 1, visibility_secs).await;
    if received.is_empty() {
        return received;
    }
    let records: Vec<Value> = received.iter().map(|m| to_record(m, queue_arn)).collect();
    let out = answer(api, &sqs_event(&records)).await;
    delete_successes(sqs, queue_url, &received, &failure_ids(&out)).await;
    received
}

/// A store outage three times longer than the queue's redrive policy allows (2 receives at
/// 1 s visibility), with the compiled worker behind an event source mapping's loop over a
/// real queue: the records the store holds back are requeued as new messages, so no valid
/// message reaches the DLQ (only the undecodable ones, dead-lettered by the worker with their
/// reason); once the store is back the queue drains and every event is stored once.
#[tokio::test]
async fn a_store_outage_longer_than_the_redrive_allows_sends_no_valid_message_to_the_dlq() {
    if !localstack::available().await {
        return;
    }
    let Some(pg) = PrivatePostgres::start() else {
        return;
    };
    PostgresSink::new(&PostgresConfig::new(pg.url()))
        .unwrap()
        .migrate()
        .await
        .unwrap();
    let sqs = aws_sdk_sqs::Client::new(&localstack::sdk_config().await);
    let name = format!("lambda-outage-{}", localstack::suffix());
    let (queue_url, queue_arn, dlq_url) =
        localstack::create_queue(&sqs, &name, 1, 2).await.unwrap();

    let before = ten_messages(5_000);
    let mut during = ten_messages(5_100);
    // A raw zstd envelope: its content-encoding attribute must survive the requeues.
    let evs = events(5_200, 3);
    let (body, attrs) = envelope(&evs, true);
    during.push((body, attrs, evs));
    let valid: Vec<uuid::Uuid> = before
        .iter()
        .chain(&during)
        .flat_map(|(_, _, evs)| evs.iter().map(|e| e.event_id.as_uuid()))
        .collect();

    let api = RuntimeApi::start("spillway-worker").await.unwrap();
    let _worker = start_ready(
        &api,
        &[
            ("SPILLWAY_SINK", "postgres"),
            ("DATABASE_URL", &pg.url()),
            ("SPILLWAY_MIGRATE", "false"),
            ("SPILLWAY_DLQ_URL", &dlq_url),
            ("SPILLWAY_QUEUE_URL", &queue_url),
            ("SPILLWAY_BROKER", "aws"),
            ("SPILLWAY_RETRY_MIN_SECS", "1"),
            ("SPILLWAY_RETRY_MAX_SECS", "2"),
        ],
    )
    .await;

    // The store takes a first batch, so the pool holds a connection the crash breaks.
    send_all(&sqs, &queue_url, &before).await;
    let mut turns = 0;
    while localstack::queue_total(&sqs, &queue_url).await.unwrap() > 0 {
        esm_turn(&sqs, &api, &queue_url, &queue_arn, 5).await;
        turns += 1;
        assert!(turns < 20, "the first batch did not drain");
    }

    pg.stop("immediate").unwrap();
    send_all(&sqs, &queue_url, &during).await;
    let outage = std::time::Instant::now();
    let (mut received, mut requeues) = (0, 0);
    while outage.elapsed() < Duration::from_secs(12) {
        let got = esm_turn(&sqs, &api, &queue_url, &queue_arn, 1).await;
        received += got.len();
        requeues = requeues.max(most_requeues(&got));
    }
    let dlq_during = localstack::queue_depth(&sqs, &dlq_url).await.unwrap();
    eprintln!(
        "outage of {:.1} s: {received} receives, messages requeued up to {requeues} times, DLQ {dlq_during:?}",
        outage.elapsed().as_secs_f64()
    );
    assert_eq!(
        dlq_during,
        (2, 0),
        "only the two undecodable messages are in the DLQ"
    );
    assert!(
        requeues >= 2,
        "held records were requeued again and again: {requeues}"
    );

    pg.start_again().unwrap();
    let recovered = std::time::Instant::now();
    while localstack::queue_total(&sqs, &queue_url).await.unwrap() > 0 {
        esm_turn(&sqs, &api, &queue_url, &queue_arn, 5).await;
        assert!(
            recovered.elapsed() < Duration::from_secs(60),
            "the backlog did not drain after recovery"
        );
    }
    eprintln!(
        "drained {:.1} s after recovery",
        recovered.elapsed().as_secs_f64()
    );
    let view = PostgresStoreView::connect(&pg.url()).await.unwrap();
    let report = check(&view, &valid, Some(&valid)).await.unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.stored, valid.len());
    assert_eq!(
        localstack::queue_depth(&sqs, &dlq_url).await.unwrap(),
        (2, 0)
    );
}
