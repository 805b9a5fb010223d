//! Settings shared by the binaries: which broker (and which of its topics and queues) and
//! which store. Every field is a flag and a `SPILLWAY_…` environment variable; its doc
//! comment is its `--help` entry.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

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

/// The PostgreSQL store `--sink postgres` writes to without `DATABASE_URL`.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A count that must be at least 1 (a flag's value parser, e.g.
/// `value_parser = at_least_one::<u64>`): `0` is refused, named, instead of being raised to
/// 1 without a word (`--max-connections 0` served one connection at a time).
///
/// # Errors
/// Not a whole number, or 0.
pub fn at_least_one<T>(raw: &str) -> Result<T, String>
where
    T: std::str::FromStr + PartialEq + From<u8>,
    T::Err: std::fmt::Display,
{
    match raw.trim().parse::<T>() {
        Ok(n) if n == T::from(0) => Err("must be at least 1 (0 is not \"off\" here)".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("not a whole number: {e}")),
    }
}

/// A listen address (a flag's value parser): `IP:PORT`, or a host name and port, which is
/// resolved (`localhost:8080`). A host name used to be refused as "invalid socket address
/// syntax", not saying what was expected.
///
/// # Errors
/// No port, or a host that does not resolve.
pub fn listen_addr(raw: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(addr) = raw.trim().parse() {
        return Ok(addr);
    }
    let expected = "an address such as 127.0.0.1:8080, 0.0.0.0:8080, [::]:8080 or localhost:8080";
    if raw
        .rsplit_once(':')
        .is_none_or(|(_, port)| port.parse::<u16>().is_err())
    {
        return Err(format!("no port: give {expected}"));
    }
    raw.trim()
        .to_socket_addrs()
        .map_err(|e| format!("{e}: give {expected}"))?
        .next()
        .ok_or_else(|| format!("resolves to no address: give {expected}"))
}

/// Which broker carries the envelopes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BrokerKind {
    /// The embedded durable broker on SQLite, under `--data-dir`.
    Embedded,
    /// SNS topic and SQS queues, from the standard AWS configuration.
    Aws,
    /// A Kafka topic, a consumer group and a DLQ topic (`--kafka-…` settings).
    Kafka,
}

/// Broker selection.
#[derive(Debug, Clone, Args)]
pub struct BrokerSettings {
    /// Broker: embedded (SQLite under --data-dir, no service needed), aws (SNS + SQS) or
    /// kafka (topic + consumer group + DLQ topic).
    #[arg(long, env = "SPILLWAY_BROKER", value_enum, default_value = "embedded")]
    pub broker: BrokerKind,

    /// Directory of the embedded broker and the SQLite store.
    #[arg(long, env = "SPILLWAY_DATA_DIR", default_value = ".spillway")]
    pub data_dir: PathBuf,

    /// Embedded broker or Kafka: topic ingest publishes to (and Kafka workers consume).
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

    #[command(flatten)]
    pub kafka: KafkaSettings,
}

/// Kafka settings (`--broker kafka`).
#[derive(Debug, Clone, Args)]
pub struct KafkaSettings {
    /// Kafka: bootstrap servers, `host:port[,host:port…]`. `spillway dev` without it starts
    /// an in-process mock cluster (nothing is kept when it stops).
    #[arg(long, env = "SPILLWAY_KAFKA_BOOTSTRAP_SERVERS")]
    pub kafka_bootstrap_servers: Option<String>,

    /// Kafka: consumer group of the workers (they share the topic's partitions).
    #[arg(long, env = "SPILLWAY_KAFKA_GROUP", default_value = "spillway-workers")]
    pub kafka_group: String,

    /// Kafka: topic permanent failures are produced to, with the reason and the original
    /// topic/partition/offset as headers.
    #[arg(long, env = "SPILLWAY_KAFKA_DLQ_TOPIC", default_value = "events-dlq")]
    pub kafka_dlq_topic: String,

