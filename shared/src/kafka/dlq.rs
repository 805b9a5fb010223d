//! The dead-letter port ([`DlqBroker`]) on Kafka: `spillway dlq` over a DLQ topic.
//!
//! A Kafka topic is a log: nothing is deleted from it. What the port calls the DLQ's content
//! is what the **replay group** (`spillway-dlq-replay` by default, its own consumer group) has
//! not moved yet:
//! - `lease` reads forward from the group's committed position (up to the end the topic had at
//!   the first lease of the run); a lease is an offset read and not yet settled;
//! - `delete` marks offsets moved and commits the group's position up to the first offset not
//!   moved, **with the offsets moved beyond it in the commit's metadata** (ranges such as
//!   `12-40,43`), so a rerun neither resends what was moved past a skipped message nor loses
//!   the skipped one;
//! - `release` hands an offset back (the next lease of this process returns it again; a later
//!   run reads it again because the position never passed it);
//! - `stats` is the group's lag minus what the metadata says was moved; `peek` reads the same
//!   messages without leasing; `purge` commits the position at the end (the log itself is
//!   trimmed by the topic's retention);
//! - `send`/`publish` produce (idempotent, `acks=all`, keyed like the publisher) and report
//!   which deliveries failed.
//!
//! One replay per group at a time: two concurrent runs in the same group would lease the same
//! offsets (their sends are still harmless downstream, `event_id` being the idempotency key).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::publisher::{ProducerConfig, TracingContext};
use super::tracker::PartitionTracker;
use super::{attributes_of, headers_of, KafkaClientConfig};
use crate::dlq::{
    Calls, DlqBroker, DlqError, DlqMessage, DlqStats, LeasedMessage, Outgoing, SendOutcome,
};
use crate::envelope::{ATTR_PARTITION_KEY, ATTR_TENANT};
use crate::source::DeliveryId;

/// Default consumer group that tracks what was replayed.
pub const DEFAULT_REPLAY_GROUP: &str = "spillway-dlq-replay";
/// Most messages one lease returns.
const MAX_BATCH: usize = 500;
/// How long broker calls (metadata, watermarks, commits) may take.
const BROKER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a lease waits for the next message before it returns what it has, when the end
/// of the topic is not reached yet.
const LEASE_WAIT: Duration = Duration::from_secs(5);

/// The port on Kafka.
pub struct KafkaDlq {
    client: KafkaClientConfig,
    group: String,
    source_topic: Option<String>,
    producer: FutureProducer<TracingContext>,
    /// Per DLQ topic: the lease consumer and what it has handed out.
    leases: Mutex<HashMap<String, Arc<Mutex<LeaseState>>>>,
    calls: Calls,
}

impl std::fmt::Debug for KafkaDlq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaDlq")
            .field("group", &self.group)
            .field("source_topic", &self.source_topic)
            .finish_non_exhaustive()
    }
}

struct LeaseState {
    topic: String,
    consumer: BaseConsumer,
    /// End of each partition when the run started: a lease never reads past it, so letters
    /// dead-lettered during the run (a replay that fails again) wait for the next run.
    ends: BTreeMap<i32, i64>,
    parts: BTreeMap<i32, PartLease>,
    released: VecDeque<(i32, i64)>,
}

#[derive(Default)]
struct PartLease {
    tracker: PartitionTracker,
    /// Committed position (next offset the group reads).
    committed: i64,
    /// Offsets at or after `committed` already moved (from the commit metadata, then ours).
    moved: BTreeSet<i64>,
    /// Leased and not settled.
    leased: HashMap<i64, DlqMessage>,
    /// Whether the reader reached `ends` on this partition.
    at_end: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `12-40,43` ⇄ {12, …, 40, 43}.
fn encode_ranges(set: &BTreeSet<i64>) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut it = set.iter().copied().peekable();
    while let Some(start) = it.next() {
        let mut end = start;
        while it.peek() == Some(&(end + 1)) {
            end += 1;
            it.next();
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
    }
    out.join(",")
}

fn decode_ranges(raw: &str) -> BTreeSet<i64> {
    let mut out = BTreeSet::new();
    for part in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        if let (Ok(a), Ok(b)) = (a.parse::<i64>(), b.parse::<i64>()) {
            // A corrupt or hostile range must not make us allocate forever.
            if a <= b && b - a <= 10_000_000 {
                out.extend(a..=b);
            }
        }
    }
    out
}

fn receipt(partition: i32, offset: i64) -> DeliveryId {
    DeliveryId(format!("{partition}:{offset}"))
}

