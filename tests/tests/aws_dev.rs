//! `spillway dev --broker aws` against a real LocalStack: the same one-process pipeline as the
//! embedded default, with SNS and SQS in place of the embedded broker.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::Value;
use shared::event::EventId;
use shared::settings::{BROKER_DB, STORE_DB};
use shared::synthetic::SyntheticEvents;
use shared::SqliteSink;
use tests::dev_process::DevProcess;
use tests::localstack::{self, create_topology, queue_depth};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spillway_dev_on_sns_and_sqs_stores_every_accepted_event_once() {
    if !localstack::available().await {
        return;
    }
    // Also exports the AWS_* settings the child process reads.
    let config = localstack::sdk_config().await;
    let topo = create_topology(&config, true, 30, 5).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dev = DevProcess::start(
        dir.path(),
        &[
            "--broker",
            "aws",
            "--topic-arn",
            &topo.topic_arn,
            "--queue-url",
            &topo.queue_url,
            "--dlq-url",
            &topo.dlq_url,
        ],
    )
    .unwrap();

    let mut g = SyntheticEvents::new(11, 7);
    let posted: Vec<Value> = (0..600).map(|_| g.event()).collect();
    let client = reqwest::Client::new();
    let post = |body: Vec<Value>| {
        client
            .post(dev.events_url())
            .bearer_auth(&dev.key)
            .json(&body)
            .send()
    };
    for chunk in posted.chunks(100) {
        assert_eq!(post(chunk.to_vec()).await.unwrap().status(), 202);
    }
    // A resend of the first batch (a client retry) and an invalid event beside a valid one.
    assert_eq!(post(posted[..100].to_vec()).await.unwrap().status(), 202);
    let mut invalid = posted[0].clone();
    invalid["event_id"] = "not-a-uuid".into();
    let resp = post(vec![invalid, posted[1].clone()]).await.unwrap();
    assert_eq!(resp.status(), 202);
    let report: Value = resp.json().await.unwrap();
    assert_eq!(report["accepted"], 1);
    assert_eq!(report["rejected"][0]["errors"][0]["code"], "invalid_uuid");

    let ids: Vec<EventId> = posted
        .iter()
        .map(|e| EventId::parse(e["event_id"].as_str().unwrap()).unwrap())
        .collect();
    let unique: BTreeSet<&EventId> = ids.iter().collect();
    let store = SqliteSink::open(dir.path().join(STORE_DB)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    while store.events_stored().await.unwrap() < unique.len() as u64 {
        assert!(
            Instant::now() < deadline,
            "the worker did not drain SQS in 90 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let status = dev.terminate(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "SIGTERM drains and exits 0: {status}");

    assert_eq!(store.count_ids(&ids).await.unwrap(), unique.len());
    assert_eq!(
        store.events_stored().await.unwrap(),
        unique.len() as u64,
        "exactly the valid unique events, once"
    );
    assert!(
        !dir.path().join(BROKER_DB).exists(),
        "the events went through SNS and SQS, not the embedded broker"
    );
    let sqs = aws_sdk_sqs::Client::new(&config);
    assert_eq!(
        queue_depth(&sqs, &topo.queue_url).await.unwrap(),
        (0, 0),
        "every message deleted"
    );
    assert_eq!(
        queue_depth(&sqs, &topo.dlq_url).await.unwrap(),
        (0, 0),
        "nothing dead-lettered"
    );
}
