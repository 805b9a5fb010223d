//! Spillway's HTTP ingest API.
//!
//! `POST /v1/events` authenticates the key, rate-limits it, reads the body within its limits,
//! validates every event, packs the accepted ones into envelopes and answers `202` only after
//! the publisher acknowledged them all. One `Router`, served by `axum::serve` here and by
//! `lambda_http` when the binary runs as a Lambda function (`src/main.rs`).
//!
//! # Layout
//! - [`auth`]: API keys (SHA-256 hashes, tenants, advertiser allow-lists).
//! - [`rate_limit`]: per-key token buckets.
//! - [`body`]: content type/encoding, size limits, splitting into items.
//! - [`ingest`]: the HTTP-free decision from body to envelopes and report.
//! - [`error`]: the HTTP error boundary.
//! - [`inflight`]: the memory budget of the requests in flight.
//! - [`metrics`]: counters for `GET /metrics`.
//! - [`settings`]: flags and environment variables.

pub mod auth;
pub mod body;
pub mod error;
pub mod inflight;
pub mod ingest;
pub mod metrics;
pub mod rate_limit;
pub mod server;
pub mod settings;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderName, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::BodyExt;
use rand::Rng;
use serde_json::json;
use tokio::net::TcpListener;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use tracing::{info, warn};

use crate::auth::ApiKeys;
use crate::body::{decompress, BodyEncoding, BodyFormat, Limits};
use crate::error::ApiError;
use crate::inflight::{InflightBudget, Reservation};
use crate::ingest::{prepare, IngestReport, PrepareContext};
use crate::metrics::IngestMetrics;
use crate::rate_limit::RateLimiter;
use shared::envelope::{EnvelopeConfig, Packer};
use shared::event::ValidationPolicy;
use shared::{Clock, Publisher, SystemClock};

/// Default [`IngestConfig::max_inflight_bytes`]: with the runtime and the requests being
/// decoded beside it, the process stays well within a 512 MiB container.
pub const DEFAULT_MAX_INFLIGHT_BYTES: usize = 256 * 1024 * 1024;

/// What a request waiting on the broker holds, in multiples of its packed envelopes: the
/// envelopes, and the publisher's request built from them (SNS's form encoding escapes the
/// JSON). Measured with `scripts/ingest-memory.py` on a stalled SNS: about 2.7.
const PUBLISH_COPIES: usize = 3;

/// `Retry-After` of a request refused for the memory budget: what is in flight is usually
/// answered within a second.
const OVERLOADED_RETRY_AFTER: Duration = Duration::from_secs(1);

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Everything the ingest API needs besides its publisher, keys and clock.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// Size limits.
    pub limits: Limits,
    /// Validation rules.
    pub policy: ValidationPolicy,
    /// Envelope packing.
    pub envelope: EnvelopeConfig,
    /// Sustained events/s per key (0: unlimited).
    pub rate_limit_eps: u32,
    /// Token bucket size per key.
    pub rate_limit_burst: u32,
    /// Publish attempts before answering 503.
    pub publish_attempts: u32,
    /// First delay between publish attempts.
    pub publish_backoff: Duration,
    /// `Retry-After` of a 503.
    pub retry_after: Duration,
    /// Longest a request's publish may take, retries and the broker client's own included:
    /// past it the request is answered 503 (what was published of it is stored once when the
    /// client retries). Keep it below the clients' timeout and, on Lambda, the function's.
    pub publish_timeout: Duration,
    /// Bytes the requests in flight may hold while they wait (bodies being read, envelopes
    /// being published); a request past it is answered 503 `overloaded` at once. 0: no limit.
    pub max_inflight_bytes: usize,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            policy: ValidationPolicy::default(),
            envelope: EnvelopeConfig::default(),
            rate_limit_eps: 0,
            rate_limit_burst: 0,
            publish_attempts: 3,
            publish_backoff: Duration::from_millis(50),
            retry_after: Duration::from_secs(5),
            publish_timeout: Duration::from_secs(8),
            max_inflight_bytes: DEFAULT_MAX_INFLIGHT_BYTES,
        }
    }
}

/// Shared state of the router: cheap to clone.
#[derive(Debug, Clone)]
pub struct AppState(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    publisher: Arc<dyn Publisher>,
    /// The keys and their rate-limit buckets, replaced whole when the keys are reloaded; a
    /// request keeps the set it started with.
    keys: std::sync::RwLock<Arc<KeySet>>,
    config: IngestConfig,
    packer: Packer,
    clock: Arc<dyn Clock>,
    metrics: Arc<IngestMetrics>,
    inflight: Arc<InflightBudget>,
    /// The last readiness check: when, and whether the publisher was ready.
    readiness: tokio::sync::Mutex<Option<(tokio::time::Instant, bool)>>,
}

