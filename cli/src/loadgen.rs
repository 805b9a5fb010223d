//! `spillway loadgen`: synthetic load against an ingest endpoint.
//!
//! `--concurrency` workers share one HTTP client. Each builds its batches from its own
//! [`SyntheticEvents`] generator (seeded from the run seed plus the worker number, so ids do
//! not collide across workers or runs) and posts them as JSON arrays. With `--rate`, batches
//! follow one global schedule (batch `k` is due when the target rate, burst included, has
//! produced `k × batch_size` events); a worker that falls behind sends at once, so the
//! schedule catches up as far as the concurrency allows. With `--rate 0`, workers send as
//! fast as the server answers.
//!
//! `429` and `503` are retried after their `Retry-After` (capped), at most `--max-retries`
//! times. With `--duplicate-fraction`, a batch answered `202` is sent again whole, as a
//! client does when the response was lost; its ids are written to `--ids-out` only once.
//!
//! Ctrl-C or SIGTERM ends a run early: no batch starts after it and no refusal is retried,
//! the requests in flight are answered, their acknowledged ids written, and the report
//! printed. A second signal quits at once.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};
use shared::settings::shutdown_signal;
use shared::synthetic::SyntheticEvents;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Options of `spillway loadgen` (boxed: the other subcommands' options are small).
#[derive(Debug, Args)]
pub(crate) struct LoadgenArgs {
    #[command(flatten)]
    options: Box<Options>,
}

/// The flags themselves.
#[derive(Debug, Args)]
struct Options {
    /// Ingest endpoint to post batches to (an http:// or https:// URL).
    #[arg(long, default_value = "http://127.0.0.1:8080/v1/events", value_parser = parse_url)]
    url: String,

    /// API key, sent as `Authorization: Bearer <key>`.
    #[arg(long, env = "SPILLWAY_API_KEY", hide_env_values = true)]
    api_key: Option<String>,

    /// File holding the API key (surrounding whitespace is ignored); wins over --api-key and
    /// SPILLWAY_API_KEY.
    #[arg(long)]
    api_key_file: Option<PathBuf>,

    /// Target events per second across all workers; 0 sends as fast as the server answers.
    #[arg(long, default_value_t = 0)]
    rate: u64,

    /// How long to send, e.g. `10s`, `500ms`, `2m` (requests in flight then finish).
    #[arg(long, default_value = "10s", value_parser = parse_run_length)]
    duration: Duration,

    /// Events per request (1 to 1000, the ingest default limit).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..=1000))]
    batch_size: u16,

    /// Requests in flight at once.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..))]
    concurrency: u16,

    /// Fraction of events made invalid (a lower-case currency), between 0 and 1.
    #[arg(long, default_value_t = 0.0, value_parser = parse_fraction)]
    invalid_fraction: f64,

    /// Fraction of batches answered 202 that are sent again whole (a client retry after a
    /// lost response), between 0 and 1.
    #[arg(long, default_value_t = 0.0, value_parser = parse_fraction)]
    duplicate_fraction: f64,

    /// Multiply the rate for a while in the middle of the run, e.g. `20x:10s` (needs `--rate`).
    #[arg(long, value_parser = parse_burst)]
    burst: Option<Burst>,

    /// Write every event id acknowledged in a 202 (minus the rejected ones), one per line.
    #[arg(long)]
    ids_out: Option<PathBuf>,

    /// Write every event acknowledged in a 202 (minus the rejected ones) as sent, one JSON
    /// object per line: what a check of the store's content compares with.
    #[arg(long)]
    events_out: Option<PathBuf>,

    /// Print the report as JSON instead of text.
    #[arg(long)]
    json: bool,

    /// Retries of a request answered 429 or 503.
    #[arg(long, default_value_t = 3)]
    max_retries: u32,

    /// Longest wait honoured from a `Retry-After`, e.g. `5s`.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    max_retry_wait: Duration,

    /// Timeout of one request, e.g. `10s`.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,

    /// Seed of the synthetic events (default: random); the same seed resends the same ids.
    #[arg(long)]
    seed: Option<u64>,

    /// Number of distinct advertisers the events spread over.
    #[arg(long, default_value_t = 50)]
    advertisers: u64,
}

/// A rate multiplier held for a while in the middle of the run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Burst {
    factor: f64,
    length: Duration,
}

