//! `spillway dev`: the whole pipeline in one process — ingest API, broker, workers, store.
//! With the defaults it needs no external service: the embedded broker and the SQLite store
//! live under `--data-dir`.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use clap::Args;
use ingest_api::auth::{AdvertiserScope, ApiKey, ApiKeys};
use ingest_api::settings::IngestSettings;
use ingest_api::{serve_with_limits, AppState};
use rand::Rng;
use shared::settings::{
    run_with_grace, stop_token, BrokerKind, BrokerSettings, ShutdownSettings, SinkKind,
    SinkSettings,
};
use time::format_description::well_known::Rfc3339;
use tokio_util::sync::CancellationToken;
use tracing::info;
use workers::settings::WorkerSettings;
use workers::Poller;

/// File (under the data dir) holding the dev API key.
pub(crate) const DEV_KEY_FILE: &str = "dev-api-key";

/// Options of `spillway dev`.
#[derive(Debug, Args)]
pub(crate) struct DevArgs {
    #[command(flatten)]
    pub broker: BrokerSettings,

    #[command(flatten)]
    pub sink: SinkSettings,

    #[command(flatten)]
    pub ingest: IngestSettings,

    #[command(flatten)]
    pub worker: WorkerSettings,

    #[command(flatten)]
    pub shutdown: ShutdownSettings,
}

/// Runs the pipeline until Ctrl-C or SIGTERM: then the HTTP server stops taking requests and
/// answers those in flight, and the workers finish and settle the batches they hold.
pub(crate) async fn run(mut args: DevArgs) -> anyhow::Result<()> {
    shared::telemetry::init();
    // Installed before start-up: a stop meanwhile shuts the pipeline down as soon as it runs.
    let stop = stop_token();
    // `--broker kafka` without bootstrap servers: an in-process mock cluster, for trying the
    // Kafka transport with nothing installed. It lives as long as the process: a Kafka client
    // still held when this function returns (an idle connection's copy of the router holds
    // the publisher and the consumer's metrics) is dropped with the runtime, and a consumer
    // closing after its cluster went away blocked the exit past SIGTERM's grace (seen once
    // in CI: no exit 30 s after SIGTERM).
    if args.broker.is_keyed() && args.broker.kafka.kafka_bootstrap_servers.is_none() {
        let mock = args
            .broker
            .start_kafka_mock()
            .context("starting the in-process mock Kafka cluster")?;
        info!(
            bootstrap = mock.bootstrap_servers(),
            "Started an in-process mock Kafka cluster (nothing is kept when dev stops)"
        );
        Box::leak(Box::new(mock));
    }
    // A developer's shell may hold a DATABASE_URL or AWS settings meant for something else:
    // dev says it ignores them rather than refusing to start.
    for ignored in [args.broker.ignored_settings(), args.sink.ignored_settings()]
        .into_iter()
        .flatten()
    {
        tracing::warn!("{ignored}");
    }
    let data_dir = &args.broker.data_dir;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating data dir {}", data_dir.display()))?;
    let dev_key = load_or_create_dev_key(data_dir)?;
    args.ingest
        .check_for(args.broker.broker)
        .map_err(|e| anyhow::anyhow!(e))?;
    let mut keys = args.ingest.load_keys().context("loading API keys")?;
    keys.extend(
        ApiKeys::new(vec![ApiKey::from_plain(
            &dev_key,
            "dev",
            AdvertiserScope::Any,
        )]),
        "the dev key",
    )?;

    let (publisher, source) = args
        .broker
        .publisher_and_source(args.worker.poller_config().visibility_timeout)
        .await
        .context("opening the broker and its queue")?;
    let store = args
        .sink
        .open(data_dir)
        .await
        .context("opening the store")?;
    let poller = Poller::new(source, store.sink(), args.worker.poller_config())
        .context("worker settings")?;
    // Bound before the workers start: a start-up that fails (the port is taken) must not
    // drop a batch the workers already received, leaving it hidden with a receive used up.
    let listener = tokio::net::TcpListener::bind(args.ingest.listen)
        .await
        .with_context(|| format!("binding {}", args.ingest.listen))?;
    let addr = listener.local_addr()?;
    let worker_metrics = poller.metrics_page();
    let state = AppState::new(
        publisher,
        keys,
        args.ingest.config_for(args.broker.is_keyed()),
    );
    // Dev listens on loopback by default: `/metrics` shares the API's port.
    let metrics = shared::metrics::router(vec![state.metrics(), worker_metrics]);
    let router = ingest_api::router(state).merge(metrics);
    print_welcome(addr, data_dir, &args.broker, &args.sink)?;

    let stop_workers = CancellationToken::new();
    let workers = tokio::spawn(poller.run(stop_workers.clone()));
    let drained = run_with_grace(
        async {
            let served = serve_with_limits(
                listener,
                router,
                stop.clone().cancelled_owned(),
                args.ingest.connection_limits(),
            )
            .await;
            info!("HTTP stopped; draining the workers");
            stop_workers.cancel();
            workers.await.context("worker task")?;
            served.context("serving HTTP")
        },
        stop.cancelled(),
        args.shutdown.grace(),
        "requests and batches in flight",
    )
    .await;
    if let Some(drained) = drained {
        drained?;
    }
    info!("Stopped");
    Ok(())
}

