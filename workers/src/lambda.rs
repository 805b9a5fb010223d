//! The Lambda runtime: an SQS event source mapping hands the worker a batch of records; the
//! same batch core decides for each, and the answer is an `SqsBatchResponse` whose
//! `batchItemFailures` are exactly the messages to retry.
//!
//! Per record:
//! - stored (or a duplicate) → not reported: the event source mapping deletes it;
//! - permanent failure (undecodable, invalid event, refused by the store) → its letters are
//!   sent to the DLQ with the reason attributes, then it is not reported (deleted). When the
//!   DLQ cannot take them (or none is configured), it is reported and retried instead;
//! - transient failure (store down, lock or statement timeout) → reported;
//! - not started, or not written, before the invocation deadline minus
//!   [`LambdaConfig::deadline_margin`] → reported (a write still running then is cancelled),
//!   so Lambda's timeout never fails the whole batch;
//! - a panic while handling it → reported; its neighbours are unaffected.
//!
//! When the store is down (every write of the invocation failed transiently and nothing was
//! stored, for two or more records or, with one, the store does not answer a ping), the
//! records held back by it are not reported but put back on the queue as new
//! messages ([`Requeue`]), delayed by the retry backoff and counted in `spillway-requeues`:
//! the event source mapping keeps receiving during an outage, and each receive would bring
//! the queue's redrive policy (`maxReceiveCount`) closer to moving a valid message to the
//! DLQ. A new message starts at receive count 0, so no outage, however long, burns a valid
//! message into the DLQ. A record whose requeue fails is reported as before; one with
//! attributes that cannot be sent again as they came (binary or number values, or no room
//! for the counter under SQS's 10) is reported too. A single record failing while the store
//! answers is reported, not requeued: nothing tells a store that refuses every write from a
//! record it chokes on, and requeuing would keep such a record from ever reaching the DLQ
//! (the poller's breaker reasons the same way).
//!
//! The batch is written in one store call first (one transaction for the whole batch); when
//! that call fails transiently or panics, records are written one by one so a single record
//! that the store chokes on (a locked row) is the only one retried. An SQS record always
//! has a message id; should one lack it and need a retry, the handler fails the whole
//! invocation (everything is retried, nothing lost) since it cannot name it.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent, SqsMessage};
use shared::aws::sqs::MAX_MESSAGE_ATTRIBUTES;
use shared::source::ATTR_REQUEUES;
use shared::{DeadLetterQueue, Delivery, DeliveryId, Requeue, Requeued, Sink};
use tracing::{debug, error, info, warn};

use crate::core::{
    prepare, write_prepared, BatchOutcome, CoreConfig, Decision, PreparedDelivery, SinkHealth,
};
use crate::emf::{self, EmfTarget, InvocationCounts};
use crate::metrics::{Metrics, MetricsSnapshot};

/// The SQS system attribute carrying how many times a message was received.
const ATTR_RECEIVE_COUNT: &str = "ApproximateReceiveCount";

/// How the Lambda handler behaves.
#[derive(Debug, Clone)]
pub struct LambdaConfig {
    /// The batch core's rules.
    pub core: CoreConfig,
    /// A record is started only while at least this much time is left before the
    /// invocation's deadline; later ones are reported for retry. Default 2 s.
    pub deadline_margin: Duration,
    /// While writing records one by one, this many transient failures in a row with nothing
    /// stored mean the store is down: the remaining records are reported without trying.
    /// Default 3.
    pub max_consecutive_failures: usize,
}

impl Default for LambdaConfig {
    fn default() -> Self {
        Self {
            core: CoreConfig::default(),
            deadline_margin: Duration::from_secs(2),
            max_consecutive_failures: 3,
        }
    }
}

