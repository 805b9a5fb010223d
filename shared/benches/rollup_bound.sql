-- The least work a synchronous sink must do on the postgres_sink bench's worst-case data
-- (one new rollup row per event), measured in SQL alone: no client, no protocol, no COPY.
--
--   psql -h 127.0.0.1 -U postgres -d postgres -f shared/benches/rollup_bound.sql
--
-- Creates and drops the database spillway_rollup_bound. 50,000 events (100,000 ads over an
-- hour, as the bench) are staged once; each step then writes them as 50 transactions of
-- 1,000 rows with INSERT … SELECT from the staging table (psql prints each step's time):
--   A  events into an unindexed copy of ad_events            (the bench's baseline, in SQL)
--   B  events into ad_events (primary key event_id)
--   C  one rollup row per event into ad_metrics_minute (6-column primary key), plain INSERT
--   D  B and C in the same transactions                      (the least a sink can do)
--   E  the rollup rows into an unindexed copy of ad_metrics_minute
--   F  the events by binary COPY (server-side, from files) into the unindexed copy
--   G  the events by binary COPY into ad_events, and their rollup rows by INSERT, one
--      transaction per 1,000 events
-- The most a sink can reach in the bench is about F / G (COPY, as the bench's baseline),
-- A / D by INSERT alone. F and G need a superuser (they read /tmp/spillway_rollup_bound_*,
-- removed at the end).
\set ON_ERROR_STOP on
DROP DATABASE IF EXISTS spillway_rollup_bound;
CREATE DATABASE spillway_rollup_bound;
\c spillway_rollup_bound
\i shared/migrations/V1__create_events_and_rollups.sql
CREATE TABLE ev_plain (LIKE ad_events INCLUDING DEFAULTS);
CREATE TABLE ro_plain (LIKE ad_metrics_minute INCLUDING DEFAULTS);
CREATE TABLE staging AS
SELECT gen_random_uuid() AS event_id,
       (ARRAY['impression','click','conversion','view','engagement','spend'])[1 + (i % 6)] AS type,
       now() - make_interval(secs => (i % 3600)::int) AS occurred_at,
       format('adv-%s', lpad(((i * 7919) % 50)::text, 4, '0')) AS advertiser_id,
       format('cmp-%s-%s', lpad(((i * 7919) % 50)::text, 4, '0'),
              lpad(((i * 104729) % 1000)::text, 3, '0')) AS campaign_id,
       format('ad-%s', lpad(((i * 15485863) % 100000)::text, 6, '0')) AS ad_id,
       'pub-1'::text AS publisher_id, 'plc-1'::text AS placement_id,
       (i % 1000)::bigint AS cost_micros, NULL::bigint AS revenue_micros,
       'USD'::text AS currency, 'US'::text AS country, 'mobile'::text AS device,
       '{"k":"v"}'::jsonb AS attributes, i AS n
FROM generate_series(1::bigint, 50000::bigint) i;
CREATE TABLE staging_ro AS
SELECT date_trunc('minute', occurred_at, 'UTC') AS minute, advertiser_id, campaign_id, ad_id,
       type, coalesce(currency, '') AS currency, count(*)::bigint AS events,
       sum(cost_micros)::bigint AS cost_micros, 0::bigint AS revenue_micros, min(n) AS n
FROM staging GROUP BY 1, 2, 3, 4, 5, 6;
SELECT count(*) AS events, (SELECT count(*) FROM staging_ro) AS rollup_rows FROM staging;
CREATE INDEX ON staging (n);
CREATE INDEX ON staging_ro (n);
-- Batch b (0-based) of the events, and of their rollup rows in key order.
CREATE FUNCTION events_batch(b int) RETURNS SETOF ev_plain LANGUAGE sql STABLE AS $$
  SELECT event_id, type, occurred_at, advertiser_id, campaign_id, ad_id, publisher_id,
         placement_id, cost_micros, revenue_micros, currency, country, device, attributes, now()
  FROM staging WHERE n > b * 1000 AND n <= (b + 1) * 1000 $$;
CREATE FUNCTION rollups_batch(b int) RETURNS SETOF ro_plain LANGUAGE sql STABLE AS $$
  SELECT minute, advertiser_id, campaign_id, ad_id, type, currency, events, cost_micros,
         revenue_micros
  FROM staging_ro WHERE n > b * 1000 AND n <= (b + 1) * 1000 ORDER BY 1, 2, 3, 4, 5, 6 $$;
VACUUM ANALYZE;
CHECKPOINT;
\timing on
\echo A: events, unindexed
DO $$ BEGIN FOR b IN 0..49 LOOP
  INSERT INTO ev_plain SELECT * FROM events_batch(b); COMMIT; END LOOP; END $$;
\echo B: events, keyed
DO $$ BEGIN FOR b IN 0..49 LOOP
  INSERT INTO ad_events SELECT * FROM events_batch(b); COMMIT; END LOOP; END $$;
\echo C: rollup rows, keyed
DO $$ BEGIN FOR b IN 0..49 LOOP
  INSERT INTO ad_metrics_minute SELECT * FROM rollups_batch(b); COMMIT; END LOOP; END $$;
\timing off
TRUNCATE ad_events, ad_metrics_minute;
CHECKPOINT;
\timing on
\echo D: events and rollup rows, keyed, one transaction per 1,000 events
DO $$ BEGIN FOR b IN 0..49 LOOP
  INSERT INTO ad_events SELECT * FROM events_batch(b);
  INSERT INTO ad_metrics_minute SELECT * FROM rollups_batch(b);
  COMMIT; END LOOP; END $$;
\echo E: rollup rows, unindexed
DO $$ BEGIN FOR b IN 0..49 LOOP
  INSERT INTO ro_plain SELECT * FROM rollups_batch(b); COMMIT; END LOOP; END $$;
\timing off
DO $$ BEGIN FOR b IN 0..49 LOOP
  EXECUTE format('COPY (SELECT * FROM events_batch(%s)) TO %L (FORMAT binary)', b,
                 '/tmp/spillway_rollup_bound_' || b);
  END LOOP; END $$;
TRUNCATE ev_plain, ad_events, ad_metrics_minute;
CHECKPOINT;
\timing on
\echo F: events by COPY, unindexed
DO $$ BEGIN FOR b IN 0..49 LOOP
  EXECUTE format('COPY ev_plain FROM %L (FORMAT binary)', '/tmp/spillway_rollup_bound_' || b);
  COMMIT; END LOOP; END $$;
\echo G: events by COPY and rollup rows by INSERT, keyed, one transaction per 1,000 events
DO $$ BEGIN FOR b IN 0..49 LOOP
  EXECUTE format('COPY ad_events FROM %L (FORMAT binary)', '/tmp/spillway_rollup_bound_' || b);
  INSERT INTO ad_metrics_minute SELECT * FROM rollups_batch(b);
  COMMIT; END LOOP; END $$;
\timing off
COPY (SELECT 1) TO PROGRAM 'rm -f /tmp/spillway_rollup_bound_*';
\c postgres
DROP DATABASE spillway_rollup_bound;
