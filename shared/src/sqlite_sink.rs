//! The SQLite store behind the `Sink` port: raw events in `ad_events` keyed by `event_id`,
//! and per-minute rollups in `ad_metrics_minute`.
//!
//! One transaction per write: each event is inserted with `ON CONFLICT DO NOTHING`, and only
//! the newly inserted ones are aggregated in memory and upserted into the rollups, so a
//! redelivered batch changes nothing. WAL with `synchronous=FULL` (a commit is on disk before
//! its messages are deleted, so it survives an OS crash), cached prepared statements and a large page cache; raw events are appended to a
//! rowid table with a unique index on the 16-byte id. `docs/SQLITE_PERF.md` has the figures.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rusqlite::{params, Connection, TransactionBehavior};
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

use crate::embedded::broker::is_transient_sqlite;
use crate::event::{AdEvent, EventId};
use crate::sink::{Sink, SinkError, WriteReport};

/// Where `spillway dev` keeps the store unless told otherwise.
pub const DEFAULT_STORE_PATH: &str = "./.spillway/events.db";

const STORE: &str = "sqlite";
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Page cache size in KiB (negative `cache_size` means KiB to SQLite).
const CACHE_KIB: i64 = 64 * 1024;
/// Page size of a new store.
const PAGE_BYTES: i64 = 4096;
/// WAL pages after which a commit checkpoints (SQLite's default is 1,000).
const WAL_AUTOCHECKPOINT_PAGES: i64 = 65_536;
/// Bytes of the database file read through mmap.
const MMAP_BYTES: i64 = 256 * 1024 * 1024;

/// `PRAGMA user_version` of the current schema: 2 keys raw events by a 16-byte BLOB id.
const SCHEMA_VERSION: i64 = 2;

// `ad_events` is a rowid table, so new events append to its last pages; only the small
// `event_id` index takes random inserts. A clustered (WITHOUT ROWID) random key would put
// every ~350-byte row on a random page and write that whole page to the WAL.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS ad_events (
    seq INTEGER PRIMARY KEY,
    event_id BLOB NOT NULL UNIQUE,
    type TEXT NOT NULL,
    occurred_at TEXT NOT NULL,
    advertiser_id TEXT NOT NULL,
    campaign_id TEXT NOT NULL,
    ad_id TEXT NOT NULL,
    publisher_id TEXT,
    placement_id TEXT,
    cost_micros INTEGER NOT NULL,
    revenue_micros INTEGER,
    currency TEXT,
    country TEXT,
    device TEXT,
    attributes TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS ad_metrics_minute (
    minute TEXT NOT NULL,
    advertiser_id TEXT NOT NULL,
    campaign_id TEXT NOT NULL,
    ad_id TEXT NOT NULL,
    type TEXT NOT NULL,
    currency TEXT NOT NULL,
    events INTEGER NOT NULL,
    cost_micros INTEGER NOT NULL,
    revenue_micros INTEGER NOT NULL,
    PRIMARY KEY (minute, advertiser_id, campaign_id, ad_id, type, currency)
) WITHOUT ROWID;
";

/// Version 1 stored `event_id` as 36-char text, the table's clustered primary key: copy the
/// events over with 16-byte ids. The rollups are unchanged.
const MIGRATE_V1_EVENTS: &str = "
INSERT INTO ad_events (event_id, type, occurred_at, advertiser_id, campaign_id, ad_id,
                       publisher_id, placement_id, cost_micros, revenue_micros, currency,
                       country, device, attributes)
SELECT unhex(replace(event_id, '-', '')), type, occurred_at, advertiser_id, campaign_id, ad_id,
       publisher_id, placement_id, cost_micros, revenue_micros, currency, country, device,
       attributes
FROM ad_events_v1 ORDER BY occurred_at;
DROP TABLE ad_events_v1;
";

const INSERT_EVENT: &str = "
INSERT INTO ad_events (event_id, type, occurred_at, advertiser_id, campaign_id, ad_id,
                       publisher_id, placement_id, cost_micros, revenue_micros, currency,
                       country, device, attributes)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
