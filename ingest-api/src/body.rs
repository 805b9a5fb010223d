//! Request bodies: content type and encoding, size limits enforced while decompressing, and
//! splitting into items (one event, a JSON array, or NDJSON lines).

use std::io::Read;

use serde_json::value::RawValue;

use crate::error::ApiError;
use shared::event::{ErrorCode, FieldError};

/// Request size limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest body on the wire (before decompression), in bytes.
    pub max_wire_bytes: usize,
    /// Largest body after decompression, in bytes.
    pub max_decoded_bytes: usize,
    /// Most events in one request.
    pub max_events: usize,
    /// Largest single event, in bytes of JSON.
    pub max_event_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_wire_bytes: 1024 * 1024,
            max_decoded_bytes: 4 * 1024 * 1024,
            max_events: 1_000,
            max_event_bytes: 32 * 1024,
        }
    }
}

/// How items are laid out in the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// One JSON event or a JSON array of events.
    Json,
    /// One JSON event per line.
    Ndjson,
}

impl BodyFormat {
    /// From a `Content-Type` header value (parameters such as `charset` are ignored);
    /// a missing header means JSON.
    ///
    /// # Errors
    /// [`ApiError::UnsupportedMediaType`] for any other type.
    pub fn from_content_type(value: Option<&str>) -> Result<Self, ApiError> {
        let Some(value) = value else {
            return Ok(Self::Json);
        };
        let essence = value
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        match essence.as_str() {
            "application/json" => Ok(Self::Json),
            "application/x-ndjson" | "application/ndjson" | "application/jsonl" => Ok(Self::Ndjson),
            _ => Err(ApiError::UnsupportedMediaType(format!(
                "content type {value:?} is not supported; use application/json or application/x-ndjson"
            ))),
        }
    }
}

/// How the body is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyEncoding {
    /// Not compressed.
    Identity,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

impl BodyEncoding {
    /// From a `Content-Encoding` header value; a missing header means identity.
    ///
    /// # Errors
    /// [`ApiError::UnsupportedMediaType`] for anything but identity, gzip and zstd.
    pub fn from_header(value: Option<&str>) -> Result<Self, ApiError> {
        match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            None | Some("" | "identity") => Ok(Self::Identity),
            Some("gzip" | "x-gzip") => Ok(Self::Gzip),
            Some("zstd") => Ok(Self::Zstd),
            Some(other) => Err(ApiError::UnsupportedMediaType(format!(
                "content encoding {other:?} is not supported; use gzip, zstd or none"
            ))),
        }
    }
}

/// Decompresses `wire` into at most `max_decoded_bytes`, stopping as soon as the limit is
/// passed, so a decompression bomb costs at most the limit in memory.
///
/// # Errors
/// [`ApiError::PayloadTooLarge`] past the limit, [`ApiError::BadBody`] for corrupt data.
pub fn decompress(
    wire: &[u8],
    encoding: BodyEncoding,
    max_decoded_bytes: usize,
) -> Result<Vec<u8>, ApiError> {
    let reader: Box<dyn Read + '_> = match encoding {
        BodyEncoding::Identity => {
            if wire.len() > max_decoded_bytes {
                return Err(too_large_decoded(max_decoded_bytes));
            }
            return Ok(wire.to_vec());
        }
        BodyEncoding::Gzip => Box::new(flate2::read::MultiGzDecoder::new(wire)),
        BodyEncoding::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(wire)
                .map_err(|e| ApiError::BadBody(format!("invalid zstd body: {e}")))?,
        ),
    };
    let cap = u64::try_from(max_decoded_bytes)
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    let mut out = Vec::with_capacity(wire.len().saturating_mul(4).min(max_decoded_bytes));
    reader
        .take(cap)
        .read_to_end(&mut out)
        .map_err(|e| ApiError::BadBody(format!("cannot decompress the body: {e}")))?;
    if out.len() > max_decoded_bytes {
        return Err(too_large_decoded(max_decoded_bytes));
    }
    Ok(out)
}

fn too_large_decoded(limit: usize) -> ApiError {
    ApiError::PayloadTooLarge(format!(
        "the decompressed body is larger than {limit} bytes"
    ))
}

/// One item of a body: the raw JSON of an event, or why it could not even be read.
#[derive(Debug)]
pub enum RawItem<'a> {
    /// The event's JSON text.
    Json(&'a RawValue),
    /// An NDJSON line that is not JSON (or not UTF-8), or an item over the size limit.
    Bad(FieldError),
}

