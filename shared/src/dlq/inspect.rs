//! Reading a dead letter: its events (raw or SNS-wrapped, identity or zstd), and the replay
//! filters (`--type`, `--advertiser`, `--error-code`, `--older-than`, `--newer-than`,
//! `--match JSONPATH=VALUE`).
//!
//! A message matches a filter when every given criterion holds; a criterion given several
//! times matches any of its values; an event criterion (type, advertiser, match) holds when
//! at least one event of the envelope satisfies it. Messages move whole: an envelope is never
//! split, so its body stays byte for byte what it was.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use super::{DlqError, DlqMessage, Outgoing, ATTR_REPLAY_COUNT};
use crate::clock::Clock;
use crate::embedded::ATTR_SOURCE_QUEUE;
use crate::envelope::{decode_message, ATTR_CONTENT_ENCODING, ATTR_TYPES};
use crate::event::{AdEvent, ValidationPolicy};
use crate::source::{ATTR_ERROR_CODE, ATTR_ERROR_MESSAGE};

/// A dead letter decoded as far as it goes.
#[derive(Debug, Clone, Default)]
pub struct Inspection {
    /// The events inside (empty when the body is not an envelope).
    pub events: Vec<Value>,
    /// Why the body could not be decoded, when it could not.
    pub decode_error: Option<String>,
    /// For an SNS notification body: the inner message and the attributes it carried.
    pub notification: Option<(String, BTreeMap<String, String>)>,
}

impl Inspection {
    /// The event types inside (from the events, else from the `spillway-types` attribute).
    pub fn types(&self, message: &DlqMessage) -> BTreeSet<String> {
        let from_events: BTreeSet<String> = self
            .events
            .iter()
            .filter_map(|e| e.get("type").and_then(Value::as_str).map(str::to_owned))
            .collect();
        if !from_events.is_empty() {
            return from_events;
        }
        message
            .attributes
            .get(ATTR_TYPES)
            .and_then(|t| serde_json::from_str::<Vec<String>>(t).ok())
            .unwrap_or_default()
            .into_iter()
            .collect()
    }

    /// How many times `message` was replayed: the larger of its own counter attribute and,
    /// for an SNS notification body, the counter the notification carries (the DLQ of an SNS
    /// subscription without raw delivery holds the attributes only there).
    pub fn replay_count(&self, message: &DlqMessage) -> u32 {
        let inner = self
            .notification
            .as_ref()
            .and_then(|(_, attrs)| attrs.get(ATTR_REPLAY_COUNT))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        message.replay_count().max(inner)
    }

    /// The advertisers of the events inside.
    pub fn advertisers(&self) -> BTreeSet<String> {
        self.events
            .iter()
            .filter_map(|e| {
                e.get("advertiser_id")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .collect()
    }
}

#[derive(Deserialize)]
struct Notification {
    #[serde(rename = "Type")]
    kind: String,
    #[serde(rename = "Message")]
    message: String,
    #[serde(rename = "MessageAttributes", default)]
    attributes: BTreeMap<String, NotificationAttribute>,
}

#[derive(Deserialize)]
struct NotificationAttribute {
    #[serde(rename = "Value")]
    value: String,
}

/// Decodes a dead letter's body into its events.
pub fn inspect(message: &DlqMessage) -> Inspection {
    let notification = serde_json::from_str::<Notification>(message.body.trim())
        .ok()
        .filter(|n| n.kind == "Notification")
        .map(|n| {
            (
                n.message,
                n.attributes
                    .into_iter()
                    .map(|(k, v)| (k, v.value))
                    .collect::<BTreeMap<_, _>>(),
            )
        });
    let encoding = message
        .attributes
        .get(ATTR_CONTENT_ENCODING)
        .map(String::as_str);
    match decode_message(&message.body, encoding) {
        Ok(decoded) => Inspection {
            events: decoded
                .events
                .iter()
                .map(|raw| serde_json::from_str(raw.get()).unwrap_or(Value::Null))
                .collect(),
            decode_error: None,
            notification,
        },
        Err(e) => Inspection {
            events: Vec::new(),
            decode_error: Some(e.to_string()),
            notification,
        },
    }
}

/// One step of a JSONPath.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(usize),
    Any,
}

/// `--match JSONPATH=VALUE`: a JSONPath into each event (`$.campaign_id`,
/// `$.attributes.placement`, `$.items[0].sku`, `$.items[*].sku`) and the value it must have
/// (a string compares to a string value, anything else to the JSON text of the value).
/// Spaces around the path and the value are ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonMatch {
    path: Vec<Step>,
    value: String,
    raw: String,
}

