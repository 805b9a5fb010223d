//! Spillway's domain and ports.
//!
//! Everything the ingest API, the workers and the CLI agree on: the validated ad event, the
//! wire envelope, and the ports (traits) through which they reach brokers and stores.
//!
//! # Layout
//! - [`event`]: `AdEvent`, its validated newtypes, and per-field errors with stable codes.
//! - [`envelope`]: packing events into size-bounded `{"v":1,"events":[…]}` messages and
//!   decoding them back (raw or SNS-wrapped, identity or zstd).
//! - [`publisher`]: the `Publisher` port with in-memory and channel adapters.
//! - [`source`]: the `Source` port (receive, ack, retry later, extend, dead-letter).
//! - [`lambda_init`]: whether the process runs on Lambda; reporting init failures there.
//! - [`memory_source`]: an in-memory `Source` with SQS-like visibility, for tests.
//! - [`sink`]: the `Sink` port (idempotent writes) with an in-memory adapter.
//! - [`aws`]: SNS publisher and SQS source (feature `aws`, on by default).
//! - [`kafka`]: Kafka producer, consumer-group source with a DLQ topic, and the in-process mock
//!   cluster (feature `kafka`).
//! - [`embedded`]: the embedded durable broker on SQLite (topics, queues, DLQs) and its
//!   `Publisher`/`Source` adapters.
//! - [`sqlite_sink`]: the SQLite store (`ad_events` and per-minute rollups) behind `Sink`.
//! - [`dlq`]: the dead-letter port (stats, peek, lease → send → delete, purge, native
//!   redrive) on the embedded broker and SQS/SNS, and the replay/export/import engine.
//! - [`settings`]: broker and store selection shared by the binaries; shutdown signal.
//! - [`postgres_sink`]: the PostgreSQL store (`PostgresSink`) and its versioned migrations.
//! - [`clock`]: injected time, so time rules are testable.
//! - [`synthetic`]: realistic valid events for load generation and benchmarks.
//! - [`telemetry`]: logging setup for the binaries.

#[cfg(feature = "aws")]
pub mod aws;
pub mod clock;
pub mod dlq;
pub mod embedded;
pub mod emf;
pub mod envelope;
pub mod event;
mod iso;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod lambda_init;
pub mod memory_source;
pub mod metrics;
pub mod postgres_sink;
pub mod publisher;
pub mod settings;
pub mod sink;
pub mod source;
pub mod sqlite_sink;
pub mod synthetic;
pub mod telemetry;
#[cfg(test)]
mod testing;

pub use clock::{Clock, SystemClock};
pub use embedded::{Broker, QueueSource, TopicPublisher};
pub use envelope::{ContentEncoding, Envelope, EnvelopeConfig, PackedEvent, Packer};
pub use event::{AdEvent, ErrorCode, EventType, FieldError, ValidationPolicy};
pub use postgres_sink::{
    migrate, PostgresConfig, PostgresError, PostgresSink, RollupRow, WritePaths,
};
pub use publisher::{PublishError, PublishReport, Publisher};
pub use sink::{Sink, SinkError, WriteReport};
pub use source::{
    DeadLetter, DeadLetterQueue, DeadLetterReason, Delivery, DeliveryId, Requeue, Requeued, Source,
    SourceError,
};
pub use sqlite_sink::SqliteSink;

/// `s` cut to at most `max` bytes on a character boundary.
pub(crate) fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