/// Splits a decompressed body into items, enforcing the event-count and per-event limits.
///
/// # Errors
/// [`ApiError::BadBody`] when a JSON body is not valid JSON or holds no event,
/// [`ApiError::PayloadTooLarge`] past `max_events`.
pub fn split_items<'a>(
    body: &'a [u8],
    format: BodyFormat,
    limits: &Limits,
) -> Result<Vec<RawItem<'a>>, ApiError> {
    // A UTF-8 byte order mark, which some Windows tools write first: RFC 8259 lets a parser
    // ignore it, and serde_json does not (a JSON body was refused whole, an NDJSON body lost
    // its first line).
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let items = match format {
        BodyFormat::Json => split_json(body, limits.max_events)?,
        BodyFormat::Ndjson => split_ndjson(body, limits.max_events)?,
    };
    if items.is_empty() {
        return Err(ApiError::BadBody("the body holds no event".into()));
    }
    if items.len() > limits.max_events {
        return Err(ApiError::PayloadTooLarge(format!(
            "{} events in one request; at most {} allowed",
            items.len(),
            limits.max_events
        )));
    }
    Ok(items
        .into_iter()
        .map(|item| match item {
            RawItem::Json(raw) if raw.get().len() > limits.max_event_bytes => {
                RawItem::Bad(FieldError::new(
                    "",
                    ErrorCode::TooLarge,
                    format!(
                        "event is {} bytes; at most {} allowed",
                        raw.get().len(),
                        limits.max_event_bytes
                    ),
                ))
            }
            other => other,
        })
        .collect())
}

/// The error a [`BoundedArray`] stops with, told apart from a syntax error by its text.
const TOO_MANY_EVENTS: &str = "spillway: more events than allowed";

/// A JSON array of at most `max` items, refused at item `max + 1` instead of collected
/// whole: `[0,0,0,…]` decompressed to 4 MiB is two million items, 32 MB of slices, before
/// a count check after the fact could refuse it.
struct BoundedArray {
    max: usize,
}

impl<'de> serde::de::DeserializeSeed<'de> for BoundedArray {
    type Value = Vec<&'de RawValue>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for BoundedArray {
    type Value = Vec<&'de RawValue>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "an array of at most {} events", self.max)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(self.max));
        while let Some(item) = seq.next_element::<&RawValue>()? {
            if items.len() == self.max {
                return Err(serde::de::Error::custom(TOO_MANY_EVENTS));
            }
            items.push(item);
        }
        Ok(items)
    }
}

fn split_json(body: &[u8], max_events: usize) -> Result<Vec<RawItem<'_>>, ApiError> {
    let text = std::str::from_utf8(body).map_err(|e| {
        ApiError::BadBody(format!(
            "the body is not valid UTF-8 (at byte {})",
            e.valid_up_to()
        ))
    })?;
    let first = text.trim_start().as_bytes().first().copied();
    let bad_json =
        |e: serde_json::Error| ApiError::BadBody(format!("the body is not valid JSON: {e}"));
    if first == Some(b'[') {
        let mut de = serde_json::Deserializer::from_str(text);
        let items =
            serde::de::DeserializeSeed::deserialize(BoundedArray { max: max_events }, &mut de)
                .and_then(|items| de.end().map(|()| items))
                .map_err(|e| {
                    if e.to_string().contains(TOO_MANY_EVENTS) {
                        ApiError::PayloadTooLarge(format!(
                    "more than {max_events} events in one request; at most {max_events} allowed"
                ))
                    } else {
                        bad_json(e)
                    }
                })?;
        Ok(items.into_iter().map(RawItem::Json).collect())
    } else {
        let item: &RawValue = serde_json::from_str(text).map_err(bad_json)?;
        Ok(vec![RawItem::Json(item)])
    }
}

