//! The dead-letter port: what `spillway dlq` needs from a broker to inspect a dead-letter
//! queue and move its messages elsewhere without losing or duplicating any.
//!
//! The port is broker-neutral: a DLQ and a destination are addressed by name (an embedded
//! queue name, an SQS queue URL, a Kafka topic, …), a message is a body plus string
//! attributes, and moving is always *lease → send → delete*: a message leased for moving is
//! hidden from other readers for the lease, sent to its destination, and deleted from the DLQ
//! only after the destination acknowledged it. A crash between the send and the delete leaves
//! the message in both places (harmless: `event_id` makes the store count it once); a crash
//! before the send leaves it in the DLQ, visible again when the lease lapses. Nothing is ever
//! deleted before it was sent.
//!
//! A Kafka adapter implements [`DlqBroker`] with a consumer group as the lease (a "lease" is
//! an uncommitted offset, "delete" commits it in order, "release" seeks back) and a producer
//! as `send`/`publish`; `purge` and `stats` map to offsets.
//!
//! # Layout
//! - [`DlqBroker`]: the port; [`DlqMessage`], [`LeasedMessage`], [`Outgoing`], [`DlqStats`],
//!   [`DlqError`], [`Calls`].
//! - [`embedded`]: the port on the embedded broker.
//! - [`sqs`]: the port on SQS (+ SNS for topics), with native redrive (feature `aws`).
//! - [`inspect`]: decoding a dead letter into its events, and the replay filters.
//! - [`replay`]: the replay / export engine (filters, rate, concurrency, dry run, loop guard).
//! - [`ndjson`]: the export file format.

pub mod embedded;
pub mod inspect;
pub mod ndjson;
pub mod replay;
#[cfg(feature = "aws")]
pub mod sqs;

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::source::DeliveryId;

/// Attribute counting how many times a message was replayed from a DLQ.
pub const ATTR_REPLAY_COUNT: &str = "spillway-replay-count";
/// Default for how many replays a message may have had before replay refuses it.
pub const DEFAULT_MAX_REPLAYS: u32 = 3;

/// A dead letter as read from a DLQ.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DlqMessage {
    /// The broker's message id (stable while the message stays in this queue).
    #[serde(default)]
    pub message_id: String,
    /// The body, exactly as stored.
    pub body: String,
    /// Message attributes (string values).
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// Times it was received from this queue (this read included when it was a lease).
    #[serde(default)]
    pub receive_count: u32,
    /// When it was sent (SQS: `SentTimestamp`, the original enqueue time for a standard queue's
    /// redrive), in ms since the Unix epoch; `None` when the broker does not say.
    #[serde(default)]
    pub sent_at_ms: Option<i64>,
    /// FIFO message group id, when the queue is FIFO.
    #[serde(default)]
    pub group_id: Option<String>,
    /// FIFO deduplication id, when the queue is FIFO.
    #[serde(default)]
    pub dedup_id: Option<String>,
    /// Why the body as stored is not text, when it is not (a Kafka letter that is not
    /// UTF-8); `body` is then a lossy copy, for reading only. Replay and export leave such a
    /// letter in the DLQ: moving its lossy copy would lose its bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_error: Option<String>,
}

impl DlqMessage {
    /// Age in seconds at `now_ms` (0 when the send time is unknown or in the future).
    pub fn age_secs(&self, now_ms: i64) -> Option<u64> {
        self.sent_at_ms
            .map(|t| u64::try_from(now_ms.saturating_sub(t) / 1_000).unwrap_or(0))
    }

    /// The message as it would be sent again: same body, attributes and FIFO ids.
    pub fn to_outgoing(&self) -> Outgoing {
        Outgoing {
            body: self.body.clone(),
            attributes: self.attributes.clone(),
            group_id: self.group_id.clone(),
            dedup_id: self.dedup_id.clone(),
        }
    }

    /// The replay counter carried by the message (0 when absent or unreadable).
    pub fn replay_count(&self) -> u32 {
        self.attributes
            .get(ATTR_REPLAY_COUNT)
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// A message leased for moving: hidden from other readers until deleted, released, or the
/// lease lapses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeasedMessage {
    /// Receipt of this lease (delete or release it with this).
    pub receipt: DeliveryId,
    /// The message.
    pub message: DlqMessage,
}

/// A message to send to a queue or publish to a topic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outgoing {
    /// Body, sent as is.
    pub body: String,
    /// Attributes, sent as is.
    pub attributes: BTreeMap<String, String>,
    /// FIFO message group id (FIFO queues/topics; ignored elsewhere).
    pub group_id: Option<String>,
    /// FIFO deduplication id (FIFO queues/topics; ignored elsewhere).
    pub dedup_id: Option<String>,
}

/// What a send or publish of several messages did: which were acknowledged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SendOutcome {
    /// Indexes (into the slice sent) the broker refused or failed, with its reason. Every
    /// other message was acknowledged.
    pub failed: Vec<(usize, String)>,
}

