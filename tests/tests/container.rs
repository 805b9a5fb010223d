//! The container image (`infra/container/Dockerfile`) and the Kubernetes manifests
//! (`infra/k8s`), for real: the image's runtime stage is built with podman from the
//! workspace's binaries, and its two roles run as the manifests run them (read-only root
//! filesystem, user 10001, no shell needed) against LocalStack and PostgreSQL; the manifests
//! are checked against the Kubernetes API schema and the binaries' own settings.
//! `scripts/ensure-containers.sh` provides podman, the Debian base image and the validator.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};
use shared::synthetic::SyntheticEvents;
use tests::dev_process::bin_dir;
use tests::localstack::{self, create_topology};
use tests::postgres::{connect, under_ci, TestDb};

/// The base `scripts/ensure-containers.sh` makes with debootstrap, for `debian:bookworm-slim`.
const BASE_IMAGE: &str = "localhost/spillway-test-base:bookworm";
const BINARIES: [&str; 3] = ["spillway", "spillway-ingest", "spillway-worker"];
/// The Kubernetes version the manifests are checked against.
const KUBERNETES: &str = "1.33.0";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn podman(args: &[&str]) -> Output {
    Command::new("podman")
        .args(args)
        .env(
            "CONTAINERS_CONF",
            repo().join("tests/podman/containers.conf"),
        )
        .output()
        .expect("podman runs")
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Whether podman and the base image are here; under CI they must be.
fn containers_ready() -> bool {
    let ready = Command::new("podman")
        .args(["image", "exists", BASE_IMAGE])
        .env(
            "CONTAINERS_CONF",
            repo().join("tests/podman/containers.conf"),
        )
        .status()
        .is_ok_and(|s| s.success());
    if !ready {
        let what = format!("podman or {BASE_IMAGE} is missing; run scripts/ensure-containers.sh");
        assert!(!under_ci(), "{what} (required under CI=true)");
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            format!("\n!!!!! SKIPPED: {what} !!!!!\n").as_bytes(),
        );
    }
    ready
}

/// A container removed (with its logs printed) when the test ends, however it ends.
struct Container(String);

