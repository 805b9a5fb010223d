//! The wire envelope: accepted events packed into `{"v":1,"events":[…]}` messages that fit a
//! broker's size limit, with the message attributes filter policies and workers read.
//!
//! Bodies are either plain JSON (`content-encoding: identity`) or zstd-compressed and base64
//! encoded (`content-encoding: zstd`). Decoding accepts a raw-delivery body or an SNS
//! notification wrapping one, detected per message, and also recognises a zstd body by its
//! magic bytes when the attribute was lost on the way.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::event::{AdEvent, EventType};

/// SNS's limit for one message, body and attributes together (256 KiB).
pub const SNS_MAX_MESSAGE_BYTES: usize = 262_144;
/// Bytes kept free under [`SNS_MAX_MESSAGE_BYTES`] for the message attributes.
pub const ATTRIBUTE_RESERVE_BYTES: usize = 2_048;
/// The default body budget: an SNS message with its attributes.
pub const DEFAULT_BUDGET_BYTES: usize = SNS_MAX_MESSAGE_BYTES - ATTRIBUTE_RESERVE_BYTES;
/// Key buckets ingest uses with a keyed broker (Kafka) unless told otherwise: at least as many
/// as a topic usually has partitions, so keys spread over all of them.
pub const DEFAULT_KEY_BUCKETS: u32 = 32;
/// The envelope format version.
pub const ENVELOPE_VERSION: u32 = 1;
/// Value of the `spillway-schema` attribute for this version.
pub const SCHEMA: &str = "ad-event/1";
/// Attribute naming the schema of the body.
pub const ATTR_SCHEMA: &str = "spillway-schema";
/// Attribute naming the tenant (API key owner) that sent the events.
pub const ATTR_TENANT: &str = "spillway-tenant";
/// Attribute listing the event types inside, as a JSON array (SNS `String.Array`).
pub const ATTR_TYPES: &str = "spillway-types";
/// Attribute naming the body encoding.
pub const ATTR_CONTENT_ENCODING: &str = "content-encoding";
/// Attribute carrying the envelope's partition key when the packer groups by key bucket
/// ([`EnvelopeConfig::key_buckets`]): every event of one campaign gets the same key, so a
/// keyed broker (Kafka) keeps one campaign's events in order on one partition.
pub const ATTR_PARTITION_KEY: &str = "spillway-partition-key";
/// Decompressed size past which a zstd body is refused (a bomb guard for workers).
pub const MAX_DECODED_BYTES: usize = 16 * 1024 * 1024;

/// Initial buffer for one serialised event (most are 300–450 bytes).
const TYPICAL_EVENT_BYTES: usize = 512;
const PREFIX: &[u8] = b"{\"v\":1,\"events\":[";
const SUFFIX: &[u8] = b"]}";
/// base64 of the zstd frame magic `28 B5 2F FD`.
const ZSTD_BASE64_MAGIC: &str = "KLUv/";

/// How an envelope body is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ContentEncoding {
    /// Plain JSON.
    #[default]
    Identity,
    /// zstd-compressed JSON, base64 encoded so it survives text-only brokers.
    Zstd,
}

impl ContentEncoding {
    /// The attribute value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Identity => "identity",
            Self::Zstd => "zstd",
        }
    }
}

impl fmt::Display for ContentEncoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ContentEncoding {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "identity" => Ok(Self::Identity),
            "zstd" => Ok(Self::Zstd),
            other => Err(format!(
                "unknown envelope encoding {other:?}; use identity or zstd"
            )),
        }
    }
}

