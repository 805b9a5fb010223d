//! The PostgreSQL store: raw events keyed by `event_id` plus per-minute rollups, written
//! idempotently in one transaction per batch.
//!
//! A write takes one of two paths, each one transaction:
//!
//! - **First delivery (the common case)**: a binary `COPY` of the batch into `ad_events`,
//!   then the batch's rollup deltas, summed in the worker, upserted into `ad_metrics_minute`
//!   (`INSERT … SELECT … FROM UNNEST(…) ON CONFLICT … DO UPDATE`), then `COMMIT`. The COPY
//!   has no `ON CONFLICT`: if any event of the batch is already stored, the primary key
//!   refuses it (`23505`), the transaction rolls back with nothing written, and the batch
//!   takes the other path.
//! - **Redelivery**: one statement sends the batch as column arrays,
//!   `INSERT … SELECT … FROM UNNEST(…) ON CONFLICT (event_id) DO NOTHING RETURNING …`, whose
//!   returned rows — the events stored for the first time, and only those — are grouped into
//!   the rollups by an `INSERT … ON CONFLICT … DO UPDATE` in the same statement. A redelivered
//!   event is not returned, so it changes no rollup. Redeliveries come in runs (after a
//!   crash, an outage, a lapsed visibility timeout), so after a batch met a stored event the
//!   next [`REDELIVERY_RUN`] batches take this path directly.
//!
//! Either way an event is stored once and counted in the rollups once, in the transaction
//! that stores it. The first path is what makes the sink fast: a plain COPY into the keyed
//! table costs well under `ON CONFLICT`'s speculative insertion (docs/POSTGRES.md).
//!
//! **Behind a pooler in transaction mode** (PgBouncer `pool_mode = transaction`, and the
//! poolers built into managed services), one client connection's transactions may each run
//! on a different server connection, so nothing may outlive a transaction there: with
//! [`PostgresConfig::transaction_pooling`] every batch takes the redelivery path's statement,
//! sent unnamed (no prepared statement kept), in a transaction that sets its own
//! `statement_timeout` (`SET LOCAL`). Otherwise the timeout is set once per connection
//! (`SET`) right after it opens. It is never sent as the `options` startup parameter, which
//! PgBouncer refuses in every pool mode (`unsupported startup parameter: options`).
//!
//! The schema lives in versioned files under `shared/migrations/` (`V{n}__{name}.sql`),
//! embedded at build time and applied by [`migrate`].

use std::collections::BTreeMap;
use std::fmt;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_postgres::{
    Hook, HookError, Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime,
    Timeouts,
};
use serde::Serialize;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{Json, ToSql, Type};
use tokio_postgres::{CopyInSink, NoTls};
use uuid::Uuid;

use crate::event::AdEvent;
use crate::metrics::Exposition;
use crate::sink::{Sink, SinkError, WriteReport};

/// The store name carried by this sink's errors.
const STORE: &str = "postgres";

/// Key of the transaction-level advisory lock that serialises concurrent [`migrate`] calls
/// (the bytes of "SPILLWAY").
pub const MIGRATION_LOCK_KEY: i64 = 0x5350_494C_4C57_4159;

/// The `application_name` the sink's connections report, unless the URL sets one.
const APPLICATION_NAME: &str = "spillway";

/// Settings of the PostgreSQL store.
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresConfig {
    /// Where the database is: a URL (`postgres://user:password@host:5432/dbname`) or a libpq
    /// key=value string (`host=127.0.0.1 user=postgres dbname=spillway`). TLS only with
    /// `sslmode=require`, and then the server's certificate is verified (see `ca_file`).
    /// Default `postgres://postgres@127.0.0.1:5432/postgres`.
    pub url: String,
    /// Most connections the sink holds open, which is also the most writes in flight at once;
    /// further writes wait for a free connection. Default 8.
    pub max_connections: usize,
    /// Server-side limit on one statement (PostgreSQL's `statement_timeout`); a write that
    /// runs longer is cancelled, rolled back, and reported as transient. Zero means none, as
    /// in PostgreSQL. Default 30 s.
    pub statement_timeout: Duration,
    /// Limit on opening a connection, and on waiting for a free one when all
    /// `max_connections` are busy; past it a write fails as transient. Default 5 s.
    pub connect_timeout: Duration,
    /// PEM file of the certificates that may sign the server's (RDS: the region's or the
    /// global bundle), trusted beside the compiled-in public roots. Only with
    /// `sslmode=require`. Default none.
    pub ca_file: Option<std::path::PathBuf>,
    /// The URL leads to a pooler in transaction mode (PgBouncer `pool_mode = transaction`),
    /// where a connection's consecutive transactions may run on different server
    /// connections: no statement is kept prepared between transactions, the statement
    /// timeout is set in each transaction, and every batch takes the `ON CONFLICT`
    /// statement, never the COPY (module docs). Default false.
    pub transaction_pooling: bool,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/postgres".into(),
            max_connections: 8,
            statement_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            ca_file: None,
            transaction_pooling: false,
        }
    }
}

impl PostgresConfig {
    /// The defaults with another URL.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ..Self::default()
        }
    }
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &redact_password(&self.url))
            .field("max_connections", &self.max_connections)
            .field("statement_timeout", &self.statement_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("ca_file", &self.ca_file)
            .field("transaction_pooling", &self.transaction_pooling)
            .finish()
    }
}

/// Hides the passwords of a connection string, for logs and `Debug`: the userinfo of a
/// `scheme://user:password@host` URL, and every `password` parameter, as a URL query
/// (`?password=…`) or a key-value pair (`password=…`, `password = …`, `password='a b'`).
fn redact_password(url: &str) -> String {
    let userinfo_hidden = match url.find("://").map(|i| i + 3) {
        Some(scheme_end) => {
            let rest = &url[scheme_end..];
            let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
            match (rest[..authority_end].rfind('@'), rest.find(':')) {
                (Some(at), Some(colon)) if colon < at => {
                    format!(
                        "{}{}:***{}",
                        &url[..scheme_end],
                        &rest[..colon],
                        &rest[at..]
                    )
                }
                _ => url.to_owned(),
            }
        }
        None => url.to_owned(),
    };
    redact_password_params(&userinfo_hidden)
}

/// Replaces the value of every `password` parameter with `***`.
fn redact_password_params(s: &str) -> String {
    // ASCII lower-casing keeps byte offsets, so positions found in `lower` index `s`.
    let lower = s.to_ascii_lowercase();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while let Some(found) = lower[i..].find("password") {
        let name_end = i + found + "password".len();
        let after_name = &s[name_end..];
        let Some(after_eq) = after_name.trim_start().strip_prefix('=') else {
            out.push_str(&s[i..name_end]);
            i = name_end;
            continue;
        };
        let value_start = s.len() - after_eq.trim_start().len();
        let value = &s[value_start..];
        let value_len = match value.strip_prefix('\'') {
            // A quoted value: up to the closing quote (`\'` escapes one).
            Some(quoted) => {
                let mut end = None;
                let mut escaped = false;
                for (k, c) in quoted.char_indices() {
                    match c {
                        '\\' if !escaped => escaped = true,
                        '\'' if !escaped => {
                            end = Some(k + 2);
                            break;
                        }
                        _ => escaped = false,
                    }
                }
                end.unwrap_or(value.len())
            }
            None => value
                .find(|c: char| c.is_whitespace() || c == '&')
                .unwrap_or(value.len()),
        };
        out.push_str(&s[i..value_start]);
        out.push_str("***");
        i = value_start + value_len;
    }
    out.push_str(&s[i..]);
    out
}

