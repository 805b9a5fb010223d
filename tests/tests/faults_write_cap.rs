//! Fault: a 20× burst of traffic. `spillway loadgen --rate R --burst 20x:…` posts to
//! `spillway-ingest` (embedded broker); `spillway-worker --sink postgres` drains into a
//! database of its own with a connection cap, a concurrent-batch cap and an events/s cap.
//! A sampler reads `pg_stat_activity` of that database (the sink's `application_name`) every
//! 250 ms and the row count once per second: the store must never see more connections or
//! active statements than the caps, nor more rows per second than the rate cap allows, while
//! the queue absorbs the burst; everything acknowledged is stored once.
//!
//! Sizes scale with `SPILLWAY_FAULTS_SCALE`; see README "Fault tests".
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use tests::checker::{check, read_ids, PostgresStoreView};
use tests::pipeline::{declare_topology, start_ingest, start_worker, wait_drained, Loadgen, QUEUE};
use tests::postgres::{connect, TestDb};

fn scale() -> u64 {
    std::env::var("SPILLWAY_FAULTS_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
        .max(1)
}

/// The pool cap is the binding one: more batches may be in flight than there are
/// connections, and the extra ones wait for a free connection.
const MAX_CONNECTIONS: i64 = 2;
const MAX_BATCHES: i64 = 4;
const CAP_EPS: f64 = 500.0;
const BURST_EVENTS: f64 = 100.0;
const BASE_RATE: u64 = 100;

#[derive(Debug, Default)]
struct Samples {
    /// (seconds since start, connections, active statements, queue depth)
    activity: Vec<(f64, i64, i64, u64)>,
    /// (seconds since start, rows stored)
    rows: Vec<(f64, i64)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_20x_burst_never_takes_the_store_past_its_connection_and_rate_caps() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let burst_secs = 4 * scale();
    let load_secs = burst_secs + 8;
    let dir = tempfile::tempdir().unwrap();
    let broker = declare_topology(dir.path(), Duration::from_secs(30), 10)
        .await
        .unwrap();
    let (ingest, addr) = start_ingest(dir.path()).unwrap();
    let worker = start_worker(
        dir.path(),
        &db.url,
        &[
            "--pg-max-connections",
            &MAX_CONNECTIONS.to_string(),
            "--max-concurrent-batches",
            &MAX_BATCHES.to_string(),
            "--write-cap-eps",
            &CAP_EPS.to_string(),
            "--write-burst",
            &BURST_EVENTS.to_string(),
            "--receive-wait-secs",
            "1",
            "--batch-max-wait-ms",
            "200",
        ],
    )
    .unwrap();
    let admin = connect(&db.url).await.unwrap();
    // Wait for the worker's migrations, so the sampler can count rows from the start.
    let deadline = Instant::now() + Duration::from_secs(60);
    while admin
        .query_one("SELECT count(*) FROM ad_events", &[])
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "the worker did not migrate");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let ids_out = dir.path().join("acked.ids");
    let load = Loadgen::start(
        &format!("http://{addr}/v1/events"),
        &ids_out,
        &[
            "--rate",
            &BASE_RATE.to_string(),
            "--burst",
            &format!("20x:{burst_secs}s"),
            "--duration",
            &format!("{load_secs}s"),
            "--batch-size",
            "50",
            "--concurrency",
            "8",
        ],
    )
    .unwrap();

    let started = Instant::now();
    let mut samples = Samples::default();
    let mut next_rows = started;
    let mut load = Some(load);
    let mut report = None;
    loop {
        let t = started.elapsed().as_secs_f64();
        let row = admin
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE state <> 'idle')
                 FROM pg_stat_activity
                 WHERE datname = current_database() AND application_name = 'spillway'",
                &[],
            )
            .await
            .unwrap();
        let q = broker.queue_stats(QUEUE).await.unwrap();
        let depth = q.visible + q.in_flight + q.delayed;
        samples
            .activity
            .push((t, row.get::<_, i64>(0), row.get::<_, i64>(1), depth));
        if Instant::now() >= next_rows {
            let n: i64 = admin
                .query_one("SELECT count(*) FROM ad_events", &[])
                .await
                .unwrap()
                .get(0);
            samples.rows.push((t, n));
            next_rows += Duration::from_secs(1);
        }
        if let Some(l) = load.as_mut() {
            if l.finished().unwrap() {
                report = Some(load.take().unwrap().wait().unwrap());
            }
        }
        if report.is_some() && depth == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "not drained in 300 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let took = started.elapsed();
    wait_drained(&broker, QUEUE, Duration::from_secs(10))
        .await
        .unwrap();
    // The last count, once everything is acknowledged (and so committed).
    let n: i64 = admin
        .query_one("SELECT count(*) FROM ad_events", &[])
        .await
        .unwrap()
        .get(0);
    samples.rows.push((started.elapsed().as_secs_f64(), n));
    worker.terminate(Duration::from_secs(30)).unwrap();
    ingest.terminate(Duration::from_secs(30)).unwrap();
    let report = report.unwrap();

    let max_conn = samples.activity.iter().map(|s| s.1).max().unwrap();
    let max_active = samples.activity.iter().map(|s| s.2).max().unwrap();
    let peak_depth = samples.activity.iter().map(|s| s.3).max().unwrap();
    // Rows per sampling interval, and the most the token bucket allows in it: the burst plus
    // the rate over the interval, plus the rate over 0.5 s for writes that took their tokens
    // before the interval and committed inside it.
    let mut worst = (0.0_f64, 0_i64, 0.0_f64);
    let per_second: Vec<String> = samples
        .rows
        .windows(2)
        .map(|w| {
            let (dt, n) = (w[1].0 - w[0].0, w[1].1 - w[0].1);
            let allowed = BURST_EVENTS + CAP_EPS * (dt + 0.5);
            if n as f64 / allowed > worst.1 as f64 / worst.2.max(1.0) {
                worst = (w[1].0, n, allowed);
            }
            format!("{n}")
        })
        .collect();
    let acked = read_ids(&ids_out).unwrap();
    let view = PostgresStoreView::connect(&db.url).await.unwrap();
    let verdict = check(&view, &acked, None).await.unwrap();
    let accepted_eps = report.json["accepted_events_per_sec"]
        .as_f64()
        .unwrap_or_default();
    eprintln!(
        "write cap: {} events accepted in {:.1} s ({accepted_eps:.0}/s on average, 20x of \
         {BASE_RATE}/s for {burst_secs} s), peak queue depth {peak_depth} messages; caps \
         {MAX_CONNECTIONS} connections, {MAX_BATCHES} batches, {CAP_EPS} events/s + \
         {BURST_EVENTS} burst; sampled max {max_conn} connections, {max_active} active; rows \
         per ~1 s sample: [{}]; worst {} rows where {:.0} allowed; drained {:.1} s after start\n\
         {verdict}",
        report.accepted,
        report.json["duration_secs"].as_f64().unwrap_or_default(),
        per_second.join(", "),
        worst.1,
        worst.2,
        took.as_secs_f64(),
    );
    assert!(max_conn <= MAX_CONNECTIONS, "{max_conn} connections");
    assert!(
        max_active <= MAX_CONNECTIONS.min(MAX_BATCHES),
        "{max_active} active statements"
    );
    assert!(max_conn >= 1, "the sampler saw the worker's connections");
    for w in samples.rows.windows(2) {
        let (dt, n) = (w[1].0 - w[0].0, w[1].1 - w[0].1);
        let allowed = BURST_EVENTS + CAP_EPS * (dt + 0.5);
        assert!(
            n as f64 <= allowed,
            "{n} rows in {dt:.2} s at {:.1} s (allowed {allowed:.0})",
            w[1].0
        );
    }
    let total = samples.rows.last().unwrap().1;
    let max_rate = samples
        .rows
        .windows(2)
        .map(|w| (w[1].1 - w[0].1) as f64 / (w[1].0 - w[0].0))
        .fold(0.0, f64::max);
    assert!(
        max_rate > CAP_EPS * 0.5,
        "the store was kept busy ({max_rate:.0} rows/s at most)"
    );
    assert!(peak_depth > 10, "the queue absorbed the burst");
    assert!(
        report.accepted as f64 > CAP_EPS * 1.5 * burst_secs as f64,
        "the burst exceeded the cap: {}",
        report.json
    );
    assert_eq!(total as usize, acked.len());
    assert_eq!(verdict.lost, 0, "{verdict}");
    assert_eq!(verdict.duplicated, 0, "{verdict}");
    assert!(verdict.rollups_consistent, "{verdict}");
}
