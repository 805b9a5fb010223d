//! Writes a small seed corpus for `ingest_body` into `corpus/ingest_body/` (or the directory
//! given as the first argument): valid and invalid bodies, as JSON arrays, single objects and
//! NDJSON, each in identity, gzip and zstd, so the fuzzer starts from well-formed frames.
//!
//! Run from `fuzz/`: `cargo +nightly run --bin seed_corpus`.

use std::io::Write;
use std::path::PathBuf;

use ingest_api::body::{BodyEncoding, BodyFormat};
use serde_json::{json, Value};
use shared::synthetic::SyntheticEvents;
use spillway_fuzz::{fuzz_now, selector};

fn bodies() -> Vec<(BodyFormat, Vec<u8>)> {
    let mut gen = SyntheticEvents::new(1, 5);
    let at = fuzz_now() - time::Duration::minutes(1);
    let valid: Vec<Value> = (0..10).map(|_| gen.event_at(at)).collect();
    let mut invalid = Vec::new();
    let mut bad = gen.event_at(at);
    bad["currency"] = json!("usd");
    invalid.push(bad);
    let mut bad = gen.event_at(at);
    bad["type"] = json!("click");
    bad["revenue_micros"] = json!(5);
    bad["extra"] = json!({"~/": 1});
    invalid.push(bad);
    let mut bad = gen.event_at(at);
    bad["occurred_at"] = json!("2020-01-01T00:00:00+01:00");
    bad["attributes"] = json!({"k": 1});
    bad["cost_micros"] = json!(-1);
    invalid.push(bad);
    invalid.push(json!({"event_id": "not-a-uuid", "advertiser_id": ""}));
    invalid.push(json!([1, 2]));

    let ndjson = |items: &[Value]| {
        let mut out = Vec::new();
        for v in items {
            out.extend_from_slice(v.to_string().as_bytes());
            out.extend_from_slice(b"\n\n");
        }
        out.extend_from_slice(b"{not json\n\xff\xfe\n");
        out
    };
    let mixed: Vec<Value> = valid.iter().take(3).chain(&invalid).cloned().collect();
    vec![
        (BodyFormat::Json, serde_json::to_vec(&valid).unwrap_or_default()),
        (BodyFormat::Json, serde_json::to_vec(&mixed).unwrap_or_default()),
        (BodyFormat::Json, valid[0].to_string().into_bytes()),
        (BodyFormat::Json, b"[]".to_vec()),
        (BodyFormat::Ndjson, ndjson(&valid[..3])),
        (BodyFormat::Ndjson, ndjson(&mixed)),
    ]
}

fn encode(body: &[u8], encoding: BodyEncoding) -> std::io::Result<Vec<u8>> {
    match encoding {
        BodyEncoding::Identity => Ok(body.to_vec()),
        BodyEncoding::Gzip => {
            let mut enc =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            enc.write_all(body)?;
            enc.finish()
        }
        BodyEncoding::Zstd => zstd::bulk::compress(body, 3),
    }
}

fn main() -> std::io::Result<()> {
    let dir = std::env::args_os()
        .nth(1)
        .map_or_else(|| PathBuf::from("corpus/ingest_body"), PathBuf::from);
    std::fs::create_dir_all(&dir)?;
    let mut written = 0;
    for (i, (format, body)) in bodies().into_iter().enumerate() {
        for encoding in [BodyEncoding::Identity, BodyEncoding::Gzip, BodyEncoding::Zstd] {
            let mut input = vec![selector(format, encoding)];
            input.extend(encode(&body, encoding)?);
            std::fs::write(dir.join(format!("seed-{i:02}-{encoding:?}")), input)?;
            written += 1;
        }
    }
    eprintln!("wrote {written} seeds to {}", dir.display());
    Ok(())
}
