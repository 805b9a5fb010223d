//! The AWS transport against a real LocalStack: HTTP → SNS → SQS, filter policies, raw and
//! SNS-wrapped bodies, dead-lettering with reasons, visibility backoff, and batch calls that
//! settle every chunk even when one entry fails.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ingest_api::IngestConfig;
use serde_json::Value;
use shared::aws::sns::{SnsConfig, SnsPublisher};
use shared::aws::sqs::{SqsConfig, SqsRequeue, SqsSource};
use shared::envelope::decode_message;
use shared::source::{
    DeadLetter, DeadLetterReason, Delivery, DeliveryId, Requeue, Requeued, Source, ATTR_ERROR_CODE,
};
use shared::synthetic::SyntheticEvents;
use tests::localstack::{self, create_queue, create_topology, queue_depth, queue_total, subscribe};
use tests::spawn_ingest;

/// Drains a queue until `want` events were seen or `timeout` passed; returns event ids,
/// acking everything received.
async fn drain_ids(source: &SqsSource, want: usize, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut ids = Vec::new();
    while ids.len() < want && Instant::now() < deadline {
        let batch = source.receive(10, Duration::from_secs(1)).await.unwrap();
        for d in &batch {
            let env = decode_message(
                &d.body,
                d.attributes.get("content-encoding").map(String::as_str),
            )
            .unwrap();
            for raw in env.events {
                let v: Value = serde_json::from_str(raw.get()).unwrap();
                ids.push(v["event_id"].as_str().unwrap().to_owned());
            }
        }
        let receipts: Vec<_> = batch.iter().map(|d| d.id.clone()).collect();
        source.ack(&receipts).await.unwrap();
    }
    ids
}

fn events(seed: u64, n: usize) -> Vec<Value> {
    let mut g = SyntheticEvents::new(seed, 5);
    (0..n).map(|_| g.event()).collect()
}

#[tokio::test]
async fn events_posted_over_http_arrive_once_in_the_subscribed_queue() {
    if !localstack::available().await {
        return;
    }
    let config = localstack::sdk_config().await;
    let topo = create_topology(&config, true, 30, 5).await.unwrap();
    let publisher = Arc::new(SnsPublisher::new(
        shared::aws::sns_client(&config),
        SnsConfig::new(&topo.topic_arn),
    ));
    let app = spawn_ingest(publisher, IngestConfig::default())
        .await
        .unwrap();
    let posted = events(1, 300);
    for chunk in posted.chunks(100) {
        let resp = app.post_events().json(chunk).send().await.unwrap();
        assert_eq!(resp.status(), 202);
    }
    let source = SqsSource::new(
        shared::aws::sqs_client(&config),
        SqsConfig {
            queue_url: topo.queue_url.clone(),
            dlq_url: Some(topo.dlq_url.clone()),
        },
    );
    let got = drain_ids(&source, 300, Duration::from_secs(60)).await;
    let want: BTreeSet<String> = posted
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(got.len(), 300, "every accepted event arrives exactly once");
    assert_eq!(got.into_iter().collect::<BTreeSet<_>>(), want);
    app.shutdown().await.unwrap();
}