ON CONFLICT(event_id) DO NOTHING";

const UPSERT_ROLLUP: &str = "
INSERT INTO ad_metrics_minute (minute, advertiser_id, campaign_id, ad_id, type, currency,
                               events, cost_micros, revenue_micros)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
ON CONFLICT(minute, advertiser_id, campaign_id, ad_id, type, currency) DO UPDATE SET
    events = events + excluded.events,
    cost_micros = CASE WHEN cost_micros <= 9223372036854775807 - excluded.cost_micros
                       THEN cost_micros + excluded.cost_micros END,
    revenue_micros = CASE WHEN revenue_micros <= 9223372036854775807 - excluded.revenue_micros
                          THEN revenue_micros + excluded.revenue_micros END";

/// Why the rollup upsert's `CASE` gave a sum NULL, which its `NOT NULL` column refuses:
/// SQLite would otherwise turn an integer sum that overflows into a REAL and store it in the
/// INTEGER column (the table is not STRICT), so the rollup would silently stop being exact
/// and no longer read back. A trigger checking the type instead cost a third of the upsert.
const ROLLUP_OVERFLOW: &str = "a rollup sum of ad_metrics_minute would overflow a 64-bit integer";

/// One row of `ad_metrics_minute`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RollupRow {
    /// The minute, UTC, RFC 3339 (`2025-01-31T12:34:00Z`).
    pub minute: String,
    /// Advertiser.
    pub advertiser_id: String,
    /// Campaign.
    pub campaign_id: String,
    /// Ad.
    pub ad_id: String,
    /// Event type wire name.
    pub event_type: String,
    /// Currency code, `''` when the events had none.
    pub currency: String,
    /// Events counted.
    pub events: i64,
    /// Sum of `cost_micros`.
    pub cost_micros: i64,
    /// Sum of `revenue_micros`.
    pub revenue_micros: i64,
}

/// Where a text column of one event sits in its batch's [`Rows::text`].
#[derive(Debug, Clone, Copy)]
struct Span {
    start: usize,
    end: usize,
}

/// An event flattened to its column values, built before the blocking write. Its text lives
/// in the batch's one buffer, so a batch costs a handful of allocations, not ten per event.
struct EventRow {
    event_id: [u8; 16],
    event_type: &'static str,
    occurred_at: Span,
    minute_unix: i64,
    advertiser_id: Span,
    campaign_id: Span,
    ad_id: Span,
    publisher_id: Option<Span>,
    placement_id: Option<Span>,
    cost_micros: i64,
    revenue_micros: Option<i64>,
    currency: Option<Span>,
    country: Option<Span>,
    device: Option<&'static str>,
    attributes: Span,
}

/// A batch of rows and the text they point into.
struct Rows {
    text: String,
    rows: Vec<EventRow>,
}

fn micros(v: u64) -> Result<i64, SinkError> {
    i64::try_from(v).map_err(|_| rejected(format!("{v} micros does not fit a 64-bit integer")))
}

fn rejected(message: String) -> SinkError {
    SinkError::Rejected {
        store: STORE.into(),
        message,
    }
}

fn sqlite_error(op: &str, e: &rusqlite::Error) -> SinkError {
    let message = format!("{op}: {e}");
    if is_transient_sqlite(e) {
        SinkError::Unavailable {
            store: STORE.into(),
            message,
        }
    } else {
        rejected(message)
    }
}

/// Appends `s` to `buf` and returns where it went.
fn put(buf: &mut Vec<u8>, s: &str) -> Span {
    let start = buf.len();
    buf.extend_from_slice(s.as_bytes());
    Span {
        start,
        end: buf.len(),
    }
}