    /// Kafka: consumer group `spillway dlq replay` records what it moved in, so a rerun does
    /// not resend (its own group, apart from the workers').
    #[arg(
        long,
        env = "SPILLWAY_KAFKA_REPLAY_GROUP",
        default_value = "spillway-dlq-replay"
    )]
    pub kafka_replay_group: String,

    /// Kafka: producer compression: none, snappy, lz4 or zstd.
    #[arg(long, env = "SPILLWAY_KAFKA_COMPRESSION", default_value = "lz4")]
    pub kafka_compression: KafkaCompressionArg,

    /// Kafka: producer linger.ms, how long a batch waits to fill.
    #[arg(long, env = "SPILLWAY_KAFKA_LINGER_MS", default_value_t = 5)]
    pub kafka_linger_ms: u64,

    /// Kafka: producer batch.size, most bytes per partition batch.
    #[arg(long, env = "SPILLWAY_KAFKA_BATCH_BYTES", default_value_t = 1_000_000)]
    pub kafka_batch_bytes: usize,

    /// Kafka: message.timeout.ms, how long a publish may take (retries included) before
    /// ingest answers 503.
    #[arg(
        long,
        env = "SPILLWAY_KAFKA_DELIVERY_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub kafka_delivery_timeout_ms: u64,

    /// Kafka: session.timeout.ms, how long the group waits for a silent worker before its
    /// partitions move to the others.
    #[arg(
        long,
        env = "SPILLWAY_KAFKA_SESSION_TIMEOUT_MS",
        default_value_t = 45_000
    )]
    pub kafka_session_timeout_ms: u64,

    /// Kafka: max.poll.interval.ms; keep it above the longest batch.
    #[arg(
        long,
        env = "SPILLWAY_KAFKA_MAX_POLL_INTERVAL_MS",
        default_value_t = 300_000
    )]
    pub kafka_max_poll_interval_ms: u64,

    /// Kafka: receives of one message before it goes to the DLQ topic (`max_receives`)
    /// instead of coming back: Kafka's stand-in for an SQS redrive policy's maxReceiveCount.
    #[arg(
        long,
        env = "SPILLWAY_KAFKA_MAX_RECEIVES",
        default_value_t = 5,
        value_parser = at_least_one::<u32>
    )]
    pub kafka_max_receives: u32,

    /// Kafka: partitions of the topics the in-process mock cluster of `spillway dev` creates.
    #[arg(long, env = "SPILLWAY_KAFKA_MOCK_PARTITIONS", default_value_t = 4, value_parser = clap::value_parser!(i32).range(1..))]
    pub kafka_mock_partitions: i32,

    /// Kafka: extra librdkafka properties for every client, `KEY=VALUE;KEY=VALUE` (`;`, since
    /// values such as `partition.assignment.strategy=range,roundrobin` hold commas).
    #[arg(long, env = "SPILLWAY_KAFKA_CONFIG", value_name = "KEY=VALUE;...")]
    pub kafka_config_list: Option<String>,

    /// Kafka: one extra librdkafka property KEY=VALUE for every client, applied last
    /// (repeatable; the value is taken whole, `;` included), e.g. client.id=ingest-1.
    #[arg(long, value_name = "KEY=VALUE")]
    pub kafka_config: Vec<String>,
}

impl KafkaSettings {
    /// The Kafka connection settings.
    ///
    /// # Errors
    /// No bootstrap servers, or a malformed `--kafka-config` entry.
    #[cfg(feature = "kafka")]
    pub fn client_config(&self) -> Result<crate::kafka::KafkaClientConfig, SettingsError> {
        let k = self;
        let servers = k
            .kafka_bootstrap_servers
            .clone()
            .ok_or(SettingsError::Missing {
                flag: "kafka-bootstrap-servers",
                env: "SPILLWAY_KAFKA_BOOTSTRAP_SERVERS",
                broker: "kafka",
            })?;
        let mut client = crate::kafka::KafkaClientConfig::new(servers);
        let listed = k.kafka_config_list.iter().flat_map(|list| {
            list.split(';')
                .map(str::trim)
                .filter(|entry| !entry.is_empty())
                .enumerate()
                .map(|(n, entry)| {
                    (
                        format!(
                            "entry {} of --kafka-config-list (SPILLWAY_KAFKA_CONFIG)",
                            n + 1
                        ),
                        entry,
                    )
                })
        });
        let single = k
            .kafka_config
            .iter()
            .enumerate()
            .map(|(n, entry)| (format!("--kafka-config number {}", n + 1), entry.as_str()));
        for (which, raw) in listed.chain(single) {
            let (key, value) = crate::kafka::parse_property(raw)
                .map_err(|e| SettingsError::Kafka(format!("{which}: {e}")))?;
            client.extra.insert(key, value);
        }
        Ok(client)
    }

