//! The ingest router through `oneshot`: every status code, the body forms and encodings,
//! limits, and the publish guarantees.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::needless_pass_by_value
)]

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use ingest_api::auth::{AdvertiserScope, ApiKey, ApiKeys};
use ingest_api::{router, AppState, IngestConfig};
use serde_json::{json, Value};
use shared::clock::FixedClock;
use shared::envelope::decode_message;
use shared::publisher::MemoryPublisher;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tower::ServiceExt;

const NOW: &str = "2026-11-20T12:00:00Z";

struct Harness {
    state: AppState,
    publisher: Arc<MemoryPublisher>,
}

fn harness_with(config: IngestConfig) -> Harness {
    let publisher = Arc::new(MemoryPublisher::new());
    let keys = ApiKeys::new(vec![
        ApiKey::from_plain("key-all", "acme", AdvertiserScope::Any),
        ApiKey::from_plain(
            "key-adv-1",
            "limited",
            AdvertiserScope::Only(["adv-1".to_owned()].into_iter().collect()),
        ),
    ]);
    let clock = Arc::new(FixedClock::at(
        OffsetDateTime::parse(NOW, &Rfc3339).unwrap(),
    ));
    let config = IngestConfig {
        publish_backoff: Duration::from_millis(1),
        ..config
    };
    let state = AppState::with_clock(publisher.clone(), keys, config, clock);
    Harness { state, publisher }
}

fn harness() -> Harness {
    harness_with(IngestConfig::default())
}

/// State over `publisher` with `config`, the one key `key-all` and the fixed clock.
fn state_over(publisher: Arc<dyn shared::Publisher>, config: IngestConfig) -> AppState {
    let keys = ApiKeys::new(vec![ApiKey::from_plain(
        "key-all",
        "acme",
        AdvertiserScope::Any,
    )]);
    let clock = Arc::new(FixedClock::at(
        OffsetDateTime::parse(NOW, &Rfc3339).unwrap(),
    ));
    AppState::with_clock(publisher, keys, config, clock)
}

fn event(n: u32) -> Value {
    json!({
        "event_id": format!("00000000-0000-4000-8000-{n:012}"),
        "type": "click",
        "occurred_at": "2026-11-20T11:58:00Z",
        "advertiser_id": "adv-1",
        "campaign_id": "cmp-1",
        "ad_id": "ad-1",
        "cost_micros": 2500,
        "currency": "USD"
    })
}

fn post(key: Option<&str>) -> axum::http::request::Builder {
    let b = Request::post("/v1/events").header("content-type", "application/json");
    match key {
        Some(k) => b.header("authorization", format!("Bearer {k}")),
        None => b,
    }
}

async fn send(h: &Harness, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Value) {
    send_to(&h.state, req).await
}

async fn send_to(
    state: &AppState,
    req: Request<Body>,
) -> (StatusCode, axum::http::HeaderMap, Value) {
    let resp = router(state.clone()).oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, headers, body)
}

async fn send_json(h: &Harness, body: &Value) -> (StatusCode, Value) {
    let (s, _, b) = send(
        h,
        post(Some("key-all"))
            .body(Body::from(body.to_string()))
            .unwrap(),
    )
    .await;
    (s, b)
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

fn codes(body: &Value) -> Vec<(u64, String, String)> {
    body["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            r["errors"].as_array().unwrap().iter().map(move |e| {
                (
                    r["index"].as_u64().unwrap(),
                    e["field"].as_str().unwrap().to_owned(),
                    e["code"].as_str().unwrap().to_owned(),
                )
            })
        })
        .collect()
}

#[tokio::test]
async fn a_single_event_is_accepted_with_202_after_it_is_published() {
    let h = harness();
    let (status, body) = send_json(&h, &event(1)).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(body, json!({"accepted": 1, "rejected": []}));
    let published = h.publisher.published();
    assert_eq!(published.len(), 1);
    let decoded = decode_message(&published[0].body, None).unwrap();
    assert_eq!(decoded.events.len(), 1);
    assert_eq!(published[0].attributes["spillway-tenant"], "acme");
}

