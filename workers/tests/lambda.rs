//! The Lambda SQS handler driven with SQS event fixtures: exactly the records to retry end up
//! in `batchItemFailures`, permanent failures go to the DLQ, deadlines and panics are
//! contained per record; while the store is down, the records it holds back are requeued.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_lambda_events::event::sqs::SqsEvent;
use common::{envelope, events, TestSink};
use serde_json::{json, Value};
use shared::source::ATTR_REQUEUES;
use shared::{AdEvent, DeadLetter, DeadLetterQueue, Requeue, Requeued, SourceError};
use workers::core::REASON_UNDECODABLE;
use workers::lambda::{HandlerError, LambdaConfig, SqsHandler};

/// A DLQ that keeps what it is sent (or refuses everything, or never answers).
#[derive(Debug, Default)]
struct TestDlq {
    letters: Mutex<Vec<DeadLetter>>,
    refuse: bool,
    hangs: bool,
}

#[async_trait]
impl DeadLetterQueue for TestDlq {
    async fn send(&self, letters: &[DeadLetter]) -> Result<(), SourceError> {
        if self.hangs {
            std::future::pending::<()>().await;
        }
        if self.refuse {
            return Err(SourceError::Unavailable {
                queue: "dlq".into(),
                message: "throttled".into(),
            });
        }
        self.letters.lock().unwrap().extend_from_slice(letters);
        Ok(())
    }
}

/// A queue that keeps what is requeued onto it, refusing the bodies in `refuse` (or never
/// answering).
#[derive(Debug, Default)]
struct TestQueue {
    sent: Mutex<Vec<Requeued>>,
    refuse: Vec<String>,
    hangs: bool,
}

#[async_trait]
impl Requeue for TestQueue {
    async fn requeue(&self, messages: &[Requeued]) -> Vec<Result<(), SourceError>> {
        if self.hangs {
            std::future::pending::<()>().await;
        }
        messages
            .iter()
            .map(|m| {
                if self.refuse.contains(&m.body) {
                    return Err(SourceError::Unavailable {
                        queue: "worker".into(),
                        message: "throttled".into(),
                    });
                }
                self.sent.lock().unwrap().push(m.clone());
                Ok(())
            })
            .collect()
    }
}

/// Every event of `evs` fails transiently: the store is down.
fn store_down(sink: &TestSink, evs: &[Vec<AdEvent>]) {
    sink.transient_for
        .lock()
        .unwrap()
        .extend(evs.iter().flatten().map(|e| e.event_id));
}

/// One SQS record as the event source mapping sends it.
fn record(id: &str, body: &str, attributes: &std::collections::BTreeMap<String, String>) -> Value {
    let message_attributes: serde_json::Map<String, Value> = attributes
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                json!({"stringValue": v, "stringListValues": [], "binaryListValues": [], "dataType": "String"}),
            )
        })
        .collect();
    json!({
        "messageId": id,
        "receiptHandle": format!("rh-{id}"),
        "body": body,
        "attributes": {
            "ApproximateReceiveCount": "1",
            "SentTimestamp": "1700000000000",
            "SenderId": "AIDAEXAMPLE",
            "ApproximateFirstReceiveTimestamp": "1700000000001"
        },
        "messageAttributes": message_attributes,
        "md5OfBody": "00000000000000000000000000000000",
        "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-1:000000000000:events-worker",
        "awsRegion": "us-east-1"
    })
}

/// Ten records, one envelope of 3 events each except record 3 (not an envelope).
fn batch() -> (SqsEvent, Vec<Vec<AdEvent>>) {
    let mut records = Vec::new();
    let mut evs = Vec::new();
    for i in 0..10_u64 {
        let e = events(100 + i, 3);
        let env = envelope(&e);
        if i == 3 {
            records.push(record(
                &format!("m-{i}"),
                "this is not an envelope",
                &Default::default(),
            ));
        } else {
            records.push(record(&format!("m-{i}"), &env.body, &env.attributes));
        }
        evs.push(e);
    }
    let event: SqsEvent = serde_json::from_value(json!({"Records": records})).unwrap();
    (event, evs)
}