/// Why the PostgreSQL store could not be set up or migrated.
#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    /// The URL does not parse.
    #[error("invalid PostgreSQL URL {url}: {source}")]
    InvalidUrl {
        /// The URL, password hidden.
        url: String,
        /// The parser's complaint.
        source: tokio_postgres::Error,
    },
    /// The statement timeout is longer than PostgreSQL accepts (`i32::MAX` ms, about 24.8
    /// days); the server would refuse every connection.
    #[error("statement timeout of {ms} ms is longer than PostgreSQL's limit of 2147483647 ms")]
    StatementTimeoutTooLong {
        /// The configured timeout.
        ms: u128,
    },
    /// The connection pool could not be built.
    #[error("cannot build the PostgreSQL connection pool: {message}")]
    Pool {
        /// What went wrong.
        message: String,
    },
    /// No connection could be had from the pool.
    #[error("cannot get a PostgreSQL connection: {}", describe_pool(source))]
    Connect {
        /// The pool's error.
        source: PoolError,
    },
    /// A migration's SQL failed; the whole migration run was rolled back.
    #[error("migration V{version}__{name} failed: {}", describe(source))]
    Migration {
        /// Its version.
        version: i32,
        /// Its name.
        name: &'static str,
        /// The database's error.
        source: tokio_postgres::Error,
    },
    /// A migration already applied differs from the file of the same version in this build.
    #[error("migration V{version}__{name} was applied with another content (checksum {applied}, this build has {expected}); never edit an applied migration, add a new one")]
    MigrationChanged {
        /// Its version.
        version: i32,
        /// Its name.
        name: &'static str,
        /// Checksum recorded in `spillway_migrations`.
        applied: String,
        /// Checksum of the embedded file.
        expected: String,
    },
    /// TLS cannot be set up as asked: a CA file that cannot be read or holds no
    /// certificate, or one given while the URL does not ask for TLS.
    #[error("PostgreSQL TLS: {message}")]
    Tls {
        /// What is wrong.
        message: String,
    },
    /// The database does not store UTF-8: events hold any Unicode text, and each one its
    /// encoding cannot hold would be refused as bad data and dead-lettered, after its 202.
    #[error("the database's encoding is {found}; Spillway needs UTF8 (events hold any Unicode text, and one the database cannot hold would be dead-lettered): create it with ENCODING 'UTF8'")]
    Encoding {
        /// The server's `server_encoding`.
        found: String,
    },
    /// Any other database error.
    #[error("PostgreSQL error: {}", describe(.0))]
    Database(#[from] tokio_postgres::Error),
}

/// One versioned schema change, embedded from `shared/migrations/V{version}__{name}.sql`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migration {
    /// Its version; migrations apply in increasing order, each once.
    pub version: i32,
    /// The name part of its file name.
    pub name: &'static str,
    /// Its SQL, run in the migration transaction.
    pub sql: &'static str,
}

impl Migration {
    /// SHA-256 of the SQL in hex, recorded when applied so later edits are detected.
    pub fn checksum(&self) -> String {
        hex::encode(Sha256::digest(self.sql.as_bytes()))
    }
}

/// Every migration of this build, in version order.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "create_events_and_rollups",
    sql: include_str!("../migrations/V1__create_events_and_rollups.sql"),
}];

/// The TLS connector the URL asks for: none unless `sslmode=require` (the default, `prefer`,
/// stays in plain text, as it always did), then rustls verifying the server's certificate and
/// its host name against the compiled-in public roots and `ca_file`. Stricter than libpq's
/// `require`, which checks nothing: a connection that must be encrypted is one that must not
/// go to whoever answers.
fn tls_connector(
    pg: &tokio_postgres::Config,
    ca_file: Option<&std::path::Path>,
) -> Result<Option<tokio_postgres_rustls::MakeRustlsConnect>, PostgresError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    if pg.get_ssl_mode() != tokio_postgres::config::SslMode::Require {
        if let Some(path) = ca_file {
            return Err(PostgresError::Tls {
                message: format!(
                    "a CA file ({}) is given but the URL does not ask for TLS: add sslmode=require",
                    path.display()
                ),
            });
        }
        return Ok(None);
    }
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(webpki_root_certs::TLS_SERVER_ROOT_CERTS.iter().cloned());
    if let Some(path) = ca_file {
        let tls = |what: String| PostgresError::Tls {
            message: format!("CA file {}: {what}", path.display()),
        };
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| tls(e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| tls(e.to_string()))?;
        if certs.is_empty() {
            return Err(tls("holds no PEM certificate".into()));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| tls(e.to_string()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| PostgresError::Tls {
            message: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Some(tokio_postgres_rustls::MakeRustlsConnect::new(config)))
}

/// Applies the migrations not applied yet, in one transaction, and records them in
/// `spillway_migrations`; returns the versions applied now (empty when up to date).
///
/// Concurrent callers (several workers starting at once) are serialised by a transaction
/// advisory lock: one applies, the others then find nothing to do. The transaction is READ
/// COMMITTED whatever the database's default: under REPEATABLE READ a caller that waited
/// for the lock read `spillway_migrations` as of before the winner's commit, ran V1 again
/// and failed to start on `relation "ad_events" already exists`.
///
/// # Errors
/// [`PostgresError::Encoding`] when the database is not UTF8,
/// [`PostgresError::Migration`] when a migration's SQL fails (nothing is applied),
/// [`PostgresError::MigrationChanged`] when an applied migration was edited since, and
/// [`PostgresError::Database`] for any other database error.
pub async fn migrate(client: &mut tokio_postgres::Client) -> Result<Vec<i32>, PostgresError> {
    // Unnamed (`query_typed_one`): a statement prepared outside a transaction would be gone
    // behind a pooler in transaction mode by the time it is executed.
    let encoding: String = client
        .query_typed_one("SELECT current_setting('server_encoding')", &[])
        .await?
        .try_get(0)?;
    if encoding != "UTF8" {
        return Err(PostgresError::Encoding { found: encoding });
    }
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::ReadCommitted)
        .start()
        .await?;
    // Unnamed statements (`query_typed`) throughout: behind a pooler in transaction mode a
    // named one (tokio-postgres calls them s0, s1, …) can clash with a statement another
    // client left on the same server connection (42P05).
    tx.query_typed(
        "SELECT pg_advisory_xact_lock($1)",
        &[(&MIGRATION_LOCK_KEY, Type::INT8)],
    )
    .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS spillway_migrations (
            version    integer     PRIMARY KEY,
            name       text        NOT NULL,
            checksum   text        NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now()
        )",
    )
    .await?;
    let applied: BTreeMap<i32, String> = tx
        .query_typed("SELECT version, checksum FROM spillway_migrations", &[])
        .await?
        .iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
        .collect::<Result<_, tokio_postgres::Error>>()?;
    let mut now_applied = Vec::new();
    for m in MIGRATIONS {
        let expected = m.checksum();
        match applied.get(&m.version) {
            Some(sum) if *sum == expected => {}
            Some(sum) => {
                return Err(PostgresError::MigrationChanged {
                    version: m.version,
                    name: m.name,
                    applied: sum.clone(),
                    expected,
                })
            }
            None => {
                tx.batch_execute(m.sql)
                    .await
                    .map_err(|source| PostgresError::Migration {
                        version: m.version,
                        name: m.name,
                        source,
                    })?;
                tx.query_typed(
                    "INSERT INTO spillway_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    &[
                        (&m.version, Type::INT4),
                        (&m.name, Type::TEXT),
                        (&expected, Type::TEXT),
                    ],
                )
                .await?;
                now_applied.push(m.version);
            }
        }
    }
    tx.commit().await?;
    if !now_applied.is_empty() {
        tracing::info!(versions = ?now_applied, "Applied PostgreSQL migrations");
    }
    Ok(now_applied)
}

