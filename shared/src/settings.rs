//! Settings shared by the binaries: which broker (and which of its topics and queues) and
//! which store. Every field is a flag and a `SPILLWAY_…` environment variable; its doc
//! comment is its `--help` entry.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, ValueEnum};

use crate::embedded::{Broker, BrokerError, QueueSource, TopicPublisher, DEV_QUEUE, DEV_TOPIC};
use crate::postgres_sink::{PostgresConfig, PostgresError, PostgresSink};
use crate::sink::{Sink, SinkError};
use crate::sqlite_sink::SqliteSink;
use crate::{Publisher, Source};

/// File name of the embedded broker under the data directory.
pub const BROKER_DB: &str = "broker.db";
/// File name of the SQLite store under the data directory.
pub const STORE_DB: &str = "store.db";

/// Which broker carries the envelopes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BrokerKind {
    /// The embedded durable broker on SQLite, under `--data-dir`.
    Embedded,
    /// SNS topic and SQS queues, from the standard AWS configuration.
    Aws,
}

/// Broker selection.
#[derive(Debug, Clone, Args)]
pub struct BrokerSettings {
    /// Broker: embedded (SQLite under --data-dir, no service needed) or aws (SNS + SQS).
    #[arg(long, env = "SPILLWAY_BROKER", value_enum, default_value = "embedded")]
    pub broker: BrokerKind,

    /// Directory of the embedded broker and the SQLite store.
    #[arg(long, env = "SPILLWAY_DATA_DIR", default_value = ".spillway")]
    pub data_dir: PathBuf,

    /// Embedded broker: topic ingest publishes to.
    #[arg(long, env = "SPILLWAY_TOPIC", default_value = DEV_TOPIC)]
    pub topic: String,

    /// Embedded broker: queue workers drain.
    #[arg(long, env = "SPILLWAY_QUEUE", default_value = DEV_QUEUE)]
    pub queue: String,

    /// AWS: the SNS topic ARN ingest publishes to.
    #[arg(long, env = "SPILLWAY_TOPIC_ARN")]
    pub topic_arn: Option<String>,

    /// AWS: the SQS queue URL workers drain.
    #[arg(long, env = "SPILLWAY_QUEUE_URL")]
    pub queue_url: Option<String>,

    /// AWS: the dead-letter queue URL permanent failures are sent to.
    #[arg(long, env = "SPILLWAY_DLQ_URL")]
    pub dlq_url: Option<String>,
}

