//! The Kafka publisher: envelopes produced to a topic by an idempotent `acks=all` producer;
//! `publish` returns only after every envelope's delivery report came back successful.
//!
//! The message key is the envelope's partition key ([`ATTR_PARTITION_KEY`], a bucket of
//! `(advertiser_id, campaign_id)` set by the packer), so one campaign's events always go to
//! the same partition and, with idempotence (which keeps order across retries), stay in order
//! there. An envelope without that attribute is keyed by its tenant: coarser, still ordered.
//! Attributes travel as headers.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::ClientContext;
use tokio::time::Instant;

use super::{headers_of, log_line, millis, Compression, KafkaClientConfig};
use crate::envelope::{Envelope, ATTR_PARTITION_KEY, ATTR_TENANT};
use crate::publisher::{PublishError, PublishReport, Publisher};

/// How long a publish waits for room in a full producer queue before failing.
const QUEUE_FULL_WAIT: Duration = Duration::from_secs(5);
/// How long a readiness probe waits for topic metadata.
const READY_TIMEOUT: Duration = Duration::from_secs(5);

/// Producer settings.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    /// Connection.
    pub client: KafkaClientConfig,
    /// Topic envelopes are produced to.
    pub topic: String,
    /// `compression.type`. Default lz4.
    pub compression: Compression,
    /// `linger.ms`: how long the producer waits to fill a batch. Default 5 ms.
    pub linger: Duration,
    /// `batch.size`: most bytes in one batch per partition. Default 1,000,000.
    pub batch_bytes: usize,
    /// `message.timeout.ms`: how long librdkafka retries a message before reporting it failed
    /// (the longest a publish can take). Default 10 s.
    pub delivery_timeout: Duration,
}

impl ProducerConfig {
    /// Defaults for `topic` on `client`.
    pub fn new(client: KafkaClientConfig, topic: impl Into<String>) -> Self {
        Self {
            client,
            topic: topic.into(),
            compression: Compression::default(),
            linger: Duration::from_millis(5),
            batch_bytes: 1_000_000,
            delivery_timeout: Duration::from_secs(10),
        }
    }

    /// The librdkafka producer configuration, with `acks=all` and `enable.idempotence=true`
    /// (what a 2xx relies on). The extras are applied last; `--kafka-config` refuses the
    /// properties set here ([`super::parse_property`]).
    pub(crate) fn client_config(&self) -> rdkafka::ClientConfig {
        self.client.client_config(&[
            ("acks", "all".into()),
            ("enable.idempotence", "true".into()),
            ("compression.type", self.compression.as_str().into()),
            ("linger.ms", millis(self.linger)),
            ("batch.size", self.batch_bytes.to_string()),
            ("message.timeout.ms", millis(self.delivery_timeout)),
            // A request in flight does not time out before request.timeout.ms (30 s by
            // default), which would stretch a publish well past the delivery timeout.
            (
                "request.timeout.ms",
                millis(self.delivery_timeout.min(Duration::from_secs(30))),
            ),
        ])
    }
}

/// Sends librdkafka's logs to `tracing`.
#[derive(Debug, Clone, Copy, Default)]
pub struct TracingContext;

impl ClientContext for TracingContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_line(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(error = %error, reason, "Kafka client error");
    }
}

/// Produces envelopes to a Kafka topic. Clones share one producer.
#[derive(Clone)]
pub struct KafkaPublisher {
    producer: FutureProducer<TracingContext>,
    topic: Arc<str>,
}

impl std::fmt::Debug for KafkaPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaPublisher")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl KafkaPublisher {
    /// A producer for `config` (it connects lazily).
    ///
    /// # Errors
    /// [`PublishError::Rejected`] when librdkafka refuses the configuration.
    pub fn new(config: &ProducerConfig) -> Result<Self, PublishError> {
        let producer = config
            .client_config()
            .create_with_context(TracingContext)
            .map_err(|e| PublishError::Rejected {
                destination: config.topic.clone(),
                message: format!("producer configuration: {}", super::config_error(&e)),
            })?;
        Ok(Self {
            producer,
            topic: config.topic.as_str().into(),
        })
    }

    /// The topic it produces to.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    fn error(&self, e: &KafkaError) -> PublishError {
        let permanent = matches!(
            e.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::MessageSizeTooLarge
                    | RDKafkaErrorCode::InvalidMessageSize
                    | RDKafkaErrorCode::TopicAuthorizationFailed
                    | RDKafkaErrorCode::InvalidTopic
            )
        );
        let message = e.to_string();
        let destination = self.topic.to_string();
        if permanent {
            PublishError::Rejected {
                destination,
                message,
            }
        } else {
            PublishError::Unavailable {
                destination,
                message,
            }
        }
    }
}