impl JsonMatch {
    /// Parses `JSONPATH=VALUE`.
    ///
    /// # Errors
    /// [`DlqError::Invalid`] with what is wrong.
    pub fn parse(raw: &str) -> Result<Self, DlqError> {
        let bad = |why: &str| {
            DlqError::Invalid(format!(
                "--match {raw:?}: {why} (expected JSONPATH=VALUE, e.g. $.campaign_id=cmp-1)"
            ))
        };
        let (path, value) = raw.split_once('=').ok_or_else(|| bad("no '='"))?;
        let path = path.trim();
        let rest = path
            .strip_prefix('$')
            .ok_or_else(|| bad("a path starts with '$'"))?;
        let mut steps = Vec::new();
        let mut chars = rest.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '.' => {
                    let mut key = String::new();
                    while let Some(&n) = chars.peek() {
                        if n == '.' || n == '[' {
                            break;
                        }
                        key.push(n);
                        chars.next();
                    }
                    if key.is_empty() {
                        return Err(bad("empty key after '.'"));
                    }
                    steps.push(if key == "*" {
                        Step::Any
                    } else {
                        Step::Key(key)
                    });
                }
                '[' => {
                    let mut inner = String::new();
                    for n in chars.by_ref() {
                        if n == ']' {
                            break;
                        }
                        inner.push(n);
                    }
                    let inner = inner.trim();
                    let step = if inner == "*" {
                        Step::Any
                    } else if let Ok(i) = inner.parse::<usize>() {
                        Step::Index(i)
                    } else if let Some(k) = inner
                        .strip_prefix('\'')
                        .and_then(|k| k.strip_suffix('\''))
                        .or_else(|| inner.strip_prefix('"').and_then(|k| k.strip_suffix('"')))
                    {
                        Step::Key(k.to_owned())
                    } else {
                        return Err(bad("a bracket holds an index, * or a quoted key"));
                    };
                    steps.push(step);
                }
                _ => return Err(bad("expected '.' or '[' after '$'")),
            }
        }
        if steps.is_empty() {
            return Err(bad("the path names no field"));
        }
        Ok(Self {
            path: steps,
            // Spaces around `=` are layout, as around the path: `$.k = v` means `$.k=v`.
            value: value.trim().to_owned(),
            raw: raw.to_owned(),
        })
    }

    /// Whether some value at the path in `event` equals the expected value.
    pub fn matches(&self, event: &Value) -> bool {
        let mut current = vec![event];
        for step in &self.path {
            let mut next = Vec::new();
            for v in current {
                match step {
                    Step::Key(k) => next.extend(v.get(k.as_str())),
                    Step::Index(i) => next.extend(v.get(*i)),
                    Step::Any => match v {
                        Value::Array(items) => next.extend(items.iter()),
                        Value::Object(map) => next.extend(map.values()),
                        _ => {}
                    },
                }
            }
            current = next;
        }
        current.iter().any(|v| match v {
            Value::String(s) => *s == self.value,
            other => other.to_string() == self.value,
        })
    }

    /// The expression as given.
    pub fn as_str(&self) -> &str {
        &self.raw
    }
}

/// Which dead letters a replay or export takes.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Event types (any event of the message has one of them).
    pub types: Vec<String>,
    /// Advertiser ids (any event of the message has one of them).
    pub advertisers: Vec<String>,
    /// `spillway-error-code` values.
    pub error_codes: Vec<String>,
    /// Only messages at least this old.
    pub older_than: Option<Duration>,
    /// Only messages at most this old.
    pub newer_than: Option<Duration>,
    /// JSONPath matches (all must hold, each on some event).
    pub matches: Vec<JsonMatch>,
}

impl Filter {
    /// Whether the filter takes every message.
    pub fn is_empty(&self) -> bool {
        self.types.is_empty()
            && self.advertisers.is_empty()
            && self.error_codes.is_empty()
            && self.older_than.is_none()
            && self.newer_than.is_none()
            && self.matches.is_empty()
    }

