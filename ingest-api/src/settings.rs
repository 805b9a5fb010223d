//! Operator settings: every knob is a flag and a `SPILLWAY_…` environment variable with a
//! default; the doc comment of each field is its entry in `--help`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::auth::{ApiKeys, KeyConfigError};
use crate::body::Limits;
use crate::IngestConfig;
use shared::envelope::{ContentEncoding, EnvelopeConfig, DEFAULT_BUDGET_BYTES};
use shared::event::{TimeWindow, ValidationPolicy};

/// Settings of the HTTP ingest API.
#[derive(Debug, Clone, Args)]
pub struct IngestSettings {
    /// Address the HTTP server listens on.
    #[arg(
        long,
        env = "SPILLWAY_LISTEN",
        default_value = "127.0.0.1:8080",
        value_parser = shared::settings::listen_addr
    )]
    pub listen: SocketAddr,

    /// Longest wait, in seconds, for a request's headers (also how long an idle keep-alive
    /// connection stays open) and for its body: a slower client is disconnected (headers) or
    /// answered 400 (body), so slow or idle clients cannot hold connections forever.
    #[arg(long, env = "SPILLWAY_CLIENT_TIMEOUT_SECS", default_value_t = 30, value_parser = shared::settings::at_least_one::<u64>)]
    pub client_timeout_secs: u64,

    /// Most client connections open at once; more wait in the listen backlog.
    #[arg(long, env = "SPILLWAY_MAX_CONNECTIONS", default_value_t = 4_096, value_parser = shared::settings::at_least_one::<usize>)]
    pub max_connections: usize,

    /// File with API keys: a JSON array of {"sha256": hex, "tenant": name, "advertisers": [ids] | "*"}.
    #[arg(long, env = "SPILLWAY_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,

    /// API keys inline, same JSON as the file (added to the file's keys).
    #[arg(long, env = "SPILLWAY_API_KEYS", hide_env_values = true)]
    pub api_keys: Option<String>,

    /// Bytes the requests in flight may hold while they wait (bodies being read, envelopes
    /// being published); a request past it is answered 503 `overloaded` with `Retry-After: 1`
    /// before anything of it is accepted. Keep it well below the process's memory limit; 0
    /// means no limit.
    #[arg(long, env = "SPILLWAY_MAX_INFLIGHT_BYTES", default_value_t = crate::DEFAULT_MAX_INFLIGHT_BYTES)]
    pub max_inflight_bytes: usize,

    /// Largest request body on the wire, in bytes (413 past it).
    #[arg(long, env = "SPILLWAY_MAX_WIRE_BYTES", default_value_t = 1024 * 1024, value_parser = shared::settings::at_least_one::<usize>)]
    pub max_wire_bytes: usize,

    /// Largest request body after decompression, in bytes (413 past it; enforced while decompressing).
    #[arg(long, env = "SPILLWAY_MAX_DECODED_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_decoded_bytes: usize,

    /// Most events in one request (413 past it).
    #[arg(long, env = "SPILLWAY_MAX_EVENTS", default_value_t = 1_000, value_parser = shared::settings::at_least_one::<usize>)]
    pub max_events: usize,

    /// Largest single event, in bytes of JSON (the item is rejected past it).
    #[arg(long, env = "SPILLWAY_MAX_EVENT_BYTES", default_value_t = 32 * 1024)]
    pub max_event_bytes: usize,

    /// How far in the future `occurred_at` may be, in seconds (clock skew allowance).
    #[arg(long, env = "SPILLWAY_MAX_FUTURE_SECS", default_value_t = 300)]
    pub max_future_secs: u64,

    /// How old `occurred_at` may be, in seconds (default 7 days; a huge value, no limit).
    #[arg(long, env = "SPILLWAY_MAX_AGE_SECS", default_value_t = 7 * 24 * 3600)]
    pub max_age_secs: u64,

    /// Sustained events per second allowed per API key; 0 disables rate limiting.
    #[arg(long, env = "SPILLWAY_RATE_LIMIT_EPS", default_value_t = 200_000)]
    pub rate_limit_eps: u32,

    /// Events a key may send at once above its sustained rate (token bucket size).
    #[arg(long, env = "SPILLWAY_RATE_LIMIT_BURST", default_value_t = 400_000)]
    pub rate_limit_burst: u32,

    /// Publish attempts per request before answering 503 (at least 1).
    #[arg(long, env = "SPILLWAY_PUBLISH_ATTEMPTS", default_value_t = 3, value_parser = shared::settings::at_least_one::<u32>)]
    pub publish_attempts: u32,

    /// First delay between publish attempts, in milliseconds (doubles each time, with jitter).
    #[arg(long, env = "SPILLWAY_PUBLISH_BACKOFF_MS", default_value_t = 50)]
    pub publish_backoff_ms: u64,

    /// Longest a request's publish may take, in milliseconds, retries included; then 503.
    /// Keep it below the clients' timeout and, on Lambda, the function's (10 s in the template).
    #[arg(
        long,
        env = "SPILLWAY_PUBLISH_TIMEOUT_MS",
        default_value_t = 8_000,
        value_parser = shared::settings::at_least_one::<u64>
    )]
    pub publish_timeout_ms: u64,

    /// `Retry-After` sent with a 503 when publishing failed, in seconds.
    #[arg(long, env = "SPILLWAY_RETRY_AFTER_SECS", default_value_t = 5, value_parser = shared::settings::at_least_one::<u64>)]
    pub retry_after_secs: u64,

    /// Largest envelope body, in bytes (default: an SNS message minus room for attributes).
    #[arg(long, env = "SPILLWAY_ENVELOPE_BUDGET_BYTES", default_value_t = DEFAULT_BUDGET_BYTES)]
    pub envelope_budget_bytes: usize,

    /// Envelope body encoding: identity (plain JSON) or zstd (compressed, base64).
    #[arg(long, env = "SPILLWAY_ENVELOPE_ENCODING", default_value = "identity")]
    pub envelope_encoding: ContentEncoding,

    /// One event type per envelope (true) so `spillway-types` filter policies route exactly;
    /// false packs mixed types (fewer messages).
    #[arg(long, env = "SPILLWAY_ENVELOPE_SPLIT_BY_TYPE", default_value_t = true, action = clap::ArgAction::Set)]
    pub envelope_split_by_type: bool,

    /// Group events into this many key buckets by (advertiser, campaign) and key each
    /// envelope by its bucket, so one campaign's events stay in order on one partition of a
    /// keyed broker. Default: 32 with --broker kafka, none (0) otherwise.
    #[arg(long, env = "SPILLWAY_ENVELOPE_KEY_BUCKETS")]
    pub envelope_key_buckets: Option<u32>,
}

