//! The `Publisher` port: hand envelopes to a broker and learn whether it acknowledged them.
//!
//! Adapters here: [`MemoryPublisher`] (keeps what it was given; can be told to fail, for tests)
//! and [`ChannelPublisher`] (hands envelopes to an in-process consumer). The broker adapters
//! (embedded, SNS, Kafka) live in their own modules.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::sync::Mutex;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::envelope::Envelope;

/// What a successful publish delivered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PublishReport {
    /// Messages (envelopes) the broker acknowledged.
    pub messages: usize,
    /// Events inside them.
    pub events: usize,
    /// Broker API calls made (batch calls count once).
    pub calls: usize,
}

impl PublishReport {
    /// The report for `envelopes` published in `calls` calls.
    pub fn of(envelopes: &[Envelope], calls: usize) -> Self {
        Self {
            messages: envelopes.len(),
            events: envelopes.iter().map(|e| e.event_count).sum(),
            calls,
        }
    }
}

/// Why a publish failed. Nothing of a failed publish may be reported accepted.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The broker could not be reached or did not acknowledge in time; a retry can help.
    #[error("publish to {destination} failed: {message}")]
    Unavailable {
        /// Topic or queue.
        destination: String,
        /// What went wrong.
        message: String,
    },
    /// The broker refused the message itself (too large, forbidden); a retry cannot help.
    #[error("{destination} rejected the message: {message}")]
    Rejected {
        /// Topic or queue.
        destination: String,
        /// What went wrong.
        message: String,
    },
}

impl PublishError {
    /// Whether retrying the same publish can succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

/// Hands envelopes to a broker.
#[async_trait]
pub trait Publisher: Send + Sync + Debug {
    /// Publishes every envelope; returns only once the broker acknowledged all of them.
    ///
    /// # Errors
    /// [`PublishError`] if any envelope was not acknowledged. Some may have been delivered:
    /// callers retry the whole call, and `event_id` makes the repeat harmless downstream.
    async fn publish(&self, envelopes: &[Envelope]) -> Result<PublishReport, PublishError>;

    /// Checks that the broker is reachable, for readiness probes.
    ///
    /// # Errors
    /// [`PublishError::Unavailable`] when it is not.
    async fn ready(&self) -> Result<(), PublishError>;

    /// Why this publisher can never publish again, if it is in such a state (a Kafka
    /// producer in librdkafka's fatal state): only a new process helps. `None` for
    /// publishers that recover by themselves, which is all of them but Kafka's.
    fn broken(&self) -> Option<String> {
        None
    }
}

/// Keeps published envelopes in memory. It can be told to fail the next calls, which is how
/// tests exercise the retry and 503 paths.
#[derive(Debug, Default)]
pub struct MemoryPublisher {
    state: Mutex<MemoryState>,
}

#[derive(Debug, Default)]
struct MemoryState {
    published: Vec<Envelope>,
    /// Outcomes to return before succeeding again: `true` fails the call.
    faults: VecDeque<bool>,
    fail_always: bool,
}

impl MemoryPublisher {
    /// An empty publisher that acknowledges everything.
    pub fn new() -> Self {
        Self::default()
    }

    /// Fails the next `n` publish calls with [`PublishError::Unavailable`].
    pub fn fail_next(&self, n: usize) {
        self.lock().faults.extend(std::iter::repeat_n(true, n));
    }

    /// Fails every publish (and readiness) until told otherwise.
    pub fn set_fail_always(&self, fail: bool) {
        self.lock().fail_always = fail;
    }

    /// Every envelope acknowledged so far.
    pub fn published(&self) -> Vec<Envelope> {
        self.lock().published.clone()
    }

    /// Events acknowledged so far.
    pub fn event_count(&self) -> usize {
        self.lock().published.iter().map(|e| e.event_count).sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn unavailable() -> PublishError {
        PublishError::Unavailable {
            destination: "memory".into(),
            message: "injected failure".into(),
        }
    }
}

#[async_trait]
impl Publisher for MemoryPublisher {
    async fn publish(&self, envelopes: &[Envelope]) -> Result<PublishReport, PublishError> {
        let mut state = self.lock();
        if state.fail_always || state.faults.pop_front().unwrap_or(false) {
            return Err(Self::unavailable());
        }
        state.published.extend_from_slice(envelopes);
        Ok(PublishReport::of(envelopes, 1))
    }

    async fn ready(&self) -> Result<(), PublishError> {
        if self.lock().fail_always {
            Err(Self::unavailable())
        } else {
            Ok(())
        }
    }
}

/// Acknowledges every publish and keeps nothing: what `spillway-ingest --memory-publisher`
/// publishes to, to measure the HTTP path alone. Events sent to it are gone.
/// ([`MemoryPublisher`] keeps every envelope, which a benchmark of millions of events would
/// turn into gigabytes.)
#[derive(Debug, Default)]
pub struct DiscardPublisher;

#[async_trait]
impl Publisher for DiscardPublisher {
    async fn publish(&self, envelopes: &[Envelope]) -> Result<PublishReport, PublishError> {
        Ok(PublishReport::of(envelopes, 1))
    }

    async fn ready(&self) -> Result<(), PublishError> {
        Ok(())
    }
}

/// Hands envelopes to an in-process consumer over a bounded channel; a publish is
/// acknowledged once the channel accepted it (back-pressure when the consumer lags).
#[derive(Debug, Clone)]
pub struct ChannelPublisher {
    tx: mpsc::Sender<Envelope>,
}

impl ChannelPublisher {
    /// A publisher and the receiving end, holding at most `capacity` envelopes in flight.
    pub fn new(capacity: usize) -> (Self, mpsc::Receiver<Envelope>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (Self { tx }, rx)
    }
}

#[async_trait]
impl Publisher for ChannelPublisher {
    async fn publish(&self, envelopes: &[Envelope]) -> Result<PublishReport, PublishError> {
        for env in envelopes {
            self.tx
                .send(env.clone())
                .await
                .map_err(|_| PublishError::Unavailable {
                    destination: "channel".into(),
                    message: "consumer has stopped".into(),
                })?;
        }
        Ok(PublishReport::of(envelopes, envelopes.len()))
    }

    async fn ready(&self) -> Result<(), PublishError> {
        if self.tx.is_closed() {
            Err(PublishError::Unavailable {
                destination: "channel".into(),
                message: "consumer has stopped".into(),
            })
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_memory_publisher_fails_exactly_as_often_as_told() {
        let p = MemoryPublisher::new();
        p.fail_next(2);
        assert!(p.publish(&[]).await.is_err());
        assert!(p.publish(&[]).await.is_err());
        assert!(p.publish(&[]).await.is_ok());
    }

    #[tokio::test]
    async fn a_channel_publisher_reports_a_stopped_consumer() {
        let (p, rx) = ChannelPublisher::new(1);
        assert!(p.ready().await.is_ok());
        drop(rx);
        assert!(p.ready().await.is_err());
        assert!(
            p.publish(&[]).await.is_ok(),
            "nothing to send is trivially acknowledged"
        );
    }
}