fn handler(sink: Arc<TestSink>, dlq: Option<Arc<TestDlq>>) -> SqsHandler {
    SqsHandler::new(
        sink,
        dlq.map(|d| d as Arc<dyn DeadLetterQueue>),
        LambdaConfig::default(),
    )
}

fn failures(resp: &aws_lambda_events::event::sqs::SqsBatchResponse) -> Vec<String> {
    resp.batch_item_failures
        .iter()
        .map(|f| f.item_identifier.clone())
        .collect()
}

fn in_a_minute() -> SystemTime {
    SystemTime::now() + Duration::from_secs(60)
}

#[tokio::test]
async fn a_poison_record_goes_to_the_dlq_and_only_the_transient_failure_is_retried() {
    let (event, evs) = batch();
    let sink = TestSink::new();
    sink.transient_for
        .lock()
        .unwrap()
        .insert(evs[6][1].event_id);
    let dlq = Arc::new(TestDlq::default());
    let queue = Arc::new(TestQueue::default());
    let h = handler(sink.clone(), Some(dlq.clone())).with_requeue(queue.clone());
    let resp = h.handle(event, in_a_minute()).await.unwrap();
    assert_eq!(failures(&resp), ["m-6"]);
    let m = h.metrics().snapshot();
    assert_eq!(
        (m.batches, m.received, m.written, m.duplicates),
        (1, 10, 24, 0)
    );
    assert_eq!((m.dead_lettered, m.retried, m.requeued), (1, 1, 0));
    assert!(
        queue.sent.lock().unwrap().is_empty(),
        "the store stores the others: record 6 is reported, not requeued"
    );
    // 8 good records × 3 events stored; record 6's events are not.
    assert_eq!(sink.stored(), 24);
    assert!(!sink.inner.events().contains_key(&evs[6][0].event_id));
    let letters = dlq.letters.lock().unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].body, "this is not an envelope");
    assert_eq!(letters[0].reason.code, REASON_UNDECODABLE);
    let wire = serde_json::to_value(&resp).unwrap();
    assert_eq!(
        wire,
        json!({"batchItemFailures": [{"itemIdentifier": "m-6"}]})
    );
}

#[tokio::test]
async fn a_batch_that_all_succeeds_answers_an_empty_failure_list() {
    let (mut event, _) = batch();
    event.records.remove(3);
    let sink = TestSink::new();
    let resp = handler(sink.clone(), Some(Arc::new(TestDlq::default())))
        .handle(event, in_a_minute())
        .await
        .unwrap();
    assert_eq!(
        serde_json::to_value(&resp).unwrap(),
        json!({"batchItemFailures": []})
    );
    assert_eq!(sink.stored(), 27);
    assert_eq!(
        sink.attempts.load(Ordering::SeqCst),
        1,
        "one write for the whole batch"
    );
}

#[tokio::test]
async fn a_panic_in_one_record_fails_that_record_and_not_its_neighbours() {
    let (event, evs) = batch();
    let sink = TestSink::new();
    sink.panic_for.lock().unwrap().insert(evs[8][0].event_id);
    let dlq = Arc::new(TestDlq::default());
    let h = handler(sink.clone(), Some(dlq.clone()));
    let resp = h.handle(event, in_a_minute()).await.unwrap();
    assert_eq!(failures(&resp), ["m-8"]);
    assert_eq!(sink.stored(), 24);
    assert_eq!(dlq.letters.lock().unwrap().len(), 1);
    // The batch's write and the record's own: both panicked, both counted (the EMF line's
    // `Panics`; they used to be counted nowhere).
    assert_eq!(h.metrics().snapshot().write_panics, 2);
}

