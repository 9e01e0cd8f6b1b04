-- One current definition, re-applied by `hookfleet migrate` when this file changes
-- (see sql/README.md). Edit it in place; never in a migration.
--
-- Deleting a webhook takes its rows in the one lock order every waiting writer uses.

-- The one lock order of a webhook's rows, for everything that waits for them: queue rows (by
-- delivery_id), then health, then the limiter row. The write-back follows it (its queue rows,
-- then health rows in webhook_id order); claims never wait, so they need not. A DELETE's
-- cascade would take them in whatever order its foreign-key triggers fire; this takes them
-- first, in the order above. (Delete one webhook per statement: a DELETE of several locks each
-- webhook's rows in turn, which no fixed order across webhooks can make safe against a batch
-- write-back.)
CREATE OR REPLACE FUNCTION hookfleet.webhooks_lock_before_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM hookfleet.delivery_queue q WHERE q.webhook_id = OLD.webhook_id
    ORDER BY q.delivery_id FOR UPDATE;
    PERFORM 1 FROM hookfleet.webhook_health_metrics h WHERE h.webhook_id = OLD.webhook_id FOR UPDATE;
    PERFORM 1 FROM hookfleet.webhook_rate_limits r WHERE r.webhook_id = OLD.webhook_id FOR UPDATE;
    RETURN OLD;
END
$$;
