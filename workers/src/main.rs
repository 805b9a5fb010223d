//! `spillway-worker`: drains a queue into the store with the poller runtime, or, when
//! `AWS_LAMBDA_RUNTIME_API` is set, handles SQS batches as a Lambda function.

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use shared::lambda_init::{is_lambda, report_init_error};
use shared::settings::{
    run_with_grace, stop_token, stop_when_broken, BrokerSettings, MetricsSettings,
    ShutdownSettings, SinkSettings,
};
use shared::DeadLetterQueue;
use workers::lambda::SqsHandler;
use workers::settings::{LambdaSettings, WorkerSettings};
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
    #[command(flatten)]
    lambda: LambdaSettings,
    #[command(flatten)]
    metrics: MetricsSettings,
    #[command(flatten)]
    shutdown: ShutdownSettings,
}

fn main() -> anyhow::Result<()> {
    shared::telemetry::init();
    if is_lambda() {
        // One invocation at a time: a single-threaded runtime is all a Lambda needs, and it
        // starts faster and smaller than a pool of worker threads.
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
    rt.block_on(poller_main())
}

async fn poller_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Listen first: a stop while the worker starts (opening the queue, migrating the store)
    // ends start-up cleanly; nothing has been received yet.
    let shutdown = stop_token();
    // Bound before start-up: opening the queue and migrating the store (waiting for another
    // replica's migration lock) can take longer than a liveness probe allows, and the probe
    // found nothing listening. The page fills in once the poller exists.
    let page = Arc::new(shared::metrics::Later::default());
    if let Some(addr) = cli.metrics.metrics_listen {
        shared::metrics::spawn(
            addr,
            vec![Arc::clone(&page) as Arc<dyn shared::metrics::Render>],
        )
        .await?;
    }
    let poller = tokio::select! {
        biased;
        () = shutdown.cancelled() => {
            tracing::info!("Stopped during start-up");
            return Ok(());
        }
        poller = start_poller(&cli) => poller?,
    };
    page.set(poller.metrics_page());
    let broken = tokio::spawn(stop_when_broken(shutdown.clone(), {
        let source = Arc::clone(poller.source());
        move || source.broken()
    }));
    tracing::info!("Worker started");
    let drained = run_with_grace(
        poller.run(shutdown.clone()),
        shutdown.cancelled(),
        cli.shutdown.grace(),
        "batches in flight",
    )
    .await;
    if drained.is_some() {
        tracing::info!("Worker drained in-flight batches and stopped");
    }
    shutdown.cancel();
    if let Ok(Some(reason)) = broken.await {
        anyhow::bail!("stopped: {reason}; a new process starts a new producer");
    }
    Ok(())
}

/// The source, the store and the poller over them.
async fn start_poller(cli: &Cli) -> anyhow::Result<Poller> {
    cli.broker.refuse_ignored_settings()?;
    if let Some(ignored) = cli.lambda.ignored_by_poller() {
        tracing::warn!("{ignored}");
    }
    let config = cli.worker.poller_config();
    let source = cli.broker.source(config.visibility_timeout).await;
    let source = source.context("opening the source")?;
    let sink = open_store(cli).await?;
    Poller::new(source, sink, config).context("worker settings")
}

/// The store the settings name (migrated first when `--migrate`).
async fn open_store(cli: &Cli) -> anyhow::Result<Arc<dyn shared::Sink>> {
    cli.sink.refuse_ignored_settings()?;
    let store = cli.sink.open(&cli.broker.data_dir).await;
    Ok(store.context("opening the store")?.sink())
}

async fn lambda_main() -> anyhow::Result<()> {
    let handler = match lambda_handler().await {
        Ok(h) => h,
        Err(e) => {
            report_init_error(&format!("{e:#}")).await;
            return Err(e);
        }
    };
    tracing::info!("Worker ready for SQS batches (Lambda)");
    workers::lambda::run(handler)
        .await
        .map_err(|e| anyhow::anyhow!(e))
        .context("Lambda runtime")
}

/// Settings, store and DLQ client: built once per execution environment.
async fn lambda_handler() -> anyhow::Result<SqsHandler> {
    let cli = Cli::try_parse().context("reading the settings")?;
    if cli.metrics.metrics_listen.is_some() {
        tracing::warn!("SPILLWAY_METRICS_LISTEN is ignored on Lambda: a function cannot be scraped; set SPILLWAY_EMF_NAMESPACE for per-invocation metrics");
    }
    let sink = open_store(&cli).await?;
    let sqs = if cli.broker.dlq_url.is_some() || cli.broker.queue_url.is_some() {
        Some(shared::aws::sqs_client(&shared::aws::load_config().await))
    } else {
        None
    };
    let dlq: Option<Arc<dyn DeadLetterQueue>> = match (&cli.broker.dlq_url, &sqs) {
        (Some(url), Some(client)) => Some(Arc::new(shared::aws::sqs::SqsDeadLetterQueue::new(
            client.clone(),
            url.clone(),
        ))),
        _ => {
            tracing::warn!("No SPILLWAY_DLQ_URL: permanent failures are retried until the queue's redrive policy moves them");
            None
        }
    };
    let mut handler = SqsHandler::new(sink, dlq, cli.lambda.lambda_config(&cli.worker));
    if let Some(target) = shared::emf::EmfTarget::for_function(cli.lambda.emf_namespace) {
        handler = handler.with_emf(target);
    }
    Ok(match (&cli.broker.queue_url, sqs) {
        (Some(url), Some(client)) => handler.with_requeue(Arc::new(
            shared::aws::sqs::SqsRequeue::new(client, url.clone()),
        )),
        _ => {
            tracing::warn!("No SPILLWAY_QUEUE_URL: while the store is down, records are reported for retry and use up their receives (maxReceiveCount) instead of being requeued");
            handler
        }
    })
}
