//! SNS publisher: envelopes go out in `PublishBatch` calls of up to 10 entries and 256 KiB,
//! failed entries are retried on their own with backoff, throttling is waited out.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sns::error::ProvideErrorMetadata;
use aws_sdk_sns::types::{MessageAttributeValue, PublishBatchRequestEntry};
use aws_sdk_sns::Client;
use sha2::{Digest, Sha256};
use tracing::warn;

use super::{ApiCalls, CallCounter};
use crate::envelope::{Envelope, ATTR_TENANT, ATTR_TYPES, SNS_MAX_MESSAGE_BYTES};
use crate::publisher::{PublishError, PublishReport, Publisher};

/// Most entries in one `PublishBatch` call.
pub const MAX_BATCH_ENTRIES: usize = 10;
/// Most payload bytes (bodies and attributes) in one `PublishBatch` call.
pub const MAX_BATCH_BYTES: usize = SNS_MAX_MESSAGE_BYTES;

/// Settings of the SNS publisher.
#[derive(Debug, Clone)]
pub struct SnsConfig {
    /// The topic ARN (a `.fifo` suffix makes it a FIFO topic).
    pub topic_arn: String,
    /// Attempts per entry before the publish fails.
    pub max_attempts: u32,
    /// First backoff between attempts (doubles each time).
    pub backoff: Duration,
}

impl SnsConfig {
    /// Defaults for `topic_arn`: 5 attempts, 100 ms first backoff.
    pub fn new(topic_arn: impl Into<String>) -> Self {
        Self {
            topic_arn: topic_arn.into(),
            max_attempts: 5,
            backoff: Duration::from_millis(100),
        }
    }
}

/// Publishes envelopes to an SNS topic. Clones share one call counter.
#[derive(Debug, Clone)]
pub struct SnsPublisher {
    client: Client,
    config: SnsConfig,
    fifo: bool,
    calls: Arc<CallCounter>,
}

impl SnsPublisher {
    /// A publisher over a client built once from the standard AWS configuration.
    pub fn new(client: Client, config: SnsConfig) -> Self {
        let fifo = config.topic_arn.ends_with(".fifo");
        Self {
            client,
            config,
            fifo,
            calls: Arc::default(),
        }
    }

    /// The SNS API calls made so far (by this publisher and its clones), by operation.
    pub fn calls(&self) -> ApiCalls {
        self.calls.snapshot()
    }

    fn entry(&self, id: usize, env: &Envelope) -> Result<PublishBatchRequestEntry, PublishError> {
        let mut b = PublishBatchRequestEntry::builder()
            .id(id.to_string())
            .message(&env.body);
        for (name, value) in &env.attributes {
            let data_type = if name == ATTR_TYPES {
                "String.Array"
            } else {
                "String"
            };
            let attr = MessageAttributeValue::builder()
                .data_type(data_type)
                .string_value(value)
                .build()
                .map_err(|e| self.rejected(e.to_string()))?;
            b = b.message_attributes(name, attr);
        }
        if self.fifo {
            let tenant = env
                .attributes
                .get(ATTR_TENANT)
                .map_or("default", String::as_str);
            let dedup = hex::encode(Sha256::digest(env.body.as_bytes()));
            b = b
                .message_group_id(fifo_group_id(tenant))
                .message_deduplication_id(dedup);
        }
        b.build().map_err(|e| self.rejected(e.to_string()))
    }

    fn rejected(&self, message: String) -> PublishError {
        PublishError::Rejected {
            destination: self.config.topic_arn.clone(),
            message,
        }
    }

    fn unavailable(&self, message: String) -> PublishError {
        PublishError::Unavailable {
            destination: self.config.topic_arn.clone(),
            message,
        }
    }

    /// Publishes one batch (≤ 10 entries, ≤ 256 KiB), retrying failed entries alone.
    async fn publish_batch(&self, batch: &[&Envelope]) -> Result<usize, PublishError> {
        let mut pending: Vec<usize> = (0..batch.len()).collect();
        let mut delay = self.config.backoff;
        let mut calls = 0;
        for attempt in 1..=self.config.max_attempts.max(1) {
            let entries = pending
                .iter()
                .map(|&i| self.entry(i, batch[i]))
                .collect::<Result<Vec<_>, _>>()?;
            calls += 1;
            self.calls.count("PublishBatch");
            let result = self
                .client
                .publish_batch()
                .topic_arn(&self.config.topic_arn)
                .set_publish_batch_request_entries(Some(entries))
                .send()
                .await;
            match result {
                Ok(out) => {
                    let mut still = Vec::new();
                    for failed in out.failed() {
                        if failed.sender_fault() {
                            return Err(self.rejected(format!(
                                "{}: {}",
                                failed.code(),
                                failed.message().unwrap_or_default()
                            )));
                        }
                        if let Ok(i) = failed.id().parse::<usize>() {
                            still.push(i);
                        }
                    }
                    if still.is_empty() {
                        return Ok(calls);
                    }
                    warn!(
                        attempt,
                        failed = still.len(),
                        "Some SNS entries failed; retrying them"
                    );
                    pending = still;
                }
                Err(e) => {
                    let code = e.code().unwrap_or("unknown").to_owned();
                    let permanent = matches!(
                        code.as_str(),
                        "InvalidParameter"
                            | "InvalidParameterValue"
                            | "NotFound"
                            | "AuthorizationError"
                            | "KMSAccessDenied"
                            | "BatchRequestTooLong"
                            | "TooManyEntriesInBatchRequest"
                    );
                    // The whole chain: a dispatch failure or a timeout has no code and no
                    // message, and the error's own text says only "dispatch failure".
                    let detail = match e.message() {
                        Some(m) => format!("{code}: {m}"),
                        None => format!("{code}: {}", aws_sdk_sns::error::DisplayErrorContext(&e)),
                    };
                    if permanent {
                        return Err(self.rejected(detail));
                    }
                    warn!(attempt, error = %detail, "SNS PublishBatch failed; backing off");
                    if attempt == self.config.max_attempts.max(1) {
                        return Err(self.unavailable(detail));
                    }
                }
            }
            tokio::time::sleep(delay).await;
            delay = delay.saturating_mul(2);
        }
        Err(self.unavailable(format!(
            "{} entries not acknowledged after retries",
            pending.len()
        )))
    }
}

