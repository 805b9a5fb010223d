//! Write throughput of `PostgresSink` (raw events + rollups, one transaction per batch of 1000)
//! against a plain binary `COPY` of the same rows into an unindexed copy of `ad_events`,
//! side by side, three rounds, on a fresh random database at 127.0.0.1:5432.
//!
//! `cargo bench -p shared --bench postgres_sink` (needs PostgreSQL: scripts/ensure-postgres.sh).
//! `SPILLWAY_BENCH_PG` overrides the server URL (no database name), `SPILLWAY_BENCH_EVENTS`
//! the events per round (default 50000), `SPILLWAY_BENCH_BATCH` the events per batch (default
//! 1000, the worker's default batch), `SPILLWAY_BENCH_WRITERS` the batches in flight on each
//! side (default 1: the sink gets that many pooled connections, both COPYs that many clients,
//! each writing every N-th batch; the raw-insert column stays on one connection).
//!
//! Two more columns show where the sink's time goes: the same binary COPY into a table whose
//! only index is the `event_id` primary key (what any store that refuses a second copy of an
//! event must pay at least), and the raw insert of the sink's redelivery path
//! (`INSERT … ON CONFLICT DO NOTHING` from UNNEST) without the rollups.
//!
//! `SPILLWAY_BENCH_TRANSACTION_POOLING=1` runs the sink as behind a pooler in transaction
//! mode (`PostgresConfig::transaction_pooling`: every batch the `ON CONFLICT` statement), and
//! `SPILLWAY_BENCH_SINK_PG` (a server URL without a database name, such as a PgBouncer in
//! front of the same server) is where the sink alone connects; the COPY columns stay direct.
//!
//! `SPILLWAY_BENCH_ADS=N` draws the events from N ads (each in one campaign) within one minute
//! of each other, as a second of real traffic looks: many events per rollup row. Without it
//! the events come from 100,000 ads spread over an hour, so nearly every event opens a rollup
//! row of its own (the worst case for the rollups).
#![allow(clippy::print_stdout)] // A harness-less bench reports on stdout.

use std::error::Error;
use std::time::{Duration, Instant};

use futures::future::try_join_all;
use shared::postgres_sink::{copy_rows, COPY_COLUMNS};
use shared::synthetic::SyntheticEvents;
use shared::{AdEvent, PostgresConfig, PostgresSink, Sink, SystemClock, ValidationPolicy};
use time::OffsetDateTime;
use tokio_postgres::types::{Json, ToSql};
use tokio_postgres::NoTls;

const DEFAULT_BATCH: usize = 1000;
const ROUNDS: usize = 3;

type BoxError = Box<dyn Error + Send + Sync>;

async fn connect(url: &str) -> Result<tokio_postgres::Client, BoxError> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

fn synthetic(n: usize, ads: Option<u64>) -> Result<Vec<AdEvent>, BoxError> {
    let mut g = SyntheticEvents::new(42, 50);
    if let Some(ads) = ads {
        g = g.with_ads(ads);
    }
    let spread = if ads.is_some() { 60 } else { 3600 };
    let now = OffsetDateTime::now_utc();
    (0..n)
        .map(|i| {
            let at = now - time::Duration::seconds(i64::try_from(i % spread)?);
            AdEvent::from_json(g.event_at(at), &ValidationPolicy::default(), &SystemClock)
                .map_err(|e| format!("invalid synthetic event: {e:?}").into())
        })
        .collect()
}

/// The batches of writer `w` of `writers`: every `writers`-th batch from the `w`-th.
fn share(events: &[AdEvent], batch_size: usize, writers: usize, w: usize) -> Vec<&[AdEvent]> {
    events.chunks(batch_size).skip(w).step_by(writers).collect()
}

/// Writes every batch through the sink, `writers` batches at a time; returns the elapsed time.
async fn run_sink(
    sink: &PostgresSink,
    events: &[AdEvent],
    batch_size: usize,
    writers: usize,
) -> Result<Duration, BoxError> {
    let started = Instant::now();
    try_join_all((0..writers).map(|w| async move {
        for batch in share(events, batch_size, writers, w) {
            let report = sink.write(batch).await?;
            if report.inserted != batch.len() {
                return Err::<(), BoxError>(
                    format!("sink inserted {} of {}", report.inserted, batch.len()).into(),
                );
            }
        }
        Ok(())
    }))
    .await?;
    Ok(started.elapsed())
}