/// Why an invocation failed as a whole (Lambda then retries every record).
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// A record to retry has no message id, so it cannot be reported on its own.
    #[error(
        "{0} record(s) to retry have no messageId; failing the whole batch so they are retried"
    )]
    UnnamedFailures(usize),
    /// Every record of the batch is to be retried (the store is down and could not take
    /// them): an error says so whether or not the event source mapping reports item failures.
    #[error("all {0} record(s) are to be retried; failing the whole batch so they are retried")]
    EveryRecordRetried(usize),
}

/// The SQS handler with its clients, built once per execution environment.
#[derive(Debug, Clone)]
pub struct SqsHandler {
    sink: Arc<dyn Sink>,
    dlq: Option<Arc<dyn DeadLetterQueue>>,
    requeue: Option<Arc<dyn Requeue>>,
    config: LambdaConfig,
    metrics: Arc<Metrics>,
    emf: Option<EmfTarget>,
}

/// What became of one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Done,
    /// Reported for retry (a panic, a DLQ that did not take its letters).
    Retry,
    /// Held back by the store (a transient failure, not tried because the store is down, or
    /// not started before the deadline): reported for retry, or requeued when the store is
    /// down.
    Held,
}

/// How a write in its own task ended.
enum Written {
    Outcome(crate::core::BatchOutcome),
    Panicked,
    /// Still running at the cutoff; cancelled.
    TimedOut,
}

/// What writing records one by one learnt about the store.
#[derive(Debug, Clone, Copy, Default)]
struct Probe {
    /// Some write reached the store (stored, or refused data permanently).
    answered: bool,
    /// Records whose write failed transiently or got no answer before the cutoff.
    failed: usize,
}

impl SqsHandler {
    /// A handler writing to `sink` and dead-lettering to `dlq` (without one, permanent
    /// failures are retried until the queue's redrive policy moves them).
    pub fn new(
        sink: Arc<dyn Sink>,
        dlq: Option<Arc<dyn DeadLetterQueue>>,
        config: LambdaConfig,
    ) -> Self {
        Self {
            sink,
            dlq,
            requeue: None,
            config,
            metrics: Arc::new(Metrics::new()),
            emf: None,
        }
    }

    /// Logs each invocation's counts as CloudWatch Embedded Metric Format to stdout (one
    /// JSON line; see [`emf`]).
    #[must_use]
    pub fn with_emf(mut self, target: EmfTarget) -> Self {
        self.emf = Some(target);
        self
    }

    /// The counters since this execution environment started (`batches` counts
    /// invocations).
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    /// Puts the records held back by a store outage back on the queue through `requeue`
    /// instead of reporting them (see the module docs).
    #[must_use]
    pub fn with_requeue(mut self, requeue: Arc<dyn Requeue>) -> Self {
        self.requeue = Some(requeue);
        self
    }