/// Bytes an envelope counts for against the batch limit: body plus attribute names/values.
fn payload_bytes(env: &Envelope) -> usize {
    env.body.len()
        + env
            .attributes
            .iter()
            .map(|(k, v)| k.len() + v.len() + "String.Array".len())
            .sum::<usize>()
}

/// Splits envelopes into `PublishBatch` calls of ≤ 10 entries and ≤ 256 KiB of payload.
pub fn plan_batches(envelopes: &[Envelope]) -> Vec<Vec<&Envelope>> {
    let mut batches: Vec<Vec<&Envelope>> = Vec::new();
    let mut size = 0;
    for env in envelopes {
        let bytes = payload_bytes(env);
        let start_new = match batches.last() {
            None => true,
            Some(b) => b.len() == MAX_BATCH_ENTRIES || size + bytes > MAX_BATCH_BYTES,
        };
        if start_new {
            batches.push(Vec::new());
            size = 0;
        }
        size += bytes;
        if let Some(b) = batches.last_mut() {
            b.push(env);
        }
    }
    batches
}

#[async_trait]
impl Publisher for SnsPublisher {
    async fn publish(&self, envelopes: &[Envelope]) -> Result<PublishReport, PublishError> {
        let mut calls = 0;
        for batch in plan_batches(envelopes) {
            calls += self.publish_batch(&batch).await?;
        }
        Ok(PublishReport::of(envelopes, calls))
    }

    async fn ready(&self) -> Result<(), PublishError> {
        self.calls.count("GetTopicAttributes");
        self.client
            .get_topic_attributes()
            .topic_arn(&self.config.topic_arn)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| {
                self.unavailable(format!("{}", aws_sdk_sns::error::DisplayErrorContext(e)))
            })
    }
}

/// The FIFO message group of a tenant: its name when SNS takes it as a group id (1 to 128
/// printable ASCII characters), else a digest of it. Taken raw, a tenant such as `Acme Corp`
/// (a space), `café` or a long name was refused by SNS on every publish: its requests were
/// answered 503 for good.
fn fifo_group_id(tenant: &str) -> String {
    let takes = (1..=128).contains(&tenant.len()) && tenant.bytes().all(|b| b.is_ascii_graphic());
    if takes {
        tenant.to_owned()
    } else {
        format!(
            "tenant-{}",
            &hex::encode(Sha256::digest(tenant.as_bytes()))[..32]
        )
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_tenant_sns_would_refuse_as_a_group_id_gets_a_digest_of_it() {
        assert_eq!(super::fifo_group_id("acme-eu"), "acme-eu");
        for tenant in ["Acme Corp", "café", &"t".repeat(129)] {
            let group = super::fifo_group_id(tenant);
            assert!(group.starts_with("tenant-") && group.len() == 39, "{group}");
            assert!(group.bytes().all(|b| b.is_ascii_graphic()));
            assert_eq!(group, super::fifo_group_id(tenant), "one tenant, one group");
        }
        assert_ne!(
            super::fifo_group_id("Acme Corp"),
            super::fifo_group_id("Acme  Corp")
        );
    }

    use std::collections::BTreeMap;

    use super::*;

    fn env(bytes: usize) -> Envelope {
        Envelope {
            body: "x".repeat(bytes),
            attributes: BTreeMap::new(),
            event_count: 1,
        }
    }

    /// A failure without an AWS error code (here: nothing listens) was logged and answered
    /// as "unknown: dispatch failure", without its cause.
    #[tokio::test]
    async fn a_publish_that_cannot_connect_says_why() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let config = aws_sdk_sns::Config::builder()
            .behavior_version(aws_sdk_sns::config::BehaviorVersion::latest())
            .http_client(crate::aws::https_client())
            .region(aws_sdk_sns::config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_sns::config::Credentials::new(
                "test", "test", None, None, "test",
            ))
            .endpoint_url(format!("http://{closed}"))
            .build();
        let publisher = SnsPublisher::new(
            Client::from_conf(config),
            SnsConfig {
                max_attempts: 1,
                ..SnsConfig::new("arn:aws:sns:us-east-1:000000000000:events")
            },
        );
        let err = publisher.publish(&[env(10)]).await.unwrap_err();
        assert!(err.is_transient(), "{err}");
        assert!(err.to_string().contains("Connection refused"), "{err}");
    }

    #[test]
    fn batches_hold_at_most_ten_entries_and_256_kib() {
        let small: Vec<Envelope> = (0..25).map(|_| env(100)).collect();
        let sizes: Vec<usize> = plan_batches(&small).iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![10, 10, 5]);
        let big: Vec<Envelope> = (0..5).map(|_| env(100_000)).collect();
        let plan = plan_batches(&big);
        assert_eq!(plan.iter().map(Vec::len).collect::<Vec<_>>(), vec![2, 2, 1]);
        for b in plan {
            assert!(b.iter().map(|e| payload_bytes(e)).sum::<usize>() <= MAX_BATCH_BYTES);
        }
    }
}
