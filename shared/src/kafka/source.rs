//! The Kafka source: a consumer-group member behind the `Source` port.
//!
//! - **Offsets** are stored (`enable.auto.offset.store=false`, then `rd_kafka_offsets_store`)
//!   only up to the first offset of the partition that is not finished ([`PartitionTracker`]),
//!   and committed by librdkafka's auto-commit, on revocation and on close. Work finished out of
//!   order is never skipped: a crash redelivers from the first unfinished offset, and the
//!   idempotent store absorbs the repeat.
//! - **Transient failures** (`retry_later`) go to an in-process redelivery queue and come back
//!   from `receive` after their backoff. The partition keeps being consumed meanwhile (only its
//!   stored position waits), and other partitions are not touched at all. Pausing the partition
//!   and seeking back would also re-read every later message already done, and would stall the
//!   partition's healthy messages behind one bad batch; the queue costs memory for the bodies
//!   held, which the poller's batch limits and circuit breaker bound. It is not durable and
//!   need not be: its offsets were never stored, so after a crash Kafka redelivers them.
//! - **Redrive**: Kafka has no `maxReceiveCount`, so the source plays SQS's part: a message
//!   already received `max_receives` times is not handed out again but produced to the DLQ
//!   topic (`max_receives`), and its offset finished. Without it, a message that fails
//!   transiently every time (a write that panics or times out on its own rows) came back
//!   forever and held its partition's committed position, and the group's lag, for good.
//!   The circuit breaker keeps a store outage from spending receives, as on SQS.
//! - **Permanent failures** (`dead_letter`) are produced to the DLQ topic with the reason and
//!   the original topic/partition/offset as headers, and only after the DLQ acknowledged them
//!   is the offset marked finished.
//! - **Rebalances**: when partitions are revoked, the offsets already stored are committed
//!   synchronously and the in-flight work of those partitions is dropped from the books: its
//!   later acks are ignored (each delivery id carries the generation of its assignment), so no
//!   offset is stored for a partition this member no longer owns. Nothing is lost, because
//!   unfinished offsets were never stored: the new owner reads them again. Waiting inside the
//!   rebalance callback for the batches to drain instead would block the consumer (and with
//!   the eager protocol the whole group) for as long as the slowest batch.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientContext;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::publisher::{ProducerConfig, TracingContext};
use super::tracker::PartitionTracker;
use super::{
    attributes_of, headers_of, log_line, millis, not_text, KafkaClientConfig,
    HEADER_ORIGINAL_OFFSET, HEADER_ORIGINAL_PARTITION, HEADER_ORIGINAL_TOPIC,
};
use crate::metrics::Exposition;
use crate::source::{
    DeadLetter, DeadLetterReason, Delivery, DeliveryId, Source, SourceError, ATTR_ERROR_CODE,
    ATTR_ERROR_MESSAGE, MAX_RECEIVES_CODE,
};

/// Letters whose DLQ produce failed are sent again after this long.
const DEAD_LETTER_RETRY: Duration = Duration::from_secs(5);
/// Longest reason message put in a header.
const MAX_REASON_BYTES: usize = 4_096;
/// How long explicit commits and offset queries wait for the coordinator.
const COORDINATOR_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of the Kafka source.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// Connection.
    pub client: KafkaClientConfig,
    /// Topic the workers consume.
    pub topic: String,
    /// Consumer group (`group.id`): the workers sharing the topic's partitions.
    pub group: String,
    /// Topic permanent failures are produced to.
    pub dlq_topic: String,
    /// `session.timeout.ms`: how long the group waits for a silent member (a crashed worker)
    /// before giving its partitions to the others. Default 45 s.
    pub session_timeout: Duration,
    /// `max.poll.interval.ms`: the longest a member may go without receiving before it is
    /// considered stuck and leaves the group; keep it above the longest batch. Default 300 s.
    pub max_poll_interval: Duration,
    /// `auto.commit.interval.ms`: how often stored offsets are committed. Default 1 s.
    pub commit_interval: Duration,
    /// Receives of one message before it goes to the DLQ topic instead of coming back
    /// (`max_receives`), as an SQS redrive policy's `maxReceiveCount`. Default 5; at least 1.
    pub max_receives: u32,
    /// The DLQ producer (same connection, `acks=all`, idempotent).
    pub dlq_producer: ProducerConfig,
}

