-- Claim fixes found by the benchmark, and queue upkeep under sustained load.
-- * The claim reports a webhook whose allowance a limit bounded (its cap on this worker, its rate,
--   max_in_flight) whenever it took all it was allowed: the worker then waits for a slot or the
--   next token, not for POLL_INTERVAL (without it one worker drained 130 rows/s instead of 8,000).
-- * A webhook whose bucket holds at least 16 batches of tokens is claimed without locking its
--   limiter row (its tokens are still spent, at the end): with every claim locking it, three
--   workers on one busy webhook serialised and 5,000/s fell behind (p99 4.5 s).
-- * has_due_delivery reads the earliest row of a level off the index: its EXISTS was planned as a
--   sequential scan through the settled rows (2.8 ms per claim with 12,000 delivered rows).
-- * (webhook_id, delivery_status) made way for an in-flight-only index (see below).
-- * The claim finds its webhooks among the first 4 batches of due rows (one short walk of the
--   global due index) and walks every webhook with pending rows only when that window could
--   not fill the batch: the walk over every webhook, run on each claim, cost 13 ms per claim at
--   5,000/s and let the queue fall 4 s behind.
-- * Buckets are created with their webhook.
-- * One depth sample for the whole fleet instead of one count of the whole table per worker, and
--   an index that lets dead letters be counted without reading every settled row.
-- Append-only: never edit this file once released; add a new numbered migration instead.


-- The claim reads a webhook's pending rows by priority level off delivery_queue_webhook_due_idx;
-- with (webhook_id, delivery_status) also on offer, the planner picked that one whenever its
-- statistics lagged and filtered every pending row of the webhook (12 ms for 100,000 scheduled
-- rows). Pending rows per webhook are served by delivery_queue_webhook_due_idx; in-flight rows per
-- webhook (max_in_flight, dashboards) get a narrower index, which also costs inserts nothing.
DROP INDEX hookfleet.delivery_queue_active_webhook_idx;
CREATE INDEX delivery_queue_in_flight_webhook_idx ON hookfleet.delivery_queue (webhook_id)
    WHERE delivery_status = 'in_flight';

-- Every webhook gets its token bucket when it is created, so that no claim has to create one (and
-- wait for another claim creating it at the same moment).
INSERT INTO hookfleet.webhook_rate_limits (webhook_id, tat)
SELECT webhook_id, 0 FROM hookfleet.webhooks
ON CONFLICT (webhook_id) DO NOTHING;
CREATE FUNCTION hookfleet.webhooks_create_bucket() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO hookfleet.webhook_rate_limits (webhook_id, tat) VALUES (NEW.webhook_id, 0)
    ON CONFLICT (webhook_id) DO NOTHING;
    RETURN NULL;
END
$$;
CREATE TRIGGER webhooks_create_bucket AFTER INSERT ON hookfleet.webhooks
    FOR EACH ROW EXECUTE FUNCTION hookfleet.webhooks_create_bucket();

-- Dead letters stay until replayed or pruned; counting them must not read the delivered rows.
CREATE INDEX delivery_queue_dead_idx ON hookfleet.delivery_queue (delivery_id) WHERE delivery_status = 'dead';

-- The fleet's latest depth sample: pending, in_flight and dead, and the age of the oldest due row.
-- Delivered and cancelled rows are not counted here: they only grow (until pruned), counting them
-- costs a scan of the table, and webhook_deliveries_total already counts deliveries.
CREATE TABLE hookfleet.queue_depth_sample (
    delivery_status        text PRIMARY KEY,
    deliveries             bigint NOT NULL,
    oldest_due_age_seconds double precision,
    sampled_at             timestamptz NOT NULL
);
ALTER TABLE hookfleet.queue_depth_sample SET (fillfactor = 50, autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 100);
COMMENT ON TABLE hookfleet.queue_depth_sample IS 'Latest fleet-wide queue depth sample, refreshed by hookfleet.sample_queue_depth()';

