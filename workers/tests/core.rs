//! The batch core, driven directly: decisions per delivery for each kind of failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{delivery, envelope, events, TestSink};
use serde_json::json;
use shared::envelope::{
    ContentEncoding, EnvelopeConfig, PackedEvent, Packer, ATTR_CONTENT_ENCODING,
};
use shared::sink::MemorySink;
use workers::core::{
    process_batch, CoreConfig, Decision, SinkHealth, REASON_INVALID_EVENT, REASON_SINK_REJECTED,
    REASON_UNDECODABLE,
};

#[tokio::test]
async fn a_batch_of_valid_envelopes_is_written_in_one_call_and_every_delivery_acked() {
    let sink = MemorySink::new();
    let batch: Vec<_> = (0..3)
        .map(|i| {
            let env = envelope(&events(i, 4));
            delivery(i as usize, &env.body, env.attributes, 1)
        })
        .collect();
    let out = process_batch(&batch, &sink, &CoreConfig::default()).await;
    assert_eq!(sink.writes(), 1);
    assert_eq!(sink.events().len(), 12);
    assert_eq!(out.written.inserted, 12);
    assert_eq!(out.sink_health, SinkHealth::Healthy);
    assert!(out.settlements.iter().all(|s| s.decision == Decision::Ack));
    assert_eq!(out.settlements[2].id, batch[2].id);
}

#[tokio::test]
async fn a_bad_event_in_an_envelope_is_split_out_alone_and_the_good_ones_written() {
    let good = events(7, 2);
    let mut bad = serde_json::to_value(&events(8, 1)[0]).unwrap();
    bad.as_object_mut().unwrap().remove("ad_id");
    let body = json!({"v": 1, "events": [good[0], bad, good[1]]}).to_string();
    let attrs = envelope(&good).attributes;
    let sink = MemorySink::new();
    let out = process_batch(
        &[delivery(1, &body, attrs, 1)],
        &sink,
        &CoreConfig::default(),
    )
    .await;

    assert_eq!(sink.events().len(), 2);
    assert!(sink.events().contains_key(&good[1].event_id));
    let Decision::AckWithLetters(letters) = &out.settlements[0].decision else {
        panic!(
            "expected an ack with letters, got {:?}",
            out.settlements[0].decision
        );
    };
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason.code, REASON_INVALID_EVENT);
    assert!(
        letters[0].reason.message.contains("/ad_id"),
        "{}",
        letters[0].reason.message
    );
    let letter: serde_json::Value = serde_json::from_str(&letters[0].body).unwrap();
    assert_eq!(letter, json!({"v": 1, "events": [bad]}));
    assert_eq!(letters[0].attributes["spillway-tenant"], "acme");
}

#[tokio::test]
async fn an_envelope_of_only_invalid_events_is_dead_lettered_without_a_write() {
    let body = json!({"v": 1, "events": [{"event_id": "nope"}, 42]}).to_string();
    let sink = MemorySink::new();
    let out = process_batch(
        &[delivery(1, &body, BTreeMap::new(), 1)],
        &sink,
        &CoreConfig::default(),
    )
    .await;
    assert_eq!(sink.writes(), 0);
    assert_eq!(out.sink_health, SinkHealth::Untouched);
    let Decision::DeadLetter(letters) = &out.settlements[0].decision else {
        panic!(
            "expected a dead letter, got {:?}",
            out.settlements[0].decision
        );
    };
    assert_eq!(letters.len(), 2);
    assert!(letters
        .iter()
        .all(|l| l.reason.code == REASON_INVALID_EVENT));
}

#[tokio::test]
async fn an_undecodable_body_is_dead_lettered_on_first_sight_with_its_reason() {
    let sink = MemorySink::new();
    let good = envelope(&events(1, 3));
    let batch = [
        delivery(1, "this is not json", BTreeMap::new(), 1),
        delivery(2, &good.body, good.attributes, 1),
    ];
    let out = process_batch(&batch, &sink, &CoreConfig::default()).await;
    let Decision::DeadLetter(letters) = &out.settlements[0].decision else {
        panic!(
            "expected a dead letter, got {:?}",
            out.settlements[0].decision
        );
    };
    assert_eq!(letters[0].reason.code, REASON_UNDECODABLE);
    assert_eq!(letters[0].body, "this is not json");
    assert_eq!(out.settlements[1].decision, Decision::Ack);
    assert_eq!(sink.events().len(), 3);
}

/// A Kafka payload that is not UTF-8 reaches the core lossily converted; even when the
/// replacement characters leave a valid envelope, nothing of it may be stored altered.
#[tokio::test]
async fn a_body_the_source_could_not_read_as_text_is_dead_lettered_unread() {
    let sink = MemorySink::new();
    let env = envelope(&events(2, 3));
    let mut unreadable = delivery(1, &env.body, env.attributes, 1);
    unreadable.body_error = Some("the message body is not UTF-8 text".into());
    let out = process_batch(&[unreadable], &sink, &CoreConfig::default()).await;
    assert_eq!(sink.writes(), 0);
    let Decision::DeadLetter(letters) = &out.settlements[0].decision else {
        panic!(
            "expected a dead letter, got {:?}",
            out.settlements[0].decision
        );
    };
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason.code, REASON_UNDECODABLE);
    assert_eq!(
        letters[0].reason.message,
        "the message body is not UTF-8 text"
    );
}

