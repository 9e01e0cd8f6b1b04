-- Flow control across the fleet: per-webhook rate limits, one half-open probe, max_in_flight, and
-- a claim that visits webhooks rather than rows, so that rows a webhook may not send now (open
-- circuit, spent rate, at max_in_flight, disabled) cost the claim nothing however many they are.
-- Append-only: never edit this file once released; add a new numbered migration instead.

-- While a half-open circuit's single probe is out: until when it holds the probe (its lease).
ALTER TABLE hookfleet.webhook_health_metrics ADD COLUMN circuit_probe_until timestamptz;

-- Each webhook's fleet-wide token bucket, kept as GCRA state: the theoretical arrival time (unix
-- seconds) of the next request. A claim locks the row, takes as many tokens as it claims rows and
-- moves the time forward, so every worker draws on one bucket. Created by the first claim.
CREATE TABLE hookfleet.webhook_rate_limits (
    webhook_id bigint PRIMARY KEY REFERENCES hookfleet.webhooks (webhook_id) ON DELETE CASCADE,
    tat        double precision NOT NULL
);
ALTER TABLE hookfleet.webhook_rate_limits SET (
    fillfactor = 50,
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 200,
    autovacuum_vacuum_cost_delay = 0);
COMMENT ON TABLE hookfleet.webhook_rate_limits IS 'Fleet-wide token bucket per webhook (GCRA theoretical arrival time, unix seconds); written only by the claim';

-- The claim's path: a webhook's pending rows in claim order. The claim walks the distinct
-- webhook_ids of this index (one descent each) and then takes rows from the webhooks that may send.
CREATE INDEX delivery_queue_webhook_due_idx ON hookfleet.delivery_queue (webhook_id, priority DESC, next_attempt_at, delivery_id)
    WHERE delivery_status = 'pending';

-- A row of the claim's answer that reports a webhook held back rather than a claimed delivery:
-- reason rate_limit (until = when its next token is due), max_in_flight, busy (this worker
-- already holds its per-webhook cap of attempts for it) or contended (another claim holds the
-- webhook's limiter row right now: look again soon).
CREATE FUNCTION hookfleet.claim_hold(webhook_id bigint, reason text, until timestamptz)
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
    locked_until    timestamptz,
    probe           boolean,
    held_back       text
)
LANGUAGE sql IMMUTABLE AS $$
    SELECT NULL::bigint, $1, NULL::bigint, NULL::text, NULL::text, NULL::text, NULL::integer, NULL::integer,
           NULL::timestamptz, $3, false, $2
$$;

-- The claim, with flow control. For each webhook that has pending rows (in webhook_id order, which
-- is also the order its limiter rows are locked in, so concurrent claims cannot deadlock):
--   * skip it when it is disabled, its circuit is open, its probe is out, or its tokens are spent
--     (checked first without locks; reading stale state only ever errs towards looking further);
--   * lock its limiter row, which serialises the claims of one webhook across the fleet, and with
--     fresh reads decide its allowance: the rows it may start now =
--       min(tokens in its bucket, max_in_flight - rows in flight fleet-wide,
--           this worker's room for it (webhook_slots - busy), 1 while half-open);
-- (a webhook's burst defaults to half its rate: with the burst at most one second's worth,
-- every 10 s window stays within the rate + 10 % even when arrivals jitter);
-- then share the batch: every webhook gets up to an equal share first, leftovers go round again.
-- Rows held back are not touched: no attempt, no retry used, and no other webhook waits for them.
-- Besides claimed rows it returns one row per webhook whose due rows were held back
-- (delivery_id NULL, see claim_hold), so that the worker counts webhook_rate_limited_total and
-- knows when to look again.
CREATE FUNCTION hookfleet.claim_deliveries(
    worker_id text,
    batch_size integer,
    lease interval,
    default_rate_limit_rps double precision DEFAULT NULL,
    default_rate_limit_burst integer DEFAULT NULL,
    webhook_slots integer DEFAULT NULL,
    busy_webhook_ids bigint[] DEFAULT '{}',
    busy_counts integer[] DEFAULT '{}')
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
    locked_until    timestamptz,
    probe           boolean,
    held_back       text
)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
DECLARE
    now_at   timestamptz := now();
    now_s    double precision := extract(epoch FROM now());
    hook     record;
    rps      double precision;
    burst    integer;
    interval_s double precision;
    tokens   bigint;
    room     integer;
    in_flight integer;
    allowance integer;
    state    record;
    is_probe boolean;
    level    smallint;
    taking   integer;
    got      integer;
    share    integer;
    wanted   integer := batch_size;
    -- The webhooks that may send, their allowance, how many they got, their GCRA step and probe flag.
    hooks    bigint[] := '{}';
    allowed  integer[] := '{}';
    taken    integer[] := '{}';
    steps    double precision[] := '{}';
    probes   boolean[] := '{}';
    i        integer;
    pass     integer;
