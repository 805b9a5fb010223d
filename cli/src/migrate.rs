//! `spillway migrate`: applies the PostgreSQL store's pending migrations.

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
        default_value = "postgres://postgres@127.0.0.1:5432/postgres",
        hide_env_values = true
    )]
    pub database_url: String,
}

/// Applies pending migrations and says which.
#[allow(clippy::print_stdout)]
pub(crate) async fn run(args: MigrateArgs) -> anyhow::Result<()> {
    let sink = PostgresSink::new(&shared::PostgresConfig::new(args.database_url))
        .context("PostgreSQL settings")?;
    let applied = sink.migrate().await.context("applying migrations")?;
    if applied.is_empty() {
        println!("Schema up to date; nothing applied");
    } else {
        println!("Applied migrations: {applied:?}");
    }
    Ok(())
}
