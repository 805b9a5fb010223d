//! Stopping: a process whose in-flight work cannot finish (a store that hangs) still exits
//! within `--shutdown-grace-secs` of SIGTERM, with status 0, before an orchestrator's SIGKILL;
//! what it cut off is redelivered and stored once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use serde_json::Value;
use shared::synthetic::SyntheticEvents;
use tests::dev_process::DevProcess;
use tests::postgres::{connect, TestDb};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_while_the_store_hangs_exits_within_the_grace_period_and_loses_nothing() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let flags = [
        "--sink",
        "postgres",
        "--database-url",
        db.url.as_str(),
        // No statement timeout: a write behind the lock below waits for as long as it is held.
        "--pg-statement-timeout-secs",
        "0",
        "--shutdown-grace-secs",
        "2",
        "--visibility-timeout-secs",
        "3",
        "--heartbeat-secs",
        "1",
        "--batch-max-wait-ms",
        "100",
    ];
    let dev = DevProcess::start(dir.path(), &flags).unwrap();

    let mut locker = connect(&db.url).await.unwrap();
    let tx = locker.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE ad_events IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let mut g = SyntheticEvents::new(41, 3);
    let events: Vec<Value> = (0..10).map(|_| g.event()).collect();
    let resp = reqwest::Client::new()
        .post(dev.events_url())
        .bearer_auth(&dev.key)
        .json(&events)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);

    // Until the worker's write waits on the lock.
    let watcher = connect(&db.url).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no write ever waited on the lock"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let stopping = Instant::now();
    let status = tokio::task::spawn_blocking(move || dev.terminate(Duration::from_secs(15)))
        .await
        .unwrap()
        .unwrap();
    let took = stopping.elapsed();
    assert!(status.success(), "{status}");
    assert!(
        took < Duration::from_secs(6),
        "took {took:?} for a 2 s grace period"
    );
    tx.rollback().await.unwrap();

    // The batch it gave up on comes back, and is stored once.
    let dev = DevProcess::start(dir.path(), &flags).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stored: i64 = watcher
            .query_one("SELECT count(*) FROM ad_events", &[])
            .await
            .unwrap()
            .get(0);
        if stored == 10 {
            break;
        }
        assert!(stored < 10, "stored {stored} of 10");
        assert!(
            Instant::now() < deadline,
            "stored {stored} of 10 after restart"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rolled: i64 = watcher
        .query_one("SELECT sum(events)::bigint FROM ad_metrics_minute", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rolled, 10, "each event rolled up once");
    dev.terminate(Duration::from_secs(15)).unwrap();
}
