//! `spillway`: the operator CLI.
//!
//! # Layout
//! - `dev`: the whole pipeline in one process (see [`dev`]).
//! - `loadgen`: synthetic load against an ingest endpoint (see [`loadgen`]).
//! - `dlq`: dead-letter queue stats, peek, export/import, replay, redrive, purge (see [`dlq`]).
//! - `stats`: queue, DLQ and store figures (see [`stats`]; Kafka in [`stats_kafka`]).
//! - `setup`: declare the topology (see [`setup`]).
//! - `migrate`: PostgreSQL migrations (see [`migrate`]).

mod dev;
mod dlq;
mod loadgen;
mod migrate;
mod setup;
mod stats;
mod stats_kafka;

use clap::{Parser, Subcommand};

// `dev` runs ingest and the workers, both allocation-heavy (request buffers, decoded events,
// SQL parameters): mimalloc serves them faster than glibc malloc (docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Spillway: a queue-buffered ingestion pipeline for ad-metric events.
#[derive(Debug, Parser)]
#[command(version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the pipeline locally in one process, with no external service.
    Dev(Box<dev::DevArgs>),
    /// Post synthetic events to an ingest endpoint and report throughput and latency.
    Loadgen(loadgen::LoadgenArgs),
    /// Show queue depth, in flight, DLQ depth, oldest message age, stored events and rollups.
    Stats(stats::StatsArgs),
    /// Create the broker topology (embedded), or print how to deploy it (AWS).
    Setup(setup::SetupArgs),
    /// Apply the PostgreSQL store's pending migrations.
    Migrate(migrate::MigrateArgs),
    /// Inspect a dead-letter queue and move its messages back: stats, peek, export, import,
    /// replay, redrive, purge.
    Dlq(dlq::DlqArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Dev(args) => dev::run(*args).await,
        Command::Loadgen(args) => loadgen::run(args).await,
        Command::Stats(args) => stats::run(args).await,
        Command::Setup(args) => setup::run(args).await,
        Command::Migrate(args) => migrate::run(args).await,
        Command::Dlq(args) => dlq::run(args).await,
    }
}
