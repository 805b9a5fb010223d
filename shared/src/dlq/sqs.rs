//! [`SqsDlq`]: the dead-letter port on SQS (queues by URL) and SNS (topics by ARN), with
//! native redrive (`StartMessageMoveTask`). Every call is a batch call where SQS has one;
//! calls are counted by operation.
//!
//! SQS cannot read a message without receiving it: `peek` receives and releases at once
//! (visibility 0), which adds one to the message's `ApproximateReceiveCount`. Attribute values
//! are kept byte for byte as strings; a `Number` attribute comes back as a `String` and binary
//! attributes are not carried.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
    MessageAttributeValue, MessageSystemAttributeName, QueueAttributeName,
    SendMessageBatchRequestEntry,
};
use sha2::{Digest, Sha256};

use super::{
    Calls, DlqBroker, DlqError, DlqMessage, DlqStats, LeasedMessage, Outgoing, RedriveTask,
    SendOutcome,
};
use crate::envelope::ATTR_TYPES;
use crate::source::DeliveryId;

pub use crate::aws::batch::{MAX_BATCH_BYTES, MAX_BATCH_ENTRIES};
/// Longest visibility timeout SQS allows (12 hours).
const MAX_VISIBILITY_SECS: u64 = 43_200;
/// Long-poll wait of a lease: short, so a drained queue ends the run quickly.
const LEASE_WAIT_SECS: i32 = 1;
/// How long `peek` hides what it reads before releasing it.
const PEEK_LEASE: Duration = Duration::from_secs(30);
/// Tries of a delete whose entries SQS fails on its side.
const DELETE_TRIES: u32 = 3;
/// Group id for a FIFO destination when the message had none.
const DEFAULT_GROUP_ID: &str = "spillway-replay";

/// The dead-letter port over SQS and SNS clients built from the standard AWS configuration.
#[derive(Debug, Clone)]
pub struct SqsDlq {
    sqs: aws_sdk_sqs::Client,
    sns: aws_sdk_sns::Client,
    calls: Arc<Calls>,
}

