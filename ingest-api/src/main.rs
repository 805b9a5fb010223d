//! `spillway-ingest`: the HTTP ingest API as a long-lived server, or, when
//! `AWS_LAMBDA_RUNTIME_API` is set, the same router behind API Gateway (HTTP API v2, REST
//! v1) or a Function URL through `lambda_http`.

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use ingest_api::settings::IngestSettings;
use ingest_api::{serve_with_limits, AppState};
use shared::lambda_init::{is_lambda, report_init_error};
use shared::publisher::DiscardPublisher;
use shared::settings::{
    run_with_grace, stop_token, stop_when_broken, BrokerSettings, MetricsSettings, ShutdownSettings,
};
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
    #[command(flatten)]
    metrics: MetricsSettings,
    #[command(flatten)]
    shutdown: ShutdownSettings,
    /// Publish nowhere: every valid event is answered 202 and discarded (benchmarks of the
    /// HTTP path only; never in production).
    #[arg(long, env = "SPILLWAY_MEMORY_PUBLISHER")]
    memory_publisher: bool,
    /// Lambda: CloudWatch namespace of the metrics each request logs in Embedded Metric
    /// Format (README "Metrics"); off when unset or empty. A function cannot be scraped.
    #[arg(long, env = "SPILLWAY_EMF_NAMESPACE")]
    emf_namespace: Option<String>,
}

/// With it set, API Gateway REST (v1) paths lose their stage prefix (`/prod/v1/events` →
/// `/v1/events`), so the router sees the same paths behind every trigger.
const IGNORE_STAGE_ENV: &str = "AWS_LAMBDA_HTTP_IGNORE_STAGE_IN_PATH";

fn main() -> anyhow::Result<()> {
    shared::telemetry::init();
    if is_lambda() {
        if std::env::var_os(IGNORE_STAGE_ENV).is_none() {
            // Still single-threaded here: no runtime, no other thread reads the environment.
            std::env::set_var(IGNORE_STAGE_ENV, "true");
        }
        // One request at a time per execution environment: one thread is enough.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        return rt.block_on(lambda_main());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(server_main())
}

/// Keys, publisher and state from the settings: built once per process (or per Lambda
/// execution environment).
async fn state(cli: &Cli) -> anyhow::Result<AppState> {
    cli.broker.refuse_ignored_settings()?;
    cli.ingest
        .check_for(cli.broker.broker)
        .map_err(|e| anyhow::anyhow!(e))?;
    let keys = cli.ingest.load_keys().context("loading API keys")?;
    if keys.is_empty() {
        tracing::warn!("No API key configured: every request will be answered 401");
    }
    let publisher: Arc<dyn Publisher> = if cli.memory_publisher {
        tracing::warn!(
            "SPILLWAY_MEMORY_PUBLISHER is set: every valid event is answered 202 and DISCARDED \
             (a benchmark of the HTTP path); unset it to publish to the broker"
        );
        Arc::new(DiscardPublisher)
    } else {
        cli.broker.publisher().await.context("opening the broker")?
    };
    Ok(AppState::new(
        publisher,
        keys,
        cli.ingest.config_for(cli.broker.is_keyed()),
    ))
}

async fn lambda_main() -> anyhow::Result<()> {
    let ready = async {
        let cli = Cli::try_parse().context("reading the settings")?;
        if cli.metrics.metrics_listen.is_some() {
            tracing::warn!("SPILLWAY_METRICS_LISTEN is ignored on Lambda: a function cannot be scraped; set SPILLWAY_EMF_NAMESPACE for per-request metrics");
        }
        let emf = shared::emf::EmfTarget::for_function(cli.emf_namespace.clone());
        Ok::<_, anyhow::Error>((state(&cli).await?, emf))
    };
    let (state, emf) = match ready.await {
        Ok(s) => s,
        Err(e) => {
            report_init_error(&format!("{e:#}")).await;
            return Err(e);
        }
    };
    tracing::info!("Ingest API ready for HTTP events (Lambda)");
    lambda_http::run(ingest_api::lambda_router(state, emf))
        .await
        .map_err(|e| anyhow::anyhow!(e))
        .context("Lambda runtime")
}

async fn server_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Installed before start-up: a stop meanwhile shuts the server down as soon as it runs.
    let stop = stop_token();
    let state = state(&cli).await?;
    if let Some(addr) = cli.metrics.metrics_listen {
        shared::metrics::spawn(addr, vec![state.metrics()]).await?;
    }
    let broken = tokio::spawn(stop_when_broken(stop.clone(), {
        let publisher = Arc::clone(state.publisher());
        move || publisher.broken()
    }));
    let listener = tokio::net::TcpListener::bind(cli.ingest.listen)
        .await
        .with_context(|| format!("binding {}", cli.ingest.listen))?;
    tracing::info!(addr = %listener.local_addr()?, "Ingest API listening");
    let served = run_with_grace(
        serve_with_limits(
            listener,
            ingest_api::router(state),
            stop.clone().cancelled_owned(),
            cli.ingest.connection_limits(),
        ),
        stop.cancelled(),
        cli.shutdown.grace(),
        "requests in flight",
    )
    .await;
    if let Some(served) = served {
        served.context("serving HTTP")?;
    }
    stop.cancel();
    if let Ok(Some(reason)) = broken.await {
        anyhow::bail!("stopped: {reason}; a new process starts a new producer");
    }
    Ok(())
}
