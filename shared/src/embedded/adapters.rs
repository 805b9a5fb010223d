//! The ports over the embedded broker: [`TopicPublisher`] publishes to one topic,
//! [`QueueSource`] receives from and settles on one queue.

use std::time::Duration;

use async_trait::async_trait;

use super::broker::{Broker, BrokerError, SettleOutcome};
use crate::envelope::Envelope;
use crate::publisher::{PublishError, PublishReport, Publisher};
use crate::source::{DeadLetter, Delivery, DeliveryId, Source, SourceError};

/// The `Publisher` port on one topic of the embedded broker: one transaction per call,
/// acknowledged after the commit.
#[derive(Debug, Clone)]
pub struct TopicPublisher {
    broker: Broker,
    topic: String,
}

impl TopicPublisher {
    /// A publisher to `topic` (declared beforehand).
    pub fn new(broker: Broker, topic: impl Into<String>) -> Self {
        Self {
            broker,
            topic: topic.into(),
        }
    }
}

fn publish_error(topic: &str, e: &BrokerError) -> PublishError {
    if e.is_transient() {
        PublishError::Unavailable {
            destination: topic.to_owned(),
            message: e.to_string(),
        }
    } else {
        PublishError::Rejected {
            destination: topic.to_owned(),
            message: e.to_string(),
        }
    }
}

#[async_trait]
impl Publisher for TopicPublisher {
    async fn publish(&self, envelopes: &[Envelope]) -> Result<PublishReport, PublishError> {
        if envelopes.is_empty() {
            return Ok(PublishReport::of(envelopes, 0));
        }
        self.broker
            .publish(&self.topic, envelopes)
            .await
            .map_err(|e| publish_error(&self.topic, &e))?;
        Ok(PublishReport::of(envelopes, 1))
    }

    async fn ready(&self) -> Result<(), PublishError> {
        self.broker
            .check_topic(&self.topic)
            .await
            .map_err(|e| publish_error(&self.topic, &e))
    }
}

/// The `Source` port on one queue of the embedded broker.
#[derive(Debug, Clone)]
pub struct QueueSource {
    broker: Broker,
    queue: String,
    /// How long a receive hides its messages (`None`: the queue's visibility timeout).
    visibility: Option<Duration>,
}

impl QueueSource {
    /// A source draining `queue` (declared beforehand).
    pub fn new(broker: Broker, queue: impl Into<String>) -> Self {
        Self {
            broker,
            queue: queue.into(),
            visibility: None,
        }
    }

    /// Receives hide each message for `timeout` instead of the queue's visibility timeout,
    /// so a worker's heartbeat schedule (computed from its `--visibility-timeout-secs`)
    /// holds whatever the queue was declared with.
    #[must_use]
    pub fn with_visibility_timeout(mut self, timeout: Duration) -> Self {
        self.visibility = Some(timeout);
        self
    }

    fn error(&self, e: &BrokerError) -> SourceError {
        if e.is_transient() {
            SourceError::Unavailable {
                queue: self.queue.clone(),
                message: e.to_string(),
            }
        } else {
            SourceError::Rejected {
                queue: self.queue.clone(),
                message: e.to_string(),
            }
        }
    }

    /// Stale receipts mean the message was redelivered to someone else (or is gone): the
    /// caller's settle did not happen, which it must learn.
    fn settled(&self, what: &str, outcome: &SettleOutcome) -> Result<(), SourceError> {
        if outcome.stale.is_empty() {
            Ok(())
        } else {
            Err(SourceError::Rejected {
                queue: self.queue.clone(),
                message: format!(
                    "{} of {} receipts to {what} are stale (redelivered or already deleted); \
                     the others were applied",
                    outcome.stale.len(),
                    outcome.stale.len() + outcome.settled
                ),
            })
        }
    }
}