/// Why adapters could not be built from the settings.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// A setting the chosen broker needs is missing.
    #[error("--{flag} (or {env}) is required with --broker {broker}")]
    Missing {
        /// The flag.
        flag: &'static str,
        /// Its environment variable.
        env: &'static str,
        /// The broker.
        broker: &'static str,
    },
    /// The embedded broker could not be opened.
    #[error("embedded broker: {0}")]
    Broker(#[from] BrokerError),
    /// The store could not be opened.
    #[error("store: {0}")]
    Sink(#[from] SinkError),
    /// PostgreSQL could not be set up.
    #[error("postgres: {0}")]
    Postgres(#[from] PostgresError),
    /// The AWS feature is not compiled in.
    #[error("this build has no AWS support (feature `aws`)")]
    NoAws,
}

impl BrokerSettings {
    /// Opens the embedded broker and declares the dev topology (idempotent).
    ///
    /// # Errors
    /// When the database cannot be opened or the topology declared.
    pub async fn embedded(&self) -> Result<Broker, SettingsError> {
        let broker = Broker::open(self.data_dir.join(BROKER_DB))?;
        broker.dev_topology().await?;
        Ok(broker)
    }

    /// The publisher ingest uses.
    ///
    /// # Errors
    /// A missing setting or an unopenable broker.
    pub async fn publisher(&self) -> Result<Arc<dyn Publisher>, SettingsError> {
        match self.broker {
            BrokerKind::Embedded => Ok(Arc::new(TopicPublisher::new(
                self.embedded().await?,
                self.topic.clone(),
            ))),
            BrokerKind::Aws => self.aws_publisher().await,
        }
    }

    /// The source workers drain.
    ///
    /// # Errors
    /// A missing setting or an unopenable broker.
    pub async fn source(&self) -> Result<Arc<dyn Source>, SettingsError> {
        match self.broker {
            BrokerKind::Embedded => Ok(Arc::new(QueueSource::new(
                self.embedded().await?,
                self.queue.clone(),
            ))),
            BrokerKind::Aws => self.aws_source().await,
        }
    }

    #[cfg(feature = "aws")]
    async fn aws_publisher(&self) -> Result<Arc<dyn Publisher>, SettingsError> {
        let arn = self.topic_arn.clone().ok_or(SettingsError::Missing {
            flag: "topic-arn",
            env: "SPILLWAY_TOPIC_ARN",
            broker: "aws",
        })?;
        let config = crate::aws::load_config().await;
        Ok(Arc::new(crate::aws::sns::SnsPublisher::new(
            crate::aws::sns_client(&config),
            crate::aws::sns::SnsConfig::new(arn),
        )))
    }

    #[cfg(feature = "aws")]
    async fn aws_source(&self) -> Result<Arc<dyn Source>, SettingsError> {
        let queue_url = self.queue_url.clone().ok_or(SettingsError::Missing {
            flag: "queue-url",
            env: "SPILLWAY_QUEUE_URL",
            broker: "aws",
        })?;
        let config = crate::aws::load_config().await;
        Ok(Arc::new(crate::aws::sqs::SqsSource::new(
            crate::aws::sqs_client(&config),
            crate::aws::sqs::SqsConfig {
                queue_url,
                dlq_url: self.dlq_url.clone(),
            },
        )))
    }

    #[cfg(not(feature = "aws"))]
    async fn aws_publisher(&self) -> Result<Arc<dyn Publisher>, SettingsError> {
        Err(SettingsError::NoAws)
    }

    #[cfg(not(feature = "aws"))]
    async fn aws_source(&self) -> Result<Arc<dyn Source>, SettingsError> {
        Err(SettingsError::NoAws)
    }
}

/// Which store workers write to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SinkKind {
    /// SQLite under `--data-dir` (`store.db`).
    Sqlite,
    /// PostgreSQL at `--database-url`.
    Postgres,
}

/// Store selection.
#[derive(Debug, Clone, Args)]
pub struct SinkSettings {
    /// Store: sqlite (embedded, under --data-dir) or postgres (--database-url).
    #[arg(long, env = "SPILLWAY_SINK", value_enum, default_value = "sqlite")]
    pub sink: SinkKind,

    /// SQLite store file (default: <data-dir>/store.db).
    #[arg(long, env = "SPILLWAY_SQLITE_PATH")]
    pub sqlite_path: Option<PathBuf>,

    /// PostgreSQL connection URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres",
        hide_env_values = true
    )]
    pub database_url: String,

    /// PostgreSQL: most pooled connections (the store's connection cap).
    #[arg(long, env = "SPILLWAY_PG_MAX_CONNECTIONS", default_value_t = 8)]
    pub pg_max_connections: usize,

    /// PostgreSQL: statement timeout in seconds (a timed-out write is retried later).
    #[arg(long, env = "SPILLWAY_PG_STATEMENT_TIMEOUT_SECS", default_value_t = 30)]
    pub pg_statement_timeout_secs: u64,

    /// PostgreSQL: apply pending migrations at start (what `spillway migrate` does).
    #[arg(long, env = "SPILLWAY_MIGRATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate: bool,
}

/// An opened store: the sink plus the read helpers `spillway stats` needs.
#[derive(Debug, Clone)]
pub enum Store {
    /// SQLite.
    Sqlite(Arc<SqliteSink>),
    /// PostgreSQL.
    Postgres(Arc<PostgresSink>),
}

impl Store {
    /// The store as a `Sink`.
    pub fn sink(&self) -> Arc<dyn Sink> {
        match self {
            Self::Sqlite(s) => s.clone(),
            Self::Postgres(p) => p.clone(),
        }
    }

    /// Events stored.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub async fn events_stored(&self) -> Result<u64, SinkError> {
        match self {
            Self::Sqlite(s) => s.events_stored().await,
            Self::Postgres(p) => p.events_stored().await,
        }
    }

    /// Rollup rows.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub async fn rollup_rows(&self) -> Result<u64, SinkError> {
        match self {
            Self::Sqlite(s) => s.rollup_rows().await,
            Self::Postgres(p) => Ok(p.rollup_rows().await?.len() as u64),
        }
    }
}

impl SinkSettings {
    /// The PostgreSQL configuration.
    pub fn postgres_config(&self) -> PostgresConfig {
        PostgresConfig {
            max_connections: self.pg_max_connections.max(1),
            statement_timeout: std::time::Duration::from_secs(self.pg_statement_timeout_secs),
            ..PostgresConfig::new(self.database_url.clone())
        }
    }

    /// Opens the store (applying PostgreSQL migrations when `--migrate`); relative defaults
    /// live under `data_dir`.
    ///
    /// # Errors
    /// When the store cannot be opened or migrated.
    pub async fn open(&self, data_dir: &std::path::Path) -> Result<Store, SettingsError> {
        match self.sink {
            SinkKind::Sqlite => {
                let path = self
                    .sqlite_path
                    .clone()
                    .unwrap_or_else(|| data_dir.join(STORE_DB));
                Ok(Store::Sqlite(Arc::new(SqliteSink::open(path)?)))
            }
            SinkKind::Postgres => {
                let sink = PostgresSink::new(&self.postgres_config())?;
                if self.migrate {
                    sink.migrate().await?;
                }
                Ok(Store::Postgres(Arc::new(sink)))
            }
        }
    }
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("Shutdown signal received");
}