/// How envelopes are packed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnvelopeConfig {
    /// Largest encoded body, in bytes.
    pub budget_bytes: usize,
    /// Body encoding.
    pub encoding: ContentEncoding,
    /// zstd level when `encoding` is zstd.
    pub zstd_level: i32,
    /// One event type per envelope, so a filter policy on `spillway-types` routes exactly
    /// the events it names (a mixed envelope would carry the others along).
    pub split_by_type: bool,
    /// When non-zero, events are grouped by `hash(advertiser_id, campaign_id) % key_buckets`
    /// and each envelope carries its bucket as [`ATTR_PARTITION_KEY`]. A campaign always
    /// lands in the same bucket, hence under the same key and on the same Kafka partition,
    /// in order; buckets (rather than one key per campaign) keep a request that spans many
    /// campaigns in a few large envelopes. `0` (the default) packs without a key.
    pub key_buckets: u32,
}

impl Default for EnvelopeConfig {
    fn default() -> Self {
        Self {
            budget_bytes: DEFAULT_BUDGET_BYTES,
            encoding: ContentEncoding::Identity,
            zstd_level: 3,
            split_by_type: true,
            key_buckets: 0,
        }
    }
}

/// One message ready for a broker: an encoded body and its attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The encoded body.
    pub body: String,
    /// Message attributes (`spillway-schema`, `spillway-tenant`, `spillway-types`, `content-encoding`).
    pub attributes: BTreeMap<String, String>,
    /// How many events are inside.
    pub event_count: usize,
}

impl Envelope {
    /// The event types inside, from the `spillway-types` attribute.
    pub fn types(&self) -> Vec<String> {
        self.attributes
            .get(ATTR_TYPES)
            .and_then(|t| serde_json::from_str(t).ok())
            .unwrap_or_default()
    }
}

/// An event serialised once, ready to be packed.
#[derive(Debug, Clone)]
pub struct PackedEvent {
    json: Vec<u8>,
    event_type: EventType,
    /// Stable hash of `(advertiser_id, campaign_id)`, for key buckets.
    campaign_hash: u64,
}

impl PackedEvent {
    /// Serialises a validated event.
    ///
    /// # Errors
    /// The event cannot be written as JSON: only an `occurred_at` outside the years 0000 to
    /// 9999 in UTC, which validation refuses, so only for an event built by hand.
    pub fn new(event: &AdEvent) -> Result<Self, serde_json::Error> {
        // Sized for a typical event so the buffer is not regrown while writing.
        let mut json = Vec::with_capacity(TYPICAL_EVENT_BYTES);
        serde_json::to_writer(&mut json, event)?;
        Ok(Self {
            json,
            event_type: event.event_type,
            campaign_hash: campaign_hash(event.advertiser_id.as_str(), event.campaign_id.as_str()),
        })
    }

    /// The key bucket of this event's campaign among `buckets` (`None` when `buckets` is 0).
    pub fn key_bucket(&self, buckets: u32) -> Option<u32> {
        (buckets > 0).then(|| (self.campaign_hash % u64::from(buckets)) as u32)
    }

    /// Serialised size in bytes.
    pub fn len(&self) -> usize {
        self.json.len()
    }

    /// Whether the serialised form is empty (never, for a real event).
    pub fn is_empty(&self) -> bool {
        self.json.is_empty()
    }
}

/// FNV-1a over `advertiser_id`, a separator and `campaign_id`: stable across processes,
/// versions and platforms (unlike `std`'s randomly seeded hasher), which a partition key must be.
fn campaign_hash(advertiser_id: &str, campaign_id: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    // 0xFF never occurs in UTF-8, so ("a", "bc") and ("ab", "c") hash apart.
    for b in advertiser_id
        .bytes()
        .chain(std::iter::once(0xFF))
        .chain(campaign_id.bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(PRIME);
    }
    h
}

/// Why events could not be packed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    /// One event alone is larger than the budget.
    #[error("event of {event_bytes} bytes does not fit a {budget_bytes}-byte envelope")]
    EventTooLarge {
        /// Serialised size of the event.
        event_bytes: usize,
        /// The configured budget.
        budget_bytes: usize,
    },
}

