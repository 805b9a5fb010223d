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

/// A server with 1 s client timeouts and room for 2 connections.
async fn spawn_limited(
    max_connections: usize,
) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
    use ingest_api::auth::{AdvertiserScope, ApiKey, ApiKeys};
    let keys = ApiKeys::new(vec![ApiKey::from_plain(
        tests::TEST_KEY,
        "test",
        AdvertiserScope::Any,
    )]);
    let state = ingest_api::AppState::new(
        Arc::new(MemoryPublisher::new()),
        keys,
        IngestConfig::default(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let limits = ingest_api::ConnectionLimits {
        header_read_timeout: std::time::Duration::from_secs(1),
        body_read_timeout: std::time::Duration::from_secs(1),
        max_connections,
    };
    tokio::spawn(ingest_api::serve_with_limits(
        listener,
        ingest_api::router(state),
        async {
            let _ = stopped.await;
        },
        limits,
    ));
    (addr, stop)
}

/// Reads until the server closes the connection or `within` passes; what it sent.
async fn read_until_closed(
    stream: &mut tokio::net::TcpStream,
    within: std::time::Duration,
) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let read = tokio::time::timeout(within, stream.read_to_end(&mut got)).await;
    read.ok()
        .map(|_| String::from_utf8_lossy(&got).into_owned())
}

/// Slowloris: headers sent a byte at a time, or a keep-alive connection left idle, must not
/// hold a connection forever; nor may a body that never comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_or_idle_clients_are_cut_off_at_the_client_timeout() {
    use tokio::io::AsyncWriteExt;
    let (addr, _stop) = spawn_limited(16).await;
    let within = std::time::Duration::from_secs(5);

    let mut partial = tokio::net::TcpStream::connect(addr).await.unwrap();
    partial
        .write_all(b"POST /v1/events HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert!(
        read_until_closed(&mut partial, within).await.is_some(),
        "a connection whose headers never end stayed open"
    );

    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert!(
        read_until_closed(&mut idle, within).await.is_some(),
        "an idle connection stayed open"
    );

    let mut no_body = tokio::net::TcpStream::connect(addr).await.unwrap();
    no_body
        .write_all(
            format!(
                "POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
                 Content-Type: application/json\r\nContent-Length: 100\r\n\r\n[",
                tests::TEST_KEY
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let answer = read_until_closed(&mut no_body, within).await;
    let answer = answer.expect("a request whose body never ends stayed open");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
}

/// Past `max_connections` a client waits (in the listen backlog) until a connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_wait_for_one_to_close() {
    let (addr, _stop) = spawn_limited(2).await;
    let _hold: Vec<tokio::net::TcpStream> = vec![
        tokio::net::TcpStream::connect(addr).await.unwrap(),
        tokio::net::TcpStream::connect(addr).await.unwrap(),
    ];
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let resp = reqwest::get(format!("http://{addr}/healthz"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let waited = started.elapsed();
    assert!(
        waited >= std::time::Duration::from_millis(500),
        "answered after {waited:?}, beside two held connections"
    );
}
