//! `spillway dlq …`: see what is in a dead-letter queue and why, and move it back safely,
//! selectively and at a controlled rate — on the embedded broker and on SQS/SNS, through the
//! one port in `shared::dlq`.
//!
//! Every subcommand prints for humans by default and one JSON object with `--json`; long runs
//! draw a progress bar on a terminal's stderr.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use shared::dlq::embedded::EmbeddedDlq;
use shared::dlq::inspect::{inspect, parse_duration, Filter, JsonMatch};
use shared::dlq::replay::{self, Counts, ReplayOptions, Target};
use shared::dlq::{now_ms, DlqBroker, DlqMessage, DEFAULT_MAX_REPLAYS};
use shared::embedded::{Broker, ATTR_SOURCE_QUEUE, DEV_DLQ};
use shared::event::ValidationPolicy;
use shared::settings::{BrokerKind, KafkaSettings, BROKER_DB};
use shared::source::ATTR_ERROR_CODE;

/// Replay loops when `--concurrency` is not given (a non-FIFO DLQ).
const DEFAULT_CONCURRENCY: usize = 4;

const EXAMPLES: &str = "\
Examples:
  spillway dlq stats                                   # embedded broker under ./.spillway
  spillway dlq peek -n 5
  spillway dlq replay --to source --error-code max_receives --dry-run
  spillway dlq replay --to source --type conversion --older-than 1h --rate 200 --max 5000
  spillway dlq replay --to topic:events --advertiser adv-1     # re-validated, re-fanned-out
  spillway dlq export --out dlq.ndjson --delete && spillway dlq import dlq.ndjson --to events-worker-dlq
  spillway dlq stats --broker aws --dlq https://sqs.eu-west-1.amazonaws.com/123/events-dlq
  spillway dlq redrive --broker aws --dlq \"$SPILLWAY_DLQ_URL\" --rate 100";

/// `spillway dlq` and its subcommands.
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES)]
pub(crate) struct DlqArgs {
    #[command(subcommand)]
    command: DlqCommand,
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// Depth (visible / in flight / delayed), oldest age, and counts by error code, event type
    /// and advertiser (from a sample on large queues, saying so).
    #[command(
        after_help = "Examples:\n  spillway dlq stats\n  spillway dlq stats --broker aws --dlq \"$SPILLWAY_DLQ_URL\" --json"
    )]
    Stats(StatsArgs),
    /// Show messages with attributes, receive count and decoded events, without consuming them.
    #[command(
        after_help = "Examples:\n  spillway dlq peek -n 3\n  spillway dlq peek --json | jq '.messages[].attributes'\n\nOn SQS a peek receives and releases at once: ApproximateReceiveCount goes up by one."
    )]
    Peek(PeekArgs),
    /// Write every message (body, attributes, ids) to an NDJSON file; --delete removes them
    /// from the DLQ only after the file is fsynced.
    #[command(
        after_help = "Examples:\n  spillway dlq export --out dlq.ndjson\n  spillway dlq export --out bad-clicks.ndjson --type click --error-code invalid_event --delete"
    )]
    Export(ExportArgs),
    /// Send the messages of an export file to a queue or topic, byte for byte.
    #[command(
        after_help = "Examples:\n  spillway dlq import dlq.ndjson --to events-worker-dlq\n  spillway dlq import dlq.ndjson --broker aws --to https://sqs.us-east-1.amazonaws.com/123/q --rate 100"
    )]
    Import(ImportArgs),
    /// Move dead letters back to their source queue, another queue or a topic: filtered,
    /// rate-limited, send first and delete after, with a replay counter against loops.
    #[command(
        after_help = "Examples:\n  spillway dlq replay --to source --dry-run\n  spillway dlq replay --to source --error-code max_receives --rate 200\n  spillway dlq replay --to topic:events --type conversion --match '$.campaign_id=cmp-7' --max 1000\n  spillway dlq replay --broker aws --dlq \"$SPILLWAY_DLQ_URL\" --to \"$SPILLWAY_TOPIC_ARN\" --concurrency 4\n\nSafety: a message is deleted from the DLQ only after the destination acknowledged it; a\nkilled run leaves every message in the DLQ, at the destination, or (sent, not yet deleted)\nin both, which the store counts once. Messages it does not move stay hidden for the run\n(--lease-secs) and are released at the end."
    )]
    Replay(ReplayArgs),
    /// SQS native redrive (StartMessageMoveTask): start it, see its status, or cancel it.
    #[command(
        args_conflicts_with_subcommands = true,
        after_help = "Examples:\n  spillway dlq redrive --broker aws --dlq \"$SPILLWAY_DLQ_URL\" --rate 100\n  spillway dlq redrive status --broker aws --dlq \"$SPILLWAY_DLQ_URL\"\n  spillway dlq redrive cancel --broker aws --dlq \"$SPILLWAY_DLQ_URL\"\n\nNative redrive cannot filter or dry-run, and does not serve DLQs of SNS subscriptions:\nuse `spillway dlq replay` for those."
    )]
    Redrive(RedriveArgs),
    /// Delete every message of the DLQ (needs --yes).
    #[command(
        after_help = "Examples:\n  spillway dlq export --out keep.ndjson && spillway dlq purge --yes"
    )]
    Purge(PurgeArgs),
}

