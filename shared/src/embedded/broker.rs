//! [`Broker`]: the SQLite-backed topic/queue store and every operation on it.
//!
//! All SQLite work runs on `tokio::task::spawn_blocking` behind one connection in a mutex, so
//! the async runtime never blocks on disk. Every write is one `BEGIN IMMEDIATE` transaction;
//! other processes (an operator CLI) may open the same file and wait on the busy timeout.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rusqlite::{
    params, Connection, ErrorCode, OptionalExtension, Transaction, TransactionBehavior,
};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::clock::{Clock, SystemClock};
use crate::envelope::{Envelope, ATTR_TYPES};
use crate::event::EventType;
use crate::source::{DeadLetter, Delivery, DeliveryId, ATTR_ERROR_CODE, ATTR_ERROR_MESSAGE};

/// Where `spillway dev` keeps the broker database unless told otherwise.
pub const DEFAULT_DB_PATH: &str = "./.spillway/broker.db";
/// The topic `spillway dev` publishes to.
pub const DEV_TOPIC: &str = "events";
/// The queue `spillway dev` workers drain.
pub const DEV_QUEUE: &str = "events-worker";
/// The dead-letter queue of [`DEV_QUEUE`].
pub const DEV_DLQ: &str = "events-worker-dlq";
/// Attribute naming the queue a dead letter came from (for replay).
pub const ATTR_SOURCE_QUEUE: &str = "spillway-source-queue";
pub use crate::source::MAX_RECEIVES_CODE;

/// A retention that never ends: a message stays until it is deleted (acked, moved, purged).
pub const KEEP_UNTIL_DONE: Duration = Duration::MAX;

/// How long a connection waits for another writer (another process) before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a long poll looks again when nothing in this process wakes it.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
const SECS_PER_DAY: u64 = 86_400;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS topics (
    name TEXT PRIMARY KEY NOT NULL,
    created_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS queues (
    name TEXT PRIMARY KEY NOT NULL,
    visibility_timeout_ms INTEGER NOT NULL,
    max_receive_count INTEGER,
    dlq TEXT,
    retention_ms INTEGER NOT NULL,
    delay_ms INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS subscriptions (
    topic TEXT NOT NULL REFERENCES topics(name),
    queue TEXT NOT NULL REFERENCES queues(name),
    filter_types TEXT,
    raw_delivery INTEGER NOT NULL,
    PRIMARY KEY (topic, queue)
);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    message_id TEXT NOT NULL,
    body TEXT NOT NULL,
    attributes TEXT NOT NULL,
    sent_at_ms INTEGER NOT NULL,
    visible_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    receive_count INTEGER NOT NULL DEFAULT 0,
    receipt TEXT
);
CREATE INDEX IF NOT EXISTS messages_by_visibility ON messages(queue, visible_at_ms, seq);
CREATE INDEX IF NOT EXISTS messages_by_expiry ON messages(queue, expires_at_ms);
";

/// Why a broker operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// SQLite failed while doing `op`.
    #[error("broker database failed to {op}: {source}")]
    Sqlite {
        /// What the broker was doing.
        op: &'static str,
        /// The SQLite error.
        #[source]
        source: rusqlite::Error,
    },
    /// The data directory could not be created.
    #[error("cannot create broker directory {path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A topic or queue that was never declared.
    #[error("{kind} {name:?} does not exist")]
    NotFound {
        /// `topic` or `queue`.
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// A topic no queue subscribes to: what is published to it would reach no worker.
    #[error("topic {topic:?} has no subscriptions: nothing published to it would reach a queue")]
    NoSubscriptions {
        /// The topic.
        topic: String,
    },
    /// A configuration or request the broker refuses.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// Receipts that are not the latest receive of a live message (redelivered, deleted or
    /// malformed).
    #[error("{queue}: {count} receipt(s) are stale or unknown")]
    StaleReceipts {
        /// The queue.
        queue: String,
        /// How many.
        count: usize,
    },
    /// The blocking worker thread failed (panicked or was cancelled).
    #[error("broker worker thread failed: {0}")]
    Runtime(String),
}

impl BrokerError {
    /// Whether retrying the same operation can succeed (busy, locked, I/O, thread failure).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Sqlite { source, .. } => is_transient_sqlite(source),
            // Until a queue subscribes: the publisher's caller retries, nothing is dropped.
            Self::Io { .. } | Self::Runtime(_) | Self::NoSubscriptions { .. } => true,
            Self::NotFound { .. } | Self::Invalid(_) | Self::StaleReceipts { .. } => false,
        }
    }
}

/// Whether a SQLite error may pass on retry, rather than being caused by the data written.
///
/// Only a constraint, size or type error is the data's fault. Everything else is transient:
/// contention and I/O by nature, and an operator's problem (a read-only or corrupt file,
/// permissions, memory) too, so that the events wait in the queue behind the circuit breaker
/// instead of being dead-lettered one by one as if each were bad.
pub(crate) fn is_transient_sqlite(e: &rusqlite::Error) -> bool {
    !matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::ConstraintViolation | ErrorCode::TooBig | ErrorCode::TypeMismatch)
    )
}

fn sql(op: &'static str) -> impl Fn(rusqlite::Error) -> BrokerError {
    move |source| BrokerError::Sqlite { op, source }
}

/// A queue's settings. Declaring an existing queue again updates them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    /// How long a received message stays invisible before it is delivered again.
    pub visibility_timeout: Duration,
    /// Receives after which the next receive moves the message to `dlq` instead (redrive
    /// policy); set together with `dlq`.
    pub max_receive_count: Option<u32>,
    /// The dead-letter queue (must be declared first); set together with `max_receive_count`.
    pub dlq: Option<String>,
    /// How long a message is kept before it is dropped, received or not (message retention
    /// period, counted from when it was sent). [`KEEP_UNTIL_DONE`] keeps it for good.
    pub retention: Duration,
    /// How long a new message stays invisible after it is sent (delivery delay).
    pub delay: Duration,
}

impl Default for QueueConfig {
    /// SQS's defaults: 30 s visibility, 4 days retention, no delay, no redrive.
    fn default() -> Self {
        Self {
            visibility_timeout: Duration::from_secs(30),
            max_receive_count: None,
            dlq: None,
            retention: Duration::from_secs(4 * SECS_PER_DAY),
            delay: Duration::ZERO,
        }
    }
}

/// How a queue subscribes to a topic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subscription {
    /// Event types to accept (matched against the `spillway-types` attribute; any overlap
    /// matches; a message without the attribute never matches); `None` accepts everything.
    pub filter_types: Option<Vec<EventType>>,
    /// Store the body as published, with its attributes (raw message delivery); otherwise wrap
    /// it in an SNS-style notification JSON carrying the attributes.
    pub raw_delivery: bool,
}

impl Subscription {
    /// Whether a message with these `spillway-types` passes the filter.
    fn accepts(&self, types: Option<&[String]>) -> bool {
        match (&self.filter_types, types) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(allowed), Some(types)) => allowed
                .iter()
                .any(|a| types.iter().any(|t| t == a.as_str())),
        }
    }
}

/// A declared queue and its settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueInfo {
    /// Queue name.
    pub name: String,
    /// Its settings.
    pub config: QueueConfig,
}

/// Counts of a queue's live (unexpired) messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Receivable now.
    pub visible: u64,
    /// Received and not yet deleted, still invisible (in flight).
    pub in_flight: u64,
    /// Never received, still within their delivery delay.
    pub delayed: u64,
    /// Age of the oldest message in seconds, `None` when the queue is empty.
    pub oldest_age_secs: Option<u64>,
}