fn split_ndjson(body: &[u8], max_events: usize) -> Result<Vec<RawItem<'_>>, ApiError> {
    let mut items = Vec::new();
    for (i, line) in body.split(|b| *b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if items.len() == max_events {
            return Err(ApiError::PayloadTooLarge(format!(
                "more than {max_events} events in one request"
            )));
        }
        let item = match std::str::from_utf8(line) {
            Err(e) => RawItem::Bad(FieldError::new(
                "",
                ErrorCode::InvalidJson,
                format!(
                    "line {} is not valid UTF-8 (at byte {})",
                    i + 1,
                    e.valid_up_to()
                ),
            )),
            Ok(text) => match serde_json::from_str::<&RawValue>(text) {
                Ok(raw) => RawItem::Json(raw),
                Err(e) => RawItem::Bad(FieldError::new(
                    "",
                    ErrorCode::InvalidJson,
                    format!("line {} is not valid JSON: {e}", i + 1),
                )),
            },
        };
        items.push(item);
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_array_past_max_events_is_refused_at_the_first_item_too_many() {
        let limits = Limits {
            max_events: 1_000,
            ..Limits::default()
        };
        let zeros = |n: usize| format!("[{}]", vec!["0"; n].join(","));
        let thousand = zeros(1_000);
        let ok = split_items(thousand.as_bytes(), BodyFormat::Json, &limits).unwrap();
        assert_eq!(ok.len(), 1_000);
        for n in [1_001, 2_000_000] {
            let body = zeros(n);
            let err = split_items(body.as_bytes(), BodyFormat::Json, &limits).unwrap_err();
            assert!(matches!(err, ApiError::PayloadTooLarge(_)), "{n}: {err:?}");
        }
        // A syntax error after the last allowed item is still a syntax error.
        let err = split_items(b"[0,0", BodyFormat::Json, &limits).unwrap_err();
        assert!(matches!(err, ApiError::BadBody(_)), "{err:?}");
    }

    use std::io::Write;

    use super::*;

    #[test]
    fn a_leading_byte_order_mark_is_ignored() {
        let limits = Limits::default();
        for (body, format) in [
            (&b"\xEF\xBB\xBF[{\"a\":1},{\"b\":2}]"[..], BodyFormat::Json),
            (b"\xEF\xBB\xBF{\"a\":1}\n{\"b\":2}\n", BodyFormat::Ndjson),
        ] {
            let items = split_items(body, format, &limits).unwrap();
            assert_eq!(items.len(), 2);
            assert!(
                items.iter().all(|i| matches!(i, RawItem::Json(_))),
                "{format:?}"
            );
        }
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn a_bomb_stops_at_the_limit() {
        let bomb = gzip(&vec![b' '; 50 * 1024 * 1024]);
        assert!(bomb.len() < 1024 * 1024);
        assert!(matches!(
            decompress(&bomb, BodyEncoding::Gzip, 4 * 1024 * 1024),
            Err(ApiError::PayloadTooLarge(_))
        ));
    }

    #[test]
    fn gzip_and_zstd_bodies_decompress() {
        let data = b"[{\"a\":1}]";
        assert_eq!(
            decompress(&gzip(data), BodyEncoding::Gzip, 100).unwrap(),
            data
        );
        let z = zstd::bulk::compress(data, 3).unwrap();
        assert_eq!(decompress(&z, BodyEncoding::Zstd, 100).unwrap(), data);
        assert!(matches!(
            decompress(b"junk", BodyEncoding::Gzip, 100),
            Err(ApiError::BadBody(_))
        ));
    }

    #[test]
    fn content_types_and_encodings_are_recognised() {
        assert_eq!(
            BodyFormat::from_content_type(Some("application/json; charset=utf-8")).unwrap(),
            BodyFormat::Json
        );
        assert_eq!(
            BodyFormat::from_content_type(Some("application/x-ndjson")).unwrap(),
            BodyFormat::Ndjson
        );
        assert!(BodyFormat::from_content_type(Some("text/plain")).is_err());
        assert!(BodyEncoding::from_header(Some("br")).is_err());
    }

    #[test]
    fn ndjson_keeps_a_bad_line_as_a_bad_item() {
        let body = b"{\"a\":1}\n\nnot json\n{\"b\":2}\n";
        let items = split_items(body, BodyFormat::Ndjson, &Limits::default()).unwrap();
        assert_eq!(items.len(), 3);
        assert!(matches!(items[1], RawItem::Bad(ref e) if e.code == ErrorCode::InvalidJson));
    }

    #[test]
    fn too_many_events_and_too_large_events_are_refused() {
        let limits = Limits {
            max_events: 2,
            max_event_bytes: 10,
            ..Limits::default()
        };
        assert!(matches!(
            split_items(b"[1,2,3]", BodyFormat::Json, &limits),
            Err(ApiError::PayloadTooLarge(_))
        ));
        let items = split_items(b"[1,\"aaaaaaaaaaaaaaa\"]", BodyFormat::Json, &limits).unwrap();
        assert!(matches!(items[1], RawItem::Bad(ref e) if e.code == ErrorCode::TooLarge));
    }

    #[test]
    fn deeply_nested_json_is_skimmed_without_recursion_and_refused_when_parsed() {
        for body in [
            format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)),
            format!("{{\"a\":{}1{}}}", "[".repeat(10_000), "]".repeat(10_000)),
        ] {
            let items = split_items(body.as_bytes(), BodyFormat::Json, &Limits::default()).unwrap();
            let RawItem::Json(raw) = items[0] else {
                panic!("expected a JSON item")
            };
            assert!(serde_json::from_str::<serde_json::Value>(raw.get()).is_err());
        }
    }
}