/// One row of `ad_metrics_minute`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RollupRow {
    /// `occurred_at` truncated to the minute, in UTC.
    #[serde(with = "time::serde::rfc3339")]
    pub minute: OffsetDateTime,
    /// The advertiser.
    pub advertiser_id: String,
    /// The campaign.
    pub campaign_id: String,
    /// The ad.
    pub ad_id: String,
    /// The event type's wire name.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The currency, `""` when the events had none.
    pub currency: String,
    /// How many events.
    pub events: i64,
    /// Sum of their `cost_micros`.
    pub cost_micros: i64,
    /// Sum of their `revenue_micros` (absent counts as 0).
    pub revenue_micros: i64,
}

/// The write: insert the new events, then add exactly the inserted ones (the `RETURNING`
/// rows) into the rollups. Rollup keys are upserted in key order so concurrent writers lock
/// them in the same order; the events arrive sorted by `event_id` for the same reason. The
/// text keys sort by bytes (`COLLATE "C"`), as [`RollupDeltas`] sorts them for the COPY
/// path: under the database's own collation (en-US sorts `a1` before `Acme`) the two paths
/// would lock the same rows in opposite orders and deadlock.
const WRITE_SQL: &str = "
WITH ins AS (
    INSERT INTO ad_events (event_id, type, occurred_at, advertiser_id, campaign_id, ad_id,
                           publisher_id, placement_id, cost_micros, revenue_micros, currency,
                           country, device, attributes)
    SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::timestamptz[], $4::text[], $5::text[],
                         $6::text[], $7::text[], $8::text[], $9::int8[], $10::int8[],
                         $11::text[], $12::text[], $13::text[], $14::jsonb[])
    ON CONFLICT (event_id) DO NOTHING
    RETURNING type, occurred_at, advertiser_id, campaign_id, ad_id, cost_micros,
              revenue_micros, currency
), rollup AS (
    INSERT INTO ad_metrics_minute AS m (minute, advertiser_id, campaign_id, ad_id, type,
                                        currency, events, cost_micros, revenue_micros)
    SELECT date_trunc('minute', occurred_at, 'UTC'), advertiser_id, campaign_id, ad_id, type,
           coalesce(currency, ''), count(*), sum(cost_micros), coalesce(sum(revenue_micros), 0)
    FROM ins
    GROUP BY 1, 2, 3, 4, 5, 6
    ORDER BY 1, advertiser_id COLLATE \"C\", campaign_id COLLATE \"C\", ad_id COLLATE \"C\",
             type COLLATE \"C\", coalesce(currency, '') COLLATE \"C\"
    ON CONFLICT (minute, advertiser_id, campaign_id, ad_id, type, currency) DO UPDATE
    SET events = m.events + EXCLUDED.events,
        cost_micros = m.cost_micros + EXCLUDED.cost_micros,
        revenue_micros = m.revenue_micros + EXCLUDED.revenue_micros
)
SELECT count(*) FROM ins";

/// The column list of [`COPY_COLUMNS`], as a literal for `concat!`.
macro_rules! copy_columns {
    () => {
        "event_id, type, occurred_at, advertiser_id, campaign_id, ad_id, publisher_id, \
         placement_id, cost_micros, revenue_micros, currency, country, device, attributes"
    };
}

/// The columns of `ad_events` that a binary COPY of events lists (all but `stored_at`), in
/// the order [`copy_rows`] writes them.
pub const COPY_COLUMNS: &str = copy_columns!();

/// The first-delivery path's COPY.
const COPY_SQL: &str = concat!(
    "COPY ad_events (",
    copy_columns!(),
    ") FROM STDIN (FORMAT binary)"
);

/// The column types of [`COPY_COLUMNS`], in its order.
const COPY_TYPES: [Type; 14] = [
    Type::UUID,
    Type::TEXT,
    Type::TIMESTAMPTZ,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::INT8,
    Type::INT8,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::JSONB,
];

/// The parameter types of [`WRITE_SQL`]: arrays of [`COPY_TYPES`], in its order.
const WRITE_TYPES: [Type; 14] = [
    Type::UUID_ARRAY,
    Type::TEXT_ARRAY,
    Type::TIMESTAMPTZ_ARRAY,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::INT8_ARRAY,
    Type::INT8_ARRAY,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::JSONB_ARRAY,
];

/// The first-delivery path's rollups: deltas already summed per key by the worker, in key
/// order (so concurrent writers lock rollup rows in the same order).
const ROLLUP_SQL: &str = "
INSERT INTO ad_metrics_minute AS m (minute, advertiser_id, campaign_id, ad_id, type, currency,
                                    events, cost_micros, revenue_micros)
SELECT * FROM UNNEST($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::text[],
                     $6::text[], $7::int8[], $8::int8[], $9::int8[])
ON CONFLICT (minute, advertiser_id, campaign_id, ad_id, type, currency) DO UPDATE
SET events = m.events + EXCLUDED.events,
    cost_micros = m.cost_micros + EXCLUDED.cost_micros,
    revenue_micros = m.revenue_micros + EXCLUDED.revenue_micros";

/// After a batch met an event already stored, how many of the sink's next batches skip the
/// COPY and go straight to the `ON CONFLICT` statement.
pub const REDELIVERY_RUN: usize = 16;

/// A batch as column arrays, the shape `UNNEST` takes.
#[derive(Debug, Default)]
struct Columns<'a> {
    event_id: Vec<Uuid>,
    event_type: Vec<&'static str>,
    occurred_at: Vec<OffsetDateTime>,
    advertiser_id: Vec<&'a str>,
    campaign_id: Vec<&'a str>,
    ad_id: Vec<&'a str>,
    publisher_id: Vec<Option<&'a str>>,
    placement_id: Vec<Option<&'a str>>,
    cost_micros: Vec<i64>,
    revenue_micros: Vec<Option<i64>>,
    currency: Vec<Option<&'a str>>,
    country: Vec<Option<&'a str>>,
    device: Vec<Option<&'static str>>,
    attributes: Vec<Json<&'a BTreeMap<String, String>>>,
}