impl SqsDlq {
    /// [`DlqBroker::delete`], trying entries SQS failed on its side up to `tries` times.
    async fn delete_tries(
        &self,
        queue: &str,
        receipts: &[DeliveryId],
        tries: u32,
    ) -> Result<usize, DlqError> {
        let mut stale = 0;
        for chunk in receipts.chunks(MAX_BATCH_ENTRIES) {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(&r.0)
                        .build()
                        .map_err(|e| DlqError::Invalid(e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            self.calls.count("DeleteMessageBatch");
            let out = self
                .sqs
                .delete_message_batch()
                .queue_url(queue)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| map_err("sqs:DeleteMessage", queue, "queue", &e))?;
            if out.failed().iter().any(|f| !f.sender_fault()) {
                // A server-side failure: try those entries again, a few times at most (it
                // used to be "once" by recursion without a bound: an SQS failing them every
                // time kept the run calling it in a loop).
                let retry: Vec<DeliveryId> = out
                    .failed()
                    .iter()
                    .filter(|f| !f.sender_fault())
                    .filter_map(|f| f.id().parse::<usize>().ok())
                    .filter_map(|i| chunk.get(i).cloned())
                    .collect();
                stale += out.failed().iter().filter(|f| f.sender_fault()).count();
                if tries <= 1 {
                    return Err(DlqError::Unreachable {
                        operation: "sqs:DeleteMessage".into(),
                        resource: queue.to_owned(),
                        detail: format!(
                            "{} deletes failed on the server side {DELETE_TRIES} times; those \
                             messages stay in the DLQ as well",
                            retry.len()
                        ),
                    });
                }
                stale += Box::pin(self.delete_tries(queue, &retry, tries - 1)).await?;
            } else {
                stale += out.failed().len();
            }
        }
        Ok(stale)
    }

    /// The port over clients from `config`.
    pub fn new(config: &aws_config::SdkConfig) -> Self {
        Self {
            sqs: aws_sdk_sqs::Client::new(config),
            sns: aws_sdk_sns::Client::new(config),
            calls: Arc::default(),
        }
    }

    /// One attribute of the queue at `url`, `None` when the queue has none.
    async fn queue_attribute(
        &self,
        url: &str,
        name: QueueAttributeName,
    ) -> Result<Option<String>, DlqError> {
        check_queue_url(url)?;
        self.calls.count("GetQueueAttributes");
        let out = self
            .sqs
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(name.clone())
            .send()
            .await
            .map_err(|e| map_err("sqs:GetQueueAttributes", url, "queue", &e))?;
        Ok(out.attributes().and_then(|a| a.get(&name)).cloned())
    }

    async fn queue_arn(&self, url: &str) -> Result<String, DlqError> {
        self.queue_attribute(url, QueueAttributeName::QueueArn)
            .await?
            .ok_or_else(|| DlqError::Rejected {
                operation: "sqs:GetQueueAttributes".into(),
                resource: url.to_owned(),
                detail: "no QueueArn in the answer".into(),
            })
    }
}

/// Refuses what is not an SQS queue URL before any call (the SDK's own error is cryptic).
fn check_queue_url(url: &str) -> Result<(), DlqError> {
    if url.starts_with("https://") || url.starts_with("http://") {
        Ok(())
    } else {
        Err(DlqError::Invalid(format!(
            "{url:?} is not an SQS queue URL (https://sqs.REGION.amazonaws.com/ACCOUNT/NAME; \
             `aws sqs get-queue-url --queue-name NAME` prints it)"
        )))
    }
}

/// Maps an SDK error to what the operator must do about it.
fn map_err<E, R>(
    operation: &str,
    resource: &str,
    what: &'static str,
    err: &SdkError<E, R>,
) -> DlqError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let detail = format!("{}", DisplayErrorContext(err));
    match err {
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => {
            let endpoint = std::env::var("AWS_ENDPOINT_URL").map_or_else(
                |_| "the AWS endpoint".to_owned(),
                |e| format!("endpoint {e}"),
            );
            return DlqError::Unreachable {
                operation: operation.to_owned(),
                resource: resource.to_owned(),
                detail: format!(
                    "{endpoint} did not answer ({detail}); check the network, \
                                 AWS_ENDPOINT_URL and AWS_REGION"
                ),
            };
        }
        SdkError::ConstructionFailure(_) => {
            return DlqError::Invalid(format!(
                "{operation} on {resource} could not be built: {detail}; check the queue URL / \
                 topic ARN and AWS_REGION"
            ));
        }
        _ => {}
    }
    match err.code() {
        Some(
            "AWS.SimpleQueueService.NonExistentQueue"
            | "QueueDoesNotExist"
            | "NonExistentQueue"
            | "NotFound"
            | "NotFoundException"
            | "ResourceNotFoundException",
        ) => DlqError::NotFound {
            what,
            name: resource.to_owned(),
            detail: format!("{operation}: {detail}"),
        },
        // The credentials themselves were refused: no grant helps, new credentials do.
        Some(
            code @ ("InvalidClientTokenId"
            | "UnrecognizedClientException"
            | "SignatureDoesNotMatch"
            | "ExpiredToken"
            | "ExpiredTokenException"
            | "RequestExpired"),
        ) => DlqError::Forbidden {
            operation: operation.to_owned(),
            resource: resource.to_owned(),
            detail: format!(
                "{detail}; AWS refused the credentials in use ({code}): they are expired, \
                 unknown or mistyped (a secret key that does not match its key id), so refresh \
                 them (aws sso login, a new session token) or fix AWS_PROFILE / the AWS_* \
                 variables"
            ),
        },
        Some(
            "AccessDenied"
            | "AccessDeniedException"
            | "AuthorizationError"
            | "KMS.AccessDeniedException"
            | "KMSAccessDenied",
        ) => DlqError::Forbidden {
            operation: operation.to_owned(),
            resource: resource.to_owned(),
            detail: format!(
                "{detail}; grant {operation} on it to the credentials in use (AWS_PROFILE / role)"
            ),
        },
        Some("RequestThrottled" | "Throttling" | "ThrottlingException" | "ServiceUnavailable") => {
            DlqError::Unreachable {
                operation: operation.to_owned(),
                resource: resource.to_owned(),
                detail,
            }
        }
        _ => DlqError::Rejected {
            operation: operation.to_owned(),
            resource: resource.to_owned(),
            detail,
        },
    }
}

