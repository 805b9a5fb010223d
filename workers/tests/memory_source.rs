//! The in-memory source's SQS-like semantics, which the poller tests rely on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use shared::memory_source::{MemorySource, MemorySourceConfig, REASON_MAX_RECEIVES};
use shared::{DeadLetter, DeadLetterReason, Source};

fn source(max_receive_count: Option<u32>) -> MemorySource {
    MemorySource::new(MemorySourceConfig {
        visibility_timeout: Duration::from_secs(10),
        max_receive_count,
        ..MemorySourceConfig::default()
    })
}

#[tokio::test(start_paused = true)]
async fn a_received_message_is_invisible_until_its_visibility_lapses_then_comes_back_with_a_new_receipt(
) {
    let src = source(None);
    src.send("a", BTreeMap::new());
    let first = src.receive(10, Duration::ZERO).await.unwrap();
    assert_eq!(first.len(), 1);
    assert!(src
        .receive(10, Duration::from_secs(5))
        .await
        .unwrap()
        .is_empty());
    let again = src.receive(10, Duration::from_secs(10)).await.unwrap();
    assert_eq!(again[0].receive_count, 2);
    assert_ne!(again[0].id, first[0].id);
    // The first receipt is stale now: acking it deletes nothing.
    src.ack(&[first[0].id.clone()]).await.unwrap();
    assert_eq!((src.len(), src.stale_receipts()), (1, 1));
    src.ack(&[again[0].id.clone()]).await.unwrap();
    assert!(src.is_empty());
}

#[tokio::test(start_paused = true)]
async fn retry_later_and_extend_set_the_visibility_from_now() {
    let src = source(None);
    let id = src.send("a", BTreeMap::new());
    let d = src.receive(1, Duration::ZERO).await.unwrap().remove(0);
    src.retry_later(&[(d.id.clone(), Duration::from_secs(2))])
        .await
        .unwrap();
    assert_eq!(src.retry_delays(&id), vec![Duration::from_secs(2)]);
    let d = src
        .receive(1, Duration::from_secs(3))
        .await
        .unwrap()
        .remove(0);
    src.extend(std::slice::from_ref(&d.id), Duration::from_secs(60))
        .await
        .unwrap();
    assert!(src
        .receive(1, Duration::from_secs(50))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(src.in_flight(), 1);
}

#[tokio::test(start_paused = true)]
async fn dead_letter_sends_the_letters_with_their_reason_and_deletes_the_original() {
    let src = source(None);
    let id = src.send("a", BTreeMap::new());
    let d = src.receive(1, Duration::ZERO).await.unwrap().remove(0);
    let letter = DeadLetter {
        body: "part".into(),
        attributes: BTreeMap::new(),
        reason: DeadLetterReason {
            code: "invalid_event".into(),
            message: "bad".into(),
        },
    };
    src.dead_letter(&d.id, &[letter]).await.unwrap();
    let dlq = src.dead_letters();
    assert_eq!(
        (
            dlq.len(),
            dlq[0].body.as_str(),
            dlq[0].source_message_id.as_str()
        ),
        (1, "part", id.as_str())
    );
    assert_eq!(
        dlq[0].attributes[shared::source::ATTR_ERROR_CODE],
        "invalid_event"
    );
    assert!(src.is_empty());
    // A stale receipt sends nothing.
    assert!(src.dead_letter(&d.id, &[]).await.is_err());
    assert_eq!(src.dead_letters().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_message_past_max_receive_count_is_redriven_to_the_dlq_instead_of_delivered() {
    let src = source(Some(2));
    src.send("a", BTreeMap::new());
    for _ in 0..2 {
        assert_eq!(
            src.receive(1, Duration::from_secs(11)).await.unwrap().len(),
            1
        );
    }
    assert!(src
        .receive(1, Duration::from_secs(11))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(src.dead_letters()[0].reason.code, REASON_MAX_RECEIVES);
    assert!(src.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_long_poll_wakes_up_for_a_message_sent_while_it_waits() {
    let src = std::sync::Arc::new(source(None));
    let waiter = {
        let src = std::sync::Arc::clone(&src);
        tokio::spawn(async move { src.receive(1, Duration::from_secs(20)).await })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start = tokio::time::Instant::now();
    src.send("late", BTreeMap::new());
    let got = waiter.await.unwrap().unwrap();
    assert_eq!(got[0].body, "late");
    assert!(tokio::time::Instant::now() - start < Duration::from_secs(1));
}
