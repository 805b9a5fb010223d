//! Read-only figures of a topic and a consumer group, for `spillway stats`: per partition the
//! high watermark, the group's committed offset and the lag between them; a topic's depth.
//! Nothing here joins the group or moves an offset.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::KafkaClientConfig;

/// One partition of a topic as a consumer group sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PartitionLag {
    /// Partition number.
    pub partition: i32,
    /// Oldest offset still in the log.
    pub low: i64,
    /// One past the newest offset.
    pub high: i64,
    /// The group's committed position (the next offset it will read), if any.
    pub committed: Option<i64>,
    /// Messages the group has not finished: `high - committed` (or `high - low` when nothing
    /// is committed yet).
    pub lag: i64,
}

fn reader(client: &KafkaClientConfig, group: &str) -> Result<BaseConsumer, KafkaError> {
    client
        .client_config(&[
            ("group.id", group.to_owned()),
            ("enable.auto.commit", "false".into()),
        ])
        .create()
}

fn partitions(
    consumer: &BaseConsumer,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<i32>, KafkaError> {
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    Ok(metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect())
}

/// The lag of `group` on every partition of `topic` (blocking; `timeout` per broker call).
///
/// # Errors
/// When the cluster cannot be reached in time.
pub fn group_lag(
    client: &KafkaClientConfig,
    topic: &str,
    group: &str,
    timeout: Duration,
) -> Result<Vec<PartitionLag>, KafkaError> {
    let consumer = reader(client, group)?;
    let parts = partitions(&consumer, topic, timeout)?;
    let mut tpl = TopicPartitionList::new();
    for p in &parts {
        tpl.add_partition(topic, *p);
    }
    let committed = consumer.committed_offsets(tpl, timeout)?;
    let mut out = Vec::with_capacity(parts.len());
    for p in parts {
        let (low, high) = consumer.fetch_watermarks(topic, p, timeout)?;
        let committed = committed
            .find_partition(topic, p)
            .and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            });
        let lag = (high - committed.unwrap_or(low).max(low)).max(0);
        out.push(PartitionLag {
            partition: p,
            low,
            high,
            committed,
            lag,
        });
    }
    out.sort_by_key(|l| l.partition);
    Ok(out)
}

/// Messages held by `topic` (sum over partitions of high − low watermark; blocking).
///
/// # Errors
/// When the cluster cannot be reached in time.
pub fn topic_depth(
    client: &KafkaClientConfig,
    topic: &str,
    timeout: Duration,
) -> Result<u64, KafkaError> {
    let consumer = reader(client, "spillway-stats")?;
    let mut depth = 0_u64;
    for p in partitions(&consumer, topic, timeout)? {
        let (low, high) = consumer.fetch_watermarks(topic, p, timeout)?;
        depth += u64::try_from(high - low).unwrap_or(0);
    }
    Ok(depth)
}
