//! Test harness for Spillway's end-to-end tests.
//!
//! # Layout
//! - [`spawn_ingest`]: the ingest API on a real socket (port 0) over a given publisher.
//! - [`TestApp`]: its address, a client, and a clean shutdown.
//! - [`localstack`]: LocalStack reachability and throw-away topics/queues.
//! - [`dlq`]: dead letters, the `spillway dlq` CLI as a child process, whole-queue reads.
//! - [`dev_process`]: `spillway dev` as a child process, for crash tests.
//! - [`lambda_emulator`]: a Lambda Runtime API emulator running the compiled binaries.
//! - [`lambda_events`]: SQS, API Gateway v1/v2 and Function URL event fixtures.
//! - [`checker`]: the no-loss checker (acknowledged ids vs a store, rollups vs raw events).
//! - [`sqlite_view`]: the checker's view of the SQLite store.
//! - [`kafka`]: the mock Kafka cluster, test settings and a topic reader.
//! - [`postgres`]: a throw-away database on the shared server, and a private server a fault
//!   test may stop and restart.
//! - [`pipeline`]: `spillway-ingest`, `spillway-worker` and `spillway loadgen` as child
//!   processes over one embedded broker, for fault tests.
//! - [`faults`]: fault injectors: a source that delivers every message three times, and a
//!   TCP proxy that drops responses.

pub mod checker;
pub mod dev_process;
pub mod dlq;
pub mod faults;
pub mod kafka;
pub mod lambda_emulator;
pub mod lambda_events;
pub mod localstack;
pub mod pipeline;
pub mod postgres;
pub mod sqlite_view;

use std::net::SocketAddr;
use std::sync::Arc;

use ingest_api::auth::{AdvertiserScope, ApiKey, ApiKeys};
use ingest_api::{serve, AppState, IngestConfig};
use shared::Publisher;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The API key every harness app accepts for any advertiser.
pub const TEST_KEY: &str = "test-key";

/// A running ingest API.
#[derive(Debug)]
pub struct TestApp {
    /// Where it listens.
    pub addr: SocketAddr,
    /// A client for it.
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<std::io::Result<()>>,
}

impl TestApp {
    /// `http://addr/v1/events`.
    pub fn events_url(&self) -> String {
        format!("http://{}/v1/events", self.addr)
    }

    /// A POST to `/v1/events` with the test key.
    pub fn post_events(&self) -> reqwest::RequestBuilder {
        self.client.post(self.events_url()).bearer_auth(TEST_KEY)
    }

    /// Signals shutdown and waits for the server to finish its requests in flight.
    ///
    /// # Errors
    /// The server's I/O error.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.server).await??;
        Ok(())
    }
}

/// Starts the ingest API on 127.0.0.1 port 0 over `publisher`, accepting [`TEST_KEY`].
///
/// # Errors
/// When the socket cannot be bound.
pub async fn spawn_ingest(
    publisher: Arc<dyn Publisher>,
    config: IngestConfig,
) -> anyhow::Result<TestApp> {
    let keys = ApiKeys::new(vec![ApiKey::from_plain(
        TEST_KEY,
        "test",
        AdvertiserScope::Any,
    )]);
    let state = AppState::new(publisher, keys, config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, state, async {
        let _ = stopped.await;
    }));
    Ok(TestApp {
        addr,
        // A fresh connection per request: a request the server answers before reading its
        // body (413 over the wire limit) ends with the server closing the connection, and a
        // pooled client could send the next request on it as it closes (`IncompleteMessage`).
        client: reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()?,
        stop: Some(stop),
        server,
    })
}