fn parse_receipt(id: &DeliveryId) -> Option<(i32, i64)> {
    let (p, o) = id.0.split_once(':')?;
    Some((p.parse().ok()?, o.parse().ok()?))
}

impl KafkaDlq {
    /// The port on `client`, tracking replays in `group`; `source_topic` is where
    /// `--to source` replays to (the workers' topic).
    ///
    /// # Errors
    /// [`DlqError::Invalid`] when librdkafka refuses the producer configuration.
    pub fn new(
        client: KafkaClientConfig,
        group: impl Into<String>,
        source_topic: Option<String>,
    ) -> Result<Self, DlqError> {
        let producer = ProducerConfig::new(client.clone(), "-")
            .client_config()
            .create_with_context(TracingContext)
            .map_err(|e| DlqError::Invalid(format!("Kafka producer configuration: {e}")))?;
        Ok(Self {
            client,
            group: group.into(),
            source_topic,
            producer,
            leases: Mutex::new(HashMap::new()),
            calls: Calls::default(),
        })
    }

    fn error(operation: &str, resource: &str, e: &KafkaError) -> DlqError {
        match e.rdkafka_error_code() {
            Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => {
                DlqError::NotFound {
                    what: "topic",
                    name: resource.to_owned(),
                    detail: e.to_string(),
                }
            }
            Some(
                RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::GroupAuthorizationFailed,
            ) => DlqError::Forbidden {
                operation: operation.to_owned(),
                resource: resource.to_owned(),
                detail: e.to_string(),
            },
            Some(
                RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::OffsetMetadataTooLarge,
            ) => DlqError::Rejected {
                operation: operation.to_owned(),
                resource: resource.to_owned(),
                detail: e.to_string(),
            },
            _ => DlqError::Unreachable {
                operation: operation.to_owned(),
                resource: resource.to_owned(),
                detail: e.to_string(),
            },
        }
    }

    /// A consumer in the replay group that never commits by itself.
    fn group_consumer(&self, topic: &str) -> Result<BaseConsumer, DlqError> {
        Self::consumer_for(&self.client, &self.group, topic)
    }

    fn consumer_for(
        client: &KafkaClientConfig,
        group: &str,
        topic: &str,
    ) -> Result<BaseConsumer, DlqError> {
        client
            .client_config(&[
                ("group.id", group.to_owned()),
                ("enable.auto.commit", "false".into()),
                ("enable.auto.offset.store", "false".into()),
                ("enable.partition.eof", "false".into()),
            ])
            .create()
            .map_err(|e| Self::error("create consumer", topic, &e))
    }

    /// Partitions, watermarks and the group's committed position (with moved offsets) of
    /// `topic` (blocking).
    fn positions(
        consumer: &BaseConsumer,
        topic: &str,
    ) -> Result<BTreeMap<i32, (i64, i64, PartLease)>, DlqError> {
        let metadata = consumer
            .fetch_metadata(Some(topic), BROKER_TIMEOUT)
            .map_err(|e| Self::error("metadata", topic, &e))?;
        let t = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .filter(|t| t.error().is_none() && !t.partitions().is_empty())
            .ok_or_else(|| DlqError::NotFound {
                what: "topic",
                name: topic.to_owned(),
                detail: "no such topic on the cluster".into(),
            })?;
        let mut tpl = TopicPartitionList::new();
        for p in t.partitions() {
            tpl.add_partition(topic, p.id());
        }
        let committed = consumer
            .committed_offsets(tpl, BROKER_TIMEOUT)
            .map_err(|e| Self::error("committed offsets", topic, &e))?;
        let mut out = BTreeMap::new();
        for p in t.partitions() {
            let (low, high) = consumer
                .fetch_watermarks(topic, p.id(), BROKER_TIMEOUT)
                .map_err(|e| Self::error("watermarks", topic, &e))?;
            let (position, moved) = match committed.find_partition(topic, p.id()) {
                Some(e) => match e.offset() {
                    Offset::Offset(o) => (o.max(low), decode_ranges(e.metadata())),
                    _ => (low, BTreeSet::new()),
                },
                None => (low, BTreeSet::new()),
            };
            let moved = moved.into_iter().filter(|o| *o >= position).collect();
            out.insert(
                p.id(),
                (
                    low,
                    high,
                    PartLease {
                        committed: position,
                        moved,
                        ..PartLease::default()
                    },
                ),
            );
        }
        Ok(out)
    }

