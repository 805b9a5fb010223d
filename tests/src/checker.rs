//! The no-loss checker: compares what clients were told (event ids acknowledged with a 2xx,
//! optionally every id attempted) with what a store holds, and checks that the store's
//! rollups equal sums recomputed from its raw events.
//!
//! The store is reached through [`StoreView`], so the same check runs against PostgreSQL
//! ([`PostgresStoreView`]) and any other store that can list its ids and rollups.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::Path;

use anyhow::Context as _;
use async_trait::async_trait;
use serde::Serialize;
use shared::AdEvent;
use time::OffsetDateTime;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// How many ids or rollup keys a report lists per problem, to show what went wrong.
pub const SAMPLE_LEN: usize = 10;

/// The grouping of a rollup row: `(minute, advertiser_id, campaign_id, ad_id, type, currency)`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct RollupKey {
    /// `occurred_at` truncated to the minute, in UTC.
    #[serde(with = "time::serde::rfc3339")]
    pub minute: OffsetDateTime,
    /// The advertiser.
    pub advertiser_id: String,
    /// The campaign.
    pub campaign_id: String,
    /// The ad.
    pub ad_id: String,
    /// The event type's wire name.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The currency, `""` when absent.
    pub currency: String,
}

/// The counters of a rollup row.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RollupTotals {
    /// How many events.
    pub events: i64,
    /// Sum of `cost_micros`.
    pub cost_micros: i64,
    /// Sum of `revenue_micros`.
    pub revenue_micros: i64,
}

/// Rollup rows by key.
pub type Rollups = BTreeMap<RollupKey, RollupTotals>;

/// What the checker needs to read from a store.
#[async_trait]
pub trait StoreView: Send + Sync {
    /// The `event_id` of every stored raw event, once per stored row (so a store without a
    /// unique key would show an id twice).
    ///
    /// # Errors
    /// When the store cannot be read.
    async fn stored_ids(&self) -> anyhow::Result<Vec<Uuid>>;

    /// The rollup rows as stored.
    ///
    /// # Errors
    /// When the store cannot be read.
    async fn rollups(&self) -> anyhow::Result<Rollups>;

    /// The rollups recomputed from the raw events (COUNT and SUM grouped like the rollups).
    ///
    /// # Errors
    /// When the store cannot be read.
    async fn recomputed_rollups(&self) -> anyhow::Result<Rollups>;
}

/// One rollup key whose stored and recomputed totals differ (`None`: no such row).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RollupMismatch {
    /// The key.
    pub key: RollupKey,
    /// The stored row.
    pub stored: Option<RollupTotals>,
    /// The row recomputed from raw events.
    pub recomputed: Option<RollupTotals>,
}

/// The checker's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    /// Distinct ids attempted, when an attempted list was given.
    pub attempted: Option<usize>,
    /// Distinct ids acknowledged with a 2xx.
    pub acknowledged: usize,
    /// Distinct ids stored.
    pub stored: usize,
    /// Acknowledged but not stored: the promise broken.
    pub lost: usize,
    /// Stored but never attempted (only known with an attempted list).
    pub unexpected: Option<usize>,
    /// Counts beyond one per distinct stored event: the larger of extra rows sharing an id
    /// and rollup events beyond the number of distinct stored ids (double counting).
    pub duplicated: u64,
    /// Total `events` over the stored rollup rows.
    pub rollup_events: i64,
    /// Stored rollup rows.
    pub rollup_rows: usize,
    /// Whether every rollup row equals its recomputation from the raw events, and no key is
    /// missing on either side.
    pub rollups_consistent: bool,
    /// How many rollup keys differ.
    pub inconsistent_rollups: usize,
    /// Up to [`SAMPLE_LEN`] lost ids.
    pub lost_sample: Vec<Uuid>,
    /// Up to [`SAMPLE_LEN`] unexpected ids.
    pub unexpected_sample: Vec<Uuid>,
    /// Up to [`SAMPLE_LEN`] rollup mismatches.
    pub inconsistent_sample: Vec<RollupMismatch>,
}

