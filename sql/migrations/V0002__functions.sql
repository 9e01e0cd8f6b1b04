-- hookfleet functions: producer-side checks, the claim, health write-back, replay, cancel, publish.

-- The body size limit, from hookfleet.settings (written by `hookfleet migrate`).
CREATE FUNCTION hookfleet.max_body_bytes() RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT COALESCE((SELECT value::integer FROM hookfleet.settings WHERE name = 'max_body_bytes'), 262144)
$$;
COMMENT ON FUNCTION hookfleet.max_body_bytes() IS 'Largest accepted message_body, in bytes of its JSON text (HOOKFLEET_MAX_BODY_BYTES)';

-- Checks a producer's row before it lands, so bad input is refused with a clear error and nothing
-- else changes, with no worker running. Also starts the row's schedule at deliver_at.
CREATE FUNCTION hookfleet.delivery_queue_check_insert() RETURNS trigger
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
    NEW.locked_by := NULL;
    NEW.locked_until := NULL;
    RETURN NEW;
END
$$;
CREATE TRIGGER delivery_queue_check_insert BEFORE INSERT ON hookfleet.delivery_queue
    FOR EACH ROW EXECUTE FUNCTION hookfleet.delivery_queue_check_insert();

CREATE FUNCTION hookfleet.delivery_queue_check_body_update() RETURNS trigger
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
CREATE TRIGGER delivery_queue_check_body_update BEFORE UPDATE OF message_body ON hookfleet.delivery_queue
    FOR EACH ROW EXECUTE FUNCTION hookfleet.delivery_queue_check_body_update();