-- Returns the depth sample, refreshing it first when it is older than max_age. Every worker calls
-- it on a timer, but only one (whichever takes the advisory lock) counts; the others read the
-- table. The counts go through partial indexes of the active rows only.
CREATE FUNCTION hookfleet.sample_queue_depth(max_age interval)
RETURNS TABLE (delivery_status text, deliveries bigint, oldest_due_age_seconds double precision, sampled_at timestamptz)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
BEGIN
    IF NOT EXISTS (SELECT 1 FROM hookfleet.queue_depth_sample s WHERE s.sampled_at > now() - max_age)
       AND pg_try_advisory_xact_lock(hashtextextended('hookfleet.sample_queue_depth', 0))
       -- Again under the lock: another worker may have sampled in between.
       AND NOT EXISTS (SELECT 1 FROM hookfleet.queue_depth_sample s WHERE s.sampled_at > now() - max_age) THEN
        INSERT INTO hookfleet.queue_depth_sample AS s (delivery_status, deliveries, oldest_due_age_seconds, sampled_at)
        VALUES
            ('pending',
             (SELECT count(*) FROM hookfleet.delivery_queue q WHERE q.delivery_status = 'pending'),
             (SELECT extract(epoch FROM now() - min(q.next_attempt_at))::float8 FROM hookfleet.delivery_queue q
               WHERE q.delivery_status = 'pending' AND q.next_attempt_at <= now()),
             now()),
            ('in_flight',
             (SELECT count(*) FROM hookfleet.delivery_queue q WHERE q.delivery_status = 'in_flight'), NULL, now()),
            ('dead',
             (SELECT count(*) FROM hookfleet.delivery_queue q WHERE q.delivery_status = 'dead'), NULL, now())
        ON CONFLICT ON CONSTRAINT queue_depth_sample_pkey DO UPDATE
        SET deliveries = EXCLUDED.deliveries,
            oldest_due_age_seconds = EXCLUDED.oldest_due_age_seconds,
            sampled_at = EXCLUDED.sampled_at;
    END IF;
    RETURN QUERY SELECT s.delivery_status, s.deliveries, s.oldest_due_age_seconds, s.sampled_at
                 FROM hookfleet.queue_depth_sample s ORDER BY s.delivery_status;
END
$$;
COMMENT ON FUNCTION hookfleet.sample_queue_depth(interval) IS 'The fleet''s queue depth (pending, in_flight, dead; oldest due age), counted by at most one caller per max_age';

