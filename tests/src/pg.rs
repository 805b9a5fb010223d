//! PostgreSQL fixtures: a throw-away database per test on the local server (127.0.0.1:5432,
//! trust auth; `scripts/ensure-postgres.sh` provides it, `SPILLWAY_TEST_PG` overrides it).
//! Under `CI=true` an unreachable server panics (a failure, never a skip).

use std::time::Duration;

use tokio_postgres::NoTls;

/// The server, without a database name.
pub fn server_url() -> String {
    std::env::var("SPILLWAY_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// A client on `url`, its connection driven by a task of its own.
///
/// # Errors
/// When the server refuses.
pub async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// A database of its own for one test, dropped (connections and all) when it goes.
#[derive(Debug)]
pub struct TestDb {
    /// Its name.
    pub name: String,
    /// Its URL.
    pub url: String,
}

impl TestDb {
    /// Creates `spillway_test_<random>`; `None` (with a loud message) when PostgreSQL cannot
    /// be reached outside CI.
    ///
    /// # Panics
    /// Under `CI=true` when PostgreSQL is unreachable, or when the database cannot be created.
    #[allow(clippy::expect_used)]
    pub async fn create() -> Option<Self> {
        let admin_url = format!("{}/postgres", server_url());
        let admin = match tokio::time::timeout(Duration::from_secs(5), connect(&admin_url)).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Self::unreachable(&admin_url, &e.to_string()),
            Err(_) => return Self::unreachable(&admin_url, "timed out"),
        };
        let name = format!("spillway_test_{:016x}", rand::random::<u64>());
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        let url = format!("{}/{name}", server_url());
        Some(Self { name, url })
    }

    fn unreachable(url: &str, why: &str) -> Option<Self> {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "PostgreSQL at {url} is required under CI=true but unreachable: {why}"
        );
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            format!("\n!!!!! SKIPPED: PostgreSQL at {url} unreachable ({why}); run scripts/ensure-postgres.sh !!!!!\n").as_bytes(),
        );
        None
    }

    /// A client on this database.
    ///
    /// # Errors
    /// When the server refuses.
    pub async fn client(&self) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        connect(&self.url).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (name, admin_url) = (self.name.clone(), format!("{}/postgres", server_url()));
        // Drop may run inside a runtime: the async cleanup gets a thread of its own.
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok(admin) = connect(&admin_url).await {
                    let _ = admin
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        });
        let _ = cleanup.join();
    }
}
