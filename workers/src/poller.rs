//! The poller runtime: N concurrent receive loops over any [`Source`], each coalescing
//! deliveries into a batch, handing it to the core and settling the outcome through the
//! source.
//!
//! Around the core it adds what a long-lived consumer needs: a visibility heartbeat for long
//! batches, a circuit breaker that stops receiving while the sink is down, a write cap
//! (events per second and concurrent batches) that protects the store, and graceful shutdown
//! (stop receiving, finish and settle the batches in flight, return).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use shared::metrics::{Exposition, Render};
use shared::{DeliveryId, Sink, Source};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::breaker::{BreakerConfig, CircuitBreaker};
use crate::core::{self, BatchOutcome, CoreConfig, Decision, PreparedDelivery};
use crate::metrics::Metrics;
use crate::write_cap::{CappedSink, WriteCap};

/// Most messages one SQS `ReceiveMessage` call returns.
pub const MAX_RECEIVE_MESSAGES: usize = 10;
/// Longest wait before retrying a receive that failed.
const MAX_RECEIVE_BACKOFF: Duration = Duration::from_secs(30);

/// How long the store has to answer the ping after a failed write before it counts as down:
/// longer than a sink's own bound on its ping (PostgreSQL: the wait for a pooled connection,
/// up to the statement timeout and the connect timeout, then 10 s), so a slow pool does not
/// read as a store that is down, and the sink gets to drop a connection that did not answer.
const PING_TIMEOUT: Duration = Duration::from_secs(60);

/// How the poller runs.
#[derive(Debug, Clone)]
pub struct PollerConfig {
    /// Concurrent receive loops. Default 2.
    pub loops: usize,
    /// Messages asked for per receive call (SQS allows at most 10). Default 10.
    pub receive_max_messages: usize,
    /// Long-poll wait of a receive while no batch is open. Default 20 s.
    pub receive_wait: Duration,
    /// A batch stops growing at this many valid events (one receive may pass it). Default 1,000.
    pub max_batch_events: usize,
    /// A batch stops growing at this many messages. Default 100.
    pub max_batch_messages: usize,
    /// A batch stops growing this long after its first message arrived. Default 1 s.
    pub max_batch_wait: Duration,
    /// The queue's visibility timeout; each heartbeat extends invisibility by this. Default 30 s.
    pub visibility_timeout: Duration,
    /// How often a batch in progress extends its visibility, counted from its first
    /// receive; well under `visibility_timeout`. Default 10 s.
    pub heartbeat_every: Duration,
    /// Most batches written at once, over all loops. Default 2.
    pub max_concurrent_batches: usize,
    /// Most events written per second, over all loops; `None` for no cap. Default 5,000.
    pub max_events_per_sec: Option<u32>,
    /// Events the write cap lets through at once after a quiet spell; any 1 s window holds
    /// at most `max_events_per_sec + burst_events` (a larger single write overdraws). Default 1,000.
    pub burst_events: u32,
    /// The circuit breaker.
    pub breaker: BreakerConfig,
    /// The batch core.
    pub core: CoreConfig,
}

impl Default for PollerConfig {
    fn default() -> Self {
        Self {
            loops: 2,
            receive_max_messages: MAX_RECEIVE_MESSAGES,
            receive_wait: Duration::from_secs(20),
            max_batch_events: 1_000,
            max_batch_messages: 100,
            max_batch_wait: Duration::from_secs(1),
            visibility_timeout: Duration::from_secs(30),
            heartbeat_every: Duration::from_secs(10),
            max_concurrent_batches: 2,
            max_events_per_sec: Some(5_000),
            burst_events: 1_000,
            breaker: BreakerConfig::default(),
            core: CoreConfig::default(),
        }
    }
}

/// A setting the poller cannot run with.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PollerConfigError {
    /// A count that must be at least one is zero.
    #[error("{field} must be at least 1")]
    Zero {
        /// The setting.
        field: &'static str,
    },
    /// A wait that must be longer than zero is zero: a receive loop or the breaker would
    /// spin without pause.
    #[error("{field} must be longer than zero ({why})")]
    NoWait {
        /// The setting.
        field: &'static str,
        /// What a zero would do.
        why: &'static str,
    },
    /// The heartbeat or the batch wait would let the visibility lapse.
    #[error(
        "{field} ({value_ms} ms) must be shorter than --visibility-timeout-secs ({visibility_ms} ms), or the batch's messages come back while it is written"
    )]
    NotUnderVisibility {
        /// The setting.
        field: &'static str,
        /// Its value.
        value_ms: u128,
        /// The visibility timeout.
        visibility_ms: u128,
    },
}

