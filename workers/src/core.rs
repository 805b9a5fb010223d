//! The batch core: decides, for each delivery of a batch, whether it is acknowledged, retried
//! later or dead-lettered. It knows no broker: runtimes translate its [`BatchOutcome`].
//!
//! A batch is decoded delivery by delivery ([`prepare`]), every valid event of the batch is
//! written in one sink call, and each delivery is then settled from the write's result
//! ([`write_prepared`]); [`process_batch`] does both.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use serde_json::value::RawValue;
use serde_json::Value;
use shared::envelope::{decode_message, ATTR_CONTENT_ENCODING, ATTR_TYPES};
use shared::event::RawEvent;
use shared::{
    AdEvent, Clock, DeadLetter, DeadLetterReason, Delivery, DeliveryId, EventType, FieldError,
    Sink, SinkError, SystemClock, ValidationPolicy, WriteReport,
};
use tracing::{debug, warn};

/// Reason code of a message whose body is not an envelope.
pub const REASON_UNDECODABLE: &str = "undecodable";
/// Reason code of one event that failed validation, split out of its envelope.
pub const REASON_INVALID_EVENT: &str = "invalid_event";
/// Reason code of events the store refused permanently.
pub const REASON_SINK_REJECTED: &str = "sink_rejected";
/// How many valid events of each transiently failed delivery are kept in the outcome, so a
/// runtime can probe the sink with them (writes are idempotent) without receiving anything.
pub const SAMPLE_EVENTS: usize = 4;
/// How many transiently failed deliveries of a batch give the outcome a [`ProbeSample`].
pub const SAMPLE_DELIVERIES: usize = 4;
/// When a redelivered batch is written delivery by delivery, this many transient failures in
/// a row before anything is stored mean the store is down: the rest are retried untried.
pub const ALONE_FAILURES_MEANING_DOWN: usize = 3;

/// How the core decides.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Validation rules; workers re-check structure only (ingest already checked time).
    pub policy: ValidationPolicy,
    /// Clock for time rules, when `policy` has any.
    pub clock: Arc<dyn Clock>,
    /// Shortest retry delay (the first retry); never zero. Default 1 s.
    pub min_retry_delay: Duration,
    /// Longest retry delay, before jitter. Default 5 min.
    pub max_retry_delay: Duration,
    /// Fraction of the delay taken off at random (0 to 0.5), so retries of one failed
    /// batch spread out. Default 0.2.
    pub retry_jitter: f64,
}

impl Default for CoreConfig {
    fn default() -> Self {
        Self {
            policy: ValidationPolicy::structural(),
            clock: Arc::new(SystemClock),
            min_retry_delay: Duration::from_secs(1),
            max_retry_delay: Duration::from_secs(300),
            retry_jitter: 0.2,
        }
    }
}

impl CoreConfig {
    /// The retry delay after the `receive_count`-th receive, with jitter from `unit`
    /// (a number in `[0, 1)`): `min · 2^(n−1)` capped at `max`, less up to `retry_jitter` of
    /// it, never under `min` (and never zero).
    pub fn retry_delay_with(&self, receive_count: u32, unit: f64) -> Duration {
        let min = self.min_retry_delay.max(Duration::from_millis(1));
        let max = self.max_retry_delay.max(min);
        let doublings = receive_count.saturating_sub(1).min(30);
        let base = min.saturating_mul(1_u32 << doublings).min(max);
        let jitter = self.retry_jitter.clamp(0.0, 0.5) * unit.clamp(0.0, 1.0);
        base.mul_f64(1.0 - jitter).max(min)
    }

    /// The retry delay after the `receive_count`-th receive, with random jitter.
    pub fn retry_delay(&self, receive_count: u32) -> Duration {
        self.retry_delay_with(receive_count, rand::rng().random::<f64>())
    }
}