/// Depth of a queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DlqStats {
    /// Receivable now.
    pub visible: u64,
    /// Received and not yet deleted (leased by someone).
    pub in_flight: u64,
    /// Not yet receivable (delivery delay).
    pub delayed: u64,
    /// Age of the oldest message in seconds when the broker knows it (SQS does not: the CLI
    /// then takes it from a sample).
    pub oldest_age_secs: Option<u64>,
}

impl DlqStats {
    /// Every message, visible or not.
    pub fn total(&self) -> u64 {
        self.visible + self.in_flight + self.delayed
    }
}

/// A native, broker-side redrive task (SQS `StartMessageMoveTask`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RedriveTask {
    /// Handle to cancel it with.
    pub task_handle: Option<String>,
    /// `RUNNING`, `COMPLETED`, `CANCELLING`, `CANCELLED` or `FAILED`.
    pub status: String,
    /// The DLQ.
    pub source: String,
    /// Where messages go (`None`: back to their original source queues).
    pub destination: Option<String>,
    /// Rate cap in messages per second, when set.
    pub max_per_sec: Option<i32>,
    /// Messages moved so far.
    pub moved: i64,
    /// Messages to move, when known.
    pub to_move: Option<i64>,
    /// Why it failed, when it did.
    pub failure_reason: Option<String>,
    /// When it started, in ms since the Unix epoch.
    pub started_at_ms: i64,
}

/// Why a DLQ operation failed, with what an operator needs to fix it.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// The queue or topic does not exist (or the name/URL is wrong).
    #[error("{what} {name:?} does not exist: {detail}")]
    NotFound {
        /// `queue` or `topic`.
        what: &'static str,
        /// Its name, URL or ARN.
        name: String,
        /// What the broker said, and a hint.
        detail: String,
    },
    /// The credentials in use may not do this.
    #[error("permission denied for {operation} on {resource}: {detail}")]
    Forbidden {
        /// The API operation (`sqs:ReceiveMessage`, …).
        operation: String,
        /// The queue or topic.
        resource: String,
        /// What the broker said.
        detail: String,
    },
    /// The broker could not be reached (endpoint down, DNS, timeout); a retry can help.
    #[error("cannot reach the broker for {operation} on {resource}: {detail}")]
    Unreachable {
        /// The operation.
        operation: String,
        /// The queue or topic.
        resource: String,
        /// What failed, including the endpoint when known.
        detail: String,
    },
    /// The broker refused the request (bad parameter, too large, invalid receipt, …).
    #[error("{operation} on {resource} was refused: {detail}")]
    Rejected {
        /// The operation.
        operation: String,
        /// The queue or topic.
        resource: String,
        /// What the broker said.
        detail: String,
    },
    /// The broker cannot do this at all (native redrive on the embedded broker, …).
    #[error("{0}")]
    Unsupported(String),
    /// A request that makes no sense (bad address, bad filter, bad file line, …).
    #[error("{0}")]
    Invalid(String),
    /// The export file exists already: it may be an earlier export's, the only copy of
    /// letters that export deleted from the DLQ.
    #[error(
        "{path} already exists and may hold an earlier export (the only copy of what it deleted from the DLQ); \
         write to another file, or overwrite it with --force"
    )]
    FileExists {
        /// The file.
        path: String,
    },
    /// A local file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl DlqError {
    /// Whether retrying the same operation can help.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unreachable { .. })
    }
}

