//! AWS adapters: the SNS publisher and the SQS source, with clients built once from the
//! standard AWS configuration (`AWS_ENDPOINT_URL`, `AWS_REGION`, profiles, …). There is no
//! LocalStack-specific code path: LocalStack is just an endpoint.
//!
//! # Layout
//! - [`sns`]: `SnsPublisher` (`PublishBatch`, per-entry retries, FIFO ids).
//! - [`sqs`]: `SqsSource` (long poll, batch delete, visibility, send-then-delete DLQ).
//! - [`ApiCalls`]: how many API calls an adapter made, by operation (request-efficiency
//!   figures and tests).

pub mod sns;
pub mod sqs;

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

/// A snapshot of the API calls an adapter made, by operation name (`PublishBatch`,
/// `ReceiveMessage`, …). Each call the adapter sends counts once, whatever its outcome; the
/// SDK's own transparent retries of a call are not counted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApiCalls(pub BTreeMap<&'static str, u64>);

impl ApiCalls {
    /// Calls of every operation.
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    /// Calls of one operation (0 when never called).
    pub fn get(&self, operation: &str) -> u64 {
        self.0.get(operation).copied().unwrap_or(0)
    }
}

/// Counts API calls by operation; shared by the clones of an adapter.
#[derive(Debug, Default)]
pub(crate) struct CallCounter(Mutex<BTreeMap<&'static str, u64>>);

impl CallCounter {
    /// Counts one call of `operation`.
    pub(crate) fn count(&self, operation: &'static str) {
        *self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(operation)
            .or_default() += 1;
    }

    /// The counts so far.
    pub(crate) fn snapshot(&self) -> ApiCalls {
        ApiCalls(
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }
}

/// Loads the standard AWS configuration once per process.
pub async fn load_config() -> aws_config::SdkConfig {
    aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await
}

/// An SNS client from a loaded configuration.
pub fn sns_client(config: &aws_config::SdkConfig) -> aws_sdk_sns::Client {
    aws_sdk_sns::Client::new(config)
}

/// An SQS client from a loaded configuration.
pub fn sqs_client(config: &aws_config::SdkConfig) -> aws_sdk_sqs::Client {
    aws_sdk_sqs::Client::new(config)
}