impl<'a> Columns<'a> {
    fn new(events: &[&'a AdEvent]) -> Result<Self, SinkError> {
        let mut c = Self::default();
        for ev in events {
            c.event_id.push(ev.event_id.as_uuid());
            c.event_type.push(ev.event_type.as_str());
            c.occurred_at.push(ev.occurred_at);
            c.advertiser_id.push(ev.advertiser_id.as_str());
            c.campaign_id.push(ev.campaign_id.as_str());
            c.ad_id.push(ev.ad_id.as_str());
            c.publisher_id
                .push(ev.publisher_id.as_ref().map(|i| i.as_str()));
            c.placement_id
                .push(ev.placement_id.as_ref().map(|i| i.as_str()));
            c.cost_micros.push(to_i64(ev.cost_micros.get())?);
            c.revenue_micros
                .push(ev.revenue_micros.map(|m| to_i64(m.get())).transpose()?);
            c.currency.push(ev.currency.as_ref().map(|x| x.as_str()));
            c.country.push(ev.country.as_ref().map(|x| x.as_str()));
            c.device.push(ev.device.map(|d| d.as_str()));
            c.attributes.push(Json(&ev.attributes));
        }
        Ok(c)
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 14] {
        [
            &self.event_id,
            &self.event_type,
            &self.occurred_at,
            &self.advertiser_id,
            &self.campaign_id,
            &self.ad_id,
            &self.publisher_id,
            &self.placement_id,
            &self.cost_micros,
            &self.revenue_micros,
            &self.currency,
            &self.country,
            &self.device,
            &self.attributes,
        ]
    }
}

/// The key of an `ad_metrics_minute` row: minute (microseconds since 2000-01-01 UTC, as
/// PostgreSQL stores a `timestamptz`), advertiser, campaign, ad, type, currency (`""` when
/// absent).
type RollupKey<'a> = (i64, &'a str, &'a str, &'a str, &'static str, &'a str);

/// A batch's contribution to the rollups, one entry per key, in key order; what the
/// `GROUP BY` of the redelivery path computes on the server.
#[derive(Debug, Default)]
struct RollupDeltas<'a> {
    minute: Vec<OffsetDateTime>,
    advertiser_id: Vec<&'a str>,
    campaign_id: Vec<&'a str>,
    ad_id: Vec<&'a str>,
    event_type: Vec<&'static str>,
    currency: Vec<&'a str>,
    events: Vec<i64>,
    cost_micros: Vec<i64>,
    revenue_micros: Vec<i64>,
}

/// Microseconds in a minute.
const MINUTE_MICROS: i64 = 60_000_000;

impl<'a> RollupDeltas<'a> {
    fn new(events: &[&'a AdEvent]) -> Result<Self, SinkError> {
        let mut sums: BTreeMap<RollupKey<'a>, [i64; 3]> = BTreeMap::new();
        for ev in events {
            // The minute of the value PostgreSQL stores: the encoder truncates to whole
            // microseconds since 2000-01-01, date_trunc('minute', …, 'UTC') floors that.
            let micros = pg_micros(ev.occurred_at)?;
            let key = (
                micros.div_euclid(MINUTE_MICROS) * MINUTE_MICROS,
                ev.advertiser_id.as_str(),
                ev.campaign_id.as_str(),
                ev.ad_id.as_str(),
                ev.event_type.as_str(),
                ev.currency.as_ref().map_or("", |c| c.as_str()),
            );
            let delta = [
                1,
                to_i64(ev.cost_micros.get())?,
                ev.revenue_micros.map_or(Ok(0), |m| to_i64(m.get()))?,
            ];
            let sum = sums.entry(key).or_default();
            for (total, d) in sum.iter_mut().zip(delta) {
                *total = total.checked_add(d).ok_or_else(|| SinkError::Rejected {
                    store: STORE.into(),
                    message: "a rollup sum of the batch does not fit a bigint".into(),
                })?;
            }
        }
        let mut deltas = Self::default();
        for ((minute, advertiser, campaign, ad, event_type, currency), [n, cost, revenue]) in sums {
            deltas
                .minute
                .push(pg_epoch() + time::Duration::microseconds(minute));
            deltas.advertiser_id.push(advertiser);
            deltas.campaign_id.push(campaign);
            deltas.ad_id.push(ad);
            deltas.event_type.push(event_type);
            deltas.currency.push(currency);
            deltas.events.push(n);
            deltas.cost_micros.push(cost);
            deltas.revenue_micros.push(revenue);
        }
        Ok(deltas)
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 9] {
        [
            &self.minute,
            &self.advertiser_id,
            &self.campaign_id,
            &self.ad_id,
            &self.event_type,
            &self.currency,
            &self.events,
            &self.cost_micros,
            &self.revenue_micros,
        ]
    }
}

/// PostgreSQL's timestamp epoch, 2000-01-01 00:00 UTC.
fn pg_epoch() -> OffsetDateTime {
    OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(946_684_800)
}

/// `at` as PostgreSQL stores it: whole microseconds since [`pg_epoch`], truncated toward
/// zero as the `timestamptz` encoder does.
fn pg_micros(at: OffsetDateTime) -> Result<i64, SinkError> {
    i64::try_from((at - pg_epoch()).whole_microseconds()).map_err(|_| SinkError::Rejected {
        store: STORE.into(),
        message: format!("{at} is out of the range of a timestamptz"),
    })
}

fn to_i64(micros: u64) -> Result<i64, SinkError> {
    i64::try_from(micros).map_err(|_| SinkError::Rejected {
        store: STORE.into(),
        message: format!("{micros} micros does not fit a bigint"),
    })
}

/// The longest a ping waits for `SELECT 1` (whatever the statement timeout: it is instant on
/// a server that is there).
const PING_BOUND: Duration = Duration::from_secs(10);

/// How long a write may wait for the server's answers: its statements (`BEGIN`, the COPY
/// or the upsert, the rollups, `COMMIT`) are each cancelled by the server after
/// `statement_timeout`, and three of them can take that long; three times the timeout and
/// 10 s more means the server is gone. None with no statement timeout (no limit asked).
fn answer_bound(statement_timeout: Duration) -> Option<Duration> {
    (!statement_timeout.is_zero())
        .then(|| statement_timeout.saturating_mul(3) + Duration::from_secs(10))
}

/// The events of a batch once each, sorted by `event_id`; the first occurrence of an id wins.
fn unique_sorted(events: &[AdEvent]) -> Vec<&AdEvent> {
    let mut unique: Vec<&AdEvent> = events.iter().collect();
    // Stable sort: equal ids keep batch order, so dedup keeps the first occurrence.
    unique.sort_by_key(|ev| ev.event_id);
    unique.dedup_by_key(|ev| ev.event_id);
    unique
}

/// Writes to PostgreSQL through a bounded connection pool; see the module docs.
#[derive(Clone)]
pub struct PostgresSink {
    pool: Pool,
    target: String,
    /// Longest a write may wait for the server's answers (None without a statement timeout):
    /// the server cancels a statement itself after `statement_timeout`, so past this bound
    /// it is not there any more.
    answer_bound: Option<Duration>,
    /// Which path batches take and took; shared by the clones of the sink.
    paths: Arc<Paths>,
    /// Behind a pooler in transaction mode: the `SET LOCAL statement_timeout` each write's
    /// transaction starts with ([`PostgresConfig::transaction_pooling`]).
    pooled: Option<Arc<str>>,
}

/// How many of a sink's batches took each path (module docs), since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WritePaths {
    /// Batches stored by the first-delivery path (COPY).
    pub copied: u64,
    /// COPYs refused because the batch held an event already stored (each then upserted).
    pub refused_copies: u64,
    /// Batches stored by the redelivery path (`ON CONFLICT`), refused copies included.
    pub upserted: u64,
}

