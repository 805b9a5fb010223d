//! Synthetic, valid ad events for load generation, benchmarks and tests.

use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::event::EventType;

/// A deterministic generator of realistic (~350-byte) valid events.
#[derive(Debug, Clone)]
pub struct SyntheticEvents {
    state: u64,
    advertisers: u64,
    ads: Option<u64>,
}

impl SyntheticEvents {
    /// A generator seeded with `seed`, spreading events over `advertisers` advertisers.
    pub fn new(seed: u64, advertisers: u64) -> Self {
        Self {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            advertisers: advertisers.max(1),
            ads: None,
        }
    }

    /// Draws every event from a fixed set of `ads` ads, each belonging to one campaign of one
    /// advertiser, as real traffic does: a minute then holds at most `ads × 6` rollup keys
    /// (one per ad and event type). Without it, advertiser, campaign and ad (out of 100,000)
    /// are drawn independently, so nearly every event opens a rollup row of its own: the
    /// worst case for the rollups.
    #[must_use]
    pub fn with_ads(mut self, ads: u64) -> Self {
        self.ads = Some(ads.max(1));
        self
    }

    fn next_u64(&mut self) -> u64 {
        // xorshift64*: fast, good enough for synthetic data, no dependency.
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// The next event, occurring at `at`.
    pub fn event_at(&mut self, at: OffsetDateTime) -> Value {
        let id = Uuid::from_u64_pair(self.next_u64(), self.next_u64());
        let r = self.next_u64();
        let event_type = EventType::ALL[usize::try_from(r % 6).unwrap_or(0)];
        let (adv, camp, ad) = match self.ads {
            Some(ads) => {
                let ad = r / 13 % ads;
                (ad % self.advertisers, ad / self.advertisers % 20, ad)
            }
            None => (r / 7 % self.advertisers, r / 11 % 20, r / 13 % 100_000),
        };
        let country =
            ["US", "DE", "GB", "FR", "JP", "BR"][usize::try_from(r / 29 % 6).unwrap_or(0)];
        let device =
            ["desktop", "mobile", "tablet", "ctv"][usize::try_from(r / 31 % 4).unwrap_or(0)];
        let mut ev = json!({
            "event_id": id.hyphenated().to_string(),
            "type": event_type.as_str(),
            "occurred_at": at.format(&Rfc3339).unwrap_or_default(),
            "advertiser_id": format!("adv-{adv:04}"),
            "campaign_id": format!("cmp-{adv:04}-{camp:03}"),
            "ad_id": format!("ad-{ad:06}"),
            "publisher_id": format!("pub-{:05}", r / 17 % 5_000),
            "placement_id": format!("plc-{:04}", r / 19 % 1_000),
            "cost_micros": r / 23 % 5_000,
            "currency": "USD",
            "country": country,
            "device": device,
            "attributes": {"creative_size": "300x250", "bid_id": format!("{:016x}", r)}
        });
        if event_type == EventType::Conversion {
            ev["revenue_micros"] = json!(r / 37 % 50_000_000);
        }
        ev
    }

    /// The next event, occurring now.
    pub fn event(&mut self) -> Value {
        self.event_at(OffsetDateTime::now_utc())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use crate::event::{AdEvent, ValidationPolicy};

    #[test]
    fn synthetic_events_are_valid_and_about_350_bytes() {
        let mut g = SyntheticEvents::new(7, 50);
        let mut total = 0;
        for _ in 0..1000 {
            let ev = g.event();
            total += ev.to_string().len();
            AdEvent::from_json(ev, &ValidationPolicy::default(), &SystemClock).unwrap();
        }
        let avg = total / 1000;
        assert!((300..420).contains(&avg), "average size {avg}");
    }

    #[test]
    fn with_ads_bounds_the_rollup_keys_and_ties_each_ad_to_one_campaign() {
        let mut g = SyntheticEvents::new(3, 20).with_ads(50);
        let mut owner = std::collections::HashMap::new();
        let mut keys = std::collections::HashSet::new();
        for _ in 0..5_000 {
            let ev = g.event();
            let ad = ev["ad_id"].as_str().unwrap().to_owned();
            let campaign = (ev["advertiser_id"].clone(), ev["campaign_id"].clone());
            assert_eq!(
                owner.entry(ad.clone()).or_insert_with(|| campaign.clone()),
                &campaign
            );
            keys.insert((ad, ev["type"].clone()));
        }
        assert_eq!(owner.len(), 50);
        assert!(keys.len() <= 50 * 6, "{} keys", keys.len());
    }
}
