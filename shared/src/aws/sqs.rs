//! SQS source: long polling, batch delete, visibility changes for backoff and heartbeat,
//! and dead-lettering that sends to the DLQ first and deletes after.
//!
//! A delete or visibility change of many receipts goes out in calls of ten; every call is
//! sent whatever the previous one answered, entries SQS failed on its side are retried, and
//! the failures are reported together at the end.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_sqs::types::{
    BatchResultErrorEntry, ChangeMessageVisibilityBatchRequestEntry,
    DeleteMessageBatchRequestEntry, MessageAttributeValue, MessageSystemAttributeName,
    SendMessageBatchRequestEntry,
};
use aws_sdk_sqs::Client;
use futures::StreamExt;
use sha2::{Digest, Sha256};

use super::batch::{self, MAX_BATCH_BYTES};
use super::{ApiCalls, CallCounter};
use crate::envelope::ATTR_CONTENT_ENCODING;
use crate::source::{
    DeadLetter, DeadLetterQueue, Delivery, DeliveryId, Requeue, Requeued, Source, SourceError,
    ATTR_ERROR_CODE, ATTR_ERROR_MESSAGE,
};

/// Most messages per receive and entries per batch call.
pub const MAX_BATCH_ENTRIES: usize = batch::MAX_BATCH_ENTRIES;
/// Longest long-poll wait SQS allows.
pub const MAX_WAIT_SECS: u64 = 20;
/// `SendMessageBatch` calls a requeue keeps in flight at once.
const REQUEUE_CALLS_IN_FLIGHT: usize = 8;

/// Longest delay SQS allows on a message sent (15 minutes).
pub const MAX_DELAY_SECS: u64 = 900;
/// Longest visibility timeout SQS allows (12 hours).
pub const MAX_VISIBILITY_SECS: u64 = 43_200;
/// SQS caps a message attribute value (and we keep reasons short).
const MAX_REASON_BYTES: usize = 1_024;
pub use crate::source::MAX_MESSAGE_ATTRIBUTES;
/// Calls per receipt for a delete or visibility change that SQS failed on its side.
const MAX_RECEIPT_ATTEMPTS: u32 = 3;
/// Pause before the second call for such receipts; doubled before each further one.
const RECEIPT_RETRY_BACKOFF: Duration = Duration::from_millis(100);
/// The data type SQS counts in a string attribute's size.
const STRING_TYPE: &str = "String";

/// Settings of the SQS source.
#[derive(Debug, Clone)]
pub struct SqsConfig {
    /// The queue the worker drains.
    pub queue_url: String,
    /// Its dead-letter queue, for permanent failures (sent there at once).
    pub dlq_url: Option<String>,
}

/// Receives from an SQS queue. Clones share one call counter.
#[derive(Debug, Clone)]
pub struct SqsSource {
    client: Client,
    config: SqsConfig,
    calls: Arc<CallCounter>,
    /// What receives ask the messages be hidden for, in seconds (`None`: the queue's own
    /// visibility timeout).
    visibility_secs: Option<i32>,
}

impl SqsSource {
    /// A source over a client built once from the standard AWS configuration.
    pub fn new(client: Client, config: SqsConfig) -> Self {
        Self {
            client,
            config,
            calls: Arc::default(),
            visibility_secs: None,
        }
    }

    /// Receives hide each message for `timeout` (whole seconds, rounded up, 1 s to 12 h)
    /// instead of the queue's own visibility timeout. A worker's heartbeat extends a running
    /// batch on a schedule computed from its `--visibility-timeout-secs`; were the queue
    /// created with a shorter timeout, the batch would be redelivered (and its receive count
    /// raised) before the first heartbeat.
    #[must_use]
    pub fn with_visibility_timeout(mut self, timeout: Duration) -> Self {
        let secs = u64::try_from(timeout.as_millis().div_ceil(1_000))
            .unwrap_or(MAX_VISIBILITY_SECS)
            .clamp(1, MAX_VISIBILITY_SECS);
        self.visibility_secs = i32::try_from(secs).ok();
        self
    }

