-- One current definition, re-applied by `hookfleet migrate` when this file changes
-- (see sql/README.md). Edit it in place; never in a migration.
--
-- Operators' replay of a settled delivery: pending again, due now, with a fresh budget of tries
-- and of lease expiries.

-- A replay gives a fresh budget of tries and of lease expiries.
CREATE OR REPLACE FUNCTION hookfleet.replay_delivery(delivery_id bigint) RETURNS text
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    current_status text;
BEGIN
    SELECT q.delivery_status INTO current_status FROM hookfleet.delivery_queue q
    WHERE q.delivery_id = replay_delivery.delivery_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'hookfleet: delivery % does not exist', replay_delivery.delivery_id
            USING ERRCODE = 'no_data_found';
    END IF;
    IF current_status IN ('pending', 'in_flight') THEN
        RAISE EXCEPTION 'hookfleet: delivery % is %; only dead, cancelled or delivered deliveries can be replayed',
            replay_delivery.delivery_id, current_status
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    UPDATE hookfleet.delivery_queue q
    SET delivery_status = 'pending', retry_count = 0, lease_expiries = 0, next_attempt_at = now(),
        delivered_at = NULL, locked_by = NULL, locked_until = NULL
    WHERE q.delivery_id = replay_delivery.delivery_id;
    PERFORM pg_notify('hookfleet_deliveries', '');
    RETURN 'pending';
END
$$;
COMMENT ON FUNCTION hookfleet.replay_delivery(bigint) IS 'Resets a dead, cancelled or delivered delivery to pending (due now, retry budget reset)';