#[tokio::test]
async fn records_not_started_before_the_deadline_minus_the_margin_are_all_retried() {
    let (event, _) = batch();
    let sink = TestSink::new();
    let out = handler(sink.clone(), Some(Arc::new(TestDlq::default())))
        .handle(event, SystemTime::now() + Duration::from_secs(1))
        .await;
    assert!(
        matches!(out, Err(HandlerError::EveryRecordRetried(10))),
        "{out:?}"
    );
    assert_eq!(sink.attempts.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn records_left_when_the_deadline_comes_during_one_by_one_writes_are_retried() {
    let (event, evs) = batch();
    // Every write takes 400 ms and record 0 fails transiently, so the batch write fails and
    // records are then written one by one; with 3.5 s left and a 2 s margin, only the first
    // one-by-one writes start before the cutoff.
    let sink = TestSink::with_delay(Duration::from_millis(400));
    sink.transient_for
        .lock()
        .unwrap()
        .insert(evs[0][0].event_id);
    let resp = handler(sink.clone(), Some(Arc::new(TestDlq::default())))
        .handle(event, SystemTime::now() + Duration::from_millis(3_500))
        .await
        .unwrap();
    let failed = failures(&resp);
    assert!(failed.contains(&"m-0".to_owned()));
    assert!(failed.contains(&"m-9".to_owned()), "{failed:?}");
    assert!(failed.len() < 10, "some records were written: {failed:?}");
    // Every record not reported is stored (or was the poison record, dead-lettered).
    for (i, e) in evs.iter().enumerate() {
        let id = format!("m-{i}");
        if i != 3 && !failed.contains(&id) {
            assert!(sink.inner.events().contains_key(&e[0].event_id), "{id}");
        }
    }
}

#[tokio::test]
async fn a_store_that_hangs_is_given_up_at_the_cutoff_and_every_record_reported() {
    let (event, _) = batch();
    // A black-holed store: the write would take a minute. 3 s left with a 2 s margin.
    let sink = TestSink::with_delay(Duration::from_secs(60));
    let started = std::time::Instant::now();
    let out = handler(sink.clone(), Some(Arc::new(TestDlq::default())))
        .handle(event, SystemTime::now() + Duration::from_secs(3))
        .await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "ran past the cutoff: {took:?}"
    );
    // All 10 are retried: an error, which keeps the batch whether or not the mapping
    // reports item failures (it would delete a batch answered with a list).
    assert!(
        matches!(out, Err(HandlerError::EveryRecordRetried(10))),
        "{out:?}"
    );
    assert_eq!(sink.stored(), 0);
}

/// A store that hangs is down: with a queue to requeue to, the records are put back as new
/// messages instead of being reported, which would use up a receive per invocation until
/// the redrive moved them to the DLQ. One record alone is requeued when the store does not
/// answer a ping either, and reported when it does.
#[tokio::test]
async fn a_store_that_hangs_past_the_cutoff_is_down_and_its_records_are_requeued() {
    let (event, _) = batch();
    let sink = TestSink::with_delay(Duration::from_secs(60));
    let queue = Arc::new(TestQueue::default());
    let h = handler(sink.clone(), Some(Arc::new(TestDlq::default()))).with_requeue(queue.clone());
    let resp = h
        .handle(event, SystemTime::now() + Duration::from_secs(3))
        .await
        .unwrap();
    assert_eq!(failures(&resp), Vec::<String>::new());
    // The poison record (3) has nothing to write; it is requeued with the rest and
    // dead-lettered on its next receive.
    assert_eq!(queue.sent.lock().unwrap().len(), 10);
    assert_eq!(h.metrics().snapshot().requeued, 10);

    for (ping_hangs, requeued) in [(true, 1), (false, 0)] {
        let (mut event, _) = batch();
        event.records.truncate(1);
        let sink = TestSink::with_delay(Duration::from_secs(60));
        sink.ping_hangs.store(ping_hangs, Ordering::SeqCst);
        let queue = Arc::new(TestQueue::default());
        let started = std::time::Instant::now();
        let out = handler(sink, Some(Arc::new(TestDlq::default())))
            .with_requeue(queue.clone())
            .handle(event, SystemTime::now() + Duration::from_secs(3))
            .await;
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "ran past the deadline"
        );
        assert_eq!(
            queue.sent.lock().unwrap().len(),
            requeued,
            "ping hangs: {ping_hangs}"
        );
        // Requeued: done, an empty list. Reported: the batch's only record, so an error.
        match out {
            Ok(resp) => assert_eq!((failures(&resp).len(), requeued), (0, 1)),
            Err(e) => assert!(
                matches!(e, HandlerError::EveryRecordRetried(1)) && requeued == 0,
                "{e:?}, ping hangs: {ping_hangs}"
            ),
        }
    }
}