#[tokio::test]
async fn an_array_with_one_invalid_event_accepts_the_others_and_names_the_bad_field() {
    let h = harness();
    let mut bad = event(2);
    bad["currency"] = json!("usd");
    let (status, body) = send_json(&h, &json!([event(1), bad, event(3)])).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(body["accepted"], 2);
    assert_eq!(
        codes(&body),
        vec![(1, "/currency".into(), "invalid_currency".into())]
    );
    assert_eq!(
        body["rejected"][0]["event_id"],
        "00000000-0000-4000-8000-000000000002"
    );
    assert_eq!(h.publisher.event_count(), 2);
}

#[tokio::test]
async fn each_validation_code_reaches_the_client() {
    let h = harness();
    let mut cases = Vec::new();
    let mut push = |field: &str, value: Value, code: &str| {
        let mut e = event(9);
        if value.is_null() {
            e.as_object_mut().unwrap().remove(field);
        } else {
            e[field] = value;
        }
        cases.push((e, format!("/{field}"), code.to_owned()));
    };
    push("ad_id", Value::Null, "missing");
    push("event_id", json!("not-a-uuid"), "invalid_uuid");
    push("event_id", json!(12), "invalid_type");
    push("type", json!("purchase"), "invalid_value");
    push(
        "occurred_at",
        json!("2026-11-20 11:00"),
        "invalid_timestamp",
    );
    push("occurred_at", json!("2026-11-20T12:30:00Z"), "out_of_range");
    push("cost_micros", json!(2_000_000_000_000_u64), "out_of_range");
    push("campaign_id", json!("c".repeat(65)), "too_long");
    push("campaign_id", json!("c c"), "invalid_characters");
    push("surprise", json!(true), "unknown_field");
    push("revenue_micros", json!(5), "not_allowed");
    push("currency", json!("ABC"), "invalid_currency");
    push("country", json!("ZZ"), "invalid_country");
    for (body, field, code) in cases {
        let (status, resp) = send_json(&h, &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(codes(&resp), vec![(0, field, code)], "{body}");
    }
    assert_eq!(h.publisher.event_count(), 0);
}

#[tokio::test]
async fn ndjson_with_one_bad_line_accepts_the_rest() {
    let h = harness();
    let body = format!("{}\n{{broken\n{}\n", event(1), event(2));
    let req = Request::post("/v1/events")
        .header("authorization", "Bearer key-all")
        .header("content-type", "application/x-ndjson")
        .body(Body::from(body))
        .unwrap();
    let (status, _, resp) = send(&h, req).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(resp["accepted"], 2);
    assert_eq!(
        codes(&resp),
        vec![(1, String::new(), "invalid_json".into())]
    );
}

#[tokio::test]
async fn gzip_and_zstd_bodies_are_accepted() {
    let h = harness();
    let raw = json!([event(1), event(2)]).to_string();
    for (enc, body) in [
        ("gzip", gzip(raw.as_bytes())),
        ("zstd", zstd::bulk::compress(raw.as_bytes(), 3).unwrap()),
    ] {
        let req = post(Some("key-all"))
            .header("content-encoding", enc)
            .body(Body::from(body))
            .unwrap();
        let (status, _, resp) = send(&h, req).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{enc}");
        assert_eq!(resp["accepted"], 2, "{enc}");
    }
}

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test]
async fn a_decompression_bomb_is_refused_with_413_in_bounded_memory() {
    let h = harness();
    // 100 concatenated gzip members of 10 MiB of zeros each: ~1 MiB on the wire, 1 GiB inflated.
    let member = gzip(&vec![0_u8; 10 * 1024 * 1024]);
    let bomb: Vec<u8> = member
        .iter()
        .copied()
        .cycle()
        .take(member.len() * 100)
        .collect();
    assert!(bomb.len() <= 1024 * 1024, "bomb is {} bytes", bomb.len());
    let before = peak_rss_kib();
    let req = post(Some("key-all"))
        .header("content-encoding", "gzip")
        .body(Body::from(bomb))
        .unwrap();
    let (status, _, resp) = send(&h, req).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(resp["error"]["code"], "payload_too_large");
    let grown_mib = (peak_rss_kib() - before) / 1024;
    assert!(grown_mib < 64, "peak memory grew by {grown_mib} MiB");
}