/// A message read by [`Broker::peek`], without receiving it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeekedMessage {
    /// Stable message id.
    pub message_id: String,
    /// The body as stored.
    pub body: String,
    /// Message attributes.
    pub attributes: BTreeMap<String, String>,
    /// Times received so far.
    pub receive_count: u32,
    /// Age in seconds since it was sent to this queue.
    pub age_secs: u64,
    /// Whether it is receivable now.
    pub visible: bool,
}

/// A message received by [`Broker::lease`] to be moved elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeasedMessage {
    /// Receipt to delete it with, or to make it visible again.
    pub receipt: DeliveryId,
    /// Stable message id.
    pub message_id: String,
    /// The body as stored.
    pub body: String,
    /// Message attributes.
    pub attributes: BTreeMap<String, String>,
    /// Times received so far, this lease included.
    pub receive_count: u32,
    /// When it was sent to this queue, in ms since the Unix epoch.
    pub sent_at_ms: i64,
}

/// A message to send straight to a queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutgoingMessage {
    /// The body.
    pub body: String,
    /// Message attributes.
    pub attributes: BTreeMap<String, String>,
}

/// What a batch settle (delete or change visibility) did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SettleOutcome {
    /// Receipts that were current and applied.
    pub settled: usize,
    /// Receipts that were stale (message redelivered or gone) or malformed; nothing was done
    /// for them.
    pub stale: Vec<DeliveryId>,
}

#[derive(Debug)]
struct Inner {
    conn: Mutex<Connection>,
    notify: Notify,
    clock: Arc<dyn Clock>,
    path: PathBuf,
}

/// The embedded broker: a handle on one SQLite file; clones share the connection.
#[derive(Debug, Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct QueueRow {
    visibility_ms: i64,
    max_receive_count: Option<u32>,
    dlq: Option<String>,
    retention_ms: i64,
    delay_ms: i64,
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn from_ms(v: i64) -> Duration {
    Duration::from_millis(u64::try_from(v).unwrap_or(0))
}

fn count(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn now_ms(clock: &dyn Clock) -> i64 {
    i64::try_from(clock.now().unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

fn to_json(attributes: &BTreeMap<String, String>) -> Result<String, BrokerError> {
    serde_json::to_string(attributes)
        .map_err(|e| BrokerError::Invalid(format!("attributes are not serialisable: {e}")))
}

fn from_json(raw: &str) -> BTreeMap<String, String> {
    // Only this module writes the column, always from a string map.
    serde_json::from_str(raw).unwrap_or_default()
}

fn load_queue(tx: &Connection, name: &str) -> Result<QueueRow, BrokerError> {
    tx.prepare_cached(
        "SELECT visibility_timeout_ms, max_receive_count, dlq, retention_ms, delay_ms
         FROM queues WHERE name = ?1",
    )
    .and_then(|mut st| {
        st.query_row([name], |r| {
            Ok(QueueRow {
                visibility_ms: r.get(0)?,
                max_receive_count: r.get(1)?,
                dlq: r.get(2)?,
                retention_ms: r.get(3)?,
                delay_ms: r.get(4)?,
            })
        })
        .optional()
    })
    .map_err(sql("read queue"))?
    .ok_or_else(|| BrokerError::NotFound {
        kind: "queue",
        name: name.to_owned(),
    })
}

fn insert_message(
    tx: &Transaction<'_>,
    queue: &str,
    q: &QueueRow,
    message_id: &str,
    body: &str,
    attributes: &str,
    now: i64,
) -> Result<(), BrokerError> {
    tx.prepare_cached(
        "INSERT INTO messages (queue, message_id, body, attributes, sent_at_ms, visible_at_ms,
                               expires_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )
    .and_then(|mut st| {
        st.execute(params![
            queue,
            message_id,
            body,
            attributes,
            now,
            now.saturating_add(q.delay_ms),
            now.saturating_add(q.retention_ms),
        ])
    })
    .map_err(sql("insert message"))?;
    Ok(())
}

fn parse_receipt(id: &DeliveryId) -> Option<i64> {
    let (seq, nonce) = id.0.split_once(':')?;
    if nonce.is_empty() {
        return None;
    }
    seq.parse().ok()
}

/// What a receive's blocking transaction hands to the future waiting for it.
#[derive(Debug, Default)]
struct Handoff {
    /// What the committed receive took, until the future collects it.
    received: Option<Vec<Delivery>>,
    /// The future was dropped: nothing may be taken, and what was is given back.
    abandoned: bool,
}

fn lock(handoff: &Mutex<Handoff>) -> std::sync::MutexGuard<'_, Handoff> {
    handoff.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Gives back what a receive took when its future is dropped before collecting it.
struct ReceiveGuard {
    handoff: Arc<Mutex<Handoff>>,
    inner: Arc<Inner>,
    queue: String,
    collected: bool,
}

impl Drop for ReceiveGuard {
    fn drop(&mut self) {
        if self.collected {
            return;
        }
        let mut slot = lock(&self.handoff);
        slot.abandoned = true;
        let Some(deliveries) = slot.received.take().filter(|d| !d.is_empty()) else {
            return;
        };
        drop(slot);
        let back = GiveBack {
            inner: Arc::clone(&self.inner),
            queue: std::mem::take(&mut self.queue),
            deliveries,
        };
        // On the blocking pool: the connection may be busy, and this runs on an async thread.
        // A runtime shutting down drops a blocking task it has not started (or is refused
        // after it began shutting down) instead of running it; dropping `back` gives the
        // messages back all the same, on the thread doing the shutdown.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(move || drop(back))),
            Err(_) => drop(back),
        }
    }
}

/// Messages to give back, given back when dropped (see [`ReceiveGuard`]).
struct GiveBack {
    inner: Arc<Inner>,
    queue: String,
    deliveries: Vec<Delivery>,
}

impl Drop for GiveBack {
    fn drop(&mut self) {
        let inner = &self.inner;
        let mut conn = inner.conn.lock().unwrap_or_else(PoisonError::into_inner);
        give_back(
            &mut conn,
            &self.queue,
            &self.deliveries,
            now_ms(&*inner.clock),
        );
        drop(conn);
        inner.notify.notify_waiters();
    }
}

/// Undoes a receive nobody collected: each message still under the receipt it was given is
/// visible again at once, with the receive it did not use taken off its count. A failure
/// leaves them as a receive whose worker died leaves them: back after the visibility timeout.
fn give_back(conn: &mut Connection, queue: &str, deliveries: &[Delivery], now: i64) {
    let mut undo = || -> Result<usize, rusqlite::Error> {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut undone = 0;
        {
            let mut st = tx.prepare_cached(
                "UPDATE messages
                 SET receive_count = MAX(receive_count - 1, 0), receipt = NULL, visible_at_ms = ?4
                 WHERE seq = ?1 AND queue = ?2 AND receipt = ?3",
            )?;
            for d in deliveries {
                if let Some(seq) = parse_receipt(&d.id) {
                    undone += st.execute(params![seq, queue, d.id.0, now])?;
                }
            }
        }
        tx.commit()?;
        Ok(undone)
    };
    match undo() {
        Ok(undone) => tracing::debug!(queue, undone, "Gave back a receive nobody collected"),
        Err(e) => tracing::warn!(
            queue,
            messages = deliveries.len(),
            error = %e,
            "Could not give back a receive nobody collected; its messages return after their visibility timeout"
        ),
    }
}

/// The SNS notification JSON a non-raw subscription delivers.
fn notification(topic: &str, message_id: &str, env: &Envelope, now: i64) -> String {
    let attrs: serde_json::Map<String, serde_json::Value> = env
        .attributes
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                serde_json::json!({"Type": if k == ATTR_TYPES { "String.Array" } else { "String" }, "Value": v}),
            )
        })
        .collect();
    let timestamp = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(now) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default();
    serde_json::json!({
        "Type": "Notification",
        "MessageId": message_id,
        "TopicArn": format!("arn:spillway:embedded:{topic}"),
        "Message": env.body,
        "Timestamp": timestamp,
        "MessageAttributes": attrs,
    })
    .to_string()
}

