//! [`EmbeddedDlq`]: the dead-letter port on the embedded broker. Queues and topics are
//! addressed by name; every call is one SQLite transaction (counted as one call).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{
    now_ms, Calls, DlqBroker, DlqError, DlqMessage, DlqStats, LeasedMessage, Outgoing, SendOutcome,
};
use crate::embedded::{Broker, BrokerError, OutgoingMessage};
use crate::envelope::Envelope;
use crate::source::DeliveryId;

/// Most messages per lease/send/delete transaction.
pub const MAX_BATCH: usize = 100;

/// The dead-letter port over an embedded [`Broker`].
#[derive(Debug, Clone)]
pub struct EmbeddedDlq {
    broker: Broker,
    calls: Arc<Calls>,
}

impl EmbeddedDlq {
    /// The port over `broker`.
    pub fn new(broker: Broker) -> Self {
        Self {
            broker,
            calls: Arc::default(),
        }
    }

    /// The broker underneath.
    pub fn broker(&self) -> &Broker {
        &self.broker
    }
}

fn error(operation: &str, name: &str, e: BrokerError) -> DlqError {
    match e {
        BrokerError::NotFound { kind, name } => DlqError::NotFound {
            what: if kind == "topic" { "topic" } else { "queue" },
            name,
            detail: "not declared in this broker (check --data-dir; `spillway setup` declares \
                     the dev topology)"
                .into(),
        },
        // Transient to a publisher (a queue may subscribe later); to a replay, a refusal
        // that says why, not "cannot reach the broker".
        e @ BrokerError::NoSubscriptions { .. } => DlqError::Rejected {
            operation: operation.to_owned(),
            resource: name.to_owned(),
            detail: e.to_string(),
        },
        e if e.is_transient() => DlqError::Unreachable {
            operation: operation.to_owned(),
            resource: name.to_owned(),
            detail: e.to_string(),
        },
        e => DlqError::Rejected {
            operation: operation.to_owned(),
            resource: name.to_owned(),
            detail: e.to_string(),
        },
    }
}

#[async_trait]
impl DlqBroker for EmbeddedDlq {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    fn max_batch(&self) -> usize {
        MAX_BATCH
    }

    async fn stats(&self, queue: &str) -> Result<DlqStats, DlqError> {
        self.calls.count("QueueStats");
        let s = self
            .broker
            .queue_stats(queue)
            .await
            .map_err(|e| error("stats", queue, e))?;
        Ok(DlqStats {
            visible: s.visible,
            in_flight: s.in_flight,
            delayed: s.delayed,
            oldest_age_secs: s.oldest_age_secs,
        })
    }

    async fn peek(&self, queue: &str, max: usize) -> Result<Vec<DlqMessage>, DlqError> {
        self.calls.count("Peek");
        let now = now_ms();
        let got = self
            .broker
            .peek(queue, max)
            .await
            .map_err(|e| error("peek", queue, e))?;
        Ok(got
            .into_iter()
            .map(|m| DlqMessage {
                message_id: m.message_id,
                body: m.body,
                attributes: m.attributes,
                receive_count: m.receive_count,
                sent_at_ms: Some(
                    now.saturating_sub(
                        i64::try_from(m.age_secs.saturating_mul(1_000)).unwrap_or(0),
                    ),
                ),
                group_id: None,
                dedup_id: None,
                body_error: None,
            })
            .collect())
    }

