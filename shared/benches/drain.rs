//! Write throughput of the SQLite sink: batches of 1,000 and 10,000 fresh synthetic events,
//! with rollups, and a redelivered batch. Each benchmark writes into its own growing store.
//!
//! `cargo bench -p shared --bench drain`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use shared::clock::SystemClock;
use shared::event::{AdEvent, ValidationPolicy};
use shared::sink::Sink;
use shared::sqlite_sink::SqliteSink;
use shared::synthetic::SyntheticEvents;

fn batch(g: &mut SyntheticEvents, n: usize) -> Vec<AdEvent> {
    (0..n)
        .filter_map(|_| {
            AdEvent::from_json(g.event(), &ValidationPolicy::default(), &SystemClock).ok()
        })
        .collect()
}

fn sqlite_sink_write(c: &mut Criterion) {
    let Ok(rt) = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    else {
        return;
    };
    let mut g = SyntheticEvents::new(42, 200);
    let mut group = c.benchmark_group("drain");
    group.sample_size(30);
    for batch_events in [1_000, 10_000] {
        let Ok(dir) = tempfile::tempdir() else {
            return;
        };
        let Ok(sink) = SqliteSink::open(dir.path().join("events.db")) else {
            return;
        };
        group.throughput(Throughput::Elements(batch_events as u64));
        group.bench_function(format!("sqlite_sink_write_{batch_events}"), |b| {
            b.iter_batched(
                || batch(&mut g, batch_events),
                |events| black_box(rt.block_on(sink.write(&events))),
                BatchSize::PerIteration,
            );
        });
        if batch_events == 1_000 {
            group.bench_function("sqlite_sink_redelivered_1000", |b| {
                let events = batch(&mut g, batch_events);
                let _ = rt.block_on(sink.write(&events));
                b.iter(|| black_box(rt.block_on(sink.write(&events))));
            });
        }
    }
    group.finish();
}

criterion_group!(benches, sqlite_sink_write);
criterion_main!(benches);
