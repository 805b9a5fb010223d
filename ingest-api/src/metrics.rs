//! The ingest API's counters, rendered at `GET /metrics` (`--metrics-listen`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use shared::metrics::{Exposition, Histogram, Render};

use crate::inflight::InflightBudget;

/// The statuses `POST /v1/events` answers (README, "The ingest API"); anything else counts
/// as `other`.
const STATUSES: [(StatusCode, &str); 8] = [
    (StatusCode::ACCEPTED, "202"),
    (StatusCode::BAD_REQUEST, "400"),
    (StatusCode::UNAUTHORIZED, "401"),
    (StatusCode::FORBIDDEN, "403"),
    (StatusCode::PAYLOAD_TOO_LARGE, "413"),
    (StatusCode::UNSUPPORTED_MEDIA_TYPE, "415"),
    (StatusCode::TOO_MANY_REQUESTS, "429"),
    (StatusCode::SERVICE_UNAVAILABLE, "503"),
];

/// Live counters of one ingest API (every one only grows), and the gauge of its memory budget.
#[derive(Debug, Default)]
pub struct IngestMetrics {
    /// One per entry of `STATUSES`, then `other`.
    responses: [AtomicU64; STATUSES.len() + 1],
    accepted: AtomicU64,
    rejected: AtomicU64,
    envelopes: AtomicU64,
    publish_retries: AtomicU64,
    publish_seconds: Histogram,
    overloaded: AtomicU64,
    inflight: Arc<InflightBudget>,
}

impl IngestMetrics {
    /// Zeroed counters, and the gauge of what `inflight` holds.
    pub fn new(inflight: Arc<InflightBudget>) -> Self {
        Self {
            inflight,
            ..Self::default()
        }
    }

    /// Counts one request refused because the memory budget was full.
    pub fn count_overloaded(&self) {
        self.overloaded.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one answer to `POST /v1/events`.
    pub fn count_response(&self, status: StatusCode) {
        let i = STATUSES
            .iter()
            .position(|(s, _)| *s == status)
            .unwrap_or(STATUSES.len());
        self.responses[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts the events a request's report accepted and rejected.
    pub fn count_events(&self, accepted: usize, rejected: usize) {
        self.accepted.fetch_add(accepted as u64, Ordering::Relaxed);
        self.rejected.fetch_add(rejected as u64, Ordering::Relaxed);
    }

    /// Counts one request's publish: its envelopes (when acknowledged), and how long it took,
    /// retries included.
    pub fn count_publish(&self, envelopes: usize, acknowledged: bool, took: Duration) {
        if acknowledged {
            self.envelopes
                .fetch_add(envelopes as u64, Ordering::Relaxed);
        }
        self.publish_seconds.observe(took);
    }

    /// Counts a publish attempt that failed and is tried again.
    pub fn count_publish_retry(&self) {
        self.publish_retries.fetch_add(1, Ordering::Relaxed);
    }
}

/// The metrics of the ingest function's EMF line, in order, each a `Count`: the requests
/// answered, the events accepted and rejected, the envelopes published, the publish retries,
/// then the answers by kind (401 and 403; 429; 503 `overloaded`; other 503s, which are
/// publish failures; 400, 413 and 415), and whether it was the execution environment's first.
pub const EMF_METRICS: [&str; 11] = [
    "Requests",
    "EventsAccepted",
    "EventsRejected",
    "EnvelopesPublished",
    "PublishRetries",
    "Unauthorized",
    "Throttled",
    "Overloaded",
    "PublishFailed",
    "BadRequests",
    "ColdStart",
];

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IngestCounts {
    /// Answers by status, in the order of `STATUSES`, then `other`.
    pub responses: [u64; STATUSES.len() + 1],
    /// Events accepted.
    pub accepted: u64,
    /// Events rejected.
    pub rejected: u64,
    /// Envelopes published.
    pub envelopes: u64,
    /// Publish attempts retried.
    pub publish_retries: u64,
    /// Requests answered `overloaded`.
    pub overloaded: u64,
}

impl IngestCounts {
    fn answered(&self, status: StatusCode) -> u64 {
        STATUSES
            .iter()
            .position(|(s, _)| *s == status)
            .map_or(0, |i| self.responses[i])
    }

    /// The values of [`EMF_METRICS`] for what happened between `before` and `self`.
    pub fn emf_values(&self, before: &Self, cold_start: bool) -> Vec<(&'static str, u64)> {
        let since = |now: u64, then: u64| now.saturating_sub(then);
        let answered = |status| since(self.answered(status), before.answered(status));
        let overloaded = since(self.overloaded, before.overloaded);
        EMF_METRICS
            .into_iter()
            .zip([
                since(self.responses.iter().sum(), before.responses.iter().sum()),
                since(self.accepted, before.accepted),
                since(self.rejected, before.rejected),
                since(self.envelopes, before.envelopes),
                since(self.publish_retries, before.publish_retries),
                answered(StatusCode::UNAUTHORIZED) + answered(StatusCode::FORBIDDEN),
                answered(StatusCode::TOO_MANY_REQUESTS),
                overloaded,
                answered(StatusCode::SERVICE_UNAVAILABLE).saturating_sub(overloaded),
                answered(StatusCode::BAD_REQUEST)
                    + answered(StatusCode::PAYLOAD_TOO_LARGE)
                    + answered(StatusCode::UNSUPPORTED_MEDIA_TYPE),
                u64::from(cold_start),
            ])
            .collect()
    }
}

impl IngestMetrics {
    /// The counters now.
    pub fn counts(&self) -> IngestCounts {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        IngestCounts {
            responses: std::array::from_fn(|i| get(&self.responses[i])),
            accepted: get(&self.accepted),
            rejected: get(&self.rejected),
            envelopes: get(&self.envelopes),
            publish_retries: get(&self.publish_retries),
            overloaded: get(&self.overloaded),
        }
    }
}

impl Render for IngestMetrics {
    fn render(&self, page: &mut Exposition) {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let by_status: Vec<(&str, u64)> = STATUSES
            .iter()
            .map(|(_, name)| *name)
            .chain(["other"])
            .zip(self.responses.iter().map(get))
            .collect();
        page.counters(
            "spillway_ingest_responses_total",
            "Answers to POST /v1/events, by HTTP status.",
            "status",
            &by_status,
        );
        page.counter(
            "spillway_ingest_events_accepted_total",
            "Events accepted: the publisher acknowledged them before the 202.",
            get(&self.accepted),
        );
        page.counter(
            "spillway_ingest_events_rejected_total",
            "Events rejected by validation or the key's advertiser scope (listed in the answers' `rejected`).",
            get(&self.rejected),
        );
        page.counter(
            "spillway_ingest_envelopes_published_total",
            "Envelopes (broker messages) the publisher acknowledged.",
            get(&self.envelopes),
        );
        page.counter(
            "spillway_ingest_publish_retries_total",
            "Publish attempts that failed and were tried again.",
            get(&self.publish_retries),
        );
        page.counter(
            "spillway_ingest_overloaded_total",
            "Requests answered 503 `overloaded`: the memory budget of the requests in flight was full.",
            get(&self.overloaded),
        );
        #[allow(clippy::cast_precision_loss)] // a gauge; exact below 2^53 bytes
        page.gauge(
            "spillway_ingest_inflight_bytes",
            "Bytes the requests in flight hold of the memory budget (bodies being read, envelopes being published).",
            self.inflight.used() as f64,
        );
        page.histogram(
            "spillway_ingest_publish_seconds",
            "Time from the first publish attempt of a request to its acknowledgement or 503, retries included.",
            &self.publish_seconds,
        );
    }
}
