//! Worker settings: every poller knob as a flag and a `SPILLWAY_…` environment variable.

use std::time::Duration;

use clap::Args;

use crate::breaker::BreakerConfig;
use crate::core::CoreConfig;
use crate::lambda::LambdaConfig;
use crate::poller::PollerConfig;

/// Settings of the poller runtime.
#[derive(Debug, Clone, Args)]
pub struct WorkerSettings {
    /// Concurrent receive loops.
    #[arg(long, env = "SPILLWAY_WORKER_LOOPS", default_value_t = 2)]
    pub worker_loops: usize,

    /// A batch stops growing at this many events.
    #[arg(long, env = "SPILLWAY_BATCH_MAX_EVENTS", default_value_t = 1_000)]
    pub batch_max_events: usize,

    /// A batch stops growing this long (ms) after its first message.
    #[arg(long, env = "SPILLWAY_BATCH_MAX_WAIT_MS", default_value_t = 1_000)]
    pub batch_max_wait_ms: u64,

    /// Long-poll wait of a receive, in seconds (SQS allows at most 20).
    #[arg(long, env = "SPILLWAY_RECEIVE_WAIT_SECS", default_value_t = 20)]
    pub receive_wait_secs: u64,

    /// The queue's visibility timeout in seconds; heartbeats extend a running batch by it.
    #[arg(long, env = "SPILLWAY_VISIBILITY_TIMEOUT_SECS", default_value_t = 30)]
    pub visibility_timeout_secs: u64,

    /// How often a running batch extends its visibility, in seconds (under the timeout).
    #[arg(long, env = "SPILLWAY_HEARTBEAT_SECS", default_value_t = 10)]
    pub heartbeat_secs: u64,

    /// Most batches written to the store at once: the store's concurrency cap.
    #[arg(long, env = "SPILLWAY_MAX_CONCURRENT_BATCHES", default_value_t = 2)]
    pub max_concurrent_batches: usize,

    /// Most events written to the store per second: the store's rate cap (0 = no cap).
    #[arg(long, env = "SPILLWAY_WRITE_CAP_EPS", default_value_t = 20_000)]
    pub write_cap_eps: u32,

    /// Events the write cap lets through at once after a quiet spell.
    #[arg(long, env = "SPILLWAY_WRITE_BURST", default_value_t = 1_000, value_parser = shared::settings::at_least_one::<u32>)]
    pub write_burst: u32,

    /// Consecutive transient store failures that open the circuit breaker (stop receiving).
    #[arg(long, env = "SPILLWAY_BREAKER_FAILURES", default_value_t = 3)]
    pub breaker_failures: u32,

    /// First cool-down of an open breaker before it probes the store, in seconds (doubles).
    #[arg(long, env = "SPILLWAY_BREAKER_COOLDOWN_SECS", default_value_t = 5)]
    pub breaker_cooldown_secs: u64,

    /// Longest breaker cool-down, in seconds.
    #[arg(long, env = "SPILLWAY_BREAKER_MAX_COOLDOWN_SECS", default_value_t = 60)]
    pub breaker_max_cooldown_secs: u64,

    /// First retry delay of a transient failure, in seconds (doubles per receive, jittered).
    #[arg(long, env = "SPILLWAY_RETRY_MIN_SECS", default_value_t = 1, value_parser = shared::settings::at_least_one::<u64>)]
    pub retry_min_secs: u64,

    /// Longest retry delay, in seconds.
    #[arg(long, env = "SPILLWAY_RETRY_MAX_SECS", default_value_t = 300, value_parser = shared::settings::at_least_one::<u64>)]
    pub retry_max_secs: u64,

    /// Lambda: a record is started only while this much time (ms) is left before the
    /// invocation's deadline; later ones are reported in `batchItemFailures`.
    #[arg(
        long,
        env = "SPILLWAY_LAMBDA_DEADLINE_MARGIN_MS",
        default_value_t = 2_000
    )]
    pub lambda_deadline_margin_ms: u64,

    /// Lambda: CloudWatch namespace of the metrics each invocation logs in Embedded Metric
    /// Format (records, events written, duplicates, dead letters, retried, requeued, cold
    /// start); off when unset or empty.
    #[arg(long, env = "SPILLWAY_EMF_NAMESPACE")]
    pub emf_namespace: Option<String>,
}

impl WorkerSettings {
    /// The batch core's configuration (retry delays).
    pub fn core_config(&self) -> CoreConfig {
        CoreConfig {
            min_retry_delay: Duration::from_secs(self.retry_min_secs.max(1)),
            max_retry_delay: Duration::from_secs(self.retry_max_secs.max(1)),
            ..CoreConfig::default()
        }
    }

    /// The Lambda handler's configuration.
    pub fn lambda_config(&self) -> LambdaConfig {
        LambdaConfig {
            core: self.core_config(),
            deadline_margin: Duration::from_millis(self.lambda_deadline_margin_ms),
            max_consecutive_failures: self.breaker_failures.max(1) as usize,
        }
    }

    /// The poller configuration these settings describe.
    pub fn poller_config(&self) -> PollerConfig {
        PollerConfig {
            loops: self.worker_loops,
            receive_wait: Duration::from_secs(self.receive_wait_secs),
            max_batch_events: self.batch_max_events,
            max_batch_wait: Duration::from_millis(self.batch_max_wait_ms),
            visibility_timeout: Duration::from_secs(self.visibility_timeout_secs),
            heartbeat_every: Duration::from_secs(self.heartbeat_secs),
            max_concurrent_batches: self.max_concurrent_batches,
            max_events_per_sec: (self.write_cap_eps > 0).then_some(self.write_cap_eps),
            burst_events: self.write_burst,
            breaker: BreakerConfig {
                failure_threshold: self.breaker_failures,
                cooldown: Duration::from_secs(self.breaker_cooldown_secs),
                max_cooldown: Duration::from_secs(self.breaker_max_cooldown_secs),
            },
            core: self.core_config(),
            ..PollerConfig::default()
        }
    }
}