#[tokio::test]
async fn a_body_over_the_wire_limit_is_413() {
    let h = harness();
    let big = vec![b' '; 1024 * 1024 + 1];
    let (status, _, _) = send(&h, post(Some("key-all")).body(Body::from(big)).unwrap()).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn more_events_than_allowed_is_413() {
    let h = harness_with(IngestConfig {
        limits: ingest_api::body::Limits {
            max_events: 3,
            ..Default::default()
        },
        ..Default::default()
    });
    let (status, body) = send_json(&h, &json!([event(1), event(2), event(3), event(4)])).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("at most 3"));
}

#[tokio::test]
async fn ten_thousand_deep_nesting_is_400_not_a_crash() {
    let h = harness();
    for body in [
        format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)),
        format!("{}{}", "{\"a\":".repeat(10_000), "}".repeat(10_000)),
    ] {
        let (status, _, resp) =
            send(&h, post(Some("key-all")).body(Body::from(body)).unwrap()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(resp["accepted"], 0);
    }
}

#[tokio::test]
async fn invalid_utf8_is_400_with_a_clear_message() {
    let h = harness();
    let body = b"{\"event_id\": \"\xff\xfe\"}".to_vec();
    let (status, _, resp) = send(&h, post(Some("key-all")).body(Body::from(body)).unwrap()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        resp["error"]["message"].as_str().unwrap().contains("UTF-8"),
        "{resp}"
    );
}