/// COPYs every batch (one COPY per batch, same batching as the sink) into `table`, one
/// connection of `clients` per writer.
async fn run_copy(
    clients: &[tokio_postgres::Client],
    table: &str,
    events: &[AdEvent],
    batch_size: usize,
) -> Result<Duration, BoxError> {
    let started = Instant::now();
    let copy = format!("COPY {table} ({COPY_COLUMNS}) FROM STDIN (FORMAT binary)");
    let copy = copy.as_str();
    try_join_all(clients.iter().enumerate().map(|(w, client)| async move {
        for batch in share(events, batch_size, clients.len(), w) {
            let rows: Vec<&AdEvent> = batch.iter().collect();
            let copied = copy_rows(client.copy_in(copy).await?, &rows).await?;
            if copied != batch.len() as u64 {
                return Err::<(), BoxError>(
                    format!("COPY wrote {copied} of {}", batch.len()).into(),
                );
            }
        }
        Ok(())
    }))
    .await?;
    Ok(started.elapsed())
}

/// The raw insert of the sink's redelivery path alone (same UNNEST, same key, no rollups) into
/// `ad_events_raw`.
async fn run_insert_only(
    client: &tokio_postgres::Client,
    events: &[AdEvent],
    batch_size: usize,
) -> Result<Duration, BoxError> {
    let statement = client
        .prepare(
            "INSERT INTO ad_events_raw (event_id, type, occurred_at, advertiser_id, campaign_id,
                ad_id, publisher_id, placement_id, cost_micros, revenue_micros, currency, country,
                device, attributes)
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::timestamptz[], $4::text[],
                $5::text[], $6::text[], $7::text[], $8::text[], $9::int8[], $10::int8[],
                $11::text[], $12::text[], $13::text[], $14::jsonb[])
             ON CONFLICT (event_id) DO NOTHING",
        )
        .await?;
    let started = Instant::now();
    for batch in events.chunks(batch_size) {
        let mut ids = Vec::with_capacity(batch.len());
        let mut sorted: Vec<&AdEvent> = batch.iter().collect();
        sorted.sort_by_key(|e| e.event_id);
        let (mut ty, mut at, mut adv, mut cmp, mut ad) = (vec![], vec![], vec![], vec![], vec![]);
        let (mut pb, mut pl, mut cost, mut rev) = (vec![], vec![], vec![], vec![]);
        let (mut cur, mut ctry, mut dev, mut attrs) = (vec![], vec![], vec![], vec![]);
        for ev in sorted {
            ids.push(ev.event_id.as_uuid());
            ty.push(ev.event_type.as_str());
            at.push(ev.occurred_at);
            adv.push(ev.advertiser_id.as_str());
            cmp.push(ev.campaign_id.as_str());
            ad.push(ev.ad_id.as_str());
            pb.push(ev.publisher_id.as_ref().map(|i| i.as_str()));
            pl.push(ev.placement_id.as_ref().map(|i| i.as_str()));
            cost.push(i64::try_from(ev.cost_micros.get())?);
            rev.push(
                ev.revenue_micros
                    .map(|m| i64::try_from(m.get()))
                    .transpose()?,
            );
            cur.push(ev.currency.as_ref().map(|c| c.as_str()));
            ctry.push(ev.country.as_ref().map(|c| c.as_str()));
            dev.push(ev.device.map(|d| d.as_str()));
            attrs.push(Json(&ev.attributes));
        }
        let params: [&(dyn ToSql + Sync); 14] = [
            &ids, &ty, &at, &adv, &cmp, &ad, &pb, &pl, &cost, &rev, &cur, &ctry, &dev, &attrs,
        ];
        let n = client.execute(&statement, &params).await?;
        if n != batch.len() as u64 {
            return Err(format!("insert wrote {n} of {}", batch.len()).into());
        }
    }
    Ok(started.elapsed())
}

fn per_sec(events: usize, d: Duration) -> f64 {
    events as f64 / d.as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let server = std::env::var("SPILLWAY_BENCH_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let n: usize = std::env::var("SPILLWAY_BENCH_EVENTS")
        .ok()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(50_000);
    let ads: Option<u64> = std::env::var("SPILLWAY_BENCH_ADS")
        .ok()
        .map(|s| s.parse())
        .transpose()?;
    let admin = connect(&format!("{server}/postgres")).await?;
    let db = format!("spillway_bench_{:016x}", rand_suffix());
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await?;
    let batch: usize = std::env::var("SPILLWAY_BENCH_BATCH")
        .ok()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(DEFAULT_BATCH)
        .max(1);
    let writers: usize = std::env::var("SPILLWAY_BENCH_WRITERS")
        .ok()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1)
        .max(1);
    let sink_server = std::env::var("SPILLWAY_BENCH_SINK_PG").unwrap_or_else(|_| server.clone());
    let pooling = std::env::var("SPILLWAY_BENCH_TRANSACTION_POOLING").is_ok_and(|v| v == "1");
    let outcome = bench(
        &format!("{server}/{db}"),
        &Through {
            url: format!("{sink_server}/{db}"),
            transaction_pooling: pooling,
        },
        n,
        batch,
        ads,
        writers,
    )
    .await;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await?;
    outcome
}