impl PollerConfig {
    /// Checks the settings against each other.
    ///
    /// # Errors
    /// The first setting that cannot work.
    pub fn validate(&self) -> Result<(), PollerConfigError> {
        for (field, v) in [
            ("--worker-loops (loops)", self.loops),
            ("receive_max_messages", self.receive_max_messages),
            (
                "--batch-max-events (max_batch_events)",
                self.max_batch_events,
            ),
            ("max_batch_messages", self.max_batch_messages),
            (
                "--max-concurrent-batches (max_concurrent_batches)",
                self.max_concurrent_batches,
            ),
        ] {
            if v == 0 {
                return Err(PollerConfigError::Zero { field });
            }
        }
        for (field, v, why) in [
            (
                "--receive-wait-secs (receive_wait)",
                self.receive_wait,
                "an idle worker would ask the broker for messages in a tight loop",
            ),
            (
                "--breaker-cooldown-secs (breaker.cooldown)",
                self.breaker.cooldown,
                "an open breaker would probe a down store without pause",
            ),
            (
                "--breaker-max-cooldown-secs (breaker.max_cooldown)",
                self.breaker.max_cooldown,
                "an open breaker would probe a down store without pause",
            ),
        ] {
            if v.is_zero() {
                return Err(PollerConfigError::NoWait { field, why });
            }
        }
        for (field, v) in [
            ("--heartbeat-secs (heartbeat_every)", self.heartbeat_every),
            ("--batch-max-wait-ms (max_batch_wait)", self.max_batch_wait),
        ] {
            if v.is_zero() {
                return Err(PollerConfigError::NoWait {
                    field,
                    why: "it must come before the visibility timeout lapses, and cannot be 0",
                });
            }
            if v >= self.visibility_timeout {
                return Err(PollerConfigError::NotUnderVisibility {
                    field,
                    value_ms: v.as_millis(),
                    visibility_ms: self.visibility_timeout.as_millis(),
                });
            }
        }
        Ok(())
    }
}

/// The poller: build it, take its metrics, then `run` it until shutdown.
#[derive(Debug)]
pub struct Poller {
    ctx: Arc<Ctx>,
}

#[derive(Debug)]
struct Ctx {
    source: Arc<dyn Source>,
    sink: Arc<dyn Sink>,
    config: PollerConfig,
    breaker: CircuitBreaker,
    batches: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

/// Deliveries coalesced into one batch.
struct Batch {
    prepared: Vec<PreparedDelivery>,
    events: usize,
    first_received: Instant,
}

impl Poller {
    /// A poller draining `source` into `sink`.
    ///
    /// # Errors
    /// [`PollerConfigError`] when the settings cannot work together.
    pub fn new(
        source: Arc<dyn Source>,
        sink: Arc<dyn Sink>,
        config: PollerConfig,
    ) -> Result<Self, PollerConfigError> {
        config.validate()?;
        let metrics = Arc::new(Metrics::new());
        let sink: Arc<dyn Sink> = match config.max_events_per_sec {
            Some(rate) => Arc::new(
                CappedSink::new(sink, Arc::new(WriteCap::new(rate, config.burst_events)))
                    .counting(Arc::clone(&metrics)),
            ),
            None => sink,
        };
        Ok(Self {
            ctx: Arc::new(Ctx {
                source,
                sink,
                breaker: CircuitBreaker::new(config.breaker, Arc::clone(&metrics)),
                batches: Arc::new(Semaphore::new(config.max_concurrent_batches)),
                config,
                metrics,
            }),
        })
    }

