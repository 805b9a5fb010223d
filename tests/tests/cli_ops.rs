//! The operator commands' answers: `loadgen` fails a run that got nothing accepted and
//! keeps every acknowledged id when interrupted, and `stats` reads the store it is pointed
//! at without writing to it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use shared::event::EventId;
use shared::sqlite_sink::SqliteSink;

use tests::dev_process::{spillway_bin, DevProcess};
use tests::postgres::{connect, TestDb};

fn spillway(args: &[&str]) -> Output {
    Command::new(spillway_bin().unwrap())
        .args(args)
        .output()
        .unwrap()
}

/// A wrong key answers 401 to every request: the run used to print `accepted 0` and exit 0,
/// so a script or CI step running it passed on a broken pipeline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_fails_a_run_in_which_no_event_was_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let dev = DevProcess::start(dir.path(), &[]).unwrap();
    let url = dev.events_url();
    let run = |key: &str| {
        spillway(&[
            "loadgen",
            "--url",
            &url,
            "--api-key",
            key,
            "--rate",
            "200",
            "--duration",
            "1s",
        ])
    };
    let refused = run("not-the-key");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{err}");
    assert!(err.contains("no event was accepted"), "{err}");
    assert!(err.contains("every answer was 401"), "{err}");
    // The server's root instead of the endpoint: every answer 404, said as such.
    let root = url.trim_end_matches("/v1/events").to_owned() + "/";
    let lost = spillway(&[
        "loadgen",
        "--url",
        &root,
        "--api-key",
        &dev.key,
        "--rate",
        "200",
        "--duration",
        "1s",
    ]);
    let err = String::from_utf8_lossy(&lost.stderr);
    assert!(!lost.status.success(), "{err}");
    assert!(
        err.contains("not the ingest endpoint") && err.contains("/v1/events"),
        "{err}"
    );
    let accepted = run(&dev.key);
    assert!(
        accepted.status.success(),
        "{}",
        String::from_utf8_lossy(&accepted.stderr)
    );
    // `--api-key-file` wins over SPILLWAY_API_KEY: with the variable exported it used to be
    // refused as conflicting with `--api-key`.
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, format!("{}\n", dev.key)).unwrap();
    let from_file = Command::new(spillway_bin().unwrap())
        .args([
            "loadgen",
            "--url",
            &url,
            "--rate",
            "200",
            "--duration",
            "1s",
        ])
        .arg("--api-key-file")
        .arg(&key_file)
        .env("SPILLWAY_API_KEY", "not-the-key")
        .output()
        .unwrap();
    assert!(
        from_file.status.success(),
        "{}",
        String::from_utf8_lossy(&from_file.stderr)
    );
    dev.terminate(Duration::from_secs(30)).unwrap();
}

