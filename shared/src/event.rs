//! The ad-metric event: validated newtypes, the raw form they are parsed from, and the
//! per-field errors a rejection carries.
//!
//! Parsing is strict: unknown top-level fields are rejected, every rule of the schema in
//! ARCHITECTURE.md is enforced, and every violation is reported (not only the first) with a
//! JSON pointer, a stable machine code and a human message.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime, UtcOffset};
use uuid::Uuid;

use crate::clock::Clock;
use crate::iso;

/// Largest allowed `cost_micros` / `revenue_micros` (one million units of currency).
pub const MAX_MICROS: u64 = 1_000_000_000_000;
/// Longest identifier (`advertiser_id`, `campaign_id`, …), in characters.
pub const MAX_ID_CHARS: usize = 64;
/// Most keys in `attributes`.
pub const MAX_ATTRIBUTES: usize = 32;
/// Longest attribute key, in bytes.
pub const MAX_ATTRIBUTE_KEY_BYTES: usize = 64;
/// Longest attribute value, in bytes.
pub const MAX_ATTRIBUTE_VALUE_BYTES: usize = 256;

/// The top-level fields of the schema. A key is classified with one `match`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    EventId,
    Type,
    OccurredAt,
    AdvertiserId,
    CampaignId,
    AdId,
    PublisherId,
    PlacementId,
    CostMicros,
    RevenueMicros,
    Currency,
    Country,
    Device,
    Attributes,
}

impl Known {
    const COUNT: usize = 14;

    fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "event_id" => Self::EventId,
            "type" => Self::Type,
            "occurred_at" => Self::OccurredAt,
            "advertiser_id" => Self::AdvertiserId,
            "campaign_id" => Self::CampaignId,
            "ad_id" => Self::AdId,
            "publisher_id" => Self::PublisherId,
            "placement_id" => Self::PlacementId,
            "cost_micros" => Self::CostMicros,
            "revenue_micros" => Self::RevenueMicros,
            "currency" => Self::Currency,
            "country" => Self::Country,
            "device" => Self::Device,
            "attributes" => Self::Attributes,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::EventId => "event_id",
            Self::Type => "type",
            Self::OccurredAt => "occurred_at",
            Self::AdvertiserId => "advertiser_id",
            Self::CampaignId => "campaign_id",
            Self::AdId => "ad_id",
            Self::PublisherId => "publisher_id",
            Self::PlacementId => "placement_id",
            Self::CostMicros => "cost_micros",
            Self::RevenueMicros => "revenue_micros",
            Self::Currency => "currency",
            Self::Country => "country",
            Self::Device => "device",
            Self::Attributes => "attributes",
        }
    }
}

/// A stable, machine-readable reason why a field (or a whole item) was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// A required field is absent or null.
    Missing,
    /// The JSON type is wrong (e.g. a number where a string is expected).
    InvalidType,
    /// Not a UUID.
    InvalidUuid,
    /// Not one of the allowed values of an enumeration.
    InvalidValue,
    /// Not an RFC 3339 timestamp with an offset.
    InvalidTimestamp,
    /// A number or time outside its allowed range.
    OutOfRange,
    /// A string or collection longer than allowed.
    TooLong,
    /// An identifier that is empty or has characters outside `[A-Za-z0-9._:-]`.
    InvalidCharacters,
    /// A field that is not part of the schema.
    UnknownField,
    /// A field not allowed for this event type.
    NotAllowed,
    /// Not an ISO 4217 alphabetic currency code.
    InvalidCurrency,
    /// Not an ISO 3166-1 alpha-2 country code.
    InvalidCountry,
    /// The item is not valid JSON (or not UTF-8).
    InvalidJson,
    /// The item is larger than the per-event or per-message limit.
    TooLarge,
    /// The API key may not send events for this advertiser.
    Forbidden,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::InvalidType => "invalid_type",
            Self::InvalidUuid => "invalid_uuid",
            Self::InvalidValue => "invalid_value",
            Self::InvalidTimestamp => "invalid_timestamp",
            Self::OutOfRange => "out_of_range",
            Self::TooLong => "too_long",
            Self::InvalidCharacters => "invalid_characters",
            Self::UnknownField => "unknown_field",
            Self::NotAllowed => "not_allowed",
            Self::InvalidCurrency => "invalid_currency",
            Self::InvalidCountry => "invalid_country",
            Self::InvalidJson => "invalid_json",
            Self::TooLarge => "too_large",
            Self::Forbidden => "forbidden",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One violation: which field (a JSON pointer), a stable code and a message for humans.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    /// JSON pointer to the offending field, e.g. `/attributes/campaign`; empty for the item.
    pub field: String,
    /// Stable machine code.
    pub code: ErrorCode,
    /// Human explanation.
    pub message: String,
}

impl FieldError {
    /// A violation of `field` (a bare top-level name or a pointer starting with `/`).
    pub fn new(field: &str, code: ErrorCode, message: impl Into<String>) -> Self {
        let field = if field.is_empty() || field.starts_with('/') {
            field.to_owned()
        } else {
            format!("/{field}")
        };
        Self {
            field,
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.field, self.code, self.message)
    }
}

/// The event types Spillway accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    /// An ad was served.
    Impression,
    /// An ad met the viewability standard.
    ViewableImpression,
    /// An ad was clicked.
    Click,
    /// A conversion attributed to an ad.
    Conversion,
    /// A video ad started playing.
    VideoStart,
    /// A video ad played to the end.
    VideoComplete,
}

impl EventType {
    /// Every type, in schema order.
    pub const ALL: [EventType; 6] = [
        Self::Impression,
        Self::ViewableImpression,
        Self::Click,
        Self::Conversion,
        Self::VideoStart,
        Self::VideoComplete,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Impression => "impression",
            Self::ViewableImpression => "viewable_impression",
            Self::Click => "click",
            Self::Conversion => "conversion",
            Self::VideoStart => "video_start",
            Self::VideoComplete => "video_complete",
        }
    }

    /// Parses a wire name.
    ///
    /// # Errors
    /// `invalid_value` when the name is not one of [`EventType::ALL`].
    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        match raw {
            "impression" => Ok(Self::Impression),
            "viewable_impression" => Ok(Self::ViewableImpression),
            "click" => Ok(Self::Click),
            "conversion" => Ok(Self::Conversion),
            "video_start" => Ok(Self::VideoStart),
            "video_complete" => Ok(Self::VideoComplete),
            _ => Err(FieldError::new("type", ErrorCode::InvalidValue, format!("unknown event type {}; expected one of impression, viewable_impression, click, conversion, video_start, video_complete", quoted(raw)))),
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The device class an event happened on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Device {
    /// Desktop or laptop.
    Desktop,
    /// Phone.
    Mobile,
    /// Tablet.
    Tablet,
    /// Connected TV.
    Ctv,
    /// Anything else.
    Other,
}

impl Device {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Desktop => "desktop",
            Self::Mobile => "mobile",
            Self::Tablet => "tablet",
            Self::Ctv => "ctv",
            Self::Other => "other",
        }
    }

    fn parse(raw: &str) -> Result<Self, FieldError> {
        match raw {
            "desktop" => Ok(Self::Desktop),
            "mobile" => Ok(Self::Mobile),
            "tablet" => Ok(Self::Tablet),
            "ctv" => Ok(Self::Ctv),
            "other" => Ok(Self::Other),
            _ => Err(FieldError::new(
                "device",
                ErrorCode::InvalidValue,
                format!(
                    "unknown device {}; expected desktop, mobile, tablet, ctv or other",
                    quoted(raw)
                ),
            )),
        }
    }
}