BEGIN
    IF wanted IS NULL OR wanted <= 0 THEN
        RETURN;
    END IF;
    FOR hook IN
        WITH RECURSIVE pending_hooks(webhook_id) AS (
            (SELECT q.webhook_id FROM hookfleet.delivery_queue q
             WHERE q.delivery_status = 'pending' ORDER BY q.webhook_id LIMIT 1)
            UNION ALL
            SELECT (SELECT q.webhook_id FROM hookfleet.delivery_queue q
                    WHERE q.delivery_status = 'pending' AND q.webhook_id > p.webhook_id
                    ORDER BY q.webhook_id LIMIT 1)
            FROM pending_hooks p
            WHERE p.webhook_id IS NOT NULL
        )
        SELECT w.webhook_id, w.rate_limit_rps, w.rate_limit_burst, w.max_in_flight,
               h.circuit_state, h.circuit_open_until, h.circuit_probe_until,
               r.tat, r.webhook_id IS NOT NULL AS has_bucket
        FROM pending_hooks p
        JOIN hookfleet.webhooks w ON w.webhook_id = p.webhook_id
        LEFT JOIN hookfleet.webhook_health_metrics h ON h.webhook_id = p.webhook_id
        LEFT JOIN hookfleet.webhook_rate_limits r ON r.webhook_id = p.webhook_id
        WHERE w.enabled
        ORDER BY w.webhook_id
    LOOP
        -- Cheap checks first, without locks.
        IF hook.circuit_state = 'open' AND hook.circuit_open_until > now_at THEN CONTINUE; END IF;
        IF hook.circuit_state = 'half_open' AND hook.circuit_probe_until > now_at THEN CONTINUE; END IF;
        room := CASE WHEN claim_deliveries.webhook_slots IS NULL THEN batch_size
                     ELSE claim_deliveries.webhook_slots
                          - COALESCE(busy_counts[array_position(busy_webhook_ids, hook.webhook_id)], 0) END;
        IF NOT hookfleet.has_due_delivery(hook.webhook_id, now_at) THEN CONTINUE; END IF;
        IF room <= 0 THEN
            RETURN QUERY SELECT * FROM hookfleet.claim_hold(hook.webhook_id, 'busy', NULL);
            CONTINUE;
        END IF;
        rps := COALESCE(hook.rate_limit_rps, default_rate_limit_rps);
        IF rps IS NOT NULL THEN
            burst := GREATEST(COALESCE(hook.rate_limit_burst, default_rate_limit_burst, ceil(rps / 2)::integer), 1);
            interval_s := 1.0 / rps;
            IF hook.tat - now_s > (burst - 1) * interval_s + 1e-9 THEN
                RETURN QUERY SELECT * FROM hookfleet.claim_hold(hook.webhook_id, 'rate_limit',
                                                                to_timestamp(hook.tat - (burst - 1) * interval_s));
                CONTINUE;
            END IF;
        END IF;

        allowance := LEAST(room, batch_size);
        IF rps IS NULL AND hook.max_in_flight IS NULL AND COALESCE(hook.circuit_state, 'closed') = 'closed' THEN
            -- Nothing shared to decide: no lock.
            hooks := hooks || hook.webhook_id;
            allowed := allowed || allowance;
            taken := taken || 0;
            steps := steps || NULL::double precision;
            probes := probes || false;
            CONTINUE;
        END IF;

        -- Decide under the webhook's lock, with fresh reads (each statement sees what claims that
        -- held the lock before us committed). A claim that finds the lock taken skips the webhook
        -- rather than wait: the holder is claiming its rows right now, and an open transaction
        -- must never stall the fleet's claims.
        IF NOT hook.has_bucket THEN
            INSERT INTO hookfleet.webhook_rate_limits AS r (webhook_id, tat) VALUES (hook.webhook_id, 0)
            ON CONFLICT (webhook_id) DO NOTHING;
        END IF;
        SELECT r.tat INTO state FROM hookfleet.webhook_rate_limits r WHERE r.webhook_id = hook.webhook_id
        FOR UPDATE SKIP LOCKED;
        IF NOT FOUND THEN
            RETURN QUERY SELECT * FROM hookfleet.claim_hold(hook.webhook_id, 'contended', NULL);
            CONTINUE;
        END IF;
        IF rps IS NOT NULL THEN
            tokens := floor(((burst - 1) * interval_s - (GREATEST(state.tat, now_s) - now_s)) / interval_s + 1e-9) + 1;
            IF tokens <= 0 THEN
                RETURN QUERY SELECT * FROM hookfleet.claim_hold(hook.webhook_id, 'rate_limit',
                                                                to_timestamp(state.tat - (burst - 1) * interval_s));
                CONTINUE;
            END IF;
            allowance := LEAST(allowance, tokens);
        END IF;
        IF hook.max_in_flight IS NOT NULL THEN
            SELECT count(*) INTO in_flight FROM hookfleet.delivery_queue q
            WHERE q.webhook_id = hook.webhook_id AND q.delivery_status = 'in_flight';
            IF in_flight >= hook.max_in_flight THEN
                RETURN QUERY SELECT * FROM hookfleet.claim_hold(hook.webhook_id, 'max_in_flight', NULL);
                CONTINUE;
            END IF;
            allowance := LEAST(allowance, hook.max_in_flight - in_flight);
        END IF;
        is_probe := false;
        SELECT h.circuit_state, h.circuit_open_until, h.circuit_probe_until INTO state
        FROM hookfleet.webhook_health_metrics h WHERE h.webhook_id = hook.webhook_id;
        IF FOUND AND state.circuit_state <> 'closed' THEN
            IF state.circuit_state = 'open' AND state.circuit_open_until > now_at THEN CONTINUE; END IF;
            IF state.circuit_state = 'half_open' AND state.circuit_probe_until > now_at THEN CONTINUE; END IF;
            -- The open period is over (or the last probe was lost): exactly one probe.
            is_probe := true;
            allowance := LEAST(allowance, 1);
        END IF;
        IF allowance <= 0 THEN CONTINUE; END IF;
        hooks := hooks || hook.webhook_id;
        allowed := allowed || allowance;
        taken := taken || 0;
        steps := steps || CASE WHEN rps IS NULL THEN NULL ELSE interval_s END;
        probes := probes || is_probe;
    END LOOP;

    -- Take the rows: an equal share each first, then what is left, webhook by webhook.
    FOR pass IN 1 .. 2 LOOP
        EXIT WHEN wanted <= 0 OR cardinality(hooks) = 0;
        share := CASE WHEN pass = 1 THEN ceil(wanted::numeric / cardinality(hooks))::integer ELSE wanted END;
        FOR i IN 1 .. cardinality(hooks) LOOP
            EXIT WHEN wanted <= 0;
            taking := LEAST(allowed[i] - taken[i], share, wanted);
            CONTINUE WHEN taking <= 0;
            -- One priority level at a time, highest first, each an index range of this webhook.
            level := (SELECT max(q.priority) FROM hookfleet.delivery_queue q
                      WHERE q.webhook_id = hooks[i] AND q.delivery_status = 'pending');
            WHILE level IS NOT NULL AND taking > 0 LOOP
                RETURN QUERY
                WITH due AS (
                    SELECT q.delivery_id
                    FROM hookfleet.delivery_queue q
                    WHERE q.webhook_id = hooks[i]
                      AND q.delivery_status = 'pending'
                      AND q.priority = level
                      AND q.next_attempt_at <= now_at
                      AND (q.ordering_key IS NULL OR NOT EXISTS (
                          SELECT 1 FROM hookfleet.delivery_queue p
                          WHERE p.webhook_id = q.webhook_id
                            AND p.ordering_key = q.ordering_key
                            AND p.delivery_id <> q.delivery_id
                            -- In flight blocks whatever its id: a row committed late with a lower
                            -- id must not overtake one already being attempted.
                            AND (p.delivery_status = 'in_flight'
                                 OR (p.delivery_status = 'pending' AND p.delivery_id < q.delivery_id))))
                    ORDER BY q.next_attempt_at, q.delivery_id
                    LIMIT taking
                    FOR UPDATE OF q SKIP LOCKED
                )
                UPDATE hookfleet.delivery_queue q
                SET delivery_status = 'in_flight',
                    locked_by = claim_deliveries.worker_id,
                    locked_until = now_at + claim_deliveries.lease
                FROM due, hookfleet.webhooks w
                WHERE q.delivery_id = due.delivery_id
                  AND w.webhook_id = q.webhook_id
                RETURNING q.delivery_id, q.webhook_id, w.version, q.message_id, q.event_type,
                          q.message_body::text, q.retry_count, COALESCE(q.max_retries, w.max_retries),
                          q.created_at, q.locked_until, probes[i], NULL::text;
                GET DIAGNOSTICS got = ROW_COUNT;
                taken[i] := taken[i] + got;
                taking := taking - got;
                wanted := wanted - got;
                level := (SELECT max(q.priority) FROM hookfleet.delivery_queue q
                          WHERE q.webhook_id = hooks[i] AND q.delivery_status = 'pending' AND q.priority < level);
            END LOOP;
        END LOOP;
    END LOOP;

    -- Spend the tokens taken and mark probes as out.
    FOR i IN 1 .. cardinality(hooks) LOOP
        CONTINUE WHEN taken[i] = 0;
        IF steps[i] IS NOT NULL THEN
            UPDATE hookfleet.webhook_rate_limits r
            SET tat = GREATEST(r.tat, now_s) + taken[i] * steps[i]
            WHERE r.webhook_id = hooks[i];
        END IF;
        IF probes[i] THEN
            UPDATE hookfleet.webhook_health_metrics h
            SET circuit_state = 'half_open', circuit_probe_until = now_at + claim_deliveries.lease, updated_at = now_at
            WHERE h.webhook_id = hooks[i];
        END IF;
    END LOOP;
