//! `spillway-ingest`: the HTTP ingest API as a long-lived server.

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use ingest_api::settings::IngestSettings;
use ingest_api::{serve, shutdown_signal, AppState};
use shared::publisher::MemoryPublisher;
use shared::settings::BrokerSettings;
use shared::Publisher;

// The ingest path allocates many small, short-lived buffers per request (keys, strings,
// serialised events); mimalloc serves them faster than glibc malloc (see docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Spillway HTTP ingest: validates ad events and publishes them before answering 202.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    ingest: IngestSettings,
    #[command(flatten)]
    broker: BrokerSettings,
    /// Publish to memory instead of a broker (benchmarks of the HTTP path only; nothing is kept).
    #[arg(long, env = "SPILLWAY_MEMORY_PUBLISHER")]
    memory_publisher: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    shared::telemetry::init();
    let cli = Cli::parse();
    let keys = cli.ingest.load_keys().context("loading API keys")?;
    if keys.is_empty() {
        tracing::warn!("No API key configured: every request will be answered 401");
    }
    let publisher: Arc<dyn Publisher> = if cli.memory_publisher {
        Arc::new(MemoryPublisher::new())
    } else {
        cli.broker.publisher().await.context("opening the broker")?
    };
    let state = AppState::new(
        publisher,
        keys,
        cli.ingest.config_for(cli.broker.is_keyed()),
    );
    let listener = tokio::net::TcpListener::bind(cli.ingest.listen)
        .await
        .with_context(|| format!("binding {}", cli.ingest.listen))?;
    tracing::info!(addr = %listener.local_addr()?, "Ingest API listening");
    serve(listener, state, shutdown_signal())
        .await
        .context("serving HTTP")?;
    Ok(())
}