/// The client-generated event id: a UUID of any version, the idempotency key end to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EventId(Uuid);

impl EventId {
    /// Parses any textual UUID form; the id is kept in canonical lowercase hyphenated form.
    ///
    /// # Errors
    /// `invalid_uuid` when `raw` is not a UUID.
    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        Uuid::try_parse(raw).map(Self).map_err(|_| {
            FieldError::new(
                "event_id",
                ErrorCode::InvalidUuid,
                format!("{} is not a UUID", quoted(raw)),
            )
        })
    }

    /// The id as a UUID.
    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl From<Uuid> for EventId {
    fn from(id: Uuid) -> Self {
        Self(id)
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// An identifier such as `advertiser_id`: 1–64 characters of `[A-Za-z0-9._:-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Ident(String);

impl Ident {
    /// Parses an identifier for `field`.
    ///
    /// # Errors
    /// `invalid_characters` when empty or with a character outside the charset, `too_long`
    /// past 64 characters.
    pub fn parse(field: &str, raw: &str) -> Result<Self, FieldError> {
        if raw.is_empty() {
            return Err(FieldError::new(
                field,
                ErrorCode::InvalidCharacters,
                "must not be empty",
            ));
        }
        let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-');
        // Bytes first: the common, valid case needs no UTF-8 decoding. The charset is ASCII,
        // so a valid identifier has as many bytes as characters; an invalid one is reported
        // for its characters whatever its length.
        if raw.bytes().all(|b| allowed(char::from(b))) {
            if raw.len() > MAX_ID_CHARS {
                return Err(FieldError::new(
                    field,
                    ErrorCode::TooLong,
                    format!("{} characters; at most {MAX_ID_CHARS} allowed", raw.len()),
                ));
            }
            return Ok(Self(raw.to_owned()));
        }
        if let Some(bad) = raw.chars().find(|c| !allowed(*c)) {
            return Err(FieldError::new(
                field,
                ErrorCode::InvalidCharacters,
                format!("character {bad:?} is not allowed; use A-Z a-z 0-9 . _ : -"),
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    /// The identifier text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An amount in millionths of a currency unit, 0 ≤ n ≤ 10^12.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Micros(u64);

impl Micros {
    /// Parses a JSON number for `field`.
    ///
    /// # Errors
    /// `invalid_type` for a non-integer, `out_of_range` below 0 or above 10^12.
    pub fn parse(field: &str, raw: &Value) -> Result<Self, FieldError> {
        Self::from_json(field, &Json::of(raw))
    }

    fn from_json(field: &str, raw: &Json<'_>) -> Result<Self, FieldError> {
        match *raw {
            Json::Uint(v) if v <= MAX_MICROS => Ok(Self(v)),
            Json::Uint(_) => Err(FieldError::new(
                field,
                ErrorCode::OutOfRange,
                format!("must be at most {MAX_MICROS}"),
            )),
            Json::NegInt => Err(FieldError::new(
                field,
                ErrorCode::OutOfRange,
                "must not be negative",
            )),
            _ => Err(FieldError::new(
                field,
                ErrorCode::InvalidType,
                "must be an integer",
            )),
        }
    }

    /// The amount in micros.
    pub fn get(self) -> u64 {
        self.0
    }
}

/// An ISO 4217 alphabetic currency code.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Currency(String);

impl Currency {
    /// Parses a currency code.
    ///
    /// # Errors
    /// `invalid_currency` when `raw` is not an ISO 4217 code in upper case.
    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        if iso::is_currency(raw) {
            Ok(Self(raw.to_owned()))
        } else {
            Err(FieldError::new(
                "currency",
                ErrorCode::InvalidCurrency,
                format!(
                    "{} is not an ISO 4217 currency code such as \"USD\"",
                    quoted(raw)
                ),
            ))
        }
    }

    /// The code.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An ISO 3166-1 alpha-2 country code.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Country(String);

impl Country {
    /// Parses a country code.
    ///
    /// # Errors
    /// `invalid_country` when `raw` is not an ISO 3166-1 alpha-2 code in upper case.
    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        if iso::is_country(raw) {
            Ok(Self(raw.to_owned()))
        } else {
            Err(FieldError::new(
                "country",
                ErrorCode::InvalidCountry,
                format!(
                    "{} is not an ISO 3166-1 alpha-2 country code such as \"US\"",
                    quoted(raw)
                ),
            ))
        }
    }

    /// The code.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// How far from "now" an `occurred_at` may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeWindow {
    /// How far in the future an event may claim to have happened (clock skew).
    pub max_future: Duration,
    /// How old an event may be.
    pub max_age: Duration,
}

impl Default for TimeWindow {
    fn default() -> Self {
        Self {
            max_future: Duration::minutes(5),
            max_age: Duration::days(7),
        }
    }
}

/// The rules that depend on configuration rather than on the schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidationPolicy {
    /// The `occurred_at` window, checked against the injected clock; `None` skips it (workers
    /// re-validate events that ingest already time-checked, possibly days ago from a DLQ).
    pub window: Option<TimeWindow>,
}

impl Default for ValidationPolicy {
    fn default() -> Self {
        Self {
            window: Some(TimeWindow::default()),
        }
    }
}

impl ValidationPolicy {
    /// Schema rules only, no time window.
    pub fn structural() -> Self {
        Self { window: None }
    }
}

/// An event as received, not yet checked, plus what checking needs.
///
/// It is built from a `serde_json` object ([`RawEvent::new`]) or straight from JSON text
/// ([`RawEvent::from_json_str`]); the latter builds no `Value`: keys are matched as they are
/// read and strings stay borrowed from the text unless they hold escapes.
#[derive(Debug)]
pub struct RawEvent<'a> {
    shape: Shape<'a>,
    policy: &'a ValidationPolicy,
    now: OffsetDateTime,
}

impl<'a> RawEvent<'a> {
    /// Wraps a parsed JSON object for validation under `policy` at the clock's current time.
    pub fn new(
        fields: Map<String, Value>,
        policy: &'a ValidationPolicy,
        clock: &dyn Clock,
    ) -> Self {
        Self {
            shape: Shape::Object(Fields::from_map(fields)),
            policy,
            now: clock.now(),
        }
    }

    /// Wraps any JSON value; a non-object fails validation with `invalid_type`.
    ///
    /// # Errors
    /// The item-level error when `value` is not an object.
    pub fn from_value(
        value: Value,
        policy: &'a ValidationPolicy,
        clock: &dyn Clock,
    ) -> Result<Self, FieldError> {
        match value {
            Value::Object(fields) => Ok(Self::new(fields, policy, clock)),
            other => Err(not_an_object(Json::of(&other).kind())),
        }
    }

    /// Reads one event from JSON text. Any JSON value is accepted here (a non-object fails
    /// [`RawEvent::validate`] as a whole); the text is read as strictly as a
    /// `serde_json::Value` would read it, with the same recursion limit and the same errors.
    ///
    /// # Errors
    /// The `serde_json` error when `text` is not one JSON value, or nests too deep.
    pub fn from_json_str(
        text: &'a str,
        policy: &'a ValidationPolicy,
        clock: &dyn Clock,
    ) -> Result<Self, serde_json::Error> {
        Ok(Self {
            shape: serde_json::from_str(text)?,
            policy,
            now: clock.now(),
        })
    }

    /// The `event_id` as sent, if it is a string (valid or not), for reports.
    pub fn event_id(&self) -> Option<&str> {
        match &self.shape {
            Shape::Object(fields) => match fields.get(Known::EventId) {
                Some(Json::Str(id)) => Some(id),
                _ => None,
            },
            Shape::Other(_) => None,
        }
    }

    /// Checks every rule of the schema.
    ///
    /// # Errors
    /// Every violation found.
    pub fn validate(&self) -> Result<AdEvent, Vec<FieldError>> {
        match &self.shape {
            Shape::Object(fields) => validate_fields(fields, self.policy, self.now),
            Shape::Other(kind) => Err(vec![not_an_object(kind)]),
        }
    }
}

fn not_an_object(kind: &str) -> FieldError {
    FieldError::new(
        "",
        ErrorCode::InvalidType,
        format!("an event must be a JSON object, not {kind}"),
    )
}

/// A JSON value reduced to what validation looks at: scalars as they are (strings borrowed
/// from the input when they hold no escape), arrays as their kind, objects as their kind or,
/// for `attributes`, their entries in `serde_json::Map` order (sorted by key, the last of
/// duplicate keys kept).
#[derive(Debug, Clone, PartialEq)]
enum Json<'a> {
    Null,
    Bool,
    /// An integer ≥ 0 that fits a `u64`.
    Uint(u64),
    /// An integer < 0 that fits an `i64`.
    NegInt,
    /// Any other number.
    Float,
    Str(Cow<'a, str>),
    Array,
    /// An object; its entries are kept only where they are checked.
    Object(Vec<(Cow<'a, str>, Json<'a>)>),
}

impl Json<'_> {
    /// A short name for the value's type, for messages.
    fn kind(&self) -> &'static str {
        match self {
            Self::Null => "null",
            Self::Bool => "a boolean",
            Self::Uint(_) | Self::NegInt | Self::Float => "a number",
            Self::Str(_) => "a string",
            Self::Array => "an array",
            Self::Object(_) => "an object",
        }
    }

    /// A borrowed view of a `Value`, object entries not kept.
    fn of(v: &Value) -> Json<'_> {
        match v {
            Value::Null => Json::Null,
            Value::Bool(_) => Json::Bool,
            Value::Number(n) => Json::number(n),
            Value::String(s) => Json::Str(Cow::Borrowed(s)),
            Value::Array(_) => Json::Array,
            Value::Object(_) => Json::Object(Vec::new()),
        }
    }

    fn number(n: &serde_json::Number) -> Json<'static> {
        match (n.as_u64(), n.as_i64()) {
            (Some(v), _) => Json::Uint(v),
            (None, Some(_)) => Json::NegInt,
            (None, None) => Json::Float,
        }
    }

    /// Takes a `Value` apart without copying its strings.
    fn owned(v: Value, keep_entries: bool) -> Json<'static> {
        match v {
            Value::String(s) => Json::Str(Cow::Owned(s)),
            // A `Map` is already sorted with unique keys.
            Value::Object(map) if keep_entries => Json::Object(
                map.into_iter()
                    .map(|(k, v)| (Cow::Owned(k), Json::owned(v, false)))
                    .collect(),
            ),
            other => Json::of(&other).into_static(),
        }
    }

    fn into_static(self) -> Json<'static> {
        match self {
            Self::Null => Json::Null,
            Self::Bool => Json::Bool,
            Self::Uint(v) => Json::Uint(v),
            Self::NegInt => Json::NegInt,
            Self::Float => Json::Float,
            Self::Str(s) => Json::Str(Cow::Owned(s.into_owned())),
            Self::Array => Json::Array,
            Self::Object(_) => Json::Object(Vec::new()),
        }
    }
}

