//! A consumer group losing a member: two `spillway-worker` processes drain a Kafka topic (the
//! mock cluster, in this test process) into one SQLite store; one is killed with SIGKILL
//! mid-run, without committing anything more, and the group rebalances its partitions to the
//! survivor. The no-loss checker then finds nothing lost and nothing counted twice.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use shared::envelope::{EnvelopeConfig, PackedEvent, Packer};
use shared::kafka::KafkaPublisher;
use shared::sqlite_sink::SqliteSink;
use shared::synthetic::SyntheticEvents;
use shared::{AdEvent, Publisher, SystemClock, ValidationPolicy};
use tests::checker::check;
use tests::dev_process::bin_dir;
use tests::kafka::{mock_cluster, producer_config, TOPIC};
use tests::sqlite_view::SqliteStoreView;
use uuid::Uuid;

struct WorkerProcess(Child, std::net::SocketAddr);

impl WorkerProcess {
    fn start(bootstrap: &str, store: &Path, data_dir: &Path) -> Self {
        let metrics = tests::dev_process::DevProcess::free_addr().unwrap();
        let bin = bin_dir().unwrap().join("spillway-worker");
        assert!(
            bin.exists(),
            "{} is missing: run `cargo build --bins` (make test does)",
            bin.display()
        );
        let child = Command::new(bin)
            .args(["--broker", "kafka", "--kafka-bootstrap-servers", bootstrap])
            .args(["--topic", TOPIC, "--kafka-group", "rebalance"])
            .args(["--kafka-session-timeout-ms", "6000"])
            .args(["--sink", "sqlite", "--sqlite-path"])
            .arg(store)
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--write-cap-eps", "1500", "--write-burst", "500"])
            .args(["--metrics-listen", &metrics.to_string()])
            .args(["--receive-wait-secs", "1", "--batch-max-wait-ms", "200"])
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Self(child, metrics)
    }

    fn kill(&mut self) {
        assert!(
            self.0.try_wait().unwrap().is_none(),
            "the worker to kill is running"
        );
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }

    /// A counter of its `/metrics` page.
    async fn counter(&self, series: &str) -> f64 {
        let page = reqwest::get(format!("http://{}/metrics", self.1))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        shared::metrics::value_of(&page, series)
            .unwrap_or_else(|| panic!("{series} missing from\n{page}"))
    }

    /// SIGTERM, and a clean exit.
    fn stop(mut self) {
        let pid = self.0.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.0.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "the survivor did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_run_loses_nothing_and_counts_nothing_twice_after_the_rebalance() {
    const EVENTS: usize = 20_000;
    let mock = mock_cluster(4).unwrap();
    let bootstrap = mock.bootstrap_servers().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let store_path = dir.path().join("store.db");
    let store = SqliteSink::open(&store_path).unwrap();

    // Publish 20,000 events, keyed by campaign bucket, in 100-event requests' worth.
    let publisher = Arc::new(KafkaPublisher::new(&producer_config(&bootstrap)).unwrap());
    let packer = Packer::new(EnvelopeConfig {
        key_buckets: 32,
        ..EnvelopeConfig::default()
    });
    let mut g = SyntheticEvents::new(77, 9);
    let mut ids = Vec::with_capacity(EVENTS);
    let mut sent = Vec::with_capacity(EVENTS);
    for _ in 0..EVENTS / 100 {
        let events: Vec<Value> = (0..100).map(|_| g.event()).collect();
        let packed: Vec<PackedEvent> = events
            .iter()
            .map(|v| {
                let e = AdEvent::from_json(v.clone(), &ValidationPolicy::default(), &SystemClock)
                    .unwrap();
                ids.push(e.event_id.as_uuid());
                let packed = PackedEvent::new(&e).unwrap();
                sent.push(e);
                packed
            })
            .collect();
        publisher
            .publish(&packer.pack("test", &packed).unwrap())
            .await
            .unwrap();
    }

    let mut a = WorkerProcess::start(&bootstrap, &store_path, dir.path());
    let b = WorkerProcess::start(&bootstrap, &store_path, dir.path());

    // Kill one member once both are well into the work.
    let started = Instant::now();
    let deadline = started + Duration::from_secs(120);
    while store.events_stored().await.unwrap() < 4_000 {
        assert!(
            Instant::now() < deadline,
            "the workers did not start draining"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let at_kill = store.events_stored().await.unwrap();
    // The member killed was doing its share: without this the survivor could have drained
    // everything alone (a worker that never started, or owned no partition) and the test
    // would prove nothing about the rebalance.
    let written_by_a = a.counter("spillway_worker_events_written_total").await;
    assert!(written_by_a > 0.0, "the killed worker wrote nothing");
    a.kill();
    let killed_at = Instant::now();
    println!("killed one worker at {at_kill} stored events");

    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let stored = store.events_stored().await.unwrap();
        if stored as usize >= EVENTS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stored {stored} of {EVENTS} after the kill"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "drained by the survivor {:.1} s after the kill ({:.1} s in all)",
        killed_at.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        (at_kill as usize) < EVENTS,
        "the kill came before the end of the work"
    );
    // Let redelivered batches of the dead member's partitions land before counting, then
    // stop the survivor, so the store holds still while it is checked.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let written_by_b = b.counter("spillway_worker_events_written_total").await;
    let duplicates_b = b.counter("spillway_worker_events_duplicate_total").await;
    println!(
        "the killed worker had written {written_by_a} events; the survivor wrote \
         {written_by_b} and found {duplicates_b} already stored"
    );
    b.stop();
    let report = check(&SqliteStoreView::new(&store_path), &ids, Some(&ids))
        .await
        .unwrap();
    println!("{report:?}");
    assert_eq!(report.lost, 0, "{report:?}");
    assert_eq!(report.duplicated, 0, "{report:?}");
    assert_eq!(report.unexpected, Some(0), "{report:?}");
    assert!(report.rollups_consistent, "{report:?}");
    tests::checker::ensure_content(&SqliteStoreView::new(&store_path), &sent)
        .await
        .unwrap();
    let unique: std::collections::HashSet<Uuid> = ids.iter().copied().collect();
    assert_eq!(report.stored, unique.len());
}
