//! Property-test strategies for valid events.

use proptest::prelude::*;
use serde_json::{json, Value};
use time::OffsetDateTime;

use crate::clock::SystemClock;
use crate::event::{AdEvent, EventType, ValidationPolicy};

fn ident() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._:-]{1,64}"
}

/// Any valid event (built as JSON, then validated, so it is valid by construction).
pub(crate) fn arb_event() -> impl Strategy<Value = AdEvent> {
    (
        any::<u128>(),
        0..6_usize,
        0_i64..500_000,
        (ident(), ident(), ident()),
        proptest::option::of(ident()),
        0_u64..=1_000_000_000_000,
        proptest::option::of(0_u64..=1_000_000_000_000),
        proptest::sample::select(vec!["USD", "EUR", "JPY"]),
        proptest::collection::btree_map("[a-z]{1,8}", "\\PC{0,40}", 0..5),
    )
        .prop_map(
            |(id, t, secs, (adv, camp, ad), publisher, cost, revenue, currency, attrs)| {
                let t = EventType::ALL[t];
                let mut v = json!({
                    "event_id": uuid::Uuid::from_u128(id).to_string(),
                    "type": t.as_str(),
                    "occurred_at": (OffsetDateTime::now_utc() - time::Duration::seconds(secs))
                        .format(&time::format_description::well_known::Rfc3339).unwrap(),
                    "advertiser_id": adv, "campaign_id": camp, "ad_id": ad,
                    "cost_micros": cost, "currency": currency, "attributes": attrs,
                });
                if let Some(p) = publisher {
                    v["publisher_id"] = Value::String(p);
                }
                if t == EventType::Conversion {
                    if let Some(r) = revenue {
                        v["revenue_micros"] = json!(r);
                    }
                }
                AdEvent::from_json(v, &ValidationPolicy::default(), &SystemClock).unwrap()
            },
        )
}