#[async_trait]
impl Source for QueueSource {
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, SourceError> {
        self.broker
            .receive_hiding(&self.queue, max, wait, self.visibility)
            .await
            .map_err(|e| self.error(&e))
    }

    async fn ack(&self, ids: &[DeliveryId]) -> Result<(), SourceError> {
        if ids.is_empty() {
            return Ok(());
        }
        let outcome = self
            .broker
            .delete_batch(&self.queue, ids)
            .await
            .map_err(|e| self.error(&e))?;
        self.settled("delete", &outcome)
    }

    async fn retry_later(&self, items: &[(DeliveryId, Duration)]) -> Result<(), SourceError> {
        if items.is_empty() {
            return Ok(());
        }
        let outcome = self
            .broker
            .change_visibility(&self.queue, items)
            .await
            .map_err(|e| self.error(&e))?;
        self.settled("retry later", &outcome)
    }

    async fn extend(&self, ids: &[DeliveryId], by: Duration) -> Result<(), SourceError> {
        if ids.is_empty() {
            return Ok(());
        }
        let items: Vec<(DeliveryId, Duration)> = ids.iter().map(|id| (id.clone(), by)).collect();
        let outcome = self
            .broker
            .change_visibility(&self.queue, &items)
            .await
            .map_err(|e| self.error(&e))?;
        self.settled("extend", &outcome)
    }

    async fn dead_letter(
        &self,
        id: &DeliveryId,
        letters: &[DeadLetter],
    ) -> Result<(), SourceError> {
        self.broker
            .dead_letter(&self.queue, id, letters)
            .await
            .map_err(|e| self.error(&e))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::io::{BufRead, BufReader, Write};
    use std::sync::Arc;

    use time::OffsetDateTime;

    use super::*;
    use crate::clock::{Clock, FixedClock, SystemClock};
    use crate::embedded::broker::{
        QueueConfig, QueueStats, Subscription, ATTR_SOURCE_QUEUE, MAX_RECEIVES_CODE,
    };
    use crate::envelope::{decode_message, PackedEvent, Packer, ATTR_TYPES};
    use crate::event::{AdEvent, EventType, ValidationPolicy};
    use crate::source::{DeadLetterReason, ATTR_ERROR_CODE, ATTR_ERROR_MESSAGE};
    use crate::synthetic::SyntheticEvents;

    const TOPIC: &str = "t";
    const QUEUE: &str = "q";
    const DLQ: &str = "q-dlq";
    const NO_WAIT: Duration = Duration::ZERO;

    struct Fixture {
        _dir: tempfile::TempDir,
        broker: Broker,
        clock: Arc<FixedClock>,
        publisher: TopicPublisher,
        source: QueueSource,
    }

    /// Subscribes `QUEUE` to `topic`, raw and unfiltered.
    async fn subscribe_queue(broker: &Broker, topic: &str) {
        let raw = Subscription {
            filter_types: None,
            raw_delivery: true,
        };
        broker.subscribe(topic, QUEUE, raw).await.unwrap();
    }

    impl Fixture {
        /// Topic `t` → queue `q` (raw, no filter) with `config`; `q-dlq` declared first.
        async fn new(config: QueueConfig) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let clock = Arc::new(FixedClock::at(OffsetDateTime::now_utc()));
            let broker =
                Broker::open_with_clock(dir.path().join("broker.db"), clock.clone()).unwrap();
            broker.declare_topic(TOPIC).await.unwrap();
            broker
                .declare_queue(DLQ, QueueConfig::default())
                .await
                .unwrap();
            broker.declare_queue(QUEUE, config).await.unwrap();
            subscribe_queue(&broker, TOPIC).await;
            Self {
                _dir: dir,
                publisher: TopicPublisher::new(broker.clone(), TOPIC),
                source: QueueSource::new(broker.clone(), QUEUE),
                broker,
                clock,
            }
        }

        fn advance(&self, by: Duration) {
            self.clock.set(self.clock.now() + by);
        }

        async fn stats(&self, queue: &str) -> QueueStats {
            self.broker.queue_stats(queue).await.unwrap()
        }
    }

