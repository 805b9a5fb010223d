//! AWS adapters: the SNS publisher and the SQS source, with clients built once from the
//! standard AWS configuration (`AWS_ENDPOINT_URL`, `AWS_REGION`, profiles, …). There is no
//! LocalStack-specific code path: LocalStack is just an endpoint. HTTPS trusts the Mozilla
//! roots compiled into the binary, not the platform trust store ([`https_client`]).
//!
//! # Layout
//! - [`sns`]: `SnsPublisher` (`PublishBatch`, per-entry retries, FIFO ids).
//! - [`sqs`]: `SqsSource` (long poll, batch delete, visibility, send-then-delete DLQ).
//! - [`batch`]: the entry and byte limits of a batch call, and the planner that keeps to them.
//! - [`ApiCalls`]: how many API calls an adapter made, by operation (request-efficiency
//!   figures and tests).

pub mod batch;
pub mod sns;
pub mod sqs;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
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

/// Loads the standard AWS configuration once per process, with [`https_client`] as the
/// HTTP client of every SDK client built from it.
///
/// On Lambda the credentials are read from the environment only: Lambda always gives the
/// execution role's credentials there (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
/// `AWS_SESSION_TOKEN`), and the default chain would also build, at every cold start, the
/// providers Lambda never needs (web identity builds a whole STS client with its TLS
/// connector: about 30% of the functions' init CPU). Elsewhere the default chain applies.
pub async fn load_config() -> aws_config::SdkConfig {
    let loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(https_client())
        .timeout_config(timeouts());
    let loader = if crate::lambda_init::is_lambda() {
        loader.credentials_provider(
            aws_config::environment::EnvironmentVariableCredentialsProvider::new(),
        )
    } else {
        loader
    };
    loader.load().await
}

/// Longest wait for one attempt of an API call: above SQS's 20 s long poll, so a receive is
/// never cut short, but bounded, so that a connection that stalls (a half-open TCP
/// connection, a stuck proxy) fails the attempt and the SDK retries, instead of hanging a
/// worker loop, its batch's settlement and its shutdown.
pub const ATTEMPT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Longest wait for an API call, its retries included.
pub const OPERATION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(90);

fn timeouts() -> aws_config::timeout::TimeoutConfig {
    aws_config::timeout::TimeoutConfig::builder()
        .connect_timeout(std::time::Duration::from_secs(5))
        .operation_attempt_timeout(ATTEMPT_TIMEOUT)
        .operation_timeout(OPERATION_TIMEOUT)
        .build()
}

/// The HTTPS client of the SDK clients: the SDK's default one (hyper, rustls with aws-lc,
/// the proxy from `HTTPS_PROXY`/`NO_PROXY`), except that it trusts the Mozilla root
/// certificates compiled into the binary ([`webpki_root_certs`], which include the Amazon
/// roots AWS endpoints chain to) instead of the platform trust store.
///
/// The SDK builds a connector when a client is created, so that its trust store is ready
/// before the first request; with the platform store that meant reading the CA bundle and
/// every file of the certificate directory (`/etc/ssl/certs`) at each process start — the
/// largest part of a Lambda cold start's init. The compiled-in roots cost no file access.
/// Plain `http://` endpoints (LocalStack) are unaffected.
///
/// The TLS connector is built once per HTTP client (and per timeout setting), at its first
/// request. The SDK also asks for one when each SDK client is created, without settings, only
/// so that the platform roots are loaded before the first request, and throws it away
/// (`validate_base_client_config` in aws-smithy-http-client 1.5); with compiled-in roots there
/// is nothing to load early, and building a TLS connector (turning ~150 PEM roots into a
/// rustls root store) was the largest part of a Lambda cold start's init left. That call gets
/// a plain-HTTP connector instead; [`tls_connectors_built`] counts the real ones.
pub fn https_client() -> aws_sdk_sqs::config::SharedHttpClient {
    use aws_smithy_http_client::proxy::ProxyConfig;
    use aws_smithy_http_client::tls::{self, TlsContext, TrustStore};
    use aws_smithy_http_client::Connector;

    let trust_store = TrustStore::empty().with_pem_certificate(compiled_in_roots_pem());
    let tls_context = TlsContext::builder()
        .with_trust_store(trust_store)
        .build()
        // `build` only moves its fields today; should it start validating, a failure here
        // would be a defect of this function, not of the environment.
        .unwrap_or_else(|e| unreachable!("TLS context from compiled-in roots: {e}"));
    // As `aws_smithy_runtime`'s `default_https_client`, with only the TLS context changed.
    aws_smithy_http_client::Builder::new().build_with_connector_fn(move |settings, components| {
        if settings.is_none() && components.is_none() {
            // The discarded warm-up connector (see above): no TLS context to build.
            return Connector::builder().build_http();
        }
        TLS_CONNECTORS_BUILT.fetch_add(1, Ordering::Relaxed);
        let mut builder = aws_smithy_http_client::ConnectorBuilder::default()
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::AwsLc,
            ))
            .tls_context(tls_context.clone());
        builder.set_connector_settings(settings.cloned());
        if let Some(components) = components {
            builder.set_sleep_impl(components.sleep_impl());
        }
        builder.set_proxy_config(Some(ProxyConfig::from_env()));
        builder.build()
    })
}

static TLS_CONNECTORS_BUILT: AtomicUsize = AtomicUsize::new(0);

/// How many TLS connectors the [`https_client`]s of this process have built: one per HTTP
/// client and timeout setting, at its first request, none when SDK clients are created.
pub fn tls_connectors_built() -> usize {
    TLS_CONNECTORS_BUILT.load(Ordering::Relaxed)
}

/// The compiled-in root certificates ([`webpki_root_certs::TLS_SERVER_ROOT_CERTS`]) as one
/// PEM document, the form the SDK's trust store takes: about 150 certificates, encoded in
/// well under a millisecond.
pub fn compiled_in_roots_pem() -> Vec<u8> {
    use base64::Engine as _;

    let roots = webpki_root_certs::TLS_SERVER_ROOT_CERTS;
    let mut pem = Vec::with_capacity(roots.iter().map(|c| c.len() * 4 / 3 + 80).sum());
    for cert in roots {
        pem.extend_from_slice(b"-----BEGIN CERTIFICATE-----\n");
        let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
        for line in b64.as_bytes().chunks(64) {
            pem.extend_from_slice(line);
            pem.push(b'\n');
        }
        pem.extend_from_slice(b"-----END CERTIFICATE-----\n");
    }
    pem
}

/// An SNS client from a loaded configuration.
pub fn sns_client(config: &aws_config::SdkConfig) -> aws_sdk_sns::Client {
    aws_sdk_sns::Client::new(config)
}

/// An SQS client from a loaded configuration.
pub fn sqs_client(config: &aws_config::SdkConfig) -> aws_sdk_sqs::Client {
    aws_sdk_sqs::Client::new(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_api_call_is_bounded_in_time() {
        let config = load_config().await;
        let t = config.timeout_config().expect("a timeout config");
        assert_eq!(t.operation_attempt_timeout(), Some(ATTEMPT_TIMEOUT));
        assert_eq!(t.operation_timeout(), Some(OPERATION_TIMEOUT));
        // A long poll must fit an attempt.
        assert!(ATTEMPT_TIMEOUT > std::time::Duration::from_secs(sqs::MAX_WAIT_SECS));
    }
}