/// An endpoint checked before anything is sent: without it a typo (no scheme, say) fails
/// every request at once and the run ends saying no request got an answer.
fn parse_url(raw: &str) -> Result<String, String> {
    let url = reqwest::Url::parse(raw.trim())
        .map_err(|e| format!("{raw:?} is not a URL ({e}); e.g. http://127.0.0.1:8080/v1/events"))?;
    match url.scheme() {
        "http" | "https" => Ok(url.to_string()),
        other => Err(format!(
            "{raw:?} has scheme {other:?}; use http:// or https://, e.g. http://127.0.0.1:8080/v1/events"
        )),
    }
}

/// The longest run.
const MAX_RUN: Duration = Duration::from_secs(30 * 24 * 3600);

/// A run's length: a duration longer than zero (a zero run sends nothing), at most 30 days.
fn parse_run_length(raw: &str) -> Result<Duration, String> {
    let d = parse_duration(raw)?;
    if d.is_zero() {
        return Err(format!("{raw:?}: a run must last longer than zero"));
    }
    // The run's deadline is computed from a clock instant: far enough out, that overflowed
    // and loadgen panicked.
    if d > MAX_RUN {
        return Err(format!("{raw:?}: a run lasts at most 30 days"));
    }
    Ok(d)
}

fn parse_duration(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let split = raw
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(raw.len());
    let (number, unit) = raw.split_at(split);
    let n: f64 = number
        .parse()
        .map_err(|_| format!("{raw:?} is not a duration such as 10s, 500ms or 2m"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(format!(
                "unknown unit {unit:?} in {raw:?}; use ms, s, m or h"
            ))
        }
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{raw:?}: {e}"))
}

fn parse_fraction(raw: &str) -> Result<f64, String> {
    match raw.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("{raw:?} is not a fraction between 0 and 1")),
    }
}

fn parse_burst(raw: &str) -> Result<Burst, String> {
    let bad = || format!("{raw:?} is not a burst such as 20x:10s");
    let (factor, length) = raw.split_once(':').ok_or_else(bad)?;
    let factor: f64 = factor
        .trim()
        .strip_suffix(['x', 'X'])
        .ok_or_else(bad)?
        .parse()
        .map_err(|_| bad())?;
    if !(factor.is_finite() && factor > 0.0) {
        return Err(bad());
    }
    Ok(Burst {
        factor,
        length: parse_duration(length)?,
    })
}

/// When each batch is due: the inverse of "events the target rate has produced by time t".
#[derive(Debug, Clone, Copy)]
struct Schedule {
    /// Base events per second.
    rate: f64,
    /// Burst window `[start, end)` in seconds from the start, and its multiplier.
    burst: Option<(f64, f64, f64)>,
    /// Run length in seconds.
    duration: f64,
}

impl Schedule {
    /// Seconds after the start at which `events` events are due, or `None` past the run.
    fn due_secs(&self, events: f64) -> Option<f64> {
        let t = match self.burst {
            None => events / self.rate,
            Some((start, end, factor)) => {
                let before = self.rate * start;
                let during = self.rate * factor * (end - start);
                if events < before {
                    events / self.rate
                } else if events < before + during {
                    start + (events - before) / (self.rate * factor)
                } else {
                    end + (events - before - during) / self.rate
                }
            }
        };
        (t < self.duration).then_some(t)
    }
}

