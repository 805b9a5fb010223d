//! The compiled `spillway-ingest` run as a Lambda function against the Runtime API emulator
//! answers API Gateway HTTP API (v2), Function URL and REST API (v1) events exactly as the
//! same binary answers as a server: same status, same body, same content type.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::Digest;
use shared::synthetic::SyntheticEvents;
use tests::dev_process::{bin_dir, DevProcess};
use tests::lambda_emulator::{LambdaFunction, RuntimeApi};
use tests::lambda_events::{apigw_v1, apigw_v2, function_url, http_answer, HttpAnswer, HttpCase};

const KEY: &str = "lambda-test-key";
const NARROW_KEY: &str = "lambda-narrow-key";
const MAX_WIRE_BYTES: usize = 20_000;

fn ingest_bin() -> PathBuf {
    let path = bin_dir().unwrap().join("spillway-ingest");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --bins` (make test does)",
        path.display()
    );
    path
}

fn sha256_hex(s: &str) -> String {
    hex_encode(&sha2::Sha256::digest(s.as_bytes()))
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The settings both runs share (environment variables, as on Lambda).
fn settings(data_dir: &str) -> Vec<(String, String)> {
    let keys = json!([
        {"sha256": sha256_hex(KEY), "tenant": "acme", "advertisers": "*"},
        {"sha256": sha256_hex(NARROW_KEY), "tenant": "narrow", "advertisers": ["adv-nobody"]}
    ]);
    vec![
        ("SPILLWAY_API_KEYS".into(), keys.to_string()),
        ("SPILLWAY_BROKER".into(), "embedded".into()),
        ("SPILLWAY_DATA_DIR".into(), data_dir.into()),
        ("SPILLWAY_MAX_WIRE_BYTES".into(), MAX_WIRE_BYTES.to_string()),
    ]
}

struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(data_dir: &str) -> Server {
    let addr = DevProcess::free_addr().unwrap();
    let mut cmd = Command::new(ingest_bin());
    cmd.args(["--listen", &addr.to_string()])
        .env_remove("AWS_LAMBDA_RUNTIME_API")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (k, v) in settings(data_dir) {
        cmd.env(k, v);
    }
    let child = cmd.spawn().unwrap();
    let start = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "server did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Server { child, addr }
}

fn events(seed: u64, n: usize) -> Vec<Value> {
    let mut g = SyntheticEvents::new(seed, 4);
    (0..n).map(|_| g.event()).collect()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

fn case(
    name: &'static str,
    method: &'static str,
    path: &'static str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
    base64: bool,
) -> HttpCase {
    HttpCase {
        name,
        method,
        path,
        headers: headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        body,
        base64,
    }
}

/// The requests compared, each built once and sent to both runs.
fn cases() -> Vec<HttpCase> {
    let auth = format!("Bearer {KEY}");
    let narrow = format!("Bearer {NARROW_KEY}");
    let auth = Box::leak(auth.into_boxed_str()) as &str;
    let narrow = Box::leak(narrow.into_boxed_str()) as &str;
    let json_h = [
        ("authorization", auth),
        ("content-type", "application/json"),
    ];
    let one = serde_json::to_vec(&events(1, 1)[0]).unwrap();
    let mut mixed = events(2, 3);
    mixed[1]["currency"] = json!("usd");
    mixed[2]["event_id"] = json!("not-a-uuid");
    let mut invalid = events(3, 2);
    invalid[0]["type"] = json!("hover");
    invalid[1]["occurred_at"] = json!("yesterday");
    let array = serde_json::to_vec(&events(4, 50)).unwrap();
    let ndjson: Vec<u8> = events(5, 5)
        .iter()
        .flat_map(|e| {
            let mut line = serde_json::to_vec(e).unwrap();
            line.push(b'\n');
            line
        })
        .collect();
    let zstd_body = zstd::encode_all(&array[..], 3).unwrap();
    let big = serde_json::to_vec(&events(6, 80)).unwrap();
    assert!(big.len() > MAX_WIRE_BYTES);
    vec![
        case(
            "one event",
            "POST",
            "/v1/events",
            &json_h,
            one.clone(),
            false,
        ),
        case(
            "one event, base64 body",
            "POST",
            "/v1/events",
            &json_h,
            one.clone(),
            true,
        ),
        case(
            "mixed valid and invalid",
            "POST",
            "/v1/events",
            &json_h,
            serde_json::to_vec(&mixed).unwrap(),
            false,
        ),
        case(
            "nothing valid",
            "POST",
            "/v1/events",
            &json_h,
            serde_json::to_vec(&invalid).unwrap(),
            false,
        ),
        case(
            "not JSON",
            "POST",
            "/v1/events",
            &json_h,
            b"{\"event_id\":".to_vec(),
            false,
        ),
        case(
            "no key",
            "POST",
            "/v1/events",
            &[("content-type", "application/json")],
            one.clone(),
            false,
        ),
        case(
            "advertiser not allowed",
            "POST",
            "/v1/events",
            &[
                ("authorization", narrow),
                ("content-type", "application/json"),
            ],
            one.clone(),
            false,
        ),
        case(
            "gzip array",
            "POST",
            "/v1/events",
            &[
                ("authorization", auth),
                ("content-type", "application/json"),
                ("content-encoding", "gzip"),
            ],
            gzip(&array),
            true,
        ),
        case(
            "zstd array",
            "POST",
            "/v1/events",
            &[
                ("authorization", auth),
                ("content-type", "application/json"),
                ("content-encoding", "zstd"),
            ],
            zstd_body,
            true,
        ),
        case(
            "ndjson",
            "POST",
            "/v1/events",
            &[
                ("authorization", auth),
                ("content-type", "application/x-ndjson"),
            ],
            ndjson,
            false,
        ),
        case(
            "unsupported type",
            "POST",
            "/v1/events",
            &[("authorization", auth), ("content-type", "text/plain")],
            one.clone(),
            false,
        ),
        case(
            "unsupported encoding",
            "POST",
            "/v1/events",
            &[
                ("authorization", auth),
                ("content-type", "application/json"),
                ("content-encoding", "br"),
            ],
            one,
            true,
        ),
        case(
            "over the wire limit",
            "POST",
            "/v1/events",
            &json_h,
            big,
            false,
        ),
        case("health", "GET", "/healthz", &[], Vec::new(), false),
        case("ready", "GET", "/readyz", &[], Vec::new(), false),
        case("unknown path", "GET", "/v2/nothing", &[], Vec::new(), false),
    ]
}

async fn from_server(client: &reqwest::Client, addr: SocketAddr, c: &HttpCase) -> HttpAnswer {
    let url = format!("http://{addr}{}", c.path);
    let mut req = client.request(c.method.parse().unwrap(), url);
    for (k, v) in &c.headers {
        req = req.header(k, v);
    }
    if !c.body.is_empty() {
        req = req.body(c.body.clone());
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let body = resp.bytes().await.unwrap().to_vec();
    HttpAnswer {
        status,
        headers,
        body,
    }
}

fn comparable(a: &HttpAnswer) -> (u16, Option<String>, Option<String>, Value) {
    let body = serde_json::from_slice(&a.body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&a.body).into_owned()));
    (
        a.status,
        a.headers.get("content-type").cloned(),
        a.headers.get("retry-after").cloned(),
        body,
    )
}

#[tokio::test]
async fn api_gateway_v2_function_url_and_rest_events_get_the_servers_answers() {
    let server_dir = tempfile::tempdir().unwrap();
    let lambda_dir = tempfile::tempdir().unwrap();
    let server = start_server(server_dir.path().to_str().unwrap());
    let api = RuntimeApi::start("spillway-ingest").await.unwrap();
    let env = settings(lambda_dir.path().to_str().unwrap());
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut function = LambdaFunction::start(&ingest_bin(), &api, &env_refs).unwrap();
    function
        .wait_ready(&api, Duration::from_secs(30))
        .await
        .unwrap();
    // A fresh connection per request: a case the server answers before reading its body
    // (413 over the wire limit) ends with the server closing the connection, and a pooled
    // client could send the next case on it as it closes (seen once under load:
    // `IncompleteMessage` on the `/healthz` after it). What is compared is each answer.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();

    let mut statuses = Vec::new();
    for c in cases() {
        let expected = comparable(&from_server(&client, server.addr, &c).await);
        for (shape, event) in [
            ("HTTP API v2", apigw_v2(&c)),
            ("Function URL", function_url(&c)),
            ("REST API v1", apigw_v1(&c)),
        ] {
            let out = api
                .invoke(&event, Duration::from_secs(10))
                .await
                .unwrap()
                .response()
                .unwrap_or_else(|e| panic!("{} via {shape}: {e}", c.name));
            let got = comparable(&http_answer(&out).unwrap());
            assert_eq!(got, expected, "{} via {shape}", c.name);
        }
        statuses.push((c.name, expected.0));
    }
    // The cases cover every answer the API gives, not only the happy path.
    let seen: std::collections::BTreeSet<u16> = statuses.iter().map(|s| s.1).collect();
    for status in [200, 202, 400, 401, 403, 404, 413, 415] {
        assert!(
            seen.contains(&status),
            "no case answered {status}: {statuses:?}"
        );
    }
}

/// On Lambda nothing can be scraped, and the ingest function had no metrics at all: API
/// Gateway's 5XX count mixes `overloaded` with publish failures, and publish retries showed
/// nowhere. With `SPILLWAY_EMF_NAMESPACE` each answer to `POST /v1/events` writes one
/// Embedded Metric Format line on stdout; other paths write none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_answer_to_a_post_logs_one_embedded_metric_format_line() {
    let dir = tempfile::tempdir().unwrap();
    let api = RuntimeApi::start("spillway-ingest").await.unwrap();
    let mut env = settings(dir.path().to_str().unwrap());
    env.push(("SPILLWAY_EMF_NAMESPACE".into(), "SpillwayTest".into()));
    env.push(("AWS_LAMBDA_FUNCTION_NAME".into(), "spillway-ingest".into()));
    // One envelope for the request's valid events, whatever their types.
    env.push(("SPILLWAY_ENVELOPE_SPLIT_BY_TYPE".into(), "false".into()));
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut function = LambdaFunction::start_capturing(&ingest_bin(), &api, &env_refs).unwrap();
    function
        .wait_ready(&api, Duration::from_secs(30))
        .await
        .unwrap();
    let auth = format!("Bearer {KEY}");
    let json_h = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    let mut mixed = events(7, 4);
    mixed[3]["currency"] = json!("usd");
    let requests = [
        case(
            "3 valid, 1 invalid",
            "POST",
            "/v1/events",
            &json_h,
            serde_json::to_vec(&mixed).unwrap(),
            false,
        ),
        case(
            "no key",
            "POST",
            "/v1/events",
            &[("content-type", "application/json")],
            b"[]".to_vec(),
            false,
        ),
        case("health", "GET", "/healthz", &[], Vec::new(), false),
    ];
    let mut statuses = Vec::new();
    for c in &requests {
        let out = api
            .invoke(&function_url(c), Duration::from_secs(10))
            .await
            .unwrap()
            .response()
            .unwrap();
        statuses.push(http_answer(&out).unwrap().status);
    }
    assert_eq!(statuses, [202, 401, 200]);
    // The reader thread may still be a line behind the last answer.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let lines: Vec<Value> = function
        .stdout_lines()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("_aws").is_some())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    let meta = &lines[0]["_aws"]["CloudWatchMetrics"][0];
    assert_eq!(meta["Namespace"], "SpillwayTest");
    assert_eq!(meta["Dimensions"], json!([["FunctionName"]]));
    assert_eq!(lines[0]["FunctionName"], "spillway-ingest");
    let names: Vec<&str> = meta["Metrics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["Name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ingest_api::metrics::EMF_METRICS);
    let counts = |v: &Value| -> Vec<u64> { names.iter().map(|n| v[n].as_u64().unwrap()).collect() };
    // Requests, EventsAccepted, EventsRejected, EnvelopesPublished, PublishRetries,
    // Unauthorized, Throttled, Overloaded, PublishFailed, BadRequests, ColdStart.
    assert_eq!(counts(&lines[0]), [1, 3, 1, 1, 0, 0, 0, 0, 0, 0, 1]);
    assert_eq!(counts(&lines[1]), [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0]);
}
