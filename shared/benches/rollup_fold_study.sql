-- A design study, not the shipped sink: would folding the rollups outside the write
-- transaction (events appended with a sequence, a periodic fold of everything new since the
-- last fold) beat today's synchronous design? Server side only, 50,000 events, 50 batches.
--
--   psql -h 127.0.0.1 -U postgres -d postgres -v ads=0 -f shared/benches/rollup_fold_study.sql
--
-- ads=0 is the postgres_sink bench's worst case (100,000 ads over an hour, a new rollup row
-- per event); ads=N draws from N ads within a minute. Steps (psql prints each one's time):
--   F  events by binary COPY into an unindexed copy of ad_events (the bench's baseline)
--   S  synchronous, as shipped: events by COPY into ad_events and the batch's summed deltas
--      upserted into ad_metrics_minute, one transaction per batch
--   W  fold design, write path: events by COPY into a copy of ad_events keyed by event_id
--      with an identity column and its index
--   R  fold design, the folds: one every 10 batches, aggregating the new rows by sequence
-- Compare F/S with F/W (what the write path alone would reach) and F/(W+R) (all the work).
-- Needs a superuser (server-side COPY through /tmp/spillway_fold_*, removed at the end).
\set ON_ERROR_STOP on
DROP DATABASE IF EXISTS spillway_fold_study;
CREATE DATABASE spillway_fold_study;
\c spillway_fold_study
\i shared/migrations/V1__create_events_and_rollups.sql
CREATE TABLE ev_plain (LIKE ad_events INCLUDING DEFAULTS);
CREATE TABLE ev_seq (LIKE ad_events INCLUDING DEFAULTS, PRIMARY KEY (event_id),
                     seq bigint GENERATED ALWAYS AS IDENTITY);
CREATE INDEX ON ev_seq (seq);
CREATE TABLE ro_fold (LIKE ad_metrics_minute INCLUDING ALL);
CREATE TABLE staging AS
SELECT gen_random_uuid() AS event_id,
       (ARRAY['impression','click','conversion','view','engagement','spend'])[1 + (i % 6)] AS type,
       CASE WHEN :ads = 0 THEN now() - make_interval(secs => (i % 3600)::int)
            ELSE now() - make_interval(secs => (i % 60)::int) END AS occurred_at,
       CASE WHEN :ads = 0 THEN format('adv-%s', lpad(((i * 7919) % 50)::text, 4, '0'))
            ELSE format('adv-%s', ((i * 7919) % :ads) % 50) END AS advertiser_id,
       CASE WHEN :ads = 0 THEN format('cmp-%s-%s', lpad(((i * 7919) % 50)::text, 4, '0'), lpad(((i * 104729) % 1000)::text, 3, '0'))
            ELSE format('cmp-%s', (i * 7919) % :ads) END AS campaign_id,
       CASE WHEN :ads = 0 THEN format('ad-%s', lpad(((i * 15485863) % 100000)::text, 6, '0'))
            ELSE format('ad-%s', (i * 7919) % :ads) END AS ad_id,
       'pub-1'::text AS publisher_id, 'plc-1'::text AS placement_id,
       (i % 1000)::bigint AS cost_micros, NULL::bigint AS revenue_micros,
       'USD'::text AS currency, 'US'::text AS country, 'mobile'::text AS device,
       '{"k":"v"}'::jsonb AS attributes, i AS n
FROM generate_series(1::bigint, 50000::bigint) i;
-- each batch's rollup deltas, as the sink sums them
CREATE TABLE staging_ro AS
SELECT (n - 1) / 1000 AS b, date_trunc('minute', occurred_at, 'UTC') AS minute, advertiser_id, campaign_id, ad_id,
       type, coalesce(currency, '') AS currency, count(*)::bigint AS events,
       sum(cost_micros)::bigint AS cost_micros, 0::bigint AS revenue_micros
FROM staging GROUP BY 1, 2, 3, 4, 5, 6, 7;
SELECT count(*) AS batch_deltas, count(DISTINCT (minute, advertiser_id, campaign_id, ad_id, type)) AS keys FROM staging_ro;
CREATE INDEX ON staging (n);
CREATE INDEX ON staging_ro (b);
VACUUM ANALYZE;
DO $$ BEGIN FOR b IN 0..49 LOOP
  EXECUTE format('COPY (SELECT event_id, type, occurred_at, advertiser_id, campaign_id, ad_id, publisher_id, placement_id, cost_micros, revenue_micros, currency, country, device, attributes FROM staging WHERE n > %s AND n <= %s) TO %L (FORMAT binary)', b * 1000, (b + 1) * 1000, '/tmp/spillway_fold_' || b);
  END LOOP; END $$;
CREATE TABLE fold_mark (last bigint);
CREATE PROCEDURE fold(upto bigint) LANGUAGE sql AS $$
  INSERT INTO ro_fold AS m
  SELECT date_trunc('minute', occurred_at, 'UTC'), advertiser_id, campaign_id, ad_id, type, coalesce(currency, ''),
         count(*), sum(cost_micros), coalesce(sum(revenue_micros), 0)
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
DO $$ BEGIN FOR b IN 0..49 LOOP
  EXECUTE format('COPY ev_plain (event_id, type, occurred_at, advertiser_id, campaign_id, ad_id, publisher_id, placement_id, cost_micros, revenue_micros, currency, country, device, attributes) FROM %L (FORMAT binary)', '/tmp/spillway_fold_' || b);
  COMMIT; END LOOP; END $$;
\echo S: synchronous: events by COPY keyed + the batch deltas upserted, one transaction per batch
DO $$ BEGIN FOR bb IN 0..49 LOOP
  EXECUTE format('COPY ad_events (event_id, type, occurred_at, advertiser_id, campaign_id, ad_id, publisher_id, placement_id, cost_micros, revenue_micros, currency, country, device, attributes) FROM %L (FORMAT binary)', '/tmp/spillway_fold_' || bb);
  INSERT INTO ad_metrics_minute AS m SELECT minute, advertiser_id, campaign_id, ad_id, type, currency, events, cost_micros, revenue_micros
  FROM staging_ro r WHERE r.b = bb ORDER BY 1, 2, 3, 4, 5, 6
  ON CONFLICT (minute, advertiser_id, campaign_id, ad_id, type, currency) DO UPDATE
  SET events = m.events + EXCLUDED.events, cost_micros = m.cost_micros + EXCLUDED.cost_micros,
      revenue_micros = m.revenue_micros + EXCLUDED.revenue_micros;
  COMMIT; END LOOP; END $$;
\echo W: fold design, write path: events by COPY into a table keyed by event_id with a sequence index
DO $$ BEGIN FOR b IN 0..49 LOOP
  EXECUTE format('COPY ev_seq (event_id, type, occurred_at, advertiser_id, campaign_id, ad_id, publisher_id, placement_id, cost_micros, revenue_micros, currency, country, device, attributes) FROM %L (FORMAT binary)', '/tmp/spillway_fold_' || b);
  COMMIT; END LOOP; END $$;
\echo R: fold design, the folds: every 10 batches, one transaction each
DO $$ BEGIN FOR k IN 1..5 LOOP CALL fold(k * 10000); COMMIT; END LOOP; END $$;
\timing off
SELECT (SELECT count(*) FROM ro_fold) AS fold_rows, (SELECT count(*) FROM ad_metrics_minute) AS sync_rows,
       (SELECT sum(events) FROM ro_fold) AS fold_events, (SELECT sum(events) FROM ad_metrics_minute) AS sync_events;
COPY (SELECT 1) TO PROGRAM 'rm -f /tmp/spillway_fold_*';
\c postgres
DROP DATABASE spillway_fold_study;