impl ConsumerConfig {
    /// Defaults for `topic`, `group` and `dlq_topic` on `client`.
    pub fn new(
        client: KafkaClientConfig,
        topic: impl Into<String>,
        group: impl Into<String>,
        dlq_topic: impl Into<String>,
    ) -> Self {
        let dlq_topic = dlq_topic.into();
        Self {
            dlq_producer: ProducerConfig::new(client.clone(), dlq_topic.clone()),
            client,
            topic: topic.into(),
            group: group.into(),
            dlq_topic,
            session_timeout: Duration::from_secs(45),
            max_poll_interval: Duration::from_secs(300),
            commit_interval: Duration::from_secs(1),
            max_receives: 5,
        }
    }

    fn client_config(&self) -> rdkafka::ClientConfig {
        // Heartbeats must come well within the session timeout.
        let heartbeat = (self.session_timeout / 3).min(Duration::from_secs(3));
        self.client.client_config(&[
            ("group.id", self.group.clone()),
            ("enable.auto.commit", "true".into()),
            ("enable.auto.offset.store", "false".into()),
            ("auto.commit.interval.ms", millis(self.commit_interval)),
            // A new group reads the topic from its start: nothing published before the
            // first worker joined is skipped.
            ("auto.offset.reset", "earliest".into()),
            ("enable.partition.eof", "false".into()),
            ("session.timeout.ms", millis(self.session_timeout)),
            ("heartbeat.interval.ms", millis(heartbeat)),
            ("max.poll.interval.ms", millis(self.max_poll_interval)),
            // The consumer lag rendered at `/metrics` (`spillway_kafka_consumer_lag`).
            ("statistics.interval.ms", "5000".into()),
        ])
    }
}

/// One message handed out and not finished.
#[derive(Debug)]
struct Entry {
    body: String,
    attributes: BTreeMap<String, String>,
    key: Option<Vec<u8>>,
    receive_count: u32,
    /// The payload, when it is not UTF-8 (`body` is then a lossy copy).
    unreadable: Option<Unreadable>,
    /// Letters the worker decided on whose DLQ produce failed: sent again when it comes due,
    /// rather than the message being decided again (or, out of receives, dead-lettered whole
    /// as `max_receives`, which would lose their reasons).
    unsent_letters: Option<Vec<DeadLetter>>,
}

/// A payload that is not UTF-8: its bytes, to dead-letter unchanged, and why.
#[derive(Debug, Clone)]
struct Unreadable {
    payload: Vec<u8>,
    why: String,
}

/// The payload as text; one that is not UTF-8 comes back lossily converted (U+FFFD for each
/// invalid sequence), with its bytes kept to dead-letter them as they came.
fn read_payload(payload: &[u8]) -> (String, Option<Unreadable>) {
    match not_text(payload) {
        None => (String::from_utf8_lossy(payload).into_owned(), None),
        Some(why) => (
            String::from_utf8_lossy(payload).into_owned(),
            Some(Unreadable {
                payload: payload.to_vec(),
                why,
            }),
        ),
    }
}

/// What this member knows of one assigned partition.
#[derive(Debug)]
struct PartitionState {
    /// Which assignment this is; delivery ids carry it so stale settlements are ignored.
    generation: u64,
    tracker: PartitionTracker,
    entries: HashMap<i64, Entry>,
}

#[derive(Debug, Default)]
struct State {
    partitions: HashMap<i32, PartitionState>,
    next_generation: u64,
    /// Redeliveries by due time: `(due, partition, offset, generation)`.
    redeliveries: BTreeSet<(Instant, i32, i64, u64)>,
}

impl State {
    fn assign(&mut self, partition: i32) -> &mut PartitionState {
        self.next_generation += 1;
        let generation = self.next_generation;
        self.partitions.insert(
            partition,
            PartitionState {
                generation,
                tracker: PartitionTracker::new(),
                entries: HashMap::new(),
            },
        );
        self.partitions
            .get_mut(&partition)
            .unwrap_or_else(|| unreachable!("just inserted"))
    }

    /// The partition's state when `generation` is still the current assignment.
    fn current(&mut self, partition: i32, generation: u64) -> Option<&mut PartitionState> {
        self.partitions
            .get_mut(&partition)
            .filter(|p| p.generation == generation)
    }
}