impl Rows {
    fn new(events: &[AdEvent]) -> Result<Self, SinkError> {
        // About 200 bytes of text per event.
        let mut buf = Vec::with_capacity(events.len() * 256);
        let mut rows = Vec::with_capacity(events.len());
        for ev in events {
            let at = ev.occurred_at.to_offset(UtcOffset::UTC);
            let start = buf.len();
            at.format_into(&mut buf, &Rfc3339)
                .map_err(|e| rejected(format!("occurred_at {at} cannot be formatted: {e}")))?;
            let occurred_at = Span {
                start,
                end: buf.len(),
            };
            let start = buf.len();
            serde_json::to_writer(&mut buf, &ev.attributes)
                .map_err(|e| rejected(format!("attributes cannot be serialised: {e}")))?;
            let attributes = Span {
                start,
                end: buf.len(),
            };
            let unix = at.unix_timestamp();
            rows.push(EventRow {
                event_id: *ev.event_id.as_uuid().as_bytes(),
                event_type: ev.event_type.as_str(),
                occurred_at,
                minute_unix: unix - unix.rem_euclid(60),
                advertiser_id: put(&mut buf, ev.advertiser_id.as_str()),
                campaign_id: put(&mut buf, ev.campaign_id.as_str()),
                ad_id: put(&mut buf, ev.ad_id.as_str()),
                publisher_id: ev.publisher_id.as_ref().map(|p| put(&mut buf, p.as_str())),
                placement_id: ev.placement_id.as_ref().map(|p| put(&mut buf, p.as_str())),
                cost_micros: micros(ev.cost_micros.get())?,
                revenue_micros: ev.revenue_micros.map(|r| micros(r.get())).transpose()?,
                currency: ev.currency.as_ref().map(|c| put(&mut buf, c.as_str())),
                country: ev.country.as_ref().map(|c| put(&mut buf, c.as_str())),
                device: ev.device.map(|d| d.as_str()),
                attributes,
            });
        }
        // Every piece appended was a whole `str`, so this only fails on a bug.
        let text = String::from_utf8(buf)
            .map_err(|e| rejected(format!("event text is not UTF-8: {e}")))?;
        Ok(Self { text, rows })
    }

    fn str(&self, span: Span) -> &str {
        &self.text[span.start..span.end]
    }

    fn opt(&self, span: Option<Span>) -> Option<&str> {
        span.map(|s| self.str(s))
    }
}

type RollupKey<'a> = (i64, &'a str, &'a str, &'a str, &'static str, &'a str);

#[derive(Default)]
struct Sums {
    events: i64,
    cost_micros: i64,
    revenue_micros: i64,
}

