//! `spillway-worker`: drains a queue into the store with the poller runtime.

use anyhow::Context;
use clap::Parser;
use shared::settings::{shutdown_signal, BrokerSettings, SinkSettings};
use tokio_util::sync::CancellationToken;
use workers::settings::WorkerSettings;
use workers::Poller;

/// Spillway worker: receives batches, writes them to the store at a capped rate, settles them.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    broker: BrokerSettings,
    #[command(flatten)]
    sink: SinkSettings,
    #[command(flatten)]
    worker: WorkerSettings,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    shared::telemetry::init();
    let cli = Cli::parse();
    let source = cli.broker.source().await.context("opening the source")?;
    let sink = cli
        .sink
        .open(&cli.broker.data_dir)
        .await
        .context("opening the store")?
        .sink();
    let poller =
        Poller::new(source, sink, cli.worker.poller_config()).context("worker settings")?;
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        trigger.cancel();
    });
    tracing::info!("Worker started");
    poller.run(shutdown).await;
    tracing::info!("Worker drained in-flight batches and stopped");
    Ok(())
}
