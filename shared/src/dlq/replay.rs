//! The replay, export and import engine over any [`DlqBroker`].
//!
//! Replay leases dead letters in batches, decides for each one (filter, loop guard, ingest
//! validation for a topic, `--max`), sends those to move to the destination, and deletes them
//! from the DLQ only after the destination acknowledged them. Messages it does not move stay
//! leased (hidden) until the run ends, so one run looks at each message once, and are then
//! released: they are untouched but for their receive count. A killed run leaves every message
//! in the DLQ, at the destination, or — sent and not yet deleted — in both; leases lapse and
//! nothing is lost.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::inspect::{for_topic, inspect, Filter};
use super::ndjson::{ExportReader, ExportWriter};
use super::{
    now_ms, DlqBroker, DlqError, DlqMessage, Outgoing, ATTR_REPLAY_COUNT, DEFAULT_MAX_REPLAYS,
};
use crate::clock::SystemClock;
use crate::embedded::ATTR_SOURCE_QUEUE;
use crate::event::ValidationPolicy;
use crate::source::DeliveryId;

/// Rounds in a row that only return messages already looked at before a worker stops (their
/// lease lapsed during a long run).
const MAX_STALE_ROUNDS: u32 = 3;
/// Most refusals listed in a report (all are counted).
const MAX_LISTED_REFUSALS: usize = 50;

/// Where replayed messages go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A queue: bodies and attributes as they are, plus the replay counter.
    Queue(String),
    /// A topic: ingest validation runs again on every event; the original envelope body is
    /// published with its attributes, minus the failure attributes, plus the replay counter.
    Topic(String),
    /// Each message back to the queue its `spillway-source-queue` attribute names (a DLQ that
    /// serves several queues); a message without it is refused.
    SourceQueues,
}

impl Target {
    /// The queue or topic name.
    pub fn name(&self) -> &str {
        match self {
            Self::Queue(n) | Self::Topic(n) => n,
            Self::SourceQueues => "",
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::Queue(n) => format!("queue {n}"),
            Self::Topic(n) => format!("topic {n}"),
            Self::SourceQueues => "each message's source queue".to_owned(),
        }
    }
}

/// How a replay (or export) runs.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// Which messages to take.
    pub filter: Filter,
    /// Most messages per second sent (`None`: as fast as the brokers go).
    pub rate_per_sec: Option<f64>,
    /// Most messages to move (or export).
    pub max_messages: Option<u64>,
    /// Concurrent lease → send → delete loops.
    pub concurrency: usize,
    /// Decide and count only: nothing is sent or deleted.
    pub dry_run: bool,
    /// Messages already replayed this many times are refused.
    pub max_replays: u32,
    /// How long a leased message stays hidden; should exceed the run.
    pub lease: Duration,
    /// Validation re-run for a topic (the ingest rules: schema and time window).
    pub validation: ValidationPolicy,
    /// A FIFO message (one with a deduplication id) sent to a FIFO destination (`.fifo`) is
    /// refused while younger than this: SQS would silently drop it as a duplicate of the
    /// original send within its 5-minute deduplication window, and deleting it from the DLQ
    /// would then lose it.
    pub fifo_dedup_guard: Duration,
    /// Export only: overwrite the file when it exists. By default an existing file is
    /// refused: it may be an earlier export's, holding the only copy of letters that export
    /// deleted from the DLQ.
    pub replace_file: bool,
}

/// Default of [`ReplayOptions::fifo_dedup_guard`]: SQS's 5-minute window plus a margin.
pub const FIFO_DEDUP_GUARD: Duration = Duration::from_secs(360);

impl Default for ReplayOptions {
    fn default() -> Self {
        Self {
            filter: Filter::default(),
            rate_per_sec: None,
            max_messages: None,
            concurrency: 1,
            dry_run: false,
            max_replays: DEFAULT_MAX_REPLAYS,
            lease: Duration::from_secs(600),
            validation: ValidationPolicy::default(),
            fifo_dedup_guard: FIFO_DEDUP_GUARD,
            replace_file: false,
        }
    }
}

/// Why a letter whose body is not text stays in the DLQ.
fn unreadable_refusal(why: &str) -> String {
    format!(
        "refused: {why}; a text copy would lose its bytes, so it stays in the DLQ (read it \
         with a Kafka consumer)"
    )
}

/// A message the run did not move, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refusal {
    /// Its message id.
    pub message_id: String,
    /// Why it stays in the DLQ.
    pub reason: String,
}

/// Counts as a run goes (also handed to the progress callback).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Counts {
    /// Distinct messages looked at.
    pub scanned: u64,
    /// Messages that passed the filter.
    pub matched: u64,
    /// Messages sent and deleted from the DLQ.
    pub moved: u64,
    /// Dry run: messages that would have moved.
    pub would_move: u64,
    /// Messages the filter left alone.
    pub skipped_by_filter: u64,
    /// Messages refused because they were replayed `max_replays` times already.
    pub refused_max_replays: u64,
    /// Messages refused because an event fails ingest validation (topic replay).
    pub refused_invalid: u64,
    /// Messages refused because they do not name their source queue (`--to source` on a DLQ
    /// of several queues).
    pub refused_no_source: u64,
    /// FIFO messages refused while still inside the destination's deduplication window.
    pub refused_dedup_window: u64,
    /// Messages refused (replay) or left out of the file (export) because their body is not
    /// text ([`DlqMessage::body_error`]): a text copy would lose their bytes.
    pub refused_unreadable: u64,
    /// Matching messages left alone because `max_messages` was reached.
    pub left_by_max: u64,
    /// Matching messages left for a later run because the broker could not record their
    /// move (Kafka: the replay group's commit metadata is full).
    pub left_by_broker_limit: u64,
    /// Messages the destination refused (still in the DLQ).
    pub send_failed: u64,
    /// Messages sent whose delete from the DLQ did not happen (now in both places).
    pub sent_not_deleted: u64,
}