    fn redrive(max_receive_count: u32) -> QueueConfig {
        QueueConfig {
            visibility_timeout: Duration::from_secs(30),
            max_receive_count: Some(max_receive_count),
            dlq: Some(DLQ.to_owned()),
            ..QueueConfig::default()
        }
    }

    fn events(n: usize, seed: u64) -> Vec<AdEvent> {
        let mut g = SyntheticEvents::new(seed, 5);
        (0..n)
            .map(|_| AdEvent::from_json(g.event(), &ValidationPolicy::default(), &SystemClock))
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// One envelope per event.
    fn envelopes(events: &[AdEvent]) -> Vec<Envelope> {
        events
            .iter()
            .flat_map(|e| {
                Packer::default()
                    .pack("acme", &[PackedEvent::new(e).unwrap()])
                    .unwrap()
            })
            .collect()
    }

    /// A packer that keeps types mixed in one envelope.
    fn shared_mixed_packer() -> Packer {
        Packer::new(crate::envelope::EnvelopeConfig {
            split_by_type: false,
            ..Default::default()
        })
    }

    fn event_of_type(t: EventType) -> AdEvent {
        events(200, 11)
            .into_iter()
            .find(|e| e.event_type == t)
            .unwrap()
    }

    fn plain(body: &str) -> Envelope {
        Envelope {
            body: body.to_owned(),
            attributes: BTreeMap::new(),
            event_count: 1,
        }
    }

    #[tokio::test]
    async fn a_published_envelope_is_received_once_and_gone_after_ack() {
        let f = Fixture::new(redrive(5)).await;
        let envs = envelopes(&events(3, 1));
        let report = f.publisher.publish(&envs).await.unwrap();
        assert_eq!((report.messages, report.events), (3, 3));

        let got = f.source.receive(10, NO_WAIT).await.unwrap();
        assert_eq!(got.len(), 3);
        for (d, e) in got.iter().zip(&envs) {
            assert_eq!(d.body, e.body);
            assert_eq!(d.attributes, e.attributes);
            assert_eq!(d.receive_count, 1);
        }
        assert!(f.source.receive(10, NO_WAIT).await.unwrap().is_empty());
        f.source
            .ack(&got.iter().map(|d| d.id.clone()).collect::<Vec<_>>())
            .await
            .unwrap();
        f.advance(Duration::from_secs(60));
        assert!(f.source.receive(10, NO_WAIT).await.unwrap().is_empty());
        assert_eq!(f.stats(QUEUE).await, QueueStats::default());
    }

    #[tokio::test]
    async fn a_source_given_a_visibility_timeout_hides_for_it_not_for_the_queues() {
        let f = Fixture::new(redrive(5)).await;
        let worker = f
            .source
            .clone()
            .with_visibility_timeout(Duration::from_secs(120));
        f.publisher.publish(&[plain("one")]).await.unwrap();
        assert_eq!(worker.receive(1, NO_WAIT).await.unwrap().len(), 1);
        f.advance(Duration::from_secs(60));
        assert!(
            worker.receive(1, NO_WAIT).await.unwrap().is_empty(),
            "back after the queue's 30 s"
        );
        f.advance(Duration::from_secs(61));
        assert_eq!(worker.receive(1, NO_WAIT).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_message_whose_visibility_lapses_is_delivered_again_with_receive_count_two() {
        let f = Fixture::new(redrive(5)).await;
        f.publisher.publish(&[plain("one")]).await.unwrap();
        let first = f.source.receive(1, NO_WAIT).await.unwrap();
        f.advance(Duration::from_secs(29));
        assert!(f.source.receive(1, NO_WAIT).await.unwrap().is_empty());
        f.advance(Duration::from_secs(2));
        let second = f.source.receive(1, NO_WAIT).await.unwrap();
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].receive_count, 2);
        assert_eq!(second[0].message_id, first[0].message_id);
        assert_ne!(
            second[0].id, first[0].id,
            "each receive has its own receipt"
        );
    }

    #[tokio::test]
    async fn a_stale_receipt_cannot_delete_a_redelivered_message() {
        let f = Fixture::new(redrive(5)).await;
        f.publisher.publish(&[plain("one")]).await.unwrap();
        let first = f.source.receive(1, NO_WAIT).await.unwrap();
        f.advance(Duration::from_secs(31));
        let second = f.source.receive(1, NO_WAIT).await.unwrap();

        let err = f.source.ack(&[first[0].id.clone()]).await.unwrap_err();
        assert!(!err.is_transient());
        assert_eq!(f.stats(QUEUE).await.in_flight, 1, "still there");
        assert!(f
            .source
            .retry_later(&[(first[0].id.clone(), Duration::ZERO)])
            .await
            .is_err());
        assert!(f
            .source
            .ack(&[DeliveryId("not-a-receipt".into())])
            .await
            .is_err());

        f.source.ack(&[second[0].id.clone()]).await.unwrap();
        assert_eq!(f.stats(QUEUE).await, QueueStats::default());
    }

    #[tokio::test]
    async fn retry_later_hides_a_message_for_its_delay_only() {
        let f = Fixture::new(redrive(5)).await;
        f.publisher.publish(&[plain("one")]).await.unwrap();
        let got = f.source.receive(1, NO_WAIT).await.unwrap();
        f.source
            .retry_later(&[(got[0].id.clone(), Duration::from_secs(10))])
            .await
            .unwrap();
        f.advance(Duration::from_secs(9));
        assert!(f.source.receive(1, NO_WAIT).await.unwrap().is_empty());
        f.advance(Duration::from_secs(2));
        let again = f.source.receive(1, NO_WAIT).await.unwrap();
        assert_eq!(again[0].receive_count, 2);
    }

    #[tokio::test]
    async fn extend_keeps_a_message_hidden_past_its_visibility_timeout() {
        let f = Fixture::new(redrive(5)).await;
        f.publisher.publish(&[plain("one")]).await.unwrap();
        let got = f.source.receive(1, NO_WAIT).await.unwrap();
        f.advance(Duration::from_secs(20));
        f.source
            .extend(&[got[0].id.clone()], Duration::from_secs(60))
            .await
            .unwrap();
        f.advance(Duration::from_secs(50));
        assert!(f.source.receive(1, NO_WAIT).await.unwrap().is_empty());
        f.advance(Duration::from_secs(11));
        assert_eq!(f.source.receive(1, NO_WAIT).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_message_received_more_than_max_receive_count_times_moves_to_the_dlq_with_the_reason()
    {
        let f = Fixture::new(redrive(2)).await;
        f.publisher.publish(&[plain("poison")]).await.unwrap();
        let first = f.source.receive(1, NO_WAIT).await.unwrap();
        f.advance(Duration::from_secs(31));
        assert_eq!(f.source.receive(1, NO_WAIT).await.unwrap().len(), 1);
        f.advance(Duration::from_secs(31));
        assert!(
            f.source.receive(1, NO_WAIT).await.unwrap().is_empty(),
            "the third receive must not deliver it"
        );
        assert_eq!(f.stats(QUEUE).await, QueueStats::default());

        let dead = f.broker.peek(DLQ, 10).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].body, "poison");
        assert_eq!(dead[0].message_id, first[0].message_id);
        assert_eq!(dead[0].attributes[ATTR_ERROR_CODE], MAX_RECEIVES_CODE);
        assert!(dead[0].attributes[ATTR_ERROR_MESSAGE].contains('2'));
        assert_eq!(dead[0].attributes[ATTR_SOURCE_QUEUE], QUEUE);
        assert_eq!(dead[0].receive_count, 0);
    }

    #[tokio::test]
    async fn dead_letter_sends_the_letters_and_deletes_the_original_atomically() {
        let f = Fixture::new(redrive(5)).await;
        f.publisher
            .publish(&[plain("envelope"), plain("other")])
            .await
            .unwrap();
        let got = f.source.receive(1, NO_WAIT).await.unwrap();
        let letter = |body: &str| DeadLetter {
            body: body.to_owned(),
            attributes: BTreeMap::from([("k".to_owned(), "v".to_owned())]),
            reason: DeadLetterReason {
                code: "invalid_event".into(),
                message: "cost_micros too large".into(),
            },
        };
        f.source
            .dead_letter(&got[0].id, &[letter("bad-1"), letter("bad-2")])
            .await
            .unwrap();
        let dead = f.broker.peek(DLQ, 10).await.unwrap();
        let bodies: Vec<&str> = dead.iter().map(|m| m.body.as_str()).collect();
        assert_eq!(bodies, ["bad-1", "bad-2"]);
        for m in &dead {
            assert_eq!(m.attributes[ATTR_ERROR_CODE], "invalid_event");
            assert_eq!(m.attributes[ATTR_ERROR_MESSAGE], "cost_micros too large");
            assert_eq!(m.attributes["k"], "v");
        }
        let left = f.broker.peek(QUEUE, 10).await.unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].body, "other");

