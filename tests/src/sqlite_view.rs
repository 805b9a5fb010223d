//! A [`StoreView`] of the SQLite store of `shared::sqlite_sink`, so the no-loss checker runs
//! against the embedded store too (the Kafka tests' workers write there).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use async_trait::async_trait;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::checker::{RollupKey, RollupTotals, Rollups, StoreView};

/// Reads a SQLite store file with its own read-only connections.
#[derive(Debug, Clone)]
pub struct SqliteStoreView {
    path: PathBuf,
}

impl SqliteStoreView {
    /// A view of the store at `path`.
    pub fn new(path: impl AsRef<Path>) -> Self {
        Self {
            path: path.as_ref().to_path_buf(),
        }
    }

    fn open(&self) -> anyhow::Result<rusqlite::Connection> {
        let conn = rusqlite::Connection::open_with_flags(
            &self.path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .with_context(|| format!("opening {}", self.path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        Ok(conn)
    }

    fn query_rollups(&self, sql: &str) -> anyhow::Result<Rollups> {
        let conn = self.open()?;
        let mut stmt = conn.prepare(sql)?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, i64>(7)?,
                r.get::<_, i64>(8)?,
            ))
        })?;
        let mut out = Rollups::new();
        for row in rows {
            let (minute, adv, cmp, ad, ty, cur, events, cost, revenue) = row?;
            let minute = OffsetDateTime::parse(&minute, &Rfc3339)
                .with_context(|| format!("minute {minute:?}"))?;
            out.insert(
                RollupKey {
                    minute,
                    advertiser_id: adv,
                    campaign_id: cmp,
                    ad_id: ad,
                    event_type: ty,
                    currency: cur,
                },
                RollupTotals {
                    events,
                    cost_micros: cost,
                    revenue_micros: revenue,
                },
            );
        }
        Ok(out)
    }
}

#[async_trait]
impl StoreView for SqliteStoreView {
    async fn stored_ids(&self) -> anyhow::Result<Vec<Uuid>> {
        let conn = self.open()?;
        let mut stmt = conn.prepare("SELECT event_id FROM ad_events")?;
        let ids = stmt
            .query_map([], |r| r.get::<_, Vec<u8>>(0))?
            .map(|b| Ok(Uuid::from_slice(&b?)?))
            .collect::<anyhow::Result<Vec<Uuid>>>()?;
        Ok(ids)
    }

    async fn rollups(&self) -> anyhow::Result<Rollups> {
        self.query_rollups(
            "SELECT minute, advertiser_id, campaign_id, ad_id, type, currency, events,
                    cost_micros, revenue_micros FROM ad_metrics_minute",
        )
    }

    async fn recomputed_rollups(&self) -> anyhow::Result<Rollups> {
        self.query_rollups(
            "SELECT substr(occurred_at, 1, 16) || ':00Z', advertiser_id, campaign_id, ad_id, type,
                    COALESCE(currency, ''), COUNT(*), SUM(cost_micros),
                    SUM(COALESCE(revenue_micros, 0))
             FROM ad_events GROUP BY 1, 2, 3, 4, 5, 6",
        )
    }
}