impl Container {
    fn logs(&self) -> String {
        let out = podman(&["logs", &self.0]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() {
            println!("--- logs of {} ---\n{}", self.0, self.logs());
        }
        podman(&["rm", "-f", "-t", "0", &self.0]);
    }
}

/// An image removed when the test ends.
struct Image(String);

impl Drop for Image {
    fn drop(&mut self) {
        podman(&["rmi", "-f", &self.0]);
    }
}

/// Builds the Dockerfile's runtime stage with the workspace's binaries as its `build` stage
/// (debug symbols stripped: the image would be 900 MB otherwise).
fn build_image(tag: &str) -> Image {
    let stage = tempfile::tempdir().unwrap();
    std::fs::create_dir(stage.path().join("out")).unwrap();
    for b in BINARIES {
        let src = bin_dir().unwrap().join(b);
        assert!(
            src.exists(),
            "{} missing: cargo build --workspace --bins",
            src.display()
        );
        let dst = stage.path().join("out").join(b);
        let out = Command::new("objcopy")
            .arg("--strip-debug")
            .arg(&src)
            .arg(&dst)
            .output()
            .unwrap();
        ok(&out, "objcopy");
    }
    // The build stage (and so the context) is not used: an empty context is enough.
    let context = tempfile::tempdir().unwrap();
    let dockerfile = repo().join("infra/container/Dockerfile");
    let out = podman(&[
        "build",
        "--quiet",
        "--pull=never",
        "--build-arg",
        &format!("BASE_IMAGE={BASE_IMAGE}"),
        "--build-context",
        &format!("build={}", stage.path().display()),
        "-t",
        tag,
        "-f",
        dockerfile.to_str().unwrap(),
        context.path().to_str().unwrap(),
    ]);
    ok(&out, "podman build");
    Image(tag.to_owned())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `image` detached on the host network with the manifests' hardening, `env` set and
/// `command` (the image's own when empty).
fn run(name: &str, image: &str, env: &[(&str, String)], command: &[&str]) -> Container {
    let mut args: Vec<String> = [
        "run",
        "-d",
        "--name",
        name,
        "--network",
        "host",
        "--read-only",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
    ]
    .map(str::to_owned)
    .to_vec();
    for (k, v) in env {
        args.push("-e".into());
        args.push(format!("{k}={v}"));
    }
    args.push(image.to_owned());
    args.extend(command.iter().map(|c| (*c).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&podman(&args), "podman run");
    Container(name.to_owned())
}

async fn wait_for(url: &str, container: &Container) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = reqwest::get(url).await {
            if r.status() == 200 {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{url} did not answer 200 in 60 s:\n{}",
            container.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Sends SIGTERM as an orchestrator does (`podman stop`, 30 s before SIGKILL), and returns
/// the exit code and how long the stop took.
fn stop(c: &Container) -> (String, Duration) {
    let started = Instant::now();
    ok(&podman(&["stop", "-t", "30", &c.0]), "podman stop");
    let took = started.elapsed();
    let code = ok(
        &podman(&["inspect", "-f", "{{.State.ExitCode}}", &c.0]),
        "podman inspect",
    );
    (code, took)
}

#[test]
fn the_kubernetes_manifests_are_valid_and_name_only_settings_the_binaries_read() {
    let cache = std::env::var("XDG_CACHE_HOME").map_or_else(
        |_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache"),
        PathBuf::from,
    );
    let python = cache.join("spillway/k8s-validate-venv/bin/python");
    if !python.exists() {
        let what = "kubernetes-validate is missing; run scripts/ensure-containers.sh";
        assert!(!under_ci(), "{what} (required under CI=true)");
        println!("SKIPPED: {what}");
        return;
    }
    let out = Command::new(python)
        .arg(repo().join("scripts/check-k8s.py"))
        .arg(repo().join("infra/k8s"))
        .arg(bin_dir().unwrap())
        .arg(KUBERNETES)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    println!("{report}");
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("2 containers"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_runs_ingest_and_worker_on_sns_sqs_and_postgres_and_stops_cleanly() {
    if !containers_ready() || !localstack::available().await {
        return;
    }
    let Some(db) = TestDb::create().await else {
        return;
    };
    // Also exports the AWS_* settings passed on to the containers.
    let config = localstack::sdk_config().await;
    let topo = create_topology(&config, true, 30, 5).await.unwrap();
    let suffix = localstack::suffix();
    let image = build_image(&format!("localhost/spillway-test:{suffix}"));
    let aws: Vec<(&str, String)> = [
        "AWS_ENDPOINT_URL",
        "AWS_REGION",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    ]
    .into_iter()
    .map(|k| (k, std::env::var(k).unwrap()))
    .collect();
    let key = "container-test-key";
    let keys = serde_json::json!([{
        "sha256": format!("{:x}", Sha256::digest(key.as_bytes())),
        "tenant": "acme",
        "advertisers": "*",
    }]);

    let (api, metrics, ingest_metrics) = (free_port(), free_port(), free_port());
    let mut env = aws.clone();
    env.extend([
        ("SPILLWAY_LISTEN", format!("127.0.0.1:{api}")),
        ("SPILLWAY_BROKER", "aws".into()),
        ("SPILLWAY_TOPIC_ARN", topo.topic_arn.clone()),
        ("SPILLWAY_API_KEYS", keys.to_string()),
        (
            "SPILLWAY_METRICS_LISTEN",
            format!("127.0.0.1:{ingest_metrics}"),
        ),
    ]);
    // No command: the image's own (spillway-ingest).
    let ingest = run(&format!("spillway-ingest-{suffix}"), &image.0, &env, &[]);
    let mut env = aws.clone();
    env.extend([
        ("SPILLWAY_BROKER", "aws".into()),
        ("SPILLWAY_QUEUE_URL", topo.queue_url.clone()),
        ("SPILLWAY_DLQ_URL", topo.dlq_url.clone()),
        ("SPILLWAY_SINK", "postgres".into()),
        ("DATABASE_URL", db.url.clone()),
        ("SPILLWAY_METRICS_LISTEN", format!("127.0.0.1:{metrics}")),
    ]);
    let worker = run(
        &format!("spillway-worker-{suffix}"),
        &image.0,
        &env,
        &["spillway-worker"],
    );
    // The probes of infra/k8s: ingest ready once SNS answers, and alive on its metrics
    // listener (off the API's connection cap), the worker's /healthz.
    wait_for(&format!("http://127.0.0.1:{api}/readyz"), &ingest).await;
    wait_for(
        &format!("http://127.0.0.1:{ingest_metrics}/healthz"),
        &ingest,
    )
    .await;
    wait_for(&format!("http://127.0.0.1:{metrics}/healthz"), &worker).await;

    let mut g = SyntheticEvents::new(21, 5);
    let events: Vec<Value> = (0..300).map(|_| g.event()).collect();
    let client = reqwest::Client::new();
    for chunk in events.chunks(100) {
        let resp = client
            .post(format!("http://127.0.0.1:{api}/v1/events"))
            .bearer_auth(key)
            .json(&chunk)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202, "{}", resp.text().await.unwrap());
    }
    let pg = connect(&db.url).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // The table exists once the worker migrated at start (SPILLWAY_MIGRATE).
        let stored: i64 = match pg.query_one("SELECT count(*) FROM ad_events", &[]).await {
            Ok(row) => row.get(0),
            Err(_) => 0,
        };
        if stored == 300 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{stored} of 300 stored in 60 s:\n{}",
            worker.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    for c in [&worker, &ingest] {
        let (code, took) = stop(c);
        println!("{}: exit {code} {took:?} after SIGTERM", c.0);
        assert_eq!(code, "0", "{} exits 0 on SIGTERM:\n{}", c.0, c.logs());
        assert!(took < Duration::from_secs(10), "{}: {took:?}", c.0);
    }
}