/// API keys with one rate-limit bucket each (same indexes).
#[derive(Debug)]
struct KeySet {
    keys: ApiKeys,
    limiter: RateLimiter,
}

/// How long a readiness answer is reused: `/readyz` is unauthenticated, and each check is a
/// broker call (SNS `GetTopicAttributes`, Kafka metadata), so a flood of it must not become a
/// flood of broker calls (SNS would throttle the account, and the check would fail).
const READINESS_FOR: Duration = Duration::from_secs(2);
/// Longest a readiness check waits for the broker: no answer by then is "not ready" (a
/// probe's own timeout is 1 s by default in Kubernetes; this answers within a few).
const READINESS_TIMEOUT: Duration = Duration::from_secs(3);

impl AppState {
    /// State with the system clock.
    pub fn new(publisher: Arc<dyn Publisher>, keys: ApiKeys, config: IngestConfig) -> Self {
        Self::with_clock(publisher, keys, config, Arc::new(SystemClock))
    }

    /// State with an injected clock (tests).
    pub fn with_clock(
        publisher: Arc<dyn Publisher>,
        keys: ApiKeys,
        config: IngestConfig,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let limiter = RateLimiter::new(config.rate_limit_eps, config.rate_limit_burst, keys.len());
        let inflight = Arc::new(InflightBudget::new(config.max_inflight_bytes));
        Self(Arc::new(Inner {
            publisher,
            packer: Packer::new(config.envelope),
            keys: std::sync::RwLock::new(Arc::new(KeySet { keys, limiter })),
            metrics: Arc::new(IngestMetrics::new(Arc::clone(&inflight))),
            inflight,
            config,
            clock,
            readiness: tokio::sync::Mutex::new(None),
        }))
    }

    /// Replaces the API keys (a reload): requests from now on are checked against `keys`.
    /// A key kept keeps its rate-limit bucket; requests already past authentication finish
    /// with the key they were let in with. Returns how many keys were added and removed.
    pub fn replace_keys(&self, keys: ApiKeys) -> (usize, usize) {
        let mut slot = self
            .0
            .keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let old_index = keys.indexes_in(&slot.keys);
        let kept = old_index.iter().flatten().count();
        let (added, removed) = (keys.len() - kept, slot.keys.len() - kept);
        let limiter = slot.limiter.for_keys(&old_index);
        *slot = Arc::new(KeySet { keys, limiter });
        (added, removed)
    }

    fn key_set(&self) -> Arc<KeySet> {
        Arc::clone(
            &self
                .0
                .keys
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// The publisher requests are published with.
    pub fn publisher(&self) -> &Arc<dyn Publisher> {
        &self.0.publisher
    }

    /// The live counters (what `GET /metrics` shows of this API).
    pub fn metrics(&self) -> Arc<IngestMetrics> {
        Arc::clone(&self.0.metrics)
    }
}

/// The ingest API's routes with their middleware (request ids, tracing).
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/events", post(post_events))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(
            TraceLayer::new_for_http().make_span_with(|req: &Request<Body>| {
                let id = req.headers().get(REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("-");
                tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), request_id = %id)
            }),
        )
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
}

/// The router of the Lambda function: [`router`], and with `emf` one Embedded Metric Format
/// line on stdout per answer to `POST /v1/events` (CloudWatch extracts the metrics; a
/// function cannot be scraped). One request at a time per execution environment, so the
/// counters' difference around a request is that request's.
pub fn lambda_router(state: AppState, emf: Option<shared::emf::EmfTarget>) -> Router {
    let Some(target) = emf else {
        return router(state);
    };
    let emf = Arc::new(EmfState {
        metrics: state.metrics(),
        target,
        first: std::sync::atomic::AtomicBool::new(true),
    });
    router(state).layer(axum::middleware::from_fn_with_state(emf, emf_line))
}

#[derive(Debug)]
struct EmfState {
    metrics: Arc<IngestMetrics>,
    target: shared::emf::EmfTarget,
    first: std::sync::atomic::AtomicBool,
}

async fn emf_line(
    State(emf): State<Arc<EmfState>>,
    req: Request<Body>,
    next: axum::middleware::Next,
) -> Response {
    let before = emf.metrics.counts();
    let resp = next.run(req).await;
    let after = emf.metrics.counts();
    if after.responses != before.responses {
        let first = emf.first.swap(false, std::sync::atomic::Ordering::Relaxed);
        shared::emf::emit(&shared::emf::line(
            &emf.target,
            &after.emf_values(&before, first),
            std::time::SystemTime::now(),
        ));
    }
    resp
}

