//! The `Source` port: where workers receive deliveries and settle them.
//!
//! A delivery is one broker message (an envelope). The worker core decides per delivery;
//! the runtime then settles it through this port: `ack` (delete / store offset),
//! `retry_later` (visibility backoff, never 0), `extend` (heartbeat) or `dead_letter`
//! (send to the DLQ with a reason, then delete — never the reverse).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::time::Duration;

use async_trait::async_trait;

/// Most message attributes SQS and SNS take per message (the replay of a letter and the SQS
/// adapter both keep within it).
pub const MAX_MESSAGE_ATTRIBUTES: usize = 10;
/// Attribute carrying the dead-letter reason code.
pub const ATTR_ERROR_CODE: &str = "spillway-error-code";
/// Attribute carrying the dead-letter reason message.
pub const ATTR_ERROR_MESSAGE: &str = "spillway-error-message";
/// Attribute counting how many times a message was put back on its queue as a new message
/// ([`Requeue`]) while the store was down.
pub const ATTR_REQUEUES: &str = "spillway-requeues";

/// Identifies one receipt of a message (an SQS receipt handle, a Kafka offset key, …).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeliveryId(pub String);

/// One received message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Receipt to settle it with.
    pub id: DeliveryId,
    /// Stable message id (the same across redeliveries).
    pub message_id: String,
    /// The body (an envelope, raw or SNS-wrapped).
    pub body: String,
    /// Message attributes.
    pub attributes: BTreeMap<String, String>,
    /// How many times it has been received, this time included.
    pub receive_count: u32,
    /// Why the body as received is not text, when it is not (a Kafka payload that is not
    /// UTF-8). `body` then holds it with each invalid sequence replaced by U+FFFD, for
    /// logs only: the worker dead-letters the message unread (`undecodable`), and the
    /// source sends its original bytes to the DLQ.
    pub body_error: Option<String>,
}

/// Error code of a message moved to its DLQ because it was received too often
/// (an SQS redrive policy, the embedded broker's, or the Kafka source's own).
pub const MAX_RECEIVES_CODE: &str = "max_receives";

/// Why a message is dead-lettered: a stable code and a human message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterReason {
    /// Stable machine code (`undecodable`, `invalid_event`, `max_receives`, …).
    pub code: String,
    /// Human explanation.
    pub message: String,
}

/// A message to put on the DLQ in place of (part of) a delivery: when one event of an
/// envelope is bad, only that event goes to the DLQ, in an envelope of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Body to send to the DLQ.
    pub body: String,
    /// Attributes to send with it (the reason is added by the source).
    pub attributes: BTreeMap<String, String>,
    /// Why.
    pub reason: DeadLetterReason,
}

/// Why a source operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SourceError {
    /// The broker could not be reached or timed out; a retry can help.
    #[error("{queue}: {message}")]
    Unavailable {
        /// Queue or topic.
        queue: String,
        /// What went wrong.
        message: String,
    },
    /// The broker refused the operation (bad receipt, missing permission).
    #[error("{queue} refused: {message}")]
    Rejected {
        /// Queue or topic.
        queue: String,
        /// What went wrong.
        message: String,
    },
}

impl SourceError {
    /// Whether retrying can help.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

/// A dead-letter queue on its own, for runtimes that do not delete what they received
/// themselves (the Lambda SQS handler: the event source mapping deletes the successes).
#[async_trait]
pub trait DeadLetterQueue: Send + Sync + Debug {
    /// Sends `letters` to the DLQ, each with its reason as attributes; `Ok` only once the DLQ
    /// acknowledged every one of them.
    ///
    /// # Errors
    /// [`SourceError`]; letters sent before the failure may be sent again by a retry.
    async fn send(&self, letters: &[DeadLetter]) -> Result<(), SourceError>;
}

/// A message to put back on the queue it came from as a new message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requeued {
    /// The body, unchanged.
    pub body: String,
    /// The attributes, with [`ATTR_REQUEUES`] already counting this requeue.
    pub attributes: BTreeMap<String, String>,
    /// How long the queue holds it before it can be received.
    pub delay: Duration,
}

/// Puts messages back on their queue as new ones, with a fresh receive count, for runtimes
/// that cannot hold a message back themselves while the store is down (the Lambda SQS
/// handler: the event source mapping keeps receiving, and each receive brings the queue's
/// redrive policy closer to moving a valid message to the DLQ).
#[async_trait]
pub trait Requeue: Send + Sync + Debug {
    /// Sends every message; one result per message, in order, `Ok` once the queue took it.
    /// The caller deletes (or lets the event source mapping delete) only those: a message
    /// that is sent but not deleted comes back twice, which the idempotent store absorbs.
    async fn requeue(&self, messages: &[Requeued]) -> Vec<Result<(), SourceError>>;
}

/// Receives deliveries and settles them.
#[async_trait]
pub trait Source: Send + Sync + Debug {
    /// Receives up to `max` deliveries, waiting up to `wait` for the first one.
    ///
    /// # Errors
    /// [`SourceError`] when the broker cannot be reached.
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, SourceError>;

    /// Acknowledges deliveries: they are done and never come back.
    ///
    /// # Errors
    /// [`SourceError`]; unacknowledged deliveries come back after their visibility lapses.
    async fn ack(&self, ids: &[DeliveryId]) -> Result<(), SourceError>;

    /// Makes deliveries visible again after their delay (a backoff; never zero).
    ///
    /// # Errors
    /// [`SourceError`].
    async fn retry_later(&self, items: &[(DeliveryId, Duration)]) -> Result<(), SourceError>;

    /// Extends the invisibility of deliveries still being worked on (heartbeat).
    ///
    /// # Errors
    /// [`SourceError`].
    async fn extend(&self, ids: &[DeliveryId], by: Duration) -> Result<(), SourceError>;

    /// Sends `letters` to the dead-letter queue, then acknowledges `id`. When the send
    /// fails nothing is acknowledged.
    ///
    /// # Errors
    /// [`SourceError`].
    async fn dead_letter(&self, id: &DeliveryId, letters: &[DeadLetter])
        -> Result<(), SourceError>;

    /// Why this source can never settle messages again, if it is in such a state (Kafka: its
    /// DLQ producer in librdkafka's fatal state, so no letter can be sent and poison messages
    /// hold their partitions): only a new process helps. `None` for sources that recover by
    /// themselves.
    fn broken(&self) -> Option<String> {
        None
    }

    /// Writes the source's own metrics (Kafka: the consumer lag per partition) into `page`;
    /// most sources have none (a queue's depth is the broker's to tell).
    fn render_metrics(&self, page: &mut crate::metrics::Exposition) {
        let _ = page;
    }
}
