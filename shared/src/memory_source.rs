//! An in-memory [`Source`] with SQS-like visibility semantics, for tests and the embedded
//! pipeline's unit tests.
//!
//! A receive makes a message invisible for the visibility timeout and increments its receive
//! count; each receive hands out a new receipt and the earlier ones go stale. `ack` deletes,
//! `retry_later` and `extend` change the visibility, `dead_letter` moves letters to an
//! in-memory DLQ and deletes the original. A message received more than `max_receive_count`
//! times is redriven to the DLQ (reason `max_receives`) instead of being delivered again.
//! Time is [`tokio::time::Instant`], so tests run under `tokio::time::pause()`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::envelope::Envelope;
use crate::source::{
    DeadLetter, DeadLetterReason, Delivery, DeliveryId, Source, SourceError, ATTR_ERROR_CODE,
    ATTR_ERROR_MESSAGE,
};

/// Reason code of a message the source redrove after too many receives.
pub const REASON_MAX_RECEIVES: &str = crate::source::MAX_RECEIVES_CODE;

/// How a [`MemorySource`] behaves.
#[derive(Debug, Clone)]
pub struct MemorySourceConfig {
    /// Queue name used in errors.
    pub name: String,
    /// How long a received message stays invisible (SQS `VisibilityTimeout`).
    pub visibility_timeout: Duration,
    /// Receives after which the next receive redrives the message to the DLQ instead
    /// (SQS `maxReceiveCount`); `None` never redrives.
    pub max_receive_count: Option<u32>,
}

impl Default for MemorySourceConfig {
    fn default() -> Self {
        Self {
            name: "memory".into(),
            visibility_timeout: Duration::from_secs(30),
            max_receive_count: Some(5),
        }
    }
}

/// A message on the in-memory DLQ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLettered {
    /// Id of the message it came from.
    pub source_message_id: String,
    /// The body sent to the DLQ.
    pub body: String,
    /// Its attributes, the reason attributes included.
    pub attributes: BTreeMap<String, String>,
    /// Why it was dead-lettered.
    pub reason: DeadLetterReason,
}

#[derive(Debug)]
struct Message {
    message_id: String,
    body: String,
    attributes: BTreeMap<String, String>,
    receive_count: u32,
    visible_at: Instant,
    receipt: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    next_seq: u64,
    next_receipt: u64,
    messages: BTreeMap<u64, Message>,
    receipts: HashMap<String, u64>,
    retry_history: HashMap<String, Vec<Duration>>,
    dlq: Vec<DeadLettered>,
    deleted: Vec<String>,
    stale_receipts: usize,
    ack_calls: usize,
    extend_calls: usize,
    unavailable: bool,
}

/// An in-memory queue with visibility timeouts, receive counts and a DLQ.
#[derive(Debug)]
pub struct MemorySource {
    config: MemorySourceConfig,
    state: Mutex<State>,
    sent: Notify,
}

impl Default for MemorySource {
    fn default() -> Self {
        Self::new(MemorySourceConfig::default())
    }
}