#[tokio::test]
async fn a_transient_sink_failure_retries_every_delivery_with_a_delay_that_grows_to_the_cap() {
    let sink = MemorySink::new();
    sink.set_fail_always(true);
    let cfg = CoreConfig::default();
    let env = envelope(&events(3, 2));
    let mut previous = Duration::ZERO;
    for receive_count in 1..=12 {
        let out = process_batch(
            &[delivery(
                1,
                &env.body,
                env.attributes.clone(),
                receive_count,
            )],
            &sink,
            &cfg,
        )
        .await;
        assert!(out.is_transient_failure());
        assert_eq!(out.samples.len(), 1);
        assert_eq!(out.samples[0].message_id, "m-1");
        assert_eq!(out.samples[0].events.len(), 2);
        let Decision::RetryLater(delay) = out.settlements[0].decision else {
            panic!("expected a retry, got {:?}", out.settlements[0].decision);
        };
        let base = Duration::from_secs(1 << (receive_count - 1)).min(Duration::from_secs(300));
        assert!(
            delay <= base && delay >= base.mul_f64(0.8).max(Duration::from_secs(1)),
            "{delay:?}"
        );
        if base < Duration::from_secs(300) {
            assert!(delay > previous, "{delay:?} after {previous:?}");
        }
        previous = delay;
    }
}

#[test]
fn the_retry_delay_is_never_under_the_minimum_nor_over_the_cap() {
    let cfg = CoreConfig {
        min_retry_delay: Duration::from_secs(2),
        max_retry_delay: Duration::from_secs(60),
        retry_jitter: 0.5,
        ..CoreConfig::default()
    };
    assert_eq!(cfg.retry_delay_with(1, 0.99), Duration::from_secs(2));
    assert_eq!(cfg.retry_delay_with(3, 0.0), Duration::from_secs(8));
    assert_eq!(cfg.retry_delay_with(3, 0.5), Duration::from_secs(6));
    assert_eq!(cfg.retry_delay_with(100, 0.0), Duration::from_secs(60));
    assert_eq!(cfg.retry_delay_with(0, 0.0), Duration::from_secs(2));
}

#[tokio::test]
async fn a_permanent_rejection_dead_letters_only_the_culprit_event() {
    let sink = TestSink::new();
    let evs: Vec<_> = (0..3).map(|i| events(10 + i, 3)).collect();
    let culprit = evs[1][1].event_id;
    sink.reject.lock().unwrap().insert(culprit);
    let batch: Vec<_> = evs
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let env = envelope(e);
            delivery(i, &env.body, env.attributes, 1)
        })
        .collect();
    let out = process_batch(&batch, sink.as_ref(), &CoreConfig::default()).await;

    assert_eq!(out.sink_health, SinkHealth::Healthy);
    assert_eq!(out.settlements[0].decision, Decision::Ack);
    assert_eq!(out.settlements[2].decision, Decision::Ack);
    let Decision::AckWithLetters(letters) = &out.settlements[1].decision else {
        panic!(
            "expected an ack with letters, got {:?}",
            out.settlements[1].decision
        );
    };
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason.code, REASON_SINK_REJECTED);
    assert!(letters[0].body.contains(&culprit.to_string()));
    assert_eq!(sink.stored(), 8);
    assert!(!sink.inner.events().contains_key(&culprit));
    assert_eq!(out.written.inserted, 8);
}

#[tokio::test]
async fn a_redelivered_batch_that_fails_transiently_is_written_delivery_by_delivery() {
    let sink = TestSink::new();
    let (a, b, c) = (events(30, 2), events(31, 2), events(32, 2));
    sink.transient_for.lock().unwrap().insert(b[0].event_id);
    let (ea, eb, ec) = (envelope(&a), envelope(&b), envelope(&c));
    // First sight: the whole batch is retried (an outage looks exactly like this).
    let first = [
        delivery(1, &ea.body, ea.attributes.clone(), 1),
        delivery(2, &eb.body, eb.attributes.clone(), 1),
        delivery(3, &ec.body, ec.attributes.clone(), 1),
    ];
    let out = process_batch(&first, sink.as_ref(), &CoreConfig::default()).await;
    assert!(out
        .settlements
        .iter()
        .all(|s| matches!(s.decision, Decision::RetryLater(_))));
    assert_eq!(sink.stored(), 0);
    // Redelivered: the neighbours are written and acked; only the failing one waits again.
    let again = [
        delivery(1, &ea.body, ea.attributes, 2),
        delivery(2, &eb.body, eb.attributes, 2),
        delivery(3, &ec.body, ec.attributes, 2),
    ];
    let out = process_batch(&again, sink.as_ref(), &CoreConfig::default()).await;
    assert_eq!(out.settlements[0].decision, Decision::Ack);
    assert!(matches!(
        out.settlements[1].decision,
        Decision::RetryLater(_)
    ));
    assert_eq!(out.settlements[2].decision, Decision::Ack);
    assert_eq!(out.sink_health, SinkHealth::Healthy);
    assert_eq!(sink.stored(), 4);
}