/// What a replay did.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayReport {
    /// The DLQ.
    pub dlq: String,
    /// The destination (`queue NAME` or `topic NAME`).
    pub target: String,
    /// Whether it was a dry run.
    pub dry_run: bool,
    /// The counts.
    #[serde(flatten)]
    pub counts: Counts,
    /// Wall time of the run in seconds (connecting, leasing, the final empty receive and the
    /// release included).
    pub elapsed_secs: f64,
    /// Seconds from the first send to the last delete (the window `--rate` paces).
    pub moving_secs: f64,
    /// Messages moved per second of the moving window (dry run: messages scanned per second
    /// of the run).
    pub messages_per_sec: f64,
    /// Broker API calls (transactions on the embedded broker) the run made, by operation.
    pub api_calls: BTreeMap<String, u64>,
    /// All of them.
    pub api_calls_total: u64,
    /// API calls per message moved (per message scanned on a dry run).
    pub api_calls_per_message: f64,
    /// The first refusals, with their reasons.
    pub refusals: Vec<Refusal>,
    /// Why the run stopped early, when it did.
    pub error: Option<String>,
    /// A letter this run had leased and not moved (skipped by a filter or `--max`, refused,
    /// or waiting to be sent) came back during the run: its lease lapsed. On SQS, whose
    /// receives come in no order, the run then ends after a few receives of letters already
    /// seen, possibly before every letter was looked at: run it again (with a longer lease).
    pub lease_lapsed: bool,
}

/// Called with the counts after each batch.
pub type Progress = Arc<dyn Fn(&Counts) + Send + Sync>;

/// Paces sends to a rate: each message takes `1 / rate` seconds of a schedule. When sends fall
/// behind the schedule (a slow broker), at most [`CATCH_UP`] of lost time is made up, so a
/// stall is never followed by a long burst above the rate.
#[derive(Debug)]
struct Pacer {
    rate: Option<f64>,
    next: Option<Instant>,
}

/// Most schedule time a late sender may make up at once.
const CATCH_UP: Duration = Duration::from_secs(1);
/// Slowest `--rate` accepted, in messages per second (one message every 1,000 s): anything
/// slower is a typo, and would overflow the schedule.
pub const MIN_RATE_PER_SEC: f64 = 0.001;
/// Longest a batch waits for the next (a full batch at [`MIN_RATE_PER_SEC`] is shorter).
const MAX_PACER_STEP: Duration = Duration::from_secs(1_000_000);

/// Refuses a rate that is not at least [`MIN_RATE_PER_SEC`] messages per second.
///
/// # Errors
/// [`DlqError::Invalid`] saying what is accepted.
pub fn check_rate(rate: f64) -> Result<(), DlqError> {
    if rate.is_finite() && rate >= MIN_RATE_PER_SEC {
        Ok(())
    } else {
        Err(DlqError::Invalid(format!(
            "--rate must be at least {MIN_RATE_PER_SEC} messages per second (one every \
             1,000 s), not {rate}"
        )))
    }
}

impl Pacer {
    fn new(rate: Option<f64>) -> Self {
        Self { rate, next: None }
    }

    /// When `n` more messages may go.
    fn reserve(&mut self, n: usize) -> Option<Instant> {
        let rate = self.rate?;
        let now = Instant::now();
        let floor = now.checked_sub(CATCH_UP).unwrap_or(now);
        let at = self.next.map_or(now, |next| next.max(floor));
        // Callers check the rate (`check_rate`); a rate that slips through is paced at the
        // longest step rather than overflowing the conversion or the clock.
        let step = Duration::try_from_secs_f64(n as f64 / rate)
            .map_or(MAX_PACER_STEP, |d| d.min(MAX_PACER_STEP));
        self.next = Some(at.checked_add(step).unwrap_or(at));
        Some(at)
    }
}

/// A message decided for moving: its lease, id, what to send, and where.
type Pending = (DeliveryId, String, Outgoing, Target);

#[derive(Debug, Default)]
struct State {
    /// When the first send started and the last delete ended.
    first_send: Option<Instant>,
    last_done: Option<Instant>,
    /// Leased, not moved: message id → latest receipt (released at the end).
    held: HashMap<String, DeliveryId>,
    counts: Counts,
    refusals: Vec<Refusal>,
    reserved: u64,
    /// A letter leased by this run came back: its lease lapsed during the run.
    lease_lapsed: bool,
}

struct Run<'a> {
    port: &'a dyn DlqBroker,
    dlq: &'a str,
    target: &'a Target,
    opts: &'a ReplayOptions,
    state: Mutex<State>,
    pacer: Mutex<Pacer>,
    abort: AtomicBool,
    progress: Option<Progress>,
    batch: usize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn refuse(state: &mut State, message_id: &str, reason: String) {
    if state.refusals.len() < MAX_LISTED_REFUSALS {
        state.refusals.push(Refusal {
            message_id: message_id.to_owned(),
            reason,
        });
    }
}

/// Batch size: the broker's, smaller under a low rate so a batch is at most ~1/10 s of sends.
fn batch_size(port: &dyn DlqBroker, rate: Option<f64>) -> usize {
    let max = port.max_batch().max(1);
    match rate {
        Some(r) if r > 0.0 => {
            let per_tenth = (r / 10.0).floor();
            if per_tenth < 1.0 {
                1
            } else if per_tenth >= max as f64 {
                max
            } else {
                // In range: per_tenth is a whole number between 1 and max.
                format!("{per_tenth:.0}").parse().unwrap_or(max)
            }
        }
        _ => max,
    }
}

