//! `spillway stats --broker kafka`: the workers' consumer-group lag per partition, the DLQ
//! topic's depth and the store's figures.

use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use shared::dlq::DlqBroker;
use shared::kafka::dlq::KafkaDlq;
use shared::kafka::lag::{group_lag, topic_depth, PartitionLag};

use crate::stats::StatsArgs;

/// How long each broker call of `stats` may take.
const BROKER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Serialize)]
struct KafkaStats {
    topic: String,
    group: String,
    /// Messages the group has not finished, over all partitions.
    lag: i64,
    partitions: Vec<PartitionLag>,
    dlq_topic: String,
    /// Letters the replay group has not moved yet (what `spillway dlq stats` counts).
    dlq_depth: u64,
    /// The replay group that depth is counted for (`--kafka-replay-group`).
    replay_group: String,
    /// Every letter the topic still keeps, moved or not (its retention trims them).
    dlq_letters: u64,
    events_stored: u64,
    rollup_rows: u64,
}

/// Prints the Kafka figures.
pub(crate) async fn run(args: StatsArgs) -> anyhow::Result<()> {
    let client = args.broker.kafka_client_config()?;
    let client_for_dlq = client.clone();
    let topic = args.broker.topic.clone();
    let group = args.broker.kafka.kafka_group.clone();
    let dlq_topic = args.broker.kafka.kafka_dlq_topic.clone();
    let (partitions, dlq_letters) = tokio::task::spawn_blocking({
        let (topic, group, dlq_topic) = (topic.clone(), group.clone(), dlq_topic.clone());
        move || -> anyhow::Result<_> {
            let lag = group_lag(&client, &topic, &group, BROKER_TIMEOUT)
                .with_context(|| format!("reading the lag of group {group} on {topic}"))?;
            let dlq = topic_depth(&client, &dlq_topic, BROKER_TIMEOUT)
                .with_context(|| format!("reading the depth of {dlq_topic}"))?;
            Ok((lag, dlq))
        }
    })
    .await??;
    // What is still to replay, as the replay group sees it: a topic keeps letters after
    // `spillway dlq replay` or `purge` moved past them.
    let replay_group = args.broker.kafka.kafka_replay_group.clone();
    let dlq = KafkaDlq::new(client_for_dlq, replay_group.clone(), Some(topic.clone()))
        .context("opening the DLQ topic")?;
    let dlq_depth = dlq
        .stats(&dlq_topic)
        .await
        .with_context(|| format!("reading what {replay_group} has not replayed of {dlq_topic}"))?
        .total();
    let store = args
        .sink
        .open_to_read(&args.broker.data_dir)
        .await
        .context("opening the store")?;
    let stats = KafkaStats {
        lag: partitions.iter().map(|p| p.lag).sum(),
        topic,
        group,
        partitions,
        dlq_topic,
        dlq_depth,
        replay_group,
        dlq_letters,
        events_stored: store.events_stored().await?,
        rollup_rows: store.rollup_rows().await?,
    };
    print(&stats, args.json)
}

#[allow(clippy::print_stdout)]
fn print(s: &KafkaStats, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(s)?);
        return Ok(());
    }
    println!("topic {} (group {})", s.topic, s.group);
    println!("  lag               {}", s.lag);
    for p in &s.partitions {
        let committed = p
            .committed
            .map_or_else(|| "-".to_owned(), |c| c.to_string());
        println!(
            "  partition {:<4}    committed {committed}, high {}, lag {}",
            p.partition, p.high, p.lag
        );
    }
    println!("dlq {}", s.dlq_topic);
    println!(
        "  depth             {} not replayed yet (by {}); {} kept in the topic",
        s.dlq_depth, s.replay_group, s.dlq_letters
    );
    println!("store");
    println!("  events stored     {}", s.events_stored);
    println!("  rollup rows       {}", s.rollup_rows);
    Ok(())
}
