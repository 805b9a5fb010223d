//! `spillway dlq` (the compiled binary) against the embedded broker: filtered replay of
//! 10,000 dead letters with a dry run first, SIGKILL mid-replay, `--rate`, export → purge →
//! import byte for byte, the replay-loop guard, topic replay re-validation, clear errors.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use shared::dlq::embedded::EmbeddedDlq;
use shared::dlq::{DlqBroker, DlqMessage, Outgoing, ATTR_REPLAY_COUNT};
use shared::embedded::{Broker, QueueSource, DEV_DLQ, DEV_QUEUE};
use shared::settings::{BROKER_DB, STORE_DB};
use shared::source::{DeadLetter, DeadLetterReason, Source, ATTR_ERROR_CODE};
use shared::SqliteSink;
use tests::dev_process::DevProcess;
use tests::dlq::{
    data_dir_args, dead_letters, event_id, json_of, read_all, run_dlq, seed, spawn_dlq, wait_until,
    EVEN_ADVERTISER,
};

async fn setup() -> (tempfile::TempDir, EmbeddedDlq) {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(dir.path().join(BROKER_DB)).unwrap();
    broker.dev_topology().await.unwrap();
    (dir, EmbeddedDlq::new(broker))
}

fn args<'a>(dir: &'a [String], rest: &[&'a str]) -> Vec<&'a str> {
    let mut v: Vec<&str> = rest.to_vec();
    v.extend(dir.iter().map(String::as_str));
    v
}

fn ids(messages: &[DlqMessage]) -> Vec<String> {
    messages.iter().map(|m| event_id(&m.body)).collect()
}

fn counts(ids: &[String]) -> HashMap<&str, usize> {
    let mut out = HashMap::new();
    for id in ids {
        *out.entry(id.as_str()).or_default() += 1;
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn replaying_half_of_10000_dead_letters_moves_exactly_those_after_an_identical_dry_run() {
    let (dir, port) = setup().await;
    let letters = dead_letters(10_000, 1, Some(DEV_QUEUE));
    seed(&port, DEV_DLQ, &letters).await.unwrap();
    let d = data_dir_args(dir.path());

    let dry = json_of(
        &run_dlq(
            &args(
                &d,
                &[
                    "replay",
                    "--to",
                    "source",
                    "--advertiser",
                    EVEN_ADVERTISER,
                    "--dry-run",
                    "--json",
                ],
            ),
            &[],
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["scanned"], 10_000);
    assert_eq!(dry["would_move"], 5_000);
    assert_eq!(dry["moved"], 0);
    assert_eq!(
        port.stats(DEV_DLQ).await.unwrap().visible,
        10_000,
        "dry run moved something"
    );
    assert_eq!(port.stats(DEV_QUEUE).await.unwrap().total(), 0);

    let started = Instant::now();
    let run = json_of(
        &run_dlq(
            &args(
                &d,
                &[
                    "replay",
                    "--to",
                    "source",
                    "--advertiser",
                    EVEN_ADVERTISER,
                    "--json",
                ],
            ),
            &[],
        )
        .unwrap(),
    )
    .unwrap();
    let wall = started.elapsed();
    assert_eq!(run["moved"], 5_000, "{run}");
    assert_eq!(run["matched"], 5_000);
    assert_eq!(run["skipped_by_filter"], 5_000);
    assert!(run["error"].is_null(), "{run}");
    eprintln!(
        "embedded replay: 5000 of 10000 moved in {:.2} s wall ({} msg/s in the run), {} \
         transactions = {:.3} per message",
        wall.as_secs_f64(),
        run["messages_per_sec"],
        run["api_calls_total"],
        run["api_calls_per_message"]
    );

    let even: BTreeMap<String, &Outgoing> = letters
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 2 == 0)
        .map(|(_, m)| (event_id(&m.body), m))
        .collect();
    let odd: BTreeMap<String, &Outgoing> = letters
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, m)| (event_id(&m.body), m))
        .collect();
    let moved = read_all(&port, DEV_QUEUE).await.unwrap();
    assert_eq!(moved.len(), 5_000);
    for m in &moved {
        let original = even
            .get(&event_id(&m.body))
            .expect("only matching letters moved");
        assert_eq!(m.body, original.body, "body changed");
        let mut expected = original.attributes.clone();
        expected.insert(ATTR_REPLAY_COUNT.into(), "1".into());
        assert_eq!(m.attributes, expected, "attributes not preserved");
    }
    assert_eq!(
        ids(&moved).into_iter().collect::<BTreeSet<_>>().len(),
        5_000
    );
    let rest = read_all(&port, DEV_DLQ).await.unwrap();
    assert_eq!(rest.len(), 5_000);
    for m in &rest {
        let original = odd.get(&event_id(&m.body)).expect("the rest is untouched");
        assert_eq!(m.body, original.body);
        assert_eq!(m.attributes, original.attributes);
    }
    let left = port.stats(DEV_DLQ).await.unwrap();
    assert_eq!(
        (left.visible, left.in_flight),
        (5_000, 0),
        "skipped messages left hidden"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replay_killed_with_sigkill_and_run_again_loses_nothing() {
    let (dir, port) = setup().await;
    let letters = dead_letters(5_000, 2, Some(DEV_QUEUE));
    seed(&port, DEV_DLQ, &letters).await.unwrap();
    let all: BTreeSet<String> = letters.iter().map(|m| event_id(&m.body)).collect();
    let d = data_dir_args(dir.path());

    let mut child = spawn_dlq(
        &args(
            &d,
            &["replay", "--to", "source", "--lease-secs", "3", "--json"],
        ),
        &[],
    )
    .unwrap();
    wait_until(Duration::from_secs(30), || async {
        Ok(port.stats(DEV_QUEUE).await?.total() >= 1_000)
    })
    .await
    .unwrap();
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let in_source = ids(&read_all(&port, DEV_QUEUE).await.unwrap());
    let in_dlq = ids(&read_all(&port, DEV_DLQ).await.unwrap());
    assert!(
        in_source.len() < 5_000,
        "the kill came too late to test anything"
    );
    let (src, dlq) = (counts(&in_source), counts(&in_dlq));
    assert!(src.values().all(|&n| n == 1) && dlq.values().all(|&n| n == 1));
    let union: BTreeSet<String> = in_source.iter().chain(&in_dlq).cloned().collect();
    assert_eq!(union, all, "a message was lost by the kill");
    let both = src.keys().filter(|k| dlq.contains_key(*k)).count();
    assert!(
        both <= 400,
        "{both} messages in both: more than the batches in flight (4 loops x 100)"
    );
    eprintln!(
        "after SIGKILL: {} in source, {} in DLQ, {both} in both",
        in_source.len(),
        in_dlq.len()
    );

    // The killed run's leases lapse; a second run finishes the job.
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let run = json_of(&run_dlq(&args(&d, &["replay", "--to", "source", "--json"]), &[]).unwrap())
        .unwrap();
    assert!(run["error"].is_null(), "{run}");
    assert_eq!(port.stats(DEV_DLQ).await.unwrap().total(), 0);
    let final_ids = ids(&read_all(&port, DEV_QUEUE).await.unwrap());
    let distinct: BTreeSet<String> = final_ids.iter().cloned().collect();
    assert_eq!(distinct, all, "a message was lost");
    assert_eq!(
        final_ids.len() - distinct.len(),
        both,
        "only the in-both ones are doubled"
    );

    // The pipeline drains the replayed messages into the store: each event counted once.
    let dev = DevProcess::start(dir.path(), &[]).unwrap();
    wait_until(Duration::from_secs(120), || async {
        Ok(port.stats(DEV_QUEUE).await?.total() == 0)
    })
    .await
    .unwrap();
    dev.terminate(Duration::from_secs(30)).unwrap();
    let store = SqliteSink::open(dir.path().join(STORE_DB)).unwrap();
    assert_eq!(store.events_stored().await.unwrap(), 5_000);
    assert_eq!(port.stats(DEV_DLQ).await.unwrap().total(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn rate_200_holds_within_ten_percent() {
    let (dir, port) = setup().await;
    seed(&port, DEV_DLQ, &dead_letters(2_000, 3, Some(DEV_QUEUE)))
        .await
        .unwrap();
    let d = data_dir_args(dir.path());
    let started = Instant::now();
    let run = json_of(
        &run_dlq(
            &args(
                &d,
                &["replay", "--to", "source", "--rate", "200/s", "--json"],
            ),
            &[],
        )
        .unwrap(),
    )
    .unwrap();
    let wall = started.elapsed().as_secs_f64();
    assert_eq!(run["moved"], 2_000);
    let in_run = run["messages_per_sec"].as_f64().unwrap();
    let outside = 2_000.0 / wall;
    eprintln!("--rate 200: {in_run:.1} msg/s in the run, {outside:.1} msg/s by wall clock");
    assert!((180.0..=220.0).contains(&in_run), "{in_run}");
    assert!((180.0..=220.0).contains(&outside), "{outside}");
}

fn tricky_letters() -> Vec<Outgoing> {
    let mut out = dead_letters(300, 4, Some(DEV_QUEUE));
    let odd_bodies = [
        "not json at all",
        "line one\nline two\r\n\ttabbed \\ backslash \"quoted\"",
        "unicode: café ☕ 日本語 🚀 \u{200b}",
        "{\"Type\":\"Notification\",\"Message\":\"{\\\"v\\\":1,\\\"events\\\":[]}\"}",
        "KLUv/QBYSQAAeyJ2IjoxLCJldmVudHMiOltdfQ==",
        " leading and trailing spaces ",
    ];
    for (i, body) in odd_bodies.iter().enumerate() {
        out.push(Outgoing {
            body: (*body).to_owned(),
            attributes: BTreeMap::from([
                (ATTR_ERROR_CODE.to_owned(), "undecodable".to_owned()),
                ("x-note".to_owned(), format!("ünïcode {i} \"q\" \\ \n end")),
            ]),
            group_id: None,
            dedup_id: None,
        });
    }
    out
}

fn sorted_pairs<'a>(
    it: impl Iterator<Item = (&'a String, &'a BTreeMap<String, String>)>,
) -> Vec<(String, BTreeMap<String, String>)> {
    let mut v: Vec<_> = it.map(|(b, a)| (b.clone(), a.clone())).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn export_purge_import_round_trips_bodies_and_attributes_byte_for_byte() {
    let (dir, port) = setup().await;
    let letters = tricky_letters();
    seed(&port, DEV_DLQ, &letters).await.unwrap();
    let d = data_dir_args(dir.path());
    let file = dir.path().join("dlq.ndjson");
    let file_s = file.display().to_string();

    let exported =
        json_of(&run_dlq(&args(&d, &["export", "--out", &file_s, "--json"]), &[]).unwrap())
            .unwrap();
    assert_eq!(exported["exported"], letters.len());
    assert_eq!(
        port.stats(DEV_DLQ).await.unwrap().visible,
        letters.len() as u64
    );

    let refused = run_dlq(&args(&d, &["purge"]), &[]).unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--yes"));
    assert_eq!(
        port.stats(DEV_DLQ).await.unwrap().total(),
        letters.len() as u64
    );
    let purged = json_of(&run_dlq(&args(&d, &["purge", "--yes", "--json"]), &[]).unwrap()).unwrap();
    assert_eq!(purged["purged"], letters.len());
    assert_eq!(port.stats(DEV_DLQ).await.unwrap().total(), 0);

    let imported = json_of(
        &run_dlq(
            &args(&d, &["import", &file_s, "--to", DEV_DLQ, "--json"]),
            &[],
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(imported["imported"], letters.len());
    let back = read_all(&port, DEV_DLQ).await.unwrap();
    assert_eq!(
        sorted_pairs(back.iter().map(|m| (&m.body, &m.attributes))),
        sorted_pairs(letters.iter().map(|m| (&m.body, &m.attributes))),
    );
}

/// An export file with a bad line (cut short, edited by hand) is refused whole: it used to
/// import the batches before the line (100 messages at a time here) and say that nothing
/// after the line before it was, so an operator trusting that lost or duplicated letters.
#[tokio::test(flavor = "multi_thread")]
async fn an_import_file_with_a_bad_line_is_refused_before_anything_is_sent() {
    let (dir, port) = setup().await;
    let letters = dead_letters(150, 5, Some(DEV_QUEUE));
    seed(&port, DEV_DLQ, &letters).await.unwrap();
    let d = data_dir_args(dir.path());
    let file = dir.path().join("dlq.ndjson");
    let file_s = file.display().to_string();
    let exported = json_of(
        &run_dlq(
            &args(&d, &["export", "--out", &file_s, "--delete", "--json"]),
            &[],
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(exported["exported"], 150);
    let text = std::fs::read_to_string(&file).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines[149] = "{\"cut short";
    std::fs::write(&file, lines.join("\n")).unwrap();

    let out = run_dlq(&args(&d, &["import", &file_s, "--to", DEV_DLQ]), &[]).unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("dlq.ndjson:150"), "{err}");
    assert!(err.contains("nothing was imported"), "{err}");
    assert_eq!(
        port.stats(DEV_DLQ).await.unwrap().total(),
        0,
        "nothing sent"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn export_with_delete_removes_only_what_the_fsynced_file_holds() {
    let (dir, port) = setup().await;
    let letters = dead_letters(400, 5, Some(DEV_QUEUE));
    seed(&port, DEV_DLQ, &letters).await.unwrap();
    let d = data_dir_args(dir.path());
    let file = dir.path().join("even.ndjson");
    let file_s = file.display().to_string();
    let out = json_of(
        &run_dlq(
            &args(
                &d,
                &[
                    "export",
                    "--out",
                    &file_s,
                    "--advertiser",
                    EVEN_ADVERTISER,
                    "--delete",
                    "--json",
                ],
            ),
            &[],
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(out["exported"], 200);
    assert_eq!(out["deleted"], 200);
    let lines = std::fs::read_to_string(&file).unwrap();
    let in_file: BTreeSet<String> = lines
        .lines()
        .map(|l| event_id(serde_json::from_str::<DlqMessage>(l).unwrap().body.as_str()))
        .collect();
    let left: BTreeSet<String> = ids(&read_all(&port, DEV_DLQ).await.unwrap())
        .into_iter()
        .collect();
    assert_eq!(in_file.len(), 200);
    assert!(in_file.is_disjoint(&left));
    assert_eq!(in_file.len() + left.len(), 400);
}

/// `--dlq` naming the work queue (a wrong env var, a typo) must not wipe events accepted
/// with 202 that no worker has stored yet: a queue with a redrive policy is refused.
#[tokio::test(flavor = "multi_thread")]
async fn purge_refuses_a_work_queue() {
    let (dir, port) = setup().await;
    let letters = dead_letters(5, 5, Some(DEV_QUEUE));
    seed(&port, DEV_QUEUE, &letters).await.unwrap();
    let d = data_dir_args(dir.path());
    let refused = run_dlq(&args(&d, &["purge", "--dlq", DEV_QUEUE, "--yes"]), &[]).unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("is a work queue") && stderr.contains(DEV_DLQ),
        "{stderr}"
    );
    assert_eq!(port.stats(DEV_QUEUE).await.unwrap().total(), 5);
}

/// A second `export --delete` to the file of the first would destroy the only copy of the
/// letters the first one deleted: an existing file is refused, and nothing is exported.
#[tokio::test(flavor = "multi_thread")]
async fn export_refuses_to_overwrite_an_existing_file_without_force() {
    let (dir, port) = setup().await;
    let letters = dead_letters(10, 5, Some(DEV_QUEUE));
    seed(&port, DEV_DLQ, &letters).await.unwrap();
    let d = data_dir_args(dir.path());
    let file = dir.path().join("dlq.ndjson");
    let file_s = file.display().to_string();
    std::fs::write(&file, "an earlier export\n").unwrap();

    let refused = run_dlq(&args(&d, &["export", "--out", &file_s, "--delete"]), &[]).unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("already exists") && stderr.contains("--force"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "an earlier export\n"
    );
    let stats = port.stats(DEV_DLQ).await.unwrap();
    assert_eq!(
        (stats.visible, stats.total()),
        (10, 10),
        "nothing leased or deleted"
    );

    let forced = json_of(
        &run_dlq(
            &args(&d, &["export", "--out", &file_s, "--force", "--json"]),
            &[],
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(forced["exported"], 10);
    assert_eq!(std::fs::read_to_string(&file).unwrap().lines().count(), 10);
}

async fn fail_again(broker: &Broker) {
    // What a worker does with a message that fails again: dead-letter it with its attributes.
    let source = QueueSource::new(broker.clone(), DEV_QUEUE);
    let got = source.receive(10, Duration::from_secs(2)).await.unwrap();
    assert_eq!(got.len(), 1);
    let d = &got[0];
    source
        .dead_letter(
            &d.id,
            &[DeadLetter {
                body: d.body.clone(),
                attributes: d.attributes.clone(),
                reason: DeadLetterReason {
                    code: "invalid_event".into(),
                    message: "/currency invalid_currency".into(),
                },
            }],
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_replayed_more_than_max_replays_times_is_refused_with_a_clear_message() {
    let (dir, port) = setup().await;
    seed(&port, DEV_DLQ, &dead_letters(1, 6, Some(DEV_QUEUE)))
        .await
        .unwrap();
    let d = data_dir_args(dir.path());
    for round in 1..=3 {
        let run =
            json_of(&run_dlq(&args(&d, &["replay", "--to", "source", "--json"]), &[]).unwrap())
                .unwrap();
        assert_eq!(run["moved"], 1, "round {round}: {run}");
        let queued = read_all(&port, DEV_QUEUE).await.unwrap();
        assert_eq!(queued[0].attributes[ATTR_REPLAY_COUNT], round.to_string());
        fail_again(port.broker()).await;
    }
    let human = run_dlq(&args(&d, &["replay", "--to", "source"]), &[]).unwrap();
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(human.status.success(), "{text}");
    assert!(
        text.contains("refused: already replayed 3 time(s), --max-replays is 3"),
        "{text}"
    );
    let run = json_of(&run_dlq(&args(&d, &["replay", "--to", "source", "--json"]), &[]).unwrap())
        .unwrap();
    assert_eq!(run["moved"], 0);
    assert_eq!(run["refused_max_replays"], 1);
    assert_eq!(
        port.stats(DEV_DLQ).await.unwrap().visible,
        1,
        "the refused message stays"
    );
    assert_eq!(port.stats(DEV_QUEUE).await.unwrap().total(), 0);
    // An operator who looked at it may allow one more.
    let more = json_of(
        &run_dlq(
            &args(
                &d,
                &["replay", "--to", "source", "--max-replays", "4", "--json"],
            ),
            &[],
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(more["moved"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_to_the_topic_runs_ingest_validation_again() {
    let (dir, port) = setup().await;
    let mut letters = dead_letters(2, 7, Some(DEV_QUEUE));
    let mut bad: serde_json::Value = serde_json::from_str(&letters[1].body).unwrap();
    bad["events"][0]["currency"] = "usd".into();
    letters[1].body = bad.to_string();
    seed(&port, DEV_DLQ, &letters).await.unwrap();
    let d = data_dir_args(dir.path());
    let run = json_of(
        &run_dlq(
            &args(&d, &["replay", "--to", "topic:events", "--json"]),
            &[],
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(run["moved"], 1, "{run}");
    assert_eq!(run["refused_invalid"], 1);
    let reason = run["refusals"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("invalid_currency"), "{reason}");
    let published = read_all(&port, DEV_QUEUE).await.unwrap();
    assert_eq!(published.len(), 1);
    assert_eq!(published[0].body, letters[0].body);
    assert!(!published[0].attributes.contains_key(ATTR_ERROR_CODE));
    assert_eq!(published[0].attributes[ATTR_REPLAY_COUNT], "1");
    assert_eq!(published[0].attributes["spillway-tenant"], "acme");
    assert_eq!(port.stats(DEV_DLQ).await.unwrap().visible, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn stats_and_peek_describe_the_dlq_without_consuming_it() {
    let (dir, port) = setup().await;
    seed(&port, DEV_DLQ, &dead_letters(50, 8, Some(DEV_QUEUE)))
        .await
        .unwrap();
    let d = data_dir_args(dir.path());
    let stats =
        json_of(&run_dlq(&args(&d, &["stats", "--sample", "20", "--json"]), &[]).unwrap()).unwrap();
    assert_eq!(stats["visible"], 50);
    assert_eq!(stats["sampled"], true);
    assert_eq!(stats["sample_size"], 20);
    assert_eq!(stats["by_error_code"]["max_receives"], 20);
    assert_eq!(stats["by_advertiser"][EVEN_ADVERTISER], 10);
    let text = run_dlq(&args(&d, &["stats", "--sample", "20"]), &[]).unwrap();
    assert!(String::from_utf8_lossy(&text.stdout).contains("SAMPLED: 20 of 50"));
    let peek = json_of(&run_dlq(&args(&d, &["peek", "-n", "3", "--json"]), &[]).unwrap()).unwrap();
    let messages = peek["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 3);
    assert_eq!(messages[0]["events"].as_array().unwrap().len(), 1);
    assert_eq!(messages[0]["attributes"][ATTR_ERROR_CODE], "max_receives");
    let after = port.stats(DEV_DLQ).await.unwrap();
    assert_eq!(
        (after.visible, after.in_flight),
        (50, 0),
        "peek consumed something"
    );
    assert_eq!(read_all(&port, DEV_DLQ).await.unwrap()[0].receive_count, 0);
}

fn stderr_of(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = run_dlq(args, env).unwrap();
    assert!(!out.status.success(), "{args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_addresses_and_unreachable_endpoints_get_clear_errors() {
    let (dir, port) = setup().await;
    let d = data_dir_args(dir.path());
    let missing = Path::new("/nonexistent/spillway").display().to_string();
    assert!(stderr_of(&["stats", "--data-dir", &missing], &[]).contains("no embedded broker"));
    let e = stderr_of(
        &args(&d, &["replay", "--to", "source", "--dlq", "nope"]),
        &[],
    );
    assert!(e.contains("queue \"nope\" does not exist"), "{e}");
    let e = stderr_of(&args(&d, &["replay", "--to", "nowhere"]), &[]);
    assert!(e.contains("\"nowhere\" does not exist"), "{e}");
    let e = stderr_of(&["stats", "--broker", "aws", "--dlq", "my-dlq"], &[]);
    assert!(e.contains("not an SQS queue URL"), "{e}");
    let e = stderr_of(&["stats", "--broker", "aws"], &[]);
    assert!(e.contains("--dlq"), "{e}");
    let env = [
        ("AWS_ENDPOINT_URL", "http://127.0.0.1:9"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_MAX_ATTEMPTS", "1"),
    ];
    let e = stderr_of(
        &[
            "stats",
            "--broker",
            "aws",
            "--dlq",
            "http://127.0.0.1:9/000000000000/dlq",
        ],
        &env,
    );
    assert!(e.contains("cannot reach the broker"), "{e}");
    assert!(e.contains("http://127.0.0.1:9"), "{e}");
    let e = stderr_of(&args(&d, &["redrive"]), &[]);
    assert!(e.contains("no native redrive"), "{e}");

    // A topic no queue subscribes to: refused, saying so (not "cannot reach the broker"),
    // and the letter stays where it is.
    port.broker().declare_topic("lonely").await.unwrap();
    seed(&port, DEV_DLQ, &dead_letters(1, 3, Some(DEV_QUEUE)))
        .await
        .unwrap();
    let e = stderr_of(&args(&d, &["replay", "--to", "lonely"]), &[]);
    assert!(e.contains("has no subscriptions"), "{e}");
    assert!(!e.contains("cannot reach"), "{e}");
    assert_eq!(port.stats(DEV_DLQ).await.unwrap().visible, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn filters_combine_and_max_caps_the_moves_across_concurrent_loops() {
    let (dir, port) = setup().await;
    let mut letters = dead_letters(400, 9, Some(DEV_QUEUE));
    for (i, m) in letters.iter_mut().enumerate() {
        if i % 4 == 0 {
            m.attributes
                .insert(ATTR_ERROR_CODE.into(), "invalid_event".into());
        }
    }
    seed(&port, DEV_DLQ, &letters).await.unwrap();
    let d = data_dir_args(dir.path());
    let campaign = {
        let v: serde_json::Value = serde_json::from_str(&letters[0].body).unwrap();
        v["events"][0]["campaign_id"].as_str().unwrap().to_owned()
    };
    let expect_match = letters
        .iter()
        .enumerate()
        .filter(|(i, m)| i % 4 == 0 && m.body.contains(&format!("\"campaign_id\":\"{campaign}\"")))
        .count();
    assert!(expect_match > 0);
    let matcher = format!("$.campaign_id={campaign}");
    let dry = json_of(
        &run_dlq(
            &args(
                &d,
                &[
                    "replay",
                    "--to",
                    "source",
                    "--error-code",
                    "invalid_event",
                    "--advertiser",
                    EVEN_ADVERTISER,
                    "--match",
                    &matcher,
                    "--older-than",
                    "0s",
                    "--newer-than",
                    "1h",
                    "--dry-run",
                    "--json",
                ],
            ),
            &[],
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(dry["would_move"], expect_match, "{dry}");
    let none = json_of(
        &run_dlq(
            &args(
                &d,
                &[
                    "replay",
                    "--to",
                    "source",
                    "--older-than",
                    "1h",
                    "--dry-run",
                    "--json",
                ],
            ),
            &[],
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        none["would_move"], 0,
        "every letter is younger than an hour"
    );
    let capped = json_of(
        &run_dlq(
            &args(
                &d,
                &[
                    "replay",
                    "--to",
                    "source",
                    "--max",
                    "123",
                    "--concurrency",
                    "4",
                    "--json",
                ],
            ),
            &[],
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(capped["moved"], 123, "{capped}");
    assert_eq!(port.stats(DEV_QUEUE).await.unwrap().total(), 123);
    let left = port.stats(DEV_DLQ).await.unwrap();
    assert_eq!((left.visible, left.in_flight), (400 - 123, 0));
    let bad = run_dlq(
        &args(
            &d,
            &["replay", "--to", "source", "--match", "campaign_id=x"],
        ),
        &[],
    )
    .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("a path starts with '$'"));
}

#[tokio::test(flavor = "multi_thread")]
async fn to_source_sends_each_letter_home_when_several_queues_share_the_dlq() {
    let (dir, port) = setup().await;
    let other = "events-worker-b";
    port.broker()
        .declare_queue(
            other,
            shared::embedded::QueueConfig {
                max_receive_count: Some(5),
                dlq: Some(DEV_DLQ.into()),
                ..shared::embedded::QueueConfig::default()
            },
        )
        .await
        .unwrap();
    let mut letters = dead_letters(40, 10, Some(DEV_QUEUE));
    for m in letters.iter_mut().skip(20) {
        m.attributes
            .insert(shared::embedded::ATTR_SOURCE_QUEUE.into(), other.into());
    }
    letters[39]
        .attributes
        .remove(shared::embedded::ATTR_SOURCE_QUEUE);
    seed(&port, DEV_DLQ, &letters).await.unwrap();
    let d = data_dir_args(dir.path());
    let run = json_of(&run_dlq(&args(&d, &["replay", "--to", "source", "--json"]), &[]).unwrap())
        .unwrap();
    assert_eq!(run["target"], "each message's source queue");
    assert_eq!(run["moved"], 39, "{run}");
    assert_eq!(run["refused_no_source"], 1);
    let home: BTreeSet<String> = letters[..20].iter().map(|m| event_id(&m.body)).collect();
    let away: BTreeSet<String> = letters[20..39].iter().map(|m| event_id(&m.body)).collect();
    let got_home: BTreeSet<String> = ids(&read_all(&port, DEV_QUEUE).await.unwrap())
        .into_iter()
        .collect();
    let got_away: BTreeSet<String> = ids(&read_all(&port, other).await.unwrap())
        .into_iter()
        .collect();
    assert_eq!((got_home, got_away), (home, away));
    assert_eq!(
        ids(&read_all(&port, DEV_DLQ).await.unwrap()),
        vec![event_id(&letters[39].body)]
    );
}