-- The claim, as in V0004, with fewer statements per webhook and its bounds reported:
--   1. one statement lists the enabled webhooks that have pending rows (a loose index scan: one
--      descent per webhook) with their circuit and bucket;
--   2. per webhook, in webhook_id order: skip it if its circuit is open or its probe is out, or it
--      has no token; if nothing it shares can run out in this claim (no max_in_flight, circuit
--      closed, no rate limit or a bucket holding 16 batches or more), take its allowance without
--      any lock; otherwise lock its limiter row (SKIP LOCKED: contended means look again soon)
--      and decide with fresh reads: tokens, max_in_flight, the single half-open probe;
--   3. share the batch (equal shares first, then the rest); each webhook's due rows are taken in
--      priority DESC, next_attempt_at, delivery_id order, one priority level (one tight range of
--      its index) at a time;
--   4. spend the tokens taken, mark probes out, and report each webhook that took all it was
--      allowed while a limit bounded it.
CREATE OR REPLACE FUNCTION hookfleet.claim_deliveries(
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
    now_at     timestamptz := now();
    now_s      double precision := extract(epoch FROM now());
    hook       record;
    health     record;
    rps        double precision;
    burst      integer;
    step       double precision;
    tau        double precision;
    tat        double precision;
    tokens     bigint;
    room       integer;
    in_flight  integer;
    allowance  integer;
    bound      text;
    is_probe   boolean;
    taking     integer;
    got        integer;
    share      integer;
    wanted     integer := batch_size;
    -- Per webhook that may send: id, allowance, rows taken, GCRA step and tau (NULL: no rate),
    -- bucket time read, probe flag, and the limit that bounded its allowance.
    hooks      bigint[] := '{}';
    levels     smallint[] := '{}';
    allowed    integer[] := '{}';
    taken      integer[] := '{}';
    steps      double precision[] := '{}';
    taus       double precision[] := '{}';
    tats       double precision[] := '{}';
    probes     boolean[] := '{}';
    bounds     text[] := '{}';
    i          integer;
    pass       integer;
    phase      integer;
    first_new  integer;
    candidates refcursor;
    seen       bigint[] := '{}';
    window_rows bigint := 0;
    prepaid    boolean;
    prepaids   boolean[] := '{}';
    allowed_at_start integer[] := '{}';
    level      smallint;
BEGIN
    IF wanted IS NULL OR wanted <= 0 THEN
        RETURN;
    END IF;
    FOR phase IN 1 .. 2 LOOP
        first_new := cardinality(hooks) + 1;
        IF phase = 1 THEN
            -- The webhooks among the first 4 batches of due rows in claim order (priority DESC,
            -- next_attempt_at, delivery_id): one short walk of delivery_queue_due_idx.
            OPEN candidates FOR
            WITH pending_hooks(webhook_id, level, window_rows) AS (
                SELECT h.webhook_id, max(h.priority), sum(count(*)) OVER ()
                FROM (SELECT q.webhook_id, q.priority FROM hookfleet.delivery_queue q
                      WHERE q.delivery_status = 'pending' AND q.next_attempt_at <= now_at
                      ORDER BY q.priority DESC, q.next_attempt_at, q.delivery_id
                      LIMIT batch_size * 4) h
                GROUP BY h.webhook_id
            )
            SELECT w.webhook_id, p.level, p.window_rows, w.rate_limit_rps, w.rate_limit_burst, w.max_in_flight,
                   COALESCE(h.circuit_state, 'closed') AS circuit_state, h.circuit_open_until, h.circuit_probe_until,
                   r.tat, r.webhook_id IS NOT NULL AS has_bucket
            FROM pending_hooks p
            JOIN hookfleet.webhooks w ON w.webhook_id = p.webhook_id
            LEFT JOIN hookfleet.webhook_health_metrics h ON h.webhook_id = p.webhook_id
            LEFT JOIN hookfleet.webhook_rate_limits r ON r.webhook_id = p.webhook_id
            WHERE w.enabled
            ORDER BY w.webhook_id;
        ELSE
            -- That window could not fill the batch and there may be more due rows past it (behind
            -- backlogs that are held back): visit every other webhook with pending rows, one
            -- descent of delivery_queue_webhook_due_idx each, so a held-back backlog of any size
            -- never hides another webhook's rows.
            EXIT WHEN wanted <= 0 OR window_rows < batch_size * 4;
            OPEN candidates FOR
            WITH RECURSIVE pending_hooks(webhook_id, level) AS (
                (SELECT q.webhook_id, q.priority FROM hookfleet.delivery_queue q
                 WHERE q.delivery_status = 'pending' ORDER BY q.webhook_id, q.priority DESC LIMIT 1)
                UNION ALL
                SELECT n.webhook_id, n.priority
                FROM pending_hooks p,
                     LATERAL (SELECT q.webhook_id, q.priority FROM hookfleet.delivery_queue q
                              WHERE q.delivery_status = 'pending' AND q.webhook_id > p.webhook_id
                              ORDER BY q.webhook_id, q.priority DESC LIMIT 1) n
            )
            SELECT w.webhook_id, p.level, NULL::bigint AS window_rows, w.rate_limit_rps, w.rate_limit_burst,
                   w.max_in_flight, COALESCE(h.circuit_state, 'closed') AS circuit_state, h.circuit_open_until,
                   h.circuit_probe_until, r.tat, r.webhook_id IS NOT NULL AS has_bucket
            FROM pending_hooks p
            JOIN hookfleet.webhooks w ON w.webhook_id = p.webhook_id
            LEFT JOIN hookfleet.webhook_health_metrics h ON h.webhook_id = p.webhook_id
            LEFT JOIN hookfleet.webhook_rate_limits r ON r.webhook_id = p.webhook_id
            WHERE w.enabled AND w.webhook_id <> ALL (seen)
            ORDER BY w.webhook_id;
        END IF;
        LOOP
        FETCH candidates INTO hook;
        EXIT WHEN NOT FOUND;
        seen := seen || hook.webhook_id;
        IF phase = 1 THEN
            window_rows := hook.window_rows;
        END IF;
        -- Cheap checks first, without locks (stale reads only ever err towards looking further).
        IF hook.circuit_state = 'open' AND hook.circuit_open_until > now_at THEN CONTINUE; END IF;
        IF hook.circuit_state = 'half_open' AND hook.circuit_probe_until > now_at THEN CONTINUE; END IF;
        room := CASE WHEN claim_deliveries.webhook_slots IS NULL THEN batch_size
                     ELSE claim_deliveries.webhook_slots
                          - COALESCE(busy_counts[array_position(busy_webhook_ids, hook.webhook_id)], 0) END;
        rps := COALESCE(hook.rate_limit_rps, default_rate_limit_rps);
        step := NULL;
        tau := NULL;
        tokens := NULL;
        IF rps IS NOT NULL THEN
            burst := GREATEST(COALESCE(hook.rate_limit_burst, default_rate_limit_burst, ceil(rps / 2)::integer), 1);
            step := 1.0 / rps;
            tau := (burst - 1) * step;
            IF hook.has_bucket THEN
                tokens := floor((tau - (GREATEST(hook.tat, now_s) - now_s)) / step + 1e-9) + 1;
            END IF;
        END IF;
        IF room <= 0 OR tokens <= 0 THEN
            IF hookfleet.has_due_delivery(hook.webhook_id, now_at) THEN
                RETURN QUERY SELECT * FROM hookfleet.claim_hold(
                    hook.webhook_id,
                    CASE WHEN room <= 0 THEN 'busy' ELSE 'rate_limit' END,
                    CASE WHEN room <= 0 THEN NULL ELSE to_timestamp(hook.tat - tau) END);
            END IF;
            CONTINUE;
        END IF;
        allowance := LEAST(room, batch_size);
        bound := CASE WHEN room < batch_size THEN 'busy' END;
        is_probe := false;
        tat := hook.tat;

        prepaid := false;
        IF hook.max_in_flight IS NULL AND hook.circuit_state = 'closed'
           AND (rps IS NULL OR COALESCE(tokens >= 16 * batch_size, false)) THEN
            -- Nothing the claim can run out of: no rate limit, or a bucket holding 16 batches or
            -- more. Pay for the whole allowance now (the unused part is refunded at the end), so
            -- that the bucket stays exact without any decision under its lock. In the first phase
            -- this may wait for another claim's payment (always in webhook_id order, so claims
            -- cannot deadlock); in the second it never waits.
            IF rps IS NOT NULL THEN
                IF phase = 2 THEN
                    PERFORM 1 FROM hookfleet.webhook_rate_limits r WHERE r.webhook_id = hook.webhook_id
                    FOR UPDATE SKIP LOCKED;
                    IF NOT FOUND THEN
                        RETURN QUERY SELECT * FROM hookfleet.claim_hold(hook.webhook_id, 'contended', NULL);
                        CONTINUE;
                    END IF;
                END IF;
                UPDATE hookfleet.webhook_rate_limits r
                SET tat = GREATEST(r.tat, now_s) + allowance * step
                WHERE r.webhook_id = hook.webhook_id;
                prepaid := true;
            END IF;
        ELSE
            -- Something shared can run out: decide under the webhook's lock, with fresh reads
            -- (each statement sees what the previous holder committed). Only webhooks with due
            -- rows get here, so idle ones are never locked.
            CONTINUE WHEN NOT hookfleet.has_due_delivery(hook.webhook_id, now_at);
            IF NOT hook.has_bucket THEN
                INSERT INTO hookfleet.webhook_rate_limits AS r (webhook_id, tat) VALUES (hook.webhook_id, 0)
                ON CONFLICT (webhook_id) DO NOTHING;
            END IF;
            SELECT r.tat INTO tat FROM hookfleet.webhook_rate_limits r WHERE r.webhook_id = hook.webhook_id
            FOR UPDATE SKIP LOCKED;
            IF NOT FOUND THEN
                -- Another claim is deciding for it right now; an open transaction must never
                -- stall the fleet's claims, so skip it rather than wait.
                RETURN QUERY SELECT * FROM hookfleet.claim_hold(hook.webhook_id, 'contended', NULL);
                CONTINUE;
            END IF;
            IF rps IS NOT NULL THEN
                tokens := floor((tau - (GREATEST(tat, now_s) - now_s)) / step + 1e-9) + 1;
                IF tokens <= 0 THEN
                    RETURN QUERY SELECT * FROM hookfleet.claim_hold(hook.webhook_id, 'rate_limit', to_timestamp(tat - tau));
                    CONTINUE;
                END IF;
                IF tokens < allowance THEN
                    allowance := tokens;
                    bound := 'rate_limit';
                END IF;
            END IF;
            IF hook.max_in_flight IS NOT NULL THEN
                SELECT count(*) INTO in_flight FROM hookfleet.delivery_queue q
                WHERE q.webhook_id = hook.webhook_id AND q.delivery_status = 'in_flight';
                IF in_flight >= hook.max_in_flight THEN
                    RETURN QUERY SELECT * FROM hookfleet.claim_hold(hook.webhook_id, 'max_in_flight', NULL);
                    CONTINUE;
                END IF;
                IF hook.max_in_flight - in_flight < allowance THEN
                    allowance := hook.max_in_flight - in_flight;
                    bound := 'max_in_flight';
                END IF;
            END IF;
            SELECT h.circuit_state, h.circuit_open_until, h.circuit_probe_until INTO health
            FROM hookfleet.webhook_health_metrics h WHERE h.webhook_id = hook.webhook_id;
            IF FOUND AND health.circuit_state <> 'closed' THEN
                CONTINUE WHEN health.circuit_state = 'open' AND health.circuit_open_until > now_at;
                CONTINUE WHEN health.circuit_state = 'half_open' AND health.circuit_probe_until > now_at;
                -- The open period is over (or the last probe was lost): exactly one probe.
                is_probe := true;
                allowance := 1;
                bound := NULL;
            END IF;
        END IF;
        hooks := hooks || hook.webhook_id;
        levels := levels || hook.level;
        allowed := allowed || allowance;
        allowed_at_start := allowed_at_start || allowance;
        taken := taken || 0;
        steps := steps || step;
        taus := taus || tau;
        tats := tats || tat;
        probes := probes || is_probe;
        bounds := bounds || bound;
        prepaids := prepaids || prepaid;
        END LOOP;
        CLOSE candidates;

        -- Take the rows: an equal share each first, then what is left, webhook by webhook.
        FOR pass IN 1 .. 2 LOOP
            EXIT WHEN wanted <= 0 OR cardinality(hooks) < first_new;
            share := CASE WHEN pass = 1 THEN ceil(wanted::numeric / (cardinality(hooks) - first_new + 1))::integer ELSE wanted END;
            FOR i IN first_new .. cardinality(hooks) LOOP
                EXIT WHEN wanted <= 0;
                taking := LEAST(allowed[i] - taken[i], share, wanted);
                CONTINUE WHEN taking <= 0;
                -- One priority level at a time, highest first: each level is a tight range of the
                -- webhook's index (webhook_id, priority, next_attempt_at), so rows scheduled for later
                -- are never read, however many there are.
                level := levels[i];
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
                    wanted := wanted - got;
                    taking := taking - got;
                    EXIT WHEN taking <= 0;
                    level := (SELECT q.priority FROM hookfleet.delivery_queue q
                              WHERE q.webhook_id = hooks[i] AND q.delivery_status = 'pending' AND q.priority < level
                              ORDER BY q.priority DESC LIMIT 1);
                END LOOP;
                -- Fewer than asked: this webhook has nothing more to give in this claim.
                IF taking > 0 THEN
                    allowed[i] := taken[i];
                    bounds[i] := NULL;
                END IF;
            END LOOP;
        END LOOP;
    END LOOP;

    -- Spend the tokens taken (adding to the current value, so claims that took no lock still
    -- account exactly), mark probes as out, and report the webhooks that took all they were
    -- allowed while a limit bounded them: the worker waits for the next token or for a slot
    -- rather than for the poll interval.
    FOR i IN 1 .. cardinality(hooks) LOOP
        IF bounds[i] IS NOT NULL AND taken[i] >= allowed[i] THEN
            RETURN QUERY SELECT * FROM hookfleet.claim_hold(
                hooks[i], bounds[i],
                CASE WHEN bounds[i] = 'rate_limit'
                     THEN to_timestamp(GREATEST(tats[i], now_s) + taken[i] * steps[i] - taus[i]) END);
        END IF;
        IF prepaids[i] THEN
            IF taken[i] < allowed_at_start[i] THEN
                UPDATE hookfleet.webhook_rate_limits r
                SET tat = r.tat - (allowed_at_start[i] - taken[i]) * steps[i]
                WHERE r.webhook_id = hooks[i];
            END IF;
            CONTINUE;
        END IF;
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