/// Sorts object entries by key and keeps the last of duplicate keys, as a `Map` would.
fn map_order<'a>(mut entries: Vec<(Cow<'a, str>, Json<'a>)>) -> Vec<(Cow<'a, str>, Json<'a>)> {
    if entries.windows(2).all(|w| w[0].0 < w[1].0) {
        return entries;
    }
    // The sort is stable, so after reversing, the last duplicate sent comes first and
    // `dedup_by` (which keeps the first of a run) keeps it.
    entries.reverse();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    entries.dedup_by(|a, b| a.0 == b.0);
    entries
}

/// Reads any JSON value into a [`Json`]. Nested values are walked through `deserialize_any`
/// like `serde_json::Value` walks them (so the recursion limit and every error are the
/// same), but not kept.
#[derive(Debug, Clone, Copy)]
struct JsonSeed {
    keep_entries: bool,
}

impl<'de> DeserializeSeed<'de> for JsonSeed {
    type Value = Json<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Json<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for JsonSeed {
    type Value = Json<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E>(self) -> Result<Json<'de>, E> {
        Ok(Json::Null)
    }

    fn visit_none<E>(self) -> Result<Json<'de>, E> {
        Ok(Json::Null)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Json<'de>, E> {
        Ok(Json::Bool)
    }

    fn visit_u64<E>(self, v: u64) -> Result<Json<'de>, E> {
        Ok(Json::Uint(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Json<'de>, E> {
        Ok(u64::try_from(v).map_or(Json::NegInt, Json::Uint))
    }

    fn visit_f64<E>(self, _: f64) -> Result<Json<'de>, E> {
        Ok(Json::Float)
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Json<'de>, E> {
        Ok(Json::Str(Cow::Borrowed(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Json<'de>, E> {
        Ok(Json::Str(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E>(self, v: String) -> Result<Json<'de>, E> {
        Ok(Json::Str(Cow::Owned(v)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json<'de>, A::Error> {
        let nested = JsonSeed {
            keep_entries: false,
        };
        while seq.next_element_seed(nested)?.is_some() {}
        Ok(Json::Array)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json<'de>, A::Error> {
        let nested = JsonSeed {
            keep_entries: false,
        };
        let mut entries = Vec::new();
        while let Some(key) = map.next_key_seed(KeySeed)? {
            let value = map.next_value_seed(nested)?;
            if self.keep_entries {
                entries.push((key, value));
            }
        }
        Ok(Json::Object(map_order(entries)))
    }
}

/// Reads an object key, borrowed from the input unless it holds escapes.
#[derive(Debug, Clone, Copy)]
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Cow<'de, str>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string key")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(v))
    }
}

/// The top-level fields of an object: the last value sent for each known field (`null`
/// counts as absent) and every key that is not part of the schema.
#[derive(Debug, Default)]
struct Fields<'a> {
    known: [Option<Json<'a>>; Known::COUNT],
    unknown: Vec<Cow<'a, str>>,
}

impl<'a> Fields<'a> {
    fn from_map(map: Map<String, Value>) -> Fields<'static> {
        let mut fields = Fields::default();
        for (key, value) in map {
            match Known::from_name(&key) {
                Some(k) => fields.set(k, Json::owned(value, k == Known::Attributes)),
                None => fields.unknown.push(Cow::Owned(key)),
            }
        }
        fields
    }

    fn set(&mut self, k: Known, value: Json<'a>) {
        self.known[k as usize] = match value {
            Json::Null => None,
            v => Some(v),
        };
    }

    fn get(&self, k: Known) -> Option<&Json<'a>> {
        self.known[k as usize].as_ref()
    }
}

/// The top level of an item: an object's fields, or the kind of anything else.
#[derive(Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "an object is the common case; boxing it would cost an allocation per event"
)]
enum Shape<'a> {
    Object(Fields<'a>),
    Other(&'static str),
}

impl<'de> Deserialize<'de> for Shape<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ShapeVisitor)
    }
}