#[tokio::test]
async fn a_permanent_failure_whose_dlq_send_fails_is_retried_instead_of_lost() {
    let (event, _) = batch();
    let sink = TestSink::new();
    let dlq = Arc::new(TestDlq {
        refuse: true,
        ..TestDlq::default()
    });
    let h = handler(sink.clone(), Some(dlq));
    let resp = h.handle(event, in_a_minute()).await.unwrap();
    assert_eq!(failures(&resp), ["m-3"]);
    // The EMF line's `DeadLetterFailures`: without it the record was only one of the
    // `RecordsRetried`, like a store timeout.
    assert_eq!(h.metrics().snapshot().settle_errors, 1);
    let h = handler(sink, None);
    let resp = h.handle(batch().0, in_a_minute()).await.unwrap();
    assert_eq!(
        failures(&resp),
        ["m-3"],
        "no DLQ: left to the queue's redrive"
    );
    assert_eq!(h.metrics().snapshot().settle_errors, 1);
}

#[tokio::test]
async fn a_record_to_retry_without_a_message_id_fails_the_whole_invocation() {
    let (mut event, evs) = batch();
    event.records[5].message_id = None;
    let sink = TestSink::new();
    sink.transient_for
        .lock()
        .unwrap()
        .insert(evs[5][0].event_id);
    let out = handler(sink, Some(Arc::new(TestDlq::default())))
        .handle(event, in_a_minute())
        .await;
    assert!(matches!(out, Err(HandlerError::UnnamedFailures(1))));
}

#[tokio::test]
async fn while_the_store_is_down_held_records_are_requeued_with_a_growing_delay_and_not_reported() {
    let (mut event, evs) = batch();
    // Record 5 was requeued 4 times already.
    event.records[5].message_attributes.insert(
        ATTR_REQUEUES.into(),
        serde_json::from_value(json!({"stringValue": "4", "dataType": "String"})).unwrap(),
    );
    let sink = TestSink::new();
    store_down(&sink, &evs);
    let dlq = Arc::new(TestDlq::default());
    let queue = Arc::new(TestQueue::default());
    let h = handler(sink.clone(), Some(dlq.clone())).with_requeue(queue.clone());
    let resp = h.handle(event.clone(), in_a_minute()).await.unwrap();
    assert_eq!(failures(&resp), Vec::<String>::new());
    assert_eq!(sink.stored(), 0);
    let m = h.metrics().snapshot();
    assert_eq!((m.written, m.retried, m.requeued), (0, 0, 9));
    assert_eq!(dlq.letters.lock().unwrap().len(), 1, "the poison record");
    let sent = queue.sent.lock().unwrap();
    let bodies: Vec<&str> = sent.iter().map(|m| m.body.as_str()).collect();
    let expected: Vec<&str> = event
        .records
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3)
        .map(|(_, r)| r.body.as_deref().unwrap())
        .collect();
    assert_eq!(
        bodies, expected,
        "every held record, body unchanged, in order"
    );
    for (m, r) in sent.iter().zip(
        event
            .records
            .iter()
            .filter(|r| r.message_id.as_deref() != Some("m-3")),
    ) {
        let mut attrs: std::collections::BTreeMap<String, String> = r
            .message_attributes
            .iter()
            .map(|(k, v)| (k.clone(), v.string_value.clone().unwrap()))
            .collect();
        let count = attrs
            .get(ATTR_REQUEUES)
            .map_or(1, |c| c.parse::<u32>().unwrap() + 1);
        attrs.insert(ATTR_REQUEUES.into(), count.to_string());
        assert_eq!(m.attributes, attrs, "attributes kept, counter one higher");
        // Retry backoff of the requeue count: 1 s, then 16 s (less up to 20% jitter).
        let full = Duration::from_secs(1 << (count - 1));
        assert!(
            m.delay <= full && m.delay >= full.mul_f64(0.8),
            "{count}: {:?}",
            m.delay
        );
    }
    assert_eq!(
        sent.iter()
            .filter(|m| m.attributes[ATTR_REQUEUES] == "5")
            .count(),
        1
    );
}