impl IngestSettings {
    /// The API keys from the file and the inline setting.
    ///
    /// # Errors
    /// [`KeyConfigError`] when either source cannot be read or parsed.
    pub fn load_keys(&self) -> Result<ApiKeys, KeyConfigError> {
        let mut keys = ApiKeys::default();
        if let Some(path) = &self.api_keys_file {
            keys.extend(ApiKeys::from_file(path)?, &path.display().to_string())?;
        }
        if let Some(json) = &self.api_keys {
            keys.extend(
                ApiKeys::parse(json, "SPILLWAY_API_KEYS")?,
                "SPILLWAY_API_KEYS",
            )?;
        }
        Ok(keys)
    }

    /// Refuses an envelope budget the broker cannot take: on SNS, over 256 KiB less the
    /// room kept for attributes, every request that fills an envelope would be refused by
    /// SNS and answered 503 for good.
    ///
    /// # Errors
    /// What is wrong and what is allowed.
    pub fn check_for(&self, broker: shared::settings::BrokerKind) -> Result<(), String> {
        if broker == shared::settings::BrokerKind::Aws
            && self.envelope_budget_bytes > DEFAULT_BUDGET_BYTES
        {
            return Err(format!(
                "--envelope-budget-bytes {} is more than SNS takes in a message with its \
                 attributes (at most {DEFAULT_BUDGET_BYTES})",
                self.envelope_budget_bytes
            ));
        }
        Ok(())
    }

