//! Kafka fixtures: librdkafka's mock cluster (real protocol, in-process, nothing installed),
//! settings tuned for tests, and a reader that takes a whole topic with its headers.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientConfig;
use shared::kafka::publisher::ProducerConfig;
use shared::kafka::source::ConsumerConfig;
use shared::kafka::{KafkaClientConfig, MockKafka};

/// The topic the fixtures create.
pub const TOPIC: &str = "events";
/// The DLQ topic the fixtures create.
pub const DLQ_TOPIC: &str = "events-dlq";

/// A mock cluster of one broker with [`TOPIC`] (`partitions` partitions) and [`DLQ_TOPIC`].
///
/// # Errors
/// When librdkafka cannot start it.
pub fn mock_cluster(partitions: i32) -> anyhow::Result<MockKafka> {
    Ok(MockKafka::start(
        1,
        &[(TOPIC, partitions), (DLQ_TOPIC, partitions)],
    )?)
}

/// Producer settings for [`TOPIC`] with a short delivery timeout.
pub fn producer_config(bootstrap: &str) -> ProducerConfig {
    ProducerConfig {
        delivery_timeout: Duration::from_secs(10),
        ..ProducerConfig::new(KafkaClientConfig::new(bootstrap), TOPIC)
    }
}

/// Source settings for [`TOPIC`] in `group`, with a short session timeout (so a killed
/// member's partitions move within seconds) and frequent commits.
pub fn consumer_config(bootstrap: &str, group: &str) -> ConsumerConfig {
    let mut c = ConsumerConfig::new(KafkaClientConfig::new(bootstrap), TOPIC, group, DLQ_TOPIC);
    c.session_timeout = Duration::from_secs(6);
    c.commit_interval = Duration::from_millis(200);
    c
}

/// One message read back from a topic.
#[derive(Debug, Clone)]
pub struct ReadMessage {
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Key, as text.
    pub key: Option<String>,
    /// Payload, as text (lossily, when it is not UTF-8).
    pub payload: String,
    /// Payload, as it came.
    pub payload_bytes: Vec<u8>,
    /// Headers, as text.
    pub headers: BTreeMap<String, String>,
}

/// Reads `topic` from the beginning of its `partitions` partitions until `want` messages
/// arrived or `timeout` passed (blocking: run it on a blocking thread).
///
/// # Errors
/// When the cluster cannot be read, or fewer than `want` messages arrive in time.
pub fn read_topic(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    want: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<ReadMessage>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("reader-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .create()
        .context("creating a reader")?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < want {
        if Instant::now() > deadline {
            bail!(
                "read {} of {want} messages from {topic} in {timeout:?}",
                out.len()
            );
        }
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let msg = msg?;
        let mut headers = BTreeMap::new();
        if let Some(h) = msg.headers() {
            for header in h.iter() {
                headers.insert(
                    header.key.to_owned(),
                    String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned(),
                );
            }
        }
        out.push(ReadMessage {
            partition: msg.partition(),
            offset: msg.offset(),
            key: msg.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            payload: String::from_utf8_lossy(msg.payload().unwrap_or_default()).into_owned(),
            payload_bytes: msg.payload().unwrap_or_default().to_vec(),
            headers,
        });
    }
    Ok(out)
}

/// The group's committed offset per partition of `topic` (blocking).
///
/// # Errors
/// When the coordinator cannot be asked.
pub fn committed_offsets(
    bootstrap: &str,
    group: &str,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<BTreeMap<i32, i64>> {
    Ok(committed_metadata(bootstrap, group, topic, partitions)?
        .into_iter()
        .map(|(p, (offset, _))| (p, offset))
        .collect())
}

/// The group's committed offset and commit metadata per partition of `topic` (blocking).
///
/// # Errors
/// When the coordinator cannot be asked.
pub fn committed_metadata(
    bootstrap: &str,
    group: &str,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<BTreeMap<i32, (i64, String)>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let got = consumer.committed_offsets(tpl, Duration::from_secs(10))?;
    Ok(got
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), (o, e.metadata().to_owned()))),
            _ => None,
        })
        .collect())
}

/// Produces `payloads` to `partition` of `topic`, in order, and waits for every delivery.
///
/// # Errors
/// When a delivery fails.
pub async fn produce_to(
    bootstrap: &str,
    topic: &str,
    partition: i32,
    payloads: &[impl AsRef<[u8]>],
) -> anyhow::Result<()> {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .create()?;
    for p in payloads {
        producer
            .send(
                FutureRecord::<(), [u8]>::to(topic)
                    .partition(partition)
                    .payload(p.as_ref()),
                Duration::from_secs(5),
            )
            .await
            .map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?;
    }
    Ok(())
}