/// Which broker and which DLQ; shared by every subcommand (the broker flags and variables
/// are those of `shared::settings::BrokerSettings`).
#[derive(Debug, Args)]
struct Common {
    /// Broker: embedded (SQLite under --data-dir), aws (SQS + SNS from the standard AWS
    /// configuration: AWS_ENDPOINT_URL, AWS_REGION, profiles) or kafka (the DLQ topic; what
    /// was replayed is tracked by --kafka-replay-group).
    #[arg(long, env = "SPILLWAY_BROKER", value_enum, default_value = "embedded")]
    broker: BrokerKind,

    /// Kafka: the workers' topic, where `replay --to source` sends.
    #[arg(long, env = "SPILLWAY_TOPIC", default_value = "events")]
    topic: String,

    #[command(flatten)]
    kafka: KafkaSettings,

    /// Directory of the embedded broker (broker.db).
    #[arg(long, env = "SPILLWAY_DATA_DIR", default_value = ".spillway")]
    data_dir: PathBuf,

    /// AWS: the workers' DLQ URL, used when --dlq is not given.
    #[arg(long, env = "SPILLWAY_DLQ_URL")]
    dlq_url: Option<String>,

    /// The DLQ: an embedded queue name, an SQS queue URL with --broker aws, or a topic with
    /// --broker kafka (default: events-worker-dlq, --dlq-url with aws, --kafka-dlq-topic with
    /// kafka).
    #[arg(long, env = "SPILLWAY_DLQ")]
    dlq: Option<String>,

    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct StatsArgs {
    #[command(flatten)]
    common: Common,

    /// Most messages read for the breakdowns by error code, type and advertiser.
    #[arg(long, default_value_t = 1000)]
    sample: usize,
}

#[derive(Debug, Args)]
struct PeekArgs {
    #[command(flatten)]
    common: Common,

    /// How many messages to show (oldest first on the embedded broker).
    #[arg(short = 'n', long = "count", default_value_t = 10, value_parser = shared::settings::at_least_one::<usize>)]
    n: usize,
}

/// `--type`, `--advertiser`, `--error-code`, `--older-than`, `--newer-than`, `--match`.
#[derive(Debug, Args)]
struct FilterArgs {
    /// Only messages holding an event of this type (repeatable: any of them).
    #[arg(long = "type", value_name = "TYPE")]
    types: Vec<String>,

    /// Only messages holding an event of this advertiser (repeatable).
    #[arg(long = "advertiser", value_name = "ID")]
    advertisers: Vec<String>,

    /// Only messages whose spillway-error-code is this (repeatable), e.g. max_receives,
    /// invalid_event, undecodable.
    #[arg(long = "error-code", value_name = "CODE")]
    error_codes: Vec<String>,

    /// Only messages at least this old (90s, 15m, 2h, 7d).
    #[arg(long, value_parser = parse_duration)]
    older_than: Option<Duration>,

    /// Only messages at most this old.
    #[arg(long, value_parser = parse_duration)]
    newer_than: Option<Duration>,

    /// Only messages with an event whose JSONPATH has VALUE, e.g. '$.campaign_id=cmp-1',
    /// '$.attributes.placement=top' (repeatable: all must hold; spaces around '=' are
    /// ignored).
    #[arg(long = "match", value_name = "JSONPATH=VALUE")]
    matches: Vec<String>,
}

impl FilterArgs {
    /// The filter, refusing one that can match nothing by its own terms: a misspelled type,
    /// or an age window that is empty. Either used to run and match nothing, without a word.
    fn filter(&self) -> anyhow::Result<Filter> {
        use shared::event::EventType;
        if let Some(bad) = self
            .types
            .iter()
            .find(|t| EventType::parse(t.as_str()).is_err())
        {
            let known: Vec<&str> = EventType::ALL.iter().map(|t| t.as_str()).collect();
            bail!(
                "--type {bad:?} is not an event type; use one of {}",
                known.join(", ")
            );
        }
        if let (Some(older), Some(newer)) = (self.older_than, self.newer_than) {
            if older > newer {
                bail!(
                    "--older-than {} and --newer-than {} select nothing: a letter cannot be at \
                     least {0} old and at most {1} old",
                    humantime_secs(older),
                    humantime_secs(newer)
                );
            }
        }
        Ok(Filter {
            types: self.types.clone(),
            advertisers: self.advertisers.clone(),
            error_codes: self.error_codes.clone(),
            older_than: self.older_than,
            newer_than: self.newer_than,
            matches: self
                .matches
                .iter()
                .map(|m| JsonMatch::parse(m))
                .collect::<Result<_, _>>()?,
        })
    }
}

#[derive(Debug, Args)]
struct ExportArgs {
    #[command(flatten)]
    common: Common,

