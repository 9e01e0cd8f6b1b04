-- Per-webhook circuit-breaker overrides: the consecutive failures that open a webhook's circuit,
-- and how long it stays open before the probe. NULL means the fleet's settings
-- (CIRCUIT_BREAKER_FAILURE_THRESHOLD, CIRCUIT_BREAKER_TIMEOUT_SECONDS), which the workers pass to
-- the write-back.
-- Append-only: never edit this file once released; add a new numbered migration instead.

ALTER TABLE hookfleet.webhooks
    ADD COLUMN circuit_breaker_failure_threshold integer,
    ADD COLUMN circuit_breaker_timeout_seconds double precision,
    ADD CONSTRAINT webhooks_circuit_breaker_failure_threshold_range
        CHECK (circuit_breaker_failure_threshold IS NULL OR circuit_breaker_failure_threshold BETWEEN 1 AND 1000),
    ADD CONSTRAINT webhooks_circuit_breaker_timeout_seconds_range
        CHECK (circuit_breaker_timeout_seconds IS NULL OR circuit_breaker_timeout_seconds > 0 AND circuit_breaker_timeout_seconds <= 86400);
COMMENT ON COLUMN hookfleet.webhooks.circuit_breaker_failure_threshold IS 'Consecutive failures that open this webhook''s circuit; NULL: CIRCUIT_BREAKER_FAILURE_THRESHOLD';
COMMENT ON COLUMN hookfleet.webhooks.circuit_breaker_timeout_seconds IS 'Seconds this webhook''s circuit stays open before one probe; NULL: CIRCUIT_BREAKER_TIMEOUT_SECONDS';
