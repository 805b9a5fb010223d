-- A design study, not the shipped sink: would folding the rollups outside the write
-- transaction (events appended under an identity column, a periodic fold of everything new
-- since the last fold) beat the shipped synchronous design? Server side only.
--
--   psql -h 127.0.0.1 -U postgres -d postgres -v ads=0 -f shared/benches/rollup_fold_study.sql
--
-- The data is rollup_data.sql's: ads=0 the postgres_sink bench's worst case (a new rollup row
-- per event), ads=N N ads within a minute. Steps (psql prints each one's time):
--   F  events by binary COPY into an unindexed copy of ad_events (the bench's baseline)
--   S  synchronous, as shipped: events by COPY into ad_events and the batch's summed deltas
--      upserted into ad_metrics_minute, one transaction per batch
--   W  fold design, write path: events by COPY into a copy of ad_events keyed by event_id
--      with an identity column and its index
--   R  fold design, the folds: one every 10 batches, aggregating the new rows by sequence
-- Compare F/S with F/W (the write path alone) and F/(W+R) (all the work). Needs a superuser
-- (server-side COPY through /tmp/spillway_rollup_batch_*, removed at the end).
\set ON_ERROR_STOP on
DROP DATABASE IF EXISTS spillway_fold_study;
CREATE DATABASE spillway_fold_study;
\c spillway_fold_study
\ir ../migrations/V1__create_events_and_rollups.sql
\ir rollup_data.sql
CREATE TABLE ev_seq (LIKE ad_events INCLUDING DEFAULTS, PRIMARY KEY (event_id),
                     seq bigint GENERATED ALWAYS AS IDENTITY);
CREATE INDEX ON ev_seq (seq);
CREATE TABLE ro_fold (LIKE ad_metrics_minute INCLUDING ALL);
CREATE TABLE fold_mark (last bigint);
CREATE PROCEDURE fold(upto bigint) LANGUAGE sql AS $$
  INSERT INTO ro_fold AS m
  SELECT date_trunc('minute', occurred_at, 'UTC'), advertiser_id, campaign_id, ad_id, type,
         coalesce(currency, ''), count(*), sum(cost_micros), coalesce(sum(revenue_micros), 0)
  FROM ev_seq WHERE seq > coalesce((SELECT max(last) FROM fold_mark), 0) AND seq <= upto
  GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2, 3, 4, 5, 6
  ON CONFLICT (minute, advertiser_id, campaign_id, ad_id, type, currency) DO UPDATE
  SET events = m.events + EXCLUDED.events, cost_micros = m.cost_micros + EXCLUDED.cost_micros,
      revenue_micros = m.revenue_micros + EXCLUDED.revenue_micros;
  INSERT INTO fold_mark VALUES (upto);
$$;
CHECKPOINT;
\timing on
\echo F: events by COPY, unindexed
DO $$ BEGIN FOR b IN 0..49 LOOP CALL copy_batch('ev_plain', b); COMMIT; END LOOP; END $$;
\echo S: synchronous: events by COPY keyed + the batch deltas upserted, one transaction per batch
DO $$ BEGIN FOR b IN 0..49 LOOP
  CALL copy_batch('ad_events', b);
  INSERT INTO ad_metrics_minute AS m SELECT * FROM rollups_batch(b)
  ON CONFLICT (minute, advertiser_id, campaign_id, ad_id, type, currency) DO UPDATE
  SET events = m.events + EXCLUDED.events, cost_micros = m.cost_micros + EXCLUDED.cost_micros,
      revenue_micros = m.revenue_micros + EXCLUDED.revenue_micros;
  COMMIT; END LOOP; END $$;
\echo W: fold design, write path: events by COPY, keyed, with a sequence index
DO $$ BEGIN FOR b IN 0..49 LOOP CALL copy_batch('ev_seq', b); COMMIT; END LOOP; END $$;
\echo R: fold design, the folds: every 10 batches, one transaction each
DO $$ BEGIN FOR k IN 1..5 LOOP CALL fold(k * 10000); COMMIT; END LOOP; END $$;
\timing off
-- Both designs end with the same rollups.
SELECT (SELECT count(*) FROM ro_fold) AS fold_rows, (SELECT count(*) FROM ad_metrics_minute) AS sync_rows,
       (SELECT sum(events) FROM ro_fold) AS fold_events, (SELECT sum(events) FROM ad_metrics_minute) AS sync_events;
COPY (SELECT 1) TO PROGRAM 'rm -f /tmp/spillway_rollup_batch_*';
\c postgres
DROP DATABASE spillway_fold_study;