    /// The SQS API calls made so far (by this source and its clones), by operation.
    pub fn calls(&self) -> ApiCalls {
        self.calls.snapshot()
    }

    fn error<E>(&self, queue: &str, err: &aws_sdk_sqs::error::SdkError<E>) -> SourceError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        sdk_error(queue, err)
    }

    async fn change_visibility(&self, items: &[(DeliveryId, Duration)]) -> Result<(), SourceError> {
        let receipts: Vec<(&DeliveryId, i32)> = items
            .iter()
            .map(|(id, delay)| {
                // Whole seconds, rounded up: a backoff is never shortened (1.6 s → 2 s).
                let secs = u64::try_from(delay.as_millis().div_ceil(1_000))
                    .unwrap_or(MAX_VISIBILITY_SECS)
                    .clamp(1, MAX_VISIBILITY_SECS);
                (id, i32::try_from(secs).unwrap_or(i32::MAX))
            })
            .collect();
        self.settle(Settle::ChangeVisibility, &receipts).await
    }

    /// Deletes receipts or changes their visibility (to the `i32`, in seconds; a delete
    /// ignores it), in calls of ten.
    /// Every call is sent; entries SQS failed on its side are sent again, up to
    /// [`MAX_RECEIPT_ATTEMPTS`] calls each; the rest of the failures are reported at the end.
    async fn settle(&self, op: Settle, receipts: &[(&DeliveryId, i32)]) -> Result<(), SourceError> {
        let mut unsettled = Unsettled::default();
        let mut pending = receipts.to_vec();
        let mut backoff = RECEIPT_RETRY_BACKOFF;
        for attempt in 1..=MAX_RECEIPT_ATTEMPTS {
            let mut again = Vec::new();
            for chunk in pending.chunks(MAX_BATCH_ENTRIES) {
                let failed = match self.settle_batch(op, chunk).await {
                    Ok(failed) => failed,
                    Err(e) => {
                        // The SDK has retried the call itself already.
                        unsettled.call_failed(chunk.len(), &e);
                        continue;
                    }
                };
                for f in &failed {
                    let receipt = f.id().parse::<usize>().ok().and_then(|i| chunk.get(i));
                    match receipt {
                        Some(&r) if retryable(f) && attempt < MAX_RECEIPT_ATTEMPTS => again.push(r),
                        _ => unsettled.entry_failed(f),
                    }
                }
            }
            if again.is_empty() {
                break;
            }
            tracing::debug!(
                queue = %self.config.queue_url,
                operation = op.operation(),
                receipts = again.len(),
                attempt,
                "Retrying entries SQS failed on its side"
            );
            tokio::time::sleep(backoff).await;
            backoff = backoff.saturating_mul(2);
            pending = again;
        }
        unsettled.into_result(&self.config.queue_url, op, receipts.len())
    }

    /// One call of at most ten entries, each with its index as its id; the failed entries.
    async fn settle_batch(
        &self,
        op: Settle,
        receipts: &[(&DeliveryId, i32)],
    ) -> Result<Vec<BatchResultErrorEntry>, SourceError> {
        let queue = &self.config.queue_url;
        self.calls.count(op.operation());
        let failed = match op {
            Settle::Delete => {
                let entries = receipts
                    .iter()
                    .enumerate()
                    .map(|(i, (id, _))| {
                        DeleteMessageBatchRequestEntry::builder()
                            .id(i.to_string())
                            .receipt_handle(&id.0)
                            .build()
                            .map_err(|e| self.rejected(e.to_string()))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                self.client
                    .delete_message_batch()
                    .queue_url(queue)
                    .set_entries(Some(entries))
                    .send()
                    .await
                    .map_err(|e| self.error(queue, &e))?
                    .failed
            }
            Settle::ChangeVisibility => {
                let entries = receipts
                    .iter()
                    .enumerate()
                    .map(|(i, (id, secs))| {
                        ChangeMessageVisibilityBatchRequestEntry::builder()
                            .id(i.to_string())
                            .receipt_handle(&id.0)
                            .visibility_timeout(*secs)
                            .build()
                            .map_err(|e| self.rejected(e.to_string()))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                self.client
                    .change_message_visibility_batch()
                    .queue_url(queue)
                    .set_entries(Some(entries))
                    .send()
                    .await
                    .map_err(|e| self.error(queue, &e))?
                    .failed
            }
        };
        Ok(failed)
    }

    fn rejected(&self, message: String) -> SourceError {
        SourceError::Rejected {
            queue: self.config.queue_url.clone(),
            message,
        }
    }
}

/// What [`SqsSource::settle`] does to each receipt.
#[derive(Debug, Clone, Copy)]
enum Settle {
    /// `DeleteMessageBatch`.
    Delete,
    /// `ChangeMessageVisibilityBatch`.
    ChangeVisibility,
}

impl Settle {
    fn operation(self) -> &'static str {
        match self {
            Self::Delete => "DeleteMessageBatch",
            Self::ChangeVisibility => "ChangeMessageVisibilityBatch",
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Self::Delete => "delete",
            Self::ChangeVisibility => "change visibility",
        }
    }
}

/// Whether sending a failed entry again can help: only when SQS failed on its side, never
/// for a bad or stale receipt handle (LocalStack reports those with `SenderFault=false`).
fn retryable(f: &BatchResultErrorEntry) -> bool {
    let code = f.code();
    let code = code.strip_prefix("AWS.SimpleQueueService.").unwrap_or(code);
    !f.sender_fault()
        && !matches!(
            code,
            "ReceiptHandleIsInvalid" | "InvalidParameterValue" | "MessageNotInflight"
        )
}

/// The receipts a [`Settle`] left unsettled, by error code.
#[derive(Debug, Default)]
struct Unsettled {
    /// Receipts in all.
    count: usize,
    /// Whether any of them might be settled by a later call.
    transient: bool,
    /// Per code: how many, and the first message.
    by_code: BTreeMap<String, (usize, String)>,
}

impl Unsettled {
    fn entry_failed(&mut self, f: &BatchResultErrorEntry) {
        self.add(1, f.code(), f.message().unwrap_or(""), retryable(f));
    }

    fn call_failed(&mut self, receipts: usize, err: &SourceError) {
        let message = match err {
            SourceError::Unavailable { message, .. } | SourceError::Rejected { message, .. } => {
                message
            }
        };
        self.add(receipts, "call failed", message, err.is_transient());
    }

    fn add(&mut self, receipts: usize, code: &str, message: &str, transient: bool) {
        self.count += receipts;
        self.transient |= transient;
        self.by_code
            .entry(code.to_owned())
            .or_insert_with(|| (0, message.to_owned()))
            .0 += receipts;
    }

    /// `Ok` when nothing was left; otherwise one error naming how many of `total` receipts
    /// failed and why, transient when any of them might succeed later.
    fn into_result(self, queue: &str, op: Settle, total: usize) -> Result<(), SourceError> {
        if self.count == 0 {
            return Ok(());
        }
        let why: Vec<String> = self
            .by_code
            .iter()
            .map(|(code, (n, message))| format!("{n} × {code} ({message})"))
            .collect();
        let message = format!(
            "{} failed for {} of {total} entries: {}",
            op.verb(),
            self.count,
            why.join("; ")
        );
        let queue = queue.to_owned();
        Err(if self.transient {
            SourceError::Unavailable { queue, message }
        } else {
            SourceError::Rejected { queue, message }
        })
    }
}

fn string_attr(value: &str) -> Result<MessageAttributeValue, SourceError> {
    MessageAttributeValue::builder()
        .data_type(STRING_TYPE)
        .string_value(value)
        .build()
        .map_err(|e| SourceError::Rejected {
            queue: String::new(),
            message: e.to_string(),
        })
}

#[async_trait]
impl Source for SqsSource {
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, SourceError> {
        let max = i32::try_from(max.clamp(1, MAX_BATCH_ENTRIES)).unwrap_or(10);
        // Whole seconds, rounded up: a sub-second wait (a batch still coalescing) must stay a
        // long poll; `WaitTimeSeconds=0` is a short poll that returns at once, empty or not, and
        // a caller looping until its deadline would spin on empty receives.
        let wait_secs = u64::try_from(wait.as_millis().div_ceil(1_000)).unwrap_or(MAX_WAIT_SECS);
        let wait = i32::try_from(wait_secs.min(MAX_WAIT_SECS)).unwrap_or(20);
        self.calls.count("ReceiveMessage");
        let out = self
            .client
            .receive_message()
            .queue_url(&self.config.queue_url)
            .max_number_of_messages(max)
            .wait_time_seconds(wait)
            .set_visibility_timeout(self.visibility_secs)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_attribute_names("All")
            .send()
            .await
            .map_err(|e| self.error(&self.config.queue_url, &e))?;
        let mut deliveries = Vec::new();
        for m in out.messages() {
            let Some(receipt) = m.receipt_handle() else {
                continue;
            };
            let attributes: BTreeMap<String, String> = m
                .message_attributes()
                .into_iter()
                .flatten()
                .filter_map(|(k, v)| v.string_value().map(|s| (k.clone(), s.to_owned())))
                .collect();
            let receive_count = m
                .attributes()
                .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                .and_then(|v| v.parse().ok())
                .unwrap_or(1);
            deliveries.push(Delivery {
                id: DeliveryId(receipt.to_owned()),
                message_id: m.message_id().unwrap_or_default().to_owned(),
                body: m.body().unwrap_or_default().to_owned(),
                attributes,
                receive_count,
                body_error: None,
            });
        }
        Ok(deliveries)
    }

    async fn ack(&self, ids: &[DeliveryId]) -> Result<(), SourceError> {
        let receipts: Vec<(&DeliveryId, i32)> = ids.iter().map(|id| (id, 0)).collect();
        self.settle(Settle::Delete, &receipts).await
    }

    async fn retry_later(&self, items: &[(DeliveryId, Duration)]) -> Result<(), SourceError> {
        self.change_visibility(items).await
    }

    async fn extend(&self, ids: &[DeliveryId], by: Duration) -> Result<(), SourceError> {
        let items: Vec<(DeliveryId, Duration)> = ids.iter().map(|id| (id.clone(), by)).collect();
        self.change_visibility(&items).await
    }

    async fn dead_letter(
        &self,
        id: &DeliveryId,
        letters: &[DeadLetter],
    ) -> Result<(), SourceError> {
        let dlq = self.config.dlq_url.as_deref().ok_or_else(|| {
            self.rejected("no dead-letter queue configured (set the DLQ URL)".into())
        })?;
        send_letters(&self.client, dlq, &self.calls, letters).await?;
        // Only after the DLQ acknowledged every letter.
        self.ack(std::slice::from_ref(id)).await
    }
}

/// Sends letters to an SQS queue with their reason attributes, in batches of at most ten
/// entries and [`MAX_BATCH_BYTES`]; stops at the first batch the queue did not take whole.
/// A letter over that size on its own is refused before anything is sent: no retry helps it.
async fn send_letters(
    client: &Client,
    dlq: &str,
    calls: &CallCounter,
    letters: &[DeadLetter],
) -> Result<(), SourceError> {
    let outgoing: Vec<Outgoing<'_>> = letters
        .iter()
        .map(|l| {
            let attributes = letter_attributes(l);
            let fifo = dlq.ends_with(".fifo").then(|| {
                (
                    LETTER_GROUP_ID,
                    letter_dedup_id(l.body.as_str(), &attributes),
                )
            });
            Outgoing {
                body: &l.body,
                attributes,
                delay: Duration::ZERO,
                fifo,
            }
        })
        .collect();
    let sizes: Vec<usize> = outgoing.iter().map(Outgoing::payload_bytes).collect();
    if let Some((i, bytes)) = sizes
        .iter()
        .enumerate()
        .find(|(_, b)| **b > MAX_BATCH_BYTES)
    {
        return Err(SourceError::Rejected {
            queue: dlq.to_owned(),
            message: format!(
                "dead letter {} of {} is {bytes} bytes with its attributes, over the \
                 {MAX_BATCH_BYTES} SQS takes in one message; no letter was sent",
                i + 1,
                letters.len()
            ),
        });
    }
    for range in batch::plan(sizes) {
        let results = send_batch(client, dlq, calls, &outgoing[range]).await;
        if let Some(e) = results.into_iter().find_map(Result::err) {
            return Err(e);
        }
    }
    Ok(())
}

/// One message of a `SendMessageBatch`.
struct Outgoing<'a> {
    body: &'a str,
    /// String attributes.
    attributes: Vec<(&'a str, Cow<'a, str>)>,
    /// Rounded up to whole seconds, at most [`MAX_DELAY_SECS`].
    delay: Duration,
    /// `MessageGroupId` and `MessageDeduplicationId`, for a FIFO queue.
    fifo: Option<(&'a str, String)>,
}

impl Outgoing<'_> {
    /// What the message counts for against SQS's size limits: its body, and each attribute's
    /// name, data type and value.
    fn payload_bytes(&self) -> usize {
        self.body.len()
            + self
                .attributes
                .iter()
                .map(|(k, v)| k.len() + STRING_TYPE.len() + v.len())
                .sum::<usize>()
    }
}

/// Sends up to ten messages to `queue` in one `SendMessageBatch`; one result per message, in
/// order.
async fn send_batch(
    client: &Client,
    queue: &str,
    calls: &CallCounter,
    messages: &[Outgoing<'_>],
) -> Vec<Result<(), SourceError>> {
    let all = |err: SourceError| messages.iter().map(|_| Err(err.clone())).collect();
    let rejected = |message: String| SourceError::Rejected {
        queue: queue.to_owned(),
        message,
    };
    let mut entries = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let secs = u64::try_from(m.delay.as_millis().div_ceil(1_000))
            .unwrap_or(MAX_DELAY_SECS)
            .min(MAX_DELAY_SECS);
        let mut b = SendMessageBatchRequestEntry::builder()
            .id(i.to_string())
            .message_body(m.body);
        if secs > 0 {
            b = b.delay_seconds(i32::try_from(secs).unwrap_or(0));
        }
        if let Some((group, dedup)) = &m.fifo {
            b = b.message_group_id(*group).message_deduplication_id(dedup);
        }
        for (k, v) in &m.attributes {
            match string_attr(v) {
                Ok(attr) => b = b.message_attributes(*k, attr),
                Err(e) => return all(rejected(e.to_string())),
            }
        }
        match b.build() {
            Ok(entry) => entries.push(entry),
            Err(e) => return all(rejected(e.to_string())),
        }
    }
    calls.count("SendMessageBatch");
    let out = match client
        .send_message_batch()
        .queue_url(queue)
        .set_entries(Some(entries))
        .send()
        .await
    {
        Ok(out) => out,
        Err(e) => return all(sdk_error(queue, &e)),
    };
    let mut results: Vec<Result<(), SourceError>> = messages.iter().map(|_| Ok(())).collect();
    for f in out.failed() {
        let Some(r) = f
            .id()
            .parse::<usize>()
            .ok()
            .and_then(|i| results.get_mut(i))
        else {
            continue;
        };
        let message = format!("send failed: {} {}", f.code(), f.message().unwrap_or(""));
        *r = Err(if f.sender_fault() {
            rejected(message)
        } else {
            SourceError::Unavailable {
                queue: queue.to_owned(),
                message,
            }
        });
    }
    results
}

/// The attributes a letter goes to the DLQ with: its reason (code and message) and as many of
/// its own attributes as SQS's limit of [`MAX_MESSAGE_ATTRIBUTES`] leaves room for, the ones
/// needed to read it back first (`content-encoding`, then Spillway's own `spillway-…`), the
/// rest in name order. Any left out are logged. Values are [`sqs_text`].
fn letter_attributes(letter: &DeadLetter) -> Vec<(&str, Cow<'_, str>)> {
    let mut out = vec![
        (ATTR_ERROR_CODE, sqs_text(&letter.reason.code)),
        (
            ATTR_ERROR_MESSAGE,
            sqs_text(crate::clip(&letter.reason.message, MAX_REASON_BYTES)),
        ),
    ];
    let mut own: Vec<(&str, Cow<'_, str>)> = letter
        .attributes
        .iter()
        .map(|(k, v)| (k.as_str(), sqs_text(v)))
        .filter(|(k, _)| *k != ATTR_ERROR_CODE && *k != ATTR_ERROR_MESSAGE)
        .collect();
    // Stable: within each rank the BTreeMap's name order stays.
    own.sort_by_key(|(k, _)| match *k {
        ATTR_CONTENT_ENCODING => 0,
        k if k.starts_with("spillway-") => 1,
        _ => 2,
    });
    let room = MAX_MESSAGE_ATTRIBUTES - out.len();
    if own.len() > room {
        let dropped: Vec<&str> = own[room..].iter().map(|(k, _)| *k).collect();
        tracing::warn!(
            ?dropped,
            "SQS takes {MAX_MESSAGE_ATTRIBUTES} message attributes: dead letter sent without these"
        );
        own.truncate(room);
    }
    out.extend(own);
    out
}

/// `text` with each character SQS refuses in a message (control characters other than tab,
/// LF and CR, U+FFFE and U+FFFF) written as `\u{…}`. A reason can quote what it refuses (an
/// unknown field named `"\u0007"` in an event): sent as it is, SQS refused the whole letter,
/// and the message was never dead-lettered.
fn sqs_text(text: &str) -> Cow<'_, str> {
    let refused = |c: char| {
        (c < ' ' && !matches!(c, '\t' | '\n' | '\r')) || ('\u{FFFE}'..='\u{FFFF}').contains(&c)
    };
    if !text.contains(refused) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if refused(c) {
            out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// The `MessageGroupId` of dead letters sent to a FIFO DLQ (one group: letters are read
/// back by `spillway dlq`, one at a time on a FIFO DLQ, not in any order that matters).
const LETTER_GROUP_ID: &str = "spillway-dead-letters";

/// The `MessageDeduplicationId` of a dead letter sent to a FIFO DLQ: a digest of its body and
/// attributes (reason included). A letter sent again because the delete that followed its
/// send failed is then the same letter to SQS within its 5-minute window, not a second copy.
fn letter_dedup_id(body: &str, attributes: &[(&str, Cow<'_, str>)]) -> String {
    let mut digest = Sha256::new();
    digest.update(body.as_bytes());
    for (k, v) in attributes {
        digest.update([0]);
        digest.update(k.as_bytes());
        digest.update([0]);
        digest.update(v.as_bytes());
    }
    hex::encode(digest.finalize())
}

/// Classifies an SQS error: a missing queue, a denied call or a bad receipt cannot be helped
/// by a retry; anything else (network, throttling, 5xx) can.
fn sdk_error<E>(queue: &str, err: &aws_sdk_sqs::error::SdkError<E>) -> SourceError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let message = format!("{}", DisplayErrorContext(err));
    let permanent = matches!(
        err.code(),
        Some(
            "AWS.SimpleQueueService.NonExistentQueue"
                | "QueueDoesNotExist"
                | "AccessDenied"
                | "AccessDeniedException"
                | "InvalidAddress"
                | "ReceiptHandleIsInvalid"
        )
    );
    if permanent {
        SourceError::Rejected {
            queue: queue.to_owned(),
            message,
        }
    } else {
        SourceError::Unavailable {
            queue: queue.to_owned(),
            message,
        }
    }
}

/// An SQS dead-letter queue on its own: `SendMessageBatch` with the reason attributes, the
/// same letters [`SqsSource::dead_letter`] sends, without deleting anything.
#[derive(Debug, Clone)]
pub struct SqsDeadLetterQueue {
    client: Client,
    dlq_url: String,
    calls: Arc<CallCounter>,
}

impl SqsDeadLetterQueue {
    /// A DLQ at `dlq_url` over a client built once from the standard AWS configuration.
    pub fn new(client: Client, dlq_url: String) -> Self {
        Self {
            client,
            dlq_url,
            calls: Arc::default(),
        }
    }

    /// The SQS API calls made so far, by operation.
    pub fn calls(&self) -> ApiCalls {
        self.calls.snapshot()
    }
}

#[async_trait]
impl DeadLetterQueue for SqsDeadLetterQueue {
    async fn send(&self, letters: &[DeadLetter]) -> Result<(), SourceError> {
        send_letters(&self.client, &self.dlq_url, &self.calls, letters).await
    }
}

/// Puts messages back on the queue a Lambda function drains (`SendMessageBatch`, with a
/// delay of at most [`MAX_DELAY_SECS`]), so a store outage does not use up their receives.
#[derive(Debug, Clone)]
pub struct SqsRequeue {
    client: Client,
    queue_url: String,
    calls: Arc<CallCounter>,
}

impl SqsRequeue {
    /// Requeues onto `queue_url` over a client built once from the standard AWS configuration.
    pub fn new(client: Client, queue_url: String) -> Self {
        Self {
            client,
            queue_url,
            calls: Arc::default(),
        }
    }

    /// The SQS API calls made so far, by operation.
    pub fn calls(&self) -> ApiCalls {
        self.calls.snapshot()
    }
}

#[async_trait]
impl Requeue for SqsRequeue {
    async fn requeue(&self, messages: &[Requeued]) -> Vec<Result<(), SourceError>> {
        let outgoing: Vec<Outgoing<'_>> = messages
            .iter()
            .map(|m| Outgoing {
                body: &m.body,
                attributes: m
                    .attributes
                    .iter()
                    .map(|(k, v)| (k.as_str(), Cow::Borrowed(v.as_str())))
                    .collect(),
                delay: m.delay,
                fifo: None,
            })
            .collect();
        // Within a call's 256 KiB as well as its ten entries: ten full envelopes are ten
        // times that. A message over the limit alone goes in a call of its own, which SQS
        // then refuses for that message only.
        // The calls go out a few at a time: a store outage on Lambda requeues whole batches
        // of full envelopes (one call each) in the little time left before the deadline.
        let sizes = outgoing.iter().map(Outgoing::payload_bytes);
        let calls = batch::plan(sizes)
            .into_iter()
            .map(|range| send_batch(&self.client, &self.queue_url, &self.calls, &outgoing[range]));
        futures::stream::iter(calls)
            .buffered(REQUEUE_CALLS_IN_FLIGHT)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .flatten()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::DeadLetterReason;

    #[test]
    fn a_letter_keeps_its_reason_and_the_attributes_needed_to_read_it_within_the_sqs_limit() {
        let mut attributes: BTreeMap<String, String> = (0..9)
            .map(|i| (format!("custom-{i}"), format!("v{i}")))
            .collect();
        attributes.insert(ATTR_CONTENT_ENCODING.into(), "zstd+base64".into());
        attributes.insert("spillway-types".into(), "[\"click\"]".into());
        attributes.insert(ATTR_ERROR_CODE.into(), "old_code".into());
        let letter = DeadLetter {
            body: "{}".into(),
            attributes,
            reason: DeadLetterReason {
                code: "invalid_event".into(),
                message: "x".repeat(5_000),
            },
        };
        let out = letter_attributes(&letter);
        assert_eq!(out.len(), MAX_MESSAGE_ATTRIBUTES);
        let get = |k: &str| out.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_ref());
        assert_eq!(get(ATTR_ERROR_CODE), Some("invalid_event"));
        assert_eq!(
            get(ATTR_ERROR_MESSAGE).map(str::len),
            Some(MAX_REASON_BYTES)
        );
        assert_eq!(get(ATTR_CONTENT_ENCODING), Some("zstd+base64"));
        assert_eq!(get("spillway-types"), Some("[\"click\"]"));
        assert_eq!(get("custom-5"), Some("v5"));
        assert_eq!(get("custom-6"), None, "the last names are left out");
        assert_eq!(out.iter().filter(|(n, _)| *n == ATTR_ERROR_CODE).count(), 1);
    }

    fn failure(code: &str, sender_fault: bool) -> BatchResultErrorEntry {
        BatchResultErrorEntry::builder()
            .id("0")
            .code(code)
            .sender_fault(sender_fault)
            .message("the broker's words")
            .build()
            .unwrap()
    }

    #[test]
    fn only_failures_on_the_sqs_side_are_retried_and_never_a_bad_receipt() {
        assert!(retryable(&failure("InternalError", false)));
        assert!(!retryable(&failure("ReceiptHandleIsInvalid", false)));
        assert!(!retryable(&failure(
            "AWS.SimpleQueueService.MessageNotInflight",
            false
        )));
        assert!(!retryable(&failure("InternalError", true)));
    }

    #[test]
    fn unsettled_receipts_are_reported_together_with_their_count_and_reasons() {
        assert!(Unsettled::default()
            .into_result("q", Settle::Delete, 15)
            .is_ok());
        let mut u = Unsettled::default();
        u.entry_failed(&failure("ReceiptHandleIsInvalid", false));
        u.entry_failed(&failure("ReceiptHandleIsInvalid", true));
        let err = u.into_result("q", Settle::Delete, 15).unwrap_err();
        assert!(!err.is_transient(), "{err:?}");
        assert_eq!(
            err.to_string(),
            "q refused: delete failed for 2 of 15 entries: \
             2 × ReceiptHandleIsInvalid (the broker's words)"
        );
        let mut u = Unsettled::default();
        u.entry_failed(&failure("ReceiptHandleIsInvalid", false));
        u.call_failed(
            10,
            &SourceError::Unavailable {
                queue: "q".into(),
                message: "timed out".into(),
            },
        );
        let err = u
            .into_result("q", Settle::ChangeVisibility, 20)
            .unwrap_err();
        assert!(err.is_transient(), "a later call may settle those ten");
        let text = err.to_string();
        assert!(
            text.contains("change visibility failed for 11 of 20 entries")
                && text.contains("10 × call failed (timed out)"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_letter_over_256_kib_is_refused_for_good_before_any_call() {
        let config = aws_sdk_sqs::Config::builder()
            .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
            .region(aws_sdk_sqs::config::Region::new("us-east-1"))
            // Nothing listens there; no call may be made.
            .endpoint_url("http://127.0.0.1:9")
            .build();
        let dlq = SqsDeadLetterQueue::new(
            Client::from_conf(config),
            "http://127.0.0.1:9/000000000000/dlq".into(),
        );
        let letter = |bytes: usize| DeadLetter {
            body: "x".repeat(bytes),
            attributes: BTreeMap::new(),
            reason: DeadLetterReason {
                code: "invalid_event".into(),
                message: "m".into(),
            },
        };
        let err = dlq
            .send(&[letter(10), letter(MAX_BATCH_BYTES)])
            .await
            .unwrap_err();
        assert!(!err.is_transient(), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("dead letter 2 of 2 is 262") && text.contains("no letter was sent"),
            "{text}"
        );
        assert_eq!(dlq.calls().total(), 0);
    }

    #[test]
    fn a_letter_counts_its_body_and_each_attribute_name_type_and_value() {
        let m = Outgoing {
            body: "12345",
            attributes: vec![("ab", "xyz".into())],
            delay: Duration::ZERO,
            fifo: None,
        };
        assert_eq!(m.payload_bytes(), 5 + 2 + "String".len() + 3);
    }

    #[test]
    fn characters_sqs_refuses_are_escaped_in_letter_attributes() {
        assert!(matches!(sqs_text("tab\there, é, 😀"), Cow::Borrowed(_)));
        assert_eq!(
            sqs_text("unknown field \"/\u{7}x\", \u{FFFE}\u{FFFF}\u{FFFD}\u{0}"),
            "unknown field \"/\\u{7}x\", \\u{fffe}\\u{ffff}\u{FFFD}\\u{0}"
        );
    }

    #[test]
    fn a_letter_within_the_limit_keeps_every_attribute() {
        let letter = DeadLetter {
            body: "{}".into(),
            attributes: BTreeMap::from([("a".into(), "1".into()), ("b".into(), "2".into())]),
            reason: DeadLetterReason {
                code: "c".into(),
                message: "m".into(),
            },
        };
        assert_eq!(letter_attributes(&letter).len(), 4);
    }
}