    /// The NDJSON file to write. An existing file is refused (it may hold an earlier
    /// export, the only copy of what that export deleted) unless --force.
    #[arg(long)]
    out: PathBuf,

    /// Overwrite --out when it exists.
    #[arg(long)]
    force: bool,

    /// Delete the exported messages from the DLQ once the file is fsynced.
    #[arg(long)]
    delete: bool,

    #[command(flatten)]
    filter: FilterArgs,

    /// Most messages to export.
    #[arg(long)]
    max: Option<u64>,

    /// How long messages stay hidden while the export runs (seconds).
    #[arg(long, default_value_t = 600, value_parser = shared::settings::at_least_one::<u64>)]
    lease_secs: u64,
}

#[derive(Debug, Args)]
struct ImportArgs {
    #[command(flatten)]
    common: Common,

    /// The NDJSON file written by `spillway dlq export`.
    file: PathBuf,

    /// Destination: a queue (name / SQS URL) or a topic (name / SNS ARN); `queue:NAME` or
    /// `topic:NAME` when an embedded name is both.
    #[arg(long)]
    to: String,

    /// Most messages per second (e.g. 200 or 200/s).
    #[arg(long, value_parser = parse_rate)]
    rate: Option<f64>,
}

#[derive(Debug, Args)]
struct ReplayArgs {
    #[command(flatten)]
    common: Common,

    /// Destination: `source` (the queue that dead-lettered them), a queue (name / SQS URL) or
    /// a topic (name / SNS ARN; ingest validation runs again); `queue:NAME` / `topic:NAME`
    /// when an embedded name is both.
    #[arg(long)]
    to: String,

    #[command(flatten)]
    filter: FilterArgs,

    /// Most messages per second sent (e.g. 200 or 200/s); default: as fast as it goes.
    #[arg(long, value_parser = parse_rate)]
    rate: Option<f64>,

    /// Most messages to move.
    #[arg(long)]
    max: Option<u64>,

    /// Concurrent lease → send → delete loops (default: 4, or 1 for a FIFO queue, which keeps
    /// the order within a message group).
    #[arg(long, value_parser = shared::settings::at_least_one::<usize>)]
    concurrency: Option<usize>,

    /// Change nothing: report what would move (messages are leased and released).
    #[arg(long)]
    dry_run: bool,

    /// Refuse messages already replayed this many times (spillway-replay-count).
    #[arg(long, default_value_t = DEFAULT_MAX_REPLAYS, value_parser = shared::settings::at_least_one::<u32>)]
    max_replays: u32,

    /// How long messages stay hidden while the run decides and moves them (seconds); unmoved
    /// ones are released at the end, or come back by themselves after this.
    #[arg(long, default_value_t = 600, value_parser = shared::settings::at_least_one::<u64>)]
    lease_secs: u64,

    /// Topic replay: check the event schema only, not the occurred_at window (for events
    /// older than ingest's --max-age-secs).
    #[arg(long)]
    no_time_window: bool,

    /// FIFO destination: refuse FIFO messages younger than this (seconds), which SQS would drop
    /// as duplicates inside its 5-minute deduplication window. 0 turns the guard off.
    #[arg(long, default_value_t = 360)]
    fifo_dedup_guard_secs: u64,
}

#[derive(Debug, Args)]
struct RedriveArgs {
    #[command(subcommand)]
    action: Option<RedriveAction>,

    #[command(flatten)]
    common: Common,

    /// Destination queue URL (default: each message's original source queue).
    #[arg(long)]
    to: Option<String>,

    /// Most messages per second (1–500; default: SQS's own pace).
    #[arg(long, value_parser = parse_rate)]
    rate: Option<f64>,
}

#[derive(Debug, Subcommand)]
enum RedriveAction {
    /// The DLQ's native redrive tasks, most recent first.
    Status(CommonOnly),
    /// Cancel the running native redrive task.
    Cancel(CommonOnly),
}

#[derive(Debug, Args)]
struct CommonOnly {
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, Args)]
struct PurgeArgs {
    #[command(flatten)]
    common: Common,

