//! The `Sink` port: where workers write validated events. Writes are idempotent by
//! `event_id`: a redelivered event is counted as a duplicate and changes nothing.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::event::{AdEvent, EventId};
use crate::metrics::Exposition;

/// What one write did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteReport {
    /// Events stored for the first time.
    pub inserted: usize,
    /// Events already stored (redeliveries); they changed nothing.
    pub duplicates: usize,
}

/// Why a write failed. Nothing of a failed write is stored.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The store is down, overloaded or timed out; a retry can help.
    #[error("store {store} unavailable: {message}")]
    Unavailable {
        /// Which store.
        store: String,
        /// What went wrong.
        message: String,
    },
    /// The store refused the data itself; a retry cannot help.
    #[error("store {store} rejected the batch: {message}")]
    Rejected {
        /// Which store.
        store: String,
        /// What went wrong.
        message: String,
    },
}

impl SinkError {
    /// Whether retrying the same write can succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

/// Writes events to a store, idempotently, in one transaction per call.
#[async_trait]
pub trait Sink: Send + Sync + Debug {
    /// Stores the events not stored yet and updates the rollups for those only.
    ///
    /// # Errors
    /// [`SinkError`]; on error nothing of the batch is stored.
    async fn write(&self, events: &[AdEvent]) -> Result<WriteReport, SinkError>;

    /// Checks that the store answers, without writing anything (PostgreSQL: a pooled
    /// connection runs `SELECT 1`). The circuit breaker probes with it: a store that cannot
    /// be reached keeps the breaker open whatever the data.
    ///
    /// # Errors
    /// [`SinkError::Unavailable`] when the store cannot be reached.
    async fn ping(&self) -> Result<(), SinkError>;

    /// Writes the store's own metrics (a pool's connections, write paths) into `page`; most
    /// stores have none.
    fn render_metrics(&self, page: &mut Exposition) {
        let _ = page;
    }
}

/// Keeps events in memory by `event_id`; can be told to fail, for tests of retry paths.
#[derive(Debug, Default)]
pub struct MemorySink {
    state: Mutex<MemorySinkState>,
}

#[derive(Debug, Default)]
struct MemorySinkState {
    events: BTreeMap<EventId, AdEvent>,
    fail_always: bool,
    writes: usize,
}

impl MemorySink {
    /// An empty sink.
    pub fn new() -> Self {
        Self::default()
    }

    /// Fails every write with [`SinkError::Unavailable`] until told otherwise.
    pub fn set_fail_always(&self, fail: bool) {
        self.lock().fail_always = fail;
    }

    /// Stored events, by id.
    pub fn events(&self) -> BTreeMap<EventId, AdEvent> {
        self.lock().events.clone()
    }

    /// Write calls that succeeded.
    pub fn writes(&self) -> usize {
        self.lock().writes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemorySinkState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl Sink for MemorySink {
    async fn write(&self, events: &[AdEvent]) -> Result<WriteReport, SinkError> {
        let mut state = self.lock();
        if state.fail_always {
            return Err(SinkError::Unavailable {
                store: "memory".into(),
                message: "injected failure".into(),
            });
        }
        let mut report = WriteReport::default();
        for ev in events {
            if state.events.insert(ev.event_id, ev.clone()).is_some() {
                report.duplicates += 1;
            } else {
                report.inserted += 1;
            }
        }
        state.writes += 1;
        Ok(report)
    }

    async fn ping(&self) -> Result<(), SinkError> {
        if self.lock().fail_always {
            return Err(SinkError::Unavailable {
                store: "memory".into(),
                message: "injected failure".into(),
            });
        }
        Ok(())
    }
}