/// Serves the router on `listener` until `shutdown` completes, then lets requests in flight
/// finish (each of them answers only after its publish, so nothing acknowledged is lost).
///
/// # Errors
/// The I/O error that stopped the server.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_router(listener, router(state), shutdown).await
}

/// Like [`serve`], for a router with more routes than the API's (`spillway dev` adds
/// `/metrics`).
///
/// # Errors
/// The I/O error that stopped the server.
pub async fn serve_router(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with_limits(listener, router, shutdown, ConnectionLimits::default()).await
}

pub use server::{serve_with_limits, ConnectionLimits};

pub use shared::settings::shutdown_signal;

async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(state): State<AppState>) -> Response {
    // One check at a time, its answer reused for READINESS_FOR by every caller.
    let ready = {
        let mut last = state.0.readiness.lock().await;
        match *last {
            Some((at, ready)) if at.elapsed() < READINESS_FOR => ready,
            _ => {
                // Bounded: the broker client's own retries can take a minute and more, and
                // every other caller waits behind this one, each holding a connection.
                let check = tokio::time::timeout(READINESS_TIMEOUT, state.0.publisher.ready());
                let ready = match check.await {
                    Ok(Ok(())) => true,
                    Ok(Err(e)) => {
                        warn!(error = %e, "Publisher not ready");
                        false
                    }
                    Err(_) => {
                        warn!(
                            timeout_ms = u64::try_from(READINESS_TIMEOUT.as_millis()).unwrap_or(0),
                            "Publisher readiness check got no answer"
                        );
                        false
                    }
                };
                *last = Some((tokio::time::Instant::now(), ready));
                ready
            }
        }
    };
    if ready {
        Json(json!({"status": "ready"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "unavailable"})),
        )
            .into_response()
    }
}

async fn post_events(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let resp = match ingest_request(&state, &headers, body).await {
        Ok(resp) => resp,
        Err(e) => {
            info!(
                status = e.status().as_u16(),
                code = e.code(),
                "Request refused"
            );
            e.into_response()
        }
    };
    state.0.metrics.count_response(resp.status());
    resp
}

/// The one value of a header that says how to read the body. Given twice, the server read
/// the first and Lambda (HTTP API, Function URL: repeated headers joined with commas) the
/// whole list, so one request got two answers; both refuse it now (415).
fn single_header(headers: &HeaderMap, name: header::HeaderName) -> Result<Option<&str>, ApiError> {
    if headers.get_all(&name).iter().nth(1).is_some() {
        return Err(ApiError::UnsupportedMediaType(format!(
            "{name} is given more than once; give one"
        )));
    }
    Ok(header_str(headers, name))
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn ingest_request(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let inner = &*state.0;
    let keys = state.key_set();
    let (key_index, key) = keys
        .keys
        .authenticate(headers)
        .ok_or_else(|| ApiError::Unauthorized(auth::why_unauthorized(headers)))?;
    // Refuse an exhausted key before reading its body; the real charge comes after parsing.
    keys.limiter
        .check(key_index)
        .map_err(|retry_after| ApiError::RateLimited { retry_after })?;
    let format = BodyFormat::from_content_type(single_header(headers, header::CONTENT_TYPE)?)?;
    let encoding = BodyEncoding::from_header(single_header(headers, header::CONTENT_ENCODING)?)?;
    let limits = &inner.config.limits;

    let too_large_wire = || {
        ApiError::PayloadTooLarge(format!(
            "the body is larger than {} bytes",
            limits.max_wire_bytes
        ))
    };
    let declared =
        header_str(headers, header::CONTENT_LENGTH).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limits.max_wire_bytes) {
        return Err(too_large_wire());
    }
    // A body of unknown length may be as large as the limit.
    let reading = reserve(inner, declared.unwrap_or(limits.max_wire_bytes))?;
    let wire = http_body_util::Limited::new(body, limits.max_wire_bytes)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                too_large_wire()
            } else {
                ApiError::BadBody(format!("cannot read the body: {e}"))
            }
        })?
        .to_bytes();
    let decoded = decompress(&wire, encoding, limits.max_decoded_bytes)?;

    let cx = PrepareContext {
        limits,
        policy: &inner.config.policy,
        clock: inner.clock.as_ref(),
        packer: &inner.packer,
        tenant: &key.tenant,
        scope: &key.advertisers,
    };
    let prepared = prepare(&decoded, format, &cx)?;
    // While the broker acknowledges, only the envelopes are held, and the publisher's copies
    // of them in its requests.
    drop((wire, decoded, reading));
    let packed: usize = prepared.envelopes.iter().map(|e| e.body.len()).sum();
    let _publishing = reserve(inner, packed.saturating_mul(PUBLISH_COPIES))?;
    let report = IngestReport {
        accepted: prepared.accepted,
        rejected: prepared.rejected,
    };
    // Rejected items cost tokens too: validating them is work, and a key must not be able to
    // send invalid events without limit. They are charged once the answer is decided: charged
    // before the take, they left a request with more items than the burst, one of them
    // invalid, refused (429) on every retry, the bucket never holding what it asks.
    if prepared.accepted == 0 {
        keys.limiter.charge(key_index, report.rejected.len());
        inner.metrics.count_events(0, report.rejected.len());
        let status = if prepared.all_forbidden {
            StatusCode::FORBIDDEN
        } else {
            StatusCode::BAD_REQUEST
        };
        info!(tenant = %key.tenant, rejected = report.rejected.len(), status = status.as_u16(), "Nothing accepted");
        return Ok((status, Json(report)).into_response());
    }
    keys.limiter
        .try_take_with_rejected(key_index, prepared.accepted, report.rejected.len())
        .map_err(|retry_after| ApiError::RateLimited { retry_after })?;
    let published = publish_within_timeout(inner, &prepared.envelopes).await;
    keys.limiter.charge(key_index, report.rejected.len());
    published?;
    inner
        .metrics
        .count_events(report.accepted, report.rejected.len());
    info!(
        tenant = %key.tenant,
        accepted = report.accepted,
        rejected = report.rejected.len(),
        envelopes = prepared.envelopes.len(),
        "Accepted events"
    );
    Ok((StatusCode::ACCEPTED, Json(report)).into_response())
}

