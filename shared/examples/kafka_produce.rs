//! Producer throughput of the Kafka publisher against librdkafka's in-process mock cluster:
//! 100-event envelopes (one per ingest request), keyed by campaign bucket, published by
//! concurrent callers the way concurrent HTTP requests publish, each call waiting for its
//! delivery report (`acks=all`, idempotent).
//!
//! ```console
//! $ cargo run -p shared --features kafka --example kafka_produce -- --envelopes 2000 --rounds 3
//! ```

#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use shared::envelope::{EnvelopeConfig, PackedEvent, Packer, ATTR_PARTITION_KEY};
use shared::kafka::publisher::ProducerConfig;
use shared::kafka::{Compression, KafkaClientConfig, KafkaPublisher, MockKafka};
use shared::synthetic::SyntheticEvents;
use shared::{AdEvent, Envelope, Publisher, SystemClock, ValidationPolicy};

/// Kafka producer throughput on the mock cluster.
#[derive(Debug, Parser)]
struct Args {
    /// Envelopes per round.
    #[arg(long, default_value_t = 2_000)]
    envelopes: usize,
    /// Events per envelope.
    #[arg(long, default_value_t = 100)]
    events_per_envelope: usize,
    /// Concurrent publishers (in-flight ingest requests).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Partitions of the topic.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Compression: none, snappy, lz4, zstd.
    #[arg(long, default_value = "lz4")]
    compression: String,
    /// linger.ms.
    #[arg(long, default_value_t = 5)]
    linger_ms: u64,
    /// Rounds (the median is reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

fn envelopes(n: usize, per: usize) -> Vec<Envelope> {
    let packer = Packer::new(EnvelopeConfig {
        split_by_type: false,
        ..EnvelopeConfig::default()
    });
    let mut g = SyntheticEvents::new(7, 50);
    (0..n)
        .map(|i| {
            let packed: Vec<PackedEvent> = (0..per)
                .map(|_| {
                    let e =
                        AdEvent::from_json(g.event(), &ValidationPolicy::default(), &SystemClock)
                            .expect("synthetic events are valid");
                    PackedEvent::new(&e).expect("synthetic events serialise")
                })
                .collect();
            let mut env = packer.pack("bench", &packed).expect("fits").remove(0);
            env.attributes
                .insert(ATTR_PARTITION_KEY.into(), (i % 32).to_string());
            env
        })
        .collect()
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let mock = MockKafka::start(1, &[("bench", args.partitions)]).unwrap();
    let compression: Compression = args.compression.parse().unwrap();
    let config = ProducerConfig {
        compression,
        linger: Duration::from_millis(args.linger_ms),
        ..ProducerConfig::new(KafkaClientConfig::new(mock.bootstrap_servers()), "bench")
    };
    let publisher = Arc::new(KafkaPublisher::new(&config).unwrap());
    publisher.ready().await.unwrap();
    let envs = Arc::new(envelopes(args.envelopes, args.events_per_envelope));
    let bytes: usize = envs.iter().map(|e| e.body.len()).sum();
    let events: usize = envs.iter().map(|e| e.event_count).sum();
    println!(
        "{} envelopes of {} events ({:.0} KiB each), {} partitions, {compression}, linger {} ms, \
         {} concurrent publishers",
        envs.len(),
        args.events_per_envelope,
        bytes as f64 / envs.len() as f64 / 1024.0,
        args.partitions,
        args.linger_ms,
        args.concurrency
    );
    let mut rates = Vec::new();
    for round in 1..=args.rounds {
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..args.concurrency {
            let (p, envs, next) = (Arc::clone(&publisher), Arc::clone(&envs), Arc::clone(&next));
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(env) = envs.get(i) else { break };
                    p.publish(std::slice::from_ref(env)).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let secs = start.elapsed().as_secs_f64();
        let rate = events as f64 / secs;
        println!(
            "round {round}: {events} events in {secs:.2} s = {rate:.0} events/s, {:.0} envelopes/s, {:.1} MiB/s",
            envs.len() as f64 / secs,
            bytes as f64 / secs / 1_048_576.0
        );
        rates.push(rate);
    }
    rates.sort_by(f64::total_cmp);
    println!("median {:.0} events/s", rates[rates.len() / 2]);
}
