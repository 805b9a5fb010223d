//! The ingest hot path against a plain JSON parse of the same body.
//!
//! A body is a JSON array of 100 synthetic events (~350 bytes each).
//! - `plain_parse`: `serde_json::from_slice::<Vec<Value>>`, the floor any JSON API pays.
//! - `decode_validate_envelope`: what `ingest_api::ingest::prepare` does per request (split
//!   into raw items, read each into a `RawEvent` straight from its text, validate into
//!   `AdEvent`, serialise once, check the envelope budget, pack). `shared` cannot depend on `ingest-api`, so the steps are mirrored here.
//!
//! Two groups measure the same functions, one with `Throughput::Elements` (events/s) and
//! one with `Throughput::Bytes` (body bytes/s). Run: `cargo bench -p shared --bench ingest_path`.

use std::hint::black_box;

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use serde_json::value::RawValue;
use serde_json::Value;
use shared::envelope::{Envelope, PackedEvent, Packer};
use shared::event::{RawEvent, ValidationPolicy};
use shared::synthetic::SyntheticEvents;
use shared::SystemClock;

const EVENTS_PER_BODY: usize = 100;

fn body() -> Vec<u8> {
    let mut events = SyntheticEvents::new(42, 50);
    let items: Vec<Value> = (0..EVENTS_PER_BODY).map(|_| events.event()).collect();
    serde_json::to_vec(&items).unwrap_or_default()
}

fn plain_parse(body: &[u8]) -> usize {
    serde_json::from_slice::<Vec<Value>>(body)
        .map(|v| v.len())
        .unwrap_or_default()
}

/// Mirrors `ingest_api::ingest::prepare` for a JSON array body and a key allowed for any
/// advertiser.
fn decode_validate_envelope(
    body: &[u8],
    packer: &Packer,
    policy: &ValidationPolicy,
) -> Vec<Envelope> {
    let items: Vec<&RawValue> = serde_json::from_slice(body).unwrap_or_default();
    let mut packed = Vec::with_capacity(items.len());
    for raw in items {
        let Ok(raw) = RawEvent::from_json_str(raw.get(), policy, &SystemClock) else {
            continue;
        };
        let Ok(event) = raw.validate() else {
            // prepare() copies the id for the rejection report.
            let _event_id = raw.event_id().map(str::to_owned);
            continue;
        };
        if let Ok(p) = PackedEvent::new(&event) {
            if packer.check_fits(&p).is_ok() {
                packed.push(p);
            }
        }
    }
    packer.pack("bench", &packed).unwrap_or_default()
}

fn register(group: &mut BenchmarkGroup<'_, WallTime>, body: &[u8]) {
    let packer = Packer::default();
    let policy = ValidationPolicy::default();
    group.bench_function("plain_parse", |b| b.iter(|| plain_parse(black_box(body))));
    group.bench_function("decode_validate_envelope", |b| {
        b.iter(|| decode_validate_envelope(black_box(body), &packer, &policy));
    });
}

fn ingest_path(c: &mut Criterion) {
    let body = body();
    // Guard against measuring a path that rejects everything.
    let envelopes =
        decode_validate_envelope(&body, &Packer::default(), &ValidationPolicy::default());
    let accepted: usize = envelopes.iter().map(|e| e.event_count).sum();
    assert_eq!(
        accepted, EVENTS_PER_BODY,
        "every synthetic event must be accepted"
    );
    assert_eq!(plain_parse(&body), EVENTS_PER_BODY);
    eprintln!(
        "body: {} events, {} bytes ({} bytes/event)",
        EVENTS_PER_BODY,
        body.len(),
        body.len() / EVENTS_PER_BODY
    );

    let mut events = c.benchmark_group("ingest_path_events");
    events.throughput(Throughput::Elements(EVENTS_PER_BODY as u64));
    register(&mut events, &body);
    events.finish();

    let mut bytes = c.benchmark_group("ingest_path_bytes");
    bytes.throughput(Throughput::Bytes(body.len() as u64));
    register(&mut bytes, &body);
    bytes.finish();
}

criterion_group!(benches, ingest_path);
criterion_main!(benches);