#[derive(Debug)]
struct ShapeVisitor;

const ANY: JsonSeed = JsonSeed {
    keep_entries: false,
};

impl<'de> Visitor<'de> for ShapeVisitor {
    type Value = Shape<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an ad event")
    }

    fn visit_unit<E>(self) -> Result<Shape<'de>, E> {
        Ok(Shape::Other(Json::Null.kind()))
    }

    fn visit_none<E>(self) -> Result<Shape<'de>, E> {
        Ok(Shape::Other(Json::Null.kind()))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Shape<'de>, E> {
        Ok(Shape::Other(Json::Bool.kind()))
    }

    fn visit_u64<E>(self, _: u64) -> Result<Shape<'de>, E> {
        Ok(Shape::Other(Json::Float.kind()))
    }

    fn visit_i64<E>(self, _: i64) -> Result<Shape<'de>, E> {
        Ok(Shape::Other(Json::Float.kind()))
    }

    fn visit_f64<E>(self, _: f64) -> Result<Shape<'de>, E> {
        Ok(Shape::Other(Json::Float.kind()))
    }

    fn visit_str<E>(self, _: &str) -> Result<Shape<'de>, E> {
        Ok(Shape::Other(Json::Str(Cow::Borrowed("")).kind()))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Shape<'de>, A::Error> {
        ANY.visit_seq(seq).map(|v| Shape::Other(v.kind()))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Shape<'de>, A::Error> {
        let mut fields = Fields::default();
        while let Some(key) = map.next_key_seed(KeySeed)? {
            match Known::from_name(&key) {
                Some(k) => {
                    let value = map.next_value_seed(JsonSeed {
                        keep_entries: k == Known::Attributes,
                    })?;
                    fields.set(k, value);
                }
                None => {
                    map.next_value_seed(ANY)?;
                    fields.unknown.push(key);
                }
            }
        }
        Ok(Shape::Object(fields))
    }
}

/// A validated ad event: every field satisfies the schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdEvent {
    /// Idempotency key.
    pub event_id: EventId,
    /// What happened.
    #[serde(rename = "type")]
    pub event_type: EventType,
    /// When it happened, normalised to UTC.
    #[serde(with = "time::serde::rfc3339")]
    pub occurred_at: OffsetDateTime,
    /// Who pays.
    pub advertiser_id: Ident,
    /// The campaign.
    pub campaign_id: Ident,
    /// The creative.
    pub ad_id: Ident,
    /// The publisher that showed the ad.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publisher_id: Option<Ident>,
    /// The placement on the publisher's property.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement_id: Option<Ident>,
    /// Cost in micros (0 when absent).
    #[serde(default)]
    pub cost_micros: Micros,
    /// Revenue in micros; conversions only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revenue_micros: Option<Micros>,
    /// Currency of the money fields; present whenever one is non-zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<Currency>,
    /// Country of the viewer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<Country>,
    /// Device class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<Device>,
    /// Free-form string attributes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
}

impl AdEvent {
    /// Validates a JSON value in one step.
    ///
    /// # Errors
    /// Every violation found.
    pub fn from_json(
        value: Value,
        policy: &ValidationPolicy,
        clock: &dyn Clock,
    ) -> Result<Self, Vec<FieldError>> {
        RawEvent::from_value(value, policy, clock)
            .map_err(|e| vec![e])?
            .try_into()
    }
}

impl TryFrom<RawEvent<'_>> for AdEvent {
    type Error = Vec<FieldError>;

    fn try_from(raw: RawEvent<'_>) -> Result<Self, Self::Error> {
        raw.validate()
    }
}

/// Unknown fields reported by name per event; the rest are counted in one more error.
const MAX_UNKNOWN_REPORTED: usize = 10;
/// Bytes of an unknown key quoted in its error (cut on a character boundary).
const MAX_KEY_SHOWN: usize = 64;

/// Most bytes of a refused value quoted in its error message.
const MAX_VALUE_SHOWN: usize = 64;

/// A refused value as its message quotes it: escaped, and cut to [`MAX_VALUE_SHOWN`] bytes
/// with its full length said. Quoted whole, a 32 KiB value of escaped characters made an
/// answer several times the size of its request (past Lambda's 6 MB response limit, a `502`
/// the client retries).
fn quoted(raw: &str) -> String {
    let shown = crate::clip(raw, MAX_VALUE_SHOWN);
    if shown.len() == raw.len() {
        format!("{raw:?}")
    } else {
        format!("{shown:?}… ({} bytes)", raw.len())
    }
}