/// What to do with one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Done: delete it.
    Ack,
    /// Its valid events are stored; send these letters (its bad events) to the DLQ, then
    /// delete it ([`shared::Source::dead_letter`]).
    AckWithLetters(Vec<DeadLetter>),
    /// Make it visible again after this delay (never zero).
    RetryLater(Duration),
    /// Nothing of it was stored: send these letters to the DLQ, then delete it.
    DeadLetter(Vec<DeadLetter>),
}

impl Decision {
    /// The letters to send to the DLQ before deleting the delivery (empty for the others).
    pub fn letters(&self) -> &[DeadLetter] {
        match self {
            Self::AckWithLetters(l) | Self::DeadLetter(l) => l,
            Self::Ack | Self::RetryLater(_) => &[],
        }
    }
}

/// The decision for one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    /// Receipt to settle it with.
    pub id: DeliveryId,
    /// Its stable message id, for logs.
    pub message_id: String,
    /// What to do.
    pub decision: Decision,
}

/// What the batch learnt about the sink, for a circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkHealth {
    /// No write was needed (nothing valid in the batch).
    Untouched,
    /// The sink answered (stored, or refused data permanently).
    Healthy,
    /// A write failed transiently: the sink is down, overloaded or timing out.
    Unavailable,
}

/// The decisions for a batch, one per delivery in order, and what the writes did.
#[derive(Debug, Clone)]
pub struct BatchOutcome {
    /// One per delivery, in the order received.
    pub settlements: Vec<Settlement>,
    /// Events stored and duplicates, over every write of the batch.
    pub written: WriteReport,
    /// Whether the sink was reachable.
    pub sink_health: SinkHealth,
    /// The last sink error, for logs.
    pub sink_error: Option<String>,
    /// When the sink failed transiently: up to [`SAMPLE_DELIVERIES`] of the deliveries to be
    /// retried, each with up to [`SAMPLE_EVENTS`] of its valid events, to probe the sink with.
    pub samples: Vec<ProbeSample>,
}

/// A few valid events of one delivery whose write failed transiently.
///
/// Kept per delivery so a circuit breaker can tell a store that fails every write (the
/// samples of several messages all fail) from one message that fails on its own.
#[derive(Debug, Clone)]
pub struct ProbeSample {
    /// The delivery's stable message id.
    pub message_id: String,
    /// Up to [`SAMPLE_EVENTS`] of its valid events.
    pub events: Vec<AdEvent>,
}

impl BatchOutcome {
    /// Whether the batch failed because the sink is unavailable (a retry may help).
    pub fn is_transient_failure(&self) -> bool {
        self.sink_health == SinkHealth::Unavailable
    }
}

/// One delivery decoded and validated, waiting for the write.
#[derive(Debug, Clone)]
pub struct PreparedDelivery {
    id: DeliveryId,
    message_id: String,
    receive_count: u32,
    content: Content,
}

#[derive(Debug, Clone)]
enum Content {
    Undecodable(DeadLetter),
    Decoded {
        events: Vec<AdEvent>,
        letters: Vec<DeadLetter>,
        letter_attributes: BTreeMap<String, String>,
    },
}

impl PreparedDelivery {
    /// The receipt.
    pub fn id(&self) -> &DeliveryId {
        &self.id
    }

    /// The source's message id (the same across redeliveries).
    pub fn message_id(&self) -> &str {
        &self.message_id
    }

    /// How many times the source has delivered it, this time included.
    pub fn receive_count(&self) -> u32 {
        self.receive_count
    }

    /// How many valid events it holds.
    pub fn event_count(&self) -> usize {
        match &self.content {
            Content::Undecodable(_) => 0,
            Content::Decoded { events, .. } => events.len(),
        }
    }
}