/// A worker's heartbeat first extends a batch `--heartbeat-secs` after its receive, on the
/// assumption that the receive hid it for `--visibility-timeout-secs`. A queue created with a
/// shorter timeout must not hand the batch to another worker before that: the source asks
/// for the worker's timeout on every receive.
#[tokio::test]
async fn a_receive_hides_messages_for_the_workers_visibility_timeout_not_the_queues() {
    if !localstack::available().await {
        return;
    }
    let config = localstack::sdk_config().await;
    let sqs = shared::aws::sqs_client(&config);
    let name = format!("spillway-test-vis-{}", localstack::suffix());
    let (url, _, _) = create_queue(&sqs, &name, 1, 5).await.unwrap();
    let plain = SqsSource::new(
        sqs.clone(),
        SqsConfig {
            queue_url: url.clone(),
            dlq_url: None,
        },
    );
    let worker = plain
        .clone()
        .with_visibility_timeout(Duration::from_secs(30));
    let send = |body: &'static str| {
        let (sqs, url) = (sqs.clone(), url.clone());
        async move {
            sqs.send_message()
                .queue_url(url)
                .message_body(body)
                .send()
                .await
                .unwrap();
        }
    };
    let receive_again_after = |source: &SqsSource, pause: Duration| {
        let source = source.clone();
        async move {
            let first = source.receive(1, Duration::from_secs(5)).await.unwrap();
            assert_eq!(first.len(), 1);
            tokio::time::sleep(pause).await;
            source.receive(1, Duration::from_secs(1)).await.unwrap()
        }
    };

    // The queue's own 1 s timeout: the message is back 3 s later.
    send("queue default").await;
    let back = receive_again_after(&plain, Duration::from_secs(3)).await;
    assert_eq!(back.len(), 1, "LocalStack applies the queue's timeout");
    plain.ack(&[back[0].id.clone()]).await.unwrap();

    // The worker's 30 s: still hidden 3 s later.
    send("worker timeout").await;
    let back = receive_again_after(&worker, Duration::from_secs(3)).await;
    assert!(back.is_empty(), "redelivered under the queue's 1 s timeout");
    assert_eq!(queue_total(&sqs, &url).await.unwrap(), 1);
}

#[tokio::test]
async fn a_filtered_subscription_receives_only_its_types_and_wrapped_bodies_decode_the_same() {
    if !localstack::available().await {
        return;
    }
    let config = localstack::sdk_config().await;
    // The worker queue gets SNS-wrapped bodies (no raw delivery).
    let topo = create_topology(&config, false, 30, 5).await.unwrap();
    let sns = shared::aws::sns_client(&config);
    let sqs = shared::aws::sqs_client(&config);
    let name = format!("spillway-test-conv-{}", localstack::suffix());
    let (conv_url, conv_arn, _) = create_queue(&sqs, &name, 30, 5).await.unwrap();
    subscribe(
        &sns,
        &topo.topic_arn,
        &conv_arn,
        true,
        Some(&["conversion"]),
    )
    .await
    .unwrap();

    let publisher = SnsPublisher::new(sns, SnsConfig::new(&topo.topic_arn));
    let app = spawn_ingest(Arc::new(publisher), IngestConfig::default())
        .await
        .unwrap();
    let posted = events(2, 120);
    assert_eq!(
        app.post_events()
            .json(&posted)
            .send()
            .await
            .unwrap()
            .status(),
        202
    );
    let conversions: BTreeSet<String> = posted
        .iter()
        .filter(|e| e["type"] == "conversion")
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect();
    assert!(!conversions.is_empty());

    let conv = SqsSource::new(
        sqs.clone(),
        SqsConfig {
            queue_url: conv_url,
            dlq_url: None,
        },
    );
    let got = drain_ids(&conv, conversions.len(), Duration::from_secs(30)).await;
    assert_eq!(got.into_iter().collect::<BTreeSet<_>>(), conversions);
    // Nothing else arrives there.
    assert!(conv
        .receive(10, Duration::from_secs(2))
        .await
        .unwrap()
        .is_empty());

    let wrapped = SqsSource::new(
        sqs,
        SqsConfig {
            queue_url: topo.queue_url,
            dlq_url: None,
        },
    );
    let all = drain_ids(&wrapped, 120, Duration::from_secs(30)).await;
    assert_eq!(
        all.len(),
        120,
        "SNS-wrapped bodies decode to the same events"
    );
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn dead_lettering_sends_with_the_reason_then_deletes() {
    if !localstack::available().await {
        return;
    }
    let config = localstack::sdk_config().await;
    let sqs = shared::aws::sqs_client(&config);
    let name = format!("spillway-test-dl-{}", localstack::suffix());
    let (queue_url, _, dlq_url) = create_queue(&sqs, &name, 30, 5).await.unwrap();
    sqs.send_message()
        .queue_url(&queue_url)
        .message_body("not an envelope")
        .send()
        .await
        .unwrap();
    let source = SqsSource::new(
        sqs.clone(),
        SqsConfig {
            queue_url: queue_url.clone(),
            dlq_url: Some(dlq_url.clone()),
        },
    );
    let got = source.receive(10, Duration::from_secs(5)).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].receive_count, 1);
    let letter = DeadLetter {
        body: got[0].body.clone(),
        attributes: got[0].attributes.clone(),
        reason: DeadLetterReason {
            code: "undecodable".into(),
            // A reason quoting what it refuses may hold characters SQS refuses in a message.
            message: "body is not an envelope: \u{7}\u{FFFE}".into(),
        },
    };
    source.dead_letter(&got[0].id, &[letter]).await.unwrap();

    let dlq = SqsSource::new(
        sqs,
        SqsConfig {
            queue_url: dlq_url,
            dlq_url: None,
        },
    );
    let dead = dlq.receive(10, Duration::from_secs(5)).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].body, "not an envelope");
    assert_eq!(dead[0].attributes[ATTR_ERROR_CODE], "undecodable");
    assert_eq!(
        dead[0].attributes[shared::source::ATTR_ERROR_MESSAGE],
        "body is not an envelope: \\u{7}\\u{fffe}"
    );
    // Deleted from the source: nothing comes back even after the visibility would lapse.
    assert!(source
        .receive(10, Duration::from_secs(2))
        .await
        .unwrap()
        .is_empty());
}

