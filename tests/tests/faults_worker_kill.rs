//! Fault: `spillway-worker --sink postgres` killed with SIGKILL every few seconds during a
//! load run and restarted each time, with the real binaries: `spillway loadgen` posts to
//! `spillway-ingest`, which publishes to the embedded broker; the worker drains it into a
//! database of its own on the shared PostgreSQL. The checker then finds every acknowledged
//! event stored once: lost = 0, unexpected = 0, duplicated = 0, rollups consistent.
//!
//! Sizes scale with `SPILLWAY_FAULTS_SCALE` (default 1: 20 s of load at 1,000 events/s, a
//! kill every 3 s on average); see README "Fault tests".
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use tests::checker::{check, read_ids, PostgresStoreView};
use tests::pipeline::{
    declare_topology, start_ingest, start_worker, wait_drained, Loadgen, DLQ, QUEUE,
};
use tests::postgres::TestDb;

fn scale() -> u64 {
    std::env::var("SPILLWAY_FAULTS_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
        .max(1)
}

const WORKER_FLAGS: &[&str] = &[
    // A killed worker's messages come back after 5 s.
    "--visibility-timeout-secs",
    "5",
    "--heartbeat-secs",
    "2",
    "--receive-wait-secs",
    "1",
    "--batch-max-wait-ms",
    "200",
    "--pg-max-connections",
    "4",
    "--retry-min-secs",
    "1",
    "--retry-max-secs",
    "4",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_every_few_seconds_loses_nothing_and_counts_nothing_twice() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let load_secs = 20 * scale();
    let rate = 1_000;
    let dir = tempfile::tempdir().unwrap();
    let broker = declare_topology(dir.path(), Duration::from_secs(5), 10)
        .await
        .unwrap();
    let (ingest, addr) = start_ingest(dir.path()).unwrap();
    let mut worker = Some(start_worker(dir.path(), &db.url, WORKER_FLAGS).unwrap());

    let ids_out = dir.path().join("acked.ids");
    let mut load = Loadgen::start(
        &format!("http://{addr}/v1/events"),
        &ids_out,
        &[
            "--rate",
            &rate.to_string(),
            "--duration",
            &format!("{load_secs}s"),
            "--batch-size",
            "50",
            "--concurrency",
            "8",
        ],
    )
    .unwrap();

    // Kill at random 1.5–4.5 s intervals while the load runs, and once more after it ended,
    // while the backlog drains.
    let started = Instant::now();
    let mut kills = 0;
    let mut load_done = false;
    while !load_done {
        let pause = Duration::from_millis(1_500 + rand::random::<u64>() % 3_000);
        tokio::time::sleep(pause).await;
        load_done = load.finished().unwrap();
        worker.take().unwrap().kill().unwrap();
        kills += 1;
        worker = Some(start_worker(dir.path(), &db.url, WORKER_FLAGS).unwrap());
    }
    let report = load.wait().unwrap();
    let load_took = started.elapsed();

    let drain_started = Instant::now();
    wait_drained(&broker, QUEUE, Duration::from_secs(180))
        .await
        .unwrap();
    let drained_in = drain_started.elapsed();
    let dlq = broker.queue_stats(DLQ).await.unwrap();
    worker
        .take()
        .unwrap()
        .terminate(Duration::from_secs(30))
        .unwrap();
    ingest.terminate(Duration::from_secs(30)).unwrap();

    let acked = read_ids(&ids_out).unwrap();
    assert_eq!(acked.len() as u64, report.accepted, "{}", report.json);
    assert!(
        acked.len() as u64 >= load_secs * rate / 2,
        "{}",
        report.json
    );
    // Every request was answered 202, so the acknowledged ids are every id sent: a stored id
    // outside them is unexpected.
    let all_answered = report.connection_errors == 0 && report.accepted == report.events_sent;
    let view = PostgresStoreView::connect(&db.url).await.unwrap();
    let verdict = check(&view, &acked, all_answered.then_some(&acked[..]))
        .await
        .unwrap();
    eprintln!(
        "worker SIGKILL: {kills} kills over {:.1} s of load at {rate} events/s, {} events \
         acknowledged, backlog drained {:.1} s after the load, DLQ depth {}\n{verdict}",
        load_took.as_secs_f64(),
        acked.len(),
        drained_in.as_secs_f64(),
        dlq.visible + dlq.in_flight + dlq.delayed
    );
    assert!(kills >= 3, "only {kills} kills");
    assert!(all_answered, "every request answered: {}", report.json);
    assert_eq!(verdict.lost, 0, "{verdict}");
    assert_eq!(verdict.unexpected, Some(0), "{verdict}");
    assert_eq!(verdict.duplicated, 0, "{verdict}");
    assert!(verdict.rollups_consistent, "{verdict}");
    assert_eq!(verdict.stored, acked.len(), "{verdict}");
    assert_eq!(
        dlq.visible + dlq.in_flight + dlq.delayed,
        0,
        "no valid message reached the DLQ"
    );
}