#[derive(Debug)]
struct Shared {
    topic: String,
    state: Mutex<State>,
    /// The consumer lag of each partition assigned here, from the latest statistics.
    lags: Mutex<BTreeMap<i32, i64>>,
    /// Wakes a waiting `receive` when a redelivery was scheduled.
    wake: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lags(&self) -> MutexGuard<'_, BTreeMap<i32, i64>> {
        self.lags.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The part of librdkafka's statistics JSON the lag gauge reads.
#[derive(Debug, serde::Deserialize)]
struct LagStats {
    #[serde(default)]
    topics: HashMap<String, LagTopic>,
}

#[derive(Debug, serde::Deserialize)]
struct LagTopic {
    #[serde(default)]
    partitions: HashMap<String, LagPartition>,
}

#[derive(Debug, serde::Deserialize)]
struct LagPartition {
    partition: i32,
    desired: bool,
    consumer_lag: i64,
    #[serde(default = "unknown_offset")]
    committed_offset: i64,
    #[serde(default = "unknown_offset")]
    lo_offset: i64,
    #[serde(default = "unknown_offset")]
    hi_offset: i64,
    #[serde(default = "unknown_offset")]
    ls_offset: i64,
}

fn unknown_offset() -> i64 {
    -1
}

impl LagPartition {
    /// Messages past the group's committed offset. librdkafka reports no `consumer_lag`
    /// (-1) before the group's first commit on the partition; then the group stands at the
    /// log start (`auto.offset.reset=earliest`), so everything from there to the end of the
    /// log (the last stable offset, the consumer reading committed messages only) is behind
    /// it. That is when a worker that cannot write its first batch must show a lag.
    fn lag(&self) -> Option<i64> {
        if self.consumer_lag >= 0 {
            return Some(self.consumer_lag);
        }
        let end = if self.ls_offset >= 0 {
            self.ls_offset
        } else {
            self.hi_offset
        };
        (self.committed_offset < 0 && self.lo_offset >= 0 && end >= self.lo_offset)
            .then(|| end - self.lo_offset)
    }
}

/// The consumer's callbacks: rebalances and logs.
#[derive(Debug)]
pub struct SourceContext {
    shared: Arc<Shared>,
}

impl ClientContext for SourceContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_line(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        warn!(error = %error, reason, "Kafka consumer error");
    }

    /// Keeps the lag of the partitions assigned here (`desired`) from librdkafka's statistics
    /// JSON ([`LagPartition::lag`]); partitions whose watermarks are not known yet are left
    /// out. Only the few fields used are read (rdkafka's typed `Statistics` does not parse
    /// the vendored librdkafka's JSON).
    fn stats_raw(&self, statistics: &[u8]) {
        match serde_json::from_slice::<LagStats>(statistics) {
            Ok(mut stats) => {
                let lags = stats
                    .topics
                    .remove(&self.shared.topic)
                    .map(|t| {
                        t.partitions
                            .into_values()
                            .filter(|p| p.partition >= 0 && p.desired)
                            .filter_map(|p| Some((p.partition, p.lag()?)))
                            .collect()
                    })
                    .unwrap_or_default();
                *self.shared.lags() = lags;
            }
            Err(e) => debug!(error = %e, "Unreadable librdkafka statistics"),
        }
    }
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let mut dropped = 0;
        {
            let mut state = self.shared.lock();
            for elem in tpl.elements_for_topic(&self.shared.topic) {
                if let Some(p) = state.partitions.remove(&elem.partition()) {
                    dropped += p.tracker.outstanding();
                }
            }
            let live = &state.partitions;
            let stale: Vec<_> = state
                .redeliveries
                .iter()
                .filter(|(_, p, _, g)| live.get(p).is_none_or(|s| s.generation != *g))
                .copied()
                .collect();
            for r in stale {
                state.redeliveries.remove(&r);
            }
        }
        // Hand the finished prefix over to the next owner now rather than at the next tick.
        match consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => warn!(error = %e, "Commit on revocation failed"),
        }
        info!(
            partitions = tpl.count(),
            in_flight_dropped = dropped,
            "Partitions revoked; unfinished offsets go to their next owner"
        );
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let mut state = self.shared.lock();
                let mut assigned = Vec::new();
                for elem in tpl.elements_for_topic(&self.shared.topic) {
                    state.assign(elem.partition());
                    assigned.push(elem.partition());
                }
                info!(partitions = ?assigned, "Partitions assigned");
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => warn!(error = %e, "Rebalance failed"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        match result {
            Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => warn!(error = %e, "Offset commit failed; it is retried at the next tick"),
        }
    }
}

