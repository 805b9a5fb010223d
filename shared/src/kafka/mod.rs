//! Kafka transport (feature `kafka`): a producer behind the `Publisher` port, a consumer-group
//! source behind the `Source` port with a dead-letter topic, and an in-process mock cluster for
//! tests and zero-install try-outs.
//!
//! librdkafka is built from the sources vendored in `rdkafka-sys` (plaintext, lz4/snappy
//! built in, zstd through `zstd-sys`; no TLS, SASL or zlib in this build).
//!
//! # Layout
//! - [`publisher`]: `KafkaPublisher` — `acks=all`, idempotent, compressed, keyed by the
//!   envelope's partition key; acknowledges only after every delivery report succeeded.
//! - [`source`]: `KafkaSource` — consumer group with offsets stored only behind a contiguous
//!   prefix of finished work, in-process redelivery with backoff, a DLQ topic, rebalance hooks.
//! - [`tracker`]: the per-partition offset tracker (pure, property-tested).
//! - [`dlq`]: the dead-letter port (`spillway dlq`) on a DLQ topic, replays tracked by a group.
//! - [`lag`]: read-only partition watermarks, committed offsets and lag, for `spillway stats`.
//! - [`mock`]: `MockKafka`, librdkafka's mock cluster kept alive on a thread of its own.

pub mod dlq;
pub mod lag;
pub mod mock;
pub mod publisher;
pub mod source;
pub mod tracker;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::message::{Header, Headers, OwnedHeaders};

pub use mock::MockKafka;
pub use publisher::KafkaPublisher;
pub use source::KafkaSource;
pub use tracker::PartitionTracker;

/// Header naming the topic a dead letter was consumed from.
pub const HEADER_ORIGINAL_TOPIC: &str = "spillway-original-topic";
/// Header naming the partition a dead letter was consumed from.
pub const HEADER_ORIGINAL_PARTITION: &str = "spillway-original-partition";
/// Header naming the offset a dead letter was consumed from.
pub const HEADER_ORIGINAL_OFFSET: &str = "spillway-original-offset";
/// Default topic of dead letters.
pub const DEFAULT_DLQ_TOPIC: &str = "events-dlq";
/// Default consumer group of the workers.
pub const DEFAULT_GROUP: &str = "spillway-workers";

/// Producer compression codec (`compression.type`). gzip is absent: this build has no zlib.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// No compression.
    None,
    /// Snappy.
    Snappy,
    /// LZ4: the cheapest on CPU, the default.
    #[default]
    Lz4,
    /// Zstandard: the smallest on the wire and disk.
    Zstd,
}

impl Compression {
    /// librdkafka's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Snappy => "snappy",
            Self::Lz4 => "lz4",
            Self::Zstd => "zstd",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Compression {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Self::None),
            "snappy" => Ok(Self::Snappy),
            "lz4" => Ok(Self::Lz4),
            "zstd" => Ok(Self::Zstd),
            other => Err(format!(
                "unknown compression {other:?}; use none, snappy, lz4 or zstd"
            )),
        }
    }
}

/// Connection settings every Kafka client of Spillway shares.
#[derive(Debug, Clone)]
pub struct KafkaClientConfig {
    /// `bootstrap.servers`: comma-separated `host:port` list.
    pub bootstrap_servers: String,
    /// Extra librdkafka properties (`security.protocol`, `client.id`, …), applied last; the
    /// properties Spillway sets itself are refused when parsed ([`parse_property`]).
    pub extra: BTreeMap<String, String>,
}

impl KafkaClientConfig {
    /// Settings for `bootstrap_servers` with no extra property.
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.into(),
            extra: BTreeMap::new(),
        }
    }

    /// A librdkafka configuration with the bootstrap servers, `base` properties, then the extras.
    fn client_config(&self, base: &[(&str, String)]) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap_servers);
        c.set_log_level(RDKafkaLogLevel::Warning);
        for (k, v) in base {
            c.set(*k, v);
        }
        for (k, v) in &self.extra {
            c.set(k, v);
        }
        c
    }
}

