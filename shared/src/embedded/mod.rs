//! The embedded durable broker: topics, subscriptions and queues in one SQLite file.
//!
//! It stands in for SNS + SQS when Spillway runs as one process (`spillway dev`): a publish is
//! acknowledged only after the SQLite commit (WAL, `synchronous=FULL`, durable against a
//! killed process, an OS crash and a power cut), queues have visibility timeouts, receive counts, delays, retention and a
//! redrive policy to a dead-letter queue, and a receipt is valid only for the latest receive of
//! a message, as in SQS.
//!
//! # Layout
//! - [`broker`]: [`Broker`], its configuration types, errors and the admin API.
//! - [`adapters`]: [`TopicPublisher`] (the `Publisher` port) and [`QueueSource`] (the
//!   `Source` port) over a [`Broker`].

pub mod adapters;
pub mod broker;

pub use adapters::{QueueSource, TopicPublisher};
pub use broker::{
    Broker, BrokerError, LeasedMessage, OutgoingMessage, PeekedMessage, QueueConfig, QueueInfo,
    QueueStats, SettleOutcome, Subscription, ATTR_SOURCE_QUEUE, DEFAULT_DB_PATH, DEV_DLQ,
    DEV_QUEUE, DEV_TOPIC, KEEP_UNTIL_DONE, MAX_RECEIVES_CODE,
};