    /// Confirm: delete every message of the DLQ.
    #[arg(long)]
    yes: bool,
}

/// A duration as the filters take it (`90s`, `15m`, `2h`, `7d`), in its largest whole unit.
fn humantime_secs(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => "0s".into(),
        _ if s.is_multiple_of(86_400) => format!("{}d", s / 86_400),
        _ if s.is_multiple_of(3_600) => format!("{}h", s / 3_600),
        _ if s.is_multiple_of(60) => format!("{}m", s / 60),
        _ => format!("{s}s"),
    }
}

fn parse_rate(raw: &str) -> Result<f64, String> {
    let n = raw.trim().trim_end_matches("/s");
    match n.parse::<f64>() {
        Ok(r) if r.is_finite() && r >= replay::MIN_RATE_PER_SEC => Ok(r),
        Ok(r) if r.is_finite() && r > 0.0 => Err(format!(
            "{raw:?} is too slow: the slowest rate is {} messages per second (one every \
             1,000 s)",
            replay::MIN_RATE_PER_SEC
        )),
        _ => Err(format!("{raw:?} is not a rate such as 200 or 200/s")),
    }
}

/// The opened port and the DLQ address.
struct Opened {
    port: Arc<dyn DlqBroker>,
    dlq: String,
}

async fn open(common: &Common) -> anyhow::Result<Opened> {
    match common.broker {
        BrokerKind::Embedded => {
            let db = common.data_dir.join(BROKER_DB);
            if !db.exists() {
                bail!(
                    "no embedded broker at {} (pass --data-dir, or --broker aws)",
                    db.display()
                );
            }
            let broker = Broker::open(&db).context("opening the embedded broker")?;
            Ok(Opened {
                port: Arc::new(EmbeddedDlq::new(broker)),
                dlq: common.dlq.clone().unwrap_or_else(|| DEV_DLQ.to_owned()),
            })
        }
        BrokerKind::Kafka => {
            let k = &common.kafka;
            // Replays and imports produce with the operator's producer flags (delivery
            // timeout, compression, linger, batch size), as ingest does.
            let producer = k.producer_config("-")?;
            Ok(Opened {
                port: Arc::new(shared::kafka::dlq::KafkaDlq::with_producer(
                    &producer,
                    k.kafka_replay_group.clone(),
                    Some(common.topic.clone()),
                )?),
                dlq: common
                    .dlq
                    .clone()
                    .unwrap_or_else(|| k.kafka_dlq_topic.clone()),
            })
        }
        BrokerKind::Aws => {
            let dlq = common
                .dlq
                .clone()
                .or_else(|| common.dlq_url.clone())
                .context("--broker aws needs the DLQ's queue URL: --dlq URL (or --dlq-url / SPILLWAY_DLQ_URL)")?;
            let config = shared::aws::load_config().await;
            Ok(Opened {
                port: Arc::new(shared::dlq::sqs::SqsDlq::new(&config)),
                dlq,
            })
        }
    }
}

/// Resolves `--to`: `source`, `queue:NAME`, `topic:NAME`, or a name the broker knows.
async fn resolve_target(port: &dyn DlqBroker, dlq: &str, to: &str) -> anyhow::Result<Target> {
    if let Some(q) = to.strip_prefix("queue:") {
        return Ok(Target::Queue(q.to_owned()));
    }
    if let Some(t) = to.strip_prefix("topic:") {
        return Ok(Target::Topic(t.to_owned()));
    }
    if to != "source" {
        return Ok(if port.is_topic(to).await? {
            Target::Topic(to.to_owned())
        } else {
            Target::Queue(to.to_owned())
        });
    }
    let sources = port.source_queues(dlq).await?;
    if let [one] = sources.as_slice() {
        return Ok(Target::Queue(one.clone()));
    }
    // No single redrive policy names it (several queues share it, or it is the DLQ of an SNS
    // subscription or of a worker's --dlq-url): the letters may say where they came from.
    let sample = port.peek(dlq, 100).await?;
    if sample
        .iter()
        .any(|m| m.attributes.contains_key(ATTR_SOURCE_QUEUE))
    {
        return Ok(Target::SourceQueues);
    }
    if sources.is_empty() {
        bail!(
            "cannot tell the source of {dlq}: no queue's redrive policy names it and its messages \
             carry no {ATTR_SOURCE_QUEUE} attribute (is it the DLQ of an SNS subscription?); \
             pass --to QUEUE or --to TOPIC"
        );
    }
    bail!(
        "{} queues send dead letters to {dlq} ({}) and its messages carry no \
         {ATTR_SOURCE_QUEUE} attribute; pass --to with the one to replay to",
        sources.len(),
        sources.join(", ")
    )
}

