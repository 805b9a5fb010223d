-- Raw events, one row per event_id: the idempotency key end to end.
CREATE TABLE ad_events (
    event_id       uuid        PRIMARY KEY,
    type           text        NOT NULL,
    occurred_at    timestamptz NOT NULL,
    advertiser_id  text        NOT NULL,
    campaign_id    text        NOT NULL,
    ad_id          text        NOT NULL,
    publisher_id   text,
    placement_id   text,
    cost_micros    bigint      NOT NULL CHECK (cost_micros >= 0),
    revenue_micros bigint      CHECK (revenue_micros >= 0),
    currency       text,
    country        text,
    device         text,
    attributes     jsonb       NOT NULL DEFAULT '{}'::jsonb,
    stored_at      timestamptz NOT NULL DEFAULT now()
);

-- Per-minute rollups, fed only by newly inserted events (in the same transaction).
-- `minute` is occurred_at truncated to the minute in UTC; `currency` is '' when absent.
CREATE TABLE ad_metrics_minute (
    minute         timestamptz NOT NULL,
    advertiser_id  text        NOT NULL,
    campaign_id    text        NOT NULL,
    ad_id          text        NOT NULL,
    type           text        NOT NULL,
    currency       text        NOT NULL DEFAULT '',
    events         bigint      NOT NULL,
    cost_micros    bigint      NOT NULL,
    revenue_micros bigint      NOT NULL,
    PRIMARY KEY (minute, advertiser_id, campaign_id, ad_id, type, currency)
);