    /// Handles one SQS batch that must be finished by `deadline`.
    ///
    /// # Errors
    /// [`HandlerError::UnnamedFailures`] when a record to retry has no message id;
    /// [`HandlerError::EveryRecordRetried`] when every record is to be retried.
    pub async fn handle(
        &self,
        event: SqsEvent,
        deadline: SystemTime,
    ) -> Result<SqsBatchResponse, HandlerError> {
        let started = std::time::Instant::now();
        // One invocation at a time per execution environment: the difference of two
        // snapshots is this invocation's.
        let before = self.metrics.snapshot();
        self.metrics.add_batches(1);
        self.metrics.add_received(event.records.len() as u64);
        let cutoff = deadline
            .checked_sub(self.config.deadline_margin)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let sendable: Vec<bool> = event.records.iter().map(sendable_as_is).collect();
        let deliveries: Vec<Delivery> = event.records.into_iter().map(delivery).collect();
        let mut fates = vec![Fate::Retry; deliveries.len()];
        let mut store_down = false;

        // Decode and validate each record on its own: a panic fails that record only.
        let mut prepared: Vec<(usize, PreparedDelivery)> = Vec::with_capacity(deliveries.len());
        for (i, d) in deliveries.iter().enumerate() {
            match std::panic::catch_unwind(AssertUnwindSafe(|| prepare(d, &self.config.core))) {
                Ok(p) => prepared.push((i, p)),
                Err(_) => {
                    self.metrics.add_write_panics(1);
                    error!(message_id = %d.message_id, "Panic while decoding record; reporting it for retry");
                }
            }
        }

        if SystemTime::now() < cutoff && !prepared.is_empty() {
            let batch: Vec<PreparedDelivery> = prepared.iter().map(|(_, p)| p.clone()).collect();
            match self.write(batch, cutoff).await {
                Written::Outcome(outcome) if outcome.sink_health != SinkHealth::Unavailable => {
                    self.count_written(&outcome);
                    // At once: each letter is a round trip to the DLQ, and one after the
                    // other they ran into the deadline while it was slow.
                    let settled = futures::future::join_all(
                        prepared
                            .iter()
                            .zip(outcome.settlements)
                            .map(|((i, _), s)| self.settle(&deliveries[*i], s.decision, deadline)),
                    )
                    .await;
                    for ((i, _), fate) in prepared.iter().zip(settled) {
                        fates[*i] = fate;
                    }
                }
                Written::TimedOut => {
                    warn!(
                        records = prepared.len(),
                        "Store did not answer before the invocation deadline; holding every record back"
                    );
                    for (i, _) in &prepared {
                        fates[*i] = Fate::Held;
                    }
                    // A store that hangs (a black-holed connection, a lock held for good)
                    // is as down as one that refuses: left to report, every invocation
                    // would use up a receive of each record until the redrive moves valid
                    // messages to the DLQ.
                    store_down = prepared.len() >= 2 || !self.store_answers(deadline).await;
                }
                whole => {
                    // A batch refused by the store is written delivery by delivery by the
                    // core: what it stored before failing is counted now, and found again
                    // (as duplicates) by the writes below.
                    if let Written::Outcome(outcome) = &whole {
                        self.count_written(outcome);
                    }
                    if matches!(whole, Written::Panicked) {
                        self.metrics.add_write_panics(1);
                        warn!("Panic while writing the batch; writing records one by one");
                    } else {
                        warn!("Store failed transiently on the batch; writing records one by one");
                    }
                    let probe = self
                        .write_one_by_one(&deliveries, prepared, (cutoff, deadline), &mut fates)
                        .await;
                    store_down = probe.failed > 0
                        && !probe.answered
                        && (probe.failed >= 2 || !self.store_answers(deadline).await);
                }
            }
        } else if !prepared.is_empty() {
            warn!(
                records = prepared.len(),
                "Invocation deadline too close; reporting every record for retry"
            );
            for (i, _) in &prepared {
                fates[*i] = Fate::Held;
            }
        }
        let requeued = if store_down {
            self.requeue_held(&deliveries, &sendable, &mut fates, deadline)
                .await
        } else {
            0
        };

        let mut response = SqsBatchResponse::default();
        let mut unnamed = 0;
        for (d, fate) in deliveries.iter().zip(&fates) {
            if *fate != Fate::Done {
                if d.message_id.is_empty() {
                    unnamed += 1;
                } else {
                    let mut failure = BatchItemFailure::default();
                    failure.item_identifier = d.message_id.clone();
                    response.batch_item_failures.push(failure);
                }
            }
        }
        let retried = response.batch_item_failures.len() + unnamed;
        self.metrics.add_retried(retried as u64);
        self.metrics.add_requeued(requeued as u64);
        let counts = invocation_counts(&before, &self.metrics.snapshot());
        info!(
            records = deliveries.len(),
            written = counts.events_written,
            duplicates = counts.events_duplicate,
            dead_lettered = counts.dead_letters,
            retried,
            requeued,
            dead_letter_failures = counts.dead_letter_failures,
            panics = counts.panics,
            elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "Handled SQS batch"
        );
        if let Some(target) = &self.emf {
            shared::emf::emit(&emf::line(
                target,
                &counts,
                before.batches == 0,
                SystemTime::now(),
            ));
        }
        if unnamed > 0 {
            return Err(HandlerError::UnnamedFailures(unnamed));
        }
        // An event source mapping without `ReportBatchItemFailures` ignores the list and
        // deletes the whole batch on a success: when nothing of it was done, an error keeps
        // it either way (with the setting on, it means the same as listing every record).
        if retried > 0 && retried == deliveries.len() {
            return Err(HandlerError::EveryRecordRetried(retried));
        }
        Ok(response)
    }