fn progress_bar(json: bool, len: Option<u64>, what: &'static str) -> Option<ProgressBar> {
    if json {
        return None;
    }
    let bar = match len {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::new_spinner(),
    };
    let template = if len.is_some() {
        "{spinner} {msg} [{bar:30}] {pos}/{len} scanned (eta {eta})"
    } else {
        "{spinner} {msg} {pos}"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what);
    Some(bar)
}

/// What a progress bar counts.
#[derive(Debug, Clone, Copy)]
enum Counting {
    Imported,
    Exported,
    Moved,
    WouldMove,
}

fn progress_callback(bar: Option<&ProgressBar>, counting: Counting) -> Option<replay::Progress> {
    let bar = bar?.clone();
    Some(Arc::new(move |c: &Counts| {
        let (position, message) = match counting {
            Counting::Imported => (c.moved, "imported".to_owned()),
            Counting::Exported => (c.scanned, format!("exported {}", c.matched)),
            Counting::Moved => (c.scanned, format!("moved {}", c.moved)),
            Counting::WouldMove => (c.scanned, format!("would move {}", c.would_move)),
        };
        bar.set_position(position);
        bar.set_message(message);
    }))
}

#[allow(clippy::print_stdout)]
fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

/// Runs `spillway dlq …`.
pub(crate) async fn run(args: DlqArgs) -> anyhow::Result<()> {
    match args.command {
        DlqCommand::Stats(a) => stats(a).await,
        DlqCommand::Peek(a) => peek(a).await,
        DlqCommand::Export(a) => export(a).await,
        DlqCommand::Import(a) => import(a).await,
        DlqCommand::Replay(a) => replay_cmd(a).await,
        DlqCommand::Redrive(a) => redrive(a).await,
        DlqCommand::Purge(a) => purge(a).await,
    }
}

#[derive(Debug, Serialize)]
struct StatsOut {
    dlq: String,
    broker: &'static str,
    visible: u64,
    in_flight: u64,
    delayed: u64,
    total: u64,
    oldest_age_secs: Option<u64>,
    /// Whether the oldest age and the breakdowns come from a sample rather than every message.
    sampled: bool,
    sample_size: usize,
    by_error_code: BTreeMap<String, u64>,
    by_type: BTreeMap<String, u64>,
    by_advertiser: BTreeMap<String, u64>,
}

fn top(map: &BTreeMap<String, u64>, n: usize) -> Vec<(&String, &u64)> {
    let mut v: Vec<_> = map.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    v.truncate(n);
    v
}

#[allow(clippy::print_stdout)]
async fn stats(a: StatsArgs) -> anyhow::Result<()> {
    let o = open(&a.common).await?;
    let s = o.port.stats(&o.dlq).await?;
    let sample = o.port.peek(&o.dlq, a.sample).await?;
    let now = now_ms();
    let mut out = StatsOut {
        dlq: o.dlq.clone(),
        broker: o.port.kind(),
        visible: s.visible,
        in_flight: s.in_flight,
        delayed: s.delayed,
        total: s.total(),
        oldest_age_secs: s
            .oldest_age_secs
            .or_else(|| sample.iter().filter_map(|m| m.age_secs(now)).max()),
        sampled: (sample.len() as u64) < s.total() || s.oldest_age_secs.is_none(),
        sample_size: sample.len(),
        by_error_code: BTreeMap::new(),
        by_type: BTreeMap::new(),
        by_advertiser: BTreeMap::new(),
    };
    for m in &sample {
        let code = m
            .attributes
            .get(ATTR_ERROR_CODE)
            .cloned()
            .unwrap_or_else(|| "(none)".into());
        *out.by_error_code.entry(code).or_default() += 1;
        let i = inspect(m);
        for t in i.types(m) {
            *out.by_type.entry(t).or_default() += 1;
        }
        for adv in i.advertisers() {
            *out.by_advertiser.entry(adv).or_default() += 1;
        }
    }
    if a.common.json {
        return print_json(&out);
    }
    println!("dlq {} ({})", out.dlq, out.broker);
    println!("  visible           {}", out.visible);
    println!("  in flight         {}", out.in_flight);
    println!("  delayed           {}", out.delayed);
    let age = out
        .oldest_age_secs
        .map_or_else(|| "-".to_owned(), human_age);
    let age_note = if s.oldest_age_secs.is_none() && out.oldest_age_secs.is_some() {
        " (oldest in the sample)"
    } else {
        ""
    };
    println!("  oldest message    {age}{age_note}");
    if out.total == 0 {
        return Ok(());
    }
    if (sample.len() as u64) < out.total {
        println!(
            "breakdowns below are SAMPLED: {} of {} messages (--sample to change)",
            sample.len(),
            out.total
        );
    } else {
        println!("breakdowns below count all {} messages", sample.len());
    }
    for (title, map) in [
        ("by spillway-error-code", &out.by_error_code),
        ("by event type (messages holding one)", &out.by_type),
        ("by advertiser (top 10)", &out.by_advertiser),
    ] {
        println!("{title}");
        for (k, v) in top(map, 10) {
            println!("  {k:<30} {v}");
        }
    }
    Ok(())
}