    /// The live counters.
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.ctx.metrics)
    }

    /// The source it drains.
    pub fn source(&self) -> &Arc<dyn Source> {
        &self.ctx.source
    }

    /// What `GET /metrics` shows of this poller: its counters, the batches in flight, and the
    /// store's own metrics (PostgreSQL: the pool and the write paths).
    pub fn metrics_page(&self) -> Arc<dyn Render> {
        Arc::clone(&self.ctx) as Arc<dyn Render>
    }

    /// Runs the receive loops until `shutdown` is cancelled, then lets the batches in flight
    /// finish and settle, and returns.
    pub async fn run(self, shutdown: CancellationToken) {
        info!(loops = self.ctx.config.loops, "Poller started");
        let mut loops = JoinSet::new();
        let mut ids = std::collections::HashMap::new();
        for n in 0..self.ctx.config.loops {
            let id = loops
                .spawn(receive_loop(Arc::clone(&self.ctx), shutdown.clone(), n))
                .id();
            ids.insert(id, n);
        }
        while let Some(done) = loops.join_next_with_id().await {
            let Err(e) = done else { continue };
            // Only a panic outside a write gets here (decoding, settling): a loop must not
            // silently drop the worker's capacity, so it is started again.
            error!(error = %e, "Receive loop died");
            if !shutdown.is_cancelled() {
                let n = ids.remove(&e.id()).unwrap_or_default();
                let id = loops
                    .spawn(receive_loop(Arc::clone(&self.ctx), shutdown.clone(), n))
                    .id();
                ids.insert(id, n);
                warn!(loop_no = n, "Receive loop started again");
            }
        }
        info!("Poller stopped");
    }
}

async fn receive_loop(ctx: Arc<Ctx>, shutdown: CancellationToken, n: usize) {
    let mut receive_backoff = Duration::from_millis(100);
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            () = ctx.breaker.ready(ctx.sink.as_ref()) => {}
        }
        let permit = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            p = Arc::clone(&ctx.batches).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        // The breaker may have opened while this loop waited for a permit.
        if ctx.breaker.state() != crate::metrics::BreakerState::Closed {
            continue;
        }
        let batch = match receive_batch(&ctx, &shutdown).await {
            Ok(Some(batch)) => batch,
            Ok(None) => continue,
            Err(e) => {
                ctx.metrics.add_receive_errors(1);
                warn!(loop_no = n, error = %e, backoff_ms = receive_backoff.as_millis(), "Receive failed");
                drop(permit);
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(receive_backoff) => {}
                }
                receive_backoff = (receive_backoff * 2).min(MAX_RECEIVE_BACKOFF);
                continue;
            }
        };
        receive_backoff = Duration::from_millis(100);
        // Not cancellable: a batch received is finished and settled, shutdown or not.
        process(&ctx, batch, &shutdown).await;
        drop(permit);
    }
    debug!(loop_no = n, "Receive loop stopped");
}

/// Receives until the batch holds `max_batch_events` events or `max_batch_messages`
/// messages, or `max_batch_wait` passed since its first message; `None` when a long poll
/// found nothing.
async fn receive_batch(
    ctx: &Ctx,
    shutdown: &CancellationToken,
) -> Result<Option<Batch>, shared::SourceError> {
    let cfg = &ctx.config;
    let mut batch: Option<Batch> = None;
    loop {
        let (wait, want) = match &batch {
            None => (
                cfg.receive_wait,
                cfg.receive_max_messages.min(cfg.max_batch_messages),
            ),
            Some(b) => {
                let deadline = b.first_received + cfg.max_batch_wait;
                let now = Instant::now();
                if now >= deadline
                    || b.events >= cfg.max_batch_events
                    || b.prepared.len() >= cfg.max_batch_messages
                {
                    break;
                }
                let room = cfg.max_batch_messages - b.prepared.len();
                (deadline - now, cfg.receive_max_messages.min(room))
            }
        };
        let received = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            r = ctx.source.receive(want, wait) => r,
        };
        let deliveries = match received {
            Ok(d) => d,
            // Keep what was received; it is processed and settled now.
            Err(e) if batch.is_some() => {
                warn!(error = %e, "Receive failed while coalescing; processing what arrived");
                ctx.metrics.add_receive_errors(1);
                break;
            }
            Err(e) => return Err(e),
        };
        if deliveries.is_empty() {
            if batch.is_none() {
                return Ok(None);
            }
            continue;
        }
        ctx.metrics.add_received(deliveries.len() as u64);
        let b = batch.get_or_insert_with(|| Batch {
            prepared: Vec::new(),
            events: 0,
            first_received: Instant::now(),
        });
        for d in &deliveries {
            let p = core::prepare(d, &cfg.core);
            b.events += p.event_count();
            b.prepared.push(p);
        }
    }
    Ok(batch)
}

