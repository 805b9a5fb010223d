//! The ingest API over a real socket.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::needless_pass_by_value
)]

use std::io::Write;
use std::sync::Arc;

use ingest_api::IngestConfig;
use serde_json::{json, Value};
use shared::publisher::MemoryPublisher;
use shared::synthetic::SyntheticEvents;
use tests::spawn_ingest;

fn events(n: usize) -> Vec<Value> {
    let mut g = SyntheticEvents::new(42, 10);
    (0..n).map(|_| g.event()).collect()
}

#[tokio::test]
async fn a_batch_posted_over_a_socket_is_published_before_the_202() {
    let publisher = Arc::new(MemoryPublisher::new());
    let app = spawn_ingest(publisher.clone(), IngestConfig::default())
        .await
        .unwrap();
    let resp = app.post_events().json(&events(100)).send().await.unwrap();
    assert_eq!(resp.status(), 202);
    assert!(resp.headers().contains_key("x-request-id"));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body, json!({"accepted": 100, "rejected": []}));
    assert_eq!(publisher.event_count(), 100);
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn every_status_code_is_reachable_over_a_socket() {
    let publisher = Arc::new(MemoryPublisher::new());
    let config = IngestConfig {
        rate_limit_eps: 1,
        rate_limit_burst: 1,
        ..Default::default()
    };
    let app = spawn_ingest(publisher.clone(), config).await.unwrap();
    let one = events(1).remove(0);

    let unauth = app
        .client
        .post(app.events_url())
        .json(&one)
        .send()
        .await
        .unwrap();
    assert_eq!(unauth.status(), 401);
    let bad = app
        .post_events()
        .body("[1,")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let csv = app
        .post_events()
        .body("a,b")
        .header("content-type", "text/csv")
        .send()
        .await
        .unwrap();
    assert_eq!(csv.status(), 415);
    let big = app
        .post_events()
        .body(vec![b' '; 2 * 1024 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), 413);
    assert_eq!(
        app.post_events().json(&one).send().await.unwrap().status(),
        202
    );
    let limited = app.post_events().json(&events(1)).send().await.unwrap();
    assert_eq!(limited.status(), 429);
    assert!(limited.headers().contains_key("retry-after"));
    app.shutdown().await.unwrap();

    let failing = Arc::new(MemoryPublisher::new());
    failing.set_fail_always(true);
    let app = spawn_ingest(failing, IngestConfig::default())
        .await
        .unwrap();
    let resp = app.post_events().json(&one).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn gzip_ndjson_over_a_socket_is_accepted() {
    let publisher = Arc::new(MemoryPublisher::new());
    let app = spawn_ingest(publisher.clone(), IngestConfig::default())
        .await
        .unwrap();
    let ndjson: String = events(50).iter().map(|e| format!("{e}\n")).collect();
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(ndjson.as_bytes()).unwrap();
    let resp = app
        .post_events()
        .header("content-type", "application/x-ndjson")
        .header("content-encoding", "gzip")
        .body(enc.finish().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    assert_eq!(publisher.event_count(), 50);
    app.shutdown().await.unwrap();
}