#[tokio::test]
async fn a_held_record_is_reported_when_it_cannot_be_requeued_or_fails_alone_while_the_store_answers(
) {
    let (mut event, evs) = batch();
    // Record 2 carries a binary attribute, which the handler cannot send again as it came.
    event.records[2].message_attributes.insert(
        "blob".into(),
        serde_json::from_value(json!({"binaryValue": "AAEC", "dataType": "Binary"})).unwrap(),
    );
    let sink = TestSink::new();
    store_down(&sink, &evs);
    let queue = Arc::new(TestQueue {
        refuse: vec![event.records[7].body.clone().unwrap()],
        ..TestQueue::default()
    });
    let resp = handler(sink.clone(), Some(Arc::new(TestDlq::default())))
        .with_requeue(queue.clone())
        .handle(event, in_a_minute())
        .await
        .unwrap();
    assert_eq!(failures(&resp), ["m-2", "m-7"]);
    assert_eq!(queue.sent.lock().unwrap().len(), 7);
    // One record failing while the store answers a ping: reported, not requeued, so a
    // record the store chokes on still reaches the DLQ through the redrive policy.
    let (mut event, evs) = batch();
    event.records.truncate(1);
    let sink = TestSink::new();
    store_down(&sink, &evs);
    let queue = Arc::new(TestQueue::default());
    let out = handler(sink, Some(Arc::new(TestDlq::default())))
        .with_requeue(queue.clone())
        .handle(event, in_a_minute())
        .await;
    // Every record of the batch is retried, so the answer is an error: an event source
    // mapping without ReportBatchItemFailures would delete the batch on a success.
    assert!(
        matches!(out, Err(HandlerError::EveryRecordRetried(1))),
        "{out:?}"
    );
    assert!(queue.sent.lock().unwrap().is_empty());
    // Without a queue to requeue to, every held record is reported.
    let (event, evs) = batch();
    let sink = TestSink::new();
    store_down(&sink, &evs);
    let resp = handler(sink, Some(Arc::new(TestDlq::default())))
        .handle(event, in_a_minute())
        .await
        .unwrap();
    assert_eq!(failures(&resp).len(), 9);
}

/// A DLQ or a queue that does not answer must not run the invocation past its deadline:
/// Lambda would fail the whole batch, stored records included, each with a receive used up.
/// What they did not take is reported instead, and the answer comes before the deadline.
#[tokio::test]
async fn a_dlq_or_requeue_that_hangs_is_given_up_before_the_deadline() {
    let (event, evs) = batch();
    let sink = TestSink::new();
    let dlq = Arc::new(TestDlq {
        hangs: true,
        ..TestDlq::default()
    });
    let started = std::time::Instant::now();
    let resp = handler(sink.clone(), Some(dlq))
        .handle(event, SystemTime::now() + Duration::from_secs(3))
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        failures(&resp),
        ["m-3"],
        "only the poison record, whose letter did not go"
    );
    assert_eq!(sink.stored(), 27);

    let sink = TestSink::new();
    store_down(&sink, &evs);
    let queue = Arc::new(TestQueue {
        hangs: true,
        ..TestQueue::default()
    });
    let started = std::time::Instant::now();
    let resp = handler(sink, Some(Arc::new(TestDlq::default())))
        .with_requeue(queue)
        .handle(batch().0, SystemTime::now() + Duration::from_secs(3))
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(failures(&resp).len(), 9, "every held record reported");
}

/// The whole-batch write is refused for one event's data, so the core writes record by
/// record: it stores 23 events, and record 5 fails transiently. The handler then writes one
/// by one, finding those 23 stored: they must count as written once, not as duplicates only.
#[tokio::test]
async fn events_stored_before_a_transient_failure_count_as_written() {
    let (event, evs) = batch();
    let sink = TestSink::new();
    sink.reject.lock().unwrap().insert(evs[0][0].event_id);
    sink.transient_for
        .lock()
        .unwrap()
        .insert(evs[5][0].event_id);
    let h = handler(sink.clone(), Some(Arc::new(TestDlq::default())));
    let resp = h.handle(event, in_a_minute()).await.unwrap();
    assert_eq!(failures(&resp), ["m-5"]);
    assert_eq!(sink.stored(), 23);
    let m = h.metrics().snapshot();
    assert_eq!(m.written, 23, "{m:?}");
}
