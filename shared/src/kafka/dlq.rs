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
//! - that metadata is bounded (Kafka refuses a commit whose metadata exceeds the broker's
//!   `offset.metadata.max.bytes`, 4,096 bytes by default): before a batch is sent, `admit`
//!   refuses the letters whose move past a letter the run leaves would not fit, and the
//!   partition is read no further in this run;
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
use super::{attributes_of, headers_of, not_text, KafkaClientConfig};
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
/// Most bytes of moved-offset ranges a commit's metadata carries: the broker refuses a commit
/// whose metadata exceeds its `offset.metadata.max.bytes` (4,096 by default) with
/// `OFFSET_METADATA_TOO_LARGE`, so a commit that would need more is never sent.
const MAX_METADATA_BYTES: usize = 4_000;
/// Most bytes of metadata the letters admitted for moving may need once the run is over:
/// below [`MAX_METADATA_BYTES`] so that an intermediate commit, which also has holes where
/// batches of other loops are still in flight, fits too.
const ADMIT_METADATA_BYTES: usize = 3_000;

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
    leased: BTreeMap<i64, DlqMessage>,
    /// Leased offsets admitted for moving (about to be sent), not settled yet.
    admitted: BTreeSet<i64>,
    /// Whether the reader reached `ends` on this partition.
    at_end: bool,
    /// Whether a letter was refused because the commit metadata is full: the partition is
    /// read no further in this run.
    full: bool,
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

/// Characters of `o` in decimal.
fn digits(o: i64) -> usize {
    let magnitude = o
        .unsigned_abs()
        .checked_ilog10()
        .map_or(1, |d| d as usize + 1);
    magnitude + usize::from(o < 0)
}

/// Length of [`encode_ranges`] of the ascending, distinct offsets `offsets`, without building
/// the text.
fn encoded_len(offsets: impl Iterator<Item = i64>) -> usize {
    let range_len = |(a, b): (i64, i64)| {
        if a == b {
            digits(a)
        } else {
            digits(a) + 1 + digits(b)
        }
    };
    let mut len = 0;
    let mut run: Option<(i64, i64)> = None;
    for o in offsets {
        run = match run {
            Some((a, b)) if b.checked_add(1) == Some(o) => Some((a, o)),
            Some(r) => {
                len += range_len(r) + 1;
                Some((o, o))
            }
            None => Some((o, o)),
        };
    }
    len + run.map_or(0, range_len)
}

/// The offsets at or after `from` in `a` or `b`, ascending and distinct.
fn union_from<'a>(
    a: &'a BTreeSet<i64>,
    b: &'a BTreeSet<i64>,
    from: i64,
) -> impl Iterator<Item = i64> + 'a {
    let mut a = a.range(from..).copied().peekable();
    let mut b = b.range(from..).copied().peekable();
    std::iter::from_fn(move || match (a.peek().copied(), b.peek().copied()) {
        (Some(x), Some(y)) if x == y => {
            b.next();
            a.next()
        }
        (Some(x), Some(y)) if y < x => b.next(),
        (Some(_), _) => a.next(),
        (None, _) => b.next(),
    })
}

/// How much [`encode_ranges`] of a set grows when `o`, absent from it, is inserted; `has`
/// says which offsets the set holds, `empty` whether it holds none.
fn insert_cost(has: impl Fn(i64) -> bool, empty: bool, o: i64) -> isize {
    let d = |x: i64| digits(x) as isize;
    let (left, right) = (has(o - 1), has(o + 1));
    match (left, right) {
        (false, false) if empty => d(o),
        // A new entry and its comma.
        (false, false) => d(o) + 1,
        // `a-(o-1)` becomes `a-o`; a lone `o-1` becomes `(o-1)-o`.
        (true, false) if has(o - 2) => d(o) - d(o - 1),
        (true, false) => 1 + d(o),
        (false, true) if has(o + 2) => d(o) - d(o + 1),
        (false, true) => 1 + d(o),
        // Two entries merge into one: `…(o-1),(o+1)…` becomes `…-…`.
        (true, true) => match (has(o - 2), has(o + 2)) {
            (false, false) => 0,
            (true, false) => -(d(o - 1) + 1),
            (false, true) => -(d(o + 1) + 1),
            (true, true) => -(d(o - 1) + d(o + 1) + 2),
        },
    }
}