impl Broker {
    /// Opens (creating if needed) the broker database at `path`, with the system clock.
    /// Blocks briefly on disk: call it at startup.
    ///
    /// # Errors
    /// [`BrokerError`] when the directory or database cannot be created or migrated.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, BrokerError> {
        Self::open_with_clock(path, Arc::new(SystemClock))
    }

    /// Opens the broker with an injected clock (tests move time instead of sleeping).
    ///
    /// # Errors
    /// [`BrokerError`] when the directory or database cannot be created or migrated.
    pub fn open_with_clock(
        path: impl AsRef<Path>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, BrokerError> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| BrokerError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let conn = Connection::open(&path).map_err(sql("open"))?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(sql("set busy timeout"))?;
        // WAL + FULL: the WAL is fsynced at every commit, so a publish answered 202 and a
        // delete survive an OS crash or a power cut, not only the process being killed.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql("enable WAL"))?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sql("set synchronous"))?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(sql("enable foreign keys"))?;
        conn.execute_batch(SCHEMA).map_err(sql("create schema"))?;
        conn.set_prepared_statement_cache_capacity(64);
        Ok(Self {
            inner: Arc::new(Inner {
                conn: Mutex::new(conn),
                notify: Notify::new(),
                clock,
                path,
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` on the blocking pool with the connection and the current time in ms.
    async fn run<T, F>(&self, f: F) -> Result<T, BrokerError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection, i64) -> Result<T, BrokerError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let mut conn = inner.conn.lock().unwrap_or_else(PoisonError::into_inner);
            let now = now_ms(&*inner.clock);
            f(&mut conn, now)
        })
        .await
        .map_err(|e| BrokerError::Runtime(e.to_string()))?
    }

    /// Runs `f` in one `BEGIN IMMEDIATE` transaction, committed when it returns `Ok`.
    async fn write<T, F>(&self, f: F) -> Result<T, BrokerError>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>, i64) -> Result<T, BrokerError> + Send + 'static,
    {
        self.run(move |conn, now| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(sql("begin"))?;
            let out = f(&tx, now)?;
            tx.commit().map_err(sql("commit"))?;
            Ok(out)
        })
        .await
    }

    /// Declares a topic; declaring it again changes nothing.
    ///
    /// # Errors
    /// [`BrokerError`] on a database failure.
    pub async fn declare_topic(&self, name: &str) -> Result<(), BrokerError> {
        if name.is_empty() {
            return Err(BrokerError::Invalid("a topic name cannot be empty".into()));
        }
        let name = name.to_owned();
        self.write(move |tx, now| {
            tx.execute(
                "INSERT INTO topics (name, created_at_ms) VALUES (?1, ?2)
                 ON CONFLICT(name) DO NOTHING",
                params![name, now],
            )
            .map_err(sql("declare topic"))?;
            Ok(())
        })
        .await
    }

    /// Declares a queue, or updates the settings of an existing one.
    ///
    /// # Errors
    /// [`BrokerError::Invalid`] when only one of `max_receive_count`/`dlq` is set, the DLQ is
    /// the queue itself or `max_receive_count` is 0; [`BrokerError::NotFound`] when the DLQ
    /// was not declared first.
    pub async fn declare_queue(&self, name: &str, config: QueueConfig) -> Result<(), BrokerError> {
        if name.is_empty() {
            return Err(BrokerError::Invalid("a queue name cannot be empty".into()));
        }
        match (&config.max_receive_count, &config.dlq) {
            (Some(0), _) => {
                return Err(BrokerError::Invalid(
                    "max_receive_count must be at least 1".into(),
                ))
            }
            (Some(_), Some(dlq)) if dlq == name => {
                return Err(BrokerError::Invalid(format!(
                    "queue {name:?} cannot be its own DLQ"
                )))
            }
            (Some(_), None) | (None, Some(_)) => {
                return Err(BrokerError::Invalid(
                    "a redrive policy needs both max_receive_count and dlq".into(),
                ))
            }
            _ => {}
        }
        let name = name.to_owned();
        self.write(move |tx, now| {
            if let Some(dlq) = &config.dlq {
                load_queue(tx, dlq)?;
            }
            let retention_was: Option<i64> = tx
                .query_row(
                    "SELECT retention_ms FROM queues WHERE name = ?1",
                    params![name],
                    |r| r.get(0),
                )
                .optional()
                .map_err(sql("read queue retention"))?;
            tx.execute(
                "INSERT INTO queues (name, visibility_timeout_ms, max_receive_count, dlq,
                                     retention_ms, delay_ms, created_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT(name) DO UPDATE SET
                    visibility_timeout_ms = excluded.visibility_timeout_ms,
                    max_receive_count = excluded.max_receive_count,
                    dlq = excluded.dlq,
                    retention_ms = excluded.retention_ms,
                    delay_ms = excluded.delay_ms",
                params![
                    name,
                    ms(config.visibility_timeout),
                    config.max_receive_count,
                    config.dlq,
                    ms(config.retention),
                    ms(config.delay),
                    now
                ],
            )
            .map_err(sql("declare queue"))?;
            // The retention counts from each message's send, for the messages already there
            // too (as on SQS); saturating, since SQLite turns an overflowing sum into a float.
            // Only when it changed: a start declares the dev queues again, and rewriting a
            // backlog's every row would hold the write lock that publishes wait for.
            if retention_was.is_some_and(|was| was != ms(config.retention)) {
                tx.execute(
                    "UPDATE messages SET expires_at_ms =
                    CASE WHEN sent_at_ms >= 9223372036854775807 - ?2
                         THEN 9223372036854775807 ELSE sent_at_ms + ?2 END
                 WHERE queue = ?1",
                    params![name, ms(config.retention)],
                )
                .map_err(sql("apply retention"))?;
            }
            Ok(())
        })
        .await
    }

    /// Subscribes `queue` to `topic` (or replaces the existing subscription's options).
    ///
    /// # Errors
    /// [`BrokerError::NotFound`] when either was not declared.
    pub async fn subscribe(
        &self,
        topic: &str,
        queue: &str,
        subscription: Subscription,
    ) -> Result<(), BrokerError> {
        let (topic, queue) = (topic.to_owned(), queue.to_owned());
        let filter = subscription
            .filter_types
            .as_ref()
            .map(|types| {
                let names: Vec<&str> = types.iter().map(|t| t.as_str()).collect();
                serde_json::to_string(&names)
            })
            .transpose()
            .map_err(|e| BrokerError::Invalid(format!("filter is not serialisable: {e}")))?;
        self.write(move |tx, _| {
            ensure_topic(tx, &topic)?;
            load_queue(tx, &queue)?;
            tx.execute(
                "INSERT INTO subscriptions (topic, queue, filter_types, raw_delivery)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(topic, queue) DO UPDATE SET
                    filter_types = excluded.filter_types, raw_delivery = excluded.raw_delivery",
                params![topic, queue, filter, subscription.raw_delivery],
            )
            .map_err(sql("subscribe"))?;
            Ok(())
        })
        .await
    }

    /// Declares what `spillway dev` runs on: topic [`DEV_TOPIC`], queue [`DEV_QUEUE`] (30 s
    /// visibility, 5 receives then [`DEV_DLQ`]) and its DLQ, subscribed with raw delivery and
    /// no filter. Idempotent. Both keep their messages until they are done with
    /// ([`KEEP_UNTIL_DONE`]): SQS's 4 and 14 days dropped accepted events without a trace
    /// when the store or the worker was down longer (older stores' messages are given the
    /// new retention when it is declared).
    ///
    /// # Errors
    /// [`BrokerError`] on a database failure.
    pub async fn dev_topology(&self) -> Result<(), BrokerError> {
        self.declare_topic(DEV_TOPIC).await?;
        self.declare_queue(
            DEV_DLQ,
            QueueConfig {
                retention: KEEP_UNTIL_DONE,
                ..QueueConfig::default()
            },
        )
        .await?;
        self.declare_queue(
            DEV_QUEUE,
            QueueConfig {
                visibility_timeout: Duration::from_secs(30),
                max_receive_count: Some(5),
                dlq: Some(DEV_DLQ.to_owned()),
                retention: KEEP_UNTIL_DONE,
                delay: Duration::ZERO,
            },
        )
        .await?;
        self.subscribe(
            DEV_TOPIC,
            DEV_QUEUE,
            Subscription {
                filter_types: None,
                raw_delivery: true,
            },
        )
        .await
    }

    /// Publishes envelopes to `topic` in one transaction, fanned out to every subscribed queue
    /// whose filter matches; returns once committed, with the number of queue messages
    /// written.
    ///
    /// # Errors
    /// [`BrokerError::NotFound`] for an undeclared topic; [`BrokerError::Sqlite`] when the
    /// commit failed (then nothing was published).
    pub async fn publish(&self, topic: &str, envelopes: &[Envelope]) -> Result<usize, BrokerError> {
        let topic = topic.to_owned();
        let envelopes = envelopes.to_vec();
        let written = self
            .write(move |tx, now| {
                ensure_topic(tx, &topic)?;
                let subs = load_subscriptions(tx, &topic)?;
                // Answered as published, the events would be stored nowhere.
                if subs.is_empty() {
                    return Err(BrokerError::NoSubscriptions { topic });
                }
                let mut written = 0;
                for env in &envelopes {
                    let types: Option<Vec<String>> = env
                        .attributes
                        .get(ATTR_TYPES)
                        .and_then(|t| serde_json::from_str(t).ok());
                    let attrs_json = to_json(&env.attributes)?;
                    for (queue, sub, q) in &subs {
                        if !sub.accepts(types.as_deref()) {
                            continue;
                        }
                        let message_id = Uuid::new_v4().to_string();
                        if sub.raw_delivery {
                            insert_message(tx, queue, q, &message_id, &env.body, &attrs_json, now)?;
                        } else {
                            let body = notification(&topic, &message_id, env, now);
                            insert_message(tx, queue, q, &message_id, &body, "{}", now)?;
                        }
                        written += 1;
                    }
                }
                Ok(written)
            })
            .await?;
        self.inner.notify.notify_waiters();
        Ok(written)
    }

    /// Sends messages straight to `queue` (replay, tests) in one transaction.
    ///
    /// # Errors
    /// [`BrokerError::NotFound`] for an undeclared queue, or a database failure.
    pub async fn send(&self, queue: &str, messages: &[OutgoingMessage]) -> Result<(), BrokerError> {
        let queue = queue.to_owned();
        let messages = messages.to_vec();
        self.write(move |tx, now| {
            let q = load_queue(tx, &queue)?;
            for m in &messages {
                let id = Uuid::new_v4().to_string();
                insert_message(tx, &queue, &q, &id, &m.body, &to_json(&m.attributes)?, now)?;
            }
            Ok(())
        })
        .await?;
        self.inner.notify.notify_waiters();
        Ok(())
    }

    /// Receives up to `max` messages from `queue` without waiting: drops expired messages,
    /// moves those past the redrive policy to the DLQ, and hides the rest for the visibility
    /// timeout under a new receipt.
    ///
    /// # Errors
    /// [`BrokerError::NotFound`] for an undeclared queue, or a database failure.
    pub async fn receive_now(&self, queue: &str, max: usize) -> Result<Vec<Delivery>, BrokerError> {
        self.receive_now_hiding(queue, max, None).await
    }

    /// As [`Broker::receive_now`], hiding what it receives for `visibility` instead of the
    /// queue's visibility timeout when given (SQS's `VisibilityTimeout` on a receive).
    ///
    /// # Errors
    /// As [`Broker::receive_now`].
    pub async fn receive_now_hiding(
        &self,
        queue: &str,
        max: usize,
        visibility: Option<Duration>,
    ) -> Result<Vec<Delivery>, BrokerError> {
        let queue = queue.to_owned();
        let visibility_ms = visibility.map(|v| i64::try_from(v.as_millis()).unwrap_or(i64::MAX));
        // The transaction runs on a blocking thread and commits even when this future is
        // dropped meanwhile (a worker's shutdown racing its receive): the guard then gives
        // the messages back, so that none waits out a visibility timeout with a receive used
        // up for nothing, nor is dead-lettered for it on its last receive.
        let mut guard = ReceiveGuard {
            handoff: Arc::default(),
            inner: Arc::clone(&self.inner),
            queue: queue.clone(),
            collected: false,
        };
        let handoff = Arc::clone(&guard.handoff);
        let inner = Arc::clone(&self.inner);
        let moved = self
            .run(move |conn, now| {
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(sql("begin"))?;
                if lock(&handoff).abandoned {
                    return Ok(0);
                }
                let (deliveries, moved) = receive_tx(&tx, &queue, max, now, visibility_ms)?;
                tx.commit().map_err(sql("commit"))?;
                let mut slot = lock(&handoff);
                if slot.abandoned {
                    // Nobody awaits this result, so nobody else wakes the long polls.
                    drop(slot);
                    give_back(conn, &queue, &deliveries, now);
                    inner.notify.notify_waiters();
                } else {
                    slot.received = Some(deliveries);
                }
                Ok(moved)
            })
            .await?;
        guard.collected = true;
        if moved > 0 {
            self.inner.notify.notify_waiters();
        }
        let received = lock(&guard.handoff).received.take();
        Ok(received.unwrap_or_default())
    }

    /// Receives up to `max` messages, waiting up to `wait` for the first (long poll): woken by
    /// publishes in this process, otherwise polling every 100 ms.
    ///
    /// # Errors
    /// As [`Broker::receive_now`].
    pub async fn receive(
        &self,
        queue: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>, BrokerError> {
        self.receive_hiding(queue, max, wait, None).await
    }

    /// As [`Broker::receive`], hiding what it receives for `visibility` when given.
    ///
    /// # Errors
    /// As [`Broker::receive_now`].
    pub async fn receive_hiding(
        &self,
        queue: &str,
        max: usize,
        wait: Duration,
        visibility: Option<Duration>,
    ) -> Result<Vec<Delivery>, BrokerError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before looking, so a publish between the look and the wait wakes us.
            let notified = self.inner.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let got = self.receive_now_hiding(queue, max, visibility).await?;
            let now = tokio::time::Instant::now();
            if !got.is_empty() || now >= deadline || max == 0 {
                return Ok(got);
            }
            let nap = (deadline - now).min(POLL_INTERVAL);
            let _ = tokio::time::timeout(nap, notified).await;
        }
    }

    /// Deletes messages by current receipt in one transaction; stale receipts delete nothing.
    ///
    /// # Errors
    /// A database failure (then nothing was deleted).
    pub async fn delete_batch(
        &self,
        queue: &str,
        receipts: &[DeliveryId],
    ) -> Result<SettleOutcome, BrokerError> {
        let queue = queue.to_owned();
        let receipts = receipts.to_vec();
        self.write(move |tx, _| {
            let mut out = SettleOutcome::default();
            let mut st = tx
                .prepare_cached(
                    "DELETE FROM messages WHERE seq = ?1 AND queue = ?2 AND receipt = ?3",
                )
                .map_err(sql("prepare delete"))?;
            for r in receipts {
                let n = match parse_receipt(&r) {
                    Some(seq) => st
                        .execute(params![seq, queue, r.0])
                        .map_err(sql("delete"))?,
                    None => 0,
                };
                if n == 0 {
                    out.stale.push(r);
                } else {
                    out.settled += 1;
                }
            }
            Ok(out)
        })
        .await
    }

    /// Makes messages visible again `after` from now (change visibility) by current receipt,
    /// in one transaction; the receipt stays valid until the message is received again.
    ///
    /// # Errors
    /// A database failure (then nothing changed).
    pub async fn change_visibility(
        &self,
        queue: &str,
        items: &[(DeliveryId, Duration)],
    ) -> Result<SettleOutcome, BrokerError> {
        let queue = queue.to_owned();
        let items = items.to_vec();
        self.write(move |tx, now| {
            let mut out = SettleOutcome::default();
            let mut st = tx
                .prepare_cached(
                    "UPDATE messages SET visible_at_ms = ?4
                     WHERE seq = ?1 AND queue = ?2 AND receipt = ?3",
                )
                .map_err(sql("prepare change visibility"))?;
            for (r, after) in items {
                let n = match parse_receipt(&r) {
                    Some(seq) => st
                        .execute(params![seq, queue, r.0, now.saturating_add(ms(after))])
                        .map_err(sql("change visibility"))?,
                    None => 0,
                };
                if n == 0 {
                    out.stale.push(r);
                } else {
                    out.settled += 1;
                }
            }
            Ok(out)
        })
        .await
    }

    /// Puts `letters` on the DLQ of `queue` (with the reason and source-queue attributes) and
    /// deletes the delivery `receipt`, in one transaction: both happen or neither.
    ///
    /// # Errors
    /// [`BrokerError::Invalid`] when the queue has no DLQ; [`BrokerError::StaleReceipts`]
    /// when the receipt is not current (nothing is sent then); a database failure.
    pub async fn dead_letter(
        &self,
        queue: &str,
        receipt: &DeliveryId,
        letters: &[DeadLetter],
    ) -> Result<(), BrokerError> {
        let queue = queue.to_owned();
        let receipt = receipt.clone();
        let letters = letters.to_vec();
        self.write(move |tx, now| {
            let q = load_queue(tx, &queue)?;
            let dlq_name = q
                .dlq
                .ok_or_else(|| BrokerError::Invalid(format!("queue {queue:?} has no DLQ")))?;
            let dlq = load_queue(tx, &dlq_name)?;
            let stale = || BrokerError::StaleReceipts {
                queue: queue.clone(),
                count: 1,
            };
            let seq = parse_receipt(&receipt).ok_or_else(stale)?;
            let deleted = tx
                .prepare_cached(
                    "DELETE FROM messages WHERE seq = ?1 AND queue = ?2 AND receipt = ?3",
                )
                .and_then(|mut st| st.execute(params![seq, queue, receipt.0]))
                .map_err(sql("delete dead-lettered message"))?;
            if deleted == 0 {
                return Err(stale());
            }
            for letter in &letters {
                let mut attrs = letter.attributes.clone();
                attrs.insert(ATTR_ERROR_CODE.to_owned(), letter.reason.code.clone());
                attrs.insert(ATTR_ERROR_MESSAGE.to_owned(), letter.reason.message.clone());
                attrs.insert(ATTR_SOURCE_QUEUE.to_owned(), queue.clone());
                let id = Uuid::new_v4().to_string();
                insert_message(
                    tx,
                    &dlq_name,
                    &dlq,
                    &id,
                    &letter.body,
                    &to_json(&attrs)?,
                    now,
                )?;
            }
            Ok(())
        })
        .await?;
        self.inner.notify.notify_waiters();
        Ok(())
    }

    /// Counts of a queue's live messages and the age of its oldest one.
    ///
    /// # Errors
    /// [`BrokerError::NotFound`] for an undeclared queue, or a database failure.
    pub async fn queue_stats(&self, queue: &str) -> Result<QueueStats, BrokerError> {
        let queue = queue.to_owned();
        self.run(move |conn, now| {
            load_queue(conn, &queue)?;
            conn.prepare_cached(
                "SELECT
                    COALESCE(SUM(visible_at_ms <= ?2), 0),
                    COALESCE(SUM(visible_at_ms > ?2 AND receive_count > 0), 0),
                    COALESCE(SUM(visible_at_ms > ?2 AND receive_count = 0), 0),
                    MIN(sent_at_ms)
                 FROM messages WHERE queue = ?1 AND expires_at_ms > ?2",
            )
            .and_then(|mut st| {
                st.query_row(params![queue, now], |r| {
                    let oldest: Option<i64> = r.get(3)?;
                    Ok(QueueStats {
                        visible: count(r.get(0)?),
                        in_flight: count(r.get(1)?),
                        delayed: count(r.get(2)?),
                        oldest_age_secs: oldest.map(|t| from_ms(now - t).as_secs()),
                    })
                })
            })
            .map_err(sql("count messages"))
        })
        .await
    }

    /// Reads up to `n` live messages of `queue`, oldest first, without receiving them (receive
    /// counts, receipts and visibility are untouched).
    ///
    /// # Errors
    /// [`BrokerError::NotFound`] for an undeclared queue, or a database failure.
    pub async fn peek(&self, queue: &str, n: usize) -> Result<Vec<PeekedMessage>, BrokerError> {
        let queue = queue.to_owned();
        let limit = i64::try_from(n).unwrap_or(i64::MAX);
        self.run(move |conn, now| {
            load_queue(conn, &queue)?;
            let mut st = conn
                .prepare_cached(
                    "SELECT message_id, body, attributes, receive_count, sent_at_ms, visible_at_ms
                     FROM messages WHERE queue = ?1 AND expires_at_ms > ?2
                     ORDER BY seq LIMIT ?3",
                )
                .map_err(sql("prepare peek"))?;
            let rows = st
                .query_map(params![queue, now, limit], |r| {
                    let attrs: String = r.get(2)?;
                    let sent: i64 = r.get(4)?;
                    let visible_at: i64 = r.get(5)?;
                    Ok(PeekedMessage {
                        message_id: r.get(0)?,
                        body: r.get(1)?,
                        attributes: from_json(&attrs),
                        receive_count: r.get(3)?,
                        age_secs: from_ms(now - sent).as_secs(),
                        visible: visible_at <= now,
                    })
                })
                .and_then(Iterator::collect)
                .map_err(sql("peek"))?;
            Ok(rows)
        })
        .await
    }

    /// Receives up to `max` visible messages of `queue` for moving them elsewhere (DLQ replay,
    /// export): each is hidden for `lease` under a new receipt, its receive count goes up, and
    /// the queue's redrive policy is not applied (a DLQ operator's read never dead-letters).
    /// Oldest first.
    ///
    /// # Errors
    /// [`BrokerError::NotFound`] for an undeclared queue, or a database failure.
    pub async fn lease(
        &self,
        queue: &str,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<LeasedMessage>, BrokerError> {
        let queue = queue.to_owned();
        let limit = i64::try_from(max).unwrap_or(i64::MAX);
        self.write(move |tx, now| {
            load_queue(tx, &queue)?;
            let rows: Vec<(i64, String, String, String, u32, i64)> = tx
                .prepare_cached(
                    "SELECT seq, message_id, body, attributes, receive_count, sent_at_ms
                     FROM messages
                     WHERE queue = ?1 AND visible_at_ms <= ?2 AND expires_at_ms > ?2
                     ORDER BY visible_at_ms, seq LIMIT ?3",
                )
                .and_then(|mut st| {
                    st.query_map(params![queue, now, limit], |r| {
                        Ok((
                            r.get(0)?,
                            r.get(1)?,
                            r.get(2)?,
                            r.get(3)?,
                            r.get(4)?,
                            r.get(5)?,
                        ))
                    })
                    .and_then(Iterator::collect)
                })
                .map_err(sql("select messages to lease"))?;
            let mut out = Vec::with_capacity(rows.len());
            let mut st = tx
                .prepare_cached(
                    "UPDATE messages SET receive_count = ?2, receipt = ?3, visible_at_ms = ?4
                     WHERE seq = ?1",
                )
                .map_err(sql("prepare lease"))?;
            for (seq, message_id, body, attributes, receive_count, sent_at_ms) in rows {
                let receipt = format!("{seq}:{}", Uuid::new_v4().simple());
                let receive_count = receive_count.saturating_add(1);
                st.execute(params![
                    seq,
                    receive_count,
                    receipt,
                    now.saturating_add(ms(lease))
                ])
                .map_err(sql("lease message"))?;
                out.push(LeasedMessage {
                    receipt: DeliveryId(receipt),
                    message_id,
                    body,
                    attributes: from_json(&attributes),
                    receive_count,
                    sent_at_ms,
                });
            }
            Ok(out)
        })
        .await
    }

    /// Every declared queue with its settings, by name.
    ///
    /// # Errors
    /// A database failure.
    pub async fn list_queues(&self) -> Result<Vec<QueueInfo>, BrokerError> {
        self.run(|conn, _| {
            let mut st = conn
                .prepare_cached(
                    "SELECT name, visibility_timeout_ms, max_receive_count, dlq, retention_ms,
                            delay_ms
                     FROM queues ORDER BY name",
                )
                .map_err(sql("prepare list queues"))?;
            let rows = st
                .query_map([], |r| {
                    Ok(QueueInfo {
                        name: r.get(0)?,
                        config: QueueConfig {
                            visibility_timeout: from_ms(r.get(1)?),
                            max_receive_count: r.get(2)?,
                            dlq: r.get(3)?,
                            retention: match r.get(4)? {
                                i64::MAX => KEEP_UNTIL_DONE,
                                v => from_ms(v),
                            },
                            delay: from_ms(r.get(5)?),
                        },
                    })
                })
                .and_then(Iterator::collect)
                .map_err(sql("list queues"))?;
            Ok(rows)
        })
        .await
    }

    /// Deletes every message of `queue`; returns how many.
    ///
    /// # Errors
    /// [`BrokerError::NotFound`] for an undeclared queue, or a database failure.
    pub async fn purge(&self, queue: &str) -> Result<usize, BrokerError> {
        let queue = queue.to_owned();
        self.write(move |tx, _| {
            load_queue(tx, &queue)?;
            tx.execute("DELETE FROM messages WHERE queue = ?1", [&queue])
                .map_err(sql("purge"))
        })
        .await
    }

    /// Checks that the database answers and `topic` exists with a queue subscribed to it,
    /// for readiness probes.
    ///
    /// # Errors
    /// [`BrokerError::NotFound`], [`BrokerError::NoSubscriptions`] or a database failure.
    pub async fn check_topic(&self, topic: &str) -> Result<(), BrokerError> {
        let topic = topic.to_owned();
        self.run(move |conn, _| {
            ensure_topic(conn, &topic)?;
            let subscribed = conn
                .prepare_cached("SELECT 1 FROM subscriptions WHERE topic = ?1")
                .and_then(|mut st| st.exists([&topic]))
                .map_err(sql("read subscriptions"))?;
            if subscribed {
                Ok(())
            } else {
                Err(BrokerError::NoSubscriptions { topic })
            }
        })
        .await
    }
}

fn ensure_topic(conn: &Connection, topic: &str) -> Result<(), BrokerError> {
    let found = conn
        .prepare_cached("SELECT 1 FROM topics WHERE name = ?1")
        .and_then(|mut st| st.exists([topic]))
        .map_err(sql("read topic"))?;
    if found {
        Ok(())
    } else {
        Err(BrokerError::NotFound {
            kind: "topic",
            name: topic.to_owned(),
        })
    }
}

fn load_subscriptions(
    tx: &Transaction<'_>,
    topic: &str,
) -> Result<Vec<(String, Subscription, QueueRow)>, BrokerError> {
    let mut st = tx
        .prepare_cached(
            "SELECT s.queue, s.filter_types, s.raw_delivery
             FROM subscriptions s WHERE s.topic = ?1 ORDER BY s.queue",
        )
        .map_err(sql("prepare read subscriptions"))?;
    let rows: Vec<(String, Option<String>, bool)> = st
        .query_map([topic], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .and_then(Iterator::collect)
        .map_err(sql("read subscriptions"))?;
    rows.into_iter()
        .map(|(queue, filter, raw_delivery)| {
            let filter_types = filter
                .map(|f| {
                    let names: Vec<String> = serde_json::from_str(&f).map_err(|e| {
                        BrokerError::Invalid(format!("stored filter of {queue:?} is corrupt: {e}"))
                    })?;
                    names
                        .iter()
                        .map(|n| {
                            EventType::parse(n).map_err(|e| BrokerError::Invalid(e.to_string()))
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
                .transpose()?;
            let q = load_queue(tx, &queue)?;
            Ok((
                queue,
                Subscription {
                    filter_types,
                    raw_delivery,
                },
                q,
            ))
        })
        .collect()
}

struct Candidate {
    seq: i64,
    message_id: String,
    body: String,
    attributes: String,
    receive_count: u32,
}

/// The receive transaction body: returns the deliveries and how many were moved to the DLQ.
fn receive_tx(
    tx: &Transaction<'_>,
    queue: &str,
    max: usize,
    now: i64,
    visibility_ms: Option<i64>,
) -> Result<(Vec<Delivery>, usize), BrokerError> {
    let q = load_queue(tx, queue)?;
    let hide_ms = visibility_ms.unwrap_or(q.visibility_ms);
    tx.prepare_cached("DELETE FROM messages WHERE queue = ?1 AND expires_at_ms <= ?2")
        .and_then(|mut st| st.execute(params![queue, now]))
        .map_err(sql("drop expired messages"))?;
    let redrive = match (q.max_receive_count, &q.dlq) {
        (Some(max_rc), Some(dlq)) => Some((max_rc, dlq.clone(), load_queue(tx, dlq)?)),
        _ => None,
    };
    let mut out = Vec::new();
    let mut moved = 0;
    // With a zero visibility timeout a delivered message is visible again at once; never
    // hand it out twice in one call.
    let mut seen = HashSet::new();
    while out.len() < max {
        let want = i64::try_from(max - out.len()).unwrap_or(i64::MAX);
        let candidates: Vec<Candidate> = tx
            .prepare_cached(
                "SELECT seq, message_id, body, attributes, receive_count FROM messages
                 WHERE queue = ?1 AND visible_at_ms <= ?2
                 ORDER BY visible_at_ms, seq LIMIT ?3",
            )
            .and_then(|mut st| {
                st.query_map(params![queue, now, want], |r| {
                    Ok(Candidate {
                        seq: r.get(0)?,
                        message_id: r.get(1)?,
                        body: r.get(2)?,
                        attributes: r.get(3)?,
                        receive_count: r.get(4)?,
                    })
                })
                .and_then(Iterator::collect)
            })
            .map_err(sql("select visible messages"))?;
        let candidates: Vec<Candidate> = candidates
            .into_iter()
            .filter(|c| seen.insert(c.seq))
            .collect();
        if candidates.is_empty() {
            break;
        }
        for c in candidates {
            if let Some((max_rc, dlq_name, dlq)) = &redrive {
                if c.receive_count >= *max_rc {
                    let mut attrs = from_json(&c.attributes);
                    attrs.insert(ATTR_ERROR_CODE.to_owned(), MAX_RECEIVES_CODE.to_owned());
                    attrs.insert(
                        ATTR_ERROR_MESSAGE.to_owned(),
                        format!(
                            "received {} times, the redrive policy allows {max_rc}",
                            c.receive_count
                        ),
                    );
                    attrs.insert(ATTR_SOURCE_QUEUE.to_owned(), queue.to_owned());
                    insert_message(
                        tx,
                        dlq_name,
                        dlq,
                        &c.message_id,
                        &c.body,
                        &to_json(&attrs)?,
                        now,
                    )?;
                    tx.prepare_cached("DELETE FROM messages WHERE seq = ?1")
                        .and_then(|mut st| st.execute([c.seq]))
                        .map_err(sql("delete redriven message"))?;
                    moved += 1;
                    continue;
                }
            }
            let receipt = format!("{}:{}", c.seq, Uuid::new_v4().simple());
            let receive_count = c.receive_count.saturating_add(1);
            tx.prepare_cached(
                "UPDATE messages SET receive_count = ?2, receipt = ?3, visible_at_ms = ?4
                 WHERE seq = ?1",
            )
            .and_then(|mut st| {
                st.execute(params![
                    c.seq,
                    receive_count,
                    receipt,
                    now.saturating_add(hide_ms)
                ])
            })
            .map_err(sql("mark received"))?;
            out.push(Delivery {
                id: DeliveryId(receipt),
                message_id: c.message_id,
                body: c.body,
                attributes: from_json(&c.attributes),
                receive_count,
                body_error: None,
            });
        }
    }
    if moved > 0 {
        tracing::info!(queue = %queue, moved, "Moved messages past max receives to the DLQ");
    }
    Ok((out, moved))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::FixedClock;

    fn broker() -> (tempfile::TempDir, Broker, Arc<FixedClock>) {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(FixedClock::at(time::OffsetDateTime::now_utc()));
        let broker = Broker::open_with_clock(dir.path().join("b.db"), clock.clone()).unwrap();
        (dir, broker, clock)
    }

    fn msg(body: &str) -> OutgoingMessage {
        OutgoingMessage {
            body: body.to_owned(),
            attributes: BTreeMap::new(),
        }
    }

    #[test]
    fn only_errors_caused_by_the_data_are_permanent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
            .unwrap();
        conn.execute("INSERT INTO t VALUES (1, 'a')", []).unwrap();
        let duplicate = conn
            .execute("INSERT INTO t VALUES (1, 'b')", [])
            .unwrap_err();
        assert!(!is_transient_sqlite(&duplicate), "{duplicate}");
        let null = conn
            .execute("INSERT INTO t VALUES (2, NULL)", [])
            .unwrap_err();
        assert!(!is_transient_sqlite(&null), "{null}");

        // An operator's problems: the events must wait, not be dead-lettered.
        let read_only =
            Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        let refused = read_only
            .execute("INSERT INTO t VALUES (3, 'c')", [])
            .unwrap_err();
        assert_eq!(refused.sqlite_error_code(), Some(ErrorCode::ReadOnly));
        assert!(is_transient_sqlite(&refused), "{refused}");
        let garbage = dir.path().join("garbage.db");
        std::fs::write(&garbage, vec![b'x'; 8192]).unwrap();
        let not_a_db = Connection::open(&garbage)
            .unwrap()
            .execute_batch("SELECT * FROM sqlite_master")
            .unwrap_err();
        assert_eq!(not_a_db.sqlite_error_code(), Some(ErrorCode::NotADatabase));
        assert!(is_transient_sqlite(&not_a_db), "{not_a_db}");
    }

    /// `spillway dev` keeps what it accepted however long the worker or the store is down:
    /// with SQS's retention an event older than 4 days was deleted at the next receive,
    /// without a log line or a dead letter. A store made before keeps its messages too.
    #[tokio::test]
    async fn the_dev_queues_keep_their_messages_until_they_are_done_with() {
        let (_dir, b, clock) = broker();
        let start = time::OffsetDateTime::now_utc();
        // An older store: the queue declared with SQS's 4 days, a message sent then.
        b.declare_queue(DEV_DLQ, QueueConfig::default())
            .await
            .unwrap();
        b.declare_queue(
            DEV_QUEUE,
            QueueConfig {
                max_receive_count: Some(5),
                dlq: Some(DEV_DLQ.to_owned()),
                ..QueueConfig::default()
            },
        )
        .await
        .unwrap();
        b.send(DEV_QUEUE, &[msg("older")]).await.unwrap();
        b.dev_topology().await.unwrap();
        b.send(DEV_QUEUE, &[msg("newer")]).await.unwrap();
        b.send(DEV_DLQ, &[msg("letter")]).await.unwrap();
        clock.set(start + time::Duration::days(400));
        assert_eq!(b.queue_stats(DEV_DLQ).await.unwrap().visible, 1);
        let got = b.receive_now(DEV_QUEUE, 10).await.unwrap();
        let mut bodies: Vec<&str> = got.iter().map(|d| d.body.as_str()).collect();
        bodies.sort_unstable();
        assert_eq!(bodies, ["newer", "older"]);
        // A queue declared with a retention still drops what outlived it, as SQS does.
        b.declare_queue("short", QueueConfig::default())
            .await
            .unwrap();
        b.send("short", &[msg("old")]).await.unwrap();
        clock.set(start + time::Duration::days(405));
        assert!(b.receive_now("short", 10).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn the_dev_topology_is_declared_idempotently() {
        let (_dir, b, _) = broker();
        b.dev_topology().await.unwrap();
        b.dev_topology().await.unwrap();
        let queues = b.list_queues().await.unwrap();
        let names: Vec<&str> = queues.iter().map(|q| q.name.as_str()).collect();
        assert_eq!(names, [DEV_QUEUE, DEV_DLQ]);
        let worker = &queues[0].config;
        assert_eq!(worker.max_receive_count, Some(5));
        assert_eq!(worker.dlq.as_deref(), Some(DEV_DLQ));
        assert_eq!(worker.visibility_timeout, Duration::from_secs(30));
        assert_eq!(worker.retention, KEEP_UNTIL_DONE);
        assert_eq!(queues[1].config.retention, KEEP_UNTIL_DONE);
        let written = b
            .publish(
                DEV_TOPIC,
                &[Envelope {
                    body: "x".into(),
                    attributes: BTreeMap::new(),
                    event_count: 1,
                }],
            )
            .await
            .unwrap();
        assert_eq!(written, 1, "one subscription after two declarations");
    }

    #[tokio::test]
    async fn an_incomplete_or_dangling_redrive_policy_is_refused() {
        let (_dir, b, _) = broker();
        let half = QueueConfig {
            max_receive_count: Some(3),
            ..QueueConfig::default()
        };
        assert!(matches!(
            b.declare_queue("q", half).await,
            Err(BrokerError::Invalid(_))
        ));
        let dangling = QueueConfig {
            max_receive_count: Some(3),
            dlq: Some("missing".into()),
            ..QueueConfig::default()
        };
        assert!(matches!(
            b.declare_queue("q", dangling).await,
            Err(BrokerError::NotFound { .. })
        ));
        assert!(b.list_queues().await.unwrap().is_empty());
        assert!(matches!(
            b.subscribe("no-topic", "q", Subscription::default()).await,
            Err(BrokerError::NotFound { .. })
        ));
    }

    #[tokio::test]
    async fn queue_stats_count_visible_in_flight_and_delayed_messages() {
        let (_dir, b, clock) = broker();
        b.declare_queue("q", QueueConfig::default()).await.unwrap();
        b.declare_queue(
            "slow",
            QueueConfig {
                delay: Duration::from_secs(60),
                ..QueueConfig::default()
            },
        )
        .await
        .unwrap();
        b.send("q", &[msg("a"), msg("b"), msg("c")]).await.unwrap();
        b.send("slow", &[msg("d")]).await.unwrap();
        clock.set(clock.now() + Duration::from_secs(7));
        b.receive_now("q", 1).await.unwrap();
        assert_eq!(
            b.queue_stats("q").await.unwrap(),
            QueueStats {
                visible: 2,
                in_flight: 1,
                delayed: 0,
                oldest_age_secs: Some(7)
            }
        );
        let slow = b.queue_stats("slow").await.unwrap();
        assert_eq!((slow.visible, slow.delayed), (0, 1));
        assert!(matches!(
            b.queue_stats("nope").await,
            Err(BrokerError::NotFound { .. })
        ));
    }

    /// Polls `fut` once while holding the broker's connection, so that its transaction
    /// waits; returns it still pending, and the connection still held.
    fn started<'a, F: std::future::Future>(
        b: &'a Broker,
        fut: F,
    ) -> (std::pin::Pin<Box<F>>, std::sync::MutexGuard<'a, Connection>) {
        let held = b.inner.conn.lock().unwrap();
        let mut fut = Box::pin(fut);
        let waker = futures::task::noop_waker();
        let polled = fut
            .as_mut()
            .poll(&mut std::task::Context::from_waker(&waker));
        assert!(polled.is_pending());
        (fut, held)
    }

    async fn wait_for_stats(b: &Broker, queue: &str, want: QueueStats) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let stats = b.queue_stats(queue).await.unwrap();
            if stats == want || std::time::Instant::now() > deadline {
                assert_eq!(stats, want);
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_receive_dropped_before_or_after_its_commit_takes_nothing() {
        let (_dir, b, _) = broker();
        b.declare_queue("q", QueueConfig::default()).await.unwrap();
        b.send("q", &[msg("a"), msg("b"), msg("c")]).await.unwrap();
        let all_visible = QueueStats {
            visible: 3,
            in_flight: 0,
            delayed: 0,
            oldest_age_secs: Some(0),
        };

        // Dropped while its transaction waits for the connection: it never receives.
        let (before, held) = started(&b, b.receive_now("q", 10));
        drop(before);
        drop(held);
        wait_for_stats(&b, "q", all_visible).await;

        // Dropped once its transaction committed, before collecting what it took: the
        // messages are given back. Before, all three stayed in flight for the visibility
        // timeout (30 s) with a receive used up.
        let (after, held) = started(&b, b.receive_now("q", 10));
        drop(held);
        // Read under the connection, so only once the transaction has finished.
        let taken = QueueStats {
            visible: 0,
            in_flight: 3,
            ..all_visible
        };
        wait_for_stats(&b, "q", taken).await;
        drop(after);
        wait_for_stats(&b, "q", all_visible).await;

        let got = b.receive_now("q", 10).await.unwrap();
        assert_eq!(got.len(), 3);
        assert!(got.iter().all(|d| d.receive_count == 1), "{got:?}");
    }

    #[test]
    fn a_receive_dropped_as_its_runtime_shuts_down_still_gives_its_messages_back() {
        let (_dir, b, _) = broker();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            b.declare_queue("q", QueueConfig::default()).await.unwrap();
            b.send("q", &[msg("a"), msg("b")]).await.unwrap();
        });
        let in_rt = rt.enter();
        let (after, held) = started(&b, b.receive_now("q", 10));
        drop(held);
        let taken = QueueStats {
            visible: 0,
            in_flight: 2,
            delayed: 0,
            oldest_age_secs: Some(0),
        };
        rt.block_on(wait_for_stats(&b, "q", taken));
        // As a worker's `main` returns: the receive is dropped and the runtime with it, which
        // may cancel the give-back's blocking task before it starts.
        drop(after);
        drop(in_rt);
        drop(rt);
        let rt = tokio::runtime::Runtime::new().unwrap();
        let stats = rt.block_on(b.queue_stats("q")).unwrap();
        assert_eq!((stats.visible, stats.in_flight), (2, 0));
    }

    #[tokio::test]
    async fn peek_reads_without_changing_receive_counts_or_visibility() {
        let (_dir, b, _) = broker();
        b.declare_queue("q", QueueConfig::default()).await.unwrap();
        b.send("q", &[msg("a"), msg("b")]).await.unwrap();
        for _ in 0..3 {
            let seen = b.peek("q", 10).await.unwrap();
            assert_eq!(seen.len(), 2);
            assert!(seen.iter().all(|m| m.receive_count == 0 && m.visible));
        }
        let got = b.receive_now("q", 10).await.unwrap();
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(|d| d.receive_count == 1));
        assert_eq!(b.peek("q", 1).await.unwrap().len(), 1);
        assert_eq!(b.purge("q").await.unwrap(), 2);
        assert!(b.peek("q", 10).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_zero_visibility_timeout_never_hands_a_message_out_twice_in_one_receive() {
        let (_dir, b, _) = broker();
        b.declare_queue(
            "q",
            QueueConfig {
                visibility_timeout: Duration::ZERO,
                ..QueueConfig::default()
            },
        )
        .await
        .unwrap();
        b.send("q", &[msg("a")]).await.unwrap();
        assert_eq!(b.receive_now("q", 10).await.unwrap().len(), 1);
        assert_eq!(b.receive_now("q", 10).await.unwrap()[0].receive_count, 2);
    }
}