    async fn lease(
        &self,
        queue: &str,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<LeasedMessage>, DlqError> {
        self.calls.count("Lease");
        let got = self
            .broker
            .lease(queue, max.min(MAX_BATCH), lease)
            .await
            .map_err(|e| error("lease", queue, e))?;
        Ok(got
            .into_iter()
            .map(|m| LeasedMessage {
                receipt: m.receipt,
                message: DlqMessage {
                    message_id: m.message_id,
                    body: m.body,
                    attributes: m.attributes,
                    receive_count: m.receive_count,
                    sent_at_ms: Some(m.sent_at_ms),
                    group_id: None,
                    dedup_id: None,
                    body_error: None,
                },
            })
            .collect())
    }

    async fn release(&self, queue: &str, receipts: &[DeliveryId]) -> Result<(), DlqError> {
        for chunk in receipts.chunks(MAX_BATCH) {
            self.calls.count("ChangeVisibility");
            let items: Vec<(DeliveryId, Duration)> =
                chunk.iter().map(|r| (r.clone(), Duration::ZERO)).collect();
            self.broker
                .change_visibility(queue, &items)
                .await
                .map_err(|e| error("release", queue, e))?;
        }
        Ok(())
    }

    async fn delete(&self, queue: &str, receipts: &[DeliveryId]) -> Result<usize, DlqError> {
        let mut stale = 0;
        for chunk in receipts.chunks(MAX_BATCH) {
            self.calls.count("DeleteBatch");
            let out = self
                .broker
                .delete_batch(queue, chunk)
                .await
                .map_err(|e| error("delete", queue, e))?;
            stale += out.stale.len();
        }
        Ok(stale)
    }

    async fn send(&self, queue: &str, messages: &[Outgoing]) -> Result<SendOutcome, DlqError> {
        for chunk in messages.chunks(MAX_BATCH) {
            self.calls.count("Send");
            let out: Vec<OutgoingMessage> = chunk
                .iter()
                .map(|m| OutgoingMessage {
                    body: m.body.clone(),
                    attributes: m.attributes.clone(),
                })
                .collect();
            self.broker
                .send(queue, &out)
                .await
                .map_err(|e| error("send", queue, e))?;
        }
        // One transaction per chunk: a chunk is acknowledged whole or the call failed.
        Ok(SendOutcome::default())
    }

    async fn publish(&self, topic: &str, messages: &[Outgoing]) -> Result<SendOutcome, DlqError> {
        for chunk in messages.chunks(MAX_BATCH) {
            self.calls.count("Publish");
            let envelopes: Vec<Envelope> = chunk
                .iter()
                .map(|m| Envelope {
                    body: m.body.clone(),
                    attributes: m.attributes.clone(),
                    event_count: 0,
                })
                .collect();
            self.broker
                .publish(topic, &envelopes)
                .await
                .map_err(|e| error("publish", topic, e))?;
        }
        Ok(SendOutcome::default())
    }

    async fn purge(&self, queue: &str) -> Result<Option<u64>, DlqError> {
        self.calls.count("Purge");
        let n = self
            .broker
            .purge(queue)
            .await
            .map_err(|e| error("purge", queue, e))?;
        Ok(Some(n as u64))
    }

    async fn redrives_to(&self, queue: &str) -> Result<Option<String>, DlqError> {
        self.calls.count("ListQueues");
        let queues = self
            .broker
            .list_queues()
            .await
            .map_err(|e| error("list queues", queue, e))?;
        Ok(queues
            .into_iter()
            .find(|q| q.name == queue)
            .and_then(|q| q.config.dlq))
    }

    async fn source_queues(&self, dlq: &str) -> Result<Vec<String>, DlqError> {
        self.calls.count("ListQueues");
        let queues = self
            .broker
            .list_queues()
            .await
            .map_err(|e| error("list queues", dlq, e))?;
        Ok(queues
            .into_iter()
            .filter(|q| q.config.dlq.as_deref() == Some(dlq))
            .map(|q| q.name)
            .collect())
    }

    async fn is_topic(&self, name: &str) -> Result<bool, DlqError> {
        self.calls.count("ListQueues");
        let queues = self
            .broker
            .list_queues()
            .await
            .map_err(|e| error("list queues", name, e))?;
        if queues.iter().any(|q| q.name == name) {
            return Ok(false);
        }
        match self.broker.check_topic(name).await {
            Ok(()) => Ok(true),
            Err(BrokerError::NotFound { .. }) => Err(DlqError::NotFound {
                what: "queue or topic",
                name: name.to_owned(),
                detail: "no queue or topic of that name in this broker (check --data-dir)".into(),
            }),
            Err(e) => Err(error("check topic", name, e)),
        }
    }

    fn calls(&self) -> BTreeMap<&'static str, u64> {
        self.calls.snapshot()
    }
}
