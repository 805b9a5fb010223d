//! The operator commands' answers: `loadgen` fails a run that got nothing accepted, and
//! `stats` reads the store it is pointed at without writing to it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};
use std::time::Duration;

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
    let accepted = run(&dev.key);
    assert!(
        accepted.status.success(),
        "{}",
        String::from_utf8_lossy(&accepted.stderr)
    );
    dev.terminate(Duration::from_secs(30)).unwrap();
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
