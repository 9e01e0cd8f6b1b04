-- One current definition, re-applied by `hookfleet migrate` when this file changes
-- (see sql/README.md). Edit it in place; never in a migration.
--
-- What a producer's INSERT (or a later change of a row's body) must satisfy before it lands:
-- bad input is refused with a clear error and nothing else changes, with no worker running. A new
-- row always starts pending, with no tries, no lease and no lease history, due at deliver_at (a
-- finite time). The triggers that call these are schema, in the migrations.

-- Producers' rows start with no lease history, whatever the INSERT says, and at a finite time.
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

CREATE OR REPLACE FUNCTION hookfleet.delivery_queue_check_body_update() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    body_bytes integer := octet_length(NEW.message_body::text);
    limit_bytes integer := hookfleet.max_body_bytes();
BEGIN
    IF body_bytes > limit_bytes THEN
        RAISE EXCEPTION 'hookfleet: message_body is % bytes, over the limit of % bytes', body_bytes, limit_bytes
            USING ERRCODE = 'program_limit_exceeded';
    END IF;
    RETURN NEW;
END
$$;