fn human_age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s} s"),
        s if s < 7_200 => format!("{} min", s / 60),
        s if s < 172_800 => format!("{} h", s / 3_600),
        s => format!("{} days", s / 86_400),
    }
}

#[derive(Debug, Serialize)]
struct PeekedOut {
    #[serde(flatten)]
    message: DlqMessage,
    age_secs: Option<u64>,
    events: Vec<serde_json::Value>,
    decode_error: Option<String>,
}

#[allow(clippy::print_stdout)]
async fn peek(a: PeekArgs) -> anyhow::Result<()> {
    let o = open(&a.common).await?;
    let got = o.port.peek(&o.dlq, a.n).await?;
    let now = now_ms();
    let out: Vec<PeekedOut> = got
        .into_iter()
        .map(|m| {
            let i = inspect(&m);
            PeekedOut {
                age_secs: m.age_secs(now),
                events: i.events,
                decode_error: i.decode_error,
                message: m,
            }
        })
        .collect();
    if a.common.json {
        return print_json(&serde_json::json!({"dlq": o.dlq, "messages": out}));
    }
    if out.is_empty() {
        println!("{} is empty (nothing visible)", o.dlq);
    }
    for (n, p) in out.iter().enumerate() {
        let age = p.age_secs.map_or_else(|| "-".to_owned(), human_age);
        println!(
            "#{} {}  age {age}  received {} time(s)",
            n + 1,
            p.message.message_id,
            p.message.receive_count
        );
        for (k, v) in &p.message.attributes {
            println!("  {k}: {v}");
        }
        if let Some(g) = &p.message.group_id {
            println!("  (fifo group {g})");
        }
        match &p.decode_error {
            Some(e) => {
                let body: String = p.message.body.chars().take(300).collect();
                println!("  undecodable: {e}");
                println!("  body: {body}");
            }
            None => {
                println!("  events ({}):", p.events.len());
                for e in p.events.iter().take(5) {
                    println!("    {e}");
                }
                if p.events.len() > 5 {
                    println!("    … {} more", p.events.len() - 5);
                }
            }
        }
    }
    Ok(())
}

#[allow(clippy::print_stdout)]
async fn export(a: ExportArgs) -> anyhow::Result<()> {
    // Refused before anything is opened or leased.
    let filter = a.filter.filter()?;
    let o = open(&a.common).await?;
    let depth = o.port.stats(&o.dlq).await?.total();
    let bar = progress_bar(a.common.json, Some(depth), "exporting");
    let opts = ReplayOptions {
        filter,
        max_messages: a.max,
        lease: Duration::from_secs(a.lease_secs),
        replace_file: a.force,
        ..ReplayOptions::default()
    };
    let report = replay::export(
        o.port.as_ref(),
        &o.dlq,
        &a.out,
        a.delete,
        &opts,
        progress_callback(bar.as_ref(), Counting::Exported),
    )
    .await;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let report = report?;
    if a.common.json {
        return print_json(&report);
    }
    println!(
        "exported {} of {} messages from {} to {} (fsynced)",
        report.exported, report.scanned, report.dlq, report.path
    );
    if report.left_unreadable > 0 {
        println!(
            "{} matching messages were left in the DLQ and out of the file: {}",
            report.left_unreadable,
            report
                .unreadable_reason
                .as_deref()
                .unwrap_or("their body is not text")
        );
    }
    if a.delete {
        println!("deleted {} from the DLQ after the fsync", report.deleted);
        if report.not_deleted > 0 {
            println!(
                "{} exported messages were NOT deleted (their lease lapsed): they are in the \
                 file and still in the DLQ",
                report.not_deleted
            );
        }
        if report.left_by_broker_limit > 0 {
            println!(
                "{} matching messages were left in the DLQ and out of the file: {}",
                report.left_by_broker_limit,
                report
                    .left_reason
                    .as_deref()
                    .unwrap_or("the broker cannot record more")
            );
        }
    }
    Ok(())
}