        // The same (now deleted) receipt again: the delete fails, so nothing is sent either.
        assert!(f
            .source
            .dead_letter(&got[0].id, &[letter("bad-3")])
            .await
            .is_err());
        assert_eq!(f.broker.peek(DLQ, 10).await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn dead_letter_on_a_queue_without_dlq_keeps_the_message() {
        let f = Fixture::new(QueueConfig::default()).await;
        f.publisher.publish(&[plain("one")]).await.unwrap();
        let got = f.source.receive(1, NO_WAIT).await.unwrap();
        let err = f.source.dead_letter(&got[0].id, &[]).await.unwrap_err();
        assert!(!err.is_transient());
        assert_eq!(f.stats(QUEUE).await.in_flight, 1);
    }

    #[tokio::test]
    async fn a_filter_policy_routes_only_matching_types() {
        let f = Fixture::new(redrive(5)).await;
        for (queue, filter, raw) in [
            ("clicks", Some(vec![EventType::Click]), true),
            (
                "money",
                Some(vec![EventType::Conversion, EventType::Impression]),
                false,
            ),
        ] {
            f.broker
                .declare_queue(queue, QueueConfig::default())
                .await
                .unwrap();
            f.broker
                .subscribe(
                    TOPIC,
                    queue,
                    Subscription {
                        filter_types: filter,
                        raw_delivery: raw,
                    },
                )
                .await
                .unwrap();
        }
        let click = event_of_type(EventType::Click);
        let impression = event_of_type(EventType::Impression);
        let video = event_of_type(EventType::VideoStart);
        let mut envs = envelopes(&[click.clone(), impression.clone(), video]);
        let mixed = shared_mixed_packer();
        envs.extend(
            mixed
                .pack(
                    "acme",
                    &[
                        PackedEvent::new(&click).unwrap(),
                        PackedEvent::new(&impression).unwrap(),
                    ],
                )
                .unwrap(),
        );
        let mut untyped = plain("no types");
        untyped.attributes.insert("other".into(), "x".into());
        envs.push(untyped);
        f.publisher.publish(&envs).await.unwrap();

        let count = |q: &'static str| {
            let b = f.broker.clone();
            async move { b.queue_stats(q).await.unwrap().visible }
        };
        assert_eq!(count(QUEUE).await, 5, "no filter takes everything");
        assert_eq!(count("clicks").await, 2, "the click and the mixed envelope");
        assert_eq!(
            count("money").await,
            2,
            "the impression and the mixed envelope"
        );

        let money = f.broker.receive_now("money", 10).await.unwrap();
        let wrapped = &money[0];
        assert!(
            wrapped.attributes.is_empty(),
            "attributes travel in the body"
        );
        let decoded = decode_message(&wrapped.body, None).unwrap();
        assert_eq!(decoded.events.len(), 1);
        assert_eq!(
            decoded.notification_attributes[ATTR_TYPES],
            envs[1].attributes[ATTR_TYPES]
        );
    }