fn validate_fields(
    fields: &Fields<'_>,
    policy: &ValidationPolicy,
    now: OffsetDateTime,
) -> Result<AdEvent, Vec<FieldError>> {
    let mut check = Checker {
        fields,
        errors: Vec::new(),
    };

    if !fields.unknown.is_empty() {
        // In key order, each once, as they were reported when the fields were a `Map`.
        let mut unknown: Vec<&str> = fields.unknown.iter().map(AsRef::as_ref).collect();
        unknown.sort_unstable();
        unknown.dedup();
        // Bounded, so that an event of a thousand long unknown keys does not make an answer
        // many times the size of its request.
        let more = unknown.len().saturating_sub(MAX_UNKNOWN_REPORTED);
        for key in unknown.into_iter().take(MAX_UNKNOWN_REPORTED) {
            let shown = crate::clip(key, MAX_KEY_SHOWN);
            check.errors.push(FieldError::new(
                &format!("/{}", escape_pointer(shown)),
                ErrorCode::UnknownField,
                format!("{shown:?} is not a field of an ad event"),
            ));
        }
        if more > 0 {
            check.errors.push(FieldError::new(
                "",
                ErrorCode::UnknownField,
                format!("and {more} more unknown fields"),
            ));
        }
    }

    let event_id = check.required_str(Known::EventId, EventId::parse);
    let event_type = check.required_str(Known::Type, EventType::parse);
    let occurred_at = check.required_str(Known::OccurredAt, |s| parse_occurred_at(s, policy, now));
    let advertiser_id =
        check.required_str(Known::AdvertiserId, |s| Ident::parse("advertiser_id", s));
    let campaign_id = check.required_str(Known::CampaignId, |s| Ident::parse("campaign_id", s));
    let ad_id = check.required_str(Known::AdId, |s| Ident::parse("ad_id", s));
    let publisher_id = check.optional_str(Known::PublisherId, |s| Ident::parse("publisher_id", s));
    let placement_id = check.optional_str(Known::PlacementId, |s| Ident::parse("placement_id", s));
    let cost_micros = check.optional(Known::CostMicros, |v| Micros::from_json("cost_micros", v));
    let revenue_micros = check.optional(Known::RevenueMicros, |v| {
        Micros::from_json("revenue_micros", v)
    });
    let currency = check.optional_str(Known::Currency, Currency::parse);
    let country = check.optional_str(Known::Country, Country::parse);
    let device = check.optional_str(Known::Device, Device::parse);
    let attributes = check.optional(Known::Attributes, parse_attributes);

    if let (Some(t), Some(Some(_))) = (event_type, &revenue_micros) {
        if t != EventType::Conversion {
            check.errors.push(FieldError::new(
                "revenue_micros",
                ErrorCode::NotAllowed,
                format!("only conversion events carry revenue, not {t}"),
            ));
        }
    }
    let money = |m: &Option<Option<Micros>>| m.flatten().is_some_and(|m| m.get() > 0);
    if (money(&cost_micros) || money(&revenue_micros)) && matches!(currency, Some(None)) {
        check.errors.push(FieldError::new(
            "currency",
            ErrorCode::Missing,
            "required when cost_micros or revenue_micros is non-zero",
        ));
    }

    match (
        event_id,
        event_type,
        occurred_at,
        advertiser_id,
        campaign_id,
        ad_id,
    ) {
        (
            Some(event_id),
            Some(event_type),
            Some(occurred_at),
            Some(advertiser_id),
            Some(campaign_id),
            Some(ad_id),
        ) if check.errors.is_empty() => Ok(AdEvent {
            event_id,
            event_type,
            occurred_at,
            advertiser_id,
            campaign_id,
            ad_id,
            publisher_id: publisher_id.flatten(),
            placement_id: placement_id.flatten(),
            cost_micros: cost_micros.flatten().unwrap_or_default(),
            revenue_micros: revenue_micros.flatten(),
            currency: currency.flatten(),
            country: country.flatten(),
            device: device.flatten(),
            attributes: attributes.flatten().unwrap_or_default(),
        }),
        _ => Err(check.errors),
    }
}

/// Collects violations while fields are parsed. `Some(None)` from the optional helpers means
/// "absent and fine", `None` means "present and wrong".
struct Checker<'f, 'a> {
    fields: &'f Fields<'a>,
    errors: Vec<FieldError>,
}

impl Checker<'_, '_> {
    fn required_str<T>(
        &mut self,
        field: Known,
        parse: impl FnOnce(&str) -> Result<T, FieldError>,
    ) -> Option<T> {
        match self.optional_str(field, parse) {
            Some(Some(v)) => Some(v),
            Some(None) => {
                self.errors.push(FieldError::new(
                    field.name(),
                    ErrorCode::Missing,
                    "is required",
                ));
                None
            }
            None => None,
        }
    }

    fn optional_str<T>(
        &mut self,
        field: Known,
        parse: impl FnOnce(&str) -> Result<T, FieldError>,
    ) -> Option<Option<T>> {
        self.optional(field, |v| match v {
            Json::Str(s) => parse(s),
            other => Err(FieldError::new(
                field.name(),
                ErrorCode::InvalidType,
                format!("must be a string, not {}", other.kind()),
            )),
        })
    }