/// What the workers share.
#[derive(Debug)]
struct Shared {
    client: reqwest::Client,
    url: String,
    auth: HeaderValue,
    batch_size: usize,
    invalid_fraction: f64,
    duplicate_fraction: f64,
    max_retries: u32,
    max_retry_wait: Duration,
    schedule: Option<Schedule>,
    start: Instant,
    deadline: Instant,
    next_batch: AtomicU64,
    ids: Option<mpsc::UnboundedSender<Vec<String>>>,
    /// Where the acknowledged events go, as JSON lines.
    events: Option<mpsc::UnboundedSender<Vec<String>>>,
    /// Cancelled by Ctrl-C or SIGTERM: no new batch starts, retries stop, and the requests in
    /// flight finish so their answers (and acknowledged ids) are kept.
    stop: CancellationToken,
}

/// Counters of one worker, merged at the end.
#[derive(Debug, Default)]
struct Stats {
    requests: u64,
    events_sent: u64,
    invalid_sent: u64,
    accepted: u64,
    rejected: u64,
    retries: u64,
    duplicate_batches: u64,
    /// 202s whose body was not the API's report: their events are all counted accepted.
    unreadable_202: u64,
    by_status: BTreeMap<u16, u64>,
    connection_errors: u64,
    timeouts: u64,
    latencies_us: Vec<u64>,
}

impl Stats {
    fn merge(&mut self, other: Stats) {
        self.requests += other.requests;
        self.events_sent += other.events_sent;
        self.invalid_sent += other.invalid_sent;
        self.accepted += other.accepted;
        self.rejected += other.rejected;
        self.retries += other.retries;
        self.duplicate_batches += other.duplicate_batches;
        self.unreadable_202 += other.unreadable_202;
        for (status, n) in other.by_status {
            *self.by_status.entry(status).or_default() += n;
        }
        self.connection_errors += other.connection_errors;
        self.timeouts += other.timeouts;
        self.latencies_us.extend(other.latencies_us);
    }
}

/// The part of a 202/400 body the load generator reads.
#[derive(Debug, Deserialize)]
struct IngestReport {
    accepted: u64,
    #[serde(default)]
    rejected: Vec<Rejected>,
}

#[derive(Debug, Deserialize)]
struct Rejected {
    index: usize,
}

/// How a request ended after its retries.
enum Outcome {
    /// The server answered (the last answer when retries ran out).
    Answered {
        status: StatusCode,
        report: Option<IngestReport>,
    },
    /// No answer: connection refused or reset, or a timeout.
    Failed,
}

