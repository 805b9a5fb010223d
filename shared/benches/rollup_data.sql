-- The data of rollup_bound.sql and rollup_fold_study.sql, which include it with \ir once
-- connected to a fresh database holding the V1 schema. Not meant to be run on its own.
--
-- 50,000 events in 50 batches of 1,000 (n = 1 … 50,000; batch b holds n in (1000·b, 1000·b+1000]).
-- With ads = 0 (the default), as the postgres_sink bench's worst case: 100,000 ads over an
-- hour, so a new rollup row per event. With ads = N: N ads within one minute.
-- Creates ev_plain and ro_plain (unindexed copies of ad_events and ad_metrics_minute), the
-- staged events and each batch's summed rollup deltas, and:
--   events_batch(b)   the events of batch b, rows of ev_plain
--   rollups_batch(b)  the summed deltas of batch b in key order, rows of ro_plain
--   copy_batch(t, b)  binary COPY of batch b into table t from /tmp/spillway_rollup_batch_<b>
-- Writing those files needs a superuser; the including script removes them at its end.
\if :{?ads}
\else
\set ads 0
\endif
CREATE TABLE ev_plain (LIKE ad_events INCLUDING DEFAULTS);
CREATE TABLE ro_plain (LIKE ad_metrics_minute INCLUDING DEFAULTS);
CREATE TABLE staging AS
SELECT gen_random_uuid() AS event_id,
       (ARRAY['impression','click','conversion','view','engagement','spend'])[1 + (i % 6)] AS type,
       CASE WHEN :ads = 0 THEN now() - make_interval(secs => (i % 3600)::int)
            ELSE now() - make_interval(secs => (i % 60)::int) END AS occurred_at,
       CASE WHEN :ads = 0 THEN format('adv-%s', lpad(((i * 7919) % 50)::text, 4, '0'))
            ELSE format('adv-%s', ((i * 7919) % :ads) % 50) END AS advertiser_id,
       CASE WHEN :ads = 0 THEN format('cmp-%s-%s', lpad(((i * 7919) % 50)::text, 4, '0'),
                                      lpad(((i * 104729) % 1000)::text, 3, '0'))
            ELSE format('cmp-%s', (i * 7919) % :ads) END AS campaign_id,
       CASE WHEN :ads = 0 THEN format('ad-%s', lpad(((i * 15485863) % 100000)::text, 6, '0'))
            ELSE format('ad-%s', (i * 7919) % :ads) END AS ad_id,
       'pub-1'::text AS publisher_id, 'plc-1'::text AS placement_id,
       (i % 1000)::bigint AS cost_micros, NULL::bigint AS revenue_micros,
       'USD'::text AS currency, 'US'::text AS country, 'mobile'::text AS device,
       '{"k":"v"}'::jsonb AS attributes, i AS n
FROM generate_series(1::bigint, 50000::bigint) i;
CREATE TABLE staging_ro AS
SELECT (n - 1) / 1000 AS b, date_trunc('minute', occurred_at, 'UTC') AS minute, advertiser_id,
       campaign_id, ad_id, type, coalesce(currency, '') AS currency, count(*)::bigint AS events,
       sum(cost_micros)::bigint AS cost_micros, 0::bigint AS revenue_micros
FROM staging GROUP BY 1, 2, 3, 4, 5, 6, 7;
SELECT (SELECT count(*) FROM staging) AS events, count(*) AS batch_deltas,
       count(DISTINCT (minute, advertiser_id, campaign_id, ad_id, type)) AS rollup_keys
FROM staging_ro;
CREATE INDEX ON staging (n);
CREATE INDEX ON staging_ro (b);
CREATE FUNCTION events_batch(batch int) RETURNS SETOF ev_plain LANGUAGE sql STABLE AS $$
  SELECT event_id, type, occurred_at, advertiser_id, campaign_id, ad_id, publisher_id,
         placement_id, cost_micros, revenue_micros, currency, country, device, attributes, now()
  FROM staging WHERE n > batch * 1000 AND n <= (batch + 1) * 1000 $$;
CREATE FUNCTION rollups_batch(batch int) RETURNS SETOF ro_plain LANGUAGE sql STABLE AS $$
  SELECT minute, advertiser_id, campaign_id, ad_id, type, currency, events, cost_micros,
         revenue_micros
  FROM staging_ro WHERE b = batch ORDER BY 1, 2, 3, 4, 5, 6 $$;
CREATE PROCEDURE copy_batch(tbl text, batch int) LANGUAGE plpgsql AS $$ BEGIN
  EXECUTE format('COPY %I (event_id, type, occurred_at, advertiser_id, campaign_id, ad_id,
                  publisher_id, placement_id, cost_micros, revenue_micros, currency, country,
                  device, attributes) FROM %L (FORMAT binary)',
                 tbl, '/tmp/spillway_rollup_batch_' || batch);
END $$;
DO $$ BEGIN FOR b IN 0..49 LOOP
  EXECUTE format('COPY (SELECT event_id, type, occurred_at, advertiser_id, campaign_id, ad_id,
                  publisher_id, placement_id, cost_micros, revenue_micros, currency, country,
                  device, attributes FROM events_batch(%s)) TO %L (FORMAT binary)',
                 b, '/tmp/spillway_rollup_batch_' || b);
  END LOOP; END $$;
VACUUM ANALYZE;