impl CheckReport {
    /// No loss, nothing unexpected, no double counting, consistent rollups.
    pub fn is_clean(&self) -> bool {
        self.lost == 0
            && self.unexpected.unwrap_or(0) == 0
            && self.duplicated == 0
            && self.rollups_consistent
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let opt = |v: Option<usize>| {
            v.map_or_else(|| "n/a (no attempted list)".into(), |n| n.to_string())
        };
        writeln!(f, "attempted     {}", opt(self.attempted))?;
        writeln!(f, "acknowledged  {}", self.acknowledged)?;
        writeln!(f, "stored        {}", self.stored)?;
        writeln!(f, "lost          {}", self.lost)?;
        writeln!(f, "unexpected    {}", opt(self.unexpected))?;
        writeln!(f, "duplicated    {}", self.duplicated)?;
        writeln!(
            f,
            "rollups       {} ({} rows, {} events, {} inconsistent)",
            if self.rollups_consistent {
                "consistent"
            } else {
                "INCONSISTENT"
            },
            self.rollup_rows,
            self.rollup_events,
            self.inconsistent_rollups
        )?;
        for id in &self.lost_sample {
            writeln!(f, "  lost        {id}")?;
        }
        for id in &self.unexpected_sample {
            writeln!(f, "  unexpected  {id}")?;
        }
        for m in &self.inconsistent_sample {
            writeln!(
                f,
                "  rollup      {} {}/{}/{} {} {:?}: stored {:?}, recomputed {:?}",
                m.key.minute,
                m.key.advertiser_id,
                m.key.campaign_id,
                m.key.ad_id,
                m.key.event_type,
                m.key.currency,
                m.stored,
                m.recomputed
            )?;
        }
        write!(
            f,
            "verdict       {}",
            if self.is_clean() { "OK" } else { "FAILED" }
        )
    }
}

/// Parses an id list: one UUID per line (as `spillway loadgen --ids-out` writes), blank lines
/// and surrounding spaces ignored.
///
/// # Errors
/// The first line that is not a UUID, with its number.
pub fn parse_ids(text: &str) -> anyhow::Result<Vec<Uuid>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            Uuid::try_parse(l.trim())
                .with_context(|| format!("line {}: {:?} is not a UUID", i + 1, l.trim()))
        })
        .collect()
}

/// Reads an id list file; see [`parse_ids`].
///
/// # Errors
/// When the file cannot be read or a line is not a UUID.
pub fn read_ids(path: &Path) -> anyhow::Result<Vec<Uuid>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read id list {}", path.display()))?;
    parse_ids(&text).with_context(|| format!("in {}", path.display()))
}

/// Checks `store` against the acknowledged ids and, when given, the attempted ones (an
/// acknowledged id counts as attempted even if the attempted list lacks it).
///
/// # Errors
/// When the store cannot be read.
pub async fn check(
    store: &dyn StoreView,
    acknowledged: &[Uuid],
    attempted: Option<&[Uuid]>,
) -> anyhow::Result<CheckReport> {
    let stored_rows = store.stored_ids().await.context("reading stored ids")?;
    let rollups = store.rollups().await.context("reading rollups")?;
    let recomputed = store
        .recomputed_rollups()
        .await
        .context("recomputing rollups")?;

    let stored: HashSet<Uuid> = stored_rows.iter().copied().collect();
    let acknowledged: HashSet<Uuid> = acknowledged.iter().copied().collect();
    let attempted: Option<HashSet<Uuid>> =
        attempted.map(|a| a.iter().chain(&acknowledged).copied().collect());

    let mut lost: Vec<Uuid> = acknowledged.difference(&stored).copied().collect();
    lost.sort_unstable();
    let mut unexpected: Option<Vec<Uuid>> = attempted.as_ref().map(|a| {
        let mut u: Vec<Uuid> = stored.difference(a).copied().collect();
        u.sort_unstable();
        u
    });

    let rollup_events: i64 = rollups.values().map(|t| t.events).sum();
    let extra_rows = (stored_rows.len() - stored.len()) as u64;
    let distinct = i64::try_from(stored.len()).unwrap_or(i64::MAX);
    let extra_rollup_events = u64::try_from(rollup_events - distinct).unwrap_or(0);

    let mismatches = differences(&rollups, &recomputed);

    Ok(CheckReport {
        attempted: attempted.as_ref().map(HashSet::len),
        acknowledged: acknowledged.len(),
        stored: stored.len(),
        lost: lost.len(),
        unexpected: unexpected.as_ref().map(Vec::len),
        duplicated: extra_rows.max(extra_rollup_events),
        rollup_events,
        rollup_rows: rollups.len(),
        rollups_consistent: mismatches.is_empty(),
        inconsistent_rollups: mismatches.len(),
        lost_sample: lost.into_iter().take(SAMPLE_LEN).collect(),
        unexpected_sample: unexpected
            .take()
            .map(|u| u.into_iter().take(SAMPLE_LEN).collect())
            .unwrap_or_default(),
        inconsistent_sample: mismatches.into_iter().take(SAMPLE_LEN).collect(),
    })
}