    fn optional<T>(
        &mut self,
        field: Known,
        parse: impl FnOnce(&Json<'_>) -> Result<T, FieldError>,
    ) -> Option<Option<T>> {
        match self.fields.get(field) {
            None => Some(None),
            Some(v) => match parse(v) {
                Ok(t) => Some(Some(t)),
                Err(e) => {
                    self.errors.push(e);
                    None
                }
            },
        }
    }
}

fn parse_occurred_at(
    raw: &str,
    policy: &ValidationPolicy,
    now: OffsetDateTime,
) -> Result<OffsetDateTime, FieldError> {
    let invalid = || {
        FieldError::new(
            "occurred_at",
            ErrorCode::InvalidTimestamp,
            format!(
                "{} is not an RFC 3339 timestamp with offset, e.g. 2026-01-31T12:00:00Z",
                quoted(raw)
            ),
        )
    };
    // `time` takes any byte between the date and the time; RFC 3339 has `T` (or `t`, or a
    // space by its note in 5.6), not `2026-01-31x12:00:00Z`.
    if !matches!(raw.as_bytes().get(10), Some(b'T' | b't' | b' ')) {
        return Err(invalid());
    }
    let at = OffsetDateTime::parse(raw, &Rfc3339).map_err(|_| invalid())?;
    if let Some(window) = policy.window {
        // A window reaching past the calendar (a huge setting meant as "no limit") bounds
        // nothing on that side.
        if now
            .checked_add(window.max_future)
            .is_some_and(|latest| at > latest)
        {
            return Err(FieldError::new(
                "occurred_at",
                ErrorCode::OutOfRange,
                format!(
                    "{raw} is more than {} s in the future",
                    window.max_future.whole_seconds()
                ),
            ));
        }
        if now
            .checked_sub(window.max_age)
            .is_some_and(|earliest| at < earliest)
        {
            return Err(FieldError::new(
                "occurred_at",
                ErrorCode::OutOfRange,
                format!("{raw} is older than {} s", window.max_age.whole_seconds()),
            ));
        }
    }
    // Stored and sent on in UTC, which RFC 3339 can only write for the years 0000–9999:
    // `0000-01-01T00:00:00+00:01` is in year −1 there, `9999-12-31T23:59:59-01:00` in 10000.
    at.checked_to_offset(UtcOffset::UTC)
        .filter(|utc| (0..=9999).contains(&utc.year()))
        .ok_or_else(|| {
            FieldError::new(
                "occurred_at",
                ErrorCode::OutOfRange,
                format!("{raw} is outside the years 0000 to 9999 once converted to UTC"),
            )
        })
}

fn parse_attributes(raw: &Json<'_>) -> Result<BTreeMap<String, String>, FieldError> {
    let Json::Object(entries) = raw else {
        return Err(FieldError::new(
            "attributes",
            ErrorCode::InvalidType,
            format!("must be an object of strings, not {}", raw.kind()),
        ));
    };
    if entries.len() > MAX_ATTRIBUTES {
        return Err(FieldError::new(
            "attributes",
            ErrorCode::TooLong,
            format!("{} keys; at most {MAX_ATTRIBUTES} allowed", entries.len()),
        ));
    }
    // The pointer is built only for an error.
    let pointer = |key: &str| format!("/attributes/{}", escape_pointer(key));
    let mut out = BTreeMap::new();
    for (key, value) in entries {
        if key.is_empty() {
            return Err(FieldError::new(
                &pointer(key),
                ErrorCode::InvalidCharacters,
                "keys must not be empty",
            ));
        }
        if key.len() > MAX_ATTRIBUTE_KEY_BYTES {
            return Err(FieldError::new(
                &pointer(key),
                ErrorCode::TooLong,
                format!(
                    "{} bytes; keys are at most {MAX_ATTRIBUTE_KEY_BYTES}",
                    key.len()
                ),
            ));
        }
        let Json::Str(value) = value else {
            return Err(FieldError::new(
                &pointer(key),
                ErrorCode::InvalidType,
                format!("must be a string, not {}", value.kind()),
            ));
        };
        if value.len() > MAX_ATTRIBUTE_VALUE_BYTES {
            return Err(FieldError::new(
                &pointer(key),
                ErrorCode::TooLong,
                format!(
                    "{} bytes; at most {MAX_ATTRIBUTE_VALUE_BYTES} allowed",
                    value.len()
                ),
            ));
        }
        // PostgreSQL text and jsonb cannot hold NUL, and SQS refuses a message body holding
        // U+FFFE or U+FFFF (outside the XML character set; JSON writes them unescaped): refuse
        // them here rather than have the envelope refused by the queue, or its batch by the
        // store, after a 202. Control characters are fine: JSON escapes them.
        let refused = |c: char| matches!(c, '\0' | '\u{FFFE}' | '\u{FFFF}');
        if let Some(c) = key.chars().chain(value.chars()).find(|&c| refused(c)) {
            return Err(FieldError::new(
                &pointer(key),
                ErrorCode::InvalidCharacters,
                format!(
                    "character U+{:04X} is not allowed in attributes",
                    u32::from(c)
                ),
            ));
        }
        out.insert(key.as_ref().to_owned(), value.as_ref().to_owned());
    }
    Ok(out)
}

/// Escapes a key for use in a JSON pointer (RFC 6901).
fn escape_pointer(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}
#[cfg(test)]
mod tests {
    use proptest::strategy::Strategy;
    use serde_json::json;

    use super::*;
    use crate::clock::FixedClock;

    fn clock() -> FixedClock {
        FixedClock::at(OffsetDateTime::parse("2026-11-20T12:00:00Z", &Rfc3339).unwrap())
    }

    fn valid() -> Value {
        json!({
            "event_id": "0b5e6a8c-2f4d-4e0a-9a43-6f1f1c7f2a10",
            "type": "conversion",
            "occurred_at": "2026-11-20T11:59:00+01:00",
            "advertiser_id": "adv-1",
            "campaign_id": "camp.2",
            "ad_id": "ad:3",
            "publisher_id": "pub_4",
            "cost_micros": 1500,
            "revenue_micros": 990000,
            "currency": "EUR",
            "country": "DE",
            "device": "mobile",
            "attributes": {"creative": "blue"}
        })
    }

    fn errors(v: Value) -> Vec<(String, ErrorCode)> {
        AdEvent::from_json(v, &ValidationPolicy::default(), &clock())
            .unwrap_err()
            .into_iter()
            .map(|e| (e.field, e.code))
            .collect()
    }

    fn with(field: &str, value: Value) -> Value {
        let mut v = valid();
        v[field] = value;
        v
    }

    fn without(field: &str) -> Value {
        let mut v = valid();
        v.as_object_mut().unwrap().remove(field);
        v
    }

    #[test]
    fn a_valid_event_parses_and_is_normalised_to_utc() {
        let ev = AdEvent::from_json(valid(), &ValidationPolicy::default(), &clock()).unwrap();
        assert_eq!(ev.event_type, EventType::Conversion);
        assert_eq!(ev.occurred_at.offset(), UtcOffset::UTC);
        assert_eq!(ev.cost_micros.get(), 1500);
        let back = serde_json::to_value(&ev).unwrap();
        assert_eq!(back["occurred_at"], "2026-11-20T10:59:00Z");
        assert_eq!(back["type"], "conversion");
    }

    #[test]
    fn a_serialised_event_parses_back_to_itself() {
        let ev = AdEvent::from_json(valid(), &ValidationPolicy::default(), &clock()).unwrap();
        let again = AdEvent::from_json(
            serde_json::to_value(&ev).unwrap(),
            &ValidationPolicy::default(),
            &clock(),
        )
        .unwrap();
        assert_eq!(ev, again);
    }

    #[test]
    fn each_required_field_is_reported_missing() {
        for f in [
            "event_id",
            "type",
            "occurred_at",
            "advertiser_id",
            "campaign_id",
            "ad_id",
        ] {
            assert_eq!(
                errors(without(f)),
                vec![(format!("/{f}"), ErrorCode::Missing)],
                "{f}"
            );
        }
    }

    #[test]
    fn every_violation_is_reported_not_only_the_first() {
        let mut v = with("event_id", json!("nope"));
        v["country"] = json!("XX");
        v["extra"] = json!(1);
        let errs = errors(v);
        assert!(errs.contains(&("/event_id".into(), ErrorCode::InvalidUuid)));
        assert!(errs.contains(&("/country".into(), ErrorCode::InvalidCountry)));
        assert!(errs.contains(&("/extra".into(), ErrorCode::UnknownField)));
    }