/// The key of an envelope: its partition key, else its tenant.
pub fn envelope_key(env: &Envelope) -> &str {
    env.attributes
        .get(ATTR_PARTITION_KEY)
        .or_else(|| env.attributes.get(ATTR_TENANT))
        .map_or("", String::as_str)
}

#[async_trait]
impl Publisher for KafkaPublisher {
    async fn publish(&self, envelopes: &[Envelope]) -> Result<PublishReport, PublishError> {
        // Enqueue everything first (librdkafka batches per partition), then wait for every
        // delivery report; a full local queue is waited out for a bounded time.
        let mut pending = Vec::with_capacity(envelopes.len());
        for env in envelopes {
            let mut record = FutureRecord::to(&self.topic)
                .key(envelope_key(env))
                .payload(env.body.as_str())
                .headers(headers_of(
                    env.attributes.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                ));
            let give_up = Instant::now() + QUEUE_FULL_WAIT;
            loop {
                match self.producer.send_result(record) {
                    Ok(delivery) => {
                        pending.push(delivery);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                        if Instant::now() < give_up =>
                    {
                        record = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => return Err(self.error(&e)),
                }
            }
        }
        let mut failure = None;
        for delivery in pending {
            let result = match delivery.await {
                Ok(Ok(_)) => continue,
                Ok(Err((e, _))) => self.error(&e),
                Err(_) => PublishError::Unavailable {
                    destination: self.topic.to_string(),
                    message: "the producer dropped the delivery report".into(),
                },
            };
            // Keep waiting for the others, so none is left in flight unobserved.
            failure.get_or_insert(result);
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(PublishReport::of(envelopes, 1)),
        }
    }

    async fn ready(&self) -> Result<(), PublishError> {
        // An idempotent producer in librdkafka's fatal state (a producer id the cluster
        // refused, a fenced epoch) fails every publish from then on, while metadata still
        // answers: the process was "ready" and answered 503 for good, and nothing replaced it.
        if let Some(reason) = self.broken() {
            return Err(PublishError::Unavailable {
                destination: self.topic.to_string(),
                message: format!("{reason}; restart the process"),
            });
        }
        let producer = self.producer.clone();
        let topic = Arc::clone(&self.topic);
        let metadata = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(Some(&topic), READY_TIMEOUT)
        })
        .await
        .map_err(|e| PublishError::Unavailable {
            destination: self.topic.to_string(),
            message: e.to_string(),
        })?
        .map_err(|e| self.error(&e))?;
        match metadata.topics().first() {
            Some(t) if t.error().is_none() && !t.partitions().is_empty() => Ok(()),
            _ => Err(PublishError::Unavailable {
                destination: self.topic.to_string(),
                message: "topic has no partitions (does it exist?)".into(),
            }),
        }
    }

    fn broken(&self) -> Option<String> {
        self.producer.client().fatal_error().map(|(code, reason)| {
            format!("the Kafka producer hit a fatal error ({code:?}: {reason}) and cannot publish again")
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// librdkafka quotes a refused value in its error; it may be a key or a password.
    #[test]
    fn a_refused_setting_is_named_without_its_value() {
        let mut refused = 0;
        for (key, value) in [("acks", "s3cret-value"), ("sasl.password", "s3cret-value")] {
            let mut client = KafkaClientConfig::new("127.0.0.1:1");
            client.extra.insert(key.into(), value.into());
            let Err(err) = KafkaPublisher::new(&ProducerConfig::new(client, "t")) else {
                continue; // librdkafka took this one
            };
            refused += 1;
            let err = err.to_string();
            assert!(!err.contains("s3cret"), "{err}");
            assert!(err.contains("value hidden") && err.contains(key), "{err}");
        }
        assert!(refused >= 1, "an invalid acks value must be refused");
    }

    fn envelope(attrs: &[(&str, &str)]) -> Envelope {
        Envelope {
            body: String::new(),
            attributes: attrs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>(),
            event_count: 0,
        }
    }

    #[test]
    fn the_key_is_the_partition_key_else_the_tenant() {
        let keyed = envelope(&[(ATTR_PARTITION_KEY, "17"), (ATTR_TENANT, "acme")]);
        assert_eq!(envelope_key(&keyed), "17");
        assert_eq!(envelope_key(&envelope(&[(ATTR_TENANT, "acme")])), "acme");
        assert_eq!(envelope_key(&envelope(&[])), "");
    }

    #[test]
    fn acks_all_and_idempotence_are_set() {
        let c = ProducerConfig::new(KafkaClientConfig::new("127.0.0.1:9"), "t").client_config();
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(c.get("enable.idempotence"), Some("true"));
        assert_eq!(c.get("compression.type"), Some("lz4"));
    }
}