/// Consumes a topic as a member of a consumer group. See the module docs for the guarantees.
pub struct KafkaSource {
    consumer: StreamConsumer<SourceContext>,
    dlq: FutureProducer<TracingContext>,
    shared: Arc<Shared>,
    dlq_topic: String,
    max_receives: u32,
    /// Letters this source moved to the DLQ topic itself (out of receives, or sent again
    /// after a failed produce), which the poller's `dead_letters_total` does not see.
    redriven: AtomicU64,
    /// Its attempts at that which failed (each is tried again later).
    redrive_failures: AtomicU64,
}

impl std::fmt::Debug for KafkaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSource")
            .field("topic", &self.shared.topic)
            .field("dlq_topic", &self.dlq_topic)
            .finish_non_exhaustive()
    }
}

/// A delivery id: `partition:offset:generation`.
fn delivery_id(partition: i32, offset: i64, generation: u64) -> DeliveryId {
    DeliveryId(format!("{partition}:{offset}:{generation}"))
}

fn parse_id(id: &DeliveryId) -> Option<(i32, i64, u64)> {
    let mut it = id.0.splitn(3, ':');
    let p = it.next()?.parse().ok()?;
    let o = it.next()?.parse().ok()?;
    let g = it.next()?.parse().ok()?;
    Some((p, o, g))
}

impl KafkaSource {
    /// Joins the consumer group and subscribes to the topic. Must run inside a tokio runtime.
    ///
    /// # Errors
    /// [`SourceError::Rejected`] when librdkafka refuses the configuration.
    pub fn new(config: &ConsumerConfig) -> Result<Self, SourceError> {
        let rejected = |what: &str, e: &KafkaError| SourceError::Rejected {
            queue: config.topic.clone(),
            message: format!("{what}: {}", super::config_error(e)),
        };
        let shared = Arc::new(Shared {
            topic: config.topic.clone(),
            state: Mutex::new(State::default()),
            lags: Mutex::new(BTreeMap::new()),
            wake: Notify::new(),
        });
        let consumer: StreamConsumer<SourceContext> = config
            .client_config()
            .create_with_context(SourceContext {
                shared: Arc::clone(&shared),
            })
            .map_err(|e| rejected("consumer configuration", &e))?;
        consumer
            .subscribe(&[&config.topic])
            .map_err(|e| rejected("subscribe", &e))?;
        let dlq = config
            .dlq_producer
            .client_config()
            .create_with_context(TracingContext)
            .map_err(|e| rejected("DLQ producer configuration", &e))?;
        info!(topic = %config.topic, group = %config.group, dlq = %config.dlq_topic, "Kafka source subscribed");
        Ok(Self {
            consumer,
            dlq,
            shared,
            dlq_topic: config.dlq_topic.clone(),
            max_receives: config.max_receives.max(1),
            redriven: AtomicU64::new(0),
            redrive_failures: AtomicU64::new(0),
        })
    }

    /// The topic consumed.
    pub fn topic(&self) -> &str {
        &self.shared.topic
    }