/// The sink's path state: the batches left in the current redelivery run, and the counts.
#[derive(Debug, Default)]
struct Paths {
    run_left: AtomicUsize,
    copied: AtomicU64,
    refused_copies: AtomicU64,
    upserted: AtomicU64,
}

impl Paths {
    /// Whether the next batch goes straight to the redelivery path (and uses up one batch
    /// of the run).
    fn in_redelivery_run(&self) -> bool {
        self.run_left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }

    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl fmt::Debug for PostgresSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresSink")
            .field("target", &self.target)
            .field("max_connections", &self.pool.status().max_size)
            .finish_non_exhaustive()
    }
}

impl PostgresSink {
    /// A sink for `config`; connections are opened on first use, not here.
    ///
    /// # Errors
    /// [`PostgresError::InvalidUrl`] when the URL does not parse, [`PostgresError::Pool`]
    /// when the pool cannot be built.
    pub fn new(config: &PostgresConfig) -> Result<Self, PostgresError> {
        let mut pg: tokio_postgres::Config =
            config
                .url
                .parse()
                .map_err(|source| PostgresError::InvalidUrl {
                    url: redact_password(&config.url),
                    source,
                })?;
        // Zero is PostgreSQL's "no limit"; anything else is at least PostgreSQL's 1 ms.
        let timeout_ms = match config.statement_timeout.as_millis() {
            0 if config.statement_timeout.is_zero() => 0,
            ms => ms.max(1),
        };
        if timeout_ms > u128::from(i32::MAX.unsigned_abs()) {
            return Err(PostgresError::StatementTimeoutTooLong { ms: timeout_ms });
        }
        pg.connect_timeout(config.connect_timeout);
        // An idle pooled connection whose server vanished (a failover, a dropped network
        // path) is found out in about a minute instead of the operating system's two hours;
        // the URL's own `keepalives_*` settings win.
        if pg.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
            pg.keepalives_idle(Duration::from_secs(30));
        }
        if pg.get_keepalives_interval().is_none() {
            pg.keepalives_interval(Duration::from_secs(10));
        }
        if pg.get_keepalives_retries().is_none() {
            pg.keepalives_retries(3);
        }
        if pg.get_application_name().is_none() {
            pg.application_name(APPLICATION_NAME);
        }
        let manager_config = || ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match tls_connector(&pg, config.ca_file.as_deref())? {
            Some(tls) => Manager::from_config(pg, tls, manager_config()),
            None => Manager::from_config(pg, NoTls, manager_config()),
        };
        let mut pool = Pool::builder(manager)
            .max_size(config.max_connections.max(1))
            .timeouts(Timeouts {
                // A write may hold its connection for the statement timeout: a batch waiting
                // for one must not give up sooner. It did after the connect timeout (5 s),
                // when more batches ran at once than there were connections and the writes
                // were slow but succeeding: each wait failed as transient (a receive used,
                // toward the DLQ), and the breaker's ping, waiting the same, took the store
                // for down.
                wait: Some(
                    config
                        .statement_timeout
                        .saturating_add(config.connect_timeout),
                ),
                create: Some(config.connect_timeout),
                recycle: Some(config.connect_timeout),
            })
            .runtime(Runtime::Tokio1);
        // Set over the session it opens, not sent as the `options` startup parameter (module
        // docs); behind a pooler in transaction mode a session setting would stay on
        // whichever server connection ran it, so each write sets it in its transaction.
        let pooled = config
            .transaction_pooling
            .then(|| Arc::from(format!("SET LOCAL statement_timeout = {timeout_ms}")));
        if pooled.is_none() {
            let set: Arc<str> = Arc::from(format!("SET statement_timeout = {timeout_ms}"));
            // Bounded like opening the connection, which it is part of: deadpool's `create`
            // timeout does not cover hooks, and in the startup packet the setting was inside
            // it. A server (or a full PgBouncer) that lets a client log in and then does not
            // answer would otherwise hold the write, and the breaker's ping, past their bounds.
            let bound = config.connect_timeout;
            pool = pool.post_create(Hook::async_fn(move |client, _| {
                let set = Arc::clone(&set);
                Box::pin(async move {
                    match tokio::time::timeout(bound, client.batch_execute(&set)).await {
                        Ok(done) => done.map_err(HookError::Backend),
                        Err(_) => Err(HookError::message(format!(
                            "no answer to `{set}` within {} ms of logging in",
                            bound.as_millis()
                        ))),
                    }
                })
            }));
        }
        let pool = pool.build().map_err(|e| PostgresError::Pool {
            message: e.to_string(),
        })?;
        Ok(Self {
            pool,
            target: redact_password(&config.url),
            answer_bound: answer_bound(config.statement_timeout),
            paths: Arc::default(),
            pooled,
        })
    }

    /// Applies pending migrations over one of the sink's connections; see [`migrate`].
    ///
    /// # Errors
    /// [`PostgresError::Connect`] without a connection, otherwise as [`migrate`].
    pub async fn migrate(&self) -> Result<Vec<i32>, PostgresError> {
        let mut client = self
            .pool
            .get()
            .await
            .map_err(|source| PostgresError::Connect { source })?;
        migrate(&mut client).await
    }

    /// How many batches took each write path so far.
    pub fn write_paths(&self) -> WritePaths {
        let p = &self.paths;
        WritePaths {
            copied: p.copied.load(Ordering::Relaxed),
            refused_copies: p.refused_copies.load(Ordering::Relaxed),
            upserted: p.upserted.load(Ordering::Relaxed),
        }
    }

    /// How many events `ad_events` holds.
    ///
    /// # Errors
    /// [`SinkError`] classified as for writes.
    pub async fn events_stored(&self) -> Result<u64, SinkError> {
        let client = self.client().await?;
        // Unnamed statements (`query_typed`) here and below: a prepared one would be gone
        // behind a pooler in transaction mode by the time it is executed.
        let row = client
            .query_typed_one("SELECT count(*) FROM ad_events", &[])
            .await
            .map_err(|e| classify(&e))?;
        let n: i64 = row.try_get(0).map_err(|e| classify(&e))?;
        Ok(u64::try_from(n).unwrap_or_default())
    }

    /// Every row of `ad_metrics_minute`, in key order.
    ///
    /// # Errors
    /// [`SinkError`] classified as for writes.
    pub async fn rollup_rows(&self) -> Result<Vec<RollupRow>, SinkError> {
        let client = self.client().await?;
        let rows = client
            .query_typed(
                "SELECT minute, advertiser_id, campaign_id, ad_id, type, currency, events,
                        cost_micros, revenue_micros
                 FROM ad_metrics_minute ORDER BY 1, 2, 3, 4, 5, 6",
                &[],
            )
            .await
            .map_err(|e| classify(&e))?;
        rows.iter()
            .map(|r| {
                Ok(RollupRow {
                    minute: r.try_get(0)?,
                    advertiser_id: r.try_get(1)?,
                    campaign_id: r.try_get(2)?,
                    ad_id: r.try_get(3)?,
                    event_type: r.try_get(4)?,
                    currency: r.try_get(5)?,
                    events: r.try_get(6)?,
                    cost_micros: r.try_get(7)?,
                    revenue_micros: r.try_get(8)?,
                })
            })
            .collect::<Result<_, tokio_postgres::Error>>()
            .map_err(|e| classify(&e))
    }

    async fn client(&self) -> Result<Object, SinkError> {
        self.pool.get().await.map_err(|e| classify_pool(&e))
    }

    /// One batch's transaction on `client`: the events newly stored, or the error and
    /// whether the connection must leave the pool.
    async fn write_on(
        &self,
        client: &mut Object,
        unique: &[&AdEvent],
    ) -> Result<usize, (SinkError, bool)> {
        let paths = &self.paths;
        if let Some(set_timeout) = &self.pooled {
            let inserted = pooled_upsert(client, unique, set_timeout)
                .await
                .map_err(|e| (e, false))?;
            Paths::count(&paths.upserted);
            return Ok(inserted);
        }
        if !paths.in_redelivery_run() {
            match copy_batch(client, unique).await {
                Ok(copied) => {
                    Paths::count(&paths.copied);
                    return Ok(copied);
                }
                // A COPY the server refused before entering COPY mode (a lock or statement
                // timeout, a missing table) leaves a second ReadyForQuery on the wire,
                // tokio-postgres having sent a Sync with the COPY's Execute
                // (rust-postgres#789); the connection's next query would fail.
                Err(CopyError::Sink(e)) => return Err((e, true)),
                Err(CopyError::AlreadyStored) => {
                    Paths::count(&paths.refused_copies);
                    paths.run_left.store(REDELIVERY_RUN, Ordering::Relaxed);
                    tracing::debug!(
                        events = unique.len(),
                        "Batch holds an event already stored; writing it with ON CONFLICT"
                    );
                }
            }
        }
        let inserted = upsert_batch(client, unique).await.map_err(|e| (e, false))?;
        Paths::count(&paths.upserted);
        Ok(inserted)
    }

    /// The error for a server that did not answer `what` within `bound`: unreachable (a
    /// dropped network path, a failover that left the connection half open), so transient.
    fn no_answer(&self, what: &str, bound: Duration) -> SinkError {
        SinkError::Unavailable {
            store: self.target.clone(),
            message: format!(
                "no answer to {what} within {} ms: the server or the network path to it is gone; \
                 the connection is dropped",
                bound.as_millis()
            ),
        }
    }
}

