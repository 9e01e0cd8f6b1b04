-- One current definition, re-applied by `hookfleet migrate` when this file changes
-- (see sql/README.md). Edit it in place; never in a migration.
--
-- Wakes idle workers when rows are inserted (LISTEN hookfleet_deliveries). Workers fall back to
-- HOOKFLEET_POLL_INTERVAL when the notification is lost, so this is latency, not correctness.

-- Wakes idle workers. Statement-level and with a constant payload, so a transaction that inserts
-- many rows sends one notification (PostgreSQL folds identical notifications in a transaction).
CREATE OR REPLACE FUNCTION hookfleet.notify_deliveries() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('hookfleet_deliveries', '');
    RETURN NULL;
END
$$;