/// Admits `offsets` (leased on one partition, about to be sent) for moving, and returns those
/// it refuses (ascending) with the offset the position stays at.
///
/// The group's position cannot pass the lowest leased letter that is not admitted (`hold`: a
/// letter the run may leave, such as one the filter skips), so every letter moved past it
/// ends up in the commit metadata. A letter below `hold` costs nothing; one above it is
/// admitted only while the metadata of everything moved or admitted past `hold` stays within
/// [`ADMIT_METADATA_BYTES`]. After a refusal the partition is `full`.
fn admit_part(part: &mut PartLease, offsets: &[i64]) -> (Vec<i64>, Option<i64>) {
    let mut fresh: Vec<i64> = offsets
        .iter()
        .copied()
        .filter(|o| part.leased.contains_key(o) && !part.admitted.contains(o))
        .collect();
    fresh.sort_unstable();
    fresh.dedup();
    let hold = part
        .leased
        .keys()
        .copied()
        .find(|o| !part.admitted.contains(o) && fresh.binary_search(o).is_err());
    let Some(hold) = hold else {
        part.admitted.extend(fresh);
        return (Vec::new(), None);
    };
    let mut len = encoded_len(union_from(&part.moved, &part.admitted, hold));
    let mut refused = Vec::new();
    for o in fresh {
        if o < hold {
            part.admitted.insert(o);
            continue;
        }
        let cost = {
            let has = |x: i64| x > hold && (part.moved.contains(&x) || part.admitted.contains(&x));
            insert_cost(has, len == 0, o)
        };
        let after = len.saturating_add_signed(cost);
        if after <= ADMIT_METADATA_BYTES {
            part.admitted.insert(o);
            len = after;
        } else {
            refused.push(o);
        }
    }
    if !refused.is_empty() {
        part.full = true;
    }
    (refused, Some(hold))
}

/// The commit metadata of `part` once `done` (leased offsets now moved) are settled: the
/// position it would commit and the length of the ranges moved past it.
fn metadata_if_done(part: &PartLease, done: &BTreeSet<i64>) -> (i64, usize) {
    let stored = part.tracker.stored().unwrap_or(part.committed);
    let position = part
        .tracker
        .position_if_done(done)
        .map_or(stored, |p| p.max(stored));
    (
        position,
        encoded_len(union_from(&part.moved, done, position)),
    )
}

/// Marks `done` (leased offsets of `part`, now at their destination) moved.
fn settle(part: &mut PartLease, done: &BTreeSet<i64>) {
    for &o in done {
        part.leased.remove(&o);
        part.admitted.remove(&o);
        part.moved.insert(o);
        part.tracker.done(o);
    }
}