async fn process(ctx: &Ctx, batch: Batch, shutdown: &CancellationToken) {
    let ids: Vec<DeliveryId> = batch.prepared.iter().map(|p| p.id().clone()).collect();
    let receive_counts: Vec<u32> = batch
        .prepared
        .iter()
        .map(PreparedDelivery::receive_count)
        .collect();
    let events = batch.events;
    let deliveries = ids.len();
    let redelivered = receive_counts.iter().any(|&n| n > 1);
    let _in_flight = ctx.metrics.batch_in_flight();
    // Once per batch, however many outcomes its deliveries end up with (after a panic each
    // is written alone).
    ctx.metrics.add_batches(1);
    ctx.metrics.add_events_valid(events as u64);
    let stop = CancellationToken::new();
    let beat = tokio::spawn(heartbeat(
        Arc::clone(&ctx.source),
        Arc::clone(&ctx.metrics),
        ids.clone(),
        batch.first_received + ctx.config.heartbeat_every,
        ctx.config.heartbeat_every,
        ctx.config.visibility_timeout,
        stop.clone(),
    ));
    // Also stops the heartbeat if this future is dropped mid-write (its loop aborted): a
    // detached heartbeat would keep extending the batch, and keep the source alive.
    let stop_on_drop = stop.drop_guard();
    // A redelivered batch may hold what made an earlier write panic: keep a copy to write
    // its deliveries alone should it panic again (redeliveries are rare; first deliveries
    // are not copied).
    let spare = (batch.prepared.len() > 1 && receive_counts.iter().any(|&n| n > 1))
        .then(|| batch.prepared.clone());
    let started = Instant::now();
    let write = core::write_prepared(batch.prepared, ctx.sink.as_ref(), &ctx.config.core);
    let written = AssertUnwindSafe(write).catch_unwind().await;
    // "Written" when the store took the batch's writes: not when it refused them all (it
    // answered, so the sink is healthy, yet nothing was stored), nor for a batch with
    // nothing to write (undecodable messages only).
    ctx.metrics.observe_batch_write(
        started.elapsed(),
        matches!(&written, Ok(o) if o.sink_health == core::SinkHealth::Healthy
            && o.written.inserted + o.written.duplicates > 0),
    );
    let (outcomes, panicked) = match (written, spare) {
        (Ok(outcome), _) => (vec![outcome], Vec::new()),
        (Err(_), Some(prepared)) => {
            ctx.metrics.add_write_panics(1);
            error!(
                deliveries = prepared.len(),
                "Panic while writing a redelivered batch; writing its deliveries alone"
            );
            write_alone(ctx, prepared).await
        }
        (Err(_), None) => {
            ctx.metrics.add_write_panics(1);
            error!(
                deliveries = ids.len(),
                "Panic while writing a batch; retrying its deliveries later"
            );
            (Vec::new(), ids.into_iter().zip(receive_counts).collect())
        }
    };
    for outcome in &outcomes {
        ctx.breaker.record(outcome);
    }
    if outcomes
        .iter()
        .any(|o| o.sink_health == core::SinkHealth::Unavailable)
    {
        // Two or more messages received before failed together again: not one message's
        // hiccup or poison (a lone message still reaches its DLQ by receive count).
        let failed = outcomes
            .iter()
            .flat_map(|o| &o.settlements)
            .filter(|s| matches!(s.decision, Decision::RetryLater(_)))
            .count();
        hold_while_the_store_is_down(ctx, deliveries, redelivered && failed >= 2, shutdown).await;
    }
    // No extension may follow a settlement: stop the heartbeat and wait for it.
    drop(stop_on_drop);
    if let Err(e) = beat.await {
        error!(error = %e, "Heartbeat task died");
    }
    for outcome in &outcomes {
        settle(ctx, outcome, events).await;
    }
    if !panicked.is_empty() {
        retry_after_panic(ctx, panicked).await;
    }
}