    /// Commits the stored offsets now and waits for the coordinator.
    ///
    /// # Errors
    /// [`SourceError::Unavailable`] when the commit failed (nothing stored is not an error).
    pub fn commit(&self) -> Result<(), SourceError> {
        match self.consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => Ok(()),
            Err(e) => Err(self.unavailable(&e)),
        }
    }

    /// The group's committed position per assigned partition (blocking: call it from a
    /// blocking context or a test).
    ///
    /// # Errors
    /// When the coordinator cannot be asked.
    pub fn committed(&self) -> Result<BTreeMap<i32, i64>, SourceError> {
        let tpl = self
            .consumer
            .committed(COORDINATOR_TIMEOUT)
            .map_err(|e| self.unavailable(&e))?;
        Ok(tpl
            .elements_for_topic(&self.shared.topic)
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some((e.partition(), o)),
                _ => None,
            })
            .collect())
    }

    /// Partitions currently assigned to this member.
    pub fn assigned_partitions(&self) -> Vec<i32> {
        let mut p: Vec<i32> = self.shared.lock().partitions.keys().copied().collect();
        p.sort_unstable();
        p
    }

    fn unavailable(&self, e: &KafkaError) -> SourceError {
        SourceError::Unavailable {
            queue: self.shared.topic.clone(),
            message: e.to_string(),
        }
    }

    /// Books a freshly consumed message and turns it into a delivery; `None` when it is
    /// already in flight here.
    fn accept(&self, msg: &BorrowedMessage<'_>) -> Option<Delivery> {
        let (partition, offset) = (msg.partition(), msg.offset());
        let mut state = self.shared.lock();
        let part = if state.partitions.contains_key(&partition) {
            state.partitions.get_mut(&partition)?
        } else {
            // Assignment callbacks precede messages; book it anyway rather than drop it.
            state.assign(partition)
        };
        if !part.tracker.received(offset) {
            return None;
        }
        let (body, unreadable) = read_payload(msg.payload().unwrap_or_default());
        let attributes = attributes_of(msg.headers());
        let body_error = unreadable.as_ref().map(|u| u.why.clone());
        part.entries.insert(
            offset,
            Entry {
                body: body.clone(),
                attributes: attributes.clone(),
                key: msg.key().map(<[u8]>::to_vec),
                receive_count: 1,
                unreadable,
                unsent_letters: None,
            },
        );
        Some(Delivery {
            id: delivery_id(partition, offset, part.generation),
            message_id: format!("{}:{partition}:{offset}", msg.topic()),
            body,
            attributes,
            receive_count: 1,
            body_error,
        })
    }

    /// Redeliveries whose backoff is over, up to `max`; those already received
    /// `max_receives` times, or holding letters a failed produce left, go to the DLQ topic
    /// instead ([`Self::redrive`]), all at once: a DLQ that does not answer holds this
    /// receive up for one delivery timeout, not one per message.
    async fn take_due(&self, max: usize) -> Vec<Delivery> {
        let (out, to_dlq) = self.due(max);
        futures::future::join_all(to_dlq.iter().map(|(id, letters)| self.redrive(id, letters)))
            .await;
        out
    }

    /// Redeliveries whose backoff is over, up to `max`, and what goes to the DLQ instead.
    fn due(&self, max: usize) -> (Vec<Delivery>, Vec<(DeliveryId, Vec<DeadLetter>)>) {
        let now = Instant::now();
        let mut out = Vec::new();
        let mut exhausted = Vec::new();
        let mut state = self.shared.lock();
        while out.len() < max {
            let Some(&first) = state.redeliveries.first() else {
                break;
            };
            let (due, partition, offset, generation) = first;
            if due > now {
                break;
            }
            state.redeliveries.remove(&first);
            let topic = &self.shared.topic;
            let Some(part) = state.current(partition, generation) else {
                continue;
            };
            let Some(entry) = part.entries.get_mut(&offset) else {
                continue;
            };
            if let Some(letters) = entry.unsent_letters.take() {
                exhausted.push((delivery_id(partition, offset, generation), letters));
                continue;
            }
            if entry.receive_count >= self.max_receives {
                exhausted.push((
                    delivery_id(partition, offset, generation),
                    vec![DeadLetter {
                        body: entry.body.clone(),
                        attributes: entry.attributes.clone(),
                        reason: DeadLetterReason {
                            code: MAX_RECEIVES_CODE.to_owned(),
                            message: format!(
                                "received {} times without being stored or dead-lettered; --kafka-max-receives allows {}",
                                entry.receive_count, self.max_receives
                            ),
                        },
                    }],
                ));
                continue;
            }
            entry.receive_count += 1;
            out.push(Delivery {
                id: delivery_id(partition, offset, generation),
                message_id: format!("{topic}:{partition}:{offset}"),
                body: entry.body.clone(),
                attributes: entry.attributes.clone(),
                receive_count: entry.receive_count,
                body_error: entry.unreadable.as_ref().map(|u| u.why.clone()),
            });
        }
        (out, exhausted)
    }

    /// Produces `letters` for a message to the DLQ topic and finishes its offset. A failed
    /// produce keeps them for the next try ([`Source::dead_letter`]), until they land or the
    /// partition moves to another member.
    async fn redrive(&self, id: &DeliveryId, letters: &[DeadLetter]) {
        match self.dead_letter(id, letters).await {
            Ok(()) => {
                self.redriven
                    .fetch_add(letters.len() as u64, Ordering::Relaxed);
                let reasons: Vec<&str> = letters.iter().map(|l| l.reason.code.as_str()).collect();
                warn!(delivery = %id.0, ?reasons, "Moved to the DLQ topic");
            }
            Err(e) => {
                self.redrive_failures.fetch_add(1, Ordering::Relaxed);
                warn!(delivery = %id.0, error = %e, "Moving to the DLQ topic failed");
            }
        }
    }

    fn next_due(&self) -> Option<Instant> {
        self.shared.lock().redeliveries.first().map(|r| r.0)
    }

    fn schedule(&self, items: &[(DeliveryId, Duration)]) -> usize {
        let now = Instant::now();
        let mut scheduled = 0;
        {
            let mut state = self.shared.lock();
            for (id, delay) in items {
                let Some((p, o, g)) = parse_id(id) else {
                    continue;
                };
                let known = state
                    .current(p, g)
                    .is_some_and(|part| part.entries.contains_key(&o));
                if known {
                    let delay = (*delay).max(Duration::from_millis(1));
                    state.redeliveries.insert((now + delay, p, o, g));
                    scheduled += 1;
                }
            }
        }
        if scheduled > 0 {
            self.shared.wake.notify_one();
        }
        scheduled
    }

    /// Takes the messages librdkafka already holds, without waiting, up to `max` in `out`.
    async fn take_ready(&self, out: &mut Vec<Delivery>, max: usize) {
        while out.len() < max {
            match tokio::time::timeout(Duration::ZERO, self.consumer.recv()).await {
                Ok(Ok(msg)) => out.extend(self.accept(&msg)),
                Ok(Err(e)) => {
                    // Not returned: the messages already taken must reach the poller. Seen
                    // by the operator all the same (an offset reset past retention is one).
                    warn!(error = %e, "Consumer error while draining ready messages");
                    break;
                }
                Err(_) => break,
            }
        }
    }
}