/// librdkafka properties Spillway sets itself, and why an extra property may not change
/// them: what a 202 and an acknowledged message rely on, or what a flag of its own sets.
/// An override applied last used to win without a word (`acks=1` under a 202 that promises
/// `acks=all`, `enable.auto.offset.store=true` committing offsets of messages not yet stored,
/// `linger.ms` silently beating `--kafka-linger-ms`).
const OWNED_PROPERTIES: &[(&str, &str)] = &[
    ("bootstrap.servers", "use --kafka-bootstrap-servers"),
    ("metadata.broker.list", "use --kafka-bootstrap-servers"),
    ("group.id", "use --kafka-group (spillway dlq: --kafka-replay-group)"),
    ("acks", "a 202 promises acks=all"),
    ("request.required.acks", "a 202 promises acks=all"),
    ("enable.idempotence", "a retried publish must not duplicate or reorder"),
    ("enable.auto.offset.store", "an offset is stored only once its message is stored or dead-lettered"),
    ("enable.auto.commit", "stored offsets are committed in the background, by design"),
    ("auto.offset.reset", "a new group reads the topic from its start, or messages published before it joined are skipped"),
    ("enable.partition.eof", "the source does not handle end-of-partition events"),
    ("linger.ms", "use --kafka-linger-ms"),
    ("queue.buffering.max.ms", "use --kafka-linger-ms"),
    ("compression.type", "use --kafka-compression"),
    ("compression.codec", "use --kafka-compression"),
    ("batch.size", "use --kafka-batch-bytes"),
    ("message.timeout.ms", "use --kafka-delivery-timeout-ms"),
    ("delivery.timeout.ms", "use --kafka-delivery-timeout-ms"),
    ("session.timeout.ms", "use --kafka-session-timeout-ms"),
    ("max.poll.interval.ms", "use --kafka-max-poll-interval-ms"),
];

/// Checks that each of `topics` exists on the cluster, asking with a consumer's metadata
/// request (which never creates a topic): `Err` names the first missing one. A cluster that
/// does not answer within `timeout` is not an error here (`Ok(false)`): it may be starting,
/// and the clients retry on their own.
///
/// A worker whose DLQ topic did not exist (the cluster creating no topics on demand) ran
/// anyway: each poison message's letter failed, was retried every few seconds forever,
/// pinned its partition's committed offset and stalled a receive loop for the delivery
/// timeout each time.
///
/// # Errors
/// The topic that does not exist, and what to do.
pub async fn check_topics_exist(
    client: &KafkaClientConfig,
    topics: &[(&str, &str)],
    timeout: std::time::Duration,
) -> Result<bool, String> {
    let mut config = client.client_config(&[("group.id", "spillway-topic-check".into())]);
    // Set after the operator's extras: the check must never create what it looks for.
    config.set("allow.auto.create.topics", "false");
    let topics: Vec<(String, String)> = topics
        .iter()
        .map(|(t, flag)| ((*t).to_owned(), (*flag).to_owned()))
        .collect();
    let checked = tokio::task::spawn_blocking(move || -> Result<bool, String> {
        use rdkafka::consumer::Consumer as _;
        let consumer: rdkafka::consumer::BaseConsumer = config
            .create()
            .map_err(|e| format!("Kafka client configuration: {}", config_error(&e)))?;
        for (topic, flag) in &topics {
            let Ok(metadata) = consumer.fetch_metadata(Some(topic), timeout) else {
                return Ok(false);
            };
            let missing =
                match metadata.topics().first() {
                    None => true,
                    Some(t) => {
                        matches!(
                    t.error(),
                    Some(rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART)
                ) || (t.error().is_none() && t.partitions().is_empty())
                    }
                };
            if missing {
                return Err(format!(
                    "topic {topic:?} ({flag}) does not exist on the cluster: create it \
                     (`spillway setup --broker kafka` prints the commands) or name the right one"
                ));
            }
        }
        Ok(true)
    });
    checked
        .await
        .map_err(|e| format!("checking the topics: {e}"))?
}