    /// Whether `message` (decoded as `inspection`) passes, at `now_ms`.
    pub fn matches(&self, message: &DlqMessage, inspection: &Inspection, now_ms: i64) -> bool {
        if !self.error_codes.is_empty() {
            let code = message.attributes.get(ATTR_ERROR_CODE);
            if !code.is_some_and(|c| self.error_codes.iter().any(|w| w == c)) {
                return false;
            }
        }
        if self.older_than.is_some() || self.newer_than.is_some() {
            let Some(age) = message.age_secs(now_ms) else {
                return false;
            };
            if self.older_than.is_some_and(|d| age < d.as_secs()) {
                return false;
            }
            if self.newer_than.is_some_and(|d| age > d.as_secs()) {
                return false;
            }
        }
        if !self.types.is_empty() {
            let types = inspection.types(message);
            if !self.types.iter().any(|t| types.contains(t)) {
                return false;
            }
        }
        if !self.advertisers.is_empty() {
            let advertisers = inspection.advertisers();
            if !self.advertisers.iter().any(|a| advertisers.contains(a)) {
                return false;
            }
        }
        self.matches
            .iter()
            .all(|m| inspection.events.iter().any(|e| m.matches(e)))
    }
}

/// Attributes that describe a past failure in a DLQ, not the message itself.
pub const FAILURE_ATTRIBUTES: [&str; 3] = [ATTR_ERROR_CODE, ATTR_ERROR_MESSAGE, ATTR_SOURCE_QUEUE];

/// What to publish to a topic for a dead letter, after re-running ingest validation on each
/// of its events: the original envelope body (the inner message of an SNS notification) and
/// its attributes, without the failure attributes.
///
/// # Errors
/// Why it may not go back to the topic: the body is not an envelope, or an event fails
/// validation (field, code and message of the first errors).
pub fn for_topic(
    message: &DlqMessage,
    inspection: &Inspection,
    policy: &ValidationPolicy,
    clock: &dyn Clock,
) -> Result<Outgoing, String> {
    if let Some(e) = &inspection.decode_error {
        return Err(format!("not a spillway envelope: {e}"));
    }
    if inspection.events.is_empty() {
        return Err("the envelope holds no event".into());
    }
    for (i, event) in inspection.events.iter().enumerate() {
        if let Err(errors) = AdEvent::from_json(event.clone(), policy, clock) {
            let id = event.get("event_id").and_then(Value::as_str).unwrap_or("?");
            let what: Vec<String> = errors
                .iter()
                .take(3)
                .map(|e| format!("{} {}: {}", e.field, e.code, e.message))
                .collect();
            return Err(format!(
                "event {i} ({id}) fails ingest validation: {}",
                what.join("; ")
            ));
        }
    }
    let mut out = message.to_outgoing();
    if let Some((inner, attrs)) = &inspection.notification {
        out.body.clone_from(inner);
        out.attributes.extend(attrs.clone());
    }
    for a in FAILURE_ATTRIBUTES {
        out.attributes.remove(a);
    }
    Ok(out)
}