/// Packs events into envelopes under a byte budget.
#[derive(Debug, Clone, Copy, Default)]
pub struct Packer {
    config: EnvelopeConfig,
}

impl Packer {
    /// A packer for `config`.
    pub fn new(config: EnvelopeConfig) -> Self {
        Self { config }
    }

    /// The configuration.
    pub fn config(&self) -> EnvelopeConfig {
        self.config
    }

    /// Checks that `event` fits an envelope of its own, so it can always be packed.
    ///
    /// # Errors
    /// [`EnvelopeError::EventTooLarge`] when it does not.
    pub fn check_fits(&self, event: &PackedEvent) -> Result<(), EnvelopeError> {
        let identity = PREFIX.len() + event.len() + SUFFIX.len();
        let budget = self.config.budget_bytes;
        let fits = match self.config.encoding {
            ContentEncoding::Identity => identity <= budget,
            // zstd can expand incompressible input slightly, and base64 adds a third; only
            // when even that worst case might overflow is the event compressed to check.
            ContentEncoding::Zstd => {
                let worst = (identity + identity / 128 + 64).div_ceil(3) * 4;
                worst <= budget || self.encode(&[event]).len() <= budget
            }
        };
        if fits {
            Ok(())
        } else {
            Err(EnvelopeError::EventTooLarge {
                event_bytes: event.len(),
                budget_bytes: self.config.budget_bytes,
            })
        }
    }

    /// Packs `events` from `tenant` into as few envelopes as the budget allows, in order.
    ///
    /// # Errors
    /// [`EnvelopeError::EventTooLarge`] if any event does not fit alone (check with
    /// [`Packer::check_fits`] first to reject it on its own).
    pub fn pack(
        &self,
        tenant: &str,
        events: &[PackedEvent],
    ) -> Result<Vec<Envelope>, EnvelopeError> {
        for e in events {
            self.check_fits(e)?;
        }
        let events: Vec<&PackedEvent> = events.iter().collect();
        let buckets = self.config.key_buckets;
        if buckets == 0 {
            return Ok(self.pack_by_type(tenant, &events, None));
        }
        // Group by bucket, each group keeping the request's order; buckets in ascending order.
        let mut groups: BTreeMap<u32, Vec<&PackedEvent>> = BTreeMap::new();
        for e in events {
            groups
                .entry(e.key_bucket(buckets).unwrap_or(0))
                .or_default()
                .push(e);
        }
        let mut out = Vec::new();
        for (bucket, group) in groups {
            out.extend(self.pack_by_type(tenant, &group, Some(bucket)));
        }
        Ok(out)
    }

    fn pack_by_type(
        &self,
        tenant: &str,
        events: &[&PackedEvent],
        bucket: Option<u32>,
    ) -> Vec<Envelope> {
        if !self.config.split_by_type {
            return self.pack_in_order(tenant, events, bucket);
        }
        let mut out = Vec::new();
        for t in EventType::ALL {
            let group: Vec<&PackedEvent> = events
                .iter()
                .copied()
                .filter(|e| e.event_type == t)
                .collect();
            out.extend(self.pack_in_order(tenant, &group, bucket));
        }
        out
    }

    fn pack_in_order(
        &self,
        tenant: &str,
        events: &[&PackedEvent],
        bucket: Option<u32>,
    ) -> Vec<Envelope> {
        // Group by identity size; a zstd group may hold more raw bytes, since compression
        // shrinks it, and is split again if its encoded form still overflows.
        let raw_budget = match self.config.encoding {
            ContentEncoding::Identity => self.config.budget_bytes,
            ContentEncoding::Zstd => self.config.budget_bytes.saturating_mul(6),
        };
        let mut out = Vec::new();
        let mut start = 0;
        let mut size = PREFIX.len() + SUFFIX.len();
        for (i, e) in events.iter().enumerate() {
            let add = e.len() + usize::from(i > start);
            if i > start && size + add > raw_budget {
                self.emit(tenant, &events[start..i], bucket, &mut out);
                start = i;
                size = PREFIX.len() + SUFFIX.len() + e.len();
            } else {
                size += add;
            }
        }
        if start < events.len() {
            self.emit(tenant, &events[start..], bucket, &mut out);
        }
        out
    }