#[allow(clippy::print_stdout)]
async fn import(a: ImportArgs) -> anyhow::Result<()> {
    if a.to == "source" {
        bail!("import needs a named destination: --to QUEUE or --to TOPIC");
    }
    let o = open(&a.common).await?;
    let target = resolve_target(o.port.as_ref(), "", &a.to).await?;
    let bar = progress_bar(a.common.json, None, "imported");
    let report = replay::import(
        o.port.as_ref(),
        &a.file,
        &target,
        a.rate,
        progress_callback(bar.as_ref(), Counting::Imported),
    )
    .await;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let report = report?;
    if a.common.json {
        return print_json(&report);
    }
    println!(
        "imported {} messages from {} to {} in {:.1} s ({} API calls)",
        report.imported, report.path, report.target, report.elapsed_secs, report.api_calls_total
    );
    Ok(())
}

#[allow(clippy::print_stdout)]
async fn replay_cmd(a: ReplayArgs) -> anyhow::Result<()> {
    // Refused before anything is opened or leased.
    let filter = a.filter.filter()?;
    let o = open(&a.common).await?;
    let target = resolve_target(o.port.as_ref(), &o.dlq, &a.to).await?;
    let depth = o.port.stats(&o.dlq).await?.total();
    let opts = ReplayOptions {
        filter,
        rate_per_sec: a.rate,
        max_messages: a.max,
        concurrency: a
            .concurrency
            .unwrap_or(if o.dlq.ends_with(".fifo") {
                1
            } else {
                DEFAULT_CONCURRENCY
            })
            .max(1),
        dry_run: a.dry_run,
        max_replays: a.max_replays,
        lease: Duration::from_secs(a.lease_secs.max(1)),
        validation: if a.no_time_window {
            ValidationPolicy::structural()
        } else {
            ValidationPolicy::default()
        },
        fifo_dedup_guard: Duration::from_secs(a.fifo_dedup_guard_secs),
        replace_file: false,
    };
    let bar = progress_bar(
        a.common.json,
        Some(depth),
        if a.dry_run { "dry run" } else { "replaying" },
    );
    let report = replay::replay(
        o.port.as_ref(),
        &o.dlq,
        &target,
        &opts,
        progress_callback(
            bar.as_ref(),
            if a.dry_run {
                Counting::WouldMove
            } else {
                Counting::Moved
            },
        ),
    )
    .await;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let report = report?;
    if a.common.json {
        print_json(&report)?;
    } else {
        let c = &report.counts;
        let verb = if report.dry_run {
            "DRY RUN (nothing sent or deleted):"
        } else {
            "replay"
        };
        println!("{verb} {} → {}", report.dlq, report.target);
        println!("  scanned                    {}", c.scanned);
        println!("  matched the filter         {}", c.matched);
        if report.dry_run {
            println!("  would move                 {}", c.would_move);
        } else {
            println!("  moved (sent, then deleted) {}", c.moved);
        }
        println!("  left alone by the filter   {}", c.skipped_by_filter);
        for (label, n) in [
            ("refused: --max-replays", c.refused_max_replays),
            ("refused: invalid events", c.refused_invalid),
            ("refused: no source queue", c.refused_no_source),
            ("refused: FIFO dedup window", c.refused_dedup_window),
            ("refused: body is not text", c.refused_unreadable),
            ("left: --max reached", c.left_by_max),
            ("left: commit metadata full", c.left_by_broker_limit),
            ("refused by the destination", c.send_failed),
            ("sent, delete failed (in both)", c.sent_not_deleted),
        ] {
            if n > 0 {
                println!("  {label:<27}{n}");
            }
        }
        println!(
            "  {:.1} s, {:.0} msg/s, {:.2} API calls per message",
            report.elapsed_secs, report.messages_per_sec, report.api_calls_per_message
        );
        for r in &report.refusals {
            println!("  {}: {}", r.message_id, r.reason);
        }
        let listed = report.refusals.len() as u64;
        let refused = c.refused_max_replays
            + c.refused_invalid
            + c.refused_no_source
            + c.refused_dedup_window
            + c.refused_unreadable
            + c.left_by_broker_limit
            + c.send_failed;
        if refused > listed {
            println!(
                "  … and {} more refusals (--json lists 50)",
                refused - listed
            );
        }
    }
    if report.lease_lapsed {
        eprintln!(
            "warning: letters this run had leased came back during it (their --lease-secs \
             lapsed); on SQS the run may have ended before every letter was looked at: run \
             it again, with a --lease-secs longer than the run"
        );
    }
    if let Some(e) = &report.error {
        bail!("the replay stopped early: {e} (every unmoved message stays in the DLQ)");
    }
    Ok(())
}