#[async_trait]
impl Source for KafkaSource {
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, SourceError> {
        let max = max.max(1);
        let deadline = Instant::now() + wait;
        loop {
            // Register for wake-ups before looking, so a redelivery scheduled in between is
            // not missed.
            let woken = self.shared.wake.notified();
            let mut out = self.take_due(max).await;
            if !out.is_empty() {
                self.take_ready(&mut out, max).await;
                return Ok(out);
            }
            let until = self.next_due().map_or(deadline, |d| d.min(deadline));
            tokio::select! {
                r = tokio::time::timeout_at(until, self.consumer.recv()) => match r {
                    Ok(Ok(msg)) => {
                        out.extend(self.accept(&msg));
                        drop(msg);
                        self.take_ready(&mut out, max).await;
                        if !out.is_empty() {
                            return Ok(out);
                        }
                    }
                    Ok(Err(e)) => return Err(self.unavailable(&e)),
                    Err(_) if Instant::now() >= deadline => return Ok(self.take_due(max).await),
                    Err(_) => {}
                },
                () = woken => {}
            }
        }
    }

    async fn ack(&self, ids: &[DeliveryId]) -> Result<(), SourceError> {
        let mut stale = 0_usize;
        let mut state = self.shared.lock();
        let mut positions: BTreeMap<i32, i64> = BTreeMap::new();
        for id in ids {
            let Some((p, o, g)) = parse_id(id) else {
                return Err(SourceError::Rejected {
                    queue: self.shared.topic.clone(),
                    message: format!("{:?} is not a Kafka delivery id", id.0),
                });
            };
            let Some(part) = state.current(p, g) else {
                stale += 1;
                continue;
            };
            part.entries.remove(&o);
            if let Some(position) = part.tracker.done(o) {
                // A later position of the same partition in this call replaces an earlier one.
                positions.insert(p, position);
            }
        }
        // Stored under the lock, so two acks of one partition cannot store out of order.
        if !positions.is_empty() {
            let mut tpl = TopicPartitionList::new();
            for (p, position) in positions {
                if let Err(e) =
                    tpl.add_partition_offset(&self.shared.topic, p, Offset::Offset(position))
                {
                    warn!(error = %e, partition = p, "Cannot list an offset to store");
                }
            }
            if let Err(e) = self.consumer.store_offsets(&tpl) {
                // The partition was revoked between the check and the store: its next owner
                // reads these offsets again, and the store ignores the repeat.
                warn!(error = %e, "Storing offsets failed");
            }
        }
        drop(state);
        if stale > 0 {
            debug!(
                stale,
                "Acks for revoked partitions ignored; the new owner redoes that work"
            );
        }
        Ok(())
    }

    async fn retry_later(&self, items: &[(DeliveryId, Duration)]) -> Result<(), SourceError> {
        let scheduled = self.schedule(items);
        if scheduled < items.len() {
            debug!(
                ignored = items.len() - scheduled,
                "Retries for revoked partitions ignored"
            );
        }
        Ok(())
    }

