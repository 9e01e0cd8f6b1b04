-- One current definition, re-applied by `hookfleet migrate` when this file changes
-- (see sql/README.md). Edit it in place; never in a migration.

-- Cancels a pending delivery. Answers whether this call cancelled it, and the delivery's status
-- afterwards: (true, 'cancelled'), or (false, <status>) when it was not pending (an in_flight
-- delivery is already being attempted and cannot be cancelled).
CREATE OR REPLACE FUNCTION hookfleet.cancel_delivery(delivery_id bigint, OUT cancelled boolean, OUT delivery_status text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    SELECT q.delivery_status INTO cancel_delivery.delivery_status FROM hookfleet.delivery_queue q
    WHERE q.delivery_id = cancel_delivery.delivery_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'hookfleet: delivery % does not exist', cancel_delivery.delivery_id
            USING ERRCODE = 'no_data_found';
    END IF;
    cancelled := cancel_delivery.delivery_status = 'pending';
    IF cancelled THEN
        UPDATE hookfleet.delivery_queue q SET delivery_status = 'cancelled'
        WHERE q.delivery_id = cancel_delivery.delivery_id;
        cancel_delivery.delivery_status := 'cancelled';
    END IF;
END
$$;
COMMENT ON FUNCTION hookfleet.cancel_delivery(bigint) IS 'Cancels a pending delivery; returns (cancelled, delivery_status): whether this call cancelled it and the status now';