/// The SQLite store: one writer connection behind a mutex; SQLite work runs on the blocking
/// pool.
#[derive(Debug, Clone)]
pub struct SqliteSink {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl SqliteSink {
    /// Opens (creating if needed) the store at `path` and its tables. Blocks briefly on disk:
    /// call it at startup.
    ///
    /// # Errors
    /// [`SinkError`] when the directory or database cannot be created.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, SinkError> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| SinkError::Unavailable {
                store: STORE.into(),
                message: format!("cannot create {}: {e}", dir.display()),
            })?;
        }
        let conn = Connection::open(&path).map_err(|e| sqlite_error("open", &e))?;
        let setup = || -> rusqlite::Result<()> {
            conn.busy_timeout(BUSY_TIMEOUT)?;
            // Only takes effect on a new file. Measured with `cargo bench -p shared --bench
            // drain`: 4 KiB beat 512 B, 1 KiB, 16 KiB and 64 KiB (docs/SQLITE_PERF.md).
            conn.pragma_update(None, "page_size", PAGE_BYTES)?;
            conn.pragma_update(None, "journal_mode", "WAL")?;
            // FULL: a batch's commit is on disk before the worker deletes its messages, so an
            // OS crash cannot keep the delete and lose the events (NORMAL syncs the WAL only
            // at checkpoints).
            conn.pragma_update(None, "synchronous", "FULL")?;
            conn.pragma_update(None, "cache_size", -CACHE_KIB)?;
            conn.pragma_update(None, "temp_store", "MEMORY")?;
            // Random event ids and rollup keys dirty many pages per batch; checkpointing less
            // often lets repeated writes of the same page coalesce before they reach the
            // database file.
            conn.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES)?;
            conn.pragma_update(None, "mmap_size", MMAP_BYTES)?;
            conn.set_prepared_statement_cache_capacity(32);
            Ok(())
        };
        setup().map_err(|e| sqlite_error("set up the store", &e))?;
        let mut conn = conn;
        migrate(&mut conn).map_err(|e| sqlite_error("create or migrate the schema", &e))?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            path,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn run<T, F>(&self, f: F) -> Result<T, SinkError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, SinkError> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut conn)
        })
        .await
        .map_err(|e| SinkError::Unavailable {
            store: STORE.into(),
            message: format!("writer thread failed: {e}"),
        })?
    }

    /// Events stored in `ad_events`.
    ///
    /// # Errors
    /// [`SinkError`] on a database failure.
    pub async fn events_stored(&self) -> Result<u64, SinkError> {
        self.count("SELECT COUNT(*) FROM ad_events").await
    }

    /// Rows in `ad_metrics_minute`.
    ///
    /// # Errors
    /// [`SinkError`] on a database failure.
    pub async fn rollup_rows(&self) -> Result<u64, SinkError> {
        self.count("SELECT COUNT(*) FROM ad_metrics_minute").await
    }

    async fn count(&self, query: &'static str) -> Result<u64, SinkError> {
        self.run(move |conn| {
            conn.query_row(query, [], |r| r.get::<_, i64>(0))
                .map(|n| u64::try_from(n).unwrap_or(0))
                .map_err(|e| sqlite_error("count", &e))
        })
        .await
    }

    /// How many of `ids` are stored.
    ///
    /// # Errors
    /// [`SinkError`] on a database failure.
    pub async fn count_ids(&self, ids: &[EventId]) -> Result<usize, SinkError> {
        let ids: Vec<[u8; 16]> = ids.iter().map(|id| *id.as_uuid().as_bytes()).collect();
        self.run(move |conn| {
            let mut st = conn
                .prepare_cached("SELECT 1 FROM ad_events WHERE event_id = ?1")
                .map_err(|e| sqlite_error("prepare lookup", &e))?;
            let mut n = 0;
            for id in &ids {
                if st
                    .exists([&id[..]])
                    .map_err(|e| sqlite_error("look up", &e))?
                {
                    n += 1;
                }
            }
            Ok(n)
        })
        .await
    }

    /// Every rollup row, ordered by its key.
    ///
    /// # Errors
    /// [`SinkError`] on a database failure.
    pub async fn rollups(&self) -> Result<Vec<RollupRow>, SinkError> {
        self.run(|conn| {
            let mut st = conn
                .prepare_cached(
                    "SELECT minute, advertiser_id, campaign_id, ad_id, type, currency, events,
                            cost_micros, revenue_micros
                     FROM ad_metrics_minute
                     ORDER BY minute, advertiser_id, campaign_id, ad_id, type, currency",
                )
                .map_err(|e| sqlite_error("prepare rollups", &e))?;
            st.query_map([], |r| {
                Ok(RollupRow {
                    minute: r.get(0)?,
                    advertiser_id: r.get(1)?,
                    campaign_id: r.get(2)?,
                    ad_id: r.get(3)?,
                    event_type: r.get(4)?,
                    currency: r.get(5)?,
                    events: r.get(6)?,
                    cost_micros: r.get(7)?,
                    revenue_micros: r.get(8)?,
                })
            })
            .and_then(Iterator::collect)
            .map_err(|e| sqlite_error("read rollups", &e))
        })
        .await
    }
}

