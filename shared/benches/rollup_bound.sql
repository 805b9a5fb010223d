-- The least work a synchronous sink must do on the postgres_sink bench's worst-case data
-- (one new rollup row per event), on the server alone: no client, no protocol, no summing.
--
--   psql -h 127.0.0.1 -U postgres -d postgres -f shared/benches/rollup_bound.sql
--
-- Creates and drops the database spillway_rollup_bound; the data is rollup_data.sql's (pass
-- -v ads=N for N ads within a minute). Each step writes the 50,000 events as 50
-- transactions of 1,000 (psql prints each step's time):
--   A  events by INSERT into an unindexed copy of ad_events
--   B  events by INSERT into ad_events (primary key event_id)
--   C  the batches' rollup rows by INSERT into ad_metrics_minute (6-column primary key)
--   D  B and C in the same transactions
--   E  the rollup rows by INSERT into an unindexed copy of ad_metrics_minute
--   F  events by binary COPY into the unindexed copy (the bench's baseline)
--   G  events by binary COPY into ad_events and their rollup rows by INSERT, one transaction
--      per batch (the least a sink can do)
-- The most a sink can reach in the bench is about F / G; A / D is the same by INSERT alone.
-- Needs a superuser (server-side COPY through /tmp/spillway_rollup_batch_*, removed at the end).
\set ON_ERROR_STOP on
DROP DATABASE IF EXISTS spillway_rollup_bound;
CREATE DATABASE spillway_rollup_bound;
\c spillway_rollup_bound
\ir ../migrations/V1__create_events_and_rollups.sql
\ir rollup_data.sql
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
TRUNCATE ev_plain, ad_events, ad_metrics_minute;
CHECKPOINT;
\timing on
\echo F: events by COPY, unindexed
DO $$ BEGIN FOR b IN 0..49 LOOP CALL copy_batch('ev_plain', b); COMMIT; END LOOP; END $$;
\echo G: events by COPY and rollup rows by INSERT, keyed, one transaction per 1,000 events
DO $$ BEGIN FOR b IN 0..49 LOOP
  CALL copy_batch('ad_events', b);
  INSERT INTO ad_metrics_minute SELECT * FROM rollups_batch(b);
  COMMIT; END LOOP; END $$;
\timing off
COPY (SELECT 1) TO PROGRAM 'rm -f /tmp/spillway_rollup_batch_*';
\c postgres
DROP DATABASE spillway_rollup_bound;