    fn emit(
        &self,
        tenant: &str,
        group: &[&PackedEvent],
        bucket: Option<u32>,
        out: &mut Vec<Envelope>,
    ) {
        let body = self.encode(group);
        if body.len() > self.config.budget_bytes && group.len() > 1 {
            let (a, b) = group.split_at(group.len() / 2);
            self.emit(tenant, a, bucket, out);
            self.emit(tenant, b, bucket, out);
            return;
        }
        let mut types: Vec<&str> = group.iter().map(|e| e.event_type.as_str()).collect();
        types.sort_unstable();
        types.dedup();
        let mut attributes = BTreeMap::from([
            (ATTR_SCHEMA.to_owned(), SCHEMA.to_owned()),
            (ATTR_TENANT.to_owned(), tenant.to_owned()),
            (
                ATTR_TYPES.to_owned(),
                serde_json::to_string(&types).unwrap_or_default(),
            ),
            (
                ATTR_CONTENT_ENCODING.to_owned(),
                self.config.encoding.as_str().to_owned(),
            ),
        ]);
        if let Some(bucket) = bucket {
            attributes.insert(ATTR_PARTITION_KEY.to_owned(), bucket.to_string());
        }
        out.push(Envelope {
            body,
            attributes,
            event_count: group.len(),
        });
    }

    fn encode(&self, group: &[&PackedEvent]) -> String {
        let mut json = Vec::with_capacity(
            PREFIX.len() + SUFFIX.len() + group.iter().map(|e| e.len() + 1).sum::<usize>(),
        );
        json.extend_from_slice(PREFIX);
        for (i, e) in group.iter().enumerate() {
            if i > 0 {
                json.push(b',');
            }
            json.extend_from_slice(&e.json);
        }
        json.extend_from_slice(SUFFIX);
        match self.config.encoding {
            // Built only from serde_json output and ASCII punctuation: valid UTF-8.
            ContentEncoding::Identity => String::from_utf8(json).unwrap_or_default(),
            ContentEncoding::Zstd => {
                let compressed =
                    zstd::bulk::compress(&json, self.config.zstd_level).unwrap_or_default();
                BASE64.encode(compressed)
            }
        }
    }
}

/// Why a message body could not be decoded into events. Never worth a retry.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not JSON, or JSON of the wrong shape.
    #[error("body is not a spillway envelope: {0}")]
    Malformed(String),
    /// An envelope version this build does not know.
    #[error("unsupported envelope version {0}")]
    Version(u64),
    /// A zstd body that is not valid base64 or zstd, or decompresses past the limit.
    #[error("cannot decompress zstd body: {0}")]
    Compression(String),
}

