-- One current definition, re-applied by `hookfleet migrate` when this file changes
-- (see sql/README.md). Edit it in place; never in a migration.
--
-- A webhook's limiter row (its token bucket) and health row are created with the webhook, so
-- neither the claim nor the write-back ever inserts one: an insert checks the foreign key, which
-- waits on the webhook's row while a DELETE of the webhook holds it.

CREATE OR REPLACE FUNCTION hookfleet.webhooks_create_bucket() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO hookfleet.webhook_rate_limits (webhook_id, tat) VALUES (NEW.webhook_id, 0)
    ON CONFLICT (webhook_id) DO NOTHING;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION hookfleet.webhooks_create_health() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO hookfleet.webhook_health_metrics (webhook_id) VALUES (NEW.webhook_id)
    ON CONFLICT (webhook_id) DO NOTHING;
    RETURN NULL;
END
$$;
