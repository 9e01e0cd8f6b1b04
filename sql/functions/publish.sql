-- One current definition, re-applied by `hookfleet migrate` when this file changes
-- (see sql/README.md). Edit it in place; never in a migration.

-- Fan-out: one row per enabled webhook subscribed to event_type (an empty subscription list means
-- all events). Idempotent per message_id. Returns how many rows were inserted.
CREATE OR REPLACE FUNCTION hookfleet.publish(event_type text, message_body jsonb, message_id text DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    id text := COALESCE(publish.message_id, 'msg_' || replace(gen_random_uuid()::text, '-', ''));
    inserted integer;
BEGIN
    INSERT INTO hookfleet.delivery_queue (webhook_id, message_id, event_type, message_body)
    SELECT w.webhook_id, id, publish.event_type, publish.message_body
    FROM hookfleet.webhooks w
    WHERE w.enabled
      AND (cardinality(w.event_types) = 0 OR publish.event_type = ANY (w.event_types))
    ORDER BY w.webhook_id
    ON CONFLICT ON CONSTRAINT delivery_queue_message_id_unique DO NOTHING;
    GET DIAGNOSTICS inserted = ROW_COUNT;
    RETURN inserted;
END
$$;
COMMENT ON FUNCTION hookfleet.publish(text, jsonb, text) IS 'Inserts one delivery per enabled webhook subscribed to event_type; idempotent per message_id; returns the number inserted';