/// Decodes and validates one delivery.
pub fn prepare(delivery: &Delivery, cfg: &CoreConfig) -> PreparedDelivery {
    let encoding = delivery
        .attributes
        .get(ATTR_CONTENT_ENCODING)
        .map(String::as_str);
    let decoded = match &delivery.body_error {
        Some(why) => Err(why.clone()),
        None => decode_message(&delivery.body, encoding).map_err(|e| e.to_string()),
    };
    let content = match decoded {
        Err(why) => Content::Undecodable(DeadLetter {
            body: delivery.body.clone(),
            attributes: delivery.attributes.clone(),
            reason: DeadLetterReason {
                code: REASON_UNDECODABLE.into(),
                message: why,
            },
        }),
        Ok(decoded) => {
            let mut letter_attributes = delivery.attributes.clone();
            letter_attributes.extend(decoded.notification_attributes);
            // Split-out letters are plain JSON whatever the original encoding was.
            letter_attributes.insert(ATTR_CONTENT_ENCODING.into(), "identity".into());
            let mut events = Vec::with_capacity(decoded.events.len());
            let mut letters = Vec::new();
            for raw in decoded.events {
                match validate(&raw, cfg) {
                    Ok(ev) => events.push(ev),
                    Err(errors) => letters.push(event_letter(
                        raw.get(),
                        &letter_attributes,
                        REASON_INVALID_EVENT,
                        join_errors(&errors),
                    )),
                }
            }
            Content::Decoded {
                events,
                letters,
                letter_attributes,
            }
        }
    };
    PreparedDelivery {
        id: delivery.id.clone(),
        message_id: delivery.message_id.clone(),
        receive_count: delivery.receive_count,
        content,
    }
}

fn validate(raw: &RawValue, cfg: &CoreConfig) -> Result<AdEvent, Vec<FieldError>> {
    // Read straight from the event's text, as ingest does: no `Value` tree in between.
    RawEvent::from_json_str(raw.get(), &cfg.policy, cfg.clock.as_ref())
        .map_err(|e| {
            vec![FieldError::new(
                "",
                shared::ErrorCode::InvalidJson,
                format!("not valid JSON: {e}"),
            )]
        })?
        .validate()
}