    /// Whether the store answers a ping within half the time left before `deadline` (the
    /// rest is for requeuing and answering): one that does not is down.
    async fn store_answers(&self, deadline: SystemTime) -> bool {
        let left = deadline
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            / 2;
        matches!(
            tokio::time::timeout(left, self.sink.ping()).await,
            Ok(Ok(()))
        )
    }

    fn count_written(&self, outcome: &BatchOutcome) {
        self.metrics.add_written(outcome.written.inserted as u64);
        self.metrics
            .add_duplicates(outcome.written.duplicates as u64);
    }

    /// Writes prepared deliveries in a task of their own, so a panic is caught, and gives up
    /// at `cutoff`: a store that hangs (a black-holed connection, a lock wait) must not run
    /// the invocation into Lambda's timeout, which would fail the whole batch and use up a
    /// receive of every record. A write given up is cancelled; its transaction, if any, rolls
    /// back with its connection, and its records are retried (idempotently).
    async fn write(&self, batch: Vec<PreparedDelivery>, cutoff: SystemTime) -> Written {
        let sink = self.sink.clone();
        let core = self.config.core.clone();
        let mut task =
            tokio::spawn(async move { write_prepared(batch, sink.as_ref(), &core).await });
        let left = cutoff.duration_since(SystemTime::now()).unwrap_or_default();
        match tokio::time::timeout(left, &mut task).await {
            Ok(Ok(outcome)) => Written::Outcome(outcome),
            Ok(Err(_)) => Written::Panicked,
            Err(_) => {
                task.abort();
                Written::TimedOut
            }
        }
    }

    async fn write_one_by_one(
        &self,
        deliveries: &[Delivery],
        prepared: Vec<(usize, PreparedDelivery)>,
        (cutoff, deadline): (SystemTime, SystemTime),
        fates: &mut [Fate],
    ) -> Probe {
        let mut probe = Probe::default();
        let mut consecutive_failures = 0;
        for (i, p) in prepared {
            let d = &deliveries[i];
            if SystemTime::now() >= cutoff {
                warn!(message_id = %d.message_id, "Deadline near; record not started, reporting it for retry");
                fates[i] = Fate::Held;
                continue;
            }
            // A record with nothing to write (an undecodable one) is still settled.
            if consecutive_failures >= self.config.max_consecutive_failures.max(1)
                && p.event_count() > 0
            {
                fates[i] = Fate::Held;
                continue;
            }
            match self.write(vec![p], cutoff).await {
                Written::Outcome(outcome) => {
                    self.count_written(&outcome);
                    match outcome.sink_health {
                        SinkHealth::Unavailable => {
                            consecutive_failures += 1;
                            probe.failed += 1;
                        }
                        SinkHealth::Healthy => {
                            consecutive_failures = 0;
                            probe.answered = true;
                        }
                        SinkHealth::Untouched => consecutive_failures = 0,
                    }
                    if let Some(s) = outcome.settlements.into_iter().next() {
                        fates[i] = self.settle(d, s.decision, deadline).await;
                    }
                }
                Written::Panicked => {
                    self.metrics.add_write_panics(1);
                    error!(message_id = %d.message_id, "Panic while writing record; reporting it for retry");
                }
                Written::TimedOut => {
                    warn!(message_id = %d.message_id, "Store did not answer before the invocation deadline; holding the record back");
                    fates[i] = Fate::Held;
                    probe.failed += 1;
                }
            }
        }
        if consecutive_failures >= self.config.max_consecutive_failures.max(1) {
            warn!(
                failures = consecutive_failures,
                "Store keeps failing; holding back the remaining records without trying them"
            );
        }
        probe
    }