#[async_trait]
impl Sink for PostgresSink {
    async fn write(&self, events: &[AdEvent]) -> Result<WriteReport, SinkError> {
        if events.is_empty() {
            return Ok(WriteReport::default());
        }
        let unique = unique_sorted(events);
        let mut client = self.client().await?;
        let written = match self.answer_bound {
            None => self.write_on(&mut client, &unique).await,
            Some(bound) => tokio::time::timeout(bound, self.write_on(&mut client, &unique))
                .await
                .unwrap_or_else(|_| Err((self.no_answer("the write", bound), true))),
        };
        let inserted = match written {
            Ok(inserted) => inserted,
            Err((e, discard)) => {
                if discard {
                    // Its state is unknown (a stray ReadyForQuery, or a request the server
                    // never answered): it leaves the pool instead of going back to it.
                    drop(Object::take(client));
                }
                return Err(e);
            }
        };
        let report = WriteReport {
            inserted,
            duplicates: events.len().saturating_sub(inserted),
        };
        tracing::debug!(
            inserted = report.inserted,
            duplicates = report.duplicates,
            "Wrote batch to PostgreSQL"
        );
        Ok(report)
    }

    async fn ping(&self) -> Result<(), SinkError> {
        let client = self.client().await?;
        match tokio::time::timeout(PING_BOUND, client.simple_query("SELECT 1")).await {
            Ok(answer) => answer.map(drop).map_err(|e| classify(&e)),
            Err(_) => {
                drop(Object::take(client));
                Err(self.no_answer("SELECT 1", PING_BOUND))
            }
        }
    }

    fn render_metrics(&self, page: &mut Exposition) {
        let paths = self.write_paths();
        page.counters(
            "spillway_postgres_batches_total",
            "Batches written to PostgreSQL, by path: copy (first delivery), upsert (redelivery, refused copies included), refused_copy.",
            "path",
            &[
                ("copy", paths.copied),
                ("upsert", paths.upserted),
                ("refused_copy", paths.refused_copies),
            ],
        );
        let pool = self.pool.status();
        let size = |n: usize| n as f64;
        page.gauges(
            "spillway_postgres_connections",
            "The connection pool: max (the cap), open, idle, and tasks waiting for a connection.",
            "state",
            &[
                ("max", size(pool.max_size)),
                ("open", size(pool.size)),
                ("idle", size(pool.available)),
                ("waiting", size(pool.waiting)),
            ],
        );
    }
}

/// Why [`copy_rows`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum CopyRowsError {
    /// An event's value does not fit its column; rows before it were sent.
    #[error(transparent)]
    Value(SinkError),
    /// The server or the connection refused the COPY.
    #[error(transparent)]
    Database(#[from] tokio_postgres::Error),
}

/// Writes `events` as the rows of a binary COPY opened as
/// `COPY <table> (`[`COPY_COLUMNS`]`) FROM STDIN (FORMAT binary)` on `ad_events` or a table
/// shaped like it, and finishes the COPY; returns the rows copied.
///
/// # Errors
/// [`CopyRowsError`]; the COPY is then aborted.
pub async fn copy_rows(sink: CopyInSink<Bytes>, events: &[&AdEvent]) -> Result<u64, CopyRowsError> {
    let mut writer = pin!(BinaryCopyInWriter::new(sink, &COPY_TYPES));
    for ev in events {
        let cost = to_i64(ev.cost_micros.get()).map_err(CopyRowsError::Value)?;
        let revenue = ev
            .revenue_micros
            .map(|m| to_i64(m.get()))
            .transpose()
            .map_err(CopyRowsError::Value)?;
        let row: [&(dyn ToSql + Sync); 14] = [
            &ev.event_id.as_uuid(),
            &ev.event_type.as_str(),
            &ev.occurred_at,
            &ev.advertiser_id.as_str(),
            &ev.campaign_id.as_str(),
            &ev.ad_id.as_str(),
            &ev.publisher_id.as_ref().map(|i| i.as_str()),
            &ev.placement_id.as_ref().map(|i| i.as_str()),
            &cost,
            &revenue,
            &ev.currency.as_ref().map(|c| c.as_str()),
            &ev.country.as_ref().map(|c| c.as_str()),
            &ev.device.map(|d| d.as_str()),
            &Json(&ev.attributes),
        ];
        writer.as_mut().write(&row).await?;
    }
    Ok(writer.finish().await?)
}