    /// A no-op, correctly: Kafka has no per-message visibility timeout that could lapse. A
    /// message is never handed to another consumer while this member owns its partition, and
    /// ownership is kept alive by librdkafka's background heartbeats (`session.timeout.ms`)
    /// plus `receive` being called at least every `max.poll.interval.ms`, which the poller's
    /// other loops do while a long batch runs. If ownership is lost anyway, the unfinished
    /// offsets were never stored, so the next owner processes them again.
    async fn extend(&self, _ids: &[DeliveryId], _by: Duration) -> Result<(), SourceError> {
        Ok(())
    }

    async fn dead_letter(
        &self,
        id: &DeliveryId,
        letters: &[DeadLetter],
    ) -> Result<(), SourceError> {
        let (partition, offset, generation) =
            parse_id(id).ok_or_else(|| SourceError::Rejected {
                queue: self.shared.topic.clone(),
                message: format!("{:?} is not a Kafka delivery id", id.0),
            })?;
        let (key, unreadable) = {
            let mut state = self.shared.lock();
            let entry = state
                .current(partition, generation)
                .and_then(|p| p.entries.get(&offset));
            match entry {
                Some(e) => (e.key.clone(), e.unreadable.clone()),
                None => {
                    return Err(SourceError::Rejected {
                        queue: self.shared.topic.clone(),
                        message: format!(
                            "partition {partition} was revoked; its next owner decides offset {offset} again"
                        ),
                    })
                }
            }
        };
        let partition_s = partition.to_string();
        let offset_s = offset.to_string();
        let mut pending = Vec::with_capacity(letters.len());
        let mut failure: Option<String> = None;
        for letter in letters {
            let mut attrs: Vec<(&str, &str)> = letter
                .attributes
                .iter()
                .filter(|(k, _)| {
                    ![
                        ATTR_ERROR_CODE,
                        ATTR_ERROR_MESSAGE,
                        HEADER_ORIGINAL_TOPIC,
                        HEADER_ORIGINAL_PARTITION,
                        HEADER_ORIGINAL_OFFSET,
                    ]
                    .contains(&k.as_str())
                })
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            attrs.extend([
                (ATTR_ERROR_CODE, letter.reason.code.as_str()),
                (
                    ATTR_ERROR_MESSAGE,
                    crate::clip(&letter.reason.message, MAX_REASON_BYTES),
                ),
                (HEADER_ORIGINAL_TOPIC, self.shared.topic.as_str()),
                (HEADER_ORIGINAL_PARTITION, partition_s.as_str()),
                (HEADER_ORIGINAL_OFFSET, offset_s.as_str()),
            ]);
            // An unreadable payload can only be dead-lettered whole: its bytes as they came.
            let payload = unreadable
                .as_ref()
                .map_or(letter.body.as_bytes(), |u| u.payload.as_slice());
            let mut record = FutureRecord::to(&self.dlq_topic)
                .payload(payload)
                .headers(headers_of(attrs));
            if let Some(k) = &key {
                record = record.key(k.as_slice());
            }
            match self.dlq.send_result(record) {
                Ok(delivery) => pending.push(delivery),
                Err((e, _)) => {
                    failure = Some(e.to_string());
                    break;
                }
            }
        }
        // Wait for every report, even after a failure, so nothing is left unobserved.
        for delivery in pending {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => {
                    failure.get_or_insert(e.to_string());
                }
                Err(_) => {
                    failure.get_or_insert("the producer dropped the delivery report".into());
                }
            }
        }
        if let Some(e) = failure {
            // Nothing is finished; send these letters again after a pause rather than leaving
            // the partition's position stuck behind it.
            if let Some(entry) = self
                .shared
                .lock()
                .current(partition, generation)
                .and_then(|p| p.entries.get_mut(&offset))
            {
                entry.unsent_letters = Some(letters.to_vec());
            }
            self.schedule(&[(id.clone(), DEAD_LETTER_RETRY)]);
            return Err(SourceError::Unavailable {
                queue: self.dlq_topic.clone(),
                message: format!("produce to the DLQ failed: {e}"),
            });
        }
        // Only after the DLQ acknowledged every letter.
        self.ack(std::slice::from_ref(id)).await
    }

    fn broken(&self) -> Option<String> {
        // A consumer is put in the fatal state when the group fences it, which happens with
        // static membership (`group.instance.id` in --kafka-config) when another member
        // joins with the same id: it receives nothing again, and the worker used to idle on
        // with its partitions unread.
        let consumer = self.consumer.client().fatal_error().map(|(code, reason)| {
            format!(
                "the Kafka consumer hit a fatal error ({code:?}: {reason}) and cannot receive \
                 again (with group.instance.id, is another worker using the same id?)"
            )
        });
        consumer.or_else(|| {
            self.dlq.client().fatal_error().map(|(code, reason)| {
                format!(
                    "the Kafka DLQ producer hit a fatal error ({code:?}: {reason}) and cannot \
                     send a letter again"
                )
            })
        })
    }

    fn render_metrics(&self, page: &mut Exposition) {
        #[allow(clippy::cast_precision_loss)]
        let samples: Vec<(String, f64)> = self
            .shared
            .lags()
            .iter()
            .map(|(p, lag)| (p.to_string(), *lag as f64))
            .collect();
        let samples: Vec<(&str, f64)> = samples.iter().map(|(p, l)| (p.as_str(), *l)).collect();
        page.gauges(
            "spillway_kafka_consumer_lag",
            "Messages of each partition this worker owns past the group's committed offset, or past the log start before the group's first commit there (librdkafka statistics, refreshed every statistics.interval.ms).",
            "partition",
            &samples,
        );
        page.counter(
            "spillway_kafka_dlq_redriven_total",
            "Letters this worker's Kafka source moved to the DLQ topic itself: messages out of receives (--kafka-max-receives), and letters sent again after a failed produce. spillway_worker_dead_letters_total counts the others.",
            self.redriven.load(Ordering::Relaxed),
        );
        page.counter(
            "spillway_kafka_dlq_redrive_failures_total",
            "Failed attempts of this worker's Kafka source to move a message to the DLQ topic (each is tried again 5 s later while the partition stays here).",
            self.redrive_failures.load(Ordering::Relaxed),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_ids_round_trip() {
        let id = delivery_id(3, 1_234_567, 9);
        assert_eq!(parse_id(&id), Some((3, 1_234_567, 9)));
        assert_eq!(parse_id(&DeliveryId("x".into())), None);
        assert_eq!(parse_id(&DeliveryId("1:2".into())), None);
    }

    #[test]
    fn a_payload_that_is_not_utf8_is_kept_as_it_came() {
        let (body, unreadable) = read_payload(b"{\"v\":1}");
        assert_eq!((body.as_str(), unreadable.is_none()), ("{\"v\":1}", true));
        let bytes = b"{\"country\":\"caf\xe9\"}";
        let (body, unreadable) = read_payload(bytes);
        let unreadable = unreadable.unwrap();
        assert_eq!(body, "{\"country\":\"caf\u{FFFD}\"}");
        assert_eq!(unreadable.payload, bytes);
        assert!(
            unreadable.why.contains("offset 15 of 18"),
            "{}",
            unreadable.why
        );
    }

    #[test]
    fn a_long_reason_is_cut_on_a_character_boundary() {
        let s = "é".repeat(10);
        assert_eq!(crate::clip(&s, 5), "éé");
        assert_eq!(crate::clip("short", 100), "short");
    }

    fn partition(json: &str) -> LagPartition {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn the_lag_is_librdkafkas_once_the_group_has_committed() {
        let p = partition(
            r#"{"partition":0,"desired":true,"consumer_lag":15,"committed_offset":5,"lo_offset":0,"hi_offset":20,"ls_offset":20}"#,
        );
        assert_eq!(p.lag(), Some(15));
    }

    #[test]
    fn before_the_first_commit_everything_from_the_log_start_is_behind() {
        let p = partition(
            r#"{"partition":0,"desired":true,"consumer_lag":-1,"committed_offset":-1001,"lo_offset":4,"hi_offset":20,"ls_offset":18}"#,
        );
        assert_eq!(p.lag(), Some(14), "last stable offset minus the log start");
        let p = partition(
            r#"{"partition":0,"desired":true,"consumer_lag":-1,"committed_offset":-1001,"lo_offset":4,"hi_offset":20,"ls_offset":-1}"#,
        );
        assert_eq!(
            p.lag(),
            Some(16),
            "high watermark when no stable offset is known"
        );
    }

    #[test]
    fn no_lag_is_made_up_while_the_watermarks_are_unknown() {
        let p = partition(
            r#"{"partition":0,"desired":true,"consumer_lag":-1,"committed_offset":-1001,"lo_offset":-1,"hi_offset":-1,"ls_offset":-1}"#,
        );
        assert_eq!(p.lag(), None);
        let p = partition(r#"{"partition":0,"desired":true,"consumer_lag":-1}"#);
        assert_eq!(p.lag(), None);
    }
}
