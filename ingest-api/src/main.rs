//! `spillway-ingest`: the HTTP ingest API as a long-lived server, or, when
//! `AWS_LAMBDA_RUNTIME_API` is set, the same router behind API Gateway (HTTP API v2, REST
//! v1) or a Function URL through `lambda_http`.

use std::sync::Arc;
use std::time::Duration;

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
    /// How often the API keys are read again, in seconds, while SPILLWAY_API_KEYS_FILE is set:
    /// a key added to or revoked from the file takes effect without a restart (a file that
    /// does not parse keeps the keys in use, and says so). 0 reads them at start only.
    #[arg(long, env = "SPILLWAY_API_KEYS_RELOAD_SECS", default_value_t = 10)]
    api_keys_reload_secs: u64,
}

/// Reads the API keys again every `every` while the process runs, and swaps them in when the
/// file's content changed. A Kubernetes Secret mounted as a file is updated in place; before,
/// a revoked key was accepted until every pod had been restarted.
async fn reload_keys(state: AppState, settings: IngestSettings, every: Duration) {
    let Some(path) = settings.api_keys_file.clone() else {
        return;
    };
    let mut last = std::fs::read(&path).ok();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let now = std::fs::read(&path).ok();
        if now == last {
            continue;
        }
        last = now;
        match settings.load_keys() {
            Ok(keys) => {
                let count = keys.len();
                let (added, removed) = state.replace_keys(keys);
                tracing::info!(keys = count, added, removed, file = %path.display(), "API keys reloaded");
            }
            Err(e) => tracing::error!(
                error = %e,
                file = %path.display(),
                "API keys file changed but cannot be used; the keys in use stay until it is fixed"
            ),
        }
    }
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
    if cli.api_keys_reload_secs > 0 {
        tokio::spawn(reload_keys(
            state.clone(),
            cli.ingest.clone(),
            Duration::from_secs(cli.api_keys_reload_secs),
        ));
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