/// The keys where `stored` and `recomputed` differ, or where either has no row.
fn differences(stored: &Rollups, recomputed: &Rollups) -> Vec<RollupMismatch> {
    stored
        .keys()
        .chain(recomputed.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .filter_map(|key| {
            let (s, r) = (stored.get(key).copied(), recomputed.get(key).copied());
            (s != r).then(|| RollupMismatch {
                key: key.clone(),
                stored: s,
                recomputed: r,
            })
        })
        .collect()
}

/// The rollups `sent` should produce, computed here from the events as the client sent them,
/// independently of any store: each `event_id` once (its first occurrence), grouped like the
/// stores group (minute in UTC, absent currency as `""`).
pub fn rollups_of<'a>(sent: impl IntoIterator<Item = &'a AdEvent>) -> anyhow::Result<Rollups> {
    let mut seen = HashSet::new();
    let mut rollups = Rollups::new();
    for ev in sent {
        if !seen.insert(ev.event_id) {
            continue;
        }
        let at = ev.occurred_at.to_offset(time::UtcOffset::UTC);
        let key = RollupKey {
            minute: at.replace_second(0)?.replace_nanosecond(0)?,
            advertiser_id: ev.advertiser_id.as_str().to_owned(),
            campaign_id: ev.campaign_id.as_str().to_owned(),
            ad_id: ev.ad_id.as_str().to_owned(),
            event_type: ev.event_type.as_str().to_owned(),
            currency: ev
                .currency
                .as_ref()
                .map_or_else(String::new, |c| c.as_str().to_owned()),
        };
        let totals = rollups.entry(key).or_default();
        totals.events += 1;
        totals.cost_micros += i64::try_from(ev.cost_micros.get())?;
        totals.revenue_micros += i64::try_from(ev.revenue_micros.map_or(0, |m| m.get()))?;
    }
    Ok(rollups)
}

/// Where the store's rollups differ from those of `sent` (the acknowledged events as the
/// client sent them; see [`rollups_of`]), in [`RollupMismatch::recomputed`]. The check above
/// compares the store with itself (its rollups with its raw rows, both written by the same
/// sink), so a field lost or altered on the way (packing, decoding, the encoder) would leave
/// it consistent and wrong; this compares it with what left the client.
///
/// # Errors
/// When the store cannot be read, or an amount does not fit an `i64`.
pub async fn content_mismatches(
    store: &dyn StoreView,
    sent: &[AdEvent],
) -> anyhow::Result<Vec<RollupMismatch>> {
    let stored = store.rollups().await.context("reading rollups")?;
    Ok(differences(&stored, &rollups_of(sent)?))
}

/// [`content_mismatches`] as an error naming the first differences, when there are any.
///
/// # Errors
/// As [`content_mismatches`], and when the store differs from what was sent.
pub async fn ensure_content(store: &dyn StoreView, sent: &[AdEvent]) -> anyhow::Result<()> {
    let found = content_mismatches(store, sent).await?;
    anyhow::ensure!(
        found.is_empty(),
        "{} rollup keys differ from what was sent; the first: {:?}",
        found.len(),
        &found[..found.len().min(5)]
    );
    Ok(())
}

/// Reads the events `spillway loadgen --events-out` wrote (one JSON object per line),
/// validated as the ingest API validates them.
///
/// # Errors
/// When the file cannot be read, or a line is not a valid event.
pub fn read_events(path: &Path) -> anyhow::Result<Vec<AdEvent>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read events {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let value: serde_json::Value = serde_json::from_str(l)
                .with_context(|| format!("{} line {}", path.display(), i + 1))?;
            AdEvent::from_json(
                value,
                &shared::ValidationPolicy::structural(),
                &shared::SystemClock,
            )
            .map_err(|e| anyhow::anyhow!("{} line {}: {e:?}", path.display(), i + 1))
        })
        .collect()
}