#[allow(clippy::print_stdout)]
async fn redrive(a: RedriveArgs) -> anyhow::Result<()> {
    match a.action {
        Some(RedriveAction::Status(c)) => {
            let o = open(&c.common).await?;
            let tasks = o.port.redrive_status(&o.dlq).await?;
            if c.common.json {
                return print_json(&serde_json::json!({"dlq": o.dlq, "tasks": tasks}));
            }
            if tasks.is_empty() {
                println!("no native redrive task on {}", o.dlq);
            }
            for t in tasks {
                let to_move = t.to_move.map_or_else(|| "?".to_owned(), |n| n.to_string());
                println!(
                    "{} moved {}/{to_move} → {}{}{}",
                    t.status,
                    t.moved,
                    t.destination.as_deref().unwrap_or("original sources"),
                    t.max_per_sec
                        .map_or_else(String::new, |r| format!(" at ≤ {r}/s")),
                    t.failure_reason
                        .map_or_else(String::new, |r| format!(" (failed: {r})"))
                );
            }
            Ok(())
        }
        Some(RedriveAction::Cancel(c)) => {
            let o = open(&c.common).await?;
            let t = o.port.cancel_redrive(&o.dlq).await?;
            if c.common.json {
                return print_json(&t);
            }
            println!(
                "cancelling the redrive of {} ({} moved so far)",
                o.dlq, t.moved
            );
            Ok(())
        }
        None => {
            let o = open(&a.common).await?;
            // SQS takes a whole number of messages per second, 1 to 500; a fraction used to
            // be rounded without a word (`--rate 0.4` sent as 0).
            let rate = a
                .rate
                .map(|r| {
                    if r.fract() == 0.0 && (1.0..=500.0).contains(&r) {
                        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                        Ok(r as u32)
                    } else {
                        Err(anyhow::anyhow!(
                            "--rate {r} for a native redrive must be a whole number of messages \
                             per second from 1 to 500 (SQS takes no fractions)"
                        ))
                    }
                })
                .transpose()?;
            let t = o.port.start_redrive(&o.dlq, a.to.as_deref(), rate).await?;
            if a.common.json {
                return print_json(&t);
            }
            println!(
                "started native redrive of {} → {} (task {}); follow it with `spillway dlq \
                 redrive status`",
                o.dlq,
                t.destination.as_deref().unwrap_or("original source queues"),
                t.task_handle.as_deref().unwrap_or("?")
            );
            Ok(())
        }
    }
}

#[allow(clippy::print_stdout)]
async fn purge(a: PurgeArgs) -> anyhow::Result<()> {
    let o = open(&a.common).await?;
    if let Some(target) = o.port.redrives_to(&o.dlq).await? {
        bail!(
            "{} is a work queue, not a DLQ (its redrive policy sends dead letters to {target}): \
             its messages are events accepted with 202 that no worker has stored yet, and \
             purge does not delete them. Did you mean --dlq {target}?",
            o.dlq
        );
    }
    if !a.yes {
        let depth = o.port.stats(&o.dlq).await?.total();
        bail!(
            "purge deletes all {depth} messages of {} for good; export them first \
             (`spillway dlq export --out FILE`) and re-run with --yes",
            o.dlq
        );
    }
    let n = o.port.purge(&o.dlq).await?;
    if a.common.json {
        return print_json(&serde_json::json!({"dlq": o.dlq, "purged": n}));
    }
    match n {
        Some(n) => println!("purged {n} messages from {}", o.dlq),
        None => println!("purged {}", o.dlq),
    }
    if o.port.kind() == "aws" {
        println!("(SQS purges asynchronously, within 60 s; messages sent meanwhile may go too)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_below_one_message_per_1000_s_is_refused_at_parse_time() {
        assert_eq!(parse_rate("200"), Ok(200.0));
        assert_eq!(parse_rate("200/s"), Ok(200.0));
        assert_eq!(parse_rate("0.001"), Ok(0.001));
        let err = parse_rate("1e-20").unwrap_err();
        assert!(err.contains("too slow") && err.contains("0.001"), "{err}");
        assert!(parse_rate("0.0009").is_err());
        for bad in ["0", "-5", "inf", "NaN", "fast"] {
            let err = parse_rate(bad).unwrap_err();
            assert!(err.contains("not a rate"), "{bad}: {err}");
        }
    }
}