    #[tokio::test]
    async fn a_delayed_message_stays_invisible_until_its_delay_passes() {
        let f = Fixture::new(QueueConfig {
            delay: Duration::from_secs(15),
            ..QueueConfig::default()
        })
        .await;
        f.publisher.publish(&[plain("later")]).await.unwrap();
        assert_eq!(f.stats(QUEUE).await.delayed, 1);
        f.advance(Duration::from_secs(14));
        assert!(f.source.receive(1, NO_WAIT).await.unwrap().is_empty());
        f.advance(Duration::from_secs(2));
        assert_eq!(f.source.receive(1, NO_WAIT).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_message_past_its_retention_is_dropped_unreceived() {
        let f = Fixture::new(QueueConfig {
            retention: Duration::from_secs(3600),
            ..QueueConfig::default()
        })
        .await;
        f.publisher.publish(&[plain("old")]).await.unwrap();
        f.advance(Duration::from_secs(1800));
        f.publisher.publish(&[plain("young")]).await.unwrap();
        assert_eq!(f.stats(QUEUE).await.oldest_age_secs, Some(1800));
        f.advance(Duration::from_secs(1801));
        assert_eq!(f.stats(QUEUE).await.visible, 1);
        let got = f.source.receive(10, NO_WAIT).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].body, "young");
    }