/// Reads the dev key, or creates one (mode 0600) on first start.
pub(crate) fn load_or_create_dev_key(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join(DEV_KEY_FILE);
    if let Ok(key) = std::fs::read_to_string(&path) {
        let key = key.trim().to_owned();
        if !key.is_empty() {
            return Ok(key);
        }
    }
    let bytes: [u8; 24] = rand::rng().random();
    let key = format!("sw_dev_{}", hex::encode(bytes));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut file = opts
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(key.as_bytes())?;
    file.sync_all()?;
    Ok(key)
}

#[allow(clippy::print_stdout)]
fn print_welcome(
    addr: std::net::SocketAddr,
    data_dir: &Path,
    broker: &BrokerSettings,
    sink: &SinkSettings,
) -> anyhow::Result<()> {
    let now = time::OffsetDateTime::now_utc().format(&Rfc3339)?;
    let id = uuid::Uuid::new_v4();
    let key_path = data_dir.join(DEV_KEY_FILE);
    println!("Spillway dev pipeline listening on http://{addr}");
    println!("API key (any advertiser): {}", key_path.display());
    println!("Send an event:");
    println!(
        "  curl -sS http://{addr}/v1/events -H \"Authorization: Bearer $(cat {})\" \
         -H 'content-type: application/json' \
         -d '{{\"event_id\":\"{id}\",\"type\":\"click\",\"occurred_at\":\"{now}\",\
         \"advertiser_id\":\"adv-1\",\"campaign_id\":\"cmp-1\",\"ad_id\":\"ad-1\",\
         \"cost_micros\":1500,\"currency\":\"USD\"}}'",
        key_path.display()
    );
    // The same program and the store this pipeline writes (stats reads what it is told to);
    // the database URL, which may hold a password, is left to the environment.
    let program = std::env::args().next().unwrap_or_else(|| "spillway".into());
    let store = match (sink.sink, &sink.sqlite_path) {
        (SinkKind::Postgres, _) => " --sink postgres".to_owned(),
        (SinkKind::Sqlite, Some(path)) => format!(" --sqlite-path {}", path.display()),
        (SinkKind::Sqlite, None) => String::new(),
    };
    let dir = data_dir.display();
    match (broker.broker, &broker.kafka.kafka_bootstrap_servers) {
        (BrokerKind::Kafka, Some(servers)) => println!(
            "Then: {program} stats --data-dir {dir} --broker kafka --kafka-bootstrap-servers {servers}{store}"
        ),
        (BrokerKind::Aws, _) => println!(
            "Queue depth: the SQS queue's CloudWatch metrics (spillway stats reads the embedded broker and Kafka)"
        ),
        _ => println!("Then: {program} stats --data-dir {dir}{store}"),
    }
    if sink.sink == SinkKind::Postgres {
        println!("  (with the same DATABASE_URL in the environment)");
    }
    println!("Metrics (Prometheus): http://{addr}/metrics");
    println!("Press Ctrl-C to stop (requests and batches in flight finish first).");
    std::io::stdout().flush()?;
    Ok(())
}