fn sqs_attr(value: &str) -> Result<MessageAttributeValue, DlqError> {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(value)
        .build()
        .map_err(|e| DlqError::Invalid(e.to_string()))
}

fn sns_attr(
    name: &str,
    value: &str,
) -> Result<aws_sdk_sns::types::MessageAttributeValue, DlqError> {
    // `spillway-types` is an SNS String.Array so filter policies match on its elements.
    let array = name == ATTR_TYPES && serde_json::from_str::<Vec<String>>(value).is_ok();
    aws_sdk_sns::types::MessageAttributeValue::builder()
        .data_type(if array { "String.Array" } else { "String" })
        .string_value(value)
        .build()
        .map_err(|e| DlqError::Invalid(e.to_string()))
}

fn payload_bytes(m: &Outgoing) -> usize {
    m.body.len()
        + m.attributes
            .iter()
            .map(|(k, v)| k.len() + v.len() + "String.Array".len())
            .sum::<usize>()
}

/// Splits messages into batches of ≤ 10 entries and ≤ 256 KiB; returns index ranges.
fn plan(messages: &[Outgoing]) -> Vec<std::ops::Range<usize>> {
    crate::aws::batch::plan(messages.iter().map(payload_bytes))
}

/// The entries a batch call failed, as (index into the call, `code: message`); the ids of a
/// call's entries are their indexes.
fn failed_entries<'a>(
    failed: impl Iterator<Item = (&'a str, &'a str, Option<&'a str>)>,
) -> Vec<(usize, String)> {
    failed
        .filter_map(|(id, code, message)| {
            let i = id.parse::<usize>().ok()?;
            Some((i, format!("{code}: {}", message.unwrap_or_default())))
        })
        .collect()
}