/// Runs the load and prints the report.
pub(crate) async fn run(args: LoadgenArgs) -> anyhow::Result<()> {
    let args = *args.options;
    // The file wins: with SPILLWAY_API_KEY exported (as a shell set up for the API often
    // is), `--api-key-file` used to be refused as conflicting with it.
    let key = match (&args.api_key, &args.api_key_file) {
        (_, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("reading the API key from {}", path.display()))?
            .trim()
            .to_owned(),
        (Some(key), None) => key.trim().to_owned(),
        (None, None) => {
            bail!("an API key is required: --api-key, --api-key-file or SPILLWAY_API_KEY")
        }
    };
    let auth = HeaderValue::try_from(format!("Bearer {key}"))
        .context("the API key is not a valid header value")?;
    if args.burst.is_some() && args.rate == 0 {
        bail!("--burst multiplies --rate; give a --rate above 0");
    }
    let duration_secs = args.duration.as_secs_f64();
    let schedule = (args.rate > 0).then(|| Schedule {
        // u64 → f64 loses precision only past 2^53 events/s.
        rate: args.rate as f64,
        burst: args.burst.map(|b| {
            let length = b.length.as_secs_f64().min(duration_secs);
            let start = (duration_secs - length) / 2.0;
            (start, start + length, b.factor)
        }),
        duration: duration_secs,
    });
    let concurrency = usize::from(args.concurrency);
    let client = reqwest::Client::builder()
        .timeout(args.timeout)
        .pool_max_idle_per_host(concurrency)
        .tcp_nodelay(true)
        .build()
        .context("building the HTTP client")?;

    let (ids_tx, ids_writer) = line_writer(args.ids_out.as_deref())?;
    let (events_tx, events_writer) = line_writer(args.events_out.as_deref())?;
    let seed = args.seed.unwrap_or_else(|| rand::rng().random());
    let start = Instant::now();
    let shared = Arc::new(Shared {
        client,
        url: args.url.clone(),
        auth,
        batch_size: usize::from(args.batch_size),
        invalid_fraction: args.invalid_fraction,
        duplicate_fraction: args.duplicate_fraction,
        max_retries: args.max_retries,
        max_retry_wait: args.max_retry_wait,
        schedule,
        start,
        deadline: start + args.duration,
        next_batch: AtomicU64::new(0),
        ids: ids_tx,
        events: events_tx,
        stop: CancellationToken::new(),
    });
    let stop = shared.stop.clone();
    let signals = tokio::spawn(async move {
        shutdown_signal().await;
        eprintln!(
            "loadgen: stopping; waiting for the requests in flight to be answered \
             (a second signal quits at once, and their ids are not written)"
        );
        stop.cancel();
        shutdown_signal().await;
        std::process::exit(130);
    });
    let workers: Vec<_> = (0..concurrency)
        .map(|i| {
            let shared = Arc::clone(&shared);
            let worker_seed = seed.wrapping_add(i as u64);
            tokio::spawn(worker(shared, worker_seed, args.advertisers))
        })
        .collect();
    let mut stats = Stats::default();
    for w in workers {
        stats.merge(w.await.context("a load worker panicked")?);
    }
    let elapsed = start.elapsed();
    let stopped_early = shared.stop.is_cancelled();
    // Dropping the last sender lets the id writer finish.
    drop(shared);
    for (writer, flag) in [(ids_writer, "--ids-out"), (events_writer, "--events-out")] {
        if let Some(writer) = writer {
            writer
                .await
                .with_context(|| format!("the writer of {flag} panicked"))?
                .with_context(|| format!("writing {flag}"))?;
        }
    }
    report(&args, seed, &mut stats, elapsed)?;
    signals.abort();
    if stopped_early {
        eprintln!(
            "loadgen: stopped early by a signal after {:.1} s; the report covers what was sent",
            elapsed.as_secs_f64()
        );
    }
    if stats.by_status.is_empty() {
        bail!("no request got an answer from {}", args.url);
    }
    // A run where every answer was a refusal (a wrong key, the broker down) is a failure,
    // not a figure: a script or a CI step must not pass on it. Unless it sent only invalid
    // events on purpose (`--invalid-fraction 1`).
    if stats.accepted == 0 && args.invalid_fraction < 1.0 {
        bail!(
            "no event was accepted by {}{}",
            args.url,
            refusal_hint(&stats.by_status)
        );
    }
    Ok(())
}

/// What to check when every answer of a run had the same refusing status, the usual mistakes
/// of a first run (a URL without the endpoint's path, a wrong key); otherwise a pointer to
/// the report's answers by status.
fn refusal_hint(by_status: &BTreeMap<u16, u64>) -> &'static str {
    match by_status.keys().copied().collect::<Vec<_>>().as_slice() {
        [404 | 405] => {
            ": every answer was 404 or 405, so the URL is not the ingest endpoint: give --url \
             its full path, POST /v1/events (http://127.0.0.1:8080/v1/events with `spillway dev`)"
        }
        [401] => {
            ": every answer was 401, so the key was refused: check --api-key, --api-key-file \
             or SPILLWAY_API_KEY (`spillway dev` writes its key to .spillway/dev-api-key)"
        }
        _ => " (answers by status above)",
    }
}

/// A channel whose lines a blocking task writes to `path`, when given.
type LineWriter = (
    Option<mpsc::UnboundedSender<Vec<String>>>,
    Option<tokio::task::JoinHandle<std::io::Result<()>>>,
);