/// A FIFO queue needs a FIFO DLQ, which refuses a message without a group id: every
/// dead letter failed, and a bad message waited out its receives in the queue, blocking its
/// group, until the redrive policy moved it without a reason.
#[tokio::test]
async fn dead_letters_reach_a_fifo_dlq_once_even_when_sent_twice() {
    if !localstack::available().await {
        return;
    }
    let config = localstack::sdk_config().await;
    let sqs = shared::aws::sqs_client(&config);
    let name = format!("spillway-test-fifo-dl-{}", localstack::suffix());
    let queue_url = localstack::create_fifo_queue(&sqs, &name, None)
        .await
        .unwrap();
    let dlq_url = localstack::create_fifo_queue(&sqs, &format!("{name}-dlq"), None)
        .await
        .unwrap();
    for body in ["not an envelope", "nor this"] {
        sqs.send_message()
            .queue_url(&queue_url)
            .message_body(body)
            .message_group_id("tenant-a")
            .message_deduplication_id(body.replace(' ', "-"))
            .send()
            .await
            .unwrap();
    }
    let source = SqsSource::new(
        sqs.clone(),
        SqsConfig {
            queue_url: queue_url.clone(),
            dlq_url: Some(dlq_url.clone()),
        },
    );
    let got = source.receive(10, Duration::from_secs(5)).await.unwrap();
    assert_eq!(got.len(), 2);
    let letter = |d: &Delivery| DeadLetter {
        body: d.body.clone(),
        attributes: d.attributes.clone(),
        reason: DeadLetterReason {
            code: "undecodable".into(),
            message: "body is not an envelope".into(),
        },
    };
    // The first one's letter goes out twice, as when the delete after a send fails.
    source
        .dead_letter(&DeliveryId("no such receipt".into()), &[letter(&got[0])])
        .await
        .unwrap_err();
    for d in &got {
        source.dead_letter(&d.id, &[letter(d)]).await.unwrap();
    }

    let dlq = SqsSource::new(
        sqs,
        SqsConfig {
            queue_url: dlq_url,
            dlq_url: None,
        },
    );
    let mut bodies = Vec::new();
    for d in dlq.receive(10, Duration::from_secs(5)).await.unwrap() {
        assert_eq!(d.attributes[ATTR_ERROR_CODE], "undecodable");
        bodies.push(d.body.clone());
        dlq.ack(&[d.id]).await.unwrap();
    }
    bodies.extend(
        dlq.receive(10, Duration::from_secs(1))
            .await
            .unwrap()
            .into_iter()
            .map(|d| d.body),
    );
    bodies.sort();
    assert_eq!(bodies, ["nor this", "not an envelope"], "each letter once");
    assert!(source
        .receive(10, Duration::from_secs(1))
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn retry_later_hides_a_message_for_its_delay_and_counts_receives() {
    if !localstack::available().await {
        return;
    }
    let config = localstack::sdk_config().await;
    let sqs = shared::aws::sqs_client(&config);
    let name = format!("spillway-test-vis-{}", localstack::suffix());
    let (queue_url, _, _) = create_queue(&sqs, &name, 30, 5).await.unwrap();
    sqs.send_message()
        .queue_url(&queue_url)
        .message_body("x")
        .send()
        .await
        .unwrap();
    let source = SqsSource::new(
        sqs,
        SqsConfig {
            queue_url,
            dlq_url: None,
        },
    );
    let first = source.receive(1, Duration::from_secs(5)).await.unwrap();
    source
        .retry_later(&[(first[0].id.clone(), Duration::from_secs(2))])
        .await
        .unwrap();
    assert!(
        source
            .receive(1, Duration::from_secs(1))
            .await
            .unwrap()
            .is_empty(),
        "hidden during the delay"
    );
    let again = source.receive(1, Duration::from_secs(5)).await.unwrap();
    assert_eq!(again.len(), 1, "visible again after the delay");
    assert_eq!(again[0].receive_count, 2);
}

/// Sends `n` small messages to a fresh queue with `visibility_secs` and receives them all.
async fn received(
    sqs: &aws_sdk_sqs::Client,
    tag: &str,
    visibility_secs: u32,
    n: usize,
) -> (SqsSource, String, Vec<Delivery>) {
    let name = format!("spillway-test-{tag}-{}", localstack::suffix());
    let (queue_url, _, _) = create_queue(sqs, &name, visibility_secs, 5).await.unwrap();
    for i in 0..n {
        sqs.send_message()
            .queue_url(&queue_url)
            .message_body(format!("m{i}"))
            .send()
            .await
            .unwrap();
    }
    let source = SqsSource::new(
        sqs.clone(),
        SqsConfig {
            queue_url: queue_url.clone(),
            dlq_url: None,
        },
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while got.len() < n && Instant::now() < deadline {
        got.extend(source.receive(10, Duration::from_secs(1)).await.unwrap());
    }
    assert_eq!(got.len(), n, "every message sent is received");
    (source, queue_url, got)
}

/// The receipts of `got`, with the third replaced by one SQS does not know.
fn with_a_bogus_third_receipt(got: &[Delivery]) -> Vec<DeliveryId> {
    let mut ids: Vec<DeliveryId> = got.iter().map(|d| d.id.clone()).collect();
    ids[2] = DeliveryId("bogus-receipt-handle".into());
    ids
}

#[tokio::test]
async fn an_ack_with_one_bad_receipt_in_its_first_chunk_still_deletes_every_other_message() {
    if !localstack::available().await {
        return;
    }
    let config = localstack::sdk_config().await;
    let sqs = shared::aws::sqs_client(&config);
    let (source, queue_url, got) = received(&sqs, "ack", 30, 15).await;

    let acked = source.ack(&with_a_bogus_third_receipt(&got)).await;
    // Only the message whose receipt was swapped out is left, still in flight.
    assert_eq!(queue_depth(&sqs, &queue_url).await.unwrap(), (0, 1));
    let err = acked.expect_err("one entry could not be deleted");
    let text = err.to_string();
    assert!(
        text.contains("1 of 15") && text.contains("ReceiptHandleIsInvalid"),
        "the error names how many failed and why: {text}"
    );
    assert!(
        !err.is_transient(),
        "a bad receipt is not helped by a retry"
    );
    // Two chunks, and the bad receipt is not retried.
    assert_eq!(source.calls().get("DeleteMessageBatch"), 2);
}

#[tokio::test]
async fn a_heartbeat_with_one_bad_receipt_in_its_first_chunk_still_extends_every_other_message() {
    if !localstack::available().await {
        return;
    }
    let config = localstack::sdk_config().await;
    let sqs = shared::aws::sqs_client(&config);
    let (source, _, got) = received(&sqs, "extend", 3, 15).await;

    let extended = source
        .extend(&with_a_bogus_third_receipt(&got), Duration::from_secs(60))
        .await;
    // Past the queue's 3 s visibility only the message whose receipt was swapped out is back.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut back = BTreeSet::new();
    while Instant::now() < deadline {
        for d in source.receive(10, Duration::from_secs(1)).await.unwrap() {
            back.insert(d.body);
        }
    }
    assert_eq!(
        back,
        BTreeSet::from([got[2].body.clone()]),
        "the other 14 stay hidden"
    );
    let err = extended.expect_err("one entry could not be changed");
    assert!(err.to_string().contains("1 of 15"), "{err}");
    assert_eq!(source.calls().get("ChangeMessageVisibilityBatch"), 2);
}

#[tokio::test]
async fn ten_large_dead_letters_go_out_in_calls_under_256_kib_and_all_reach_the_dlq() {
    if !localstack::available().await {
        return;
    }
    let config = localstack::sdk_config().await;
    let sqs = shared::aws::sqs_client(&config);
    let name = format!("spillway-test-big-{}", localstack::suffix());
    let (queue_url, _, dlq_url) = create_queue(&sqs, &name, 30, 5).await.unwrap();
    sqs.send_message()
        .queue_url(&queue_url)
        .message_body("an envelope with ten bad events")
        .send()
        .await
        .unwrap();
    let source = SqsSource::new(
        sqs.clone(),
        SqsConfig {
            queue_url: queue_url.clone(),
            dlq_url: Some(dlq_url.clone()),
        },
    );
    let got = source.receive(1, Duration::from_secs(5)).await.unwrap();
    assert_eq!(got.len(), 1);
    // 1.2 MiB in all: over the 256 KiB of a SendMessageBatch, and over LocalStack's own check
    // (1 MiB), so one call for all ten fails here too.
    let letters: Vec<DeadLetter> = (0..10_u8)
        .map(|i| DeadLetter {
            body: char::from(b'a' + i).to_string().repeat(120 * 1024),
            attributes: [("spillway-schema".to_owned(), "1".to_owned())].into(),
            reason: DeadLetterReason {
                code: "invalid_event".into(),
                message: format!("event {i} is invalid"),
            },
        })
        .collect();
    source.dead_letter(&got[0].id, &letters).await.unwrap();

    // Two letters (240 KiB and their attributes) per call.
    assert_eq!(source.calls().get("SendMessageBatch"), 5);
    assert_eq!(queue_total(&sqs, &dlq_url).await.unwrap(), 10);
    assert_eq!(
        queue_total(&sqs, &queue_url).await.unwrap(),
        0,
        "deleted after"
    );
    let dlq = SqsSource::new(
        sqs,
        SqsConfig {
            queue_url: dlq_url,
            dlq_url: None,
        },
    );
    let mut bodies = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while bodies.len() < 10 && Instant::now() < deadline {
        for d in dlq.receive(10, Duration::from_secs(1)).await.unwrap() {
            bodies.insert(d.body);
        }
    }
    let want: BTreeSet<String> = letters.into_iter().map(|l| l.body).collect();
    assert_eq!(bodies, want, "every letter arrives whole");
}

#[tokio::test]
async fn ten_large_requeued_messages_go_out_in_calls_under_256_kib() {
    if !localstack::available().await {
        return;
    }
    let config = localstack::sdk_config().await;
    let sqs = shared::aws::sqs_client(&config);
    let name = format!("spillway-test-requeue-{}", localstack::suffix());
    let (queue_url, _, _) = create_queue(&sqs, &name, 30, 5).await.unwrap();
    // Ten envelopes of 120 KiB, as a store outage on Lambda hands back: 1.2 MiB in all.
    let messages: Vec<Requeued> = (0..10_u8)
        .map(|i| Requeued {
            body: char::from(b'a' + i).to_string().repeat(120 * 1024),
            attributes: [(shared::source::ATTR_REQUEUES.to_owned(), "1".to_owned())].into(),
            delay: Duration::ZERO,
        })
        .collect();
    let requeue = SqsRequeue::new(sqs.clone(), queue_url.clone());
    let results = requeue.requeue(&messages).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(requeue.calls().get("SendMessageBatch"), 5);
    assert_eq!(queue_total(&sqs, &queue_url).await.unwrap(), 10);
}

/// Runs localstack/provision.py (CloudFormation deploy of infra/template.yaml) with the
/// LocalStack venv's Python; returns the exported settings.
fn provision(stack: &str) -> std::collections::HashMap<String, String> {
    provision_with(stack, &[])
}

/// [`provision`] with more arguments (`--param KEY=VALUE`).
fn provision_with(stack: &str, extra: &[&str]) -> std::collections::HashMap<String, String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let venv = std::env::var("SPILLWAY_LS_VENV").map_or_else(
        |_| {
            std::path::PathBuf::from(std::env::var("HOME").unwrap())
                .join(".cache/spillway/localstack-venv")
        },
        std::path::PathBuf::from,
    );
    let out = std::process::Command::new(venv.join("bin/python"))
        .arg(root.join("localstack/provision.py"))
        .args(["--stack", stack, "--prefix", stack])
        .args(extra)
        .output()
        .expect("the LocalStack venv (localstack/start.sh creates it)");
    assert!(
        out.status.success(),
        "provision failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_template_deploys_and_the_pipeline_runs_on_what_it_created() {
    if !localstack::available().await {
        return;
    }
    let config = localstack::sdk_config().await;
    let stack = format!("sw-t-{}", localstack::suffix());
    let env = provision(&stack);
    let topic_arn = env["SPILLWAY_TOPIC_ARN"].clone();
    let queue_url = env["SPILLWAY_QUEUE_URL"].clone();
    let dlq_url = env["SPILLWAY_DLQ_URL"].clone();
    assert!(
        topic_arn.ends_with(&format!("{stack}-events")),
        "{topic_arn}"
    );

    let dir = tempfile::tempdir().unwrap();
    let store =
        Arc::new(shared::sqlite_sink::SqliteSink::open(dir.path().join("store.db")).unwrap());
    let source = Arc::new(SqsSource::new(
        shared::aws::sqs_client(&config),
        SqsConfig {
            queue_url,
            dlq_url: Some(dlq_url),
        },
    ));
    let poller_config = workers::PollerConfig {
        receive_wait: Duration::from_secs(1),
        max_batch_wait: Duration::from_millis(200),
        ..workers::PollerConfig::default()
    };
    let poller = workers::Poller::new(source, store.clone(), poller_config).unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn(poller.run(stop.clone()));

    let publisher = SnsPublisher::new(shared::aws::sns_client(&config), SnsConfig::new(&topic_arn));
    let app = spawn_ingest(Arc::new(publisher), IngestConfig::default())
        .await
        .unwrap();
    let posted = events(3, 500);
    for chunk in posted.chunks(100) {
        let mut body = chunk.to_vec();
        body.push(chunk[0].clone()); // a duplicate in every request
        let mut bad = chunk[1].clone();
        bad["currency"] = serde_json::json!("usd");
        body.push(bad);
        assert_eq!(
            app.post_events().json(&body).send().await.unwrap().status(),
            202
        );
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while store.events_stored().await.unwrap() < 500 {
        assert!(Instant::now() < deadline, "events did not reach the store");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Give a redelivery a chance to show up as a double count; there must be none.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    worker.await.unwrap();
    app.shutdown().await.unwrap();
    assert_eq!(store.events_stored().await.unwrap(), 500);
    let rollup_events: i64 = store
        .rollups()
        .await
        .unwrap()
        .iter()
        .map(|r| r.events)
        .sum();
    assert_eq!(rollup_events, 500, "each valid unique event counted once");
}

#[test]
fn the_template_passes_cfn_lint() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let venv = std::env::var("SPILLWAY_LS_VENV").map_or_else(
        |_| {
            std::path::PathBuf::from(std::env::var("HOME").unwrap())
                .join(".cache/spillway/localstack-venv")
        },
        std::path::PathBuf::from,
    );
    let cfn_lint = venv.join("bin/cfn-lint");
    if !cfn_lint.exists() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{} is missing and CI=true: run localstack/start.sh (it installs localstack/requirements.txt)",
            cfn_lint.display()
        );
        eprintln!(
            "SKIPPED: {} is missing; run localstack/start.sh",
            cfn_lint.display()
        );
        return;
    }
    let out = std::process::Command::new(&cfn_lint)
        .arg(root.join("infra/template.yaml"))
        .output()
        .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "cfn-lint found problems (exit {}):\n{report}",
        out.status
    );
}

/// provision.py updated an existing stack with only the parameters it was given, and
/// CloudFormation resets the others to their defaults: run for its exports on the stack the
/// Lambda deploy made, it set DeployFunctions=false and deleted the functions. An update keeps
/// every parameter not given (`update_parameters`; LocalStack has no UpdateStack to run it
/// against, so that function is checked on its own), and run again on LocalStack the script
/// keeps the stack as it is instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_an_existing_stack_again_keeps_the_parameters_it_was_not_given() {
    if !localstack::available().await {
        return;
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let venv = std::path::PathBuf::from(std::env::var("HOME").unwrap())
        .join(".cache/spillway/localstack-venv");
    let check = std::process::Command::new(venv.join("bin/python"))
        .current_dir(root.join("localstack"))
        .args([
            "-c",
            "import provision\n\
             given = [{'ParameterKey': 'Prefix', 'ParameterValue': 'p'}]\n\
             current = [{'ParameterKey': 'Prefix', 'ParameterValue': 'old'},\n\
                        {'ParameterKey': 'DeployFunctions', 'ParameterValue': 'true'}]\n\
             got = provision.update_parameters(given, current)\n\
             assert got == given + [{'ParameterKey': 'DeployFunctions', 'UsePreviousValue': True}], got\n",
        ])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    let config = localstack::sdk_config().await;
    let sqs = shared::aws::sqs_client(&config);
    let stack = format!("sw-p-{}", localstack::suffix());
    let max_receives = |env: std::collections::HashMap<String, String>| {
        let sqs = sqs.clone();
        async move {
            let attrs = sqs
                .get_queue_attributes()
                .queue_url(&env["SPILLWAY_QUEUE_URL"])
                .attribute_names(aws_sdk_sqs::types::QueueAttributeName::RedrivePolicy)
                .send()
                .await
                .unwrap();
            let policy: serde_json::Value = serde_json::from_str(
                &attrs.attributes().unwrap()
                    [&aws_sdk_sqs::types::QueueAttributeName::RedrivePolicy],
            )
            .unwrap();
            policy["maxReceiveCount"]
                .to_string()
                .trim_matches('"')
                .to_owned()
        }
    };
    let first = provision_with(&stack, &["--param", "MaxReceiveCount=7"]);
    assert_eq!(max_receives(first).await, "7");
    // Again, as an operator runs it for the exports: nothing given but the prefix.
    let again = provision(&stack);
    assert_eq!(max_receives(again).await, "7");
}
