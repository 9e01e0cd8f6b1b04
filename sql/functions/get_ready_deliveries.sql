-- One current definition, re-applied by `hookfleet migrate` when this file changes
-- (see sql/README.md). Edit it in place; never in a migration.
--
-- The SPEC's claim interface: claim_deliveries without fleet-wide default rate limits and
-- without the rows that report held-back webhooks.

CREATE OR REPLACE FUNCTION hookfleet.get_ready_deliveries(worker_id text, batch_size integer, lease interval)
RETURNS TABLE (
    delivery_id     bigint,
    webhook_id      bigint,
    webhook_version bigint,
    message_id      text,
    event_type      text,
    body            text,
    retry_count     integer,
    max_retries     integer,
    created_at      timestamptz,
    locked_until    timestamptz
)
LANGUAGE sql VOLATILE AS $$
    SELECT c.delivery_id, c.webhook_id, c.webhook_version, c.message_id, c.event_type, c.body,
           c.retry_count, c.max_retries, c.created_at, c.locked_until
    FROM hookfleet.claim_deliveries($1, $2, $3) c
    WHERE c.delivery_id IS NOT NULL
$$;
COMMENT ON FUNCTION hookfleet.get_ready_deliveries(text, integer, interval) IS 'Claims up to batch_size due deliveries for worker_id under a lease (FOR UPDATE SKIP LOCKED), skipping disabled webhooks, open circuits (one probe when half-open), webhooks at max_in_flight or out of rate_limit_rps tokens; max_retries is NULL when neither the row nor the webhook sets it';
