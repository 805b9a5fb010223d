//! Worker settings: every poller knob as a flag and a `SPILLWAY_…` environment variable.

use std::time::Duration;

use clap::Args;

use crate::breaker::BreakerConfig;
use crate::core::CoreConfig;
use crate::lambda::LambdaConfig;
use crate::poller::PollerConfig;

/// Settings of the batch workers: the poller's knobs, and those the Lambda handler shares
/// (retry delays, breaker threshold). `spillway dev` and `spillway-worker` take them.
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

/// Settings only the Lambda handler reads. They belong to `spillway-worker` alone, which
/// runs as a Lambda function when `AWS_LAMBDA_RUNTIME_API` is set: `spillway dev` does not
/// take them, and the poller says it ignores them.
#[derive(Debug, Clone, Args)]
pub struct LambdaSettings {
    /// Lambda: a record is started only while this much time (ms) is left before the
    /// invocation's deadline; later ones are reported in `batchItemFailures` [default: 2000].
    #[arg(long, env = "SPILLWAY_LAMBDA_DEADLINE_MARGIN_MS")]
    pub lambda_deadline_margin_ms: Option<u64>,

    /// Lambda: CloudWatch namespace of the metrics each invocation logs in Embedded Metric
    /// Format (records, events written, duplicates, dead letters, retried, requeued, cold
    /// start); off when unset or empty.
    #[arg(long, env = "SPILLWAY_EMF_NAMESPACE")]
    pub emf_namespace: Option<String>,
}

impl LambdaSettings {
    /// The Lambda handler's configuration; retry delays and the breaker threshold come from
    /// the worker settings.
    pub fn lambda_config(&self, worker: &WorkerSettings) -> LambdaConfig {
        LambdaConfig {
            core: worker.core_config(),
            deadline_margin: self.lambda_deadline_margin_ms.map_or(
                LambdaConfig::default().deadline_margin,
                Duration::from_millis,
            ),
            max_consecutive_failures: worker.breaker_failures.max(1) as usize,
        }
    }

    /// What the poller ignores of these settings, in a sentence naming them, when any is set.
    pub fn ignored_by_poller(&self) -> Option<String> {
        let mut set = Vec::new();
        if self.lambda_deadline_margin_ms.is_some() {
            set.push("SPILLWAY_LAMBDA_DEADLINE_MARGIN_MS (--lambda-deadline-margin-ms)");
        }
        if self
            .emf_namespace
            .as_deref()
            .is_some_and(|ns| !ns.is_empty())
        {
            set.push("SPILLWAY_EMF_NAMESPACE (--emf-namespace)");
        }
        let (named, applies, is) = match set.as_slice() {
            [] => return None,
            [one] => ((*one).to_owned(), "applies", "is"),
            _ => (set.join(" and "), "apply", "are"),
        };
        Some(format!(
            "{named} only {applies} on Lambda (AWS_LAMBDA_RUNTIME_API set) and {is} ignored by the poller; its metrics are on --metrics-listen"
        ))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Worker {
        #[command(flatten)]
        worker: WorkerSettings,
        #[command(flatten)]
        lambda: LambdaSettings,
    }

    #[derive(Debug, Parser)]
    struct Dev {
        #[command(flatten)]
        worker: WorkerSettings,
    }

    #[test]
    fn the_lambda_settings_are_named_when_the_poller_is_given_them() {
        let none = Worker::parse_from(["w"]);
        assert_eq!(none.lambda.ignored_by_poller(), None);
        assert_eq!(
            none.lambda.lambda_config(&none.worker).deadline_margin,
            Duration::from_secs(2)
        );
        let empty = Worker::parse_from(["w", "--emf-namespace", ""]);
        assert_eq!(empty.lambda.ignored_by_poller(), None);

        let one = Worker::parse_from(["w", "--lambda-deadline-margin-ms", "500"]);
        assert_eq!(
            one.lambda.lambda_config(&one.worker).deadline_margin,
            Duration::from_millis(500)
        );
        let said = one.lambda.ignored_by_poller().unwrap();
        assert!(
            said.starts_with("SPILLWAY_LAMBDA_DEADLINE_MARGIN_MS (--lambda-deadline-margin-ms) only applies on Lambda")
                && said.contains("is ignored by the poller"),
            "{said}"
        );

        let both = Worker::parse_from([
            "w",
            "--lambda-deadline-margin-ms",
            "500",
            "--emf-namespace",
            "Spillway",
        ]);
        let said = both.lambda.ignored_by_poller().unwrap();
        assert!(
            said.contains("and SPILLWAY_EMF_NAMESPACE (--emf-namespace) only apply on Lambda")
                && said.contains("are ignored"),
            "{said}"
        );
    }

    #[test]
    fn the_worker_settings_alone_do_not_take_the_lambda_flags() {
        for flag in ["--emf-namespace", "--lambda-deadline-margin-ms"] {
            let err = Dev::try_parse_from(["dev", flag, "1"]).unwrap_err();
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::UnknownArgument,
                "{flag}"
            );
        }
    }
}