END
$$;
COMMENT ON FUNCTION hookfleet.claim_deliveries(text, integer, interval, double precision, integer, integer, bigint[], integer[]) IS
    'The workers'' claim: get_ready_deliveries plus fleet-wide rate limits (default_rate_limit_rps/burst apply to webhooks without their own), a per-worker cap per webhook (webhook_slots minus this worker''s busy_counts), and rows reporting webhooks held back by their rate limit';

-- Whether a webhook has a pending row due at `due_at`: one index descent per priority level it uses.
CREATE FUNCTION hookfleet.has_due_delivery(webhook_id bigint, due_at timestamptz) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_column
DECLARE
    level smallint;
BEGIN
    level := (SELECT max(q.priority) FROM hookfleet.delivery_queue q
              WHERE q.webhook_id = has_due_delivery.webhook_id AND q.delivery_status = 'pending');
    WHILE level IS NOT NULL LOOP
        IF EXISTS (SELECT 1 FROM hookfleet.delivery_queue q
                   WHERE q.webhook_id = has_due_delivery.webhook_id AND q.delivery_status = 'pending'
                     AND q.priority = level AND q.next_attempt_at <= due_at) THEN
            RETURN true;
        END IF;
        level := (SELECT max(q.priority) FROM hookfleet.delivery_queue q
                  WHERE q.webhook_id = has_due_delivery.webhook_id AND q.delivery_status = 'pending'
                    AND q.priority < level);
    END LOOP;
    RETURN false;
END
$$;

-- The SPEC interface keeps its shape: the claim without rate limits for webhooks that set none,
-- and without the report rows.
CREATE OR REPLACE FUNCTION hookfleet.get_ready_deliveries(worker_id text, batch_size integer, lease interval)
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
LANGUAGE sql VOLATILE AS $$
    SELECT c.delivery_id, c.webhook_id, c.webhook_version, c.message_id, c.event_type, c.body,
           c.retry_count, c.max_retries, c.created_at, c.locked_until
    FROM hookfleet.claim_deliveries($1, $2, $3) c
    WHERE c.delivery_id IS NOT NULL
$$;
COMMENT ON FUNCTION hookfleet.get_ready_deliveries(text, integer, interval) IS 'Claims up to batch_size due deliveries for worker_id under a lease (FOR UPDATE SKIP LOCKED), skipping disabled webhooks, open circuits (one probe when half-open), webhooks at max_in_flight or out of rate_limit_rps tokens; max_retries is NULL when neither the row nor the webhook sets it';

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