impl Run<'_> {
    fn report_progress(&self) {
        if let Some(p) = &self.progress {
            let counts = lock(&self.state).counts.clone();
            p(&counts);
        }
    }

    /// One worker: lease → decide → send → delete until the DLQ has nothing new.
    async fn work(&self) -> Result<(), DlqError> {
        let mut stale_rounds = 0;
        let clock = SystemClock;
        // Messages to move, gathered over leases until a full batch (fewer, fuller calls).
        let mut pending: Vec<Pending> = Vec::new();
        while !self.abort.load(Ordering::Relaxed) {
            if let Some(max) = self.opts.max_messages {
                if lock(&self.state).reserved >= max {
                    break;
                }
            }
            let leased = match self.port.lease(self.dlq, self.batch, self.opts.lease).await {
                Ok(l) => l,
                Err(e) => {
                    self.hold(pending);
                    return Err(e);
                }
            };
            if leased.is_empty() {
                break;
            }
            let now = now_ms();
            let mut fresh = 0;
            {
                let mut st = lock(&self.state);
                for l in leased {
                    let id = l.message.message_id.clone();
                    if let Some(r) = st.held.get_mut(&id) {
                        // Seen already; its lease lapsed and it came back: keep holding it.
                        *r = l.receipt;
                        st.lease_lapsed = true;
                        continue;
                    }
                    if let Some(p) = pending.iter_mut().find(|(_, pid, _, _)| *pid == id) {
                        p.0 = l.receipt;
                        st.lease_lapsed = true;
                        continue;
                    }
                    fresh += 1;
                    st.counts.scanned += 1;
                    let m = &l.message;
                    let inspection = inspect(m);
                    if !self.opts.filter.matches(m, &inspection, now) {
                        st.counts.skipped_by_filter += 1;
                        st.held.insert(id, l.receipt);
                        continue;
                    }
                    st.counts.matched += 1;
                    if let Some(why) = &m.body_error {
                        st.counts.refused_unreadable += 1;
                        refuse(&mut st, &id, unreadable_refusal(why));
                        st.held.insert(id, l.receipt);
                        continue;
                    }
                    let replays = inspection.replay_count(m);
                    if replays >= self.opts.max_replays {
                        st.counts.refused_max_replays += 1;
                        refuse(
                            &mut st,
                            &id,
                            format!(
                                "refused: already replayed {replays} time(s), --max-replays is \
                                 {}; it keeps failing, so look at it (`spillway dlq peek`) before \
                                 raising --max-replays",
                                self.opts.max_replays
                            ),
                        );
                        st.held.insert(id, l.receipt);
                        continue;
                    }
                    let dest = match self.target {
                        Target::SourceQueues => match m.attributes.get(ATTR_SOURCE_QUEUE) {
                            Some(q) if !q.is_empty() => Target::Queue(q.clone()),
                            _ => {
                                st.counts.refused_no_source += 1;
                                refuse(
                                    &mut st,
                                    &id,
                                    format!(
                                        "refused: no {ATTR_SOURCE_QUEUE} attribute says where it \
                                         came from; replay it with --to QUEUE"
                                    ),
                                );
                                st.held.insert(id, l.receipt);
                                continue;
                            }
                        },
                        other => other.clone(),
                    };
                    let fifo_age = m.age_secs(now).unwrap_or(0);
                    if m.dedup_id.is_some()
                        && dest.name().ends_with(".fifo")
                        && fifo_age < self.opts.fifo_dedup_guard.as_secs()
                    {
                        st.counts.refused_dedup_window += 1;
                        let wait = self.opts.fifo_dedup_guard.as_secs() - fifo_age;
                        refuse(
                            &mut st,
                            &id,
                            format!(
                                "refused for now: sent {fifo_age} s ago with a FIFO deduplication \
                                 id, which the FIFO destination would silently drop as a \
                                 duplicate; replay it again in {wait} s"
                            ),
                        );
                        st.held.insert(id, l.receipt);
                        continue;
                    }
                    let out = match dest {
                        Target::Topic(_) => {
                            for_topic(m, &inspection, &self.opts.validation, &clock)
                        }
                        Target::Queue(_) | Target::SourceQueues => Ok(m.to_outgoing()),
                    };
                    let mut out = match out {
                        Ok(o) => o,
                        Err(reason) => {
                            st.counts.refused_invalid += 1;
                            refuse(&mut st, &id, format!("refused: {reason}"));
                            st.held.insert(id, l.receipt);
                            continue;
                        }
                    };
                    if self.opts.max_messages.is_some_and(|max| st.reserved >= max) {
                        st.counts.left_by_max += 1;
                        st.held.insert(id, l.receipt);
                        continue;
                    }
                    st.reserved += 1;
                    if self.opts.dry_run {
                        st.counts.would_move += 1;
                        st.held.insert(id, l.receipt);
                        continue;
                    }
                    make_room_for_the_replay_count(&mut out.attributes);
                    out.attributes
                        .insert(ATTR_REPLAY_COUNT.to_owned(), (replays + 1).to_string());
                    pending.push((l.receipt, id, out, dest));
                }
            }
            if fresh == 0 {
                stale_rounds += 1;
                if stale_rounds >= MAX_STALE_ROUNDS {
                    break;
                }
                continue;
            }
            stale_rounds = 0;
            if pending.len() >= self.batch {
                self.move_batch(std::mem::take(&mut pending)).await?;
            }
            self.report_progress();
        }
        if !pending.is_empty() {
            if self.abort.load(Ordering::Relaxed) {
                self.hold(pending);
            } else {
                self.move_batch(pending).await?;
                self.report_progress();
            }
        }
        Ok(())
    }

    /// Keeps leased messages, unsent, to release them at the end.
    fn hold(&self, messages: Vec<Pending>) {
        let mut st = lock(&self.state);
        for (r, id, _, _) in messages {
            st.held.insert(id, r);
        }
    }

    /// Sends a batch (one call per destination), then deletes from the DLQ exactly the
    /// messages their destination took.
    async fn move_batch(&self, batch: Vec<Pending>) -> Result<(), DlqError> {
        let receipts: Vec<DeliveryId> = batch.iter().map(|(r, _, _, _)| r.clone()).collect();
        let left = match self.port.admit(self.dlq, &receipts).await {
            Ok(left) => left,
            Err(e) => {
                self.hold(batch);
                return Err(e);
            }
        };
        let batch = if left.is_empty() {
            batch
        } else {
            let mut left: HashMap<usize, String> = left.into_iter().collect();
            let mut st = lock(&self.state);
            let mut admitted = Vec::with_capacity(batch.len());
            for (i, p) in batch.into_iter().enumerate() {
                match left.remove(&i) {
                    Some(reason) => {
                        st.counts.left_by_broker_limit += 1;
                        st.reserved = st.reserved.saturating_sub(1);
                        refuse(&mut st, &p.1, reason);
                        st.held.insert(p.1, p.0);
                    }
                    None => admitted.push(p),
                }
            }
            admitted
        };
        if batch.is_empty() {
            return Ok(());
        }
        let at = lock(&self.pacer).reserve(batch.len());
        if let Some(at) = at {
            tokio::time::sleep_until(at.into()).await;
        }
        lock(&self.state)
            .first_send
            .get_or_insert_with(Instant::now);
        let mut groups: Vec<(&Target, Vec<usize>)> = Vec::new();
        for (i, (_, _, _, dest)) in batch.iter().enumerate() {
            match groups.iter_mut().find(|(d, _)| *d == dest) {
                Some((_, idx)) => idx.push(i),
                None => groups.push((dest, vec![i])),
            }
        }
        let mut refused: HashMap<usize, String> = HashMap::new();
        let mut unsent: Vec<usize> = Vec::new();
        let mut error = None;
        for (dest, idx) in &groups {
            if error.is_some() {
                unsent.extend(idx);
                continue;
            }
            let outgoing: Vec<Outgoing> = idx.iter().map(|&i| batch[i].2.clone()).collect();
            let sent = match dest {
                Target::Topic(t) => self.port.publish(t, &outgoing).await,
                Target::Queue(q) => self.port.send(q, &outgoing).await,
                Target::SourceQueues => Err(DlqError::Invalid("no destination".into())),
            };
            match sent {
                Ok(outcome) => {
                    for (j, reason) in outcome.failed {
                        if let Some(&i) = idx.get(j) {
                            refused.insert(i, format!("{} refused it: {reason}", dest.describe()));
                        }
                    }
                }
                Err(e) => {
                    // Not acknowledged: they stay in the DLQ (released at the end).
                    unsent.extend(idx);
                    error = Some(e);
                }
            }
        }
        let mut delete = Vec::with_capacity(batch.len());
        {
            let mut st = lock(&self.state);
            for (i, (r, id, _, _)) in batch.into_iter().enumerate() {
                if let Some(reason) = refused.remove(&i) {
                    st.counts.send_failed += 1;
                    refuse(&mut st, &id, reason);
                    st.held.insert(id, r);
                } else if unsent.contains(&i) {
                    st.held.insert(id, r);
                } else {
                    delete.push(r);
                }
            }
        }
        let n = delete.len() as u64;
        match self.port.delete(self.dlq, &delete).await {
            Ok(stale) => {
                let mut st = lock(&self.state);
                st.last_done = Some(Instant::now());
                st.counts.moved += n - stale as u64;
                st.counts.sent_not_deleted += stale as u64;
                drop(st);
                error.map_or(Ok(()), Err)
            }
            Err(e) => {
                lock(&self.state).counts.sent_not_deleted += n;
                Err(e)
            }
        }
    }
}