    /// The lease consumer of `topic`, assigned at the group's position (blocking).
    fn new_lease_state(
        client: &KafkaClientConfig,
        group: &str,
        topic: &str,
    ) -> Result<LeaseState, DlqError> {
        let consumer = Self::consumer_for(client, group, topic)?;
        let positions = Self::positions(&consumer, topic)?;
        let mut tpl = TopicPartitionList::new();
        let mut ends = BTreeMap::new();
        let mut parts = BTreeMap::new();
        for (p, (_, high, mut lease)) in positions {
            tpl.add_partition_offset(topic, p, Offset::Offset(lease.committed))
                .map_err(|e| Self::error("assign", topic, &e))?;
            lease.at_end = lease.committed >= high;
            ends.insert(p, high);
            parts.insert(p, lease);
        }
        consumer
            .assign(&tpl)
            .map_err(|e| Self::error("assign", topic, &e))?;
        Ok(LeaseState {
            topic: topic.to_owned(),
            consumer,
            ends,
            parts,
            released: VecDeque::new(),
        })
    }

    /// Commits the group's position of the partitions in `touched` (blocking).
    fn commit(state: &LeaseState, touched: &BTreeSet<i32>) -> Result<(), DlqError> {
        let mut tpl = TopicPartitionList::new();
        for p in touched {
            let Some(part) = state.parts.get(p) else {
                continue;
            };
            let position = part.tracker.stored().unwrap_or(part.committed);
            tpl.add_partition_offset(&state.topic, *p, Offset::Offset(position))
                .map_err(|e| Self::error("commit", &state.topic, &e))?;
            let above: BTreeSet<i64> = part.moved.range(position..).copied().collect();
            if let Some(e) = tpl.find_partition(&state.topic, *p).as_mut() {
                e.set_metadata(encode_ranges(&above));
            }
        }
        if tpl.count() == 0 {
            return Ok(());
        }
        state
            .consumer
            .commit(&tpl, CommitMode::Sync)
            .map_err(|e| Self::error("commit", &state.topic, &e))
    }

    fn message(msg: &rdkafka::message::BorrowedMessage<'_>) -> DlqMessage {
        DlqMessage {
            message_id: format!("{}:{}:{}", msg.topic(), msg.partition(), msg.offset()),
            body: msg
                .payload()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default(),
            attributes: attributes_of(msg.headers()),
            receive_count: 0,
            sent_at_ms: msg.timestamp().to_millis(),
            group_id: None,
            dedup_id: None,
        }
    }

    /// Reads forward for the lease (blocking).
    fn lease_blocking(state: &mut LeaseState, max: usize) -> Result<Vec<LeasedMessage>, DlqError> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some((p, o)) = state.released.pop_front() else {
                break;
            };
            if let Some(m) = state.parts.get_mut(&p).and_then(|l| l.leased.get_mut(&o)) {
                m.receive_count += 1;
                out.push(LeasedMessage {
                    receipt: receipt(p, o),
                    message: m.clone(),
                });
            }
        }
        let mut waited_since = Instant::now();
        while out.len() < max && state.parts.values().any(|l| !l.at_end) {
            if waited_since.elapsed() > LEASE_WAIT {
                break;
            }
            let Some(msg) = state.consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            let msg = msg.map_err(|e| Self::error("read", &state.topic, &e))?;
            waited_since = Instant::now();
            let (p, o) = (msg.partition(), msg.offset());
            let end = state.ends.get(&p).copied().unwrap_or(0);
            let Some(part) = state.parts.get_mut(&p) else {
                continue;
            };
            if o >= end {
                part.at_end = true;
                continue;
            }
            if o + 1 >= end {
                part.at_end = true;
            }
            if !part.tracker.received(o) {
                continue;
            }
            if part.moved.contains(&o) {
                // Moved by an earlier run, after an offset it skipped: settled already.
                part.tracker.done(o);
                continue;
            }
            let mut m = Self::message(&msg);
            m.receive_count = 1;
            part.leased.insert(o, m.clone());
            out.push(LeasedMessage {
                receipt: receipt(p, o),
                message: m,
            });
        }
        Ok(out)
    }

    fn key_of(out: &Outgoing) -> Option<&str> {
        out.attributes
            .get(ATTR_PARTITION_KEY)
            .or_else(|| out.attributes.get(ATTR_TENANT))
            .map(String::as_str)
    }

    async fn produce(&self, topic: &str, messages: &[Outgoing]) -> Result<SendOutcome, DlqError> {
        self.calls.count("Produce");
        let mut outcome = SendOutcome::default();
        let mut pending = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            let mut record = FutureRecord::to(topic)
                .payload(m.body.as_str())
                .headers(headers_of(
                    m.attributes.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                ));
            if let Some(k) = Self::key_of(m) {
                record = record.key(k);
            }
            match self.producer.send_result(record) {
                Ok(d) => pending.push((i, d)),
                Err((e, _)) => outcome.failed.push((i, e.to_string())),
            }
        }
        for (i, d) in pending {
            match d.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => outcome.failed.push((i, e.to_string())),
                Err(_) => outcome
                    .failed
                    .push((i, "the producer dropped the delivery report".into())),
            }
        }
        outcome.failed.sort_by_key(|f| f.0);
        if !messages.is_empty() && outcome.failed.len() == messages.len() {
            return Err(DlqError::Unreachable {
                operation: "produce".into(),
                resource: topic.to_owned(),
                detail: outcome.failed[0].1.clone(),
            });
        }
        Ok(outcome)
    }

    async fn blocking<T, F>(f: F) -> Result<T, DlqError>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T, DlqError> + Send + 'static,
    {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| DlqError::Invalid(format!("blocking task failed: {e}")))?
    }
}