/// Where and how the sink connects.
struct Through {
    url: String,
    transaction_pooling: bool,
}

async fn bench(
    url: &str,
    through: &Through,
    n: usize,
    batch: usize,
    ads: Option<u64>,
    writers: usize,
) -> Result<(), BoxError> {
    let sink = PostgresSink::new(&PostgresConfig {
        max_connections: writers,
        transaction_pooling: through.transaction_pooling,
        ..PostgresConfig::new(through.url.clone())
    })?;
    sink.migrate().await?;
    let mut clients = Vec::new();
    for _ in 0..writers {
        clients.push(connect(url).await?);
    }
    let client = &clients[0];
    // Same columns, defaults and NOT NULLs; no primary key, no index, no rollups.
    client
        .batch_execute(
            "CREATE TABLE ad_events_copy (LIKE ad_events INCLUDING DEFAULTS);
             CREATE TABLE ad_events_keyed (LIKE ad_events INCLUDING DEFAULTS,
                                           PRIMARY KEY (event_id));
             CREATE TABLE ad_events_raw (LIKE ad_events INCLUDING ALL);",
        )
        .await?;
    let events = synthetic(n, ads)?;
    let version: String = client.query_one("SHOW server_version", &[]).await?.get(0);
    println!(
        "postgres_sink bench: PostgreSQL {version}, {n} events per round in batches of {batch}, {writers} writer(s) (connections) each side, {ROUNDS} rounds, {}",
        match ads {
            Some(ads) => format!("{ads} ads within one minute"),
            None => "100,000 ads over an hour (about one rollup row per event)".into(),
        }
    );
    if through.transaction_pooling || through.url != url {
        println!(
            "sink: transaction_pooling = {}, through {}",
            through.transaction_pooling,
            through
                .url
                .rsplit_once('/')
                .map_or("?", |(server, _)| server)
        );
    }
    let (mut sink_rates, mut copy_rates, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let (mut insert_rates, mut keyed_rates) = (Vec::new(), Vec::new());
    for round in 1..=ROUNDS {
        client
            .batch_execute(
                "TRUNCATE ad_events, ad_metrics_minute, ad_events_copy, ad_events_keyed,
                          ad_events_raw;
                 CHECKPOINT",
            )
            .await?;
        // Alternate which goes first, so neither always gets the warmer cache.
        let (sink_time, copy_time) = if round % 2 == 1 {
            (
                run_sink(&sink, &events, batch, writers).await?,
                run_copy(&clients, "ad_events_copy", &events, batch).await?,
            )
        } else {
            let c = run_copy(&clients, "ad_events_copy", &events, batch).await?;
            (run_sink(&sink, &events, batch, writers).await?, c)
        };
        let keyed_time = run_copy(&clients, "ad_events_keyed", &events, batch).await?;
        let insert_time = run_insert_only(client, &events, batch).await?;
        let rollups: i64 = client
            .query_one("SELECT count(*) FROM ad_metrics_minute", &[])
            .await?
            .get(0);
        let (s, c, k, i) = (
            per_sec(n, sink_time),
            per_sec(n, copy_time),
            per_sec(n, keyed_time),
            per_sec(n, insert_time),
        );
        println!(
            "round {round}: PostgresSink::write {s:>7.0} events/s ({rollups} rollup rows)   COPY {c:>7.0} events/s   ratio {:.2}   (COPY into the keyed table {k:>7.0} = {:.2}; raw insert without rollups {i:>7.0} = {:.2})",
            s / c,
            k / c,
            i / c
        );
        insert_rates.push(i);
        keyed_rates.push(k);
        sink_rates.push(s);
        copy_rates.push(c);
        ratios.push(s / c);
    }
    println!(
        "median: PostgresSink::write {:.0} events/s, COPY {:.0} events/s, ratio {:.2}; COPY into the keyed table {:.0} events/s; raw insert without rollups {:.0} events/s",
        median(sink_rates),
        median(copy_rates),
        median(ratios),
        median(keyed_rates),
        median(insert_rates)
    );
    Ok(())
}

/// A random-enough database suffix without a dependency: the clock's nanoseconds and pid.
fn rand_suffix() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    (nanos as u64) ^ (u64::from(std::process::id()) << 32)
}