/// Ctrl-C killed loadgen with the ids of acknowledged requests still in its buffer (and
/// those of the requests in flight never read): a checker run on the file then reported
/// stored events as "unexpected". Now the run stops, the requests in flight are answered,
/// and every event the store holds is in the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_interrupted_answers_its_requests_in_flight_and_writes_every_acknowledged_id() {
    let dir = tempfile::tempdir().unwrap();
    let dev = DevProcess::start(dir.path(), &[]).unwrap();
    let ids_file = dir.path().join("acked.ids");
    let mut loadgen = Command::new(spillway_bin().unwrap())
        .args([
            "loadgen",
            "--json",
            "--url",
            &dev.events_url(),
            "--api-key",
            &dev.key,
        ])
        .args(["--rate", "2000", "--duration", "300s", "--batch-size", "50"])
        .args(["--concurrency", "8", "--ids-out"])
        .arg(&ids_file)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let sent = Command::new("kill")
        .args(["-INT", &loadgen.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let stopping = Instant::now();
    while loadgen.try_wait().unwrap().is_none() {
        assert!(
            stopping.elapsed() < Duration::from_secs(20),
            "loadgen still running 20 s after SIGINT"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = loadgen.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", out.status);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<EventId> = std::fs::read_to_string(&ids_file)
        .unwrap()
        .lines()
        .map(|l| EventId::parse(l).unwrap())
        .collect();
    assert!(ids.len() >= 1_000, "only {} ids", ids.len());
    assert_eq!(report["accepted"].as_u64(), Some(ids.len() as u64));

    // Once the worker is done, the store holds exactly the acknowledged events.
    let data_dir = dir.path().to_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = spillway(&["stats", "--json", "--data-dir", data_dir]);
        let s: Value = serde_json::from_slice(&out.stdout).unwrap();
        if s["queue_depth"] == 0 && s["in_flight"] == 0 {
            assert_eq!(s["events_stored"].as_u64(), Some(ids.len() as u64), "{s}");
            break;
        }
        assert!(Instant::now() < deadline, "not drained: {s}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let store = SqliteSink::open(dir.path().join("store.db")).unwrap();
    assert_eq!(store.count_ids(&ids).await.unwrap(), ids.len());
    dev.terminate(Duration::from_secs(30)).unwrap();
}

/// `--events-out` holds the acknowledged events as sent, the rejected ones left out, in the
/// same order as `--ids-out`: what the fault tests compare the store's rollups with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_writes_the_acknowledged_events_as_sent_without_the_rejected_ones() {
    let dir = tempfile::tempdir().unwrap();
    let dev = DevProcess::start(dir.path(), &[]).unwrap();
    let (ids_file, events_file) = (
        dir.path().join("acked.ids"),
        dir.path().join("acked.events"),
    );
    let out = Command::new(spillway_bin().unwrap())
        .args(["loadgen", "--json", "--url", &dev.events_url()])
        .args(["--api-key", &dev.key, "--rate", "500", "--duration", "1s"])
        .args([
            "--batch-size",
            "20",
            "--invalid-fraction",
            "0.3",
            "--ids-out",
        ])
        .arg(&ids_file)
        .arg("--events-out")
        .arg(&events_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<String> = std::fs::read_to_string(&ids_file)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let events = tests::checker::read_events(&events_file).unwrap();
    assert!(report["rejected"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["accepted"].as_u64(), Some(events.len() as u64));
    let event_ids: Vec<String> = events.iter().map(|e| e.event_id.to_string()).collect();
    assert_eq!(event_ids, ids);
    dev.terminate(Duration::from_secs(30)).unwrap();
}

/// A 202 whose body is not the API's report (a proxy's page) wrote no id, and its events
/// were not counted accepted: a check of the store on that file could only under-report
/// what was lost. Now all of its events count as acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_202_without_the_api_s_report_counts_every_event_of_its_request() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route(
        "/v1/events",
        axum::routing::post(|| async { (axum::http::StatusCode::ACCEPTED, "<html>queued</html>") }),
    );
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let dir = tempfile::tempdir().unwrap();
    let ids_file = dir.path().join("acked.ids");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(spillway_bin().unwrap())
            .args([
                "loadgen",
                "--json",
                "--url",
                &format!("http://{addr}/v1/events"),
            ])
            .args(["--api-key", "k", "--rate", "50", "--duration", "1s"])
            .args(["--batch-size", "10", "--concurrency", "1"])
            .arg("--ids-out")
            .arg(&ids_file)
            .output()
            .map(|o| (o, std::fs::read_to_string(&ids_file).unwrap()))
    })
    .await
    .unwrap()
    .unwrap();
    server.abort();
    let (out, ids) = out;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let requests = report["requests"].as_u64().unwrap();
    assert!(requests >= 2, "{report}");
    assert_eq!(
        report["unreadable_202"].as_u64(),
        Some(requests),
        "{report}"
    );
    assert_eq!(report["accepted"].as_u64(), Some(requests * 10), "{report}");
    assert_eq!(ids.lines().count() as u64, requests * 10);
}

/// `stats` pointed at a store that is not the workers' used to create an empty one (SQLite)
/// or migrate it (PostgreSQL, `--migrate` defaulting on) and report "0 events stored".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_refuses_a_missing_store_and_migrates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // A broker to read: dev made it.
    let dev = DevProcess::start(dir.path(), &[]).unwrap();
    dev.terminate(Duration::from_secs(30)).unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let ok = spillway(&["stats", "--json", "--data-dir", data_dir]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let missing = dir.path().join("elsewhere.db");
    let out = spillway(&[
        "stats",
        "--data-dir",
        data_dir,
        "--sqlite-path",
        missing.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("no SQLite store at"), "{err}");
    assert!(!missing.exists(), "created an empty store");

    let Some(db) = TestDb::create().await else {
        return;
    };
    let out = spillway(&[
        "stats",
        "--data-dir",
        data_dir,
        "--sink",
        "postgres",
        "--database-url",
        &db.url,
    ]);
    assert!(
        !out.status.success(),
        "an unmigrated database has no events to count"
    );
    let pg = connect(&db.url).await.unwrap();
    let migrated: Option<String> = pg
        .query_one("SELECT to_regclass('spillway_migrations')::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(migrated, None, "stats migrated the database");
}

/// A deployment that sets the AWS, Kafka or PostgreSQL settings but forgets
/// `SPILLWAY_BROKER` / `SPILLWAY_SINK` got the embedded defaults without a word: ingest
/// answered 202 for events kept in a SQLite file on the container's own disk, and a worker
/// acknowledged messages into a SQLite file instead of the database. Both binaries now refuse
/// to start and say which setting to add; `spillway dev` warns and runs.
#[test]
fn settings_of_a_broker_or_store_that_was_not_chosen_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let bins = tests::dev_process::bin_dir().unwrap();
    let run = |bin: &str, env: &[(&str, &str)]| {
        let mut cmd = Command::new(bins.join(bin));
        cmd.env("SPILLWAY_DATA_DIR", dir.path())
            .env("SPILLWAY_LISTEN", "127.0.0.1:0")
            .stdin(Stdio::null());
        for var in [
            "SPILLWAY_BROKER",
            "SPILLWAY_SINK",
            "SPILLWAY_TOPIC_ARN",
            "SPILLWAY_QUEUE_URL",
            "SPILLWAY_DLQ_URL",
            "SPILLWAY_KAFKA_BOOTSTRAP_SERVERS",
            "DATABASE_URL",
        ] {
            cmd.env_remove(var);
        }
        cmd.envs(env.iter().copied());
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let arn = (
        "SPILLWAY_TOPIC_ARN",
        "arn:aws:sns:us-east-1:000000000000:events",
    );
    let (code, stderr) = run("spillway-ingest", &[arn]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("SPILLWAY_TOPIC_ARN (--topic-arn) set, but the broker is the embedded one")
            && stderr.contains("Set --broker aws"),
        "{stderr}"
    );
    let kafka = ("SPILLWAY_KAFKA_BOOTSTRAP_SERVERS", "kafka-1:9092");
    let (code, stderr) = run("spillway-worker", &[kafka]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("SPILLWAY_KAFKA_BOOTSTRAP_SERVERS"),
        "{stderr}"
    );
    // The broker is chosen; the store is not.
    let url = ("DATABASE_URL", "postgres://spillway@db:5432/spillway");
    let (code, stderr) = run(
        "spillway-worker",
        &[
            ("SPILLWAY_BROKER", "aws"),
            ("SPILLWAY_QUEUE_URL", "http://127.0.0.1:9/q"),
            url,
        ],
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("DATABASE_URL (--database-url) is set, but the store is SQLite")
            && stderr.contains("Set --sink postgres"),
        "{stderr}"
    );
    // Read-only too: stats would read a store the operator did not mean.
    let out = Command::new(spillway_bin().unwrap())
        .args(["stats", "--data-dir"])
        .arg(dir.path())
        .env("DATABASE_URL", url.1)
        .env_remove("SPILLWAY_SINK")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("Set --sink postgres"),
        "{stderr}"
    );
}

/// `spillway dev` is run from a developer's shell, which may hold a DATABASE_URL meant for
/// something else, or a mistyped RUST_LOG: it says what it ignores, and serves.
#[test]
fn dev_warns_about_a_database_url_it_ignores_and_serves() {
    use std::io::{BufRead, BufReader, Read};
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(spillway_bin().unwrap())
        .args(["dev", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("DATABASE_URL", "postgres://spillway@db:5432/spillway")
        // Unusable logging settings fell back to info / JSON without a word.
        .env("RUST_LOG", "warn,spillway=bogus")
        .env("SPILLWAY_LOG_FORMAT", "txt")
        .env_remove("SPILLWAY_SINK")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let serving = stdout
        .lines()
        .map_while(Result::ok)
        .any(|line| line.contains("listening on http://"));
    child.kill().unwrap();
    child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(serving, "dev did not serve: {stderr}");
    assert!(
        stderr.contains("DATABASE_URL (--database-url) is set, but the store is SQLite"),
        "{stderr}"
    );
    assert!(
        stderr.contains(r#"RUST_LOG \"warn,spillway=bogus\""#)
            && stderr.contains("logging at info")
            && stderr.contains(r#"SPILLWAY_LOG_FORMAT \"txt\" is neither text nor json"#),
        "{stderr}"
    );
}

/// A zero where at least 1 is needed was raised to 1 without a word (`--max-connections 0`
/// served one client connection at a time, `--write-burst 0` wrote every event alone), where
/// elsewhere 0 means "off". It is refused, naming the flag.
#[test]
fn a_zero_count_is_refused_naming_the_flag() {
    let bins = tests::dev_process::bin_dir().unwrap();
    for (bin, args) in [
        ("spillway-ingest", &["--max-connections", "0"][..]),
        ("spillway-ingest", &["--max-events", "0"]),
        ("spillway-ingest", &["--client-timeout-secs", "0"]),
        ("spillway-ingest", &["--publish-attempts", "0"]),
        ("spillway-worker", &["--write-burst", "0"]),
        ("spillway-worker", &["--retry-min-secs", "0"]),
        ("spillway-worker", &["--pg-max-connections", "0"]),
        (
            "spillway",
            &["dlq", "replay", "--to", "source", "--concurrency", "0"],
        ),
        (
            "spillway",
            &["dlq", "replay", "--to", "source", "--max-replays", "0"],
        ),
        (
            "spillway",
            &["dlq", "replay", "--to", "source", "--lease-secs", "0"],
        ),
    ] {
        let out = Command::new(bins.join(bin))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let flag = args
            .iter()
            .find(|a| a.starts_with("--") && **a != "--to")
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bin} {args:?}: {stderr}");
        assert!(
            stderr.contains(&format!("invalid value '0' for '{flag}")),
            "{bin} {args:?}: {stderr}"
        );
    }
}

/// `spillway dlq` filters that can match nothing by their own terms (a misspelled `--type`,
/// an age window that is empty) ran and matched nothing without a word; a fraction of a
/// native-redrive rate was rounded (`--rate 0.4` sent as 0); `peek -n 0` said the DLQ was
/// empty. Each is refused before the broker is even opened (here there is none).
#[test]
fn dlq_filters_and_rates_that_cannot_work_are_refused_before_anything_is_opened() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    for (args, expected) in [
        (
            &["replay", "--to", "source", "--type", "clik"][..],
            "--type \"clik\" is not an event type; use one of impression,",
        ),
        (
            &[
                "export",
                "--out",
                "x.ndjson",
                "--older-than",
                "7d",
                "--newer-than",
                "1h",
            ],
            "--older-than 7d and --newer-than 1h select nothing",
        ),
        (
            &[
                "redrive",
                "--broker",
                "aws",
                "--dlq",
                "http://127.0.0.1:9/q",
                "--rate",
                "0.4",
            ],
            "--rate 0.4 for a native redrive must be a whole number",
        ),
        (&["peek", "-n", "0"], "invalid value '0' for '--count <N>'"),
    ] {
        let out = Command::new(spillway_bin().unwrap())
            .arg("dlq")
            .args(args)
            .args(["--data-dir", data_dir])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("no embedded broker"), "{args:?}: {stderr}");
    }
}

/// Keys were read at start only: a key revoked from the keys file (a Kubernetes Secret
/// updated in place) was accepted until every pod had been restarted. `spillway-ingest`
/// reads the file again (`--api-keys-reload-secs`): a revoked key gets 401, a new one 202,
/// and a file that does not parse keeps the keys in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_revoked_from_the_keys_file_is_refused_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    tests::pipeline::declare_topology(dir.path(), Duration::from_secs(10), 5)
        .await
        .unwrap();
    let file = dir.path().join("keys.json");
    let record = |key: &str| {
        format!(
            r#"[{{"sha256":"{}","tenant":"rotated","advertisers":"*"}}]"#,
            ingest_api::auth::hash_key(key)
        )
    };
    std::fs::write(&file, record("key-a")).unwrap();
    let (ingest, addr) = tests::pipeline::start_ingest_on(
        dir.path(),
        &[
            "--broker",
            "embedded",
            "--topic",
            tests::pipeline::TOPIC,
            "--api-keys-file",
            file.to_str().unwrap(),
            "--api-keys-reload-secs",
            "1",
        ],
    )
    .unwrap();
    let client = reqwest::Client::new();
    let post = |key: &'static str| {
        let client = client.clone();
        let event = shared::synthetic::SyntheticEvents::new(7, 3).event();
        async move {
            client
                .post(format!("http://{addr}/v1/events"))
                .bearer_auth(key)
                .json(&event)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let until = |key: &'static str, status: u16| async move {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = post(key).await;
            if got == status {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{key}: still {got}, not {status}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    assert_eq!(post("key-a").await, 202);
    assert_eq!(post("key-b").await, 401);
    std::fs::write(&file, record("key-b")).unwrap();
    until("key-a", 401).await;
    assert_eq!(post("key-b").await, 202);
    // Half-written or broken: the keys in use stay.
    std::fs::write(&file, "[{\"sha256\":").unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(post("key-b").await, 202);
    assert_eq!(post("key-a").await, 401);
    ingest.terminate(Duration::from_secs(30)).unwrap();
}