/// A [`StoreView`] of the PostgreSQL schema of `shared::postgres_sink`, over its own
/// connection.
#[derive(Debug)]
pub struct PostgresStoreView {
    client: tokio_postgres::Client,
    connection: JoinHandle<()>,
}

impl PostgresStoreView {
    /// Connects to `url` (same forms as `PostgresConfig::url`).
    ///
    /// # Errors
    /// When the database cannot be reached.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .context("connecting to PostgreSQL for the check")?;
        let connection = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "Checker connection ended");
            }
        });
        Ok(Self { client, connection })
    }

    async fn query_rollups(&self, sql: &str) -> anyhow::Result<Rollups> {
        self.client
            .query(sql, &[])
            .await?
            .iter()
            .map(|r| {
                Ok((
                    RollupKey {
                        minute: r.try_get(0)?,
                        advertiser_id: r.try_get(1)?,
                        campaign_id: r.try_get(2)?,
                        ad_id: r.try_get(3)?,
                        event_type: r.try_get(4)?,
                        currency: r.try_get(5)?,
                    },
                    RollupTotals {
                        events: r.try_get(6)?,
                        cost_micros: r.try_get(7)?,
                        revenue_micros: r.try_get(8)?,
                    },
                ))
            })
            .collect()
    }
}

impl Drop for PostgresStoreView {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

#[async_trait]
impl StoreView for PostgresStoreView {
    async fn stored_ids(&self) -> anyhow::Result<Vec<Uuid>> {
        self.client
            .query("SELECT event_id FROM ad_events", &[])
            .await?
            .iter()
            .map(|r| Ok(r.try_get(0)?))
            .collect()
    }

    async fn rollups(&self) -> anyhow::Result<Rollups> {
        self.query_rollups(
            "SELECT minute, advertiser_id, campaign_id, ad_id, type, currency,
                    events, cost_micros, revenue_micros
             FROM ad_metrics_minute",
        )
        .await
    }

    async fn recomputed_rollups(&self) -> anyhow::Result<Rollups> {
        // Grouped exactly as the sink groups: minute in UTC, absent currency as ''.
        self.query_rollups(
            "SELECT date_trunc('minute', occurred_at, 'UTC'), advertiser_id, campaign_id, ad_id,
                    type, coalesce(currency, ''), count(*), sum(cost_micros)::bigint,
                    coalesce(sum(revenue_micros), 0)::bigint
             FROM ad_events
             GROUP BY 1, 2, 3, 4, 5, 6",
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A store held in memory, to test the checker's arithmetic without a database.
    #[derive(Default)]
    struct FakeStore {
        ids: Vec<Uuid>,
        rollups: Rollups,
        recomputed: Rollups,
    }

    #[async_trait]
    impl StoreView for FakeStore {
        async fn stored_ids(&self) -> anyhow::Result<Vec<Uuid>> {
            Ok(self.ids.clone())
        }
        async fn rollups(&self) -> anyhow::Result<Rollups> {
            Ok(self.rollups.clone())
        }
        async fn recomputed_rollups(&self) -> anyhow::Result<Rollups> {
            Ok(self.recomputed.clone())
        }
    }

    fn key(ad: &str) -> RollupKey {
        RollupKey {
            minute: OffsetDateTime::UNIX_EPOCH,
            advertiser_id: "adv".into(),
            campaign_id: "cmp".into(),
            ad_id: ad.into(),
            event_type: "click".into(),
            currency: String::new(),
        }
    }

    fn ids(n: u64) -> Vec<Uuid> {
        (1..=n).map(|i| Uuid::from_u64_pair(0, i)).collect()
    }

    fn totals(events: i64) -> RollupTotals {
        RollupTotals {
            events,
            cost_micros: 10 * events,
            revenue_micros: 0,
        }
    }

    /// The content check: rollups computed from the events sent, each id once, and any
    /// difference from the store's rows found.
    #[tokio::test]
    async fn the_content_check_compares_the_store_with_what_was_sent() {
        let mut g = shared::synthetic::SyntheticEvents::new(5, 2);
        let sent: Vec<AdEvent> = (0..50)
            .map(|_| {
                AdEvent::from_json(
                    g.event(),
                    &shared::ValidationPolicy::structural(),
                    &shared::SystemClock,
                )
                .unwrap()
            })
            .collect();
        let expected = rollups_of(&sent).unwrap();
        assert_eq!(expected.values().map(|t| t.events).sum::<i64>(), 50);
        let cost: u64 = sent.iter().map(|e| e.cost_micros.get()).sum();
        let summed: i64 = expected.values().map(|t| t.cost_micros).sum();
        assert_eq!(u64::try_from(summed).unwrap(), cost);
        for key in expected.keys() {
            assert_eq!(key.minute.second(), 0);
            assert_eq!(key.minute.nanosecond(), 0);
        }
        let twice: Vec<AdEvent> = sent.iter().chain(&sent).cloned().collect();
        assert_eq!(rollups_of(&twice).unwrap(), expected, "an id counts once");

        let mut store = FakeStore {
            rollups: expected.clone(),
            ..FakeStore::default()
        };
        assert!(content_mismatches(&store, &sent).await.unwrap().is_empty());
        let first = store.rollups.keys().next().unwrap().clone();
        store.rollups.get_mut(&first).unwrap().cost_micros += 1;
        let last = store.rollups.keys().last().unwrap().clone();
        store.rollups.remove(&last);
        let found = content_mismatches(&store, &sent).await.unwrap();
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].key, first);
        assert_eq!(found[1].stored, None);
    }

