//! The SDK clients' HTTPS client (`shared::aws::https_client`) trusts the Mozilla roots
//! compiled into the binary, never the platform trust store: a Lambda cold start must not
//! read `/etc/ssl/certs`, and HTTPS must still reach AWS endpoints.
//!
//! Offline: a local TLS server presents a certificate from a test CA that the *platform*
//! trust store is made to hold (`SSL_CERT_FILE`, `SSL_CERT_DIR`, which the SDK's native-roots
//! loading honours). The SDK's native-roots client completes the handshake with it (the
//! control: the server and the override work); Spillway's client refuses the certificate.
//! The fixtures (`tests/fixtures/tls`) are a throwaway CA and `localhost` key made with
//! `openssl` for this test, valid until 2125.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::config::retry::RetryConfig;
use aws_sdk_sqs::config::{Credentials, Region, SharedHttpClient};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tls")
            .join(name),
    )
    .unwrap()
}

/// A TLS server on `127.0.0.1` presenting `localhost.pem`; counts completed handshakes and
/// answers every request `400` (the SQS client only has to get that far).
async fn tls_server() -> (u16, Arc<AtomicUsize>) {
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&fixture("localhost.pem"))
            .collect::<Result<_, _>>()
            .unwrap();
    let key = PrivateKeyDer::from_pem_slice(&fixture("localhost.key")).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let handshakes = Arc::new(AtomicUsize::new(0));
    let counted = handshakes.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            let counted = counted.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                let mut buf = vec![0u8; 64 * 1024];
                let _ = tls.read(&mut buf).await;
                let body = r#"{"__type":"InvalidAction","message":"test server"}"#;
                let response = format!(
                    "HTTP/1.1 400 Bad Request\r\ncontent-type: application/x-amz-json-1.0\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(response.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (port, handshakes)
}

fn sqs_client(http_client: SharedHttpClient, port: u16) -> aws_sdk_sqs::Client {
    let config = aws_sdk_sqs::Config::builder()
        .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "test"))
        .endpoint_url(format!("https://localhost:{port}"))
        .retry_config(RetryConfig::disabled())
        .http_client(http_client)
        .build();
    aws_sdk_sqs::Client::from_conf(config)
}

#[tokio::test]
async fn the_sdk_https_client_ignores_the_platform_trust_store() {
    // Before any client exists: the SDK loads the native roots once per process.
    let empty_dir = std::env::temp_dir().join(format!("spillway-no-certs-{}", std::process::id()));
    std::fs::create_dir_all(&empty_dir).unwrap();
    let ca_file = empty_dir.with_extension("pem");
    std::fs::write(&ca_file, fixture("test-ca.pem")).unwrap();
    std::env::set_var("SSL_CERT_FILE", &ca_file);
    std::env::set_var("SSL_CERT_DIR", &empty_dir);

    let (port, handshakes) = tls_server().await;
    let timeout = Duration::from_secs(20);

    // Control: the SDK's default TLS context (native roots) trusts the test CA.
    let native = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::AwsLc,
        ))
        .build_https();
    let err = tokio::time::timeout(timeout, sqs_client(native, port).list_queues().send())
        .await
        .unwrap()
        .expect_err("the test server answers 400");
    assert!(
        err.as_service_error().is_some(),
        "native roots: expected the server's 400 after a handshake, got {}",
        aws_sdk_sqs::error::DisplayErrorContext(&err)
    );
    assert_eq!(handshakes.load(Ordering::SeqCst), 1);

    // Spillway's client: the same server's certificate is not trusted. Creating the SDK
    // client builds no TLS connector; the first request builds one, later ones reuse it.
    let built = shared::aws::tls_connectors_built();
    let client = sqs_client(shared::aws::https_client(), port);
    assert_eq!(
        shared::aws::tls_connectors_built(),
        built,
        "at client creation"
    );
    let err = tokio::time::timeout(timeout, client.list_queues().send())
        .await
        .unwrap()
        .expect_err("the certificate is from an untrusted CA");
    assert_eq!(
        shared::aws::tls_connectors_built(),
        built + 1,
        "at the first request"
    );
    let text = format!("{}", aws_sdk_sqs::error::DisplayErrorContext(&err));
    assert!(
        matches!(err, aws_sdk_sqs::error::SdkError::DispatchFailure(_)),
        "expected a dispatch failure, got {text}"
    );
    assert!(
        text.contains("UnknownIssuer"),
        "expected an unknown-issuer certificate error, got {text}"
    );
    assert_eq!(handshakes.load(Ordering::SeqCst), 1, "no second handshake");
    let again = tokio::time::timeout(timeout, client.list_queues().send())
        .await
        .unwrap();
    assert!(again.is_err(), "still untrusted");
    assert_eq!(shared::aws::tls_connectors_built(), built + 1, "reused");

    std::fs::remove_dir_all(&empty_dir).unwrap();
    std::fs::remove_file(&ca_file).unwrap();
}

#[test]
fn the_compiled_in_roots_hold_the_amazon_roots_and_all_parse() {
    // The same parsing the SDK applies to the PEM trust store (it panics on a bad cert).
    let pem = shared::aws::compiled_in_roots_pem();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(certs.len(), webpki_root_certs::TLS_SERVER_ROOT_CERTS.len());
    assert!(certs.len() > 100, "{} roots", certs.len());
    let mut store = rustls::RootCertStore::empty();
    for cert in &certs {
        store.add(cert.clone()).unwrap();
    }
    // AWS endpoints chain to Amazon Root CA 1–4, cross-signed by Starfield Services G2.
    for subject in [
        "Amazon Root CA 1",
        "Amazon Root CA 2",
        "Amazon Root CA 3",
        "Amazon Root CA 4",
        "Starfield Services Root Certificate Authority - G2",
    ] {
        assert!(
            certs
                .iter()
                .any(|c| c.windows(subject.len()).any(|w| w == subject.as_bytes())),
            "no root named {subject:?}"
        );
    }
}
