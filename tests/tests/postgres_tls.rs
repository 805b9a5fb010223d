//! PostgreSQL over TLS: RDS and Aurora (PostgreSQL 15 and later) refuse unencrypted sessions
//! by default, and the sink used to connect in plain text only, so against them nothing was
//! ever stored (every write failed as transient: the breaker open, the queue aging out).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use shared::event::ValidationPolicy;
use shared::synthetic::SyntheticEvents;
use shared::{AdEvent, PostgresConfig, PostgresError, PostgresSink, Sink, SystemClock};
use tests::postgres::{connect, PrivatePostgres};

fn events(n: usize) -> Vec<AdEvent> {
    let mut g = SyntheticEvents::new(31, 3);
    (0..n)
        .map(|_| AdEvent::from_json(g.event(), &ValidationPolicy::default(), &SystemClock).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_requires_tls_is_written_to_over_a_verified_connection() {
    let Some(pg) = PrivatePostgres::start() else {
        return;
    };
    let ca = pg.require_tls().unwrap();
    let tls_url = format!("{}?sslmode=require", pg.url());

    // In plain text, as before: refused by the server.
    let plain = PostgresSink::new(&PostgresConfig::new(pg.url())).unwrap();
    let err = plain.migrate().await.unwrap_err().to_string();
    assert!(err.contains("no encryption"), "{err}");

    // Encrypted, but the server's certificate is signed by nobody it trusts: refused.
    let untrusted = PostgresSink::new(&PostgresConfig::new(tls_url.clone())).unwrap();
    let err = untrusted.migrate().await.unwrap_err().to_string();
    assert!(err.contains("certificate"), "{err}");

    // A CA file without sslmode=require is a mistake, said at start.
    let err = PostgresSink::new(&PostgresConfig {
        ca_file: Some(ca.clone()),
        ..PostgresConfig::new(pg.url())
    })
    .unwrap_err();
    assert!(matches!(err, PostgresError::Tls { .. }), "{err}");

    // `spillway migrate`, as a Lambda deploy runs it against RDS: it used to take no CA
    // file, so it could only fail the certificate check.
    let migrate = |ca: Option<&std::path::Path>| {
        let mut cmd = std::process::Command::new(tests::dev_process::spillway_bin().unwrap());
        cmd.arg("migrate")
            .env("DATABASE_URL", &tls_url)
            .env_remove("SPILLWAY_PG_CA_FILE");
        if let Some(ca) = ca {
            cmd.env("SPILLWAY_PG_CA_FILE", ca);
        }
        cmd.output().unwrap()
    };
    let out = migrate(None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("certificate"),
        "{stderr}"
    );
    let out = migrate(Some(&ca));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("Applied migrations"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // With the CA: migrated and written, over TLS.
    let sink = PostgresSink::new(&PostgresConfig {
        ca_file: Some(ca),
        ..PostgresConfig::new(tls_url)
    })
    .unwrap();
    sink.migrate().await.unwrap();
    let batch = events(200);
    assert_eq!(sink.write(&batch).await.unwrap().inserted, 200);
    assert_eq!(sink.events_stored().await.unwrap(), 200);
    let admin = connect(&pg.socket_url()).await.unwrap();
    let row = admin
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE s.ssl)
             FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.application_name = 'spillway'",
            &[],
        )
        .await
        .unwrap();
    let (sessions, encrypted): (i64, i64) = (row.get(0), row.get(1));
    assert!(sessions > 0);
    assert_eq!(
        encrypted, sessions,
        "every session of the sink is encrypted"
    );
}