/// Replays dead letters from `dlq` to `target`. Setup errors (the DLQ or destination does not
/// exist) are returned; a failure during the run stops it and is in the report's `error`,
/// after every unmoved message was released.
///
/// # Errors
/// [`DlqError`] when the run could not start.
pub async fn replay(
    port: &dyn DlqBroker,
    dlq: &str,
    target: &Target,
    opts: &ReplayOptions,
    progress: Option<Progress>,
) -> Result<ReplayReport, DlqError> {
    if target.name() == dlq {
        return Err(DlqError::Invalid(format!(
            "the destination is the DLQ itself ({dlq})"
        )));
    }
    if let Some(r) = opts.rate_per_sec {
        check_rate(r)?;
    }
    // Fail fast, before leasing anything, on a DLQ that does not exist.
    port.stats(dlq).await?;
    let calls_before = port.calls();
    let started = Instant::now();
    let run = Run {
        port,
        dlq,
        target,
        opts,
        state: Mutex::new(State::default()),
        pacer: Mutex::new(Pacer::new(opts.rate_per_sec)),
        abort: AtomicBool::new(false),
        progress,
        batch: batch_size(port, opts.rate_per_sec),
    };
    let workers = (0..opts.concurrency.max(1)).map(|_| async {
        let r = run.work().await;
        if r.is_err() {
            run.abort.store(true, Ordering::Relaxed);
        }
        r
    });
    let results = futures::future::join_all(workers).await;
    let mut error = results
        .into_iter()
        .find_map(Result::err)
        .map(|e| e.to_string());
    let held: Vec<DeliveryId> = lock(&run.state).held.drain().map(|(_, r)| r).collect();
    if let Err(e) = port.release(dlq, &held).await {
        let msg = format!(
            "releasing {} unmoved messages failed ({e}); they come back when their lease lapses",
            held.len()
        );
        error = Some(error.map_or(msg.clone(), |prev| format!("{prev}; {msg}")));
    }
    let state = run
        .state
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner);
    let elapsed = started.elapsed().as_secs_f64();
    let moving = match (state.first_send, state.last_done) {
        (Some(a), Some(b)) if b > a => (b - a).as_secs_f64(),
        _ => 0.0,
    };
    let (api_calls, api_calls_total) = calls_since(&calls_before, &port.calls());
    let done = if opts.dry_run {
        state.counts.would_move
    } else {
        state.counts.moved
    };
    let per = if opts.dry_run {
        state.counts.scanned
    } else {
        done
    };
    let rate = if opts.dry_run && elapsed > 0.0 {
        state.counts.scanned as f64 / elapsed
    } else if moving > 0.0 {
        done as f64 / moving
    } else {
        0.0
    };
    Ok(ReplayReport {
        dlq: dlq.to_owned(),
        target: target.describe(),
        dry_run: opts.dry_run,
        counts: state.counts,
        elapsed_secs: elapsed,
        moving_secs: moving,
        messages_per_sec: rate,
        api_calls,
        api_calls_total,
        api_calls_per_message: if per > 0 {
            api_calls_total as f64 / per as f64
        } else {
            0.0
        },
        refusals: state.refusals,
        error,
        lease_lapsed: state.lease_lapsed,
    })
}