    /// The runtime configuration for a broker that is keyed (Kafka: envelopes get a
    /// partition key, 32 buckets unless `--envelope-key-buckets` says otherwise) or not.
    pub fn config_for(&self, keyed_broker: bool) -> IngestConfig {
        let mut config = self.config();
        if keyed_broker && self.envelope_key_buckets.is_none() {
            config.envelope.key_buckets = shared::envelope::DEFAULT_KEY_BUCKETS;
        }
        config
    }

    /// The limits on client connections (at least 1 s and 1 connection).
    pub fn connection_limits(&self) -> crate::ConnectionLimits {
        let timeout = Duration::from_secs(self.client_timeout_secs.max(1));
        crate::ConnectionLimits {
            header_read_timeout: timeout,
            body_read_timeout: timeout,
            max_connections: self.max_connections.max(1),
        }
    }

    /// The runtime configuration these settings describe.
    pub fn config(&self) -> IngestConfig {
        IngestConfig {
            limits: Limits {
                max_wire_bytes: self.max_wire_bytes,
                max_decoded_bytes: self.max_decoded_bytes,
                max_events: self.max_events,
                max_event_bytes: self.max_event_bytes,
            },
            policy: ValidationPolicy {
                window: Some(TimeWindow {
                    max_future: seconds(self.max_future_secs),
                    max_age: seconds(self.max_age_secs),
                }),
            },
            envelope: EnvelopeConfig {
                budget_bytes: self.envelope_budget_bytes,
                encoding: self.envelope_encoding,
                split_by_type: self.envelope_split_by_type,
                key_buckets: self.envelope_key_buckets.unwrap_or(0),
                ..EnvelopeConfig::default()
            },
            max_inflight_bytes: self.max_inflight_bytes,
            rate_limit_eps: self.rate_limit_eps,
            rate_limit_burst: self.rate_limit_burst,
            publish_attempts: self.publish_attempts.max(1),
            publish_backoff: Duration::from_millis(self.publish_backoff_ms),
            retry_after: Duration::from_secs(self.retry_after_secs),
            publish_timeout: Duration::from_millis(self.publish_timeout_ms),
        }
    }
}

/// A time-window setting as a duration (saturating: a huge value means no limit).
fn seconds(secs: u64) -> time::Duration {
    time::Duration::seconds(i64::try_from(secs).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        settings: IngestSettings,
    }

    #[test]
    fn a_keyed_broker_gets_key_buckets_unless_told_otherwise() {
        let cli = Cli::parse_from(["spillway-ingest"]);
        assert_eq!(
            cli.settings.config_for(true).envelope.key_buckets,
            shared::envelope::DEFAULT_KEY_BUCKETS
        );
        assert_eq!(cli.settings.config_for(false).envelope.key_buckets, 0);
        let cli = Cli::parse_from(["spillway-ingest", "--envelope-key-buckets", "0"]);
        assert_eq!(cli.settings.config_for(true).envelope.key_buckets, 0);
    }

    #[test]
    fn an_envelope_budget_over_what_sns_takes_is_refused_on_sns_only() {
        use shared::settings::BrokerKind;
        let over = Cli::parse_from(["spillway-ingest", "--envelope-budget-bytes", "300000"]);
        let err = over.settings.check_for(BrokerKind::Aws).unwrap_err();
        assert!(err.contains("more than SNS takes"), "{err}");
        assert!(over.settings.check_for(BrokerKind::Kafka).is_ok());
        let default = Cli::parse_from(["spillway-ingest"]);
        assert!(default.settings.check_for(BrokerKind::Aws).is_ok());
    }

    #[test]
    fn a_negative_time_window_is_refused_and_a_huge_one_means_no_limit() {
        assert!(Cli::try_parse_from(["spillway-ingest", "--max-future-secs", "-1"]).is_err());
        let cli = Cli::parse_from(["spillway-ingest", "--max-age-secs", "400000000000"]);
        let window = cli.settings.config_for(false).policy.window.unwrap();
        assert_eq!(window.max_age, time::Duration::seconds(400_000_000_000));
        assert_eq!(seconds(u64::MAX), time::Duration::seconds(i64::MAX));
    }
}