/// Creates the tables, or brings an older store to [`SCHEMA_VERSION`], in one transaction
/// (another process opening the same file waits, then finds it done).
fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let version = |c: &Connection| c.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0));
    if version(conn)? >= SCHEMA_VERSION {
        return Ok(());
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    if version(&tx)? < SCHEMA_VERSION {
        let v1: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM pragma_table_info('ad_events')
                            WHERE name = 'event_id' AND type = 'TEXT')",
            [],
            |r| r.get(0),
        )?;
        if v1 {
            tx.execute_batch("ALTER TABLE ad_events RENAME TO ad_events_v1")?;
        }
        tx.execute_batch(SCHEMA)?;
        if v1 {
            tx.execute_batch(MIGRATE_V1_EVENTS)?;
        }
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    }
    tx.commit()
}

fn minute_text(unix: i64) -> Result<String, SinkError> {
    OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .ok_or_else(|| rejected(format!("minute {unix} is out of range")))
}

fn write_batch(conn: &mut Connection, batch: &Rows) -> Result<WriteReport, SinkError> {
    // Inserting in id order walks the event_id index (and rollups, below) forwards, so
    // neighbouring keys share pages still hot in the CPU cache. A stable sort keeps the first
    // of in-batch duplicates first.
    let mut order: Vec<&EventRow> = batch.rows.iter().collect();
    order.sort_by_key(|r| r.event_id);
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| sqlite_error("begin", &e))?;
    let mut report = WriteReport::default();
    let mut sums: HashMap<RollupKey<'_>, Sums> = HashMap::with_capacity(order.len());
    {
        let mut insert = tx
            .prepare_cached(INSERT_EVENT)
            .map_err(|e| sqlite_error("prepare insert", &e))?;
        for r in order {
            let n = insert
                .execute(params![
                    &r.event_id[..],
                    r.event_type,
                    batch.str(r.occurred_at),
                    batch.str(r.advertiser_id),
                    batch.str(r.campaign_id),
                    batch.str(r.ad_id),
                    batch.opt(r.publisher_id),
                    batch.opt(r.placement_id),
                    r.cost_micros,
                    r.revenue_micros,
                    batch.opt(r.currency),
                    batch.opt(r.country),
                    r.device,
                    batch.str(r.attributes),
                ])
                .map_err(|e| sqlite_error("insert event", &e))?;
            if n == 0 {
                report.duplicates += 1;
                continue;
            }
            report.inserted += 1;
            let key = (
                r.minute_unix,
                batch.str(r.advertiser_id),
                batch.str(r.campaign_id),
                batch.str(r.ad_id),
                r.event_type,
                batch.opt(r.currency).unwrap_or(""),
            );
            let s = sums.entry(key).or_default();
            s.events += 1;
            let overflow = || rejected(format!("{ROLLUP_OVERFLOW} within one batch"));
            s.cost_micros = s
                .cost_micros
                .checked_add(r.cost_micros)
                .ok_or_else(overflow)?;
            s.revenue_micros = s
                .revenue_micros
                .checked_add(r.revenue_micros.unwrap_or(0))
                .ok_or_else(overflow)?;
        }
        let mut sums: Vec<_> = sums.into_iter().collect();
        sums.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut upsert = tx
            .prepare_cached(UPSERT_ROLLUP)
            .map_err(|e| sqlite_error("prepare rollup", &e))?;
        let mut minute: Option<(i64, String)> = None;
        for ((unix, adv, camp, ad, ty, cur), s) in &sums {
            // Sorted by minute first: format each minute once.
            let text = match &minute {
                Some((m, text)) if m == unix => text,
                _ => &minute.insert((*unix, minute_text(*unix)?)).1,
            };
            upsert
                .execute(params![
                    text,
                    adv,
                    camp,
                    ad,
                    ty,
                    cur,
                    s.events,
                    s.cost_micros,
                    s.revenue_micros
                ])
                .map_err(|e| match e.sqlite_error() {
                    Some(f) if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_NOTNULL => {
                        rejected(format!(
                            "{ROLLUP_OVERFLOW} ({adv}/{camp}/{ad}, {text}): {e}"
                        ))
                    }
                    _ => sqlite_error("update rollup", &e),
                })?;
        }
    }
    tx.commit().map_err(|e| sqlite_error("commit", &e))?;
    Ok(report)
}