-- Whether a webhook has a pending row due at `due_at`: per priority level, the level's earliest
-- row read off the index (one descent each; V0004's EXISTS was planned as a sequential scan that
-- starts among the settled rows, and a single scan across levels would read every row scheduled
-- for later).
CREATE OR REPLACE FUNCTION hookfleet.has_due_delivery(webhook_id bigint, due_at timestamptz) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_column
DECLARE
    level smallint;
BEGIN
    level := (SELECT q.priority FROM hookfleet.delivery_queue q
              WHERE q.webhook_id = has_due_delivery.webhook_id AND q.delivery_status = 'pending'
              ORDER BY q.priority DESC LIMIT 1);
    WHILE level IS NOT NULL LOOP
        IF (SELECT q.next_attempt_at FROM hookfleet.delivery_queue q
            WHERE q.webhook_id = has_due_delivery.webhook_id AND q.delivery_status = 'pending' AND q.priority = level
            ORDER BY q.next_attempt_at LIMIT 1) <= due_at THEN
            RETURN true;
        END IF;
        level := (SELECT q.priority FROM hookfleet.delivery_queue q
                  WHERE q.webhook_id = has_due_delivery.webhook_id AND q.delivery_status = 'pending'
                    AND q.priority < level
                  ORDER BY q.priority DESC LIMIT 1);
    END LOOP;
    RETURN false;
END
$$;