    /// The producer settings for `topic`: the connection, and the compression, linger, batch
    /// size and delivery timeout flags.
    ///
    /// # Errors
    /// As [`KafkaSettings::client_config`].
    #[cfg(feature = "kafka")]
    pub fn producer_config(
        &self,
        topic: &str,
    ) -> Result<crate::kafka::publisher::ProducerConfig, SettingsError> {
        use crate::kafka::Compression;
        Ok(crate::kafka::publisher::ProducerConfig {
            compression: match self.kafka_compression {
                KafkaCompressionArg::None => Compression::None,
                KafkaCompressionArg::Snappy => Compression::Snappy,
                KafkaCompressionArg::Lz4 => Compression::Lz4,
                KafkaCompressionArg::Zstd => Compression::Zstd,
            },
            linger: Duration::from_millis(self.kafka_linger_ms),
            batch_bytes: self.kafka_batch_bytes,
            delivery_timeout: Duration::from_millis(self.kafka_delivery_timeout_ms),
            ..crate::kafka::publisher::ProducerConfig::new(self.client_config()?, topic)
        })
    }
}

/// Producer compression codec, as a flag value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KafkaCompressionArg {
    /// No compression.
    None,
    /// Snappy.
    Snappy,
    /// LZ4 (cheapest on CPU).
    Lz4,
    /// Zstandard (smallest).
    Zstd,
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
    /// The Kafka feature is not compiled in.
    #[error("this build has no Kafka support (feature `kafka`)")]
    NoKafka,
    /// A Kafka setting is malformed.
    #[error("kafka: {0}")]
    Kafka(String),
    /// The store to read is not there.
    #[error("{0}")]
    NoStore(String),
    /// Settings of another broker or store than the chosen one, which it would ignore.
    #[error("{0}")]
    Ignored(String),
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

    /// The publisher and the source of a process that runs both ends (`spillway dev`); the
    /// source receives with `visibility_timeout` as [`BrokerSettings::source`] does. On
    /// the embedded broker they share one open broker: one SQLite connection instead of two
    /// contending for the file's write lock, and a publish wakes the worker's long poll at
    /// once instead of at its next look.
    ///
    /// # Errors
    /// As [`BrokerSettings::publisher`] and [`BrokerSettings::source`].
    pub async fn publisher_and_source(
        &self,
        visibility_timeout: Duration,
    ) -> Result<(Arc<dyn Publisher>, Arc<dyn Source>), SettingsError> {
        if self.broker == BrokerKind::Embedded {
            let broker = self.embedded().await?;
            let publisher = TopicPublisher::new(broker.clone(), self.topic.clone());
            let source = self.embedded_source(broker, visibility_timeout).await?;
            return Ok((Arc::new(publisher), Arc::new(source)));
        }
        Ok((
            self.publisher().await?,
            self.source(visibility_timeout).await?,
        ))
    }

    /// The `--queue` of the embedded broker, which must exist: a typo would otherwise start
    /// a worker that retries a missing queue forever while ingest fills the real one. Its
    /// receives hide messages for `visibility_timeout`.
    async fn embedded_source(
        &self,
        broker: Broker,
        visibility_timeout: Duration,
    ) -> Result<QueueSource, SettingsError> {
        broker.queue_stats(&self.queue).await?;
        Ok(
            QueueSource::new(broker, self.queue.clone())
                .with_visibility_timeout(visibility_timeout),
        )
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
            BrokerKind::Kafka => self.kafka_publisher(),
        }
    }

    /// Whether the broker routes by message key (Kafka), so ingest should key its envelopes.
    pub fn is_keyed(&self) -> bool {
        self.broker == BrokerKind::Kafka
    }

    /// The source workers drain. On SQS and the embedded broker each receive hides its
    /// messages for `visibility_timeout` (the worker's `--visibility-timeout-secs`, which its
    /// heartbeat schedule assumes) whatever the queue's own setting; Kafka has no visibility.
    ///
    /// # Errors
    /// A missing setting or an unopenable broker.
    pub async fn source(
        &self,
        visibility_timeout: Duration,
    ) -> Result<Arc<dyn Source>, SettingsError> {
        match self.broker {
            BrokerKind::Embedded => Ok(Arc::new(
                self.embedded_source(self.embedded().await?, visibility_timeout)
                    .await?,
            )),
            BrokerKind::Aws => self.aws_source(visibility_timeout).await,
            BrokerKind::Kafka => {
                self.check_kafka_topics().await?;
                self.kafka_source()
            }
        }
    }

    /// Refuses to start a Kafka worker whose topic or DLQ topic does not exist; starts it
    /// (with a warning) when the cluster does not answer in time.
    #[cfg(feature = "kafka")]
    async fn check_kafka_topics(&self) -> Result<(), SettingsError> {
        let k = &self.kafka;
        let checked = crate::kafka::check_topics_exist(
            &self.kafka_client_config()?,
            &[
                (self.topic.as_str(), "--topic"),
                (k.kafka_dlq_topic.as_str(), "--kafka-dlq-topic"),
            ],
            Duration::from_secs(10),
        )
        .await
        .map_err(SettingsError::Kafka)?;
        if !checked {
            tracing::warn!(
                topic = %self.topic,
                dlq_topic = %k.kafka_dlq_topic,
                "The Kafka cluster did not answer within 10 s; starting without checking that the topics exist"
            );
        }
        Ok(())
    }

    #[cfg(not(feature = "kafka"))]
    async fn check_kafka_topics(&self) -> Result<(), SettingsError> {
        Ok(())
    }

    #[cfg(feature = "kafka")]
    fn kafka_publisher(&self) -> Result<Arc<dyn Publisher>, SettingsError> {
        let config = self.kafka_producer_config(&self.topic)?;
        crate::kafka::KafkaPublisher::new(&config)
            .map(|p| Arc::new(p) as Arc<dyn Publisher>)
            .map_err(|e| SettingsError::Kafka(e.to_string()))
    }

    #[cfg(feature = "kafka")]
    fn kafka_source(&self) -> Result<Arc<dyn Source>, SettingsError> {
        let config = self.kafka_consumer_config()?;
        crate::kafka::KafkaSource::new(&config)
            .map(|s| Arc::new(s) as Arc<dyn Source>)
            .map_err(|e| SettingsError::Kafka(e.to_string()))
    }

    /// The Kafka connection settings.
    ///
    /// # Errors
    /// No bootstrap servers, or a malformed `--kafka-config` entry.
    #[cfg(feature = "kafka")]
    pub fn kafka_client_config(&self) -> Result<crate::kafka::KafkaClientConfig, SettingsError> {
        self.kafka.client_config()
    }

    /// What is wrong when AWS or Kafka settings are given while the broker is the embedded
    /// one (the default): ingest would answer 202 for events kept in a SQLite file on its
    /// own disk (in a container or a Lambda's `/tmp`, gone with it), not sent to the
    /// broker the operator meant.
    pub fn ignored_settings(&self) -> Option<String> {
        if self.broker != BrokerKind::Embedded {
            return None;
        }
        let given: Vec<&str> = [
            (self.topic_arn.is_some(), "SPILLWAY_TOPIC_ARN (--topic-arn)"),
            (self.queue_url.is_some(), "SPILLWAY_QUEUE_URL (--queue-url)"),
            (self.dlq_url.is_some(), "SPILLWAY_DLQ_URL (--dlq-url)"),
            (
                self.kafka.kafka_bootstrap_servers.is_some(),
                "SPILLWAY_KAFKA_BOOTSTRAP_SERVERS (--kafka-bootstrap-servers)",
            ),
        ]
        .into_iter()
        .filter_map(|(set, name)| set.then_some(name))
        .collect();
        if given.is_empty() {
            return None;
        }
        Some(format!(
            "{} set, but the broker is the embedded one (--broker embedded, the default): \
             events would be kept in SQLite under {}, not sent to AWS or Kafka. Set --broker \
             aws or --broker kafka (SPILLWAY_BROKER), or unset {}",
            given.join(" and "),
            self.data_dir.display(),
            if given.len() == 1 { "it" } else { "them" }
        ))
    }

    /// Refuses the settings [`BrokerSettings::ignored_settings`] finds.
    ///
    /// # Errors
    /// [`SettingsError::Ignored`].
    pub fn refuse_ignored_settings(&self) -> Result<(), SettingsError> {
        self.ignored_settings()
            .map_or(Ok(()), |e| Err(SettingsError::Ignored(e)))
    }

    /// The Kafka producer settings for `topic`.
    ///
    /// # Errors
    /// As [`BrokerSettings::kafka_client_config`].
    #[cfg(feature = "kafka")]
    pub fn kafka_producer_config(
        &self,
        topic: &str,
    ) -> Result<crate::kafka::publisher::ProducerConfig, SettingsError> {
        self.kafka.producer_config(topic)
    }

    /// The Kafka source settings.
    ///
    /// # Errors
    /// As [`BrokerSettings::kafka_client_config`].
    #[cfg(feature = "kafka")]
    pub fn kafka_consumer_config(
        &self,
    ) -> Result<crate::kafka::source::ConsumerConfig, SettingsError> {
        let k = &self.kafka;
        let mut config = crate::kafka::source::ConsumerConfig::new(
            self.kafka_client_config()?,
            self.topic.clone(),
            k.kafka_group.clone(),
            k.kafka_dlq_topic.clone(),
        );
        config.dlq_producer = self.kafka_producer_config(&k.kafka_dlq_topic)?;
        config.session_timeout = Duration::from_millis(k.kafka_session_timeout_ms);
        config.max_poll_interval = Duration::from_millis(k.kafka_max_poll_interval_ms);
        config.max_receives = k.kafka_max_receives;
        Ok(config)
    }

    /// Starts an in-process mock Kafka cluster with the topic and the DLQ topic, and points
    /// these settings at it (`spillway dev --broker kafka` without bootstrap servers). The
    /// cluster lives as long as the returned handle; it keeps nothing on disk.
    ///
    /// # Errors
    /// When librdkafka cannot start it.
    #[cfg(feature = "kafka")]
    pub fn start_kafka_mock(&mut self) -> Result<crate::kafka::MockKafka, SettingsError> {
        let partitions = self.kafka.kafka_mock_partitions.max(1);
        let mock = crate::kafka::MockKafka::start(
            1,
            &[
                (self.topic.as_str(), partitions),
                (self.kafka.kafka_dlq_topic.as_str(), partitions),
            ],
        )
        .map_err(|e| SettingsError::Kafka(e.to_string()))?;
        self.kafka.kafka_bootstrap_servers = Some(mock.bootstrap_servers().to_owned());
        Ok(mock)
    }

    #[cfg(not(feature = "kafka"))]
    fn kafka_publisher(&self) -> Result<Arc<dyn Publisher>, SettingsError> {
        Err(SettingsError::NoKafka)
    }

    #[cfg(not(feature = "kafka"))]
    fn kafka_source(&self) -> Result<Arc<dyn Source>, SettingsError> {
        Err(SettingsError::NoKafka)
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
    async fn aws_source(
        &self,
        visibility_timeout: Duration,
    ) -> Result<Arc<dyn Source>, SettingsError> {
        let queue_url = self.queue_url.clone().ok_or(SettingsError::Missing {
            flag: "queue-url",
            env: "SPILLWAY_QUEUE_URL",
            broker: "aws",
        })?;
        let config = crate::aws::load_config().await;
        Ok(Arc::new(
            crate::aws::sqs::SqsSource::new(
                crate::aws::sqs_client(&config),
                crate::aws::sqs::SqsConfig {
                    queue_url,
                    dlq_url: self.dlq_url.clone(),
                },
            )
            .with_visibility_timeout(visibility_timeout),
        ))
    }

    #[cfg(not(feature = "aws"))]
    async fn aws_publisher(&self) -> Result<Arc<dyn Publisher>, SettingsError> {
        Err(SettingsError::NoAws)
    }

    #[cfg(not(feature = "aws"))]
    async fn aws_source(&self, _: Duration) -> Result<Arc<dyn Source>, SettingsError> {
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

    /// PostgreSQL connection URL (default with --sink postgres:
    /// postgres://postgres@127.0.0.1:5432/postgres).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// PostgreSQL: most pooled connections (the store's connection cap).
    #[arg(long, env = "SPILLWAY_PG_MAX_CONNECTIONS", default_value_t = 8, value_parser = at_least_one::<usize>)]
    pub pg_max_connections: usize,

    /// PostgreSQL: statement timeout in seconds (a timed-out write is retried later).
    #[arg(long, env = "SPILLWAY_PG_STATEMENT_TIMEOUT_SECS", default_value_t = 30)]
    pub pg_statement_timeout_secs: u64,

    /// PostgreSQL: PEM file of the certificates that may sign the server's, trusted beside
    /// the compiled-in public roots (RDS/Aurora: the region's or the global bundle). TLS is
    /// used when the URL says sslmode=require, and then the certificate and host are verified.
    #[arg(long, env = "SPILLWAY_PG_CA_FILE")]
    pub pg_ca_file: Option<PathBuf>,

    /// PostgreSQL: DATABASE_URL leads to a pooler in transaction mode (PgBouncer
    /// pool_mode=transaction): keep no prepared statement between transactions, set the
    /// statement timeout in each one, write every batch with the ON CONFLICT statement.
    #[arg(long, env = "SPILLWAY_PG_TRANSACTION_POOLING")]
    pub pg_transaction_pooling: bool,

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
    /// What is wrong when a PostgreSQL URL is given while the store is SQLite (the default):
    /// a worker would acknowledge every message into a file of its own, not the database
    /// the operator meant.
    pub fn ignored_settings(&self) -> Option<String> {
        (self.sink == SinkKind::Sqlite && self.database_url.is_some()).then(|| {
            "DATABASE_URL (--database-url) is set, but the store is SQLite (--sink sqlite, \
             the default): events would be written to a SQLite file, not to that database. \
             Set --sink postgres (SPILLWAY_SINK=postgres), or unset DATABASE_URL"
                .to_owned()
        })
    }

    /// Refuses the settings [`SinkSettings::ignored_settings`] finds.
    ///
    /// # Errors
    /// [`SettingsError::Ignored`].
    pub fn refuse_ignored_settings(&self) -> Result<(), SettingsError> {
        self.ignored_settings()
            .map_or(Ok(()), |e| Err(SettingsError::Ignored(e)))
    }

    /// The PostgreSQL configuration.
    pub fn postgres_config(&self) -> PostgresConfig {
        PostgresConfig {
            max_connections: self.pg_max_connections.max(1),
            statement_timeout: Duration::from_secs(self.pg_statement_timeout_secs),
            ca_file: self.pg_ca_file.clone(),
            transaction_pooling: self.pg_transaction_pooling,
            ..PostgresConfig::new(
                self.database_url
                    .clone()
                    .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned()),
            )
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

impl SinkSettings {
    /// Opens the store only to read it (`spillway stats`): nothing is migrated, and an
    /// SQLite file that is not there is an error rather than a new, empty store that reads
    /// as "0 events stored" (the workers' store is elsewhere: other flags).
    ///
    /// # Errors
    /// [`SettingsError::NoStore`], or when the store cannot be opened.
    pub async fn open_to_read(&self, data_dir: &std::path::Path) -> Result<Store, SettingsError> {
        if self.sink == SinkKind::Sqlite {
            let path = self
                .sqlite_path
                .clone()
                .unwrap_or_else(|| data_dir.join(STORE_DB));
            if !path.exists() {
                return Err(SettingsError::NoStore(format!(
                    "no SQLite store at {}: give the store flags the workers run with \
                     (--data-dir, --sqlite-path, or --sink postgres with DATABASE_URL)",
                    path.display()
                )));
            }
        }
        let read = Self {
            migrate: false,
            ..self.clone()
        };
        read.open(data_dir).await
    }
}

/// Where a long-lived `spillway-ingest` or `spillway-worker` exposes `GET /metrics`.
#[derive(Debug, Clone, Args)]
pub struct MetricsSettings {
    /// Address to serve Prometheus metrics on at `/metrics` (e.g. 127.0.0.1:9464); off when
    /// unset. A listener of its own, so the ingest API's public port never exposes them.
    #[arg(long, env = "SPILLWAY_METRICS_LISTEN", value_parser = listen_addr)]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// How long a stopping process waits for what it has in flight.
#[derive(Debug, Clone, Args)]
pub struct ShutdownSettings {
    /// Seconds a stop (SIGTERM, Ctrl-C) waits for the requests and batches in flight before
    /// the process exits anyway; what is cut off is retried (a request by its client, a batch
    /// by its redelivery). A second signal exits at once.
    #[arg(long, env = "SPILLWAY_SHUTDOWN_GRACE_SECS", default_value_t = 25)]
    pub shutdown_grace_secs: u64,
}

impl ShutdownSettings {
    /// The grace period.
    pub fn grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
}

/// Runs `work` to its end, unless a stop was asked for (`stopping` completed) and then
/// `grace` passed or a second signal came: `work` is then dropped, and `None` says so.
/// `work` is expected to wind down by itself once the stop was asked for (stop taking
/// requests, finish the batches it holds); this bounds how long that may take, so that an
/// orchestrator's SIGKILL (30 s after SIGTERM on Kubernetes and ECS) does not come first.
pub async fn run_with_grace<T>(
    work: impl std::future::Future<Output = T>,
    stopping: impl std::future::Future<Output = ()>,
    grace: Duration,
    what: &str,
) -> Option<T> {
    tokio::pin!(work);
    tokio::select! {
        out = &mut work => return Some(out),
        () = stopping => {}
    }
    let again = shutdown_signal();
    tokio::select! {
        out = &mut work => Some(out),
        () = tokio::time::sleep(grace) => {
            tracing::warn!(grace_secs = grace.as_secs(), "Gave up waiting for {what} after the shutdown grace period; exiting (they are retried)");
            None
        }
        () = again => {
            tracing::warn!("Second shutdown signal: exiting without waiting for {what} (they are retried)");
            None
        }
    }
}

/// A token cancelled at the first Ctrl-C or SIGTERM. The handlers are installed now (call it
/// inside the runtime, before start-up), so a stop while the process starts is caught.
pub fn stop_token() -> tokio_util::sync::CancellationToken {
    let stop = tokio_util::sync::CancellationToken::new();
    let signal = shutdown_signal();
    let trigger = stop.clone();
    tokio::spawn(async move {
        signal.await;
        trigger.cancel();
    });
    stop
}

/// How often [`stop_when_broken`] asks.
pub const BROKEN_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Cancels `stop` once `broken` says why the process can never do its work again (a Kafka
/// producer in librdkafka's fatal state: [`crate::Publisher::broken`],
/// [`crate::Source::broken`]), asking every [`BROKEN_CHECK_EVERY`], and returns the reason;
/// `None` once `stop` is cancelled otherwise. The process then stops as it would on SIGTERM
/// and should exit with an error, so that its supervisor starts a new one: otherwise it
/// stays up failing every publish or letter until someone restarts it by hand (a failing
/// readiness probe only takes a pod out of its Service).
pub async fn stop_when_broken(
    stop: tokio_util::sync::CancellationToken,
    broken: impl Fn() -> Option<String> + Send,
) -> Option<String> {
    let mut tick = tokio::time::interval(BROKEN_CHECK_EVERY);
    loop {
        tokio::select! {
            () = stop.cancelled() => return None,
            _ = tick.tick() => {}
        }
        if let Some(reason) = broken() {
            tracing::error!(
                %reason,
                "Cannot recover: stopping, so that the process is restarted"
            );
            stop.cancel();
            return Some(reason);
        }
    }
}

/// Completes on Ctrl-C or SIGTERM. The handlers are installed when this is called, not when
/// the future is first polled, so a signal that comes while the process is still starting
/// is caught rather than killing it. Call it inside the runtime.
#[cfg(unix)]
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{signal, SignalKind};
    let interrupt = signal(SignalKind::interrupt());
    let term = signal(SignalKind::terminate());
    async move {
        let wait = |s: std::io::Result<tokio::signal::unix::Signal>| async move {
            match s {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = wait(interrupt) => {},
            () = wait(term) => {},
        }
        tracing::info!("Shutdown signal received");
    }
}

/// Completes on Ctrl-C.
#[cfg(not(unix))]
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("Shutdown signal received");
    }
}

#[cfg(all(test, feature = "kafka"))]
mod kafka_tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        broker: BrokerSettings,
    }

    #[test]
    fn kafka_needs_bootstrap_servers_and_takes_properties_with_commas() {
        let cli = Cli::parse_from(["x", "--broker", "kafka"]);
        assert!(matches!(
            cli.broker.kafka_client_config(),
            Err(SettingsError::Missing {
                flag: "kafka-bootstrap-servers",
                ..
            })
        ));
        let cli = Cli::parse_from([
            "x",
            "--broker",
            "kafka",
            "--kafka-bootstrap-servers",
            "a:9092,b:9092",
            "--kafka-config-list",
            "client.id=w1; partition.assignment.strategy=range,roundrobin;",
            "--kafka-config",
            "socket.keepalive.enable=true",
            "--kafka-config",
            "client.id=w2",
        ]);
        let c = cli.broker.kafka_client_config().unwrap();
        assert_eq!(c.bootstrap_servers, "a:9092,b:9092");
        assert_eq!(c.extra["partition.assignment.strategy"], "range,roundrobin");
        assert_eq!(c.extra["client.id"], "w2", "single properties come last");
        assert_eq!(c.extra.len(), 3);
        let bad = Cli::parse_from([
            "x",
            "--kafka-bootstrap-servers",
            "a:1",
            "--kafka-config",
            "oops",
        ]);
        assert!(matches!(
            bad.broker.kafka_client_config(),
            Err(SettingsError::Kafka(_))
        ));
    }

    /// `--kafka-config` split its value on `;` like the variable, so the README's way to pass
    /// a value holding `;` did not exist, and the error quoted the part after it.
    #[test]
    fn a_single_kafka_property_keeps_its_semicolons_and_a_bad_one_is_not_quoted() {
        let cli = Cli::parse_from([
            "x",
            "--kafka-bootstrap-servers",
            "a:1",
            "--kafka-config",
            "sasl.password=ab;cd",
        ]);
        let c = cli.broker.kafka_client_config().unwrap();
        assert_eq!(c.extra["sasl.password"], "ab;cd");
        let bad = Cli::parse_from([
            "x",
            "--kafka-bootstrap-servers",
            "a:1",
            "--kafka-config-list",
            "sasl.password=ab;secret-part",
        ]);
        let err = bad.broker.kafka_client_config().unwrap_err().to_string();
        assert!(err.contains("entry 2 of --kafka-config-list"), "{err}");
        assert!(!err.contains("secret-part"), "{err}");
    }

    /// Extra properties were applied last, so `acks=1`, `enable.auto.offset.store=true` or a
    /// `linger.ms` beside `--kafka-linger-ms` won without a word, under a 202 that promises
    /// `acks=all` and offsets stored only for stored messages. They are refused, named.
    #[test]
    fn a_property_spillway_sets_itself_is_refused_and_named() {
        for (entry, expected) in [
            (
                "acks=1",
                "acks is set by Spillway and cannot be overridden: a 202 promises acks=all",
            ),
            (
                "enable.auto.offset.store=true",
                "enable.auto.offset.store is set by Spillway",
            ),
            (
                " linger.ms =50",
                "linger.ms is set by Spillway and cannot be overridden: use --kafka-linger-ms",
            ),
            ("group.id=other", "use --kafka-group"),
        ] {
            let cli = Cli::parse_from([
                "x",
                "--kafka-bootstrap-servers",
                "a:1",
                "--kafka-config-list",
                &format!("client.id=w1;{entry}"),
            ]);
            let err = cli.broker.kafka_client_config().unwrap_err().to_string();
            assert!(err.contains("entry 2 of --kafka-config-list"), "{err}");
            assert!(err.contains(expected), "{entry}: {err}");
        }
        let cli = Cli::parse_from([
            "x",
            "--kafka-bootstrap-servers",
            "a:1",
            "--kafka-config",
            "statistics.interval.ms=1000",
        ]);
        assert!(
            cli.broker.kafka_client_config().is_ok(),
            "tuning is still open"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::collections::BTreeMap;
    use std::time::{Duration, Instant};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        broker: BrokerSettings,
    }

    /// `--listen localhost:8080` was refused as "invalid socket address syntax".
    #[test]
    fn a_listen_address_may_name_a_host_and_a_missing_port_is_said() {
        assert_eq!(
            listen_addr("127.0.0.1:9000").unwrap(),
            "127.0.0.1:9000".parse().unwrap()
        );
        let local = listen_addr("localhost:9000").unwrap();
        assert!(local.ip().is_loopback() && local.port() == 9000, "{local}");
        for raw in ["localhost", "127.0.0.1", "localhost:http"] {
            let err = listen_addr(raw).unwrap_err();
            assert!(
                err.starts_with("no port: give an address such as"),
                "{raw}: {err}"
            );
        }
    }

    #[tokio::test]
    async fn an_embedded_queue_that_does_not_exist_is_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().to_str().unwrap();
        let cli = Cli::try_parse_from(["w", "--data-dir", data_dir, "--queue", "evnets-worker"]);
        let broker = cli.unwrap().broker;
        let err = broker.source(Duration::from_secs(30)).await.unwrap_err();
        assert!(
            err.to_string().contains("\"evnets-worker\" does not exist"),
            "{err}"
        );
        let err = broker
            .publisher_and_source(Duration::from_secs(30))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_publish_wakes_the_long_poll_of_the_same_process_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().to_str().unwrap();
        let cli = Cli::try_parse_from(["dev", "--broker", "embedded", "--data-dir", data_dir]);
        let (publisher, source) = cli
            .unwrap()
            .broker
            .publisher_and_source(Duration::from_secs(30))
            .await
            .unwrap();
        let envelope = crate::Envelope {
            body: r#"{"v":1,"events":[]}"#.into(),
            attributes: BTreeMap::new(),
            event_count: 0,
        };
        // Twenty round trips, each publishing while the receive is parked. Sharing one broker,
        // each takes a few milliseconds; with a broker each, every receive would sleep until
        // its next look (up to 100 ms), about 2 s in all.
        let started = Instant::now();
        for _ in 0..20 {
            let receive = tokio::spawn({
                let source = source.clone();
                async move { source.receive(10, Duration::from_secs(5)).await }
            });
            tokio::time::sleep(Duration::from_millis(5)).await;
            publisher
                .publish(std::slice::from_ref(&envelope))
                .await
                .unwrap();
            let got = receive.await.unwrap().unwrap();
            assert_eq!(got.len(), 1);
            source.ack(&[got[0].id.clone()]).await.unwrap();
        }
        let took = started.elapsed();
        assert!(took < Duration::from_millis(1_000), "{took:?}");
    }
}