/// After a write that failed because the store is unavailable: when the store counts as
/// down, keeps the batch, its heartbeat running so its messages stay in flight, until the
/// breaker's probes find the store taking writes again (or shutdown), and only then lets the
/// caller settle it (retry later, as decided).
///
/// The store counts as down when the breaker is already open, when it does not answer a
/// ping, or when two or more messages received before failed together again
/// (`failed_again_together`: here or on another replica, not a passing hiccup). The breaker
/// is opened at once then (unless it already is); its probe tells a store that fails every
/// write (it stays open, the batch held) from one message that fails on its own (it closes,
/// the message is retried and its receive count decides, as before).
///
/// Settled at once, a failed batch came back within seconds (the retry delay), to this
/// worker or another, and every failed attempt used up one of the message's receives: with
/// two replicas, each needing `failure_threshold` failed batches before its breaker opened,
/// the few messages of a quiet queue reached the redrive policy's `maxReceiveCount` during
/// one outage and were moved to the DLQ, valid as they were. Held, a message is received at
/// most twice during an outage and once after it, however many replicas run.
async fn hold_while_the_store_is_down(
    ctx: &Ctx,
    deliveries: usize,
    failed_again_together: bool,
    shutdown: &CancellationToken,
) {
    let open = ctx.breaker.state() != crate::metrics::BreakerState::Closed;
    let down = open
        || failed_again_together
        || tokio::select! {
            biased;
            () = shutdown.cancelled() => false,
            answered = tokio::time::timeout(PING_TIMEOUT, ctx.sink.ping()) => {
                !matches!(answered, Ok(Ok(())))
            }
        };
    if !down || shutdown.is_cancelled() {
        return;
    }
    if !open {
        // Our own evidence, not the breaker's: open it now rather than after
        // `failure_threshold` batches (one replica's count; the others have their own).
        ctx.breaker.trip();
    }
    let _held = ctx.metrics.batch_held();
    warn!(
        deliveries,
        "Store down: holding the batch, its messages in flight, until the store takes writes again"
    );
    let started = Instant::now();
    tokio::select! {
        biased;
        () = shutdown.cancelled() => {
            info!(deliveries, "Shutdown: releasing a held batch for a later retry");
        }
        () = ctx.breaker.ready(ctx.sink.as_ref()) => {
            info!(
                deliveries,
                held_ms = started.elapsed().as_millis(),
                "Store back: releasing the held batch for a retry"
            );
        }
    }
}

/// Writes each delivery alone, catching panics: the outcomes of those written, and the
/// deliveries (with their receive counts) whose write panicked.
async fn write_alone(
    ctx: &Ctx,
    prepared: Vec<PreparedDelivery>,
) -> (Vec<BatchOutcome>, Vec<(DeliveryId, u32)>) {
    let mut outcomes = Vec::new();
    let mut panicked = Vec::new();
    for p in prepared {
        let (id, n, message_id) = (p.id().clone(), p.receive_count(), p.message_id().to_owned());
        let write = core::write_prepared(vec![p], ctx.sink.as_ref(), &ctx.config.core);
        match AssertUnwindSafe(write).catch_unwind().await {
            Ok(outcome) => {
                // The batch's own write panicked, so only these say the store took writes.
                if outcome.sink_health == core::SinkHealth::Healthy
                    && outcome.written.inserted + outcome.written.duplicates > 0
                {
                    ctx.metrics.mark_stored();
                }
                outcomes.push(outcome);
            }
            Err(_) => {
                ctx.metrics.add_write_panics(1);
                error!(
                    message_id,
                    "Panic while writing a delivery alone; retrying it later"
                );
                panicked.push((id, n));
            }
        }
    }
    (outcomes, panicked)
}

/// Writes that panicked (a bug in the store adapter or the core): nothing of them is known
/// to be stored, so they are retried after their backoff, as after a transient failure. The
/// loop lives on; a delivery that panics every time reaches the DLQ by its receive count,
/// alone once its batch is a redelivery.
async fn retry_after_panic(ctx: &Ctx, panicked: Vec<(DeliveryId, u32)>) {
    let m = &ctx.metrics;
    let retries: Vec<(DeliveryId, Duration)> = panicked
        .into_iter()
        .map(|(id, n)| (id, ctx.config.core.retry_delay(n)))
        .collect();
    match ctx.source.retry_later(&retries).await {
        Ok(()) => m.add_retried(retries.len() as u64),
        Err(e) => {
            m.add_settle_errors(1);
            warn!(deliveries = retries.len(), error = %e, "Retry-later failed; they return after their visibility lapses");
        }
    }
}

