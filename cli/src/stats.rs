//! `spillway stats`: queue depth, in flight, DLQ depth, oldest message age, stored events and
//! rollup rows — what an operator looks at first.

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;
use shared::settings::{BrokerKind, BrokerSettings, SinkSettings};

/// Options of `spillway stats`.
#[derive(Debug, Args)]
pub(crate) struct StatsArgs {
    #[command(flatten)]
    pub broker: BrokerSettings,

    #[command(flatten)]
    pub sink: SinkSettings,

    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The figures `stats` prints.
#[derive(Debug, Serialize)]
struct Stats {
    queue: String,
    queue_depth: u64,
    in_flight: u64,
    delayed: u64,
    oldest_age_secs: Option<u64>,
    dlq: Option<String>,
    dlq_depth: u64,
    events_stored: u64,
    rollup_rows: u64,
}

/// Prints the figures.
pub(crate) async fn run(args: StatsArgs) -> anyhow::Result<()> {
    args.broker.refuse_ignored_settings()?;
    args.sink.refuse_ignored_settings()?;
    if args.broker.broker == BrokerKind::Kafka {
        return crate::stats_kafka::run(args).await;
    }
    if args.broker.broker != BrokerKind::Embedded {
        bail!(
            "spillway stats reads the embedded broker; for SQS use the queue's CloudWatch metrics"
        );
    }
    let db = args.broker.data_dir.join(shared::settings::BROKER_DB);
    if !db.exists() {
        bail!(
            "no embedded broker at {} (start `spillway dev` first, or pass --data-dir)",
            db.display()
        );
    }
    // Opened, not declared: reading the depths writes nothing.
    let broker =
        shared::embedded::Broker::open(db.clone()).context("opening the embedded broker")?;
    let queue = args.broker.queue.clone();
    let q = broker
        .queue_stats(&queue)
        .await
        .with_context(|| format!("queue {queue}"))?;
    let dlq = broker
        .list_queues()
        .await?
        .into_iter()
        .find(|info| info.name == queue)
        .and_then(|info| info.config.dlq);
    let dlq_depth = match &dlq {
        Some(name) => {
            let s = broker.queue_stats(name).await?;
            s.visible + s.in_flight + s.delayed
        }
        None => 0,
    };
    let store = args
        .sink
        .open_to_read(&args.broker.data_dir)
        .await
        .context("opening the store")?;
    let stats = Stats {
        queue,
        queue_depth: q.visible,
        in_flight: q.in_flight,
        delayed: q.delayed,
        oldest_age_secs: q.oldest_age_secs,
        dlq,
        dlq_depth,
        events_stored: store.events_stored().await?,
        rollup_rows: store.rollup_rows().await?,
    };
    print(&stats, args.json)
}

#[allow(clippy::print_stdout)]
fn print(s: &Stats, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(s)?);
        return Ok(());
    }
    let age = s
        .oldest_age_secs
        .map_or_else(|| "-".to_owned(), |a| format!("{a} s"));
    println!("queue {}", s.queue);
    println!("  depth (visible)   {}", s.queue_depth);
    println!("  in flight         {}", s.in_flight);
    println!("  delayed           {}", s.delayed);
    println!("  oldest message    {age}");
    println!("dlq {}", s.dlq.as_deref().unwrap_or("(none)"));
    println!("  depth             {}", s.dlq_depth);
    println!("store");
    println!("  events stored     {}", s.events_stored);
    println!("  rollup rows       {}", s.rollup_rows);
    Ok(())
}