fn line_writer(path: Option<&std::path::Path>) -> anyhow::Result<LineWriter> {
    let Some(path) = path else {
        return Ok((None, None));
    };
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let (tx, rx) = mpsc::unbounded_channel();
    Ok((
        Some(tx),
        Some(tokio::task::spawn_blocking(move || write_lines(file, rx))),
    ))
}

fn write_lines(
    file: std::fs::File,
    mut rx: mpsc::UnboundedReceiver<Vec<String>>,
) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(file);
    while let Some(lines) = rx.blocking_recv() {
        for line in lines {
            out.write_all(line.as_bytes())?;
            out.write_all(b"\n")?;
        }
    }
    out.flush()
}

/// Keeps the items whose position is not in `rejected` (sorted).
fn without_rejected(items: &mut Vec<String>, rejected: &[usize]) {
    let mut index = 0;
    items.retain(|_| {
        let keep = rejected.binary_search(&index).is_err();
        index += 1;
        keep
    });
}

async fn worker(shared: Arc<Shared>, seed: u64, advertisers: u64) -> Stats {
    let mut events = SyntheticEvents::new(seed, advertisers);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut stats = Stats::default();
    while !shared.stop.is_cancelled() {
        let k = shared.next_batch.fetch_add(1, Ordering::Relaxed);
        match shared.schedule {
            Some(schedule) => {
                // Batch k is due once the schedule has produced k batches' worth of events.
                let Some(due) = schedule.due_secs(k as f64 * shared.batch_size as f64) else {
                    break;
                };
                let at = shared.start + Duration::from_secs_f64(due);
                if shared
                    .stop
                    .run_until_cancelled(tokio::time::sleep_until(at))
                    .await
                    .is_none()
                {
                    break;
                }
            }
            None if Instant::now() >= shared.deadline => break,
            None => {}
        }
        let (body, ids, sent) = build_batch(&shared, &mut events, &mut rng, &mut stats);
        let outcome = send(&shared, &body, &mut stats).await;
        let acknowledged =
            matches!(outcome, Outcome::Answered { status, .. } if status == StatusCode::ACCEPTED);
        if let (true, Outcome::Answered { report, .. }) = (acknowledged, outcome) {
            // A 202 whose body is not the API's report (a proxy's page): every event counts
            // as acknowledged, so a check of the store can only see too much lost, not too
            // little.
            let mut rejected: Vec<usize> = report
                .map(|r| r.rejected.iter().map(|r| r.index).collect())
                .unwrap_or_default();
            rejected.sort_unstable();
            // The writers only stop when every sender is gone; a send cannot fail before.
            for (tx, mut lines) in [(&shared.ids, ids), (&shared.events, sent)] {
                if let (Some(tx), Some(lines)) = (tx, lines.as_mut()) {
                    without_rejected(lines, &rejected);
                    let _ = tx.send(std::mem::take(lines));
                }
            }
        }
        if acknowledged && !shared.stop.is_cancelled() && rng.random_bool(shared.duplicate_fraction)
        {
            stats.duplicate_batches += 1;
            send(&shared, &body, &mut stats).await;
        }
    }
    stats
}

/// A JSON array body and, when `--ids-out` or `--events-out` is set, the ids and the events
/// (JSON) in it by position.
fn build_batch(
    shared: &Shared,
    events: &mut SyntheticEvents,
    rng: &mut StdRng,
    stats: &mut Stats,
) -> (Bytes, Option<Vec<String>>, Option<Vec<String>>) {
    let mut batch = Vec::with_capacity(shared.batch_size);
    let mut ids = shared
        .ids
        .as_ref()
        .map(|_| Vec::with_capacity(shared.batch_size));
    for _ in 0..shared.batch_size {
        let mut event = events.event();
        if let Some(ids) = ids.as_mut() {
            ids.push(
                event
                    .get("event_id")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
            );
        }
        if shared.invalid_fraction > 0.0 && rng.random_bool(shared.invalid_fraction) {
            event["currency"] = json!("usd");
            stats.invalid_sent += 1;
        }
        batch.push(event);
    }
    let sent = shared
        .events
        .as_ref()
        .map(|_| batch.iter().map(Value::to_string).collect());
    // Serialising plain JSON values into a Vec cannot fail.
    let body = serde_json::to_vec(&batch).unwrap_or_default();
    (Bytes::from(body), ids, sent)
}