#[tokio::test]
async fn a_transient_failure_while_isolating_retries_that_delivery_only() {
    let sink = TestSink::new();
    let a = events(20, 2);
    let b = events(21, 2);
    sink.reject.lock().unwrap().insert(a[0].event_id);
    sink.transient_for.lock().unwrap().insert(b[0].event_id);
    let (ea, eb) = (envelope(&a), envelope(&b));
    let batch = [
        delivery(1, &ea.body, ea.attributes, 1),
        delivery(2, &eb.body, eb.attributes, 2),
    ];
    let out = process_batch(&batch, sink.as_ref(), &CoreConfig::default()).await;
    // The batch write is rejected (a's event); writing b alone then fails transiently.
    assert!(out.is_transient_failure());
    assert!(matches!(out.settlements[0].decision, Decision::AckWithLetters(ref l) if l.len() == 1));
    assert!(matches!(
        out.settlements[1].decision,
        Decision::RetryLater(_)
    ));
    assert_eq!(sink.stored(), 1);
    assert!(sink.inner.events().contains_key(&a[1].event_id));
}

#[tokio::test]
async fn an_sns_notification_wrapping_a_zstd_envelope_is_decoded_and_written() {
    let evs = events(30, 5);
    let packed: Vec<_> = evs.iter().map(|e| PackedEvent::new(e).unwrap()).collect();
    let env = Packer::new(EnvelopeConfig {
        encoding: ContentEncoding::Zstd,
        split_by_type: false,
        ..EnvelopeConfig::default()
    })
    .pack("acme", &packed)
    .unwrap()
    .remove(0);
    let note = json!({
        "Type": "Notification",
        "MessageId": "sns-1",
        "Message": env.body,
        "MessageAttributes": {
            ATTR_CONTENT_ENCODING: {"Type": "String", "Value": "zstd"},
            "spillway-tenant": {"Type": "String", "Value": "acme"}
        }
    })
    .to_string();
    let sink = MemorySink::new();
    let out = process_batch(
        &[delivery(1, &note, BTreeMap::new(), 1)],
        &sink,
        &CoreConfig::default(),
    )
    .await;
    assert_eq!(out.settlements[0].decision, Decision::Ack);
    assert_eq!(sink.events().len(), 5);
    assert!(evs.iter().all(|e| sink.events()[&e.event_id] == *e));
}

/// Ten envelopes of two events each (seeds from `seed`), on their second receive.
fn redelivered_batch(seed: u64) -> (Vec<Vec<shared::AdEvent>>, Vec<shared::Delivery>) {
    let evs: Vec<_> = (0..10).map(|i| events(seed + i, 2)).collect();
    let batch = evs
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let env = envelope(e);
            delivery(i, &env.body, env.attributes, 2)
        })
        .collect();
    (evs, batch)
}

#[tokio::test]
async fn a_redelivered_batch_on_a_store_that_is_down_stops_writing_alone_after_a_few_failures() {
    let (evs, batch) = redelivered_batch(300);
    let sink = TestSink::new();
    sink.transient_for
        .lock()
        .unwrap()
        .extend(evs.iter().flatten().map(|e| e.event_id));
    let out = process_batch(&batch, sink.as_ref(), &CoreConfig::default()).await;
    // The whole batch, then deliveries alone until ALONE_FAILURES_MEANING_DOWN failed in a
    // row: not ten writes, each of which could wait out a connect timeout.
    assert_eq!(
        sink.attempts.load(std::sync::atomic::Ordering::SeqCst),
        1 + workers::core::ALONE_FAILURES_MEANING_DOWN
    );
    assert_eq!(out.sink_health, SinkHealth::Unavailable);
    assert!(out
        .settlements
        .iter()
        .all(|s| matches!(s.decision, Decision::RetryLater(_))));
}

#[tokio::test]
async fn a_redelivered_batch_whose_first_delivery_chokes_the_store_still_writes_the_rest() {
    let (evs, batch) = redelivered_batch(400);
    let sink = TestSink::new();
    sink.transient_for
        .lock()
        .unwrap()
        .insert(evs[0][0].event_id);
    let out = process_batch(&batch, sink.as_ref(), &CoreConfig::default()).await;
    assert_eq!(sink.stored(), 18);
    assert!(matches!(
        out.settlements[0].decision,
        Decision::RetryLater(_)
    ));
    assert!(out.settlements[1..]
        .iter()
        .all(|s| s.decision == Decision::Ack));
}