-- Wakes idle workers. Statement-level and with a constant payload, so a transaction that inserts
-- many rows sends one notification (PostgreSQL folds identical notifications in a transaction).
CREATE FUNCTION hookfleet.notify_deliveries() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('hookfleet_deliveries', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER delivery_queue_notify AFTER INSERT ON hookfleet.delivery_queue
    FOR EACH STATEMENT EXECUTE FUNCTION hookfleet.notify_deliveries();

-- The claim. Takes up to batch_size due rows in priority order, skipping rows another worker holds
-- (SKIP LOCKED), webhooks that are disabled or whose circuit is open, and keyed rows that must
-- wait (an earlier row of the key is unsettled, or any row of the key is in flight); marks them
-- in_flight under a lease and returns them. Webhooks are skipped by predicate, so their rows are
-- never touched and keep their retry budget. The returned locked_until identifies this claim:
-- write-backs are fenced on it, so a stale attempt can never settle a later claim of the row.
CREATE FUNCTION hookfleet.get_ready_deliveries(worker_id text, batch_size integer, lease interval)
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
-- PL/pgSQL rather than SQL: its plans are cached per session, and planning this statement costs
-- several times what running it does.
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
DECLARE
    level smallint;
    wanted integer := get_ready_deliveries.batch_size;
    taken integer;
BEGIN
    -- One priority level at a time, highest first (each level is one probe of the due index: a
    -- skip scan). Within a level the index is ordered by next_attempt_at, so the scan stops at
    -- the first row that is not yet due: rows scheduled for later cost nothing, however many.
    level := (SELECT max(q.priority) FROM hookfleet.delivery_queue q WHERE q.delivery_status = 'pending');
    WHILE level IS NOT NULL AND wanted > 0 LOOP
        RETURN QUERY
        WITH due AS (
            SELECT q.delivery_id
            FROM hookfleet.delivery_queue q
            WHERE q.delivery_status = 'pending'
              AND q.priority = level
              AND q.next_attempt_at <= now()
              AND EXISTS (
                  SELECT 1 FROM hookfleet.webhooks w
                  WHERE w.webhook_id = q.webhook_id AND w.enabled)
              AND NOT EXISTS (
                  SELECT 1 FROM hookfleet.webhook_health_metrics h
                  WHERE h.webhook_id = q.webhook_id
                    AND h.circuit_state = 'open'
                    AND h.circuit_open_until > now())
              AND (q.ordering_key IS NULL OR NOT EXISTS (
                  SELECT 1 FROM hookfleet.delivery_queue p
                  WHERE p.webhook_id = q.webhook_id
                    AND p.ordering_key = q.ordering_key
                    AND p.delivery_id <> q.delivery_id
                    -- In flight blocks whatever its id: a row committed late with a lower id must
                    -- not overtake one already being attempted.
                    AND (p.delivery_status = 'in_flight'
                         OR (p.delivery_status = 'pending' AND p.delivery_id < q.delivery_id))))
            ORDER BY q.next_attempt_at, q.delivery_id
            LIMIT wanted
            FOR UPDATE OF q SKIP LOCKED
        )
        UPDATE hookfleet.delivery_queue q
        SET delivery_status = 'in_flight',
            locked_by = get_ready_deliveries.worker_id,
            locked_until = now() + get_ready_deliveries.lease
        FROM due, hookfleet.webhooks w
        WHERE q.delivery_id = due.delivery_id
          AND w.webhook_id = q.webhook_id
        RETURNING q.delivery_id, q.webhook_id, w.version, q.message_id, q.event_type,
                  q.message_body::text, q.retry_count, COALESCE(q.max_retries, w.max_retries), q.created_at,
                  q.locked_until;
        GET DIAGNOSTICS taken = ROW_COUNT;
        wanted := wanted - taken;
        level := (SELECT max(q.priority) FROM hookfleet.delivery_queue q
                  WHERE q.delivery_status = 'pending' AND q.priority < level);
    END LOOP;
END
$$;
COMMENT ON FUNCTION hookfleet.get_ready_deliveries(text, integer, interval) IS 'Claims up to batch_size due deliveries for worker_id under a lease (FOR UPDATE SKIP LOCKED); max_retries is NULL when neither the row nor the webhook sets it';

-- Records attempts of one webhook, in the order they happened, in its health row and runs the
-- circuit breaker: failure_threshold consecutive failures open the circuit for open_seconds; the
-- first attempt after that is the probe, whose success closes it and whose failure re-opens it.
-- The workers' write-back calls it once per webhook per batch, so a busy webhook's health row is
-- written (and locked) once per batch rather than once per attempt. 2xx is success.
CREATE FUNCTION hookfleet.update_webhook_health_many(
    webhook_id bigint,
    status_codes integer[],
    response_times_ms double precision[],
    error_messages text[],
    failure_threshold integer DEFAULT 5,
    open_seconds double precision DEFAULT 60)
RETURNS text
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    m hookfleet.webhook_health_metrics%ROWTYPE;
    i integer;
    succeeded boolean;
BEGIN
    INSERT INTO hookfleet.webhook_health_metrics (webhook_id)
    SELECT w.webhook_id FROM hookfleet.webhooks w WHERE w.webhook_id = update_webhook_health_many.webhook_id
    ON CONFLICT DO NOTHING;

    SELECT * INTO m FROM hookfleet.webhook_health_metrics h
    WHERE h.webhook_id = update_webhook_health_many.webhook_id
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL; -- the webhook was deleted
    END IF;

    FOR i IN 1 .. coalesce(cardinality(status_codes), 0) LOOP
        succeeded := COALESCE(status_codes[i] BETWEEN 200 AND 299, false);
        m.total_attempts := m.total_attempts + 1;
        m.last_status_code := status_codes[i];
        m.success_rate := m.success_rate * 0.95 + (CASE WHEN succeeded THEN 0.05 ELSE 0 END);
        IF response_times_ms[i] IS NOT NULL THEN
            m.avg_response_time_ms := CASE WHEN m.avg_response_time_ms IS NULL THEN response_times_ms[i]
                                           ELSE m.avg_response_time_ms * 0.95 + response_times_ms[i] * 0.05 END;
        END IF;
        IF succeeded THEN
            m.successful_attempts := m.successful_attempts + 1;
            m.consecutive_failures := 0;
            m.last_success_at := now();
            m.circuit_state := 'closed';
            m.circuit_opened_at := NULL;
            m.circuit_open_until := NULL;
        ELSE
            m.failed_attempts := m.failed_attempts + 1;
            m.consecutive_failures := m.consecutive_failures + 1;
            m.last_failure_at := now();
            m.last_error := left(error_messages[i], 1000);
            IF m.circuit_state IN ('open', 'half_open') OR m.consecutive_failures >= GREATEST(failure_threshold, 1) THEN
                m.circuit_state := 'open';
                m.circuit_opened_at := now();
                m.circuit_open_until := now() + make_interval(secs => open_seconds);
            END IF;
        END IF;
    END LOOP;

    m.health_status := CASE
        WHEN m.circuit_state = 'open' AND m.circuit_open_until > now() THEN 'unavailable'
        WHEN m.success_rate < 0.9 THEN 'degraded'
        ELSE 'healthy' END;
    m.updated_at := now();

    UPDATE hookfleet.webhook_health_metrics h
    SET total_attempts = m.total_attempts,
        successful_attempts = m.successful_attempts,
        failed_attempts = m.failed_attempts,
        consecutive_failures = m.consecutive_failures,
        success_rate = m.success_rate,
        avg_response_time_ms = m.avg_response_time_ms,
        last_success_at = m.last_success_at,
        last_failure_at = m.last_failure_at,
        last_status_code = m.last_status_code,
        last_error = m.last_error,
        health_status = m.health_status,
        circuit_state = m.circuit_state,
        circuit_opened_at = m.circuit_opened_at,
        circuit_open_until = m.circuit_open_until,
        updated_at = m.updated_at
    WHERE h.webhook_id = m.webhook_id;
    RETURN m.health_status;
END
$$;
COMMENT ON FUNCTION hookfleet.update_webhook_health_many(bigint, integer[], double precision[], text[], integer, double precision) IS 'Records several attempts of one webhook (in order) in webhook_health_metrics with one row write and runs the circuit breaker; returns the new health_status';

-- Records one attempt (SPEC interface): the one-element case of update_webhook_health_many.
CREATE FUNCTION hookfleet.update_webhook_health(
    webhook_id bigint,
    status_code integer,
    response_time_ms double precision,
    error_message text,
    failure_threshold integer DEFAULT 5,
    open_seconds double precision DEFAULT 60)
RETURNS text
LANGUAGE sql AS $$
    SELECT hookfleet.update_webhook_health_many($1, ARRAY[$2], ARRAY[$3], ARRAY[$4], $5, $6)
$$;
COMMENT ON FUNCTION hookfleet.update_webhook_health(bigint, integer, double precision, text, integer, double precision) IS 'Records one attempt (2xx = success) in webhook_health_metrics and runs the circuit breaker; returns the new health_status';

-- Counts deliveries by status (all five statuses, zeros included).
CREATE FUNCTION hookfleet.count_pending_by_status()
RETURNS TABLE (delivery_status text, deliveries bigint)
LANGUAGE sql STABLE AS $$
    SELECT s.status, COALESCE(c.n, 0)
    FROM unnest(ARRAY['pending', 'in_flight', 'delivered', 'dead', 'cancelled']) AS s(status)
    LEFT JOIN (SELECT q.delivery_status, count(*) AS n FROM hookfleet.delivery_queue q GROUP BY 1) c
           ON c.delivery_status = s.status
$$;
COMMENT ON FUNCTION hookfleet.count_pending_by_status() IS 'Number of deliveries in each delivery_status';

-- Replays a settled delivery (dead, cancelled or delivered): back to pending, due now, with a fresh
-- retry budget. A pending or in_flight delivery is refused with an error that says so.
CREATE FUNCTION hookfleet.replay_delivery(delivery_id bigint) RETURNS text
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
    SET delivery_status = 'pending', retry_count = 0, next_attempt_at = now(),
        delivered_at = NULL, locked_by = NULL, locked_until = NULL
    WHERE q.delivery_id = replay_delivery.delivery_id;
    PERFORM pg_notify('hookfleet_deliveries', '');
    RETURN 'pending';
END
$$;
COMMENT ON FUNCTION hookfleet.replay_delivery(bigint) IS 'Resets a dead, cancelled or delivered delivery to pending (due now, retry budget reset)';

-- Cancels a pending delivery. Answers whether this call cancelled it, and the delivery's status
-- afterwards: (true, 'cancelled'), or (false, <status>) when it was not pending (an in_flight
-- delivery is already being attempted and cannot be cancelled).
CREATE FUNCTION hookfleet.cancel_delivery(delivery_id bigint, OUT cancelled boolean, OUT delivery_status text)
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

-- Fan-out: one row per enabled webhook subscribed to event_type (an empty subscription list means
-- all events). Idempotent per message_id. Returns how many rows were inserted.
CREATE FUNCTION hookfleet.publish(event_type text, message_body jsonb, message_id text DEFAULT NULL)
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
