//! End-to-end drain rate: the poller over the embedded broker into the SQLite sink, or into
//! PostgreSQL with `--postgres URL`.
//!
//! Pre-fills a broker queue (in a temporary directory) with `--envelopes` envelopes of
//! `--events-per-envelope` synthetic events, then runs `workers::poller::Poller` over
//! `QueueSource` into the sink, write cap off, until every event is written, and prints
//! events/s (events written / elapsed) and batches. Only the drain is timed.
//!
//! `cargo run --release -p workers --example drain -- --envelopes 2000 [--batch-events 1000]
//! [--events-per-envelope 100] [--advertisers 200] [--ads N] [--loops 2] [--concurrent-batches 2]
//! [--postgres postgres://postgres@127.0.0.1:5432]`
//!
//! `--postgres` takes a server URL without a database name: the drain creates a database of
//! its own there (`spillway_drain_<pid>`), migrates it, writes through `PostgresSink` (pool of
//! `--concurrent-batches` connections) and drops the database at the end.
//!
//! `--ads N` draws the events from N ads (each in one campaign of one advertiser), so a minute
//! holds at most N × 6 rollup keys; without it nearly every event opens its own rollup row.
#![allow(clippy::print_stdout)] // An example whose output is the measurement.

use std::sync::Arc;
use std::time::{Duration, Instant};

use shared::embedded::{Broker, QueueSource, DEV_QUEUE, DEV_TOPIC};
use shared::envelope::{EnvelopeConfig, PackedEvent, Packer};
use shared::event::{AdEvent, ValidationPolicy};
use shared::sink::Sink;
use shared::sqlite_sink::SqliteSink;
use shared::synthetic::SyntheticEvents;
use shared::{PostgresConfig, PostgresSink, SystemClock};
use tokio_util::sync::CancellationToken;
use workers::poller::{Poller, PollerConfig};

// As in the binaries that run workers (`spillway`, `spillway-worker`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Envelopes published per broker transaction while pre-filling.
const PUBLISH_CHUNK: usize = 100;
/// How often the drain checks whether it is done.
const CHECK_EVERY: Duration = Duration::from_millis(5);

struct Args {
    envelopes: usize,
    events_per_envelope: usize,
    batch_events: usize,
    advertisers: u64,
    ads: Option<u64>,
    loops: usize,
    concurrent_batches: usize,
    postgres: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        envelopes: 2_000,
        events_per_envelope: 100,
        batch_events: PollerConfig::default().max_batch_events,
        advertisers: 200,
        ads: None,
        loops: PollerConfig::default().loops,
        concurrent_batches: PollerConfig::default().max_concurrent_batches,
        postgres: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        if flag == "--postgres" {
            a.postgres = Some(value.trim_end_matches('/').to_owned());
            continue;
        }
        let n: u64 = value
            .parse()
            .map_err(|e| format!("{flag} {value:?}: {e}"))?;
        let size = usize::try_from(n).map_err(|e| format!("{flag}: {e}"))?;
        match flag.as_str() {
            "--envelopes" => a.envelopes = size,
            "--events-per-envelope" => a.events_per_envelope = size.max(1),
            "--batch-events" => a.batch_events = size.max(1),
            "--advertisers" => a.advertisers = n,
            "--ads" => a.ads = Some(n),
            "--loops" => a.loops = size,
            "--concurrent-batches" => a.concurrent_batches = size,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(a)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let dir = tempfile::tempdir()?;
    let broker = Broker::open(dir.path().join("broker.db"))?;
    broker.dev_topology().await?;

    // One envelope of `events_per_envelope` mixed-type events each.
    let packer = Packer::new(EnvelopeConfig {
        split_by_type: false,
        ..EnvelopeConfig::default()
    });
    let mut g = SyntheticEvents::new(42, args.advertisers);
    if let Some(ads) = args.ads {
        g = g.with_ads(ads);
    }
    let policy = ValidationPolicy::default();
    let fill = Instant::now();
    let mut envelopes = Vec::with_capacity(PUBLISH_CHUNK);
    let mut total_events = 0_u64;
    for n in 0..args.envelopes {
        let events = (0..args.events_per_envelope)
            .map(|_| AdEvent::from_json(g.event(), &policy, &SystemClock))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("synthetic event is invalid: {e:?}"))?;
        let packed = events
            .iter()
            .map(PackedEvent::new)
            .collect::<Result<Vec<_>, _>>()?;
        let envs = packer.pack("bench", &packed)?;
        if envs.len() != 1 {
            return Err(format!("{} events did not fit one envelope", packed.len()).into());
        }
        total_events += events.len() as u64;
        envelopes.extend(envs);
        if envelopes.len() == PUBLISH_CHUNK || n + 1 == args.envelopes {
            broker.publish(DEV_TOPIC, &envelopes).await?;
            envelopes.clear();
        }
    }
    println!(
        "filled {} envelopes, {total_events} events in {:.1} s",
        args.envelopes,
        fill.elapsed().as_secs_f64()
    );