/// `bytes` of the memory budget, or `503 overloaded`.
fn reserve(inner: &Inner, bytes: usize) -> Result<Reservation<'_>, ApiError> {
    inner.inflight.try_reserve(bytes).ok_or_else(|| {
        inner.metrics.count_overloaded();
        warn!(
            bytes,
            held = inner.inflight.used(),
            "Memory budget of the requests in flight is full; answering 503"
        );
        ApiError::Overloaded {
            retry_after: OVERLOADED_RETRY_AFTER,
        }
    })
}

/// [`publish_with_retries`], given up after `publish_timeout`: the retries of the handler,
/// the adapter and the AWS SDK stack up to minutes when the broker stalls, and the client (or
/// Lambda's timeout) gives up long before, without the 503 and `Retry-After` it is owed.
async fn publish_within_timeout(
    inner: &Inner,
    envelopes: &[shared::Envelope],
) -> Result<(), ApiError> {
    let limit = inner.config.publish_timeout;
    if let Ok(published) = tokio::time::timeout(limit, publish_with_retries(inner, envelopes)).await
    {
        return published;
    }
    warn!(
        timeout_ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX),
        "Publish did not finish in time; answering 503"
    );
    inner.metrics.count_publish(envelopes.len(), false, limit);
    Err(ApiError::PublishFailed {
        retry_after: inner.config.retry_after,
    })
}

async fn publish_with_retries(
    inner: &Inner,
    envelopes: &[shared::Envelope],
) -> Result<(), ApiError> {
    let attempts = inner.config.publish_attempts.max(1);
    let mut delay = inner.config.publish_backoff;
    let started = Instant::now();
    for attempt in 1..=attempts {
        match inner.publisher.publish(envelopes).await {
            Ok(_) => {
                let m = &inner.metrics;
                m.count_publish(envelopes.len(), true, started.elapsed());
                return Ok(());
            }
            Err(e) if e.is_transient() && attempt < attempts => {
                // Counted now: a publish given up at the timeout never gets to the end.
                inner.metrics.count_publish_retry();
                warn!(attempt, error = %e, "Publish failed; retrying");
                let jitter = rand::rng().random_range(0.5..1.5);
                tokio::time::sleep(delay.mul_f64(jitter)).await;
                delay = delay.saturating_mul(2);
            }
            Err(e) => {
                warn!(attempt, error = %e, "Publish failed; answering 503");
                let m = &inner.metrics;
                m.count_publish(envelopes.len(), false, started.elapsed());
                break;
            }
        }
    }
    Err(ApiError::PublishFailed {
        retry_after: inner.config.retry_after,
    })
}