/// The position of `part` to commit, and its metadata: the offsets moved past it.
fn metadata(part: &PartLease) -> (i64, String) {
    let position = part.tracker.stored().unwrap_or(part.committed);
    let above: BTreeSet<i64> = part.moved.range(position..).copied().collect();
    (position, encode_ranges(&above))
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
        Self::with_producer(&ProducerConfig::new(client, "-"), group, source_topic)
    }

    /// As [`KafkaDlq::new`], with the producer (replays and imports) set by `producer`
    /// (compression, linger, batch size, delivery timeout; its topic is not used) and the
    /// consumers on `producer.client`.
    ///
    /// # Errors
    /// [`DlqError::Invalid`] when librdkafka refuses the producer configuration.
    pub fn with_producer(
        producer: &ProducerConfig,
        group: impl Into<String>,
        source_topic: Option<String>,
    ) -> Result<Self, DlqError> {
        let client = producer.client.clone();
        let producer = producer
            .client_config()
            .create_with_context(TracingContext)
            .map_err(|e| {
                DlqError::Invalid(format!(
                    "Kafka producer configuration: {}",
                    super::config_error(&e)
                ))
            })?;
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
                detail: super::config_error(e),
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

    /// The error of a commit whose metadata would exceed [`MAX_METADATA_BYTES`].
    fn metadata_full(topic: &str, partition: i32, position: i64) -> DlqError {
        DlqError::Rejected {
            operation: "commit".into(),
            resource: topic.to_owned(),
            detail: format!(
                "the offsets moved past offset {position} of partition {partition} (a letter \
                 not moved yet) would exceed {MAX_METADATA_BYTES} bytes of commit metadata, \
                 more than Kafka keeps (offset.metadata.max.bytes); the letters of this \
                 delete are not recorded as moved, so the next run reads them again"
            ),
        }
    }

    /// Commits the group's position of the partitions in `touched` (blocking).
    fn commit(state: &LeaseState, touched: &BTreeSet<i32>) -> Result<(), DlqError> {
        let mut tpl = TopicPartitionList::new();
        for p in touched {
            let Some(part) = state.parts.get(p) else {
                continue;
            };
            let (position, metadata) = metadata(part);
            tpl.add_partition_offset(&state.topic, *p, Offset::Offset(position))
                .map_err(|e| Self::error("commit", &state.topic, &e))?;
            if metadata.len() > MAX_METADATA_BYTES {
                // `delete` checks first; the broker would refuse it anyway.
                return Err(Self::metadata_full(&state.topic, *p, position));
            }
            if let Some(e) = tpl.find_partition(&state.topic, *p).as_mut() {
                e.set_metadata(metadata);
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
        let payload = msg.payload().unwrap_or_default();
        DlqMessage {
            message_id: format!("{}:{}:{}", msg.topic(), msg.partition(), msg.offset()),
            body: String::from_utf8_lossy(payload).into_owned(),
            attributes: attributes_of(msg.headers()),
            receive_count: 0,
            sent_at_ms: msg.timestamp().to_millis(),
            group_id: None,
            dedup_id: None,
            body_error: not_text(payload),
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
        let mut last_error = None;
        while out.len() < max && state.parts.values().any(|l| !l.at_end && !l.full) {
            if waited_since.elapsed() > LEASE_WAIT {
                break;
            }
            let Some(msg) = state.consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            // librdkafka reports passing trouble (a broker disconnect in a rolling restart) as
            // error events too: it reconnects by itself, and a run used to abort on the first.
            let msg = match msg {
                Ok(msg) => msg,
                Err(e) => {
                    last_error = Some(e.to_string());
                    continue;
                }
            };
            waited_since = Instant::now();
            let (p, o) = (msg.partition(), msg.offset());
            let end = state.ends.get(&p).copied().unwrap_or(0);
            let Some(part) = state.parts.get_mut(&p) else {
                continue;
            };
            if part.full {
                // Nothing past the letter this run leaves can be recorded as moved any more:
                // the next run reads it.
                continue;
            }
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
        if out.is_empty() {
            Self::stalled(state, last_error)?;
        }
        Ok(out)
    }

    /// After a lease that found nothing: `Err` when letters of this run's window are still
    /// unread, because the topic sent nothing for [`LEASE_WAIT`]. An empty lease ends a run,
    /// so a stall (a partition without a leader, a broker restarting) used to end it as
    /// finished, with no error and letters left, which the operator read as "all replayed".
    fn stalled(state: &mut LeaseState, last_error: Option<String>) -> Result<(), DlqError> {
        // A fetch position at the end means the rest of the window held no message (a
        // transaction marker, say), not that it is missing.
        if let Ok(positions) = state.consumer.position() {
            for e in positions.elements_for_topic(&state.topic) {
                let end = state.ends.get(&e.partition()).copied().unwrap_or(0);
                if let (Offset::Offset(at), Some(part)) =
                    (e.offset(), state.parts.get_mut(&e.partition()))
                {
                    if at >= end {
                        part.at_end = true;
                    }
                }
            }
        }
        let unread: Vec<i32> = state
            .parts
            .iter()
            .filter(|(_, l)| !l.at_end && !l.full)
            .map(|(p, _)| *p)
            .collect();
        if unread.is_empty() {
            return Ok(());
        }
        Err(DlqError::Unreachable {
            operation: "read".into(),
            resource: state.topic.clone(),
            detail: format!(
                "no letter arrived for {} s before the end of this run's window (partitions \
                 {unread:?} not read to their end){}; run again once the topic answers",
                LEASE_WAIT.as_secs(),
                last_error
                    .map(|e| format!("; last error: {e}"))
                    .unwrap_or_default()
            ),
        })
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
            let mut done: BTreeMap<i32, BTreeSet<i64>> = BTreeMap::new();
            for r in &receipts {
                let Some((p, o)) = parse_receipt(r) else {
                    stale += 1;
                    continue;
                };
                if !st.parts.get(&p).is_some_and(|l| l.leased.contains_key(&o)) {
                    stale += 1;
                    continue;
                }
                done.entry(p).or_default().insert(o);
            }
            st.released
                .retain(|(p, o)| !receipts.contains(&receipt(*p, *o)));
            // All or nothing: a batch whose moves the metadata cannot hold is not recorded
            // (`admit` keeps this from happening unless sends failed in between).
            for (p, offsets) in &done {
                if let Some(part) = st.parts.get(p) {
                    let (position, len) = metadata_if_done(part, offsets);
                    if len > MAX_METADATA_BYTES {
                        for (p, offsets) in &done {
                            if let Some(part) = st.parts.get_mut(p) {
                                // Sent, so never leased again by this run; still outstanding,
                                // so the position stays before them and the next run resends
                                // them.
                                for o in offsets {
                                    part.leased.remove(o);
                                    part.admitted.remove(o);
                                }
                            }
                        }
                        return Err(Self::metadata_full(&st.topic, *p, position));
                    }
                }
            }
            for (p, offsets) in &done {
                if let Some(part) = st.parts.get_mut(p) {
                    settle(part, offsets);
                }
            }
            let touched: BTreeSet<i32> = done.keys().copied().collect();
            Self::commit(&st, &touched)?;
            Ok(stale)
        })
        .await
    }

    async fn admit(
        &self,
        queue: &str,
        receipts: &[DeliveryId],
    ) -> Result<Vec<(usize, String)>, DlqError> {
        let Some(state) = lock(&self.leases).get(queue).cloned() else {
            return Ok(Vec::new());
        };
        let receipts = receipts.to_vec();
        Self::blocking(move || {
            let mut st = lock(&state);
            let mut by_part: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
            for r in &receipts {
                if let Some((p, o)) = parse_receipt(r) {
                    by_part.entry(p).or_default().push(o);
                }
            }
            let mut refused: HashMap<(i32, i64), String> = HashMap::new();
            for (p, offsets) in by_part {
                let Some(part) = st.parts.get_mut(&p) else {
                    continue;
                };
                let was_full = part.full;
                let (no, hold) = admit_part(part, &offsets);
                let (Some(hold), false) = (hold, no.is_empty()) else {
                    continue;
                };
                if !was_full {
                    // Stop fetching it; a failure only costs reading what is then skipped.
                    let mut tpl = TopicPartitionList::new();
                    tpl.add_partition(&st.topic, p);
                    let _ = st.consumer.pause(&tpl);
                }
                let reason = format!(
                    "left for a later run: the replay group's position on partition {p} stays \
                     at offset {hold} (a letter this run does not move), and the offsets moved \
                     past it fill the commit metadata Kafka keeps \
                     (offset.metadata.max.bytes); a later run can move this letter once the \
                     letters before it are moved (replay them too, with a wider filter)"
                );
                for o in no {
                    refused.insert((p, o), reason.clone());
                }
            }
            Ok(receipts
                .iter()
                .enumerate()
                .filter_map(|(i, r)| {
                    let key = parse_receipt(r)?;
                    refused.get(&key).map(|why| (i, why.clone()))
                })
                .collect())
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

    proptest::proptest! {
        #[test]
        fn the_cost_of_an_insert_is_what_the_encoding_grows_by(
            set in proptest::collection::btree_set(990_i64..1_040, 0..40),
            o in 990_i64..1_040,
        ) {
            proptest::prop_assume!(!set.contains(&o));
            let before = encode_ranges(&set).len();
            let mut with = set.clone();
            with.insert(o);
            let after = encode_ranges(&with).len();
            let cost = insert_cost(|x| set.contains(&x), set.is_empty(), o);
            proptest::prop_assert_eq!(after as isize - before as isize, cost);
            proptest::prop_assert_eq!(encoded_len(with.iter().copied()), after);
        }

        #[test]
        fn a_union_from_an_offset_is_the_set_union_past_it(
            a in proptest::collection::btree_set(0_i64..200, 0..60),
            b in proptest::collection::btree_set(0_i64..200, 0..60),
            from in 0_i64..200,
        ) {
            let want: Vec<i64> = a.union(&b).copied().filter(|o| *o >= from).collect();
            proptest::prop_assert_eq!(union_from(&a, &b, from).collect::<Vec<_>>(), want);
        }
    }

    #[test]
    fn digits_count_the_sign_too() {
        for o in [0, 9, 10, 99, 100, 1_000_000, -1, -10, i64::MAX, i64::MIN] {
            assert_eq!(digits(o), o.to_string().len(), "{o}");
        }
    }

    /// A partition whose offsets `offsets` were leased by this run.
    fn leased(offsets: std::ops::Range<i64>) -> PartLease {
        let mut part = PartLease {
            committed: offsets.start,
            ..PartLease::default()
        };
        for o in offsets {
            part.tracker.received(o);
            part.leased.insert(
                o,
                DlqMessage {
                    message_id: o.to_string(),
                    body: String::new(),
                    attributes: BTreeMap::new(),
                    receive_count: 1,
                    sent_at_ms: None,
                    group_id: None,
                    dedup_id: None,
                    body_error: None,
                },
            );
        }
        part
    }

    /// Admits `offsets`, sends and deletes what was admitted; returns what was refused.
    fn admit_and_move(part: &mut PartLease, offsets: &[i64]) -> Vec<i64> {
        let (refused, _) = admit_part(part, offsets);
        let done: BTreeSet<i64> = offsets
            .iter()
            .copied()
            .filter(|o| !refused.contains(o))
            .collect();
        let (_, len) = metadata_if_done(part, &done);
        settle(part, &done);
        let (_, committed) = metadata(part);
        assert_eq!(committed.len(), len, "metadata_if_done foresaw the commit");
        assert!(committed.len() <= MAX_METADATA_BYTES, "{}", committed.len());
        refused
    }

    #[test]
    fn a_filter_that_skips_every_other_letter_stops_before_the_metadata_overflows() {
        // Seven-digit offsets; the filter takes the even ones, the odd ones stay.
        let start = 1_000_000;
        let mut part = leased(start..start + 10_000);
        let evens: Vec<i64> = (start..start + 10_000).step_by(2).collect();
        let mut moved = 0;
        let mut refused = Vec::new();
        for batch in evens.chunks(500) {
            let no = admit_and_move(&mut part, batch);
            moved += batch.len() - no.len();
            refused.extend(no);
        }
        let (position, text) = metadata(&part);
        assert_eq!(
            position,
            start + 1,
            "the first odd letter holds the position"
        );
        assert!(text.len() <= ADMIT_METADATA_BYTES, "{}", text.len());
        assert!(text.len() > ADMIT_METADATA_BYTES - 20, "it filled up");
        assert!(part.full);
        assert_eq!(moved + refused.len(), evens.len());
        assert!(
            (300..500).contains(&moved),
            "about 3,000 / 8 bytes: {moved}"
        );
        // Everything moved is recorded, nothing refused is.
        let recorded = decode_ranges(&text);
        assert_eq!(recorded.len() + 1, moved, "all but the first even letter");
        assert!(refused.iter().all(|o| !recorded.contains(o)));
    }

    #[test]
    fn without_a_letter_left_behind_nothing_is_refused_whatever_the_order() {
        // Two loops: the second batch is admitted and moved before the first, whose letters
        // are still leased; the commit between holds one range.
        let start = 5_000_000;
        let mut part = leased(start..start + 4_000);
        let first: Vec<i64> = (start..start + 2_000).collect();
        let second: Vec<i64> = (start + 2_000..start + 4_000).collect();
        assert!(admit_and_move(&mut part, &second).is_empty());
        assert_eq!(
            metadata(&part).1,
            format!("{}-{}", start + 2_000, start + 3_999)
        );
        assert!(admit_and_move(&mut part, &first).is_empty());
        assert_eq!(metadata(&part), (start + 4_000, String::new()));
        assert!(!part.full);
    }

    #[tokio::test]
    async fn a_delete_whose_metadata_would_not_fit_is_refused_and_records_nothing() {
        // Letters admitted as a contiguous block, then half their sends fail: moving only the
        // even ones past the held first letter would need more metadata than Kafka keeps.
        let mut part = leased(0..3_000);
        let all: Vec<i64> = (1..3_000).collect();
        let (refused, hold) = admit_part(&mut part, &all);
        assert!(refused.is_empty());
        assert_eq!(hold, Some(0));
        let evens: BTreeSet<i64> = (2..3_000).step_by(2).collect();
        let (position, len) = metadata_if_done(&part, &evens);
        assert_eq!(position, 0);
        assert!(len > MAX_METADATA_BYTES, "{len}");
        // What `delete` then does: nothing committed, the letters stay before the position.
        let state = LeaseState {
            topic: "dlq".into(),
            consumer: KafkaDlq::consumer_for(&KafkaClientConfig::new("127.0.0.1:9"), "g", "dlq")
                .unwrap(),
            ends: BTreeMap::from([(0, 3_000)]),
            parts: BTreeMap::from([(0, part)]),
            released: VecDeque::new(),
        };
        let port = KafkaDlq::new(KafkaClientConfig::new("127.0.0.1:9"), "g", None).unwrap();
        lock(&port.leases).insert("dlq".into(), Arc::new(Mutex::new(state)));
        let receipts: Vec<DeliveryId> = evens.iter().map(|o| receipt(0, *o)).collect();
        let err = port.delete("dlq", &receipts).await.unwrap_err();
        assert!(matches!(err, DlqError::Rejected { .. }), "{err}");
        assert!(
            err.to_string().contains("next run reads them again"),
            "{err}"
        );
        let state = lock(&port.leases)["dlq"].clone();
        let st = lock(&state);
        let part = &st.parts[&0];
        assert!(part.moved.is_empty());
        assert_eq!(part.tracker.position(), Some(0));
        assert!(part.tracker.is_outstanding(2), "not recorded as moved");
        assert!(
            !part.leased.contains_key(&2),
            "and not leased again by this run"
        );
    }

    #[test]
    fn receipts_round_trip() {
        assert_eq!(parse_receipt(&receipt(2, 40)), Some((2, 40)));
        assert_eq!(parse_receipt(&DeliveryId("x".into())), None);
    }
}