fn calls_since(
    before: &BTreeMap<&'static str, u64>,
    after: &BTreeMap<&'static str, u64>,
) -> (BTreeMap<String, u64>, u64) {
    let diff: BTreeMap<String, u64> = after
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect();
    let total = diff.values().sum();
    (diff, total)
}

/// What an export did.
#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    /// The DLQ.
    pub dlq: String,
    /// The file.
    pub path: String,
    /// Distinct messages looked at.
    pub scanned: u64,
    /// Messages written (and fsynced).
    pub exported: u64,
    /// Exported messages deleted from the DLQ (`--delete`).
    pub deleted: u64,
    /// Exported messages whose delete did not happen (lease lapsed): still in the DLQ.
    pub not_deleted: u64,
    /// Matching messages left out of the file and in the DLQ because the broker could not
    /// record their delete (`--delete` on Kafka: the replay group's commit metadata is full).
    pub left_by_broker_limit: u64,
    /// Why, for the first of them.
    pub left_reason: Option<String>,
    /// Matching messages left out of the file and in the DLQ because their body is not text
    /// (a Kafka letter that is not UTF-8): the file would hold a lossy copy.
    pub left_unreadable: u64,
    /// Why, for the first of them.
    pub unreadable_reason: Option<String>,
    /// Wall time in seconds.
    pub elapsed_secs: f64,
    /// Broker API calls the run made.
    pub api_calls_total: u64,
}

/// Exports the dead letters of `dlq` that pass `opts.filter` (at most `opts.max_messages`) to
/// `path`, one JSON object per line. With `delete`, the exported messages are deleted from
/// the DLQ only after the file was fsynced; otherwise every message is released untouched.
///
/// # Errors
/// [`DlqError`]; every leased message is released first (a failure before the fsync deletes
/// nothing).
pub async fn export(
    port: &dyn DlqBroker,
    dlq: &str,
    path: &Path,
    delete: bool,
    opts: &ReplayOptions,
    progress: Option<Progress>,
) -> Result<ExportReport, DlqError> {
    port.stats(dlq).await?;
    let calls_before = port.calls();
    let started = Instant::now();
    // message id → (latest receipt, exported?)
    let mut seen: HashMap<String, (DeliveryId, bool)> = HashMap::new();
    let mut counts = Counts::default();
    let mut left_by_broker_limit = 0;
    let mut first_left: Option<String> = None;
    let mut first_unreadable: Option<String> = None;
    let written = async {
        let mut writer = ExportWriter::create(path, opts.replace_file)?;
        let mut stale_rounds = 0;
        loop {
            if opts.max_messages.is_some_and(|m| writer.written() >= m) {
                break;
            }
            let leased = port.lease(dlq, port.max_batch(), opts.lease).await?;
            if leased.is_empty() {
                break;
            }
            let now = now_ms();
            let mut fresh = 0;
            let mut takes = Vec::new();
            for l in leased {
                if let Some(entry) = seen.get_mut(&l.message.message_id) {
                    entry.0 = l.receipt;
                    continue;
                }
                fresh += 1;
                counts.scanned += 1;
                let take = opts.filter.matches(&l.message, &inspect(&l.message), now)
                    && opts
                        .max_messages
                        .is_none_or(|m| writer.written() + (takes.len() as u64) < m);
                if take && l.message.body_error.is_some() {
                    counts.refused_unreadable += 1;
                    if first_unreadable.is_none() {
                        first_unreadable = l.message.body_error.as_deref().map(unreadable_refusal);
                    }
                    seen.insert(l.message.message_id, (l.receipt, false));
                } else if take {
                    takes.push(l);
                } else {
                    counts.skipped_by_filter += 1;
                    seen.insert(l.message.message_id, (l.receipt, false));
                }
            }
            // What is deleted afterwards must be recordable as deleted (Kafka's commit
            // metadata is bounded): what is not stays out of the file and in the DLQ.
            let left: HashMap<usize, String> = if delete && !takes.is_empty() {
                let receipts: Vec<DeliveryId> = takes.iter().map(|l| l.receipt.clone()).collect();
                port.admit(dlq, &receipts).await?.into_iter().collect()
            } else {
                HashMap::new()
            };
            for (i, l) in takes.into_iter().enumerate() {
                let take = !left.contains_key(&i);
                if take {
                    writer.write(&l.message)?;
                    counts.matched += 1;
                } else {
                    left_by_broker_limit += 1;
                    if first_left.is_none() {
                        first_left = left.get(&i).cloned();
                    }
                }
                seen.insert(l.message.message_id, (l.receipt, take));
            }
            if let Some(p) = &progress {
                p(&counts);
            }
            if fresh == 0 {
                stale_rounds += 1;
                if stale_rounds >= MAX_STALE_ROUNDS {
                    break;
                }
            } else {
                stale_rounds = 0;
            }
        }
        writer.finish()
    }
    .await;
    let (exported_receipts, others): (Vec<_>, Vec<_>) = seen.into_values().partition(|(_, e)| *e);
    let mut release: Vec<DeliveryId> = others.into_iter().map(|(r, _)| r).collect();
    let exported_receipts: Vec<DeliveryId> =
        exported_receipts.into_iter().map(|(r, _)| r).collect();
    let exported = match written {
        Ok(n) => n,
        Err(e) => {
            release.extend(exported_receipts);
            let _ = port.release(dlq, &release).await;
            return Err(e);
        }
    };
    let (mut deleted, mut not_deleted) = (0, 0);
    if delete {
        // The file is fsynced: only now may the exported messages go.
        let n = exported_receipts.len() as u64;
        match port.delete(dlq, &exported_receipts).await {
            Ok(stale) => {
                not_deleted = stale as u64;
                deleted = n - not_deleted;
            }
            Err(e) => {
                let _ = port.release(dlq, &release).await;
                return Err(e);
            }
        }
    } else {
        release.extend(exported_receipts);
    }
    port.release(dlq, &release).await?;
    let (_, api_calls_total) = calls_since(&calls_before, &port.calls());
    Ok(ExportReport {
        dlq: dlq.to_owned(),
        path: path.display().to_string(),
        scanned: counts.scanned,
        exported,
        deleted,
        not_deleted,
        left_by_broker_limit,
        left_reason: first_left,
        left_unreadable: counts.refused_unreadable,
        unreadable_reason: first_unreadable,
        elapsed_secs: started.elapsed().as_secs_f64(),
        api_calls_total,
    })
}