/// A decoded message: the raw events (validated one by one by the worker) and the attributes
/// found in an SNS notification wrapper, if any.
#[derive(Debug)]
pub struct DecodedEnvelope {
    /// Each event as received, so a bad one can be split out alone.
    pub events: Vec<Box<RawValue>>,
    /// Attributes carried inside an SNS notification (empty for raw delivery).
    pub notification_attributes: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct Probe {
    #[serde(rename = "Type")]
    kind: Option<String>,
    #[serde(rename = "Message")]
    message: Option<String>,
    #[serde(rename = "MessageAttributes", default)]
    message_attributes: BTreeMap<String, SnsAttribute>,
    v: Option<u64>,
    events: Option<Vec<Box<RawValue>>>,
}

#[derive(Deserialize)]
struct SnsAttribute {
    #[serde(rename = "Value")]
    value: String,
}

/// Decodes a message body: a raw envelope (identity or zstd) or an SNS notification wrapping
/// one. `content_encoding` is the message attribute when the transport carried it.
///
/// # Errors
/// A [`DecodeError`] when the body is not an envelope; such a message is a permanent failure.
pub fn decode_message(
    body: &str,
    content_encoding: Option<&str>,
) -> Result<DecodedEnvelope, DecodeError> {
    decode_inner(body, content_encoding, BTreeMap::new(), 0)
}

fn decode_inner(
    body: &str,
    content_encoding: Option<&str>,
    notification_attributes: BTreeMap<String, String>,
    depth: u8,
) -> Result<DecodedEnvelope, DecodeError> {
    let trimmed = body.trim();
    let zstd = content_encoding == Some("zstd")
        || (!trimmed.starts_with('{') && trimmed.starts_with(ZSTD_BASE64_MAGIC));
    if zstd {
        let json = decompress(trimmed)?;
        let json = std::str::from_utf8(&json)
            .map_err(|e| DecodeError::Malformed(format!("decompressed body is not UTF-8: {e}")))?;
        return decode_inner(json, Some("identity"), notification_attributes, depth);
    }
    let probe: Probe =
        serde_json::from_str(trimmed).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if probe.kind.as_deref() == Some("Notification") && depth == 0 {
        let message = probe
            .message
            .ok_or_else(|| DecodeError::Malformed("SNS notification without Message".into()))?;
        let attrs: BTreeMap<String, String> = probe
            .message_attributes
            .into_iter()
            .map(|(k, a)| (k, a.value))
            .collect();
        let encoding = attrs.get(ATTR_CONTENT_ENCODING).cloned();
        return decode_inner(&message, encoding.as_deref(), attrs, depth + 1);
    }
    match (probe.v, probe.events) {
        (Some(v), Some(events)) if v == u64::from(ENVELOPE_VERSION) => Ok(DecodedEnvelope {
            events,
            notification_attributes,
        }),
        (Some(v), Some(_)) => Err(DecodeError::Version(v)),
        _ => Err(DecodeError::Malformed(
            "expected {\"v\":1,\"events\":[…]}".into(),
        )),
    }
}

fn decompress(b64: &str) -> Result<Vec<u8>, DecodeError> {
    let compressed = BASE64
        .decode(b64)
        .map_err(|e| DecodeError::Compression(e.to_string()))?;
    let decoder = zstd::stream::read::Decoder::new(compressed.as_slice())
        .map_err(|e| DecodeError::Compression(e.to_string()))?;
    let mut out = Vec::new();
    let limit = u64::try_from(MAX_DECODED_BYTES).unwrap_or(u64::MAX) + 1;
    decoder
        .take(limit)
        .read_to_end(&mut out)
        .map_err(|e| DecodeError::Compression(e.to_string()))?;
    if out.len() > MAX_DECODED_BYTES {
        return Err(DecodeError::Compression(format!(
            "decompresses past {MAX_DECODED_BYTES} bytes"
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    use serde_json::json;

    use super::*;
    use crate::clock::SystemClock;
    use crate::event::ValidationPolicy;
    use crate::testing::arb_event;

    fn decode_all(envs: &[Envelope]) -> Vec<AdEvent> {
        envs.iter()
            .flat_map(|e| {
                decode_message(
                    &e.body,
                    e.attributes.get(ATTR_CONTENT_ENCODING).map(String::as_str),
                )
                .unwrap()
                .events
            })
            .map(|raw| {
                let v: serde_json::Value = serde_json::from_str(raw.get()).unwrap();
                AdEvent::from_json(v, &ValidationPolicy::structural(), &SystemClock).unwrap()
            })
            .collect()
    }

    fn config(budget_bytes: usize, encoding: ContentEncoding) -> EnvelopeConfig {
        EnvelopeConfig {
            budget_bytes,
            encoding,
            zstd_level: 1,
            split_by_type: false,
            key_buckets: 0,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn encode_then_decode_round_trips_any_valid_batch(
            events in proptest::collection::vec(arb_event(), 0..60),
            budget in 600_usize..20_000,
            zstd in any::<bool>(),
        ) {
            let enc = if zstd { ContentEncoding::Zstd } else { ContentEncoding::Identity };
            let packer = Packer::new(config(budget, enc));
            let packed: Vec<PackedEvent> = events.iter().map(|e| PackedEvent::new(e).unwrap()).collect();
            let fitting: Vec<PackedEvent> =
                packed.iter().filter(|p| packer.check_fits(p).is_ok()).cloned().collect();
            let kept: Vec<AdEvent> = events
                .iter()
                .zip(&packed)
                .filter(|(_, p)| packer.check_fits(p).is_ok())
                .map(|(e, _)| e.clone())
                .collect();
            let envs = packer.pack("tenant-a", &fitting).unwrap();
            prop_assert_eq!(decode_all(&envs), kept);
            prop_assert_eq!(envs.iter().map(|e| e.event_count).sum::<usize>(), fitting.len());
        }

        #[test]
        fn no_envelope_exceeds_the_budget(
            events in proptest::collection::vec(arb_event(), 1..80),
            budget in 600_usize..8_000,
            zstd in any::<bool>(),
        ) {
            let enc = if zstd { ContentEncoding::Zstd } else { ContentEncoding::Identity };
            let packer = Packer::new(config(budget, enc));
            let packed: Vec<PackedEvent> = events.iter().map(|e| PackedEvent::new(e).unwrap())
                .filter(|p| packer.check_fits(p).is_ok()).collect();
            for env in packer.pack("t", &packed).unwrap() {
                prop_assert!(env.body.len() <= budget, "{} > {}", env.body.len(), budget);
            }
        }

        #[test]
        fn key_buckets_keep_each_campaign_under_one_key_and_in_order(
            events in proptest::collection::vec(arb_event(), 1..80),
            buckets in 1_u32..8,
            split in any::<bool>(),
        ) {
            let packer = Packer::new(EnvelopeConfig {
                split_by_type: split,
                key_buckets: buckets,
                ..config(4_000, ContentEncoding::Identity)
            });
            let packed: Vec<PackedEvent> = events.iter().map(|e| PackedEvent::new(e).unwrap())
                .filter(|p| packer.check_fits(p).is_ok()).collect();
            let envs = packer.pack("t", &packed).unwrap();
            let mut key_of_campaign: BTreeMap<(String, String), String> = BTreeMap::new();
            let mut per_key: BTreeMap<String, Vec<crate::event::EventId>> = BTreeMap::new();
            for env in &envs {
                let key = env.attributes[ATTR_PARTITION_KEY].clone();
                for e in decode_all(std::slice::from_ref(env)) {
                    let campaign = (e.advertiser_id.as_str().to_owned(), e.campaign_id.as_str().to_owned());
                    let k = key_of_campaign.entry(campaign).or_insert_with(|| key.clone());
                    prop_assert_eq!(&*k, &key, "one campaign under two keys");
                    per_key.entry(key.clone()).or_default().push(e.event_id);
                }
            }
            // Publishing the envelopes in order, each key's events come out in request order
            // (per type when split by type, which never reorders one campaign's events of a type).
            let input: Vec<AdEvent> = events.iter().zip(events.iter().map(|e| PackedEvent::new(e).unwrap()))
                .filter(|(_, p)| packer.check_fits(p).is_ok()).map(|(e, _)| e.clone()).collect();
            prop_assert_eq!(per_key.values().map(Vec::len).sum::<usize>(), input.len());
            for (key, ids) in &per_key {
                let want: Vec<&AdEvent> = input.iter()
                    .filter(|e| PackedEvent::new(e).unwrap().key_bucket(buckets).map(|b| b.to_string()).as_ref() == Some(key))
                    .collect();
                for t in EventType::ALL {
                    let want_t: Vec<crate::event::EventId> = want.iter()
                        .filter(|e| e.event_type == t).map(|e| e.event_id).collect();
                    let got_t: Vec<crate::event::EventId> = ids.iter().copied()
                        .filter(|id| want.iter().any(|e| e.event_type == t && e.event_id == *id))
                        .collect();
                    prop_assert_eq!(got_t, want_t);
                }
            }
        }

        #[test]
        fn an_event_larger_than_the_budget_is_refused_not_dropped(event in arb_event()) {
            let packed = PackedEvent::new(&event).unwrap();
            let packer = Packer::new(config(packed.len(), ContentEncoding::Identity));
            prop_assert!(packer.check_fits(&packed).is_err());
            prop_assert!(packer.pack("t", &[packed]).is_err());
        }
    }

    #[test]
    fn envelopes_carry_the_attributes_filter_policies_use() {
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let ev = arb_event().new_tree(&mut runner).unwrap().current();
        let envs = Packer::default()
            .pack("acme", &[PackedEvent::new(&ev).unwrap()])
            .unwrap();
        let attrs = &envs[0].attributes;
        assert_eq!(attrs[ATTR_SCHEMA], SCHEMA);
        assert_eq!(attrs[ATTR_TENANT], "acme");
        assert_eq!(attrs[ATTR_CONTENT_ENCODING], "identity");
        assert_eq!(envs[0].types(), vec![ev.event_type.as_str().to_owned()]);
    }

    #[test]
    fn split_by_type_gives_each_envelope_one_type_and_keeps_every_event() {
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let events: Vec<AdEvent> = (0..60)
            .map(|_| arb_event().new_tree(&mut runner).unwrap().current())
            .collect();
        let packed: Vec<PackedEvent> = events
            .iter()
            .map(|e| PackedEvent::new(e).unwrap())
            .collect();
        let envs = Packer::default().pack("t", &packed).unwrap();
        for env in &envs {
            assert_eq!(env.types().len(), 1, "{:?}", env.types());
        }
        let mut got: Vec<_> = decode_all(&envs).into_iter().map(|e| e.event_id).collect();
        let mut want: Vec<_> = events.iter().map(|e| e.event_id).collect();
        got.sort();
        want.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn an_sns_notification_is_unwrapped_with_its_attributes() {
        let inner = json!({"v": 1, "events": [{"a": 1}]}).to_string();
        let note = json!({
            "Type": "Notification",
            "MessageId": "x",
            "Message": inner,
            "MessageAttributes": {"spillway-tenant": {"Type": "String", "Value": "acme"}}
        });
        let d = decode_message(&note.to_string(), None).unwrap();
        assert_eq!(d.events.len(), 1);
        assert_eq!(d.notification_attributes["spillway-tenant"], "acme");
    }

    #[test]
    fn a_zstd_body_is_recognised_without_its_attribute() {
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let ev = arb_event().new_tree(&mut runner).unwrap().current();
        let packer = Packer::new(config(DEFAULT_BUDGET_BYTES, ContentEncoding::Zstd));
        let envs = packer.pack("t", &[PackedEvent::new(&ev).unwrap()]).unwrap();
        assert!(envs[0].body.starts_with(ZSTD_BASE64_MAGIC));
        assert_eq!(decode_message(&envs[0].body, None).unwrap().events.len(), 1);
    }

    #[test]
    fn garbage_and_unknown_versions_are_decode_errors() {
        assert!(matches!(
            decode_message("hello", None),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode_message("{\"v\":2,\"events\":[]}", None),
            Err(DecodeError::Version(2))
        ));
        assert!(matches!(
            decode_message("KLUv/not-base64!", None),
            Err(DecodeError::Compression(_))
        ));
        assert!(matches!(
            decode_message("{\"events\":[]}", None),
            Err(DecodeError::Malformed(_))
        ));
    }
}