    let store = match &args.postgres {
        Some(server) => Store::postgres(server, args.concurrent_batches).await?,
        None => Store::Sqlite(SqliteSink::open(dir.path().join("events.db"))?),
    };
    let drained = drain(&args, &broker, &store, total_events).await;
    store.drop_database().await?;
    drained
}

/// Drains the queue into `store`, timed, and prints the figures.
async fn drain(
    args: &Args,
    broker: &Broker,
    store: &Store,
    total_events: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    let config = PollerConfig {
        loops: args.loops,
        max_batch_events: args.batch_events,
        max_batch_messages: args.batch_events.div_ceil(args.events_per_envelope),
        max_concurrent_batches: args.concurrent_batches,
        max_events_per_sec: None,
        receive_wait: Duration::from_millis(100),
        ..PollerConfig::default()
    };
    let poller = Poller::new(
        Arc::new(QueueSource::new(broker.clone(), DEV_QUEUE)),
        store.sink(),
        config,
    )?;
    let metrics = poller.metrics();
    let shutdown = CancellationToken::new();
    let cpu_start = cpu_seconds();
    let start = Instant::now();
    let run = tokio::spawn(poller.run(shutdown.clone()));
    loop {
        let m = metrics.snapshot();
        if m.written + m.duplicates >= total_events || m.dead_lettered > 0 {
            break;
        }
        tokio::time::sleep(CHECK_EVERY).await;
    }
    let elapsed = start.elapsed();
    let cpu = cpu_seconds().zip(cpu_start).map(|(end, begin)| end - begin);
    shutdown.cancel();
    run.await?;

    let m = metrics.snapshot();
    let (stored, rollups) = store.counts().await?;
    let left = broker.queue_stats(DEV_QUEUE).await?;
    println!(
        "drained {} events in {:.3} s: {:.0} events/s; {} batches ({:.0} events each), \
         {} duplicates, {} dead-lettered; {stored} stored, {rollups} rollup rows, \
         {} messages left",
        m.written,
        elapsed.as_secs_f64(),
        m.written as f64 / elapsed.as_secs_f64(),
        m.batches,
        m.written as f64 / m.batches.max(1) as f64,
        m.duplicates,
        m.dead_lettered,
        left.visible + left.in_flight + left.delayed
    );
    if let Some(cpu) = cpu.filter(|c| *c > 0.0) {
        // Less sensitive to other load on the machine than the wall-clock rate.
        println!(
            "process CPU during the drain: {cpu:.2} s, {:.0} events per CPU-second",
            m.written as f64 / cpu
        );
    }
    Ok(())
}

/// The sink drained into, with what the report reads back from it.
enum Store {
    Sqlite(SqliteSink),
    Postgres {
        sink: PostgresSink,
        server: String,
        database: String,
    },
}

impl Store {
    /// A fresh, migrated database `spillway_drain_<pid>` on `server`.
    async fn postgres(
        server: &str,
        connections: usize,
    ) -> Result<Self, Box<dyn std::error::Error>> {
        let database = format!("spillway_drain_{}", std::process::id());
        admin(server, &format!("CREATE DATABASE {database}")).await?;
        let sink = PostgresSink::new(&PostgresConfig {
            max_connections: connections.max(1),
            ..PostgresConfig::new(format!("{server}/{database}"))
        })?;
        sink.migrate().await?;
        Ok(Self::Postgres {
            sink,
            server: server.to_owned(),
            database,
        })
    }

    fn sink(&self) -> Arc<dyn Sink> {
        match self {
            Self::Sqlite(s) => Arc::new(s.clone()),
            Self::Postgres { sink, .. } => Arc::new(sink.clone()),
        }
    }

    /// Events stored and rollup rows.
    async fn counts(&self) -> Result<(u64, u64), Box<dyn std::error::Error>> {
        Ok(match self {
            Self::Sqlite(s) => (s.events_stored().await?, s.rollup_rows().await?),
            Self::Postgres { sink, .. } => (
                sink.events_stored().await?,
                sink.rollup_rows().await?.len() as u64,
            ),
        })
    }

    async fn drop_database(self) -> Result<(), Box<dyn std::error::Error>> {
        if let Self::Postgres {
            sink,
            server,
            database,
        } = self
        {
            drop(sink);
            admin(&server, &format!("DROP DATABASE {database} WITH (FORCE)")).await?;
        }
        Ok(())
    }
}

/// Runs one statement on `server`'s `postgres` database.
async fn admin(server: &str, sql: &str) -> Result<(), Box<dyn std::error::Error>> {
    let (client, connection) =
        tokio_postgres::connect(&format!("{server}/postgres"), tokio_postgres::NoTls).await?;
    let conn = tokio::spawn(connection);
    client.batch_execute(sql).await?;
    drop(client);
    conn.await??;
    Ok(())
}

/// User + system CPU time of this process so far, from `/proc/self/stat` (Linux only).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on Linux.
    Some(ticks / 100.0)
}