    #[test]
    fn unknown_fields_are_reported_by_name_ten_at_most_and_their_names_clipped() {
        let mut v = valid();
        for i in 0..1_000 {
            v[format!("{i:04}{}", "k".repeat(1_000))] = json!(0);
        }
        let errs = AdEvent::from_json(v, &ValidationPolicy::default(), &clock()).unwrap_err();
        assert_eq!(errs.len(), 11, "{errs:?}");
        assert!(errs[..10].iter().all(|e| e.field.len() <= 65));
        assert_eq!(errs[10].message, "and 990 more unknown fields");
        let bytes: usize = errs.iter().map(|e| e.field.len() + e.message.len()).sum();
        assert!(bytes < 2_000, "{bytes} bytes of errors");
    }

    #[test]
    fn each_rule_has_its_code() {
        let cases = [
            (
                with("event_id", json!("123")),
                "/event_id",
                ErrorCode::InvalidUuid,
            ),
            (
                with("event_id", json!(5)),
                "/event_id",
                ErrorCode::InvalidType,
            ),
            (
                with("type", json!("purchase")),
                "/type",
                ErrorCode::InvalidValue,
            ),
            (
                with("occurred_at", json!("yesterday")),
                "/occurred_at",
                ErrorCode::InvalidTimestamp,
            ),
            (
                with("occurred_at", json!("2026-11-20T12:00:00")),
                "/occurred_at",
                ErrorCode::InvalidTimestamp,
            ),
            (
                with("occurred_at", json!("2026-11-20T12:06:00Z")),
                "/occurred_at",
                ErrorCode::OutOfRange,
            ),
            (
                with("occurred_at", json!("2026-11-13T11:59:00Z")),
                "/occurred_at",
                ErrorCode::OutOfRange,
            ),
            (
                with("advertiser_id", json!("")),
                "/advertiser_id",
                ErrorCode::InvalidCharacters,
            ),
            (
                with("advertiser_id", json!("a b")),
                "/advertiser_id",
                ErrorCode::InvalidCharacters,
            ),
            (
                with("campaign_id", json!("x".repeat(65))),
                "/campaign_id",
                ErrorCode::TooLong,
            ),
            (
                with("placement_id", json!("é")),
                "/placement_id",
                ErrorCode::InvalidCharacters,
            ),
            (
                with("cost_micros", json!(-1)),
                "/cost_micros",
                ErrorCode::OutOfRange,
            ),
            (
                with("cost_micros", json!(1_000_000_000_001_u64)),
                "/cost_micros",
                ErrorCode::OutOfRange,
            ),
            (
                with("cost_micros", json!(1.5)),
                "/cost_micros",
                ErrorCode::InvalidType,
            ),
            (
                with("cost_micros", json!("10")),
                "/cost_micros",
                ErrorCode::InvalidType,
            ),
            (
                with("currency", json!("usd")),
                "/currency",
                ErrorCode::InvalidCurrency,
            ),
            (
                with("currency", json!("XYZ")),
                "/currency",
                ErrorCode::InvalidCurrency,
            ),
            (
                with("country", json!("USA")),
                "/country",
                ErrorCode::InvalidCountry,
            ),
            (
                with("device", json!("watch")),
                "/device",
                ErrorCode::InvalidValue,
            ),
            (
                with("attributes", json!([])),
                "/attributes",
                ErrorCode::InvalidType,
            ),
            (
                with("attributes", json!({"n": 1})),
                "/attributes/n",
                ErrorCode::InvalidType,
            ),
            (
                with("attributes", json!({"v": "x".repeat(257)})),
                "/attributes/v",
                ErrorCode::TooLong,
            ),
            (
                with("attributes", json!({"k".repeat(65): "v"})),
                &format!("/attributes/{}", "k".repeat(65)),
                ErrorCode::TooLong,
            ),
            (with("a/b", json!(1)), "/a~1b", ErrorCode::UnknownField),
            (
                with("attributes", json!({"k": "a\u{0}b"})),
                "/attributes/k",
                ErrorCode::InvalidCharacters,
            ),
            (
                with("attributes", json!({"k": "a\u{FFFF}b"})),
                "/attributes/k",
                ErrorCode::InvalidCharacters,
            ),
            (
                with("attributes", json!({"\u{FFFE}": "v"})),
                "/attributes/\u{FFFE}",
                ErrorCode::InvalidCharacters,
            ),
            (
                with("attributes", json!({"": "v"})),
                "/attributes/",
                ErrorCode::InvalidCharacters,
            ),
            (
                with("advertiser_id", json!("é".repeat(40))),
                "/advertiser_id",
                ErrorCode::InvalidCharacters,
            ),
        ];
        for (value, field, code) in cases {
            assert_eq!(
                errors(value.clone()),
                vec![(field.to_owned(), code)],
                "{value}"
            );
        }
    }

    #[test]
    fn too_many_attributes_are_rejected() {
        let attrs: Map<String, Value> = (0..33).map(|i| (format!("k{i}"), json!("v"))).collect();
        assert_eq!(
            errors(with("attributes", Value::Object(attrs))),
            vec![("/attributes".into(), ErrorCode::TooLong)]
        );
    }

    #[test]
    fn revenue_is_only_allowed_on_conversions() {
        assert_eq!(
            errors(with("type", json!("click"))),
            vec![("/revenue_micros".into(), ErrorCode::NotAllowed)]
        );
    }

    #[test]
    fn money_needs_a_currency_but_zero_does_not() {
        assert_eq!(
            errors(without("currency")),
            vec![("/currency".into(), ErrorCode::Missing)]
        );
        let mut v = without("currency");
        v["cost_micros"] = json!(0);
        v["revenue_micros"] = json!(0);
        assert!(AdEvent::from_json(v, &ValidationPolicy::default(), &clock()).is_ok());
    }

    #[test]
    fn the_time_window_follows_the_injected_clock_and_policy() {
        let old = with("occurred_at", json!("2026-01-01T00:00:00Z"));
        assert!(AdEvent::from_json(old.clone(), &ValidationPolicy::default(), &clock()).is_err());
        assert!(AdEvent::from_json(old.clone(), &ValidationPolicy::structural(), &clock()).is_ok());
        let wide = ValidationPolicy {
            window: Some(TimeWindow {
                max_future: Duration::minutes(5),
                max_age: Duration::days(365),
            }),
        };
        assert!(AdEvent::from_json(old, &wide, &clock()).is_ok());
    }

    #[test]
    fn a_window_past_the_calendars_end_bounds_nothing_instead_of_panicking() {
        let unbounded = ValidationPolicy {
            window: Some(TimeWindow {
                max_future: Duration::seconds(i64::MAX),
                max_age: Duration::seconds(i64::MAX),
            }),
        };
        for at in ["1970-01-01T00:00:00Z", "9999-12-31T23:59:59Z"] {
            let event = with("occurred_at", json!(at));
            assert!(
                AdEvent::from_json(event, &unbounded, &clock()).is_ok(),
                "{at}"
            );
        }
    }