/// Posts one body, retrying 429/503 after their `Retry-After`.
async fn send(shared: &Shared, body: &Bytes, stats: &mut Stats) -> Outcome {
    let mut attempt = 0;
    loop {
        stats.requests += 1;
        stats.events_sent += shared.batch_size as u64;
        let started = Instant::now();
        let response = shared
            .client
            .post(&shared.url)
            .header(AUTHORIZATION, shared.auth.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(body.clone())
            .send()
            .await;
        let response = match response {
            Ok(r) => r,
            Err(e) => {
                stats.connection_errors += 1;
                stats.timeouts += u64::from(e.is_timeout());
                return Outcome::Failed;
            }
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let bytes = match response.bytes().await {
            Ok(b) => b,
            Err(e) => {
                stats.connection_errors += 1;
                stats.timeouts += u64::from(e.is_timeout());
                return Outcome::Failed;
            }
        };
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        stats.latencies_us.push(micros);
        *stats.by_status.entry(status.as_u16()).or_default() += 1;
        let retryable =
            status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE;
        if retryable && attempt < shared.max_retries && !shared.stop.is_cancelled() {
            attempt += 1;
            stats.retries += 1;
            let wait = retry_after
                .unwrap_or(Duration::from_secs(1))
                .min(shared.max_retry_wait);
            // Stopped while waiting: the refusal is the answer (nothing of it was accepted).
            if shared
                .stop
                .run_until_cancelled(tokio::time::sleep(wait))
                .await
                .is_some()
            {
                continue;
            }
        }
        let report = serde_json::from_slice::<IngestReport>(&bytes).ok();
        match &report {
            Some(r) => {
                stats.accepted += r.accepted;
                stats.rejected += r.rejected.len() as u64;
            }
            None if status == StatusCode::ACCEPTED => {
                stats.unreadable_202 += 1;
                stats.accepted += shared.batch_size as u64;
            }
            None => {}
        }
        return Outcome::Answered { status, report };
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn report(args: &Options, seed: u64, stats: &mut Stats, elapsed: Duration) -> anyhow::Result<()> {
    stats.latencies_us.sort_unstable();
    let lat = &stats.latencies_us;
    let ms = |us: u64| us as f64 / 1000.0;
    let (p50, p99, max) = (
        ms(percentile(lat, 0.50)),
        ms(percentile(lat, 0.99)),
        ms(lat.last().copied().unwrap_or_default()),
    );
    let secs = elapsed.as_secs_f64().max(f64::EPSILON);
    let accepted_eps = stats.accepted as f64 / secs;
    let sent_eps = stats.events_sent as f64 / secs;
    let by_status: BTreeMap<String, u64> = stats
        .by_status
        .iter()
        .map(|(s, n)| (s.to_string(), *n))
        .collect();
    let mut out = std::io::stdout().lock();
    if args.json {
        let doc = json!({
            "url": args.url,
            "seed": seed,
            "duration_secs": secs,
            "batch_size": args.batch_size,
            "concurrency": args.concurrency,
            "target_rate": args.rate,
            "requests": stats.requests,
            "retries": stats.retries,
            "duplicate_batches": stats.duplicate_batches,
            "unreadable_202": stats.unreadable_202,
            "events_sent": stats.events_sent,
            "invalid_sent": stats.invalid_sent,
            "accepted": stats.accepted,
            "rejected": stats.rejected,
            "responses_by_status": by_status,
            "connection_errors": stats.connection_errors,
            "timeouts": stats.timeouts,
            "accepted_events_per_sec": accepted_eps,
            "sent_events_per_sec": sent_eps,
            "latency_ms": {"p50": p50, "p99": p99, "max": max},
        });
        writeln!(out, "{doc}")?;
        return Ok(());
    }
    let statuses = if by_status.is_empty() {
        "none".to_owned()
    } else {
        by_status
            .iter()
            .map(|(s, n)| format!("{s}: {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    writeln!(out, "target            {} (seed {seed})", args.url)?;
    writeln!(
        out,
        "run               {secs:.2} s, batch {}, concurrency {}, rate {}",
        args.batch_size,
        args.concurrency,
        if args.rate == 0 {
            "max".to_owned()
        } else {
            format!("{} events/s", args.rate)
        }
    )?;
    writeln!(
        out,
        "requests          {} ({} retries after 429/503, {} duplicate batches)",
        stats.requests, stats.retries, stats.duplicate_batches
    )?;
    writeln!(
        out,
        "events sent       {} ({} made invalid)",
        stats.events_sent, stats.invalid_sent
    )?;
    writeln!(out, "accepted          {}", stats.accepted)?;
    if stats.unreadable_202 > 0 {
        writeln!(
            out,
            "unreadable 202s   {} (not the API's report: all their events counted accepted)",
            stats.unreadable_202
        )?;
    }
    writeln!(out, "rejected          {}", stats.rejected)?;
    writeln!(out, "responses         {statuses}")?;
    writeln!(
        out,
        "connection errors {} ({} timeouts)",
        stats.connection_errors, stats.timeouts
    )?;
    writeln!(
        out,
        "achieved          {accepted_eps:.0} accepted events/s ({sent_eps:.0} sent events/s)"
    )?;
    writeln!(
        out,
        "latency           p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms ({} responses)",
        lat.len()
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_too_long_for_the_clock_is_refused_rather_than_panicking() {
        assert!(parse_run_length("720h").is_ok());
        let err = parse_run_length("99999999999999h").unwrap_err();
        assert!(err.contains("at most 30 days"), "{err}");
    }

    #[test]
    fn durations_fractions_and_bursts_parse() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_run_length("0s")
            .unwrap_err()
            .contains("longer than zero"));
        assert_eq!(parse_run_length("1s").unwrap(), Duration::from_secs(1));
    }

    #[test]
    fn an_endpoint_without_a_scheme_is_refused_before_sending() {
        let err = parse_url("localhost:8080/v1/events").unwrap_err();
        assert!(err.contains("http://"), "{err}");
        assert!(parse_url("127.0.0.1:8080/v1/events").is_err());
        assert_eq!(
            parse_url("http://127.0.0.1:8080/v1/events").unwrap(),
            "http://127.0.0.1:8080/v1/events"
        );
        assert!(parse_fraction("1.5").is_err());
        assert_eq!(
            parse_burst("20x:10s").unwrap(),
            Burst {
                factor: 20.0,
                length: Duration::from_secs(10)
            }
        );
        assert!(parse_burst("20:10s").is_err());
    }

    #[test]
    fn a_burst_in_the_middle_sends_its_extra_events_there() {
        let s = Schedule {
            rate: 100.0,
            burst: Some((4.0, 6.0, 10.0)),
            duration: 10.0,
        };
        // 400 events by t=4, then 2,000 more in the 2-second burst, then 100/s again.
        assert!((s.due_secs(400.0).unwrap() - 4.0).abs() < 1e-9);
        assert!((s.due_secs(1_400.0).unwrap() - 5.0).abs() < 1e-9);
        assert!((s.due_secs(2_400.0).unwrap() - 6.0).abs() < 1e-9);
        assert!((s.due_secs(2_700.0).unwrap() - 9.0).abs() < 1e-9);
        assert!(s.due_secs(2_800.0).is_none());
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), 50);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&[], 0.5), 0);
    }
}
