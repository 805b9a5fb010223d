//! `PostgresSink` and the no-loss checker against a real PostgreSQL (127.0.0.1:5432, trust
//! auth; `scripts/ensure-postgres.sh` provides it). Each test gets its own random database,
//! dropped at the end. Under `CI=true` an unreachable server fails the test; elsewhere the
//! test is skipped with a loud message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use shared::synthetic::SyntheticEvents;
use shared::{
    AdEvent, PostgresConfig, PostgresError, PostgresSink, Sink, SinkError, SystemClock,
    ValidationPolicy,
};
use tests::checker::{check, PostgresStoreView, RollupKey, RollupTotals, Rollups};
use time::OffsetDateTime;
use tokio_postgres::NoTls;
use uuid::Uuid;

/// The server, without a database name; `SPILLWAY_TEST_PG` overrides it.
fn server_url() -> String {
    std::env::var("SPILLWAY_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// A database of its own for one test, dropped (connections and all) when it goes.
struct TestDb {
    name: String,
    url: String,
}

impl TestDb {
    /// Creates `spillway_test_<random>`, or returns `None` (skip) when PostgreSQL cannot be
    /// reached outside CI.
    async fn create() -> Option<Self> {
        Self::create_with("").await
    }

    /// As [`TestDb::create`], with `options` after `CREATE DATABASE name`.
    async fn create_with(options: &str) -> Option<Self> {
        let admin_url = format!("{}/postgres", server_url());
        let admin = match tokio::time::timeout(Duration::from_secs(5), connect(&admin_url)).await {
            Ok(Ok(c)) => c,
            outcome => {
                let why = match outcome {
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "timed out".into(),
                    Ok(Ok(_)) => unreachable!(),
                };
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "PostgreSQL at {admin_url} is required under CI=true but unreachable: {why}"
                );
                // Straight to stderr: libtest would swallow eprintln! of a passing test.
                let _ = std::io::Write::write_all(
                    &mut std::io::stderr(),
                    format!(
                        "\n!!!!! SKIPPED: PostgreSQL at {admin_url} unreachable ({why}); \
                         run scripts/ensure-postgres.sh !!!!!\n"
                    )
                    .as_bytes(),
                );
                return None;
            }
        };
        let name = format!("spillway_test_{:016x}", rand::random::<u64>());
        admin
            .batch_execute(&format!("CREATE DATABASE {name} {options}"))
            .await
            .expect("create test database");
        let url = format!("{}/{name}", server_url());
        Some(Self { name, url })
    }

    fn config(&self) -> PostgresConfig {
        PostgresConfig {
            max_connections: 4,
            ..PostgresConfig::new(self.url.clone())
        }
    }

    /// A migrated sink.
    async fn sink(&self) -> PostgresSink {
        let sink = PostgresSink::new(&self.config()).unwrap();
        sink.migrate().await.unwrap();
        sink
    }

    async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url).await.unwrap()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (name, admin_url) = (self.name.clone(), format!("{}/postgres", server_url()));
        // Drop runs inside the test's runtime, so the async cleanup gets a thread of its own.
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(admin) = connect(&admin_url).await {
                    let _ = admin
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

macro_rules! test_db {
    ($options:expr) => {
        match TestDb::create_with($options).await {
            Some(db) => db,
            None => return,
        }
    };
    () => {
        match TestDb::create().await {
            Some(db) => db,
            None => return,
        }
    };
}

/// `n` valid synthetic events spread over the last hour, so rollups span many minutes.
fn events(seed: u64, n: usize) -> Vec<AdEvent> {
    let mut g = SyntheticEvents::new(seed, 3);
    let now = OffsetDateTime::now_utc();
    (0..n)
        .map(|i| {
            let at = now - time::Duration::seconds(i64::try_from(i * 7 % 3600).unwrap());
            AdEvent::from_json(g.event_at(at), &ValidationPolicy::default(), &SystemClock).unwrap()
        })
        .collect()
}

/// Rollups computed in Rust from distinct events: the oracle the store must match.
fn expected_rollups<'a>(events: impl IntoIterator<Item = &'a AdEvent>) -> Rollups {
    let mut seen = std::collections::HashSet::new();
    let mut out = Rollups::new();
    for ev in events {
        if !seen.insert(ev.event_id) {
            continue;
        }
        let minute = ev
            .occurred_at
            .replace_second(0)
            .unwrap()
            .replace_nanosecond(0)
            .unwrap();
        let key = RollupKey {
            minute,
            advertiser_id: ev.advertiser_id.to_string(),
            campaign_id: ev.campaign_id.to_string(),
            ad_id: ev.ad_id.to_string(),
            event_type: ev.event_type.to_string(),
            currency: ev
                .currency
                .as_ref()
                .map(|c| c.as_str().to_owned())
                .unwrap_or_default(),
        };
        let t = out.entry(key).or_default();
        t.events += 1;
        t.cost_micros += i64::try_from(ev.cost_micros.get()).unwrap();
        t.revenue_micros += ev
            .revenue_micros
            .map_or(0, |m| i64::try_from(m.get()).unwrap());
    }
    out
}

/// The sink's rollups through its read helper, keyed like the oracle.
async fn stored_rollups(sink: &PostgresSink) -> Rollups {
    sink.rollup_rows()
        .await
        .unwrap()
        .into_iter()
        .map(|r| {
            (
                RollupKey {
                    minute: r.minute,
                    advertiser_id: r.advertiser_id,
                    campaign_id: r.campaign_id,
                    ad_id: r.ad_id,
                    event_type: r.event_type,
                    currency: r.currency,
                },
                RollupTotals {
                    events: r.events,
                    cost_micros: r.cost_micros,
                    revenue_micros: r.revenue_micros,
                },
            )
        })
        .collect()
}

fn ids(events: &[AdEvent]) -> Vec<Uuid> {
    events.iter().map(|e| e.event_id.as_uuid()).collect()
}

/// Writes like a worker would: retries transient failures, gives up on anything else. A
/// deadlock (40P01) is transient to a worker, but both write paths lock rows in one order so
/// that there is none: one here fails the test instead of being retried out of sight.
async fn write_retrying(sink: &PostgresSink, batch: &[AdEvent]) -> shared::WriteReport {
    for attempt in 0.. {
        match sink.write(batch).await {
            Ok(r) => return r,
            Err(e) if e.to_string().contains("40P01") => panic!("deadlock: {e}"),
            Err(e) if e.is_transient() && attempt < 20 => {
                tokio::time::sleep(Duration::from_millis(20 * (attempt + 1))).await;
            }
            Err(e) => panic!("write failed: {e}"),
        }
    }
    unreachable!()
}

#[tokio::test]
async fn a_redelivered_batch_changes_no_rollup() {
    let db = test_db!();
    let sink = db.sink().await;
    let batch = events(1, 300);
    let first = sink.write(&batch).await.unwrap();
    assert_eq!((first.inserted, first.duplicates), (300, 0));
    let before = stored_rollups(&sink).await;
    assert_eq!(before, expected_rollups(&batch));

    let again = sink.write(&batch).await.unwrap();
    assert_eq!((again.inserted, again.duplicates), (0, 300));
    assert_eq!(stored_rollups(&sink).await, before);
    assert_eq!(sink.events_stored().await.unwrap(), 300);
}

#[tokio::test]
async fn fresh_batches_are_copied_and_a_run_of_batches_after_a_redelivery_is_upserted() {
    let db = test_db!();
    let sink = db.sink().await;
    let pool = events(5, 2400);
    let batches: Vec<&[AdEvent]> = pool.chunks(100).collect();
    let paths = |copied, refused_copies, upserted| shared::WritePaths {
        copied,
        refused_copies,
        upserted,
    };

    assert_eq!(sink.write(batches[0]).await.unwrap().inserted, 100);
    assert_eq!(sink.write_paths(), paths(1, 0, 0));

    // A third stored, the rest new: the COPY is refused, nothing of it stays, the upsert
    // stores the new ones once.
    let report = sink.write(&pool[50..200]).await.unwrap();
    assert_eq!((report.inserted, report.duplicates), (100, 50));
    assert_eq!(sink.write_paths(), paths(1, 1, 1));

    // The run: the next REDELIVERY_RUN batches go straight to the upsert, fresh or not.
    for batch in &batches[2..2 + shared::postgres_sink::REDELIVERY_RUN] {
        assert_eq!(sink.write(batch).await.unwrap().inserted, 100);
    }
    let run = u64::try_from(shared::postgres_sink::REDELIVERY_RUN).unwrap();
    assert_eq!(sink.write_paths(), paths(1, 1, 1 + run));
    let after = 2 + shared::postgres_sink::REDELIVERY_RUN;
    assert_eq!(sink.write(batches[after]).await.unwrap().inserted, 100);
    assert_eq!(sink.write_paths(), paths(2, 1, 1 + run));

    let written = &pool[..(after + 1) * 100];
    assert_eq!(
        sink.events_stored().await.unwrap(),
        u64::try_from(written.len()).unwrap()
    );
    assert_eq!(stored_rollups(&sink).await, expected_rollups(written));
}

#[tokio::test]
async fn a_batch_with_duplicates_inside_reports_inserted_and_duplicates() {
    let db = test_db!();
    let sink = db.sink().await;
    let stored_before = events(2, 10);
    sink.write(&stored_before[..4]).await.unwrap();

    // 10 distinct ids, 4 of them already stored, 3 repeated inside the batch, and one
    // repeat carrying other values (the first occurrence wins).
    let mut batch = stored_before.clone();
    batch.extend_from_slice(&stored_before[5..8]);
    let mut altered = stored_before[9].clone();
    altered.cost_micros = stored_before[0].cost_micros;
    altered.ad_id = shared::event::Ident::parse("ad_id", "ad-altered").unwrap();
    batch.push(altered);

    let report = sink.write(&batch).await.unwrap();
    assert_eq!(report.inserted, 6);
    assert_eq!(report.duplicates, batch.len() - 6);
    assert_eq!(sink.events_stored().await.unwrap(), 10);
    assert_eq!(
        stored_rollups(&sink).await,
        expected_rollups(&stored_before)
    );
}

#[tokio::test]
async fn rollups_equal_recomputed_sums_after_several_random_batches() {
    let db = test_db!();
    let sink = db.sink().await;
    let pool = events(3, 2000);
    let mut written: Vec<AdEvent> = Vec::new();
    let mut acknowledged = Vec::new();
    for round in 0..12_u64 {
        // Overlapping random windows: new events and redeliveries mixed.
        let start = usize::try_from(rand::random::<u64>() % 1800).unwrap();
        let len = 1 + usize::try_from(rand::random::<u64>() % 200).unwrap();
        let batch = &pool[start..(start + len).min(pool.len())];
        let new = batch
            .iter()
            .filter(|e| !written.iter().any(|w| w.event_id == e.event_id))
            .count();
        let report = sink.write(batch).await.unwrap();
        assert_eq!(report.inserted, new, "round {round}");
        assert_eq!(report.inserted + report.duplicates, batch.len());
        written.extend(batch.iter().cloned());
        acknowledged.extend(ids(batch));
    }
    assert_eq!(stored_rollups(&sink).await, expected_rollups(&written));
    let view = PostgresStoreView::connect(&db.url).await.unwrap();
    let report = check(&view, &acknowledged, Some(&ids(&pool)))
        .await
        .unwrap();
    assert!(report.is_clean(), "{report}");
    assert!(report.rollup_rows > 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_of_overlapping_batches_store_each_event_once() {
    let db = test_db!();
    let sink = Arc::new(db.sink().await);
    let pool = Arc::new(events(4, 3000));
    let writers = (0..4_usize).map(|w| {
        let (sink, pool) = (Arc::clone(&sink), Arc::clone(&pool));
        tokio::spawn(async move {
            let mut inserted = 0;
            // Each writer walks the whole pool from a different offset, in batches of 250,
            // so every event is offered by every writer, concurrently.
            for b in 0..12 {
                let start = (w * 750 + b * 250) % 3000;
                inserted += write_retrying(&sink, &pool[start..start + 250])
                    .await
                    .inserted;
            }
            inserted
        })
    });
    let inserted: usize = futures::future::join_all(writers)
        .await
        .into_iter()
        .map(Result::unwrap)
        .sum();
    assert_eq!(inserted, 3000, "each event inserted by exactly one writer");
    assert_eq!(sink.events_stored().await.unwrap(), 3000);
    assert_eq!(stored_rollups(&sink).await, expected_rollups(pool.iter()));
    let view = PostgresStoreView::connect(&db.url).await.unwrap();
    let report = check(&view, &ids(&pool), Some(&ids(&pool))).await.unwrap();
    assert!(report.is_clean(), "{report}");
}

/// A valid click of `advertiser` at `at`, in the same campaign and ad as every other.
fn click(advertiser: &str, at: OffsetDateTime) -> AdEvent {
    let json = serde_json::json!({
        "event_id": Uuid::new_v4().to_string(),
        "type": "click",
        "occurred_at": at.format(&time::format_description::well_known::Rfc3339).unwrap(),
        "advertiser_id": advertiser,
        "campaign_id": "cmp-1",
        "ad_id": "ad-1",
    });
    AdEvent::from_json(json, &ValidationPolicy::default(), &SystemClock).unwrap()
}

/// Backends of `db` waiting for a lock.
async fn lock_waiters(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// Under a collation that does not sort like bytes (ICU en-US sorts `a1` before `Acme`;
/// bytes put `Acme` first), a COPY-path writer and an `ON CONFLICT`-path writer adding to
/// the same two rollup rows must still lock them in the same order. A third session holds
/// the first row so that both writers queue up mid-transaction; with opposite orders, the
/// upsert would hold the second row while waiting for the first, and releasing the holder
/// would deadlock (40P01).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_two_write_paths_lock_rollup_rows_in_the_same_order_under_any_collation() {
    let db = test_db!("LOCALE_PROVIDER icu ICU_LOCALE 'en-US' TEMPLATE template0");
    let at = OffsetDateTime::now_utc() - time::Duration::minutes(5);
    let pair = || vec![click("Acme", at), click("a1", at)];
    let (first, for_copy, for_upsert) = (pair(), pair(), pair());

    let setup = db.sink().await;
    assert_eq!(setup.write(&first).await.unwrap().inserted, 2);
    // A redelivery puts this sink on the ON CONFLICT path for its next batches.
    let upserter = PostgresSink::new(&db.config()).unwrap();
    assert_eq!(upserter.write(&first[..1]).await.unwrap().duplicates, 1);
    let copier = PostgresSink::new(&db.config()).unwrap();

    let holder = db.client().await;
    holder
        .batch_execute(
            "BEGIN; SELECT 1 FROM ad_metrics_minute WHERE advertiser_id = 'Acme' FOR UPDATE",
        )
        .await
        .unwrap();
    let watcher = db.client().await;
    let wait_for = |n| {
        let watcher = &watcher;
        async move {
            for _ in 0..200 {
                if lock_waiters(watcher).await == n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            panic!("{n} writers never waited for the held rollup row");
        }
    };
    let expected = expected_rollups(first.iter().chain(&for_copy).chain(&for_upsert));
    let copy = tokio::spawn({
        let copier = copier.clone();
        async move { copier.write(&for_copy).await }
    });
    wait_for(1).await;
    let upsert = tokio::spawn({
        let upserter = upserter.clone();
        async move { upserter.write(&for_upsert).await }
    });
    wait_for(2).await;
    holder.batch_execute("COMMIT").await.unwrap();

    let copied = copy.await.unwrap().expect("COPY-path write");
    let upserted = upsert.await.unwrap().expect("ON CONFLICT-path write");
    assert_eq!((copied.inserted, upserted.inserted), (2, 2));
    assert_eq!(copier.write_paths().copied, 1);
    assert_eq!(upserter.write_paths().upserted, 2);
    assert_eq!(stored_rollups(&setup).await, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrations_are_idempotent_and_safe_to_run_concurrently() {
    let db = test_db!();
    let sinks: Vec<PostgresSink> = (0..4)
        .map(|_| PostgresSink::new(&db.config()).unwrap())
        .collect();
    let outcomes = futures::future::join_all(sinks.iter().map(PostgresSink::migrate)).await;
    let applied: Vec<Vec<i32>> = outcomes.into_iter().map(Result::unwrap).collect();
    let all: Vec<i32> = shared::postgres_sink::MIGRATIONS
        .iter()
        .map(|m| m.version)
        .collect();
    assert_eq!(
        applied.iter().filter(|a| **a == all).count(),
        1,
        "{applied:?}"
    );
    assert_eq!(
        applied.iter().filter(|a| a.is_empty()).count(),
        3,
        "{applied:?}"
    );
    assert!(sinks[0].migrate().await.unwrap().is_empty());

    let client = db.client().await;
    let versions: Vec<i32> = client
        .query("SELECT version FROM spillway_migrations ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, all);
    sinks[0].write(&events(5, 5)).await.unwrap();

    // An applied migration edited afterwards is refused, not re-run.
    client
        .execute(
            "UPDATE spillway_migrations SET checksum = 'edited' WHERE version = 1",
            &[],
        )
        .await
        .unwrap();
    let err = sinks[1].migrate().await.unwrap_err();
    assert!(
        matches!(err, PostgresError::MigrationChanged { version: 1, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn a_server_that_cannot_be_reached_is_a_transient_error() {
    // Port 1 on loopback: nothing listens there, the connection is refused at once.
    let sink = PostgresSink::new(&PostgresConfig {
        connect_timeout: Duration::from_secs(2),
        ..PostgresConfig::new("postgres://postgres@127.0.0.1:1/nowhere")
    })
    .unwrap();
    let err = sink.write(&events(6, 3)).await.unwrap_err();
    assert!(matches!(err, SinkError::Unavailable { .. }), "{err}");
    assert!(err.is_transient());
}

/// A server that refuses the session's settings refuses every connection with a data-class
/// SQLSTATE (22023): that is the operator's configuration, not the batch's data, so the
/// write must be transient (held behind the breaker), never dead-lettered.
#[tokio::test]
async fn a_connection_refused_for_its_settings_is_a_transient_error() {
    let db = test_db!();
    db.sink().await;
    let sink = PostgresSink::new(&PostgresConfig::new(format!(
        "{}?options=-c%20lock_timeout%3D-5",
        db.url
    )))
    .unwrap();
    let err = sink.write(&events(6, 3)).await.unwrap_err();
    assert!(matches!(err, SinkError::Unavailable { .. }), "{err}");
    assert!(err.to_string().contains("22023"), "{err}");
}

#[tokio::test]
async fn a_statement_timeout_is_a_transient_error_and_stores_nothing() {
    let db = test_db!();
    db.sink().await; // migrate
    let sink = PostgresSink::new(&PostgresConfig {
        statement_timeout: Duration::from_millis(300),
        ..db.config()
    })
    .unwrap();
    let mut locker = db.client().await;
    let tx = locker.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE ad_events IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let batch = events(7, 50);
    let started = std::time::Instant::now();
    let err = sink.write(&batch).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(err.to_string().contains("57014"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    tx.rollback().await.unwrap();

    assert_eq!(sink.events_stored().await.unwrap(), 0);
    assert_eq!(sink.write(&batch).await.unwrap().inserted, 50);
}

/// A server gone silent after taking the request (a failover, a dropped network path): the
/// write used to wait for TCP to give up, two hours with the default keepalive, while the
/// worker's heartbeat kept the batch hidden and the breaker saw nothing wrong. It now fails
/// as transient once three times the statement timeout and 10 s have passed without an answer
/// (the server would have cancelled its statements itself), the connection leaves the pool, and
/// the next write, on a new connection, stores the batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stops_answering_mid_write_fails_it_as_transient_within_the_bound() {
    let db = test_db!();
    db.sink().await; // migrate
    let pg: tokio_postgres::Config = db.url.parse().unwrap();
    let tokio_postgres::config::Host::Tcp(host) = &pg.get_hosts()[0] else {
        panic!("the test server is not on TCP: {}", db.url);
    };
    let server = format!("{host}:{}", pg.get_ports()[0]);
    let upstream = tokio::net::lookup_host(&server)
        .await
        .unwrap()
        .next()
        .unwrap();
    let proxy = tests::faults::FreezingProxy::start(upstream).await.unwrap();
    let url = db.url.replacen(&server, &proxy.addr.to_string(), 1);
    let sink = PostgresSink::new(&PostgresConfig {
        statement_timeout: Duration::from_millis(500),
        max_connections: 1,
        ..PostgresConfig::new(url)
    })
    .unwrap();
    assert_eq!(sink.write(&events(21, 50)).await.unwrap().inserted, 50);

    proxy.freeze(true);
    let batch = events(22, 50);
    let started = std::time::Instant::now();
    let err = sink.write(&batch).await.unwrap_err();
    let took = started.elapsed();
    println!("silent server: {err} after {took:?}");
    assert!(err.is_transient(), "{err}");
    assert!(
        err.to_string()
            .contains("no answer to the write within 11500 ms"),
        "{err}"
    );
    assert!(took < Duration::from_secs(15), "{took:?}");
    let started = std::time::Instant::now();
    let err = sink.ping().await.unwrap_err();
    assert!(
        err.is_transient() && started.elapsed() < Duration::from_secs(15),
        "{err}"
    );

    proxy.freeze(false);
    let report = sink.write(&batch).await.unwrap();
    assert_eq!(report.inserted + report.duplicates, 50, "{report:?}");
    assert_eq!(sink.events_stored().await.unwrap(), 100);
}

/// A COPY the server refuses before it enters COPY mode (here a lock wait past the statement
/// timeout) leaves a stray `ReadyForQuery` on its connection: tokio-postgres sends a Sync
/// with the COPY's Execute (rust-postgres#789). Were that connection returned to the pool,
/// the next write on it could fail with "unexpected message from server". Each round: a
/// refused COPY, then at once a write on the pool's only connection.
#[tokio::test]
async fn after_a_copy_refused_before_copy_mode_the_next_write_succeeds() {
    let db = test_db!();
    db.sink().await; // migrate
    let sink = PostgresSink::new(&PostgresConfig {
        statement_timeout: Duration::from_millis(100),
        max_connections: 1,
        ..db.config()
    })
    .unwrap();
    let mut locker = db.client().await;
    for round in 0..20_u64 {
        let tx = locker.transaction().await.unwrap();
        tx.batch_execute("LOCK TABLE ad_events IN ACCESS EXCLUSIVE MODE")
            .await
            .unwrap();
        let err = sink.write(&events(900 + round, 5)).await.unwrap_err();
        assert!(err.to_string().contains("57014"), "{err}");
        tx.rollback().await.unwrap();
        let written = sink.write(&events(900 + round, 5)).await;
        assert_eq!(
            written.map(|r| r.inserted).map_err(|e| e.to_string()),
            Ok(5),
            "round {round}"
        );
    }
}

/// `--pg-statement-timeout-secs 0` means what it means to PostgreSQL: no limit (it used to
/// become 1 ms, failing every write).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_statement_timeout_means_no_limit() {
    let db = test_db!();
    db.sink().await; // migrate
    let sink = Arc::new(
        PostgresSink::new(&PostgresConfig {
            statement_timeout: Duration::ZERO,
            ..db.config()
        })
        .unwrap(),
    );
    let mut locker = db.client().await;
    let tx = locker.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE ad_events IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let batch = events(8, 50);
    let write = tokio::spawn({
        let (sink, batch) = (Arc::clone(&sink), batch.clone());
        async move { sink.write(&batch).await }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!write.is_finished(), "the write gave up on the lock");
    tx.rollback().await.unwrap();
    assert_eq!(write.await.unwrap().unwrap().inserted, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_connection_is_a_transient_error_and_the_sink_recovers() {
    let db = test_db!();
    let sink = Arc::new(db.sink().await);
    let writer = {
        let sink = Arc::clone(&sink);
        tokio::spawn(async move {
            let (mut acked, mut failed, mut errors) = (Vec::new(), Vec::new(), Vec::new());
            for round in 0..40_u64 {
                let batch = events(100 + round, 1000);
                match sink.write(&batch).await {
                    Ok(_) => acked.push(batch),
                    Err(e) => {
                        errors.push(e);
                        failed.push(batch);
                    }
                }
                if errors.len() >= 3 && acked.len() >= 3 {
                    break;
                }
            }
            (acked, failed, errors)
        })
    };
    let killer = db.client().await;
    while !writer.is_finished() {
        killer
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    let (acked, failed, errors) = writer.await.unwrap();
    assert!(!errors.is_empty(), "no write was interrupted");
    for e in &errors {
        assert!(matches!(e, SinkError::Unavailable { .. }), "{e}");
    }

    // The worker's retry of each failed batch goes through on fresh connections.
    for batch in &failed {
        write_retrying(&sink, batch).await;
    }
    let acknowledged: Vec<Uuid> = acked.iter().chain(&failed).flat_map(|b| ids(b)).collect();
    let view = PostgresStoreView::connect(&db.url).await.unwrap();
    let report = check(&view, &acknowledged, Some(&acknowledged))
        .await
        .unwrap();
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.stored, acknowledged.len());
}

#[tokio::test]
async fn ping_answers_while_the_server_is_up_and_fails_transiently_when_it_is_not() {
    let db = test_db!();
    let sink = db.sink().await;
    sink.ping().await.unwrap();

    // Nothing listens on port 1: the breaker's probe must see the store as down.
    let down = PostgresSink::new(&PostgresConfig {
        connect_timeout: Duration::from_secs(1),
        ..PostgresConfig::new("postgres://postgres@127.0.0.1:1/postgres")
    })
    .unwrap();
    let err = down.ping().await.unwrap_err();
    assert!(err.is_transient(), "{err}");
}

#[tokio::test]
async fn a_data_error_is_permanent_and_stores_nothing_of_the_batch() {
    let db = test_db!();
    let sink = db.sink().await;
    let mut batch = events(8, 20);
    // jsonb cannot hold U+0000 (SQLSTATE 22P05). Ingest validation refuses it, so the event
    // is built past validation, as a store-side data error would arrive from a replayed DLQ.
    let raw = SyntheticEvents::new(9, 1).event();
    let mut bad = AdEvent::from_json(raw, &ValidationPolicy::default(), &SystemClock).unwrap();
    bad.attributes.insert("note".into(), "nul\u{0}byte".into());
    batch.push(bad);

    let err = sink.write(&batch).await.unwrap_err();
    assert!(matches!(err, SinkError::Rejected { .. }), "{err}");
    assert!(!err.is_transient());
    assert!(err.to_string().contains("22P05"), "{err}");
    assert_eq!(sink.events_stored().await.unwrap(), 0);
    assert!(sink.rollup_rows().await.unwrap().is_empty());
}

/// A clean store of 200 events, its acknowledged ids, and every attempted id (250).
async fn checked_store(db: &TestDb) -> (PostgresSink, Vec<Uuid>, Vec<Uuid>) {
    let sink = db.sink().await;
    let attempted = events(10, 250);
    sink.write(&attempted[..200]).await.unwrap();
    (sink, ids(&attempted[..200]), ids(&attempted))
}

#[tokio::test]
async fn the_checker_reports_all_zero_on_a_clean_run() {
    let db = test_db!();
    let (_sink, acked, attempted) = checked_store(&db).await;
    let view = PostgresStoreView::connect(&db.url).await.unwrap();
    let report = check(&view, &acked, Some(&attempted)).await.unwrap();
    assert_eq!(report.attempted, Some(250));
    assert_eq!(report.acknowledged, 200);
    assert_eq!(report.stored, 200);
    assert_eq!(
        (report.lost, report.unexpected, report.duplicated),
        (0, Some(0), 0)
    );
    assert!(report.rollups_consistent);
    assert_eq!(report.rollup_events, 200);
    assert!(report.is_clean(), "{report}");
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["lost"], 0);
    assert_eq!(json["rollups_consistent"], true);
}

#[tokio::test]
async fn the_checker_detects_a_planted_lost_event() {
    let db = test_db!();
    let (_sink, acked, attempted) = checked_store(&db).await;
    let victim = acked[17];
    let client = db.client().await;
    // Deleted with its rollup contribution, so only the loss shows.
    client
        .batch_execute(&format!(
            "WITH gone AS (DELETE FROM ad_events WHERE event_id = '{victim}' RETURNING *)
             UPDATE ad_metrics_minute m SET events = m.events - 1,
                    cost_micros = m.cost_micros - g.cost_micros,
                    revenue_micros = m.revenue_micros - coalesce(g.revenue_micros, 0)
             FROM gone g
             WHERE m.minute = date_trunc('minute', g.occurred_at, 'UTC')
               AND m.advertiser_id = g.advertiser_id AND m.campaign_id = g.campaign_id
               AND m.ad_id = g.ad_id AND m.type = g.type
               AND m.currency = coalesce(g.currency, '');
             DELETE FROM ad_metrics_minute WHERE events = 0;"
        ))
        .await
        .unwrap();
    let view = PostgresStoreView::connect(&db.url).await.unwrap();
    let report = check(&view, &acked, Some(&attempted)).await.unwrap();
    assert_eq!(report.lost, 1, "{report}");
    assert_eq!(report.lost_sample, vec![victim]);
    assert_eq!((report.unexpected, report.duplicated), (Some(0), 0));
    assert!(report.rollups_consistent, "{report}");
    assert!(!report.is_clean());
}

#[tokio::test]
async fn the_checker_detects_a_planted_unexpected_row() {
    let db = test_db!();
    let (sink, acked, attempted) = checked_store(&db).await;
    let stranger = events(11, 1);
    sink.write(&stranger).await.unwrap();
    let view = PostgresStoreView::connect(&db.url).await.unwrap();
    let report = check(&view, &acked, Some(&attempted)).await.unwrap();
    assert_eq!(report.unexpected, Some(1), "{report}");
    assert_eq!(report.unexpected_sample, ids(&stranger));
    assert_eq!((report.lost, report.duplicated), (0, 0));
    assert!(report.rollups_consistent);
    assert!(!report.is_clean());
}

#[tokio::test]
async fn the_checker_detects_a_planted_rollup_inconsistency() {
    let db = test_db!();
    let (_sink, acked, attempted) = checked_store(&db).await;
    let client = db.client().await;
    // One rollup row counted twice, another with revenue drifted.
    client
        .batch_execute(
            "UPDATE ad_metrics_minute SET events = events * 2, cost_micros = cost_micros * 2
             WHERE ctid = (SELECT ctid FROM ad_metrics_minute ORDER BY minute LIMIT 1);
             UPDATE ad_metrics_minute SET revenue_micros = revenue_micros + 1
             WHERE ctid = (SELECT ctid FROM ad_metrics_minute ORDER BY minute DESC LIMIT 1);",
        )
        .await
        .unwrap();
    let view = PostgresStoreView::connect(&db.url).await.unwrap();
    let report = check(&view, &acked, Some(&attempted)).await.unwrap();
    assert!(!report.rollups_consistent, "{report}");
    assert_eq!(report.inconsistent_rollups, 2, "{report}");
    assert!(report.duplicated >= 1, "{report}");
    assert_eq!((report.lost, report.unexpected), (0, Some(0)));
    let doubled: BTreeMap<_, _> = report
        .inconsistent_sample
        .iter()
        .map(|m| {
            (
                m.key.minute,
                (m.stored.unwrap().events, m.recomputed.unwrap().events),
            )
        })
        .collect();
    assert!(doubled.values().any(|(s, r)| *s == 2 * r), "{doubled:?}");
}

/// Under a REPEATABLE READ default, a worker that waited for the migration lock read
/// `spillway_migrations` as of before the winner's commit, ran V1 again and failed to start
/// on `relation "ad_events" already exists`. The migration transaction is READ COMMITTED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_that_waited_for_the_lock_finds_nothing_to_do_under_repeatable_read() {
    let db = test_db!();
    db.client()
        .await
        .batch_execute(&format!(
            "ALTER DATABASE {} SET default_transaction_isolation = 'repeatable read'",
            db.name
        ))
        .await
        .unwrap();
    // This session holds the lock while the sink's migration waits for it.
    let mut holder = db.client().await;
    holder
        .execute(
            "SELECT pg_advisory_lock($1)",
            &[&shared::postgres_sink::MIGRATION_LOCK_KEY],
        )
        .await
        .unwrap();
    let sink = PostgresSink::new(&db.config()).unwrap();
    let waiting = tokio::spawn(async move { sink.migrate().await });
    let watcher = db.client().await;
    let mut blocked = false;
    for _ in 0..200 {
        let n: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = $1 AND wait_event_type = 'Lock' AND wait_event = 'advisory'",
                &[&db.name],
            )
            .await
            .unwrap()
            .get(0);
        if n > 0 {
            blocked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(blocked, "the sink's migration never waited for the lock");
    let all: Vec<i32> = shared::postgres_sink::MIGRATIONS
        .iter()
        .map(|m| m.version)
        .collect();
    // The holder's own transaction lock is granted (it holds the session lock).
    assert_eq!(
        shared::postgres_sink::migrate(&mut holder).await.unwrap(),
        all
    );
    holder
        .execute(
            "SELECT pg_advisory_unlock($1)",
            &[&shared::postgres_sink::MIGRATION_LOCK_KEY],
        )
        .await
        .unwrap();
    let applied = waiting.await.unwrap().unwrap();
    assert!(applied.is_empty(), "{applied:?}");
}

/// In a LATIN1 database every event with a character LATIN1 cannot hold was refused as bad
/// data (22P05) and dead-lettered after its 202. Migration refuses such a database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_refuses_a_database_that_is_not_utf8() {
    let db = test_db!("ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0");
    let sink = PostgresSink::new(&db.config()).unwrap();
    let err = sink.migrate().await.unwrap_err();
    assert!(
        matches!(&err, PostgresError::Encoding { found } if found == "LATIN1"),
        "{err}"
    );
    assert!(err.to_string().contains("ENCODING 'UTF8'"), "{err}");
    let created: Option<String> = db
        .client()
        .await
        .query_one("SELECT to_regclass('ad_events')::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(created, None);
}

/// With more batches at once than connections, a batch waiting for a connection gave up
/// after the connect timeout while the one holding it was slow but succeeding: a transient
/// failure, a receive used toward the DLQ. It waits as long as a statement may run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_waiting_for_a_pooled_connection_waits_out_a_slow_write() {
    let db = test_db!();
    let config = PostgresConfig {
        max_connections: 1,
        connect_timeout: Duration::from_secs(1),
        statement_timeout: Duration::from_secs(30),
        ..db.config()
    };
    let sink = Arc::new(PostgresSink::new(&config).unwrap());
    sink.migrate().await.unwrap();
    // A lock held elsewhere makes the first write slow: it holds the only connection.
    let mut locker = db.client().await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE ad_events IN SHARE MODE")
        .await
        .unwrap();
    let write = |seed| {
        let sink = Arc::clone(&sink);
        tokio::spawn(async move { sink.write(&events(seed, 10)).await })
    };
    let slow = write(1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let waiting = write(2);
    tokio::time::sleep(Duration::from_secs(3)).await;
    lock.commit().await.unwrap();
    assert_eq!(slow.await.unwrap().unwrap().inserted, 10);
    assert_eq!(waiting.await.unwrap().unwrap().inserted, 10);
}

/// A PgBouncer of the test's own in front of the shared server, or return (skip) outside CI
/// when `pgbouncer` is missing.
macro_rules! bouncer {
    ($mode:expr, $pool_size:expr) => {
        match tests::postgres::PgBouncer::start($mode, $pool_size) {
            Some(b) => b,
            None => return,
        }
    };
}

/// `SHOW statement_timeout` on every server connection of a pool of `pool_size` behind
/// `url`: each reader holds a transaction open, so each gets a server connection of its own.
async fn statement_timeouts_behind(url: &str, pool_size: usize) -> Vec<String> {
    let mut readers = Vec::new();
    let mut shown = Vec::new();
    for _ in 0..pool_size {
        let client = connect(url).await.unwrap();
        client.batch_execute("BEGIN").await.unwrap();
        let rows = client.simple_query("SHOW statement_timeout").await.unwrap();
        shown.extend(rows.into_iter().filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        }));
        readers.push(client);
    }
    shown
}

/// Behind PgBouncer in transaction mode six sink connections share two server connections,
/// each transaction on whichever is free. With `transaction_pooling` every batch (first
/// deliveries and redeliveries, all at once) is stored once and rolled up once, and no
/// session setting is left behind on the pooler's server connections (the statement timeout
/// is set per transaction).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_pgbouncer_in_transaction_mode_each_event_is_stored_and_rolled_up_once() {
    let db = test_db!();
    db.sink().await; // migrate, straight to the server
    let bouncer = bouncer!("transaction", 2);
    let sink = Arc::new(
        PostgresSink::new(&PostgresConfig {
            max_connections: 6,
            transaction_pooling: true,
            ..PostgresConfig::new(bouncer.url(&db.name))
        })
        .unwrap(),
    );
    let all = events(31, 3000);
    let batches: Vec<Vec<AdEvent>> = all.chunks(100).map(<[AdEvent]>::to_vec).collect();
    // Every batch, and every third one again (redeliveries), all at once.
    let writes = batches
        .iter()
        .chain(batches.iter().step_by(3))
        .cloned()
        .map(|batch| {
            let sink = Arc::clone(&sink);
            // No retry: behind the pooler a write must not fail at all (a prepared statement
            // gone or clashing would show up here as a transient error).
            tokio::spawn(async move { sink.write(&batch).await.unwrap() })
        });
    let inserted: usize = futures::future::join_all(writes)
        .await
        .into_iter()
        .map(|r| r.unwrap().inserted)
        .sum();
    assert_eq!(inserted, 3000);
    assert_eq!(sink.events_stored().await.unwrap(), 3000);
    assert_eq!(stored_rollups(&sink).await, expected_rollups(&all));
    let paths = sink.write_paths();
    assert_eq!((paths.copied, paths.upserted), (0, 40), "{paths:?}");
    assert_eq!(
        statement_timeouts_behind(&bouncer.url(&db.name), 2).await,
        ["0", "0"],
        "a session setting was left on the pooler's server connections"
    );
}

/// PgBouncer refuses the `options` startup parameter in either pool mode, which is where the
/// sink used to send its statement timeout: no connection could be opened through it. The
/// timeout is now set over the session (session mode) or in each transaction (transaction
/// mode), and a write stuck behind a lock is cancelled by it.
#[tokio::test]
async fn behind_pgbouncer_the_statement_timeout_holds_in_either_pool_mode() {
    let db = test_db!();
    db.sink().await; // migrate, straight to the server
    for (seed, mode, transaction_pooling) in [(41, "session", false), (42, "transaction", true)] {
        let bouncer = bouncer!(mode, 2);
        let sink = PostgresSink::new(&PostgresConfig {
            statement_timeout: Duration::from_millis(300),
            transaction_pooling,
            ..PostgresConfig::new(bouncer.url(&db.name))
        })
        .unwrap();
        let batch = events(seed, 50);
        let first = sink.write(&batch[..25]).await;
        assert_eq!(first.unwrap().inserted, 25, "{mode}: {}", bouncer.log());
        let mut locker = db.client().await;
        let tx = locker.transaction().await.unwrap();
        tx.batch_execute("LOCK TABLE ad_events IN ACCESS EXCLUSIVE MODE")
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let err = sink.write(&batch[25..]).await.unwrap_err();
        assert!(err.is_transient(), "{mode}: {err}");
        assert!(err.to_string().contains("57014"), "{mode}: {err}");
        assert!(started.elapsed() < Duration::from_secs(5), "{mode}");
        tx.rollback().await.unwrap();
        assert_eq!(
            sink.write(&batch[25..]).await.unwrap().inserted,
            25,
            "{mode}"
        );
    }
    assert_eq!(db.sink().await.events_stored().await.unwrap(), 100);
}

/// When PgBouncer in transaction mode replaces its server connection (here by `RECONNECT`;
/// in production on `server_lifetime`, a failover, or simply another connection being free),
/// a statement the sink prepared on the old one is gone. Without `transaction_pooling` the
/// next write fails on it (26000), and the error says which setting is missing; with it the
/// write goes through.
#[tokio::test]
async fn behind_pgbouncer_in_transaction_mode_kept_prepared_statements_fail_naming_the_setting() {
    let db = test_db!();
    db.sink().await; // migrate, straight to the server
    let bouncer = bouncer!("transaction", 1);
    let config = |transaction_pooling| PostgresConfig {
        max_connections: 1,
        transaction_pooling,
        ..PostgresConfig::new(bouncer.url(&db.name))
    };
    let prepared = PostgresSink::new(&config(false)).unwrap();
    let pooled = PostgresSink::new(&config(true)).unwrap();
    assert_eq!(prepared.write(&events(51, 20)).await.unwrap().inserted, 20);
    assert_eq!(pooled.write(&events(52, 20)).await.unwrap().inserted, 20);

    bouncer.admin("RECONNECT").await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !bouncer.admin("SHOW SERVERS").await.unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "PgBouncer kept its server connection after RECONNECT"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let err = prepared.write(&events(53, 20)).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    let said = err.to_string();
    assert!(
        said.contains("26000") && said.contains("--pg-transaction-pooling"),
        "{said}"
    );
    assert_eq!(pooled.write(&events(54, 20)).await.unwrap().inserted, 20);
    assert_eq!(pooled.events_stored().await.unwrap(), 60);
}

/// Setting the statement timeout is part of opening a connection, and bounded like it: a
/// PgBouncer that lets the sink log in but has no server connection to give it (session mode,
/// its one server connection held by another client) used to hold the write on the `SET` for
/// PgBouncer's `query_wait_timeout` (120 s), past every bound of the write and the breaker's
/// ping. It now fails as transient after the connect timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_full_pgbouncer_a_write_fails_within_the_connect_timeout() {
    let db = test_db!();
    db.sink().await; // migrate, straight to the server
    let bouncer = bouncer!("session", 1);
    let holder = connect(&bouncer.url(&db.name)).await.unwrap();
    holder.simple_query("SELECT 1").await.unwrap();
    let sink = PostgresSink::new(&PostgresConfig {
        connect_timeout: Duration::from_secs(1),
        ..PostgresConfig::new(bouncer.url(&db.name))
    })
    .unwrap();
    let batch = events(61, 10);
    let started = std::time::Instant::now();
    let err = sink.write(&batch).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(
        err.to_string()
            .contains("no answer to `SET statement_timeout"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(5), "{err}");
    drop(holder);
    assert_eq!(write_retrying(&sink, &batch).await.inserted, 10);
}
