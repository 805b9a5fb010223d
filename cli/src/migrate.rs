//! `spillway migrate`: applies the PostgreSQL store's pending migrations.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use shared::PostgresSink;

/// Options of `spillway migrate`.
#[derive(Debug, Args)]
pub(crate) struct MigrateArgs {
    /// PostgreSQL connection URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = shared::settings::DEFAULT_DATABASE_URL,
        hide_env_values = true
    )]
    pub database_url: String,

    /// PEM file of the certificates that may sign the server's (RDS/Aurora: the region's or
    /// the global bundle), as the workers take it; with sslmode=require in the URL.
    #[arg(long, env = "SPILLWAY_PG_CA_FILE")]
    pub pg_ca_file: Option<PathBuf>,

    /// DATABASE_URL leads to a pooler in transaction mode (PgBouncer pool_mode=transaction),
    /// as the workers take it: no session setting is left on the pooler's server connections.
    #[arg(long, env = "SPILLWAY_PG_TRANSACTION_POOLING")]
    pub pg_transaction_pooling: bool,
}

/// Applies pending migrations and says which.
#[allow(clippy::print_stdout)]
pub(crate) async fn run(args: MigrateArgs) -> anyhow::Result<()> {
    let sink = PostgresSink::new(&shared::PostgresConfig {
        ca_file: args.pg_ca_file,
        transaction_pooling: args.pg_transaction_pooling,
        ..shared::PostgresConfig::new(args.database_url)
    })
    .context("PostgreSQL settings")?;
    let applied = sink.migrate().await.context("applying migrations")?;
    if applied.is_empty() {
        println!("Schema up to date; nothing applied");
    } else {
        println!("Applied migrations: {applied:?}");
    }
    Ok(())
}