#[async_trait]
impl DlqBroker for KafkaDlq {
    fn kind(&self) -> &'static str {
        "kafka"
    }

    fn max_batch(&self) -> usize {
        MAX_BATCH
    }

    async fn stats(&self, queue: &str) -> Result<DlqStats, DlqError> {
        self.calls.count("Stats");
        let consumer = self.group_consumer(queue)?;
        let topic = queue.to_owned();
        let positions = Self::blocking(move || Self::positions(&consumer, &topic)).await?;
        let in_flight: u64 = lock(&self.leases).get(queue).map_or(0, |s| {
            lock(s).parts.values().map(|p| p.leased.len() as u64).sum()
        });
        let waiting: u64 = positions
            .values()
            .map(|(_, high, l)| {
                let span = u64::try_from(high - l.committed).unwrap_or(0);
                span.saturating_sub(l.moved.range(..high).count() as u64)
            })
            .sum();
        Ok(DlqStats {
            visible: waiting.saturating_sub(in_flight),
            in_flight,
            delayed: 0,
            oldest_age_secs: None,
        })
    }

    async fn peek(&self, queue: &str, max: usize) -> Result<Vec<DlqMessage>, DlqError> {
        self.calls.count("Peek");
        let consumer = self.group_consumer(queue)?;
        let topic = queue.to_owned();
        Self::blocking(move || {
            let positions = Self::positions(&consumer, &topic)?;
            let mut tpl = TopicPartitionList::new();
            let mut left: BTreeMap<i32, (i64, BTreeSet<i64>)> = BTreeMap::new();
            for (p, (_, high, l)) in positions {
                if l.committed < high {
                    tpl.add_partition_offset(&topic, p, Offset::Offset(l.committed))
                        .map_err(|e| Self::error("assign", &topic, &e))?;
                    left.insert(p, (high, l.moved));
                }
            }
            let mut out = Vec::new();
            if left.is_empty() {
                return Ok(out);
            }
            consumer
                .assign(&tpl)
                .map_err(|e| Self::error("assign", &topic, &e))?;
            let deadline = Instant::now() + LEASE_WAIT;
            while out.len() < max && !left.is_empty() && Instant::now() < deadline {
                let Some(msg) = consumer.poll(Duration::from_millis(100)) else {
                    continue;
                };
                let msg = msg.map_err(|e| Self::error("read", &topic, &e))?;
                let (p, o) = (msg.partition(), msg.offset());
                let Some((high, moved)) = left.get(&p) else {
                    continue;
                };
                let (high, skip) = (*high, moved.contains(&o));
                if o + 1 >= high {
                    left.remove(&p);
                }
                if o < high && !skip {
                    out.push(Self::message(&msg));
                }
            }
            Ok(out)
        })
        .await
    }

    async fn lease(
        &self,
        queue: &str,
        max: usize,
        _lease: Duration,
    ) -> Result<Vec<LeasedMessage>, DlqError> {
        self.calls.count("Lease");
        let existing = lock(&self.leases).get(queue).cloned();
        let state = match existing {
            Some(s) => s,
            None => {
                let (client, group, topic) =
                    (self.client.clone(), self.group.clone(), queue.to_owned());
                let built = Arc::new(Mutex::new(
                    Self::blocking(move || Self::new_lease_state(&client, &group, &topic)).await?,
                ));
                Arc::clone(lock(&self.leases).entry(queue.to_owned()).or_insert(built))
            }
        };
        let max = max.clamp(1, MAX_BATCH);
        Self::blocking(move || Self::lease_blocking(&mut lock(&state), max)).await
    }

    async fn release(&self, queue: &str, receipts: &[DeliveryId]) -> Result<(), DlqError> {
        self.calls.count("Release");
        let Some(state) = lock(&self.leases).get(queue).cloned() else {
            return Ok(());
        };
        let mut st = lock(&state);
        for r in receipts {
            if let Some((p, o)) = parse_receipt(r) {
                if st.parts.get(&p).is_some_and(|l| l.leased.contains_key(&o)) {
                    st.released.push_back((p, o));
                }
            }
        }
        Ok(())
    }

    async fn delete(&self, queue: &str, receipts: &[DeliveryId]) -> Result<usize, DlqError> {
        self.calls.count("Commit");
        let Some(state) = lock(&self.leases).get(queue).cloned() else {
            return Ok(receipts.len());
        };
        let receipts = receipts.to_vec();
        Self::blocking(move || {
            let mut st = lock(&state);
            let mut stale = 0;
            let mut touched = BTreeSet::new();
            for r in &receipts {
                let Some((p, o)) = parse_receipt(r) else {
                    stale += 1;
                    continue;
                };
                let Some(part) = st.parts.get_mut(&p) else {
                    stale += 1;
                    continue;
                };
                if part.leased.remove(&o).is_none() {
                    stale += 1;
                    continue;
                }
                part.moved.insert(o);
                part.tracker.done(o);
                touched.insert(p);
            }
            st.released
                .retain(|(p, o)| !receipts.contains(&receipt(*p, *o)));
            Self::commit(&st, &touched)?;
            Ok(stale)
        })
        .await
    }

    async fn send(&self, queue: &str, messages: &[Outgoing]) -> Result<SendOutcome, DlqError> {
        self.produce(queue, messages).await
    }

    async fn publish(&self, topic: &str, messages: &[Outgoing]) -> Result<SendOutcome, DlqError> {
        self.produce(topic, messages).await
    }

    async fn purge(&self, queue: &str) -> Result<Option<u64>, DlqError> {
        self.calls.count("Purge");
        let consumer = self.group_consumer(queue)?;
        let topic = queue.to_owned();
        Self::blocking(move || {
            let positions = Self::positions(&consumer, &topic)?;
            let mut tpl = TopicPartitionList::new();
            let mut purged = 0_u64;
            for (p, (_, high, l)) in positions {
                let span = u64::try_from(high - l.committed).unwrap_or(0);
                purged += span.saturating_sub(l.moved.range(..high).count() as u64);
                tpl.add_partition_offset(&topic, p, Offset::Offset(high))
                    .map_err(|e| Self::error("purge", &topic, &e))?;
            }
            consumer
                .commit(&tpl, CommitMode::Sync)
                .map_err(|e| Self::error("purge", &topic, &e))?;
            Ok(Some(purged))
        })
        .await
    }

    async fn source_queues(&self, _dlq: &str) -> Result<Vec<String>, DlqError> {
        Ok(self.source_topic.iter().cloned().collect())
    }

    async fn is_topic(&self, name: &str) -> Result<bool, DlqError> {
        let consumer = self.group_consumer(name)?;
        let topic = name.to_owned();
        Self::blocking(move || {
            let metadata = consumer
                .fetch_metadata(Some(&topic), BROKER_TIMEOUT)
                .map_err(|e| Self::error("metadata", &topic, &e))?;
            let exists = metadata
                .topics()
                .iter()
                .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty());
            if exists {
                Ok(true)
            } else {
                Err(DlqError::NotFound {
                    what: "topic",
                    name: topic,
                    detail: "no such topic on the cluster".into(),
                })
            }
        })
        .await
    }

    fn calls(&self) -> BTreeMap<&'static str, u64> {
        self.calls.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moved_offsets_round_trip_as_ranges() {
        let set: BTreeSet<i64> = [3, 4, 5, 9, 11, 12].into_iter().collect();
        assert_eq!(encode_ranges(&set), "3-5,9,11-12");
        assert_eq!(decode_ranges("3-5,9,11-12"), set);
        assert!(decode_ranges("").is_empty());
        assert!(decode_ranges("garbage,5-1").is_empty());
    }

    #[test]
    fn receipts_round_trip() {
        assert_eq!(parse_receipt(&receipt(2, 40)), Some((2, 40)));
        assert_eq!(parse_receipt(&DeliveryId("x".into())), None);
    }
}