#[tokio::test]
async fn a_body_that_is_not_json_is_400() {
    let h = harness();
    let (status, _, resp) =
        send(&h, post(Some("key-all")).body(Body::from("hello")).unwrap()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(resp["error"]["code"], "invalid_body");
}

#[tokio::test]
async fn a_missing_or_unknown_key_is_401() {
    let h = harness();
    let (status, headers, resp) = send(
        &h,
        post(None).body(Body::from(event(1).to_string())).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers["www-authenticate"], "Bearer");
    assert_eq!(resp["error"]["code"], "unauthorized");
    let (status, _, _) = send(
        &h,
        post(Some("wrong"))
            .body(Body::from(event(1).to_string()))
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let req = Request::post("/v1/events")
        .header("x-api-key", "key-all")
        .body(Body::from(event(1).to_string()))
        .unwrap();
    assert_eq!(send(&h, req).await.0, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn a_key_not_allowed_for_the_advertiser_is_403_or_rejected_per_item() {
    let h = harness();
    let mut other = event(2);
    other["advertiser_id"] = json!("adv-2");
    let req = |body: Value| {
        post(Some("key-adv-1"))
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    let (status, _, resp) = send(&h, req(other.clone())).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        codes(&resp),
        vec![(0, "/advertiser_id".into(), "forbidden".into())]
    );
    let (status, _, resp) = send(&h, req(json!([event(1), other]))).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(resp["accepted"], 1);
    assert_eq!(
        codes(&resp),
        vec![(1, "/advertiser_id".into(), "forbidden".into())]
    );
    assert_eq!(h.publisher.event_count(), 1);
}

#[tokio::test]
async fn an_unsupported_type_or_encoding_is_415() {
    let h = harness();
    let req = Request::post("/v1/events")
        .header("authorization", "Bearer key-all")
        .header("content-type", "text/csv")
        .body(Body::from("a,b"))
        .unwrap();
    assert_eq!(send(&h, req).await.0, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let req = post(Some("key-all"))
        .header("content-encoding", "br")
        .body(Body::from("x"))
        .unwrap();
    assert_eq!(send(&h, req).await.0, StatusCode::UNSUPPORTED_MEDIA_TYPE);
}

#[tokio::test]
async fn an_exhausted_key_is_429_with_retry_after() {
    let h = harness_with(IngestConfig {
        rate_limit_eps: 2,
        rate_limit_burst: 2,
        ..Default::default()
    });
    assert_eq!(
        send_json(&h, &json!([event(1), event(2)])).await.0,
        StatusCode::ACCEPTED
    );
    let (status, headers, resp) = send(
        &h,
        post(Some("key-all"))
            .body(Body::from(event(3).to_string()))
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(resp["error"]["code"], "rate_limited");
    // The exhausted key is refused before its body is read: this one is not even JSON.
    let (status, _, resp) = send(&h, post(Some("key-all")).body(Body::from("{")).unwrap()).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{resp}");
    assert_eq!(h.publisher.event_count(), 2);
}

/// Keys reloaded (the keys file changed): a revoked key gets 401, a new one 202, and a key
/// kept across the reload keeps its bucket (a reload must not refill an exhausted key).
#[tokio::test]
async fn replaced_keys_take_effect_and_a_kept_key_keeps_its_bucket() {
    let h = harness_with(IngestConfig {
        rate_limit_eps: 2,
        rate_limit_burst: 2,
        ..Default::default()
    });
    assert_eq!(
        send_json(&h, &json!([event(1), event(2)])).await.0,
        StatusCode::ACCEPTED
    );
    let (added, removed) = h.state.replace_keys(ApiKeys::new(vec![
        ApiKey::from_plain("key-new", "fresh", AdvertiserScope::Any),
        ApiKey::from_plain("key-all", "acme", AdvertiserScope::Any),
    ]));
    assert_eq!((added, removed), (1, 1));
    let one = |key: &'static str, n: u32| {
        post(Some(key))
            .body(Body::from(event(n).to_string()))
            .unwrap()
    };
    assert_eq!(
        send(&h, one("key-all", 3)).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(send(&h, one("key-new", 4)).await.0, StatusCode::ACCEPTED);
    assert_eq!(
        send(&h, one("key-adv-1", 5)).await.0,
        StatusCode::UNAUTHORIZED
    );
}

/// Invalid events cost tokens too: a key flooding events that are all rejected is turned
/// away like one flooding valid events (it used to be answered 400 without limit).
#[tokio::test]
async fn rejected_events_are_charged_so_a_flood_of_invalid_ones_is_rate_limited() {
    let h = harness_with(IngestConfig {
        rate_limit_eps: 2,
        rate_limit_burst: 2,
        ..Default::default()
    });
    let invalid: Vec<Value> = (0..5).map(|_| json!({"event_id": "nope"})).collect();
    assert_eq!(
        send_json(&h, &json!(invalid)).await.0,
        StatusCode::BAD_REQUEST
    );
    // The 5 rejected events left the 2-token bucket in debt.
    assert_eq!(
        send_json(&h, &event(1)).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(h.publisher.event_count(), 0);
}

/// Charged before the take, the rejected items of a request larger than the burst left the
/// bucket short of what the take needs, full or not: 429 on every retry, for good.
#[tokio::test]
async fn a_request_larger_than_the_burst_with_an_invalid_event_passes_once_the_bucket_is_full() {
    let h = harness_with(IngestConfig {
        rate_limit_eps: 2,
        rate_limit_burst: 2,
        ..Default::default()
    });
    let mut five: Vec<Value> = (1..=5).map(event).collect();
    five.push(json!({"event_id": "nope"}));
    let (status, body) = send_json(&h, &json!(five)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["accepted"], 5);
    assert_eq!(h.publisher.event_count(), 5);
}

#[tokio::test]
async fn a_request_larger_than_the_burst_passes_once_and_pays_for_every_event() {
    let h = harness_with(IngestConfig {
        rate_limit_eps: 2,
        rate_limit_burst: 2,
        ..Default::default()
    });
    let five: Vec<Value> = (1..=5).map(event).collect();
    assert_eq!(send_json(&h, &json!(five)).await.0, StatusCode::ACCEPTED);
    // 5 events on a 2-token bucket leave a debt of 3: one more event waits 2 s, not 0.5 s.
    let (status, headers, _) = send(
        &h,
        post(Some("key-all"))
            .body(Body::from(event(6).to_string()))
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers["retry-after"], "2");
    assert_eq!(h.publisher.event_count(), 5);
}

/// A broker that stalls: each call waits long past any client's patience.
#[derive(Debug)]
struct StalledPublisher;

#[async_trait::async_trait]
impl shared::Publisher for StalledPublisher {
    async fn publish(
        &self,
        _: &[shared::Envelope],
    ) -> Result<shared::publisher::PublishReport, shared::publisher::PublishError> {
        tokio::time::sleep(Duration::from_secs(600)).await;
        Err(shared::publisher::PublishError::Unavailable {
            destination: "stalled".into(),
            message: "no answer".into(),
        })
    }

    async fn ready(&self) -> Result<(), shared::publisher::PublishError> {
        tokio::time::sleep(Duration::from_secs(600)).await;
        Ok(())
    }
}

/// With the broker stalled, retries stacked up to minutes (the handler's, the adapter's, the
/// AWS SDK's): the client, or Lambda's timeout, gave up without the 503 it is owed.
#[tokio::test]
async fn a_stalled_broker_gets_a_503_within_the_publish_timeout() {
    let config = IngestConfig {
        publish_timeout: Duration::from_millis(300),
        ..IngestConfig::default()
    };
    let state = state_over(Arc::new(StalledPublisher), config);
    let started = std::time::Instant::now();
    let resp = router(state)
        .oneshot(
            post(Some("key-all"))
                .body(Body::from(event(1).to_string()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()["retry-after"], "5");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// A broker that refuses the first `failures` calls at once, then stalls.
#[derive(Debug)]
struct FailsThenStalls {
    failures: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl shared::Publisher for FailsThenStalls {
    async fn publish(
        &self,
        envelopes: &[shared::Envelope],
    ) -> Result<shared::publisher::PublishReport, shared::publisher::PublishError> {
        let left = self.failures.load(std::sync::atomic::Ordering::SeqCst);
        if left > 0 {
            self.failures
                .store(left - 1, std::sync::atomic::Ordering::SeqCst);
            return Err(shared::publisher::PublishError::Unavailable {
                destination: "flaky".into(),
                message: "throttled".into(),
            });
        }
        StalledPublisher.publish(envelopes).await
    }

    async fn ready(&self) -> Result<(), shared::publisher::PublishError> {
        Ok(())
    }
}

/// The retries of a publish given up at the timeout were counted nowhere: the counter was
/// added to once the publish ended, which such a publish never does. A broker struggling
/// that way is what `spillway_ingest_publish_retries_total` is there to show.
#[tokio::test]
async fn the_retries_of_a_publish_given_up_at_the_timeout_are_counted() {
    let config = IngestConfig {
        publish_timeout: Duration::from_secs(2),
        publish_attempts: 3,
        publish_backoff: Duration::from_millis(10),
        ..IngestConfig::default()
    };
    let publisher = Arc::new(FailsThenStalls { failures: 2.into() });
    let state = state_over(publisher, config);
    let resp = router(state.clone())
        .oneshot(
            post(Some("key-all"))
                .body(Body::from(event(1).to_string()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let mut page = shared::metrics::Exposition::new();
    shared::metrics::Render::render(state.metrics().as_ref(), &mut page);
    let page = page.finish();
    assert_eq!(
        shared::metrics::value_of(&page, "spillway_ingest_publish_retries_total"),
        Some(2.0),
        "{page}"
    );
}

/// A readiness check waited as long as the broker client (a minute and more when it
/// stalls), every other caller queued behind it holding a connection.
#[tokio::test]
async fn a_stalled_broker_is_not_ready_within_a_few_seconds() {
    let keys = ApiKeys::new(vec![]);
    let state = AppState::new(Arc::new(StalledPublisher), keys, IngestConfig::default());
    let started = std::time::Instant::now();
    let resp = router(state)
        .oneshot(Request::get("/readyz").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_publisher_that_keeps_failing_gives_503_and_reports_nothing_accepted() {
    let h = harness();
    h.publisher.set_fail_always(true);
    let (status, headers, resp) = send(
        &h,
        post(Some("key-all"))
            .body(Body::from(event(1).to_string()))
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["retry-after"], "5");
    assert_eq!(resp["accepted"], 0);
    assert_eq!(resp["error"]["code"], "publish_failed");
    assert_eq!(h.publisher.event_count(), 0);
}

#[tokio::test]
async fn a_publisher_that_fails_once_then_succeeds_gives_202() {
    let h = harness();
    h.publisher.fail_next(1);
    let (status, resp) = send_json(&h, &event(1)).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(resp["accepted"], 1);
    assert_eq!(h.publisher.event_count(), 1);
}

#[tokio::test]
async fn health_and_readiness_follow_the_publisher() {
    let h = harness();
    let get = |p: &str| Request::get(p).body(Body::empty()).unwrap();
    assert_eq!(send(&h, get("/healthz")).await.0, StatusCode::OK);
    assert_eq!(send(&h, get("/readyz")).await.0, StatusCode::OK);
    h.publisher.set_fail_always(true);
    // A readiness answer is reused for 2 s.
    assert_eq!(send(&h, get("/readyz")).await.0, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    assert_eq!(
        send(&h, get("/readyz")).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(send(&h, get("/healthz")).await.0, StatusCode::OK);
}

#[tokio::test]
async fn an_event_too_large_for_an_envelope_is_rejected_alone_not_dropped() {
    let h = harness_with(IngestConfig {
        envelope: shared::envelope::EnvelopeConfig {
            budget_bytes: 400,
            ..Default::default()
        },
        ..Default::default()
    });
    let mut big = event(2);
    big["attributes"] = json!({"note": "x".repeat(200)});
    let (status, resp) = send_json(&h, &json!([event(1), big])).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(codes(&resp), vec![(1, String::new(), "too_large".into())]);
    assert_eq!(h.publisher.event_count(), 1);
}

#[tokio::test]
async fn every_response_carries_a_request_id() {
    let h = harness();
    let (_, headers, _) = send(&h, Request::get("/healthz").body(Body::empty()).unwrap()).await;
    assert!(headers.contains_key("x-request-id"));
}

#[tokio::test]
async fn metrics_count_answers_events_and_publish_retries() {
    use shared::metrics::value_of;
    let h = harness();
    let mut bad = event(3);
    bad["currency"] = json!("usd");
    let (status, _) = send_json(&h, &json!([event(1), event(2), bad])).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, _, _) = send(
        &h,
        post(None).body(Body::from(event(4).to_string())).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    h.publisher.fail_next(1);
    assert_eq!(send_json(&h, &event(5)).await.0, StatusCode::ACCEPTED);
    h.publisher.set_fail_always(true);
    assert_eq!(
        send_json(&h, &event(6)).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );

    // Scraped through the endpoint, as Prometheus would.
    let scrape = shared::metrics::router(vec![h.state.metrics()])
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(scrape.status(), StatusCode::OK);
    assert_eq!(
        scrape.headers()["content-type"],
        shared::metrics::CONTENT_TYPE
    );
    let page = String::from_utf8(
        scrape
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    let v = |series: &str| {
        value_of(&page, series).unwrap_or_else(|| panic!("{series} missing from\n{page}"))
    };
    assert_eq!(v(r#"spillway_ingest_responses_total{status="202"}"#), 2.0);
    assert_eq!(v(r#"spillway_ingest_responses_total{status="401"}"#), 1.0);
    assert_eq!(v(r#"spillway_ingest_responses_total{status="503"}"#), 1.0);
    assert_eq!(v(r#"spillway_ingest_responses_total{status="400"}"#), 0.0);
    assert_eq!(v("spillway_ingest_events_accepted_total"), 3.0);
    assert_eq!(v("spillway_ingest_events_rejected_total"), 1.0);
    assert_eq!(v("spillway_ingest_envelopes_published_total"), 2.0);
    // One failed attempt before the second 202, two before the 503 (3 attempts).
    assert_eq!(v("spillway_ingest_publish_retries_total"), 3.0);
    assert_eq!(v("spillway_ingest_publish_seconds_count"), 3.0);
    assert_eq!(
        v(r#"spillway_ingest_publish_seconds_bucket{le="+Inf"}"#),
        3.0
    );
}

/// Counts readiness checks; each takes 50 ms, as a broker call would.
#[derive(Debug, Default)]
struct CountingPublisher {
    ready_calls: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl shared::Publisher for CountingPublisher {
    async fn publish(
        &self,
        envelopes: &[shared::Envelope],
    ) -> Result<shared::publisher::PublishReport, shared::publisher::PublishError> {
        Ok(shared::publisher::PublishReport {
            messages: envelopes.len(),
            events: envelopes.iter().map(|e| e.event_count).sum(),
            calls: 1,
        })
    }

    async fn ready(&self) -> Result<(), shared::publisher::PublishError> {
        self.ready_calls
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok(())
    }
}

/// `/readyz` is unauthenticated: a flood of it must not become a flood of broker calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_readiness_checks_makes_one_broker_call() {
    let publisher = Arc::new(CountingPublisher::default());
    let app = router(AppState::new(
        publisher.clone(),
        ApiKeys::new(Vec::new()),
        IngestConfig::default(),
    ));
    let calls = (0..50).map(|_| {
        app.clone()
            .oneshot(Request::get("/readyz").body(Body::empty()).unwrap())
    });
    for resp in futures::future::join_all(calls).await {
        assert_eq!(resp.unwrap().status(), StatusCode::OK);
    }
    assert_eq!(
        publisher
            .ready_calls
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}

/// A broker whose acknowledgement waits for the test's word, then keeps what it got.
#[derive(Debug)]
struct GatedPublisher {
    open: tokio::sync::Semaphore,
    calls: std::sync::atomic::AtomicUsize,
    kept: MemoryPublisher,
}

#[async_trait::async_trait]
impl shared::Publisher for GatedPublisher {
    async fn publish(
        &self,
        envelopes: &[shared::Envelope],
    ) -> Result<shared::publisher::PublishReport, shared::publisher::PublishError> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.open.acquire().await.unwrap().forget();
        self.kept.publish(envelopes).await
    }

    async fn ready(&self) -> Result<(), shared::publisher::PublishError> {
        Ok(())
    }
}

async fn inflight_gauge(state: &AppState) -> f64 {
    let page = shared::metrics::render_all(&[state.metrics()]);
    shared::metrics::value_of(&page, "spillway_ingest_inflight_bytes").unwrap()
}

/// Polls the gauge until `done` says yes (a spawned request got where the test waits for it).
async fn wait_for_gauge(state: &AppState, done: impl Fn(f64) -> bool) -> f64 {
    for _ in 0..500 {
        let held = inflight_gauge(state).await;
        if done(held) {
            return held;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "the in-flight gauge never got there: {}",
        inflight_gauge(state).await
    );
}

/// 4,096 connections could each upload a 1 MiB body and then wait on a slow broker with its
/// events packed, past any container's memory limit: the kill would take every request in
/// flight with it. A request past the memory budget is refused at once, nothing of it
/// published, and passes once the budget has room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_the_memory_budget_is_refused_with_503_overloaded_and_passes_later() {
    use shared::metrics::value_of;
    let publisher = Arc::new(GatedPublisher {
        open: tokio::sync::Semaphore::new(0),
        calls: 0.into(),
        kept: MemoryPublisher::new(),
    });
    let config = IngestConfig {
        max_inflight_bytes: 2_800,
        ..IngestConfig::default()
    };
    let state = state_over(publisher.clone(), config);
    let request = |body: String| {
        post(Some("key-all"))
            .header("content-length", body.len())
            .body(Body::from(body))
            .unwrap()
    };

    // A: its envelopes wait for the broker, holding twice their size.
    let waiting = tokio::spawn(router(state.clone()).oneshot(request(event(1).to_string())));
    for _ in 0..500 {
        if publisher.calls.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let held = inflight_gauge(&state).await;
    // Twice its one envelope; B's 2,500 bytes do not fit beside it in 2,800.
    assert!(held > 300.0 && held < 2_000.0, "{held}");

    // B: a 2,500-byte body (the event and blanks) does not fit beside it.
    let padded = format!(
        "{}{}",
        event(2),
        " ".repeat(2_500 - event(2).to_string().len())
    );
    let (status, headers, body) = send_to(&state, request(padded.clone())).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["error"]["code"], "overloaded", "{body}");
    assert_eq!(body["accepted"], 0);
    assert_eq!(headers["retry-after"], "1");

    // A is acknowledged; B, sent again, fits and passes.
    publisher.open.add_permits(2);
    assert_eq!(
        waiting.await.unwrap().unwrap().status(),
        StatusCode::ACCEPTED
    );
    let (status, _, _) = send_to(&state, request(padded)).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(publisher.kept.event_count(), 2);
    let bodies: String = publisher
        .kept
        .published()
        .iter()
        .map(|e| e.body.clone())
        .collect();
    for n in [1, 2] {
        assert!(
            bodies.contains(event(n)["event_id"].as_str().unwrap()),
            "{bodies}"
        );
    }

    let page = shared::metrics::render_all(&[state.metrics()]);
    assert_eq!(
        value_of(&page, "spillway_ingest_overloaded_total"),
        Some(1.0)
    );
    assert_eq!(value_of(&page, "spillway_ingest_inflight_bytes"), Some(0.0));
    assert_eq!(
        value_of(&page, r#"spillway_ingest_responses_total{status="503"}"#),
        Some(1.0)
    );
}

/// A body still on its way holds what its `Content-Length` announces (a slow client must not
/// get to hold memory unaccounted), and gives it back once answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_being_read_holds_its_length_of_the_budget() {
    let h = harness_with(IngestConfig {
        max_inflight_bytes: 4_000,
        ..IngestConfig::default()
    });
    let body = event(1).to_string();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    let slow = post(Some("key-all"))
        .header("content-length", 3_000)
        .body(Body::from_stream(tokio_stream_from(rx)))
        .unwrap();
    let reading = tokio::spawn(router(h.state.clone()).oneshot(slow));
    let held = wait_for_gauge(&h.state, |held| held > 0.0).await;
    assert_eq!(held, 3_000.0);

    let other = format!("{}{}", event(2), " ".repeat(1_100));
    let (status, _, body2) = send(&h, post(Some("key-all")).body(Body::from(other)).unwrap()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body2}");

    let padded = format!("{body}{}", " ".repeat(3_000 - body.len()));
    tx.send(Ok(padded.into_bytes())).await.unwrap();
    drop(tx);
    assert_eq!(
        reading.await.unwrap().unwrap().status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(inflight_gauge(&h.state).await, 0.0);
    assert_eq!(h.publisher.event_count(), 1);
}

/// The receiving half of a channel as a body stream.
fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Vec<u8>, std::io::Error>>,
) -> impl futures::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Refused values were quoted whole, escaped: long ids of U+0085 made a 400 several times
/// the size of its request (on Lambda, past the 6 MB response limit: a 502 the client
/// retried, publishing the request's valid events again each time).
#[tokio::test]
async fn a_refused_value_is_quoted_clipped_so_the_answer_stays_small() {
    let h = harness();
    // Three values of 8 KiB: the event stays under the 32 KiB limit of one event.
    let long = "\u{85}".repeat(4 * 1024);
    let mut bad = event(1);
    bad["event_id"] = json!(long);
    bad["currency"] = json!(long);
    bad["type"] = json!(long);
    let body = json!([bad, event(2)]).to_string();
    let (status, resp) = send_json(&h, &serde_json::from_str(&body).unwrap()).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let answer = resp.to_string();
    assert!(answer.len() < 2_000, "{} bytes: {answer}", answer.len());
    assert!(resp["rejected"][0]["event_id"].is_null(), "{resp}");
    let found = codes(&resp);
    for (field, code) in [
        ("/event_id", "invalid_uuid"),
        ("/currency", "invalid_currency"),
        ("/type", "invalid_value"),
    ] {
        assert!(
            found.contains(&(0, field.to_owned(), code.to_owned())),
            "{found:?}"
        );
    }
    let message = resp["rejected"][0]["errors"][0]["message"]
        .as_str()
        .unwrap();
    assert!(message.contains("(8192 bytes)"), "{message}");
}

/// Given twice, a header saying how to read the body was read as its first value by the
/// server and as the comma-joined list by Lambda: two answers to one request. Both 415.
#[tokio::test]
async fn a_content_type_or_encoding_given_twice_is_415() {
    let h = harness();
    let body = gzip(event(1).to_string().as_bytes());
    let (status, _, resp) = send(
        &h,
        post(Some("key-all"))
            .header("content-encoding", "identity")
            .header("content-encoding", "gzip")
            .body(Body::from(body))
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{resp}");
    assert!(
        resp["error"]["message"]
            .as_str()
            .unwrap()
            .contains("more than once"),
        "{resp}"
    );
    let (status, _, _) = send(
        &h,
        post(Some("key-all"))
            .header("content-type", "application/json")
            .body(Body::from(event(2).to_string()))
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(h.publisher.event_count(), 0);
}