/// Parses `KEY=VALUE` (a `--kafka-config` entry).
///
/// # Errors
/// When there is no `=` or the key is empty, or the key is one Spillway sets itself
/// (`acks`, `group.id`, a property with a flag of its own…); the message does not quote the
/// value, which may hold a secret.
pub fn parse_property(raw: &str) -> Result<(String, String), String> {
    match raw.split_once('=') {
        Some((k, _)) if OWNED_PROPERTIES.iter().any(|(owned, _)| *owned == k.trim()) => {
            let (key, why) = OWNED_PROPERTIES
                .iter()
                .find(|(owned, _)| *owned == k.trim())
                .copied()
                .unwrap_or_default();
            Err(format!(
                "{key} is set by Spillway and cannot be overridden: {why}"
            ))
        }
        Some((k, v)) if !k.trim().is_empty() => {
            Ok((k.trim().to_owned(), v.trim_start().to_owned()))
        }
        _ => Err(
            "not KEY=VALUE (a librdkafka property such as security.protocol=ssl; \
                  the entry is not shown, it may hold a secret)"
                .to_owned(),
        ),
    }
}

/// Message attributes as Kafka headers (UTF-8 values).
pub(crate) fn headers_of<'a>(attrs: impl IntoIterator<Item = (&'a str, &'a str)>) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new();
    for (k, v) in attrs {
        headers = headers.insert(Header {
            key: k,
            value: Some(v),
        });
    }
    headers
}

/// Kafka headers as message attributes; non-UTF-8 values are replaced lossily, absent ones
/// become empty strings.
pub(crate) fn attributes_of<H: Headers>(headers: Option<&H>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Some(h) = headers {
        for header in h.iter() {
            let value = header
                .value
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default();
            out.insert(header.key.to_owned(), value);
        }
    }
    out
}

/// Why `payload` is not text, when it is not UTF-8.
pub(crate) fn not_text(payload: &[u8]) -> Option<String> {
    std::str::from_utf8(payload).err().map(|e| {
        format!(
            "the message body is not UTF-8 text (invalid byte at offset {} of {})",
            e.valid_up_to(),
            payload.len()
        )
    })
}

/// A librdkafka error, with the value of a refused configuration property hidden: it may
/// be a key or a password (`ssl.key.pem`, `sasl.password`), and librdkafka's own message
/// quotes it.
pub(crate) fn config_error(e: &rdkafka::error::KafkaError) -> String {
    match e {
        rdkafka::error::KafkaError::ClientConfig(_, description, key, value) => {
            let description = if value.is_empty() {
                description.clone()
            } else {
                description.replace(value.as_str(), "***")
            };
            format!("librdkafka refused the setting {key:?} (value hidden): {description}")
        }
        other => other.to_string(),
    }
}

/// Milliseconds of a duration as librdkafka wants them (a decimal string).
pub(crate) fn millis(d: Duration) -> String {
    d.as_millis().to_string()
}

/// Forwards librdkafka's log lines to `tracing`.
pub(crate) fn log_line(level: RDKafkaLogLevel, fac: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => tracing::error!(facility = fac, "librdkafka: {message}"),
        RDKafkaLogLevel::Warning => tracing::warn!(facility = fac, "librdkafka: {message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(facility = fac, "librdkafka: {message}");
        }
        RDKafkaLogLevel::Debug => tracing::debug!(facility = fac, "librdkafka: {message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_property_needs_a_key_and_an_equals_sign() {
        assert_eq!(
            parse_property("security.protocol = ssl").unwrap(),
            ("security.protocol".into(), "ssl".into())
        );
        assert_eq!(parse_property("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert!(parse_property("novalue").is_err());
        assert!(parse_property("=x").is_err());
    }

    #[test]
    fn compression_names_round_trip() {
        for c in [
            Compression::None,
            Compression::Snappy,
            Compression::Lz4,
            Compression::Zstd,
        ] {
            assert_eq!(c.as_str().parse::<Compression>().unwrap(), c);
        }
        assert!("gzip".parse::<Compression>().is_err());
    }
}