    #[tokio::test]
    async fn a_long_poll_wakes_when_a_message_is_published() {
        let f = Fixture::new(QueueConfig::default()).await;
        let source = f.source.clone();
        let started = std::time::Instant::now();
        let waiter = tokio::spawn(async move { source.receive(10, Duration::from_secs(10)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        f.publisher.publish(&[plain("wake")]).await.unwrap();
        let got = waiter.await.unwrap().unwrap();
        assert_eq!(got.len(), 1);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_long_poll_on_an_empty_queue_returns_empty_after_its_wait() {
        let f = Fixture::new(QueueConfig::default()).await;
        let started = std::time::Instant::now();
        let got = f
            .source
            .receive(10, Duration::from_millis(250))
            .await
            .unwrap();
        assert!(got.is_empty());
        assert!(started.elapsed() >= Duration::from_millis(250));
    }

    #[tokio::test]
    async fn publishing_to_an_undeclared_topic_is_rejected() {
        let f = Fixture::new(QueueConfig::default()).await;
        let p = TopicPublisher::new(f.broker.clone(), "nope");
        let err = p.publish(&[plain("x")]).await.unwrap_err();
        assert!(!err.is_transient());
        assert!(p.ready().await.is_err());
        assert!(f.publisher.ready().await.is_ok());
    }

    #[tokio::test]
    async fn publishing_to_a_topic_no_queue_subscribes_to_fails_until_one_does() {
        let f = Fixture::new(QueueConfig::default()).await;
        f.broker.declare_topic("lonely").await.unwrap();
        let p = TopicPublisher::new(f.broker.clone(), "lonely");
        // Before, this was answered as published and the message was kept nowhere.
        let err = p.publish(&[plain("x")]).await.unwrap_err();
        assert!(err.is_transient(), "{err}");
        assert!(err.to_string().contains("has no subscriptions"), "{err}");
        assert!(p.ready().await.is_err());

        subscribe_queue(&f.broker, "lonely").await;
        p.ready().await.unwrap();
        p.publish(&[plain("y")]).await.unwrap();
        let got = f.source.receive(10, NO_WAIT).await.unwrap();
        assert_eq!(
            got.iter().map(|d| d.body.as_str()).collect::<Vec<_>>(),
            ["y"]
        );
    }

    #[tokio::test]
    async fn acknowledged_messages_survive_reopening_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/broker.db");
        {
            let broker = Broker::open(&path).unwrap();
            broker.dev_topology().await.unwrap();
            let p = TopicPublisher::new(broker.clone(), crate::embedded::DEV_TOPIC);
            p.publish(&[plain("keep"), plain("delete")]).await.unwrap();
            let s = QueueSource::new(broker.clone(), crate::embedded::DEV_QUEUE);
            let got = s.receive(2, NO_WAIT).await.unwrap();
            let delete = got.iter().find(|d| d.body == "delete").unwrap();
            s.ack(std::slice::from_ref(&delete.id)).await.unwrap();
        }
        let broker = Broker::open(&path).unwrap();
        let left = broker.peek(crate::embedded::DEV_QUEUE, 10).await.unwrap();
        let bodies: Vec<&str> = left.iter().map(|m| m.body.as_str()).collect();
        assert_eq!(bodies, ["keep"]);
        assert_eq!(left[0].receive_count, 1);
    }

    const KILL_CHILD_ENV: &str = "SPILLWAY_TEST_KILL_CHILD_DB";

    /// Run by `a_killed_process_loses_no_acknowledged_message_and_resurrects_no_deleted_one`
    /// in a child process: publishes and deletes forever, printing each acknowledgement.
    #[tokio::test]
    #[ignore = "child process of the SIGKILL test"]
    async fn kill_child() {
        let Ok(path) = std::env::var(KILL_CHILD_ENV) else {
            return;
        };
        let broker = Broker::open(&path).unwrap();
        let p = TopicPublisher::new(broker.clone(), crate::embedded::DEV_TOPIC);
        let s = QueueSource::new(broker, crate::embedded::DEV_QUEUE);
        let mut out = std::io::stdout();
        for i in 0_u64.. {
            p.publish(&[plain(&format!("m{i}"))]).await.unwrap();
            writeln!(out, "P m{i}").unwrap();
            if i % 2 == 0 {
                for d in s.receive(1, NO_WAIT).await.unwrap() {
                    s.ack(std::slice::from_ref(&d.id)).await.unwrap();
                    writeln!(out, "D {}", d.body).unwrap();
                }
            }
            out.flush().unwrap();
        }
    }

    #[test]
    fn a_killed_process_loses_no_acknowledged_message_and_resurrects_no_deleted_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.db");
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async { Broker::open(&path).unwrap().dev_topology().await.unwrap() });

        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "embedded::adapters::tests::kill_child",
                "--exact",
                "--ignored",
                "--nocapture",
            ])
            .env(KILL_CHILD_ENV, &path)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let (mut published, mut deleted) = (BTreeSet::new(), BTreeSet::new());
        for line in BufReader::new(child.stdout.take().unwrap()).lines() {
            let line = line.unwrap();
            if let Some(m) = line.strip_prefix("P ") {
                published.insert(m.to_owned());
            } else if let Some(m) = line.strip_prefix("D ") {
                deleted.insert(m.to_owned());
            }
            if published.len() >= 300 {
                child.kill().unwrap(); // SIGKILL on Unix
                break;
            }
        }
        child.wait().unwrap();
        assert_eq!(published.len(), 300, "the child stopped early");
        assert!(!deleted.is_empty());

        let broker = Broker::open(&path).unwrap();
        let stored: BTreeSet<String> = rt
            .block_on(broker.peek(crate::embedded::DEV_QUEUE, 100_000))
            .unwrap()
            .into_iter()
            .map(|m| m.body)
            .collect();
        for m in published.difference(&deleted) {
            assert!(stored.contains(m), "acknowledged {m} was lost");
        }
        for m in &deleted {
            assert!(!stored.contains(m), "deleted {m} came back");
        }
    }
}