    /// The store is down: puts the records it held back on the queue again as new messages,
    /// each delayed by the retry backoff of its requeue count; those the queue took are done.
    /// Returns how many it requeued.
    async fn requeue_held(
        &self,
        deliveries: &[Delivery],
        sendable: &[bool],
        fates: &mut [Fate],
        deadline: SystemTime,
    ) -> usize {
        let held: Vec<usize> = (0..fates.len())
            .filter(|&i| fates[i] == Fate::Held)
            .collect();
        let Some(requeue) = &self.requeue else {
            warn!(
                records = held.len(),
                "Store down and no SPILLWAY_QUEUE_URL to requeue to: reporting the records, which uses up their receives"
            );
            return 0;
        };
        let (picked, unsendable): (Vec<usize>, Vec<usize>) =
            held.into_iter().partition(|&i| sendable[i]);
        for &i in &unsendable {
            warn!(message_id = %deliveries[i].message_id, "Attributes cannot be sent again as they came; reporting the record instead of requeuing it");
        }
        if picked.is_empty() {
            return 0;
        }
        let messages: Vec<Requeued> = picked
            .iter()
            .map(|&i| requeued(&deliveries[i], &self.config.core))
            .collect();
        let Some(results) = before_deadline(deadline, requeue.requeue(&messages)).await else {
            warn!(
                records = picked.len(),
                "Requeue did not finish before the invocation deadline; reporting the records (some may also be on the queue again: duplicates the store ignores)"
            );
            return 0;
        };
        let mut sent = 0_usize;
        for ((&i, result), m) in picked.iter().zip(results).zip(&messages) {
            match result {
                Ok(()) => {
                    fates[i] = Fate::Done;
                    sent += 1;
                    debug!(
                        message_id = %deliveries[i].message_id,
                        requeues = %m.attributes.get(ATTR_REQUEUES).map_or("", String::as_str),
                        delay_secs = m.delay.as_secs(),
                        "Requeued"
                    );
                }
                Err(e) => {
                    warn!(message_id = %deliveries[i].message_id, error = %e, "Requeue failed; reporting the record for retry");
                }
            }
        }
        warn!(
            requeued = sent,
            failed = picked.len() - sent,
            longest_delay_secs = messages
                .iter()
                .map(|m| m.delay.as_secs())
                .max()
                .unwrap_or(0),
            "Store down: records put back on the queue as new messages"
        );
        sent
    }

    /// Carries out a decision; whether the record is done or must be retried.
    async fn settle(&self, d: &Delivery, decision: Decision, deadline: SystemTime) -> Fate {
        match decision {
            Decision::Ack => Fate::Done,
            Decision::RetryLater(_) => Fate::Held,
            Decision::AckWithLetters(letters) | Decision::DeadLetter(letters) => {
                let Some(dlq) = &self.dlq else {
                    self.metrics.add_settle_errors(1);
                    warn!(message_id = %d.message_id, "No DLQ configured; leaving the permanent failure to the queue's redrive");
                    return Fate::Retry;
                };
                let Some(sent) = before_deadline(deadline, dlq.send(&letters)).await else {
                    self.metrics.add_settle_errors(1);
                    warn!(message_id = %d.message_id, "DLQ send did not finish before the invocation deadline; reporting the record for retry");
                    return Fate::Retry;
                };
                match sent {
                    Ok(()) => {
                        self.metrics.add_dead_lettered(letters.len() as u64);
                        info!(
                            message_id = %d.message_id,
                            letters = letters.len(),
                            reason = %letters.first().map_or("", |l| l.reason.code.as_str()),
                            "Dead-lettered"
                        );
                        Fate::Done
                    }
                    Err(e) => {
                        self.metrics.add_settle_errors(1);
                        warn!(message_id = %d.message_id, error = %e, "DLQ send failed; reporting the record for retry");
                        Fate::Retry
                    }
                }
            }
        }
    }
}