fn join_errors(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// A DLQ letter holding one event alone, in an envelope of its own.
fn event_letter(
    raw_event: &str,
    attributes: &BTreeMap<String, String>,
    code: &str,
    message: String,
) -> DeadLetter {
    let mut attributes = attributes.clone();
    let event_type = serde_json::from_str::<Value>(raw_event)
        .ok()
        .and_then(|v| v.get("type").and_then(Value::as_str).map(EventType::parse))
        .and_then(Result::ok);
    match event_type {
        Some(t) => attributes.insert(ATTR_TYPES.into(), format!("[\"{}\"]", t.as_str())),
        None => attributes.remove(ATTR_TYPES),
    };
    DeadLetter {
        body: format!("{{\"v\":1,\"events\":[{raw_event}]}}"),
        attributes,
        reason: DeadLetterReason {
            code: code.into(),
            message,
        },
    }
}

/// Decodes, validates and writes a batch, and decides for each delivery.
pub async fn process_batch(
    deliveries: &[Delivery],
    sink: &dyn Sink,
    cfg: &CoreConfig,
) -> BatchOutcome {
    let prepared = deliveries.iter().map(|d| prepare(d, cfg)).collect();
    write_prepared(prepared, sink, cfg).await
}

/// How one delivery's events fared in the writes.
enum WriteFate {
    Stored,
    Retry,
    /// Some events refused permanently (letters), the others stored.
    Rejected(Vec<DeadLetter>, bool),
}

/// Writes every valid event of the prepared deliveries in one call and decides for each.
/// A transient error retries every delivery that had events; a permanent one writes delivery
/// by delivery, then event by event, to dead-letter only what the store refuses.
pub async fn write_prepared(
    prepared: Vec<PreparedDelivery>,
    sink: &dyn Sink,
    cfg: &CoreConfig,
) -> BatchOutcome {
    let mut all = Vec::new();
    let mut ranges: Vec<Range<usize>> = Vec::with_capacity(prepared.len());
    let mut parts = Vec::with_capacity(prepared.len());
    for p in prepared {
        let start = all.len();
        let (letters, attrs) = match p.content {
            Content::Undecodable(letter) => (vec![letter], BTreeMap::new()),
            Content::Decoded {
                events,
                letters,
                letter_attributes,
            } => {
                all.extend(events);
                (letters, letter_attributes)
            }
        };
        ranges.push(start..all.len());
        parts.push((p.id, p.message_id, p.receive_count, letters, attrs));
    }

    let mut written = WriteReport::default();
    let mut sink_error = None;
    let mut health = SinkHealth::Untouched;
    let mut fates: Vec<WriteFate> = ranges.iter().map(|_| WriteFate::Stored).collect();
    if !all.is_empty() {
        match sink.write(&all).await {
            Ok(report) => {
                add(&mut written, report);
                health = SinkHealth::Healthy;
            }
            Err(e) if e.is_transient() => {
                sink_error = Some(e.to_string());
                let with_events: Vec<usize> = (0..ranges.len())
                    .filter(|&i| !ranges[i].is_empty())
                    .collect();
                let redelivered = with_events.iter().any(|&i| parts[i].2 > 1);
                if with_events.len() > 1 && redelivered {
                    // A delivery that failed before may be what the store chokes on (a hot
                    // row, a lock timeout): write each delivery alone, so its neighbours
                    // are not retried with it until redrive burns them into the DLQ.
                    warn!(events = all.len(), error = %e, "Sink failed on a redelivered batch; writing deliveries one by one");
                    let mut any_stored = false;
                    let mut failures_in_a_row = 0;
                    for &i in &with_events {
                        // A store that fails the first few alone too is down, not choking
                        // on one delivery: trying the rest, each up to a timeout, would only
                        // hold the batch (and a Lambda invocation) for minutes.
                        if !any_stored && failures_in_a_row >= ALONE_FAILURES_MEANING_DOWN {
                            fates[i] = WriteFate::Retry;
                            continue;
                        }
                        match sink.write(&all[ranges[i].clone()]).await {
                            Ok(report) => {
                                add(&mut written, report);
                                any_stored = true;
                            }
                            Err(e) if e.is_transient() => {
                                fates[i] = WriteFate::Retry;
                                failures_in_a_row += 1;
                            }
                            Err(e) => {
                                sink_error = Some(e.to_string());
                                fates[i] = isolate(
                                    &all[ranges[i].clone()],
                                    true,
                                    sink,
                                    &parts[i].4,
                                    &mut written,
                                    &mut sink_error,
                                )
                                .await;
                                any_stored |= !matches!(fates[i], WriteFate::Retry);
                            }
                        }
                    }
                    health = if any_stored {
                        SinkHealth::Healthy
                    } else {
                        SinkHealth::Unavailable
                    };
                } else {
                    warn!(events = all.len(), error = %e, "Sink unavailable; retrying batch later");
                    health = SinkHealth::Unavailable;
                    for &i in &with_events {
                        fates[i] = WriteFate::Retry;
                    }
                }
            }
            Err(e) => {
                warn!(events = all.len(), error = %e, "Sink rejected batch; isolating the culprits");
                sink_error = Some(e.to_string());
                let mut unavailable = false;
                let with_events = ranges.iter().filter(|r| !r.is_empty()).count();
                for (i, r) in ranges.iter().enumerate() {
                    if r.is_empty() {
                        continue;
                    }
                    let fate = isolate(
                        &all[r.clone()],
                        with_events == 1,
                        sink,
                        &parts[i].4,
                        &mut written,
                        &mut sink_error,
                    )
                    .await;
                    unavailable |= matches!(fate, WriteFate::Retry);
                    fates[i] = fate;
                }
                health = if unavailable {
                    SinkHealth::Unavailable
                } else {
                    SinkHealth::Healthy
                };
            }
        }
    }

    let samples = if health == SinkHealth::Unavailable {
        fates
            .iter()
            .zip(&ranges)
            .zip(&parts)
            .filter(|((fate, r), _)| matches!(fate, WriteFate::Retry) && !r.is_empty())
            .take(SAMPLE_DELIVERIES)
            .map(|((_, r), part)| ProbeSample {
                message_id: part.1.clone(),
                events: all[r.clone()].iter().take(SAMPLE_EVENTS).cloned().collect(),
            })
            .collect()
    } else {
        Vec::new()
    };
    let settlements = parts
        .into_iter()
        .zip(fates)
        .zip(&ranges)
        .map(
            |(((id, message_id, receive_count, mut letters, _), fate), r)| {
                let decision = match fate {
                    WriteFate::Retry => Decision::RetryLater(cfg.retry_delay(receive_count)),
                    WriteFate::Stored | WriteFate::Rejected(..) => {
                        let (rejected, any_stored) = match fate {
                            WriteFate::Rejected(l, any) => (l, any),
                            _ => (Vec::new(), !r.is_empty()),
                        };
                        letters.extend(rejected);
                        if letters.is_empty() {
                            Decision::Ack
                        } else if any_stored {
                            Decision::AckWithLetters(letters)
                        } else {
                            Decision::DeadLetter(letters)
                        }
                    }
                };
                debug!(message_id = %message_id, decision = ?decision, "Decided delivery");
                Settlement {
                    id,
                    message_id,
                    decision,
                }
            },
        )
        .collect();
    BatchOutcome {
        settlements,
        written,
        sink_health: health,
        sink_error,
        samples,
    }
}

fn add(total: &mut WriteReport, report: WriteReport) {
    total.inserted += report.inserted;
    total.duplicates += report.duplicates;
}

/// Finds what the store refuses among one delivery's events: the delivery's events together
/// first (unless the batch was this delivery alone), then one by one.
async fn isolate(
    events: &[AdEvent],
    alone_in_batch: bool,
    sink: &dyn Sink,
    letter_attributes: &BTreeMap<String, String>,
    written: &mut WriteReport,
    sink_error: &mut Option<String>,
) -> WriteFate {
    if !alone_in_batch || events.len() == 1 {
        match sink.write(events).await {
            Ok(report) => {
                add(written, report);
                return WriteFate::Stored;
            }
            Err(e) if e.is_transient() => {
                *sink_error = Some(e.to_string());
                return WriteFate::Retry;
            }
            Err(e) if events.len() == 1 => {
                return WriteFate::Rejected(
                    vec![rejected_letter(&events[0], letter_attributes, &e)],
                    false,
                );
            }
            Err(_) => {}
        }
    }
    let mut letters = Vec::new();
    let mut any_stored = false;
    for ev in events {
        match sink.write(std::slice::from_ref(ev)).await {
            Ok(report) => {
                add(written, report);
                any_stored = true;
            }
            Err(e) if e.is_transient() => {
                *sink_error = Some(e.to_string());
                // What was stored stays stored; the redelivery finds it as duplicates.
                return WriteFate::Retry;
            }
            Err(e) => letters.push(rejected_letter(ev, letter_attributes, &e)),
        }
    }
    if letters.is_empty() {
        WriteFate::Stored
    } else {
        WriteFate::Rejected(letters, any_stored)
    }
}

fn rejected_letter(
    event: &AdEvent,
    letter_attributes: &BTreeMap<String, String>,
    error: &SinkError,
) -> DeadLetter {
    // Serialising a validated event cannot fail; an empty object would still be a letter.
    let json = serde_json::to_string(event).unwrap_or_else(|_| "{}".into());
    warn!(event_id = %event.event_id, error = %error, "Store rejected event; dead-lettering it");
    event_letter(
        &json,
        letter_attributes,
        REASON_SINK_REJECTED,
        error.to_string(),
    )
}
