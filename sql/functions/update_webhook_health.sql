-- One current definition, re-applied by `hookfleet migrate` when this file changes
-- (see sql/README.md). Edit it in place; never in a migration.
--
-- The health write-back and the circuit breaker: how a webhook's attempts change its health row,
-- success rate, latency average and circuit. The workers call update_webhook_health_batch once per
-- webhook per write-back batch; update_webhook_health is the SPEC's one-attempt interface.
-- Health rows are locked in webhook_id order, after the batch's queue rows (the one lock order).

-- The breaker, as before, plus the probe: any recorded result ends the probe; a failure while open
-- or half-open opens the circuit again, a success closes it. health_status is `unavailable` while
-- the circuit is not closed.
CREATE OR REPLACE FUNCTION hookfleet.update_webhook_health_many(
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
            m.circuit_probe_until := NULL;
        ELSE
            m.failed_attempts := m.failed_attempts + 1;
            m.consecutive_failures := m.consecutive_failures + 1;
            m.last_failure_at := now();
            m.last_error := left(error_messages[i], 1000);
            IF m.circuit_state IN ('open', 'half_open') OR m.consecutive_failures >= GREATEST(failure_threshold, 1) THEN
                m.circuit_state := 'open';
                m.circuit_opened_at := now();
                m.circuit_open_until := now() + make_interval(secs => open_seconds);
                m.circuit_probe_until := NULL;
            END IF;
        END IF;
    END LOOP;

    m.health_status := CASE
        WHEN m.circuit_state <> 'closed' THEN 'unavailable'
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
        circuit_probe_until = m.circuit_probe_until,
        updated_at = m.updated_at
    WHERE h.webhook_id = m.webhook_id;
    RETURN m.health_status;
END
$$;
COMMENT ON FUNCTION hookfleet.update_webhook_health_many(bigint, integer[], double precision[], text[], integer, double precision) IS 'Records several attempts of one webhook (in order) in webhook_health_metrics with one row write and runs the circuit breaker; returns the new health_status';

-- Records one attempt (SPEC interface): the one-element case of update_webhook_health_many.
CREATE OR REPLACE FUNCTION hookfleet.update_webhook_health(
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

CREATE OR REPLACE FUNCTION hookfleet.update_webhook_health_batch(
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
    attempts   integer := coalesce(cardinality(status_codes), 0);
    timed      bigint;
    weighted   double precision;
    first_time double precision;
    status     text;
BEGIN
    -- A NULL status (no answer) is a failure: ALL over it is NULL, which COALESCE makes false.
    IF attempts > 0 AND COALESCE(200 <= ALL (status_codes) AND 299 >= ALL (status_codes), false) THEN
        -- The non-NULL response times, in order: how many, their weighted sum as the loop would
        -- add them (the j-th of m weighs 0.05 * 0.95^(m - j)), and the first one.
        SELECT t.m, sum(t.ms * 0.05 * 0.95 ^ (t.m - t.j)), min(t.ms) FILTER (WHERE t.j = 1)
        INTO timed, weighted, first_time
        FROM (SELECT u.ms, row_number() OVER (ORDER BY u.k) AS j, count(*) OVER () AS m
              FROM unnest(response_times_ms) WITH ORDINALITY AS u(ms, k)
              WHERE u.ms IS NOT NULL) t
        GROUP BY t.m;

        UPDATE hookfleet.webhook_health_metrics h
        SET total_attempts = h.total_attempts + attempts,
            successful_attempts = h.successful_attempts + attempts,
            consecutive_failures = 0,
            success_rate = 1 - (1 - h.success_rate) * 0.95 ^ attempts,
            avg_response_time_ms = CASE
                WHEN timed IS NULL THEN h.avg_response_time_ms
                -- The loop starts an empty average at the first time, then blends the rest in.
                WHEN h.avg_response_time_ms IS NULL
                    THEN weighted + (0.95 ^ (timed - 1) - 0.05 * 0.95 ^ (timed - 1)) * first_time
                ELSE 0.95 ^ timed * h.avg_response_time_ms + weighted END,
            last_success_at = now(),
            last_status_code = status_codes[attempts],
            -- A success closes the circuit (it was the probe, or it was closed already).
            circuit_state = 'closed',
            circuit_opened_at = NULL,
            circuit_open_until = NULL,
            circuit_probe_until = NULL,
            health_status = CASE WHEN 1 - (1 - h.success_rate) * 0.95 ^ attempts < 0.9
                                 THEN 'degraded' ELSE 'healthy' END,
            updated_at = now()
        WHERE h.webhook_id = update_webhook_health_batch.webhook_id
        RETURNING h.health_status INTO status;
        IF FOUND THEN
            RETURN status;
        END IF;
    END IF;
    RETURN hookfleet.update_webhook_health_many(
        webhook_id, status_codes, response_times_ms, error_messages, failure_threshold, open_seconds);
END
$$;
COMMENT ON FUNCTION hookfleet.update_webhook_health_batch(bigint, integer[], double precision[], text[], integer, double precision)
    IS 'update_webhook_health_many with a closed form for batches of successes: what the write-back calls';