impl MemorySource {
    /// An empty queue.
    pub fn new(config: MemorySourceConfig) -> Self {
        Self {
            config,
            state: Mutex::new(State::default()),
            sent: Notify::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &MemorySourceConfig {
        &self.config
    }

    /// Enqueues a message, visible at once; returns its message id.
    pub fn send(&self, body: impl Into<String>, attributes: BTreeMap<String, String>) -> String {
        let id = {
            let mut s = self.lock();
            s.next_seq += 1;
            let seq = s.next_seq;
            let message_id = format!("m-{seq}");
            s.messages.insert(
                seq,
                Message {
                    message_id: message_id.clone(),
                    body: body.into(),
                    attributes,
                    receive_count: 0,
                    visible_at: Instant::now(),
                    receipt: None,
                },
            );
            message_id
        };
        self.sent.notify_waiters();
        id
    }

    /// Enqueues an envelope with its attributes; returns its message id.
    pub fn send_envelope(&self, envelope: &Envelope) -> String {
        self.send(envelope.body.clone(), envelope.attributes.clone())
    }

    /// Makes every operation fail with [`SourceError::Unavailable`] until told otherwise.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.lock().unavailable = unavailable;
    }

    /// Messages not deleted yet, visible or not.
    pub fn len(&self) -> usize {
        self.lock().messages.len()
    }

    /// Whether every message was deleted.
    pub fn is_empty(&self) -> bool {
        self.lock().messages.is_empty()
    }

    /// Messages received and still invisible.
    pub fn in_flight(&self) -> usize {
        let now = Instant::now();
        self.lock()
            .messages
            .values()
            .filter(|m| m.visible_at > now)
            .count()
    }

    /// The dead-letter queue, oldest first.
    pub fn dead_letters(&self) -> Vec<DeadLettered> {
        self.lock().dlq.clone()
    }

    /// Ids of the messages deleted (acknowledged or dead-lettered), in order.
    pub fn deleted(&self) -> Vec<String> {
        self.lock().deleted.clone()
    }

    /// How often `message_id` has been received; `None` once deleted.
    pub fn receive_count(&self, message_id: &str) -> Option<u32> {
        self.lock()
            .messages
            .values()
            .find(|m| m.message_id == message_id)
            .map(|m| m.receive_count)
    }

    /// The delays `retry_later` set on `message_id`, in order (kept after deletion).
    pub fn retry_delays(&self, message_id: &str) -> Vec<Duration> {
        self.lock()
            .retry_history
            .get(message_id)
            .cloned()
            .unwrap_or_default()
    }

    /// Settlements that named a receipt no longer current (lapsed and re-received, or
    /// deleted); a worker whose heartbeat works makes none.
    pub fn stale_receipts(&self) -> usize {
        self.lock().stale_receipts
    }

    /// Calls to `ack`.
    pub fn ack_calls(&self) -> usize {
        self.lock().ack_calls
    }

    /// Calls to `extend`.
    pub fn extend_calls(&self) -> usize {
        self.lock().extend_calls
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn check_available(&self, s: &State) -> Result<(), SourceError> {
        if s.unavailable {
            Err(SourceError::Unavailable {
                queue: self.config.name.clone(),
                message: "injected failure".into(),
            })
        } else {
            Ok(())
        }
    }

    /// Takes up to `max` visible messages, redriving those past `max_receive_count`.
    fn take_visible(&self, s: &mut State, max: usize) -> Vec<Delivery> {
        let now = Instant::now();
        let visible: Vec<u64> = s
            .messages
            .iter()
            .filter(|(_, m)| m.visible_at <= now)
            .map(|(seq, _)| *seq)
            .collect();
        let mut out = Vec::new();
        for seq in visible {
            if out.len() >= max {
                break;
            }
            let redrive = self.config.max_receive_count.is_some_and(|max_rc| {
                s.messages
                    .get(&seq)
                    .is_some_and(|m| m.receive_count >= max_rc)
            });
            if redrive {
                if let Some(m) = remove(s, seq) {
                    let reason = DeadLetterReason {
                        code: REASON_MAX_RECEIVES.into(),
                        message: format!("received {} times", m.receive_count),
                    };
                    push_dlq(s, &m.message_id, m.body, m.attributes, reason);
                }
                continue;
            }
            s.next_receipt += 1;
            let receipt = format!("r-{}", s.next_receipt);
            let Some(m) = s.messages.get_mut(&seq) else {
                continue;
            };
            if let Some(old) = m.receipt.replace(receipt.clone()) {
                s.receipts.remove(&old);
            }
            m.receive_count += 1;
            m.visible_at = now + self.config.visibility_timeout;
            out.push(Delivery {
                id: DeliveryId(receipt.clone()),
                message_id: m.message_id.clone(),
                body: m.body.clone(),
                attributes: m.attributes.clone(),
                receive_count: m.receive_count,
                body_error: None,
            });
            s.receipts.insert(receipt, seq);
        }
        out
    }
}

fn remove(s: &mut State, seq: u64) -> Option<Message> {
    let m = s.messages.remove(&seq)?;
    if let Some(r) = &m.receipt {
        s.receipts.remove(r);
    }
    s.deleted.push(m.message_id.clone());
    Some(m)
}

fn push_dlq(
    s: &mut State,
    message_id: &str,
    body: String,
    mut attributes: BTreeMap<String, String>,
    reason: DeadLetterReason,
) {
    attributes.insert(ATTR_ERROR_CODE.into(), reason.code.clone());
    attributes.insert(ATTR_ERROR_MESSAGE.into(), reason.message.clone());
    s.dlq.push(DeadLettered {
        source_message_id: message_id.to_owned(),
        body,
        attributes,
        reason,
    });
}

#[async_trait]
impl Source for MemorySource {
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, SourceError> {
        let deadline = Instant::now() + wait;
        loop {
            // Register for "sent" before looking, so a send between the look and the wait
            // is not missed.
            let sent = self.sent.notified();
            let next_visible = {
                let mut s = self.lock();
                self.check_available(&s)?;
                let got = self.take_visible(&mut s, max.max(1));
                if !got.is_empty() {
                    return Ok(got);
                }
                s.messages.values().map(|m| m.visible_at).min()
            };
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            let wake = next_visible.map_or(deadline, |v| v.min(deadline).max(now));
            tokio::select! {
                () = sent => {}
                () = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    async fn ack(&self, ids: &[DeliveryId]) -> Result<(), SourceError> {
        let mut s = self.lock();
        self.check_available(&s)?;
        s.ack_calls += 1;
        for id in ids {
            match s.receipts.get(&id.0).copied() {
                Some(seq) => {
                    remove(&mut s, seq);
                }
                // Like SQS: deleting with an old receipt "succeeds" but deletes nothing.
                None => s.stale_receipts += 1,
            }
        }
        Ok(())
    }

    async fn retry_later(&self, items: &[(DeliveryId, Duration)]) -> Result<(), SourceError> {
        let mut s = self.lock();
        self.check_available(&s)?;
        let now = Instant::now();
        for (id, delay) in items {
            let Some(seq) = s.receipts.get(&id.0).copied() else {
                s.stale_receipts += 1;
                continue;
            };
            if let Some(m) = s.messages.get_mut(&seq) {
                m.visible_at = now + *delay;
                let message_id = m.message_id.clone();
                s.retry_history.entry(message_id).or_default().push(*delay);
            }
        }
        Ok(())
    }

    async fn extend(&self, ids: &[DeliveryId], by: Duration) -> Result<(), SourceError> {
        let mut s = self.lock();
        self.check_available(&s)?;
        s.extend_calls += 1;
        let now = Instant::now();
        for id in ids {
            let Some(seq) = s.receipts.get(&id.0).copied() else {
                s.stale_receipts += 1;
                continue;
            };
            if let Some(m) = s.messages.get_mut(&seq) {
                m.visible_at = now + by;
            }
        }
        Ok(())
    }

    async fn dead_letter(
        &self,
        id: &DeliveryId,
        letters: &[DeadLetter],
    ) -> Result<(), SourceError> {
        let mut s = self.lock();
        self.check_available(&s)?;
        let Some(seq) = s.receipts.get(&id.0).copied() else {
            s.stale_receipts += 1;
            return Err(SourceError::Rejected {
                queue: self.config.name.clone(),
                message: format!("receipt {} is not current", id.0),
            });
        };
        let message_id = s
            .messages
            .get(&seq)
            .map(|m| m.message_id.clone())
            .unwrap_or_default();
        for letter in letters {
            push_dlq(
                &mut s,
                &message_id,
                letter.body.clone(),
                letter.attributes.clone(),
                letter.reason.clone(),
            );
        }
        remove(&mut s, seq);
        Ok(())
    }
}