/// Why the first-delivery path did not store a batch.
enum CopyError {
    /// An event of the batch is already stored; nothing was written.
    AlreadyStored,
    /// Any other failure, classified.
    Sink(SinkError),
}

impl From<tokio_postgres::Error> for CopyError {
    fn from(e: tokio_postgres::Error) -> Self {
        if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
            Self::AlreadyStored
        } else {
            Self::Sink(classify(&e))
        }
    }
}

impl From<CopyRowsError> for CopyError {
    fn from(e: CopyRowsError) -> Self {
        match e {
            CopyRowsError::Value(e) => Self::Sink(e),
            CopyRowsError::Database(e) => e.into(),
        }
    }
}

/// The first-delivery path (module docs): COPY, summed rollups, commit. Returns the events
/// stored, which is all of them. Any error rolls the transaction back.
async fn copy_batch(client: &mut Object, events: &[&AdEvent]) -> Result<usize, CopyError> {
    let deltas = RollupDeltas::new(events).map_err(CopyError::Sink)?;
    let tx = client.transaction().await?;
    let rollup = tx.prepare_cached(ROLLUP_SQL).await?;
    // Prepared once per connection like the others: given as text, the COPY was parsed and
    // described in a round trip of its own on every batch, and closed after it.
    let copy = tx.prepare_cached(COPY_SQL).await?;
    let copied = copy_rows(tx.copy_in(&copy).await?, events).await?;
    tx.execute(&rollup, &deltas.params()).await?;
    tx.commit().await?;
    Ok(usize::try_from(copied).unwrap_or_default())
}

/// The redelivery path (module docs): one statement that stores the events not stored yet
/// and adds exactly those to the rollups. Returns how many it stored.
async fn upsert_batch(client: &Object, events: &[&AdEvent]) -> Result<usize, SinkError> {
    let columns = Columns::new(events)?;
    let statement = client
        .prepare_cached(WRITE_SQL)
        .await
        .map_err(|e| classify(&e))?;
    let row = client
        .query_one(&statement, &columns.params())
        .await
        .map_err(|e| classify(&e))?;
    let inserted: i64 = row.try_get(0).map_err(|e| classify(&e))?;
    Ok(usize::try_from(inserted).unwrap_or_default())
}

/// The write behind a pooler in transaction mode (module docs): the redelivery path's
/// statement, unnamed, in a transaction that first sets its statement timeout
/// (`set_timeout`). Returns how many events it stored.
async fn pooled_upsert(
    client: &mut Object,
    events: &[&AdEvent],
    set_timeout: &str,
) -> Result<usize, SinkError> {
    let columns = Columns::new(events)?;
    let params: Vec<(&(dyn ToSql + Sync), Type)> =
        columns.params().into_iter().zip(WRITE_TYPES).collect();
    let tx = client.transaction().await.map_err(|e| classify(&e))?;
    tx.batch_execute(set_timeout)
        .await
        .map_err(|e| classify(&e))?;
    let row = tx
        .query_typed_one(WRITE_SQL, &params)
        .await
        .map_err(|e| classify(&e))?;
    let inserted: i64 = row.try_get(0).map_err(|e| classify(&e))?;
    tx.commit().await.map_err(|e| classify(&e))?;
    Ok(usize::try_from(inserted).unwrap_or_default())
}

/// Whether a SQLSTATE says the data itself was refused, so that retrying the same batch
/// cannot help: classes 22 (data exception) and 23 (integrity constraint violation).
///
/// Everything else is treated as transient, not only the codes that are transient by
/// nature (40001 serialization failure, 40P01 deadlock, 57014 statement timeout, 53300 too
/// many connections, 57P01 admin shutdown, 57P03 cannot connect now, class 08 connection
/// exceptions): a rejected batch is dead-lettered at once, so an operator's problem (a
/// missing table before `spillway migrate`, a revoked grant, a full disk) must hold events
/// in the queue behind the circuit breaker rather than burn valid revenue into the DLQ.
pub fn sqlstate_is_permanent(code: &str) -> bool {
    code.starts_with("22") || code.starts_with("23")
}

/// Maps a database error to a [`SinkError`] by [`sqlstate_is_permanent`]; errors without a
/// SQLSTATE (connection refused, closed, I/O) are transient.
fn classify(err: &tokio_postgres::Error) -> SinkError {
    let message = describe(err);
    match err.code() {
        Some(code) if sqlstate_is_permanent(code.code()) => SinkError::Rejected {
            store: STORE.into(),
            message,
        },
        _ => SinkError::Unavailable {
            store: STORE.into(),
            message,
        },
    }
}

/// Pool errors are all transient: timeouts, a closed pool, and a connection that could not
/// be opened, whatever its SQLSTATE. A server refusing the session's settings (22023, say an
/// `options` value it rejects) fails every connection alike, so it is an operator's problem
/// to hold behind the breaker, not the batch's data to dead-letter.
fn classify_pool(err: &PoolError) -> SinkError {
    let message = describe_pool(err);
    SinkError::Unavailable {
        store: STORE.into(),
        message: format!("connection pool: {message}"),
    }
}

/// A pool error as [`describe`] words the database's: its `Display` says only "db error".
fn describe_pool(err: &PoolError) -> String {
    match err {
        PoolError::Backend(e) | PoolError::PostCreateHook(HookError::Backend(e)) => describe(e),
        other => other.to_string(),
    }
}

/// Added to the errors of prepared statements gone or clashing, which is what a pooler in
/// transaction mode does to a sink that keeps them between transactions.
const POOLER_HINT: &str = ". Prepared statements do not last between transactions: if \
     DATABASE_URL leads to a pooler in transaction mode (PgBouncer pool_mode = transaction), \
     set --pg-transaction-pooling (SPILLWAY_PG_TRANSACTION_POOLING=true)";