#[async_trait::async_trait]
impl Sink for SqliteSink {
    async fn write(&self, events: &[AdEvent]) -> Result<WriteReport, SinkError> {
        if events.is_empty() {
            return Ok(WriteReport::default());
        }
        let rows = Rows::new(events)?;
        self.run(move |conn| write_batch(conn, &rows)).await
    }

    async fn ping(&self) -> Result<(), SinkError> {
        self.run(|conn| {
            conn.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))
                .map(drop)
                .map_err(|e| sqlite_error("ping", &e))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::clock::SystemClock;
    use crate::event::ValidationPolicy;
    use crate::synthetic::SyntheticEvents;

    fn events(n: usize, seed: u64) -> Vec<AdEvent> {
        let mut g = SyntheticEvents::new(seed, 7);
        let base = OffsetDateTime::now_utc() - time::Duration::hours(2);
        (0..n)
            .map(|i| {
                // Spread over ~20 minutes so rollups span several minutes.
                let at = base + time::Duration::seconds(i64::try_from(i % 1200).unwrap());
                AdEvent::from_json(g.event_at(at), &ValidationPolicy::default(), &SystemClock)
            })
            .collect::<Result<_, _>>()
            .unwrap()
    }

    fn open() -> (tempfile::TempDir, SqliteSink) {
        let dir = tempfile::tempdir().unwrap();
        let sink = SqliteSink::open(dir.path().join("store/events.db")).unwrap();
        (dir, sink)
    }

    /// The rollups recomputed with SQL from `ad_events` alone, keyed like the rollup table.
    fn recomputed(path: &Path) -> Vec<RollupRow> {
        let conn = Connection::open(path).unwrap();
        let mut st = conn
            .prepare(
                "SELECT substr(occurred_at, 1, 16) || ':00Z' AS m, advertiser_id, campaign_id,
                        ad_id, type, COALESCE(currency, '') AS c, COUNT(*), SUM(cost_micros),
                        COALESCE(SUM(revenue_micros), 0)
                 FROM ad_events GROUP BY m, advertiser_id, campaign_id, ad_id, type, c
                 ORDER BY m, advertiser_id, campaign_id, ad_id, type, c",
            )
            .unwrap();
        st.query_map([], |r| {
            Ok(RollupRow {
                minute: r.get(0)?,
                advertiser_id: r.get(1)?,
                campaign_id: r.get(2)?,
                ad_id: r.get(3)?,
                event_type: r.get(4)?,
                currency: r.get(5)?,
                events: r.get(6)?,
                cost_micros: r.get(7)?,
                revenue_micros: r.get(8)?,
            })
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
    }

    #[tokio::test]
    async fn a_batch_is_stored_with_every_field() {
        let (_dir, sink) = open();
        let evs = events(50, 1);
        let report = sink.write(&evs).await.unwrap();
        assert_eq!(
            report,
            WriteReport {
                inserted: 50,
                duplicates: 0
            }
        );
        assert_eq!(sink.events_stored().await.unwrap(), 50);
        let ids: Vec<EventId> = evs.iter().map(|e| e.event_id).collect();
        assert_eq!(sink.count_ids(&ids).await.unwrap(), 50);

        let conn = Connection::open(sink.path()).unwrap();
        let e = &evs[0];
        let (ty, at, attrs, country): (String, String, String, Option<String>) = conn
            .query_row(
                "SELECT type, occurred_at, attributes, country FROM ad_events WHERE event_id = ?1",
                [&e.event_id.as_uuid().as_bytes()[..]],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .unwrap();
        assert_eq!(ty, e.event_type.as_str());
        assert_eq!(OffsetDateTime::parse(&at, &Rfc3339).unwrap(), e.occurred_at);
        let attrs: BTreeMap<String, String> = serde_json::from_str(&attrs).unwrap();
        assert_eq!(attrs, e.attributes);
        assert_eq!(country.as_deref(), e.country.as_ref().map(|c| c.as_str()));
    }

    #[tokio::test]
    async fn a_redelivered_batch_changes_no_rollup() {
        let (_dir, sink) = open();
        let evs = events(500, 2);
        sink.write(&evs).await.unwrap();
        let before = sink.rollups().await.unwrap();
        let report = sink.write(&evs).await.unwrap();
        assert_eq!(
            report,
            WriteReport {
                inserted: 0,
                duplicates: 500
            }
        );
        assert_eq!(sink.rollups().await.unwrap(), before);
        assert_eq!(sink.events_stored().await.unwrap(), 500);
    }

    #[tokio::test]
    async fn a_partly_new_batch_adds_only_its_new_events_to_the_rollups() {
        let (_dir, sink) = open();
        let evs = events(300, 3);
        sink.write(&evs[..200]).await.unwrap();
        // Overlap, plus an in-batch duplicate.
        let mut second = evs[100..].to_vec();
        second.push(evs[250].clone());
        let report = sink.write(&second).await.unwrap();
        assert_eq!(
            report,
            WriteReport {
                inserted: 100,
                duplicates: 101
            }
        );
        let total: i64 = sink.rollups().await.unwrap().iter().map(|r| r.events).sum();
        assert_eq!(total, 300);
        assert_eq!(sink.rollups().await.unwrap(), recomputed(sink.path()));
    }

    #[tokio::test]
    async fn rollups_equal_sums_recomputed_from_ad_events() {
        let (_dir, sink) = open();
        let evs = events(3000, 4);
        for batch in evs.chunks(700) {
            sink.write(batch).await.unwrap();
        }
        let rollups = sink.rollups().await.unwrap();
        assert_eq!(rollups, recomputed(sink.path()));
        assert_eq!(
            sink.rollup_rows().await.unwrap(),
            u64::try_from(rollups.len()).unwrap()
        );
        assert!(rollups.iter().any(|r| r.revenue_micros > 0));
        assert!(rollups.iter().all(|r| r.minute.ends_with(":00Z")));
        let cost: i64 = evs
            .iter()
            .map(|e| i64::try_from(e.cost_micros.get()).unwrap())
            .sum();
        assert_eq!(rollups.iter().map(|r| r.cost_micros).sum::<i64>(), cost);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_do_not_lose_data() {
        let (dir, sink) = open();
        // A second connection on the same file, as a second process would have.
        let other = SqliteSink::open(sink.path()).unwrap();
        let evs = events(4000, 5);
        let mut tasks = Vec::new();
        for batch in evs.chunks(250) {
            // Every batch is written twice, by different connections, concurrently.
            for s in [sink.clone(), other.clone()] {
                let batch = batch.to_vec();
                tasks.push(tokio::spawn(async move { s.write(&batch).await }));
            }
        }
        let mut inserted = 0;
        let mut duplicates = 0;
        for t in tasks {
            let r = t.await.unwrap().unwrap();
            inserted += r.inserted;
            duplicates += r.duplicates;
        }
        assert_eq!((inserted, duplicates), (4000, 4000));
        assert_eq!(sink.events_stored().await.unwrap(), 4000);
        assert_eq!(sink.rollups().await.unwrap(), recomputed(sink.path()));
        drop(dir);
    }

    #[tokio::test]
    async fn a_version_1_store_with_text_ids_is_migrated_and_still_deduplicates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.db");
        let evs = events(20, 8);
        {
            // The version 1 layout: a clustered 36-char text key.
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE ad_events (event_id TEXT PRIMARY KEY NOT NULL, type TEXT NOT NULL,
                    occurred_at TEXT NOT NULL, advertiser_id TEXT NOT NULL,
                    campaign_id TEXT NOT NULL, ad_id TEXT NOT NULL, publisher_id TEXT,
                    placement_id TEXT, cost_micros INTEGER NOT NULL, revenue_micros INTEGER,
                    currency TEXT, country TEXT, device TEXT, attributes TEXT NOT NULL
                 ) WITHOUT ROWID;",
            )
            .unwrap();
            for e in &evs[..10] {
                conn.execute(
                    "INSERT INTO ad_events VALUES (?1, ?2, ?3, 'a', 'c', 'd', NULL, NULL, 1, NULL,
                                                   'USD', NULL, NULL, '{}')",
                    params![
                        e.event_id.to_string(),
                        e.event_type.as_str(),
                        "2025-01-01T00:00:00Z"
                    ],
                )
                .unwrap();
            }
        }
        let sink = SqliteSink::open(&path).unwrap();
        assert_eq!(sink.events_stored().await.unwrap(), 10);
        let ids: Vec<EventId> = evs.iter().map(|e| e.event_id).collect();
        assert_eq!(sink.count_ids(&ids).await.unwrap(), 10);
        let report = sink.write(&evs).await.unwrap();
        assert_eq!((report.inserted, report.duplicates), (10, 10));
        // Opening again finds the current version and changes nothing.
        drop(sink);
        assert_eq!(
            SqliteSink::open(&path)
                .unwrap()
                .events_stored()
                .await
                .unwrap(),
            20
        );
    }

    #[tokio::test]
    async fn a_database_that_cannot_be_written_is_rejected_as_permanent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.db");
        let sink = SqliteSink::open(&path).unwrap();
        // Sabotage the schema: a NOT NULL column the sink does not fill.
        Connection::open(&path)
            .unwrap()
            .execute_batch("ALTER TABLE ad_events ADD COLUMN tenant TEXT NOT NULL DEFAULT 'x' CHECK (tenant <> 'x')")
            .unwrap();
        let err = sink.write(&events(1, 6)).await.unwrap_err();
        assert!(!err.is_transient(), "{err}");
        assert_eq!(sink.events_stored().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_rollup_sum_past_a_64_bit_integer_is_refused_and_stores_nothing() {
        let (dir, sink) = open();
        let first = events(1, 8);
        sink.write(&first).await.unwrap();
        let path = dir.path().join("store/events.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch("UPDATE ad_metrics_minute SET cost_micros = 9223372036854775000")
            .unwrap();
        // Another event under the same rollup key, whose cost takes the sum past i64::MAX.
        let mut more = events(1, 9)[0].clone();
        let e = &first[0];
        (
            more.occurred_at,
            more.advertiser_id,
            more.campaign_id,
            more.ad_id,
        ) = (
            e.occurred_at,
            e.advertiser_id.clone(),
            e.campaign_id.clone(),
            e.ad_id.clone(),
        );
        (more.event_type, more.currency) = (e.event_type, e.currency.clone());
        more.cost_micros =
            crate::event::Micros::parse("cost_micros", &serde_json::json!(1_000_000_000_000_u64))
                .unwrap();
        let err = sink.write(&[more]).await.unwrap_err();
        assert!(!err.is_transient(), "{err}");
        assert!(
            err.to_string().contains("would overflow a 64-bit integer"),
            "{err}"
        );
        // Nothing of the refused batch stayed, and the rollup still reads back exact.
        assert_eq!(sink.events_stored().await.unwrap(), 1);
        let rollups = sink.rollups().await.unwrap();
        assert_eq!(rollups.len(), 1);
        assert_eq!(rollups[0].cost_micros, 9_223_372_036_854_775_000);
    }

    #[tokio::test]
    async fn a_locked_database_is_reported_as_transient() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.db");
        let sink = SqliteSink::open(&path).unwrap();
        sink.run(|conn| {
            conn.busy_timeout(Duration::from_millis(50))
                .map_err(|e| sqlite_error("busy timeout", &e))
        })
        .await
        .unwrap();
        let blocker = Connection::open(&path).unwrap();
        blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
        let err = sink.write(&events(1, 7)).await.unwrap_err();
        assert!(err.is_transient(), "{err}");
        blocker.execute_batch("ROLLBACK").unwrap();
        assert_eq!(sink.write(&events(1, 7)).await.unwrap().inserted, 1);
    }
}
