-- A producer's deliver_at of 'infinity' or '-infinity' is refused: copied into next_attempt_at it
-- made the depth sample's age infinite (a panic in every worker on PostgreSQL 17, a sampler error
-- on 15 and 16) and a row that is due forever or never (issue 12).
-- Append-only: never edit this file once released; add a new numbered migration instead.

CREATE OR REPLACE FUNCTION hookfleet.delivery_queue_check_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    body_bytes integer := octet_length(NEW.message_body::text);
    limit_bytes integer := hookfleet.max_body_bytes();
BEGIN
    IF body_bytes > limit_bytes THEN
        RAISE EXCEPTION 'hookfleet: message_body is % bytes, over the limit of % bytes', body_bytes, limit_bytes
            USING ERRCODE = 'program_limit_exceeded',
                  HINT = 'The limit is HOOKFLEET_MAX_BODY_BYTES, applied by hookfleet migrate (see hookfleet.settings).';
    END IF;
    IF NOT isfinite(NEW.deliver_at) THEN
        RAISE EXCEPTION 'hookfleet: deliver_at must be a finite time, not %', NEW.deliver_at
            USING ERRCODE = 'check_violation',
                  HINT = 'Leave deliver_at out to deliver now, or give the time to deliver at.';
    END IF;
    IF NEW.delivery_status <> 'pending' THEN
        RAISE EXCEPTION 'hookfleet: new deliveries must be inserted as pending, not %', NEW.delivery_status
            USING ERRCODE = 'check_violation',
                  HINT = 'Leave delivery_status out of the INSERT; the fleet maintains it.';
    END IF;
    IF NEW.ordering_key IS NOT NULL THEN
        -- Per-key order is delivery_id order, so a key's ids must follow its commit order. The
        -- identity default was drawn before this trigger ran; producers of one key queue on a
        -- transaction-level lock here and draw the id only once they hold it, so a row committed
        -- later always has the higher id and can never be delivered before an earlier one that
        -- was still uncommitted. (Insert several keys in one transaction in a consistent order.)
        PERFORM pg_advisory_xact_lock(hashtextextended(NEW.webhook_id::text || '/' || NEW.ordering_key, 0));
        NEW.delivery_id := nextval(pg_get_serial_sequence('hookfleet.delivery_queue', 'delivery_id'));
    END IF;
    NEW.next_attempt_at := NEW.deliver_at;
    NEW.retry_count := 0;
    NEW.lease_expiries := 0;
    NEW.locked_by := NULL;
    NEW.locked_until := NULL;
    RETURN NEW;
END
$$;

-- Rows already queued that way, pending or in flight (a release keeps next_attempt_at):
-- '-infinity' meant "due now". Each statement reads one partial index, not the whole table.
UPDATE hookfleet.delivery_queue SET next_attempt_at = now()
WHERE delivery_status = 'pending' AND next_attempt_at = '-infinity';
UPDATE hookfleet.delivery_queue SET next_attempt_at = now()
WHERE delivery_status = 'in_flight' AND next_attempt_at = '-infinity';