/// Time kept after any call the handler makes, to answer the runtime before the deadline.
const ANSWER_RESERVE: Duration = Duration::from_millis(250);

/// `call`'s result, or `None` when it would run into the last [`ANSWER_RESERVE`] before
/// `deadline`: past the deadline Lambda fails the whole invocation, and every record of the
/// batch, stored or not, comes back with a receive used up.
async fn before_deadline<T>(
    deadline: SystemTime,
    call: impl std::future::Future<Output = T>,
) -> Option<T> {
    let left = deadline
        .duration_since(SystemTime::now())
        .unwrap_or_default()
        .saturating_sub(ANSWER_RESERVE);
    tokio::time::timeout(left, call).await.ok()
}

/// What one invocation did: the counters after it less those before.
fn invocation_counts(before: &MetricsSnapshot, after: &MetricsSnapshot) -> InvocationCounts {
    InvocationCounts {
        records: after.received - before.received,
        events_written: after.written - before.written,
        events_duplicate: after.duplicates - before.duplicates,
        dead_letters: after.dead_lettered - before.dead_lettered,
        records_retried: after.retried - before.retried,
        records_requeued: after.requeued - before.requeued,
        dead_letter_failures: after.settle_errors - before.settle_errors,
        panics: after.write_panics - before.write_panics,
    }
}

/// Whether a record can be sent again exactly as it came: every attribute a string, and room
/// for the requeue counter under SQS's limit.
fn sendable_as_is(m: &SqsMessage) -> bool {
    let strings = m.message_attributes.values().all(|v| {
        v.string_value.is_some()
            && v.data_type
                .as_deref()
                .is_none_or(|t| t.starts_with("String"))
    });
    let room = m.message_attributes.contains_key(ATTR_REQUEUES)
        || m.message_attributes.len() < MAX_MESSAGE_ATTRIBUTES;
    strings && room
}

/// `d` as a new message: the same body and attributes, the requeue counter one higher, and a
/// delay of the retry backoff for that count (so an outage is retried ever more slowly).
fn requeued(d: &Delivery, core: &CoreConfig) -> Requeued {
    let before: u32 = d
        .attributes
        .get(ATTR_REQUEUES)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let count = before.saturating_add(1);
    let mut attributes = d.attributes.clone();
    attributes.insert(ATTR_REQUEUES.to_owned(), count.to_string());
    Requeued {
        body: d.body.clone(),
        attributes,
        delay: core.retry_delay(count),
    }
}

/// One SQS record as a delivery (the message id is its receipt here: the event source mapping
/// settles by message id).
fn delivery(m: SqsMessage) -> Delivery {
    let message_id = m.message_id.unwrap_or_default();
    let attributes: BTreeMap<String, String> = m
        .message_attributes
        .into_iter()
        .filter_map(|(k, v)| v.string_value.map(|s| (k, s)))
        .collect();
    let receive_count = m
        .attributes
        .get(ATTR_RECEIVE_COUNT)
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    Delivery {
        id: DeliveryId(message_id.clone()),
        message_id,
        body: m.body.unwrap_or_default(),
        attributes,
        receive_count,
        body_error: None,
    }
}

/// Serves SQS batches from the Lambda Runtime API until the process is stopped.
///
/// # Errors
/// The runtime's error when the Runtime API cannot be reached.
pub async fn run(handler: SqsHandler) -> Result<(), lambda_runtime::Error> {
    lambda_runtime::run(lambda_runtime::service_fn(
        move |event: lambda_runtime::LambdaEvent<SqsEvent>| {
            let handler = handler.clone();
            async move {
                handler
                    .handle(event.payload, event.context.deadline())
                    .await
                    .map_err(lambda_runtime::Error::from)
            }
        },
    ))
    .await
}