/// What an import did.
#[derive(Debug, Clone, Serialize)]
pub struct ImportReport {
    /// The file.
    pub path: String,
    /// The destination.
    pub target: String,
    /// Messages sent and acknowledged.
    pub imported: u64,
    /// Wall time in seconds.
    pub elapsed_secs: f64,
    /// Broker API calls the run made.
    pub api_calls_total: u64,
}

/// A message of an export file as it is sent again: as it was, but for its FIFO
/// deduplication id. The original one was seen by the queue it was exported from (and SQS
/// silently drops a message whose id it saw in the last 5 minutes, while answering that it
/// took it): `export --delete` then `import` to the same FIFO DLQ lost every letter. A new id
/// derived from the old one (or from the body) keeps a second import of the same file within
/// those 5 minutes from sending copies.
fn import_outgoing(m: &DlqMessage) -> Outgoing {
    let mut out = m.to_outgoing();
    let seen = out.dedup_id.as_deref().unwrap_or(&out.body);
    out.dedup_id = Some(hex::encode(Sha256::digest(
        format!("spillway-import:{seen}").as_bytes(),
    )));
    out
}

/// A bad file line's error with what happened to the import.
fn noting(e: DlqError, what: &str) -> DlqError {
    match e {
        DlqError::Invalid(m) => DlqError::Invalid(format!("{m}; {what}")),
        other => other,
    }
}

/// Sends every message of an export file to `target`, bodies, attributes and FIFO group ids
/// as they are, with new FIFO deduplication ids ([`import_outgoing`]); no replay counter, no
/// validation: the inverse of [`export`]; at most `rate_per_sec`.
///
/// The whole file is read once before anything is sent: a line that is not a message stops
/// the import with nothing sent, so the file can be mended and imported whole.
///
/// # Errors
/// [`DlqError`] naming the file line (nothing imported) or the refused message (the
/// messages before it were imported: the error says how many).
pub async fn import(
    port: &dyn DlqBroker,
    path: &Path,
    target: &Target,
    rate_per_sec: Option<f64>,
    progress: Option<Progress>,
) -> Result<ImportReport, DlqError> {
    if let Some(r) = rate_per_sec {
        check_rate(r)?;
    }
    ExportReader::count(path).map_err(|e| noting(e, "nothing was imported"))?;
    let mut reader = ExportReader::open(path)?;
    let calls_before = port.calls();
    let started = Instant::now();
    let mut pacer = Pacer::new(rate_per_sec);
    let batch = batch_size(port, rate_per_sec);
    let mut counts = Counts::default();
    loop {
        // Only a file changed since it was checked fails here.
        let chunk = reader.next_chunk(batch).map_err(|e| {
            noting(
                e,
                &format!("{} messages were imported before it", counts.moved),
            )
        })?;
        if chunk.is_empty() {
            break;
        }
        if let Some(at) = pacer.reserve(chunk.len()) {
            tokio::time::sleep_until(at.into()).await;
        }
        let out: Vec<Outgoing> = chunk.iter().map(import_outgoing).collect();
        let sent = match target {
            Target::Queue(q) => port.send(q, &out).await,
            Target::Topic(t) => port.publish(t, &out).await,
            Target::SourceQueues => {
                return Err(DlqError::Invalid(
                    "import needs a named destination queue or topic".into(),
                ))
            }
        };
        let imported_before = counts.moved;
        let outcome = sent.map_err(|e| {
            DlqError::Invalid(format!(
                "{e}; {imported_before} messages were imported before this batch"
            ))
        })?;
        if let Some((i, reason)) = outcome.failed.first() {
            return Err(DlqError::Invalid(format!(
                "{} refused message {:?}: {reason}; {} of this batch and {imported_before} \
                 before it were imported",
                target.describe(),
                chunk[*i].message_id,
                chunk.len() - outcome.failed.len(),
            )));
        }
        counts.moved += chunk.len() as u64;
        if let Some(p) = &progress {
            p(&counts);
        }
    }
    let (_, api_calls_total) = calls_since(&calls_before, &port.calls());
    Ok(ImportReport {
        path: path.display().to_string(),
        target: target.describe(),
        imported: counts.moved,
        elapsed_secs: started.elapsed().as_secs_f64(),
        api_calls_total,
    })
}