/// API calls (SQS/SNS) or transactions (embedded) an adapter made, by operation.
#[derive(Debug, Default)]
pub struct Calls(Mutex<BTreeMap<&'static str, u64>>);

impl Calls {
    /// Counts one call of `operation`.
    pub fn count(&self, operation: &'static str) {
        *self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(operation)
            .or_default() += 1;
    }

    /// The counts so far.
    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Every call so far.
    pub fn total(&self) -> u64 {
        self.snapshot().values().sum()
    }
}

/// The dead-letter port. Queues and topics are addressed by the broker's own names (embedded
/// names, SQS queue URLs and SNS topic ARNs, Kafka topics).
#[async_trait]
pub trait DlqBroker: Send + Sync + Debug {
    /// Short broker name for messages (`embedded`, `aws`, `kafka`).
    fn kind(&self) -> &'static str;

    /// Most messages one lease, send or delete call handles.
    fn max_batch(&self) -> usize;

    /// Depth of `queue`.
    ///
    /// # Errors
    /// [`DlqError`].
    async fn stats(&self, queue: &str) -> Result<DlqStats, DlqError>;

    /// Reads up to `max` messages without consuming them: where the broker can only read by
    /// receiving (SQS), they are received and released right after reading.
    ///
    /// # Errors
    /// [`DlqError`].
    async fn peek(&self, queue: &str, max: usize) -> Result<Vec<DlqMessage>, DlqError>;

    /// Receives up to `max` messages for moving, each hidden for `lease`. An empty result
    /// means nothing is receivable now.
    ///
    /// # Errors
    /// [`DlqError`].
    async fn lease(
        &self,
        queue: &str,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<LeasedMessage>, DlqError>;

    /// Makes leased messages receivable again now (their lease ends without a delete).
    ///
    /// # Errors
    /// [`DlqError`]; unreleased messages come back when their lease lapses.
    async fn release(&self, queue: &str, receipts: &[DeliveryId]) -> Result<(), DlqError>;

    /// Deletes leased messages. Call it only after their copies were acknowledged elsewhere.
    /// Returns how many receipts were stale (lease lapsed and the message was leased again, or
    /// it is gone); those were not deleted.
    ///
    /// # Errors
    /// [`DlqError`].
    async fn delete(&self, queue: &str, receipts: &[DeliveryId]) -> Result<usize, DlqError>;

    /// Asks, before `receipts` (leased messages about to be moved) are sent, whether their
    /// deletes can be recorded; returns those that cannot, by index into `receipts`, with the
    /// reason. Those must not be sent in this run: they stay in the DLQ (released at the end).
    /// Only a broker whose record of deletes is bounded refuses any (Kafka: the offsets moved
    /// past a letter the run leaves go in the commit metadata, which the broker caps); by
    /// default every one is admitted.
    ///
    /// # Errors
    /// [`DlqError`].
    async fn admit(
        &self,
        queue: &str,
        receipts: &[DeliveryId],
    ) -> Result<Vec<(usize, String)>, DlqError> {
        let _ = (queue, receipts);
        Ok(Vec::new())
    }

    /// Sends messages to `queue`, keeping bodies, attributes and FIFO ids.
    ///
    /// # Errors
    /// [`DlqError`] when nothing could be sent; per-message failures are in the outcome.
    async fn send(&self, queue: &str, messages: &[Outgoing]) -> Result<SendOutcome, DlqError>;

    /// Publishes messages to `topic` (fanned out to its subscriptions), keeping bodies and
    /// attributes (and FIFO ids on a FIFO topic).
    ///
    /// # Errors
    /// [`DlqError`] when nothing could be published; per-message failures are in the outcome.
    async fn publish(&self, topic: &str, messages: &[Outgoing]) -> Result<SendOutcome, DlqError>;

    /// Deletes every message of `queue`; returns how many when the broker says.
    ///
    /// # Errors
    /// [`DlqError`].
    async fn purge(&self, queue: &str) -> Result<Option<u64>, DlqError>;

    /// Where `queue`'s own redrive policy sends its dead letters, when it has one. A queue
    /// with a redrive policy is a work queue, not a DLQ: `purge` refuses it, since its
    /// messages are events acknowledged with 202 that no worker has stored yet.
    ///
    /// # Errors
    /// [`DlqError`].
    async fn redrives_to(&self, queue: &str) -> Result<Option<String>, DlqError> {
        let _ = queue;
        Ok(None)
    }

    /// The queues whose redrive policy sends dead letters to `dlq` (for `--to source`).
    ///
    /// # Errors
    /// [`DlqError`].
    async fn source_queues(&self, dlq: &str) -> Result<Vec<String>, DlqError>;

    /// Whether `name` is a topic (rather than a queue) on this broker.
    ///
    /// # Errors
    /// [`DlqError::NotFound`] when it is neither.
    async fn is_topic(&self, name: &str) -> Result<bool, DlqError>;

    /// API calls (or transactions) made so far, by operation.
    fn calls(&self) -> BTreeMap<&'static str, u64>;

    /// Starts the broker's native redrive of `dlq` to `destination` (or to the original
    /// sources), at most `max_per_sec` messages per second.
    ///
    /// # Errors
    /// [`DlqError::Unsupported`] unless the broker has native redrive.
    async fn start_redrive(
        &self,
        dlq: &str,
        destination: Option<&str>,
        max_per_sec: Option<u32>,
    ) -> Result<RedriveTask, DlqError> {
        let _ = (dlq, destination, max_per_sec);
        Err(self.no_native_redrive())
    }

    /// The native redrive tasks of `dlq`, most recent first.
    ///
    /// # Errors
    /// [`DlqError::Unsupported`] unless the broker has native redrive.
    async fn redrive_status(&self, dlq: &str) -> Result<Vec<RedriveTask>, DlqError> {
        let _ = dlq;
        Err(self.no_native_redrive())
    }

    /// Cancels the running native redrive task of `dlq`.
    ///
    /// # Errors
    /// [`DlqError::Unsupported`] unless the broker has native redrive;
    /// [`DlqError::Invalid`] when no task is running.
    async fn cancel_redrive(&self, dlq: &str) -> Result<RedriveTask, DlqError> {
        let _ = dlq;
        Err(self.no_native_redrive())
    }

    /// The error of a broker without native redrive.
    fn no_native_redrive(&self) -> DlqError {
        DlqError::Unsupported(format!(
            "the {} broker has no native redrive; use `spillway dlq replay --to source`, which \
             also filters, rate-limits and dry-runs",
            self.kind()
        ))
    }
}

/// The current time in ms since the Unix epoch.
pub fn now_ms() -> i64 {
    i64::try_from(time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000)
        .unwrap_or(i64::MAX)
}