/// A one-line account of a database error: SQLSTATE, message and detail for server errors,
/// the cause chain for client-side ones.
fn describe(err: &tokio_postgres::Error) -> String {
    if let Some(db) = err.as_db_error() {
        let mut s = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
        if let Some(detail) = db.detail() {
            s.push_str(" (");
            s.push_str(detail);
            s.push(')');
        }
        if [
            SqlState::INVALID_SQL_STATEMENT_NAME,
            SqlState::DUPLICATE_PSTATEMENT,
        ]
        .contains(db.code())
        {
            s.push_str(POOLER_HINT);
        }
        return s;
    }
    let mut s = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use crate::event::ValidationPolicy;
    use crate::synthetic::SyntheticEvents;

    #[test]
    fn data_and_constraint_errors_are_permanent_and_the_rest_transient() {
        for code in ["22P05", "22003", "23505", "23514", "22001"] {
            assert!(sqlstate_is_permanent(code), "{code}");
        }
        for code in [
            "40001", "40P01", "57014", "53300", "57P01", "57P03", "08006", "42P01", "XX000",
        ] {
            assert!(!sqlstate_is_permanent(code), "{code}");
        }
    }

    #[test]
    fn a_batch_is_deduplicated_keeping_the_first_occurrence_in_id_order() {
        let mut g = SyntheticEvents::new(3, 5);
        let mut events: Vec<AdEvent> = (0..20)
            .map(|_| {
                AdEvent::from_json(g.event(), &ValidationPolicy::default(), &SystemClock).unwrap()
            })
            .collect();
        let mut changed = events[4].clone();
        changed.cost_micros = events[0].cost_micros;
        changed.ad_id = crate::event::Ident::parse("ad_id", "replaced").unwrap();
        events.push(changed);
        events.push(events[7].clone());
        let unique = unique_sorted(&events);
        assert_eq!(unique.len(), 20);
        assert!(unique.windows(2).all(|w| w[0].event_id < w[1].event_id));
        let kept = unique
            .iter()
            .find(|e| e.event_id == events[4].event_id)
            .unwrap();
        assert_eq!(kept.ad_id, events[4].ad_id);
    }

    #[test]
    fn rollup_deltas_sum_each_minute_key_once_in_key_order() {
        let mut g = SyntheticEvents::new(9, 3).with_ads(4);
        let start = OffsetDateTime::now_utc()
            .replace_nanosecond(123_456_789)
            .unwrap();
        let events: Vec<AdEvent> = (0..300)
            .map(|i| {
                let at = start - time::Duration::seconds(i * 7);
                AdEvent::from_json(g.event_at(at), &ValidationPolicy::default(), &SystemClock)
                    .unwrap()
            })
            .collect();
        let refs: Vec<&AdEvent> = events.iter().collect();
        let deltas = RollupDeltas::new(&refs).unwrap();

        // Recomputed the plain way: the UTC minute of each event, summed per key.
        let mut expected: BTreeMap<(OffsetDateTime, String, String, String, String), [i64; 3]> =
            BTreeMap::new();
        for ev in &events {
            let at = ev.occurred_at.to_offset(time::UtcOffset::UTC);
            let minute = at.replace_second(0).unwrap().replace_nanosecond(0).unwrap();
            let key = (
                minute,
                format!("{}/{}", ev.advertiser_id.as_str(), ev.campaign_id.as_str()),
                ev.ad_id.as_str().to_owned(),
                ev.event_type.as_str().to_owned(),
                ev.currency.as_ref().map_or("", |c| c.as_str()).to_owned(),
            );
            let sum = expected.entry(key).or_default();
            sum[0] += 1;
            sum[1] += i64::try_from(ev.cost_micros.get()).unwrap();
            sum[2] += ev
                .revenue_micros
                .map_or(0, |m| i64::try_from(m.get()).unwrap());
        }
        let got: BTreeMap<_, _> = (0..deltas.minute.len())
            .map(|i| {
                (
                    (
                        deltas.minute[i],
                        format!("{}/{}", deltas.advertiser_id[i], deltas.campaign_id[i]),
                        deltas.ad_id[i].to_owned(),
                        deltas.event_type[i].to_owned(),
                        deltas.currency[i].to_owned(),
                    ),
                    [
                        deltas.events[i],
                        deltas.cost_micros[i],
                        deltas.revenue_micros[i],
                    ],
                )
            })
            .collect();
        assert_eq!(got, expected);
        assert!(deltas.minute.len() < events.len(), "some keys repeat");
        let keys: Vec<_> = (0..deltas.minute.len())
            .map(|i| {
                (
                    deltas.minute[i],
                    deltas.advertiser_id[i],
                    deltas.campaign_id[i],
                )
            })
            .collect();
        assert!(keys.windows(2).all(|w| w[0] <= w[1]), "key order");
    }

    #[test]
    fn a_rollup_minute_is_that_of_the_stored_microsecond() {
        // The encoder truncates toward zero from 2000-01-01; before it that is upward.
        let just_before = pg_epoch() - time::Duration::nanoseconds(500);
        let micros = pg_micros(just_before).unwrap();
        assert_eq!(micros, 0);
        assert_eq!(micros.div_euclid(MINUTE_MICROS), 0);
        let earlier = pg_epoch() - time::Duration::microseconds(1);
        assert_eq!(pg_micros(earlier).unwrap().div_euclid(MINUTE_MICROS), -1);
    }

    #[test]
    fn passwords_are_hidden_in_debug_output() {
        let c = PostgresConfig::new("postgres://app:s3cret@db:5432/spillway");
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(
            shown.contains("postgres://app:***@db:5432/spillway"),
            "{shown}"
        );
        assert_eq!(
            redact_password("host=db password=s3cret user=app"),
            "host=db password=*** user=app"
        );
        assert_eq!(
            redact_password("postgres://app@db/x"),
            "postgres://app@db/x"
        );
        for (url, shown) in [
            (
                "postgres://u@db/x?password=s3cret&sslmode=disable",
                "postgres://u@db/x?password=***&sslmode=disable",
            ),
            (
                "host=db password = s3cret user=app",
                "host=db password = *** user=app",
            ),
            (
                "host=db password='s3 cret' user=app",
                "host=db password=*** user=app",
            ),
            (
                "host=db password='it\\'s s3cret' user=app",
                "host=db password=*** user=app",
            ),
            (
                "postgres://u:s3cret@db/x?password=s3cret",
                "postgres://u:***@db/x?password=***",
            ),
        ] {
            assert_eq!(redact_password(url), shown, "{url}");
        }
    }

    #[test]
    fn every_migration_file_is_embedded_in_version_order() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        files.sort_by_key(|n| {
            n.trim_start_matches('V')
                .split("__")
                .next()
                .unwrap()
                .parse::<i32>()
                .unwrap()
        });
        let embedded: Vec<String> = MIGRATIONS
            .iter()
            .map(|m| format!("V{}__{}.sql", m.version, m.name))
            .collect();
        assert_eq!(files, embedded);
        assert!(MIGRATIONS.windows(2).all(|w| w[0].version < w[1].version));
    }

    #[test]
    fn an_unparsable_url_is_reported_without_its_password() {
        let err = PostgresSink::new(&PostgresConfig::new("postgres://u:pw@host:notaport/db"))
            .unwrap_err();
        assert!(matches!(err, PostgresError::InvalidUrl { .. }), "{err}");
        assert!(!err.to_string().contains("pw@"), "{err}");
    }

    #[test]
    fn a_statement_timeout_past_postgres_limit_is_refused_up_front() {
        let config = |secs| PostgresConfig {
            statement_timeout: Duration::from_secs(secs),
            ..PostgresConfig::new("postgres://u@host/db")
        };
        // 24 days fits PostgreSQL's i32 milliseconds; 25 days does not.
        assert!(PostgresSink::new(&config(24 * 86_400)).is_ok());
        let err = PostgresSink::new(&config(25 * 86_400)).unwrap_err();
        assert!(
            matches!(
                err,
                PostgresError::StatementTimeoutTooLong { ms: 2_160_000_000 }
            ),
            "{err}"
        );
    }
}