    #[tokio::test]
    async fn a_store_holding_every_acknowledged_id_once_is_clean() {
        let rollups: Rollups = [(key("a"), totals(3))].into();
        let store = FakeStore {
            ids: ids(3),
            recomputed: rollups.clone(),
            rollups,
        };
        let attempted = ids(4);
        let report = check(&store, &ids(2), Some(&attempted)).await.unwrap();
        assert_eq!(report.attempted, Some(4));
        assert_eq!(report.acknowledged, 2);
        assert_eq!(report.stored, 3);
        assert_eq!(
            (report.lost, report.unexpected, report.duplicated),
            (0, Some(0), 0)
        );
        assert!(report.is_clean(), "{report}");
        assert!(report.to_string().ends_with("verdict       OK"));
    }

    #[tokio::test]
    async fn loss_strangers_duplicate_rows_and_double_counts_are_each_reported() {
        let mut stored = ids(3);
        stored.remove(0); // id 1 lost
        stored.push(Uuid::from_u64_pair(9, 9)); // never attempted
        stored.push(stored[0]); // a row twice
        let store = FakeStore {
            ids: stored,
            rollups: [(key("a"), totals(6))].into(),
            recomputed: [(key("a"), totals(4))].into(),
        };
        let attempted = ids(3);
        let report = check(&store, &ids(3), Some(&attempted)).await.unwrap();
        assert_eq!(report.lost, 1);
        assert_eq!(report.lost_sample, vec![Uuid::from_u64_pair(0, 1)]);
        assert_eq!(report.unexpected, Some(1));
        // 3 distinct ids stored, 4 rows, 6 rollup events: 3 counted twice.
        assert_eq!(report.duplicated, 3);
        assert!(!report.rollups_consistent);
        assert_eq!(report.inconsistent_rollups, 1);
        assert!(!report.is_clean());
        let text = report.to_string();
        assert!(
            text.contains("INCONSISTENT") && text.ends_with("FAILED"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_rollup_missing_on_either_side_is_inconsistent() {
        let store = FakeStore {
            ids: ids(2),
            rollups: [(key("a"), totals(2))].into(),
            recomputed: [(key("a"), totals(1)), (key("b"), totals(1))].into(),
        };
        let report = check(&store, &[], None).await.unwrap();
        assert_eq!(report.unexpected, None);
        assert_eq!(report.inconsistent_rollups, 2);
        assert_eq!(report.duplicated, 0);
        assert_eq!(report.inconsistent_sample[1].stored, None);
    }

    #[test]
    fn an_id_list_skips_blank_lines_and_names_the_bad_line() {
        let a = Uuid::from_u64_pair(1, 2);
        let text = format!("{a}\n\n  {}  \n", a.simple());
        assert_eq!(parse_ids(&text).unwrap(), vec![a, a]);
        let err = parse_ids(&format!("{a}\nnot-a-uuid\n")).unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
    }
}