async fn heartbeat(
    source: Arc<dyn Source>,
    metrics: Arc<Metrics>,
    ids: Vec<DeliveryId>,
    first: Instant,
    every: Duration,
    by: Duration,
    stop: CancellationToken,
) {
    let mut next = first;
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            () = tokio::time::sleep_until(next) => {}
        }
        match source.extend(&ids, by).await {
            Ok(()) => debug!(
                deliveries = ids.len(),
                by_ms = by.as_millis(),
                "Extended visibility"
            ),
            Err(e) => {
                metrics.add_heartbeat_errors(1);
                warn!(deliveries = ids.len(), error = %e, "Visibility heartbeat failed");
            }
        }
        next += every;
    }
}

async fn settle(ctx: &Ctx, outcome: &BatchOutcome, events: usize) {
    let m = &ctx.metrics;
    m.add_written(outcome.written.inserted as u64);
    m.add_duplicates(outcome.written.duplicates as u64);

    let mut acks = Vec::new();
    let mut retries = Vec::new();
    let mut lettered = Vec::new();
    for s in &outcome.settlements {
        match &s.decision {
            Decision::Ack => acks.push(s.id.clone()),
            Decision::RetryLater(delay) => retries.push((s.id.clone(), *delay)),
            Decision::AckWithLetters(letters) | Decision::DeadLetter(letters) => {
                lettered.push((s, letters));
            }
        }
    }
    let mut acked = 0_usize;
    if !acks.is_empty() {
        match ctx.source.ack(&acks).await {
            Ok(()) => acked += acks.len(),
            Err(e) => {
                m.add_settle_errors(1);
                warn!(deliveries = acks.len(), error = %e, "Ack failed; they will be redelivered as duplicates");
            }
        }
    }
    let mut retried = 0_usize;
    if !retries.is_empty() {
        match ctx.source.retry_later(&retries).await {
            Ok(()) => retried = retries.len(),
            Err(e) => {
                m.add_settle_errors(1);
                warn!(deliveries = retries.len(), error = %e, "Retry-later failed; they return after their visibility lapses");
            }
        }
    }
    // Last, and all at once: each is a round trip to the DLQ (on Kafka a wait for delivery
    // reports, up to the delivery timeout while the DLQ topic has no leader). First and one
    // after the other, 40 letters in a DLQ outage held their loop for minutes, the batch's
    // good messages unacknowledged, and on Kafka the worker past `max.poll.interval.ms`.
    let sent = futures::future::join_all(
        lettered
            .iter()
            .map(|(s, letters)| ctx.source.dead_letter(&s.id, letters)),
    )
    .await;
    let mut letters_sent = 0_usize;
    for ((s, letters), sent) in lettered.iter().zip(sent) {
        match sent {
            Ok(()) => {
                letters_sent += letters.len();
                m.add_dead_lettered(letters.len() as u64);
                if matches!(s.decision, Decision::AckWithLetters(_)) {
                    acked += 1;
                }
                for l in letters.iter() {
                    warn!(
                        message_id = %s.message_id,
                        code = %l.reason.code,
                        reason = %l.reason.message,
                        "Dead-lettered"
                    );
                }
            }
            Err(e) => {
                // The source still holds it: SQS and the embedded queue hand it out again
                // once its visibility lapses (decided again), Kafka's source sends the
                // letters again itself.
                m.add_settle_errors(1);
                warn!(message_id = %s.message_id, error = %e, "Dead-letter failed");
            }
        }
    }
    m.add_acked(acked as u64);
    m.add_retried(retried as u64);
    info!(
        deliveries = outcome.settlements.len(),
        events,
        inserted = outcome.written.inserted,
        duplicates = outcome.written.duplicates,
        acked,
        retried,
        dead_lettered = letters_sent,
        sink_error = outcome.sink_error.as_deref().unwrap_or(""),
        "Settled batch"
    );
}

impl Render for Ctx {
    #[allow(clippy::cast_precision_loss)]
    fn render(&self, page: &mut Exposition) {
        self.metrics.render(page);
        page.gauge(
            "spillway_worker_max_concurrent_batches",
            "The most batches written at once (--max-concurrent-batches).",
            self.config.max_concurrent_batches as f64,
        );
        self.source.render_metrics(page);
        self.sink.render_metrics(page);
    }
}
