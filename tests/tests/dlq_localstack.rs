//! `spillway dlq --broker aws` (the compiled binary) against a real LocalStack: filtered
//! replay of 10,000 dead letters after an identical dry run, SIGKILL mid-replay, `--rate`,
//! export → purge → import byte for byte, the replay-loop guard, replay to an SNS topic
//! (including an SNS-subscription DLQ's wrapped bodies), native redrive, clear errors.
//! Under `CI=true` a missing LocalStack fails these tests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use shared::dlq::sqs::SqsDlq;
use shared::dlq::{DlqBroker, DlqMessage, Outgoing, ATTR_REPLAY_COUNT};
use shared::source::ATTR_ERROR_CODE;
use tests::dlq::{
    dead_letters, event_id, json_of, read_all, run_dlq, seed, spawn_dlq, wait_until,
    EVEN_ADVERTISER,
};
use tests::localstack::{self, create_topology, Topology};

async fn setup() -> Option<(SqsDlq, Topology)> {
    if !localstack::available().await {
        return None;
    }
    let config = localstack::sdk_config().await;
    let topo = create_topology(&config, true, 30, 5).await.unwrap();
    Some((SqsDlq::new(&config), topo))
}

fn aws<'a>(dlq: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
    let mut v: Vec<&str> = rest.to_vec();
    v.extend(["--broker", "aws", "--dlq", dlq]);
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