/// Frees a place for [`ATTR_REPLAY_COUNT`] in a letter that has none and is full: the
/// previous failure's message, then its code, go (should it fail again, its new letter gets
/// fresh ones). A letter already holding 10 attributes got an 11th, which SQS refuses: it
/// stayed in the DLQ and could never be replayed.
fn make_room_for_the_replay_count(attributes: &mut BTreeMap<String, String>) {
    for stale in [
        crate::source::ATTR_ERROR_MESSAGE,
        crate::source::ATTR_ERROR_CODE,
    ] {
        if attributes.contains_key(ATTR_REPLAY_COUNT)
            || attributes.len() < crate::source::MAX_MESSAGE_ATTRIBUTES
        {
            return;
        }
        attributes.remove(stale);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use async_trait::async_trait;

    use super::*;
    use crate::dlq::embedded::EmbeddedDlq;
    use crate::dlq::{DlqMessage, DlqStats, LeasedMessage, RedriveTask, SendOutcome};
    use crate::embedded::{Broker, DEV_DLQ, DEV_QUEUE};

    /// The real embedded port whose deletes fail, as when the process dies or the broker
    /// becomes unreachable right after a send was acknowledged.
    #[derive(Debug)]
    struct DeleteFails(EmbeddedDlq);

    #[async_trait]
    impl DlqBroker for DeleteFails {
        fn kind(&self) -> &'static str {
            "embedded"
        }
        fn max_batch(&self) -> usize {
            self.0.max_batch()
        }
        async fn stats(&self, q: &str) -> Result<DlqStats, DlqError> {
            self.0.stats(q).await
        }
        async fn peek(&self, q: &str, n: usize) -> Result<Vec<DlqMessage>, DlqError> {
            self.0.peek(q, n).await
        }
        async fn lease(
            &self,
            q: &str,
            n: usize,
            d: Duration,
        ) -> Result<Vec<LeasedMessage>, DlqError> {
            self.0.lease(q, n, d).await
        }
        async fn release(&self, q: &str, r: &[DeliveryId]) -> Result<(), DlqError> {
            self.0.release(q, r).await
        }
        async fn delete(&self, q: &str, _r: &[DeliveryId]) -> Result<usize, DlqError> {
            Err(DlqError::Unreachable {
                operation: "delete".into(),
                resource: q.into(),
                detail: "injected".into(),
            })
        }
        async fn send(&self, q: &str, m: &[Outgoing]) -> Result<SendOutcome, DlqError> {
            self.0.send(q, m).await
        }
        async fn publish(&self, t: &str, m: &[Outgoing]) -> Result<SendOutcome, DlqError> {
            self.0.publish(t, m).await
        }
        async fn purge(&self, q: &str) -> Result<Option<u64>, DlqError> {
            self.0.purge(q).await
        }
        async fn source_queues(&self, d: &str) -> Result<Vec<String>, DlqError> {
            self.0.source_queues(d).await
        }
        async fn is_topic(&self, n: &str) -> Result<bool, DlqError> {
            self.0.is_topic(n).await
        }
        fn calls(&self) -> BTreeMap<&'static str, u64> {
            self.0.calls()
        }
        async fn start_redrive(
            &self,
            d: &str,
            t: Option<&str>,
            r: Option<u32>,
        ) -> Result<RedriveTask, DlqError> {
            self.0.start_redrive(d, t, r).await
        }
    }

    #[tokio::test]
    async fn a_delete_that_fails_after_the_send_stops_the_run_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let broker = Broker::open(dir.path().join("b.db")).unwrap();
        broker.dev_topology().await.unwrap();
        let port = EmbeddedDlq::new(broker);
        let letters: Vec<Outgoing> = (0..25)
            .map(|i| Outgoing {
                body: format!("letter {i}"),
                ..Outgoing::default()
            })
            .collect();
        port.send(DEV_DLQ, &letters).await.unwrap();
        let failing = DeleteFails(port.clone());
        let opts = ReplayOptions {
            rate_per_sec: Some(100.0), // batches of 10
            lease: Duration::from_secs(2),
            ..ReplayOptions::default()
        };
        let target = Target::Queue(DEV_QUEUE.into());
        let report = replay(&failing, DEV_DLQ, &target, &opts, None)
            .await
            .unwrap();
        assert!(report.error.as_deref().unwrap_or("").contains("injected"));
        assert_eq!(report.counts.moved, 0);
        assert_eq!(report.counts.sent_not_deleted, 10, "one batch was sent");
        // Sent and not deleted: in both. The rest was released, not lost.
        assert_eq!(port.stats(DEV_QUEUE).await.unwrap().total(), 10);
        let left = port.stats(DEV_DLQ).await.unwrap();
        assert_eq!(
            (left.total(), left.visible),
            (25, 15),
            "the sent 10 stay leased"
        );
        // Once the broker answers again, a rerun after the lease finishes the job; the 10 in
        // both are sent twice, which the store's event_id counts once.
        tokio::time::sleep(Duration::from_millis(2_100)).await;
        let again = replay(&port, DEV_DLQ, &target, &ReplayOptions::default(), None)
            .await
            .unwrap();
        assert_eq!(again.counts.moved, 25);
        assert_eq!(port.stats(DEV_DLQ).await.unwrap().total(), 0);
        assert_eq!(port.stats(DEV_QUEUE).await.unwrap().total(), 35);
    }

    /// A run longer than its lease says so: what it held came back during the run, which on
    /// SQS can end it before every letter was looked at, with nothing else to tell.
    #[tokio::test]
    async fn a_run_that_outlasts_its_lease_while_holding_letters_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let broker = Broker::open(dir.path().join("b.db")).unwrap();
        broker.dev_topology().await.unwrap();
        let port = EmbeddedDlq::new(broker);
        // Every other letter was replayed 3 times already: refused, and held to the end.
        let letters: Vec<Outgoing> = (0..30)
            .map(|i| Outgoing {
                body: format!("letter {i}"),
                attributes: if i % 2 == 0 {
                    BTreeMap::new()
                } else {
                    BTreeMap::from([(ATTR_REPLAY_COUNT.to_owned(), "3".to_owned())])
                },
                ..Outgoing::default()
            })
            .collect();
        let target = Target::Queue(DEV_QUEUE.into());
        for (lease_ms, lapsed) in [(300, true), (600_000, false)] {
            port.purge(DEV_DLQ).await.unwrap();
            port.send(DEV_DLQ, &letters).await.unwrap();
            let opts = ReplayOptions {
                rate_per_sec: Some(20.0),
                lease: Duration::from_millis(lease_ms),
                ..ReplayOptions::default()
            };
            let report = replay(&port, DEV_DLQ, &target, &opts, None).await.unwrap();
            assert_eq!(report.counts.moved, 15);
            assert_eq!(report.counts.refused_max_replays, 15);
            assert!(report.elapsed_secs > 0.3, "{}", report.elapsed_secs);
            assert_eq!(
                report.lease_lapsed, lapsed,
                "lease {lease_ms} ms: {report:?}"
            );
        }
    }

    #[tokio::test]
    async fn the_loop_guard_counts_the_replays_inside_an_sns_notification() {
        let dir = tempfile::tempdir().unwrap();
        let broker = Broker::open(dir.path().join("b.db")).unwrap();
        broker.dev_topology().await.unwrap();
        let port = EmbeddedDlq::new(broker);
        // The DLQ of an SNS subscription without raw delivery: the counter is only inside.
        let wrapped = |n: u32| Outgoing {
            body: serde_json::json!({
                "Type": "Notification", "MessageId": format!("m{n}"), "Message": "{}",
                "MessageAttributes": {
                    ATTR_REPLAY_COUNT: {"Type": "String", "Value": n.to_string()}
                }
            })
            .to_string(),
            ..Outgoing::default()
        };
        port.send(DEV_DLQ, &[wrapped(3), wrapped(1)]).await.unwrap();
        let target = Target::Queue(DEV_QUEUE.into());
        let report = replay(&port, DEV_DLQ, &target, &ReplayOptions::default(), None)
            .await
            .unwrap();
        assert_eq!(report.counts.refused_max_replays, 1, "{:?}", report.counts);
        assert_eq!(report.counts.moved, 1);
        let moved = port
            .lease(DEV_QUEUE, 10, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(moved.len(), 1);
        assert!(moved[0].message.body.contains("m1"));
        assert_eq!(moved[0].message.attributes[ATTR_REPLAY_COUNT], "2");
    }

    #[test]
    fn the_pacer_spaces_batches_and_makes_up_at_most_a_second() {
        let mut p = Pacer::new(Some(100.0));
        let t0 = p.reserve(10).unwrap();
        let t1 = p.reserve(10).unwrap();
        assert_eq!(t1 - t0, Duration::from_millis(100));
        // Pretend the sender stalled for 5 s: the schedule restarts no more than 1 s back.
        p.next = Some(Instant::now().checked_sub(Duration::from_secs(5)).unwrap());
        let late = p.reserve(10).unwrap();
        let behind = Instant::now() - late;
        assert!(behind <= CATCH_UP + Duration::from_millis(50), "{behind:?}");
        assert!(Pacer::new(None).reserve(10).is_none());
    }

    #[test]
    fn a_rate_too_small_to_schedule_neither_panics_nor_passes_the_check() {
        for tiny in [1e-20, 5e-324] {
            let mut p = Pacer::new(Some(tiny));
            let t0 = p.reserve(1).unwrap();
            let t1 = p.reserve(1).unwrap();
            assert_eq!(t1 - t0, MAX_PACER_STEP, "{tiny}");
        }
        for tiny in [1e-20, 5e-324, 0.0009] {
            let err = check_rate(tiny).unwrap_err().to_string();
            assert!(err.contains("at least 0.001"), "{err}");
        }
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(check_rate(bad).is_err(), "{bad}");
        }
        check_rate(MIN_RATE_PER_SEC).unwrap();
        check_rate(200.0).unwrap();
    }

    #[tokio::test]
    async fn a_replay_at_a_tiny_rate_is_refused_before_it_starts() {
        let dir = tempfile::tempdir().unwrap();
        let broker = Broker::open(dir.path().join("b.db")).unwrap();
        broker.dev_topology().await.unwrap();
        let port = EmbeddedDlq::new(broker);
        port.send(DEV_DLQ, &[Outgoing::default()]).await.unwrap();
        let opts = ReplayOptions {
            rate_per_sec: Some(1e-20),
            ..ReplayOptions::default()
        };
        let target = Target::Queue(DEV_QUEUE.into());
        let err = replay(&port, DEV_DLQ, &target, &opts, None)
            .await
            .unwrap_err();
        assert!(matches!(err, DlqError::Invalid(_)), "{err}");
        assert_eq!(port.stats(DEV_DLQ).await.unwrap().visible, 1, "untouched");
    }
}
