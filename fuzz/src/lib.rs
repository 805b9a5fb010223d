//! Shared by the fuzz targets and the seed corpus generator: how an input's first byte
//! selects the body format and content encoding, and the fixed time the targets run at.
//!
//! Input layout: `[selector, wire body…]`. Bit 0 of the selector picks the format (JSON or
//! NDJSON); `(selector >> 1) % 3` picks the encoding (identity, gzip, zstd). The rest is the
//! body exactly as it would arrive on the wire, so for gzip/zstd the fuzzer mutates
//! compressed bytes (the seed corpus starts it from valid frames).

use ingest_api::body::{BodyEncoding, BodyFormat};
use time::OffsetDateTime;

/// The clock the targets run at, so a crash reproduces whatever day it is replayed on.
pub const FUZZ_NOW_UNIX: i64 = 1_767_225_600; // 2026-01-01T00:00:00Z

/// [`FUZZ_NOW_UNIX`] as a timestamp.
pub fn fuzz_now() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(FUZZ_NOW_UNIX).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// Splits an input into format, encoding and wire body; `None` for an empty input.
pub fn split_input(data: &[u8]) -> Option<(BodyFormat, BodyEncoding, &[u8])> {
    let (&selector, wire) = data.split_first()?;
    let format = if selector & 1 == 0 {
        BodyFormat::Json
    } else {
        BodyFormat::Ndjson
    };
    let encoding = match (selector >> 1) % 3 {
        0 => BodyEncoding::Identity,
        1 => BodyEncoding::Gzip,
        _ => BodyEncoding::Zstd,
    };
    Some((format, encoding, wire))
}

/// The selector byte for a format and an encoding (inverse of [`split_input`]).
pub fn selector(format: BodyFormat, encoding: BodyEncoding) -> u8 {
    let f = match format {
        BodyFormat::Json => 0,
        BodyFormat::Ndjson => 1,
    };
    let e = match encoding {
        BodyEncoding::Identity => 0,
        BodyEncoding::Gzip => 1,
        BodyEncoding::Zstd => 2,
    };
    f | (e << 1)
}