/// `export --delete` then `import` to the same FIFO DLQ, the README's own round trip: each
/// letter went back with the deduplication id that DLQ had just seen, and SQS dropped it
/// while answering that it took it. The file was the only copy.
#[tokio::test(flavor = "multi_thread")]
async fn an_export_deleted_from_a_fifo_dlq_imports_back_whole() {
    let Some((port, _t)) = setup().await else {
        return;
    };
    let config = localstack::sdk_config().await;
    let sqs = aws_sdk_sqs::Client::new(&config);
    let name = format!("spillway-fifo-import-{}", localstack::suffix());
    let dlq_url = localstack::create_fifo_queue(&sqs, &name, None)
        .await
        .unwrap();
    let mut letters = dead_letters(20, 19, None);
    for (i, m) in letters.iter_mut().enumerate() {
        m.group_id = Some(format!("tenant-{}", i % 2));
        m.dedup_id = Some(format!("dedup-{i}"));
    }
    seed(&port, &dlq_url, &letters).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fifo.ndjson");
    let file_s = file.display().to_string();
    let exported = json_of(
        &run_dlq(
            &aws(
                &dlq_url,
                &["export", "--out", &file_s, "--delete", "--json"],
            ),
            &[],
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(exported["exported"], 20, "{exported}");
    assert_eq!(port.stats(&dlq_url).await.unwrap().total(), 0);

    for _ in 0..2 {
        // The second import of the same file within the window sends no copies.
        let imported = json_of(
            &run_dlq(
                &aws(&dlq_url, &["import", &file_s, "--to", &dlq_url, "--json"]),
                &[],
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(imported["imported"], 20, "{imported}");
    }
    let back = read_all(&port, &dlq_url).await.unwrap();
    let mut bodies: Vec<&str> = back.iter().map(|m| m.body.as_str()).collect();
    bodies.sort_unstable();
    let mut want: Vec<&str> = letters.iter().map(|m| m.body.as_str()).collect();
    want.sort_unstable();
    assert_eq!(bodies, want, "every letter back, once");
    for m in &back {
        let original = letters.iter().find(|l| l.body == m.body).unwrap();
        assert_eq!(m.group_id, original.group_id, "the group is kept");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn replaying_half_of_10000_dead_letters_moves_exactly_those_after_an_identical_dry_run() {
    let Some((port, t)) = setup().await else {
        return;
    };
    let letters = dead_letters(10_000, 11, None);
    let seeded = Instant::now();
    seed(&port, &t.dlq_url, &letters).await.unwrap();
    eprintln!(
        "seeded 10000 dead letters in {:.1} s",
        seeded.elapsed().as_secs_f64()
    );

    let dry = json_of(
        &run_dlq(
            &aws(
                &t.dlq_url,
                &[
                    "replay",
                    "--to",
                    "source",
                    "--advertiser",
                    EVEN_ADVERTISER,
                    "--dry-run",
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
    assert_eq!(dry["scanned"], 10_000, "{dry}");
    assert_eq!(dry["would_move"], 5_000);
    assert_eq!(dry["moved"], 0);
    let s = port.stats(&t.dlq_url).await.unwrap();
    assert_eq!(
        (s.visible, s.in_flight),
        (10_000, 0),
        "the dry run changed the DLQ"
    );
    assert_eq!(port.stats(&t.queue_url).await.unwrap().total(), 0);

    let run = json_of(
        &run_dlq(
            &aws(
                &t.dlq_url,
                &[
                    "replay",
                    "--to",
                    "source",
                    "--advertiser",
                    EVEN_ADVERTISER,
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
    assert_eq!(run["moved"], 5_000, "{run}");
    assert_eq!(run["skipped_by_filter"], 5_000);
    assert!(run["error"].is_null(), "{run}");
    eprintln!(
        "LocalStack replay (--concurrency 4): 5000 of 10000 moved in {:.1} s = {:.0} msg/s; \
         {} API calls = {:.2} per message moved; by operation {}",
        run["elapsed_secs"].as_f64().unwrap(),
        run["messages_per_sec"].as_f64().unwrap(),
        run["api_calls_total"],
        run["api_calls_per_message"].as_f64().unwrap(),
        run["api_calls"]
    );

    let by_id: BTreeMap<String, (usize, &Outgoing)> = letters
        .iter()
        .enumerate()
        .map(|(i, m)| (event_id(&m.body), (i, m)))
        .collect();
    let moved = read_all(&port, &t.queue_url).await.unwrap();
    assert_eq!(moved.len(), 5_000);
    assert_eq!(
        ids(&moved).into_iter().collect::<BTreeSet<_>>().len(),
        5_000
    );
    for m in &moved {
        let (i, original) = by_id[&event_id(&m.body)];
        assert_eq!(i % 2, 0, "a non-matching letter moved");
        assert_eq!(m.body, original.body);
        let mut expected = original.attributes.clone();
        expected.insert(ATTR_REPLAY_COUNT.into(), "1".into());
        assert_eq!(m.attributes, expected);
    }
    let rest = read_all(&port, &t.dlq_url).await.unwrap();
    assert_eq!(rest.len(), 5_000);
    for m in &rest {
        let (i, original) = by_id[&event_id(&m.body)];
        assert_eq!(i % 2, 1, "a matching letter stayed");
        assert_eq!(
            (&m.body, &m.attributes),
            (&original.body, &original.attributes)
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replay_killed_with_sigkill_and_run_again_loses_nothing() {
    let Some((port, t)) = setup().await else {
        return;
    };
    let letters = dead_letters(2_000, 12, None);
    seed(&port, &t.dlq_url, &letters).await.unwrap();
    let all: BTreeSet<String> = letters.iter().map(|m| event_id(&m.body)).collect();

    let mut child = spawn_dlq(
        &aws(
            &t.dlq_url,
            &[
                "replay",
                "--to",
                "source",
                "--rate",
                "300",
                "--concurrency",
                "2",
                "--lease-secs",
                "4",
                "--json",
            ],
        ),
        &[],
    )
    .unwrap();
    wait_until(Duration::from_secs(60), || async {
        Ok(port.stats(&t.queue_url).await?.total() >= 300)
    })
    .await
    .unwrap();
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // Let the killed run's leases lapse, so every message is readable.
    tokio::time::sleep(Duration::from_millis(4_500)).await;

    let in_source = ids(&read_all(&port, &t.queue_url).await.unwrap());
    let in_dlq = ids(&read_all(&port, &t.dlq_url).await.unwrap());
    assert!(
        in_source.len() < 2_000,
        "the kill came too late to test anything"
    );
    let (src, dlq) = (counts(&in_source), counts(&in_dlq));
    assert!(src.values().all(|&n| n == 1) && dlq.values().all(|&n| n == 1));
    let union: BTreeSet<String> = in_source.iter().chain(&in_dlq).cloned().collect();
    assert_eq!(union, all, "a message was lost by the kill");
    let both = src.keys().filter(|k| dlq.contains_key(*k)).count();
    assert!(
        both <= 20,
        "{both} in both: more than the batches in flight"
    );
    eprintln!(
        "after SIGKILL: {} in source, {} in DLQ, {both} in both",
        in_source.len(),
        in_dlq.len()
    );

    let run = json_of(
        &run_dlq(
            &aws(
                &t.dlq_url,
                &["replay", "--to", "source", "--concurrency", "4", "--json"],
            ),
            &[],
        )
        .unwrap(),
    )
    .unwrap();
    assert!(run["error"].is_null(), "{run}");
    assert_eq!(port.stats(&t.dlq_url).await.unwrap().total(), 0);
    let final_ids = ids(&read_all(&port, &t.queue_url).await.unwrap());
    let distinct: BTreeSet<String> = final_ids.iter().cloned().collect();
    assert_eq!(distinct, all, "a message was lost");
    assert_eq!(final_ids.len() - distinct.len(), both);
}

#[tokio::test(flavor = "multi_thread")]
async fn rate_200_holds_within_ten_percent() {
    let Some((port, t)) = setup().await else {
        return;
    };
    seed(&port, &t.dlq_url, &dead_letters(2_000, 13, None))
        .await
        .unwrap();
    let child = spawn_dlq(
        &aws(
            &t.dlq_url,
            &[
                "replay",
                "--to",
                "source",
                "--rate",
                "200",
                "--concurrency",
                "8",
                "--json",
            ],
        ),
        &[],
    )
    .unwrap();
    // Watch the destination fill, independently of the CLI's own report.
    let mut first: Option<(Instant, u64)> = None;
    let mut last = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let n = port.stats(&t.queue_url).await.unwrap().total();
        let now = Instant::now();
        if n > 0 && first.is_none() {
            first = Some((now, n));
        }
        if n >= 2_000 {
            last = Some((now, n));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = child.wait_with_output().unwrap();
    let run = json_of(&out).unwrap();
    assert_eq!(run["moved"], 2_000, "{run}");
    let ((t0, n0), (t1, n1)) = (first.unwrap(), last.expect("not all moved within 60 s"));
    let observed = (n1 - n0) as f64 / (t1 - t0).as_secs_f64();
    let reported = run["messages_per_sec"].as_f64().unwrap();
    eprintln!(
        "--rate 200 on LocalStack: {observed:.1} msg/s observed at the destination, {reported:.1} \
         reported over {:.1} s of sending ({:.1} s whole run)",
        run["moving_secs"].as_f64().unwrap(),
        run["elapsed_secs"].as_f64().unwrap()
    );
    assert!((180.0..=220.0).contains(&observed), "{observed}");
    assert!((180.0..=220.0).contains(&reported), "{reported}");
}

fn tricky_letters() -> Vec<Outgoing> {
    let mut out = dead_letters(200, 14, None);
    let odd_bodies = [
        "not json at all",
        "line one\nline two\r\n\ttabbed \\ backslash \"quoted\"",
        "unicode: café ☕ 日本語 🚀",
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

/// The worker queue has a redrive policy: `purge` refuses it, naming its DLQ.
#[tokio::test(flavor = "multi_thread")]
async fn purge_refuses_a_queue_with_a_redrive_policy() {
    let Some((port, t)) = setup().await else {
        return;
    };
    let letters = dead_letters(3, 5, None);
    seed(&port, &t.queue_url, &letters).await.unwrap();
    let refused = run_dlq(&aws(&t.queue_url, &["purge", "--yes"]), &[]).unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("is a work queue"), "{stderr}");
    assert_eq!(port.stats(&t.queue_url).await.unwrap().total(), 3);
    let fine = run_dlq(&aws(&t.dlq_url, &["purge", "--yes"]), &[]).unwrap();
    assert!(
        fine.status.success(),
        "{}",
        String::from_utf8_lossy(&fine.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn export_purge_import_round_trips_bodies_and_attributes_byte_for_byte() {
    let Some((port, t)) = setup().await else {
        return;
    };
    let letters = tricky_letters();
    seed(&port, &t.dlq_url, &letters).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dlq.ndjson").display().to_string();

    let exported =
        json_of(&run_dlq(&aws(&t.dlq_url, &["export", "--out", &file, "--json"]), &[]).unwrap())
            .unwrap();
    assert_eq!(exported["exported"], letters.len(), "{exported}");
    let purged =
        json_of(&run_dlq(&aws(&t.dlq_url, &["purge", "--yes", "--json"]), &[]).unwrap()).unwrap();
    assert_eq!(purged["purged"], letters.len());
    wait_until(Duration::from_secs(60), || async {
        Ok(port.stats(&t.dlq_url).await?.total() == 0)
    })
    .await
    .unwrap();
    let imported = json_of(
        &run_dlq(
            &aws(&t.dlq_url, &["import", &file, "--to", &t.dlq_url, "--json"]),
            &[],
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(imported["imported"], letters.len());
    let back = read_all(&port, &t.dlq_url).await.unwrap();
    assert_eq!(
        sorted_pairs(back.iter().map(|m| (&m.body, &m.attributes))),
        sorted_pairs(letters.iter().map(|m| (&m.body, &m.attributes))),
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_replayed_max_replays_times_is_refused_with_a_clear_message() {
    let Some((port, t)) = setup().await else {
        return;
    };
    let mut letters = dead_letters(2, 15, None);
    letters[0]
        .attributes
        .insert(ATTR_REPLAY_COUNT.into(), "3".into());
    letters[1]
        .attributes
        .insert(ATTR_REPLAY_COUNT.into(), "2".into());
    seed(&port, &t.dlq_url, &letters).await.unwrap();
    let out = run_dlq(&aws(&t.dlq_url, &["replay", "--to", "source"]), &[]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("refused: already replayed 3 time(s), --max-replays is 3"),
        "{text}"
    );
    let moved = read_all(&port, &t.queue_url).await.unwrap();
    assert_eq!(moved.len(), 1);
    assert_eq!(moved[0].body, letters[1].body);
    assert_eq!(moved[0].attributes[ATTR_REPLAY_COUNT], "3");
    let left = read_all(&port, &t.dlq_url).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].body, letters[0].body);
}

/// A letter holding SQS's 10 message attributes got an 11th, the replay count, and SQS refused
/// it: it stayed in the DLQ and could never be replayed. The previous failure's message makes
/// room for the count.
#[tokio::test(flavor = "multi_thread")]
async fn a_letter_with_ten_attributes_is_replayed_with_its_replay_count() {
    let Some((port, t)) = setup().await else {
        return;
    };
    let mut letters = dead_letters(1, 17, None);
    for i in 0..(10 - letters[0].attributes.len()) {
        letters[0]
            .attributes
            .insert(format!("x-extra-{i}"), "kept".into());
    }
    assert_eq!(letters[0].attributes.len(), 10);
    seed(&port, &t.dlq_url, &letters).await.unwrap();
    let out = run_dlq(&aws(&t.dlq_url, &["replay", "--to", "source"]), &[]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let moved = read_all(&port, &t.queue_url).await.unwrap();
    assert_eq!(moved.len(), 1, "{text}");
    let attrs = &moved[0].attributes;
    assert_eq!(attrs[ATTR_REPLAY_COUNT], "1");
    assert_eq!(attrs.len(), 10, "{attrs:?}");
    assert!(
        !attrs.contains_key(shared::source::ATTR_ERROR_MESSAGE),
        "{attrs:?}"
    );
    assert_eq!(attrs["x-extra-0"], "kept");
    assert!(read_all(&port, &t.dlq_url).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_to_the_sns_topic_unwraps_notifications_and_revalidates() {
    let Some((port, t)) = setup().await else {
        return;
    };
    let mut letters = dead_letters(3, 16, None);
    // An SNS-subscription DLQ holds the notification JSON when raw delivery is off.
    let inner = letters[2].body.clone();
    letters[2].body = serde_json::json!({
        "Type": "Notification", "MessageId": "x", "TopicArn": t.topic_arn, "Message": inner,
        "MessageAttributes": {"spillway-tenant": {"Type": "String", "Value": "wrapped"}}
    })
    .to_string();
    let mut bad: serde_json::Value = serde_json::from_str(&letters[1].body).unwrap();
    bad["events"][0]["event_id"] = "not-a-uuid".into();
    letters[1].body = bad.to_string();
    seed(&port, &t.dlq_url, &letters).await.unwrap();

    let run = json_of(
        &run_dlq(
            &aws(&t.dlq_url, &["replay", "--to", &t.topic_arn, "--json"]),
            &[],
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(run["moved"], 2, "{run}");
    assert_eq!(run["refused_invalid"], 1);
    assert!(run["refusals"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("invalid_uuid"));
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut got = read_all(&port, &t.queue_url).await.unwrap();
    while got.len() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        got = read_all(&port, &t.queue_url).await.unwrap();
    }
    let bodies: BTreeSet<&str> = got.iter().map(|m| m.body.as_str()).collect();
    assert_eq!(
        bodies,
        BTreeSet::from([letters[0].body.as_str(), inner.as_str()])
    );
    for m in &got {
        assert!(!m.attributes.contains_key(ATTR_ERROR_CODE));
        assert_eq!(m.attributes[ATTR_REPLAY_COUNT], "1");
        assert!(m.attributes.contains_key("spillway-types"));
    }
    assert!(got
        .iter()
        .any(|m| m.attributes["spillway-tenant"] == "wrapped"));
}

#[tokio::test(flavor = "multi_thread")]
async fn native_redrive_starts_reports_cancels_and_moves_everything() {
    let Some((port, t)) = setup().await else {
        return;
    };
    seed(&port, &t.dlq_url, &dead_letters(50, 17, None))
        .await
        .unwrap();
    let status = || -> anyhow::Result<serde_json::Value> {
        let s = json_of(&run_dlq(
            &aws(&t.dlq_url, &["redrive", "status", "--json"]),
            &[],
        )?)?;
        Ok(s["tasks"][0].clone())
    };
    // A slow task, cancelled while it runs.
    let slow = json_of(
        &run_dlq(
            &aws(
                &t.dlq_url,
                &["redrive", "--to", &t.queue_url, "--rate", "1", "--json"],
            ),
            &[],
        )
        .unwrap(),
    )
    .unwrap();
    assert!(slow["task_handle"].is_string(), "{slow}");
    wait_until(Duration::from_secs(30), || async {
        let s = status()?;
        Ok(s["status"] == "RUNNING" && s["moved"].as_i64().unwrap_or(0) >= 1)
    })
    .await
    .unwrap();
    let cancelled =
        json_of(&run_dlq(&aws(&t.dlq_url, &["redrive", "cancel", "--json"]), &[]).unwrap())
            .unwrap();
    assert_eq!(cancelled["status"], "CANCELLING");
    wait_until(Duration::from_secs(30), || async {
        Ok(status()?["status"] == "CANCELLED")
    })
    .await
    .unwrap();
    let left = port.stats(&t.dlq_url).await.unwrap().total();
    assert!((1..50).contains(&left), "{left} left after the cancel");
    // Then all of it.
    let started = json_of(
        &run_dlq(
            &aws(
                &t.dlq_url,
                &["redrive", "--to", &t.queue_url, "--rate", "50", "--json"],
            ),
            &[],
        )
        .unwrap(),
    )
    .unwrap();
    assert!(started["task_handle"].is_string(), "{started}");
    wait_until(Duration::from_secs(60), || async {
        Ok(status()?["status"] == "COMPLETED")
    })
    .await
    .unwrap();
    assert_eq!(port.stats(&t.queue_url).await.unwrap().total(), 50);
    assert_eq!(port.stats(&t.dlq_url).await.unwrap().total(), 0);
    let e = run_dlq(&aws(&t.dlq_url, &["redrive", "cancel"]), &[]).unwrap();
    assert!(!e.status.success());
    assert!(String::from_utf8_lossy(&e.stderr).contains("no redrive task is running"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_queue_url_that_does_not_exist_is_named_in_the_error() {
    let Some((_port, t)) = setup().await else {
        return;
    };
    let missing = format!("{}-missing", t.dlq_url);
    let out = run_dlq(&aws(&missing, &["stats"]), &[]).unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("does not exist") && e.contains(&missing), "{e}");
    let out = run_dlq(&aws(&t.dlq_url, &["replay", "--to", "source"]), &[]).unwrap();
    assert!(out.status.success(), "an empty DLQ replays nothing, fine");
    let sub_dlq = run_dlq(&aws(&t.queue_url, &["replay", "--to", "source"]), &[]).unwrap();
    let e = String::from_utf8_lossy(&sub_dlq.stderr);
    assert!(e.contains("cannot tell the source"), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fifo_replay_keeps_group_and_dedup_ids_and_guards_the_dedup_window() {
    let Some((port, _t)) = setup().await else {
        return;
    };
    let config = localstack::sdk_config().await;
    let sqs = aws_sdk_sqs::Client::new(&config);
    let name = format!("spillway-fifo-{}", localstack::suffix());
    let dlq_url = localstack::create_fifo_queue(&sqs, &format!("{name}-dlq"), None)
        .await
        .unwrap();
    let queue_url = localstack::create_fifo_queue(&sqs, &name, Some((&dlq_url, 5)))
        .await
        .unwrap();
    let mut letters = dead_letters(20, 18, None);
    for (i, m) in letters.iter_mut().enumerate() {
        m.group_id = Some(format!("tenant-{}", i % 2));
        m.dedup_id = Some(format!("dedup-{i}"));
    }
    seed(&port, &dlq_url, &letters).await.unwrap();

    let guarded =
        json_of(&run_dlq(&aws(&dlq_url, &["replay", "--to", "source", "--json"]), &[]).unwrap())
            .unwrap();
    assert_eq!(guarded["moved"], 0, "{guarded}");
    assert_eq!(guarded["refused_dedup_window"], 20);
    assert!(guarded["refusals"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("silently drop as a duplicate"));

    let run = json_of(
        &run_dlq(
            &aws(
                &dlq_url,
                &[
                    "replay",
                    "--to",
                    "source",
                    "--fifo-dedup-guard-secs",
                    "0",
                    "--json",
                ],
            ),
            &[],
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(run["moved"], 20, "{run}");
    let by_body: BTreeMap<&str, &Outgoing> = letters.iter().map(|m| (m.body.as_str(), m)).collect();
    let moved = read_all(&port, &queue_url).await.unwrap();
    assert_eq!(moved.len(), 20);
    for m in &moved {
        let original = by_body[m.body.as_str()];
        assert_eq!(m.group_id, original.group_id);
        assert_eq!(m.dedup_id, original.dedup_id);
    }
    assert_eq!(port.stats(&dlq_url).await.unwrap().total(), 0);
}