/// Sends `messages` with one `call` per batch of [`plan`] (which returns the entries the
/// broker refused, by index into `messages`), and merges what they say. A call that fails as
/// a whole fails its own entries only: the batches acknowledged before or after it stay sent,
/// so the caller deletes them from the DLQ instead of sending them again on the next run.
///
/// # Errors
/// The first call's error when nothing was sent at all.
async fn send_planned<F, Fut>(messages: &[Outgoing], mut call: F) -> Result<SendOutcome, DlqError>
where
    F: FnMut(std::ops::Range<usize>) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<(usize, String)>, DlqError>>,
{
    let mut outcome = SendOutcome::default();
    let mut first_error = None;
    for range in plan(messages) {
        match call(range.clone()).await {
            Ok(refused) => outcome.failed.extend(refused),
            Err(e) => {
                let reason = e.to_string();
                outcome.failed.extend(range.map(|i| (i, reason.clone())));
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) if outcome.failed.len() >= messages.len() => Err(e),
        _ => {
            outcome.failed.sort_by_key(|f| f.0);
            Ok(outcome)
        }
    }
}

fn dedup_id(m: &Outgoing) -> String {
    m.dedup_id
        .clone()
        .unwrap_or_else(|| hex::encode(Sha256::digest(m.body.as_bytes())))
}

fn to_task(t: &aws_sdk_sqs::types::ListMessageMoveTasksResultEntry) -> RedriveTask {
    RedriveTask {
        task_handle: t.task_handle().map(str::to_owned),
        status: t.status().unwrap_or("UNKNOWN").to_owned(),
        source: t.source_arn().unwrap_or_default().to_owned(),
        destination: t.destination_arn().map(str::to_owned),
        max_per_sec: t.max_number_of_messages_per_second(),
        moved: t.approximate_number_of_messages_moved(),
        to_move: t.approximate_number_of_messages_to_move(),
        failure_reason: t.failure_reason().map(str::to_owned),
        started_at_ms: t.started_timestamp(),
    }
}

#[async_trait]
impl DlqBroker for SqsDlq {
    fn kind(&self) -> &'static str {
        "aws"
    }

    fn max_batch(&self) -> usize {
        MAX_BATCH_ENTRIES
    }

    async fn stats(&self, queue: &str) -> Result<DlqStats, DlqError> {
        check_queue_url(queue)?;
        self.calls.count("GetQueueAttributes");
        let out = self
            .sqs
            .get_queue_attributes()
            .queue_url(queue)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
            .send()
            .await
            .map_err(|e| map_err("sqs:GetQueueAttributes", queue, "queue", &e))?;
        let get = |name: QueueAttributeName| -> u64 {
            out.attributes()
                .and_then(|a| a.get(&name))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Ok(DlqStats {
            visible: get(QueueAttributeName::ApproximateNumberOfMessages),
            in_flight: get(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
            delayed: get(QueueAttributeName::ApproximateNumberOfMessagesDelayed),
            oldest_age_secs: None,
        })
    }

    async fn peek(&self, queue: &str, max: usize) -> Result<Vec<DlqMessage>, DlqError> {
        let mut got: Vec<LeasedMessage> = Vec::new();
        let mut result = Ok(());
        while got.len() < max {
            match self
                .lease(queue, (max - got.len()).min(MAX_BATCH_ENTRIES), PEEK_LEASE)
                .await
            {
                Ok(batch) if batch.is_empty() => break,
                Ok(batch) => got.extend(batch),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        // Released right after reading, whatever happened.
        let receipts: Vec<DeliveryId> = got.iter().map(|l| l.receipt.clone()).collect();
        let released = self.release(queue, &receipts).await;
        result?;
        released?;
        Ok(got.into_iter().map(|l| l.message).collect())
    }

    async fn lease(
        &self,
        queue: &str,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<LeasedMessage>, DlqError> {
        check_queue_url(queue)?;
        let max = i32::try_from(max.clamp(1, MAX_BATCH_ENTRIES)).unwrap_or(10);
        let visibility =
            i32::try_from(lease.as_secs().clamp(1, MAX_VISIBILITY_SECS)).unwrap_or(43_200);
        self.calls.count("ReceiveMessage");
        let out = self
            .sqs
            .receive_message()
            .queue_url(queue)
            .max_number_of_messages(max)
            .wait_time_seconds(LEASE_WAIT_SECS)
            .visibility_timeout(visibility)
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .message_attribute_names("All")
            .send()
            .await
            .map_err(|e| map_err("sqs:ReceiveMessage", queue, "queue", &e))?;
        let mut leased = Vec::new();
        for m in out.messages() {
            let Some(receipt) = m.receipt_handle() else {
                continue;
            };
            let system = |name: MessageSystemAttributeName| {
                m.attributes().and_then(|a| a.get(&name)).cloned()
            };
            let attributes: BTreeMap<String, String> = m
                .message_attributes()
                .into_iter()
                .flatten()
                .filter_map(|(k, v)| v.string_value().map(|s| (k.clone(), s.to_owned())))
                .collect();
            leased.push(LeasedMessage {
                receipt: DeliveryId(receipt.to_owned()),
                message: DlqMessage {
                    message_id: m.message_id().unwrap_or_default().to_owned(),
                    body: m.body().unwrap_or_default().to_owned(),
                    attributes,
                    receive_count: system(MessageSystemAttributeName::ApproximateReceiveCount)
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(1),
                    sent_at_ms: system(MessageSystemAttributeName::SentTimestamp)
                        .and_then(|v| v.parse().ok()),
                    group_id: system(MessageSystemAttributeName::MessageGroupId),
                    dedup_id: system(MessageSystemAttributeName::MessageDeduplicationId),
                    body_error: None,
                },
            });
        }
        Ok(leased)
    }

    async fn release(&self, queue: &str, receipts: &[DeliveryId]) -> Result<(), DlqError> {
        for chunk in receipts.chunks(MAX_BATCH_ENTRIES) {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    ChangeMessageVisibilityBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(&r.0)
                        .visibility_timeout(0)
                        .build()
                        .map_err(|e| DlqError::Invalid(e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            self.calls.count("ChangeMessageVisibilityBatch");
            self.sqs
                .change_message_visibility_batch()
                .queue_url(queue)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| map_err("sqs:ChangeMessageVisibility", queue, "queue", &e))?;
            // A failed entry's lease lapsed already (or the message is gone): nothing to do.
        }
        Ok(())
    }

    async fn delete(&self, queue: &str, receipts: &[DeliveryId]) -> Result<usize, DlqError> {
        self.delete_tries(queue, receipts, DELETE_TRIES).await
    }

    async fn send(&self, queue: &str, messages: &[Outgoing]) -> Result<SendOutcome, DlqError> {
        check_queue_url(queue)?;
        let fifo = queue.ends_with(".fifo");
        send_planned(messages, |range| async move {
            let mut entries = Vec::with_capacity(range.len());
            for i in range {
                let m = &messages[i];
                let mut b = SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(&m.body);
                for (k, v) in &m.attributes {
                    b = b.message_attributes(k, sqs_attr(v)?);
                }
                if fifo {
                    b = b
                        .message_group_id(m.group_id.as_deref().unwrap_or(DEFAULT_GROUP_ID))
                        .message_deduplication_id(dedup_id(m));
                }
                entries.push(b.build().map_err(|e| DlqError::Invalid(e.to_string()))?);
            }
            self.calls.count("SendMessageBatch");
            let out = self
                .sqs
                .send_message_batch()
                .queue_url(queue)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| map_err("sqs:SendMessage", queue, "queue", &e))?;
            Ok(failed_entries(
                out.failed().iter().map(|f| (f.id(), f.code(), f.message())),
            ))
        })
        .await
    }

    async fn publish(&self, topic: &str, messages: &[Outgoing]) -> Result<SendOutcome, DlqError> {
        let fifo = topic.ends_with(".fifo");
        send_planned(messages, |range| async move {
            let mut entries = Vec::with_capacity(range.len());
            for i in range {
                let m = &messages[i];
                let mut b = aws_sdk_sns::types::PublishBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message(&m.body);
                for (k, v) in &m.attributes {
                    b = b.message_attributes(k, sns_attr(k, v)?);
                }
                if fifo {
                    b = b
                        .message_group_id(m.group_id.as_deref().unwrap_or(DEFAULT_GROUP_ID))
                        .message_deduplication_id(dedup_id(m));
                }
                entries.push(b.build().map_err(|e| DlqError::Invalid(e.to_string()))?);
            }
            self.calls.count("PublishBatch");
            let out = self
                .sns
                .publish_batch()
                .topic_arn(topic)
                .set_publish_batch_request_entries(Some(entries))
                .send()
                .await
                .map_err(|e| map_err("sns:Publish", topic, "topic", &e))?;
            Ok(failed_entries(
                out.failed().iter().map(|f| (f.id(), f.code(), f.message())),
            ))
        })
        .await
    }

    async fn purge(&self, queue: &str) -> Result<Option<u64>, DlqError> {
        let before = self.stats(queue).await?.total();
        self.calls.count("PurgeQueue");
        self.sqs
            .purge_queue()
            .queue_url(queue)
            .send()
            .await
            .map_err(|e| map_err("sqs:PurgeQueue", queue, "queue", &e))?;
        Ok(Some(before))
    }

    async fn redrives_to(&self, queue: &str) -> Result<Option<String>, DlqError> {
        let policy = self
            .queue_attribute(queue, QueueAttributeName::RedrivePolicy)
            .await?
            .filter(|p| !p.trim().is_empty());
        Ok(policy.map(|p| {
            serde_json::from_str::<serde_json::Value>(&p)
                .ok()
                .and_then(|v| v["deadLetterTargetArn"].as_str().map(str::to_owned))
                .unwrap_or(p)
        }))
    }

    async fn source_queues(&self, dlq: &str) -> Result<Vec<String>, DlqError> {
        check_queue_url(dlq)?;
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            self.calls.count("ListDeadLetterSourceQueues");
            let page = self
                .sqs
                .list_dead_letter_source_queues()
                .queue_url(dlq)
                .set_next_token(token.take())
                .send()
                .await
                .map_err(|e| map_err("sqs:ListDeadLetterSourceQueues", dlq, "queue", &e))?;
            out.extend(page.queue_urls().iter().cloned());
            match page.next_token() {
                Some(t) if !t.is_empty() => token = Some(t.to_owned()),
                _ => break,
            }
        }
        Ok(out)
    }

    async fn is_topic(&self, name: &str) -> Result<bool, DlqError> {
        if name.starts_with("arn:") && name.split(':').nth(2) == Some("sns") {
            Ok(true)
        } else if name.starts_with("https://") || name.starts_with("http://") {
            Ok(false)
        } else {
            Err(DlqError::Invalid(format!(
                "{name:?} is neither an SQS queue URL nor an SNS topic ARN (arn:aws:sns:…)"
            )))
        }
    }

    fn calls(&self) -> BTreeMap<&'static str, u64> {
        self.calls.snapshot()
    }

    async fn start_redrive(
        &self,
        dlq: &str,
        destination: Option<&str>,
        max_per_sec: Option<u32>,
    ) -> Result<RedriveTask, DlqError> {
        let source_arn = self.queue_arn(dlq).await?;
        let destination_arn = match destination {
            Some(d) => Some(self.queue_arn(d).await?),
            None => None,
        };
        let rate = max_per_sec
            .map(|r| {
                i32::try_from(r)
                    .ok()
                    .filter(|r| (1..=500).contains(r))
                    .ok_or_else(|| {
                        DlqError::Invalid(format!(
                            "--rate {r}: native redrive takes 1 to 500 messages per second"
                        ))
                    })
            })
            .transpose()?;
        self.calls.count("StartMessageMoveTask");
        let out = self
            .sqs
            .start_message_move_task()
            .source_arn(&source_arn)
            .set_destination_arn(destination_arn.clone())
            .set_max_number_of_messages_per_second(rate)
            .send()
            .await
            .map_err(|e| map_err("sqs:StartMessageMoveTask", dlq, "queue", &e))?;
        Ok(RedriveTask {
            task_handle: out.task_handle().map(str::to_owned),
            status: "RUNNING".into(),
            source: source_arn,
            destination: destination_arn,
            max_per_sec: rate,
            ..RedriveTask::default()
        })
    }

    async fn redrive_status(&self, dlq: &str) -> Result<Vec<RedriveTask>, DlqError> {
        let source_arn = self.queue_arn(dlq).await?;
        self.calls.count("ListMessageMoveTasks");
        let out = self
            .sqs
            .list_message_move_tasks()
            .source_arn(&source_arn)
            .max_results(10)
            .send()
            .await
            .map_err(|e| map_err("sqs:ListMessageMoveTasks", dlq, "queue", &e))?;
        Ok(out.results().iter().map(to_task).collect())
    }

    async fn cancel_redrive(&self, dlq: &str) -> Result<RedriveTask, DlqError> {
        let tasks = self.redrive_status(dlq).await?;
        let running = tasks
            .into_iter()
            .find(|t| t.status == "RUNNING")
            .ok_or_else(|| DlqError::Invalid(format!("no redrive task is running on {dlq}")))?;
        let handle = running.task_handle.clone().unwrap_or_default();
        self.calls.count("CancelMessageMoveTask");
        let out = self
            .sqs
            .cancel_message_move_task()
            .task_handle(&handle)
            .send()
            .await
            .map_err(|e| map_err("sqs:CancelMessageMoveTask", dlq, "queue", &e))?;
        Ok(RedriveTask {
            status: "CANCELLING".into(),
            moved: out.approximate_number_of_messages_moved(),
            ..running
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(bytes: usize) -> Outgoing {
        Outgoing {
            body: "x".repeat(bytes),
            ..Outgoing::default()
        }
    }

    #[test]
    fn batches_hold_at_most_ten_entries_and_256_kib() {
        let small: Vec<Outgoing> = (0..25).map(|_| out(10)).collect();
        assert_eq!(plan(&small), vec![0..10, 10..20, 20..25]);
        let big: Vec<Outgoing> = (0..5).map(|_| out(100_000)).collect();
        assert_eq!(plan(&big), vec![0..2, 2..4, 4..5]);
        assert!(plan(&[]).is_empty());
    }

    /// Runs [`send_planned`] over `messages` with calls that fail as a whole when `fails`
    /// says so for their first index, and otherwise refuse `refused` entries.
    fn run_planned(
        messages: &[Outgoing],
        fails: impl Fn(usize) -> bool,
        refused: &[usize],
    ) -> (Result<SendOutcome, DlqError>, Vec<std::ops::Range<usize>>) {
        let mut calls = Vec::new();
        let result = futures::executor::block_on(send_planned(messages, |range| {
            calls.push(range.clone());
            let fail = fails(range.start);
            let refused: Vec<(usize, String)> = range
                .filter(|i| refused.contains(i))
                .map(|i| (i, "InvalidParameterValue: no".to_owned()))
                .collect();
            async move {
                if fail {
                    Err(DlqError::Unreachable {
                        operation: "sqs:SendMessage".into(),
                        resource: "q".into(),
                        detail: "injected".into(),
                    })
                } else {
                    Ok(refused)
                }
            }
        }));
        (result, calls)
    }

    #[test]
    fn a_failed_call_fails_its_own_entries_and_the_other_calls_stay_sent() {
        // Ten messages of 100 KB: five calls of two (256 KiB each at most).
        let big: Vec<Outgoing> = (0..10).map(|_| out(100_000)).collect();
        let (result, calls) = run_planned(&big, |start| start == 4, &[7]);
        assert_eq!(calls.len(), 5, "every call is made: {calls:?}");
        let outcome = result.unwrap();
        let failed: Vec<usize> = outcome.failed.iter().map(|f| f.0).collect();
        assert_eq!(failed, vec![4, 5, 7], "{outcome:?}");
        assert!(outcome.failed[0].1.contains("injected"));
        assert!(outcome.failed[2].1.contains("InvalidParameterValue"));
        // The first call fails: the second is still sent, and says so.
        let (result, _) = run_planned(&big, |start| start == 0, &[]);
        let failed: Vec<usize> = result.unwrap().failed.iter().map(|f| f.0).collect();
        assert_eq!(failed, vec![0, 1]);
    }

    #[test]
    fn when_every_call_fails_the_send_fails() {
        let big: Vec<Outgoing> = (0..4).map(|_| out(100_000)).collect();
        let (result, _) = run_planned(&big, |_| true, &[]);
        let err = result.unwrap_err();
        assert!(err.to_string().contains("injected"), "{err}");
        let (result, _) = run_planned(&[out(10)], |_| false, &[0]);
        assert_eq!(
            result.unwrap().failed.len(),
            1,
            "refused entries are no error"
        );
    }

    fn service_error(code: &str) -> DlqError {
        use aws_sdk_sqs::error::ErrorMetadata;
        use aws_sdk_sqs::operation::receive_message::ReceiveMessageError;
        let err = ReceiveMessageError::generic(
            ErrorMetadata::builder()
                .code(code)
                .message("the broker's words")
                .build(),
        );
        map_err(
            "sqs:ReceiveMessage",
            "https://sqs/1/q",
            "queue",
            &SdkError::<_, ()>::service_error(err, ()),
        )
    }

    #[test]
    fn broker_errors_say_what_to_fix() {
        let e = service_error("AccessDenied");
        assert!(matches!(e, DlqError::Forbidden { .. }), "{e:?}");
        let text = e.to_string();
        assert!(
            text.contains("permission denied for sqs:ReceiveMessage on https://sqs/1/q")
                && text.contains("grant sqs:ReceiveMessage"),
            "{text}"
        );
        // Expired or mistyped credentials read as a missing grant, sending the operator to IAM.
        for code in [
            "ExpiredToken",
            "InvalidClientTokenId",
            "SignatureDoesNotMatch",
        ] {
            let text = service_error(code).to_string();
            assert!(
                text.contains(&format!("AWS refused the credentials in use ({code})"))
                    && text.contains("refresh them")
                    && !text.contains("grant"),
                "{text}"
            );
        }
        let e = service_error("AWS.SimpleQueueService.NonExistentQueue");
        assert!(
            matches!(e, DlqError::NotFound { what: "queue", .. }),
            "{e:?}"
        );
        assert!(service_error("RequestThrottled").is_transient());
        assert!(matches!(
            service_error("InvalidParameterValue"),
            DlqError::Rejected { .. }
        ));
    }

    #[test]
    fn an_address_that_is_not_a_url_or_arn_is_refused_clearly() {
        let err = check_queue_url("my-dlq").unwrap_err().to_string();
        assert!(err.contains("not an SQS queue URL"), "{err}");
    }
}