    #[test]
    fn date_and_time_are_separated_by_t_or_a_space_only() {
        for at in [
            "2026-11-20T11:59:00Z",
            "2026-11-20t11:59:00z",
            "2026-11-20 11:59:00+00:00",
        ] {
            let event = with("occurred_at", json!(at));
            assert!(
                AdEvent::from_json(event, &ValidationPolicy::default(), &clock()).is_ok(),
                "{at}"
            );
        }
        for at in [
            "2026-11-20x11:59:00Z",
            "2026-11-20\n11:59:00Z",
            "2026-11-20",
            "",
        ] {
            let event = with("occurred_at", json!(at));
            let errors =
                AdEvent::from_json(event, &ValidationPolicy::default(), &clock()).unwrap_err();
            assert_eq!(errors[0].code, ErrorCode::InvalidTimestamp, "{at:?}");
        }
    }

    #[test]
    fn a_time_outside_the_years_rfc_3339_can_write_in_utc_is_out_of_range() {
        // Valid as written, but year −1 or 10000 once in UTC: the event could not be sent on
        // (it was packed as nothing, and the envelope lost it), and converting panicked.
        let unbounded = ValidationPolicy {
            window: Some(TimeWindow {
                max_future: Duration::seconds(i64::MAX),
                max_age: Duration::seconds(i64::MAX),
            }),
        };
        for policy in [unbounded, ValidationPolicy::structural()] {
            for at in ["0000-01-01T00:00:00+00:01", "9999-12-31T23:59:59-01:00"] {
                let event = with("occurred_at", json!(at));
                let errors = AdEvent::from_json(event, &policy, &clock()).unwrap_err();
                assert_eq!(errors.len(), 1, "{at}: {errors:?}");
                assert_eq!(errors[0].field, "/occurred_at");
                assert_eq!(errors[0].code, ErrorCode::OutOfRange, "{at}");
                assert!(
                    errors[0].message.contains("0000 to 9999"),
                    "{}",
                    errors[0].message
                );
            }
            for at in ["0000-01-01T00:00:00-00:01", "9999-12-31T23:59:59+01:00"] {
                let event = with("occurred_at", json!(at));
                let ok = AdEvent::from_json(event, &policy, &clock()).unwrap();
                assert!(
                    !crate::envelope::PackedEvent::new(&ok).unwrap().is_empty(),
                    "{at}"
                );
            }
        }
    }

    #[test]
    fn a_non_object_is_rejected_as_a_whole() {
        assert_eq!(
            errors(json!([1])),
            vec![(String::new(), ErrorCode::InvalidType)]
        );
    }

    /// What reading one text gives: the parse error or the validation, and the reported id.
    type Reading = (
        Result<Result<AdEvent, Vec<FieldError>>, String>,
        Option<String>,
    );

    /// Reads `text` through a `serde_json::Value`, as the ingest path used to.
    fn via_value(text: &str) -> Reading {
        let value = serde_json::from_str::<Value>(text).map_err(|e| e.to_string());
        let id = value
            .as_ref()
            .ok()
            .and_then(|v| v.get("event_id"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let policy = ValidationPolicy::default();
        (value.map(|v| AdEvent::from_json(v, &policy, &clock())), id)
    }

    /// Reads `text` straight into a `RawEvent`.
    fn via_text(text: &str) -> Reading {
        let policy = ValidationPolicy::default();
        let raw = RawEvent::from_json_str(text, &policy, &clock()).map_err(|e| e.to_string());
        let id = raw
            .as_ref()
            .ok()
            .and_then(RawEvent::event_id)
            .map(str::to_owned);
        (raw.map(|r| r.validate()), id)
    }

    fn snippet() -> impl Strategy<Value = String> {
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        proptest::sample::select(vec![
            "null".to_owned(),
            "true".into(),
            "0".into(),
            "-0".into(),
            "-1".into(),
            "1.5".into(),
            "1e400".into(),
            "18446744073709551616".into(),
            "1000000000001".into(),
            "1500".into(),
            "\"\"".into(),
            "\"USD\"".into(),
            "\"usd\"".into(),
            "\"DE\"".into(),
            "\"click\"".into(),
            "\"conversion\"".into(),
            "\"mobile\"".into(),
            "\"adv-1\"".into(),
            "\"a b\"".into(),
            "\"\\u0061d\"".into(),
            "\"\\ud800\"".into(),
            "\"0b5e6a8c-2f4d-4e0a-9a43-6f1f1c7f2a10\"".into(),
            "\"2026-11-20T11:59:00Z\"".into(),
            "[]".into(),
            "[1,{\"a\":[]}]".into(),
            "{}".into(),
            "{\"k\":\"v\"}".into(),
            "{\"k\":\"v\",\"k\":1}".into(),
            "{\"k\":1,\"k\":\"v\",\"a\":null}".into(),
            "{\"\":\"v\"}".into(),
            "{\"a/~b\":[]}".into(),
            "{\"\\u006b\":\"\\u0076\"}".into(),
            deep,
        ])
    }

    fn key() -> impl Strategy<Value = String> {
        proptest::sample::select(vec![
            "event_id",
            "type",
            "occurred_at",
            "advertiser_id",
            "campaign_id",
            "ad_id",
            "publisher_id",
            "placement_id",
            "cost_micros",
            "revenue_micros",
            "currency",
            "country",
            "device",
            "attributes",
            "extra",
            "a/b",
            "~x",
            "\\u0074ype",
        ])
        .prop_map(str::to_owned)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        #[test]
        fn reading_from_text_agrees_with_reading_a_value(
            base in proptest::bool::ANY,
            entries in proptest::collection::vec((key(), snippet()), 0..8),
            top in proptest::option::weighted(0.05, snippet()),
        ) {
            let text = match top {
                Some(t) => t,
                None => {
                    let mut parts: Vec<String> = Vec::new();
                    if base {
                        if let Value::Object(m) = valid() {
                            parts.extend(m.iter().map(|(k, v)| format!("{k:?}:{v}")));
                        }
                    }
                    parts.extend(entries.iter().map(|(k, v)| format!("\"{k}\":{v}")));
                    format!("{{{}}}", parts.join(","))
                }
            };
            proptest::prop_assert_eq!(via_text(&text), via_value(&text), "{}", text);
        }
    }

    #[test]
    fn any_uuid_form_is_accepted_and_normalised() {
        let v = with("event_id", json!("0B5E6A8C2F4D4E0A9A436F1F1C7F2A10"));
        let ev = AdEvent::from_json(v, &ValidationPolicy::default(), &clock()).unwrap();
        assert_eq!(
            ev.event_id.to_string(),
            "0b5e6a8c-2f4d-4e0a-9a43-6f1f1c7f2a10"
        );
    }
}