/// Parses a duration such as `90s`, `15m`, `2h`, `7d` (a bare number is seconds).
///
/// # Errors
/// A message naming the accepted forms.
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let (num, unit) = raw
        .find(|c: char| !c.is_ascii_digit())
        .map_or((raw, ""), |i| raw.split_at(i));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{raw:?} is not a duration such as 90s, 15m, 2h or 7d"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3_600),
        "d" => n.saturating_mul(86_400),
        _ => return Err(format!("{raw:?}: unknown unit {unit:?}; use s, m, h or d")),
    };
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn message(body: &str) -> DlqMessage {
        DlqMessage {
            message_id: "m".into(),
            body: body.into(),
            attributes: BTreeMap::from([(ATTR_ERROR_CODE.to_owned(), "invalid_event".to_owned())]),
            receive_count: 1,
            sent_at_ms: Some(1_000_000),
            group_id: None,
            dedup_id: None,
            body_error: None,
        }
    }

    #[test]
    fn a_json_path_reaches_keys_indexes_and_wildcards() {
        let e = json!({"a": {"b": [{"c": "x"}, {"c": "y"}]}, "n": 15, "k": "v"});
        assert!(JsonMatch::parse("$.k=v").unwrap().matches(&e));
        assert!(JsonMatch::parse("$.n=15").unwrap().matches(&e));
        assert!(JsonMatch::parse("$.a.b[1].c=y").unwrap().matches(&e));
        assert!(JsonMatch::parse("$.a.b[*].c=x").unwrap().matches(&e));
        assert!(JsonMatch::parse("$['k']=v").unwrap().matches(&e));
        assert!(!JsonMatch::parse("$.a.b[0].c=y").unwrap().matches(&e));
        assert!(!JsonMatch::parse("$.missing=v").unwrap().matches(&e));
        for bad in ["k=v", "$=v", "$.k", "$..=v", "$[x]=1"] {
            assert!(JsonMatch::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn spaces_around_the_equals_sign_are_ignored_on_both_sides() {
        let e = json!({"campaign_id": "cmp-7", "n": 15});
        assert!(JsonMatch::parse("$.campaign_id = cmp-7")
            .unwrap()
            .matches(&e));
        assert!(JsonMatch::parse(" $.n =15 ").unwrap().matches(&e));
        assert!(!JsonMatch::parse("$.campaign_id = cmp-8")
            .unwrap()
            .matches(&e));
    }

    #[test]
    fn a_filter_needs_every_criterion_and_any_event() {
        let body = json!({"v":1,"events":[
            {"type":"click","advertiser_id":"adv-1","campaign_id":"c1"},
            {"type":"impression","advertiser_id":"adv-2","campaign_id":"c2"}]})
        .to_string();
        let m = message(&body);
        let i = inspect(&m);
        let now = 1_000_000 + 120_000;
        let f = |f: Filter| f.matches(&m, &i, now);
        assert!(f(Filter::default()));
        assert!(f(Filter {
            types: vec!["click".into()],
            advertisers: vec!["adv-2".into()],
            ..Filter::default()
        }));
        assert!(!f(Filter {
            types: vec!["conversion".into()],
            ..Filter::default()
        }));
        assert!(f(Filter {
            older_than: Some(Duration::from_secs(60)),
            newer_than: Some(Duration::from_secs(180)),
            ..Filter::default()
        }));
        assert!(!f(Filter {
            older_than: Some(Duration::from_secs(600)),
            ..Filter::default()
        }));
        assert!(!f(Filter {
            error_codes: vec!["max_receives".into()],
            ..Filter::default()
        }));
        assert!(f(Filter {
            matches: vec![JsonMatch::parse("$.campaign_id=c2").unwrap()],
            ..Filter::default()
        }));
    }

    #[test]
    fn an_sns_notification_is_unwrapped_for_the_topic() {
        let inner = json!({"v":1,"events":[{"type":"click"}]}).to_string();
        let body = json!({"Type":"Notification","Message": inner,
            "MessageAttributes": {"spillway-tenant": {"Type":"String","Value":"t"}}})
        .to_string();
        let m = message(&body);
        let i = inspect(&m);
        assert_eq!(i.events.len(), 1);
        let (msg, attrs) = i.notification.clone().unwrap();
        assert_eq!(msg, inner);
        assert_eq!(attrs["spillway-tenant"], "t");
        // The event is incomplete: ingest validation refuses it.
        let err = for_topic(
            &m,
            &i,
            &ValidationPolicy::structural(),
            &crate::clock::SystemClock,
        )
        .unwrap_err();
        assert!(err.contains("fails ingest validation"), "{err}");
    }

    #[test]
    fn the_replay_count_is_the_larger_of_the_outer_and_the_wrapped_one() {
        let wrapped = |inner: &str| {
            json!({"Type":"Notification","Message": "{}",
                "MessageAttributes": {ATTR_REPLAY_COUNT: {"Type":"String","Value": inner}}})
            .to_string()
        };
        let mut m = message(&wrapped("3"));
        assert_eq!(inspect(&m).replay_count(&m), 3, "no outer counter");
        m.attributes.insert(ATTR_REPLAY_COUNT.into(), "5".into());
        assert_eq!(inspect(&m).replay_count(&m), 5);
        let mut m = message(&wrapped("x"));
        assert_eq!(inspect(&m).replay_count(&m), 0, "unreadable counts as none");
        m.attributes.insert(ATTR_REPLAY_COUNT.into(), "1".into());
        assert_eq!(inspect(&m).replay_count(&m), 1);
    }

    #[test]
    fn durations_take_units() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7_200));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(604_800));
        assert!(parse_duration("7w").is_err());
        assert!(parse_duration("h").is_err());
    }
}
