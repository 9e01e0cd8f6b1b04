-- One current definition, re-applied by `hookfleet migrate` when this file changes
-- (see sql/README.md). Edit it in place; never in a migration.
--
-- How a claim decides what a worker may send now: which webhooks (circuit, enabled, fleet-wide
-- rate limit, max_in_flight, this worker's slots), which of their rows (priority, due time, one row
-- in flight per ordering key), and the leases. Claims never wait for a lock (SKIP LOCKED
-- everywhere), so they cannot deadlock and an operator's open transaction only delays one
-- webhook. The worker calls claim_deliveries; get_ready_deliveries is the SPEC's simpler form.

-- A row of the claim's answer that reports a webhook held back rather than a claimed delivery:
-- reason rate_limit (until = when its next token is due), max_in_flight, busy (this worker
-- already holds its per-webhook cap of attempts for it) or contended (another claim holds the
-- webhook's limiter row right now: look again soon).
CREATE OR REPLACE FUNCTION hookfleet.claim_hold(webhook_id bigint, reason text, until timestamptz)
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
LANGUAGE plpgsql VOLATILE
-- Every statement here reads the queue in index order or by key. A bitmap scan returns rows
-- unordered; with statistics taken on an empty queue the planner chose one for the window, and
-- sorted every due row to read a few hundred (crates/test-support/tests/plans.rs).
SET enable_bitmapscan = off
AS $$
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
    versions   bigint[] := '{}';
    retries    integer[] := '{}';
    ids        bigint[];
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
    decided    boolean;
    prepaids   boolean[] := '{}';
    allowed_at_start integer[] := '{}';
    level      smallint;
    lease_until timestamptz;
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
                      -- retry_count >= 0 holds for every row; it is how this walk, and no
                      -- statement about one webhook, matches delivery_queue_due_idx (V0014).
                      WHERE q.delivery_status = 'pending' AND q.retry_count >= 0 AND q.next_attempt_at <= now_at
                      ORDER BY q.priority DESC, q.next_attempt_at, q.delivery_id
                      LIMIT batch_size * 4) h
                GROUP BY h.webhook_id
            )
            -- Disabled webhooks stay in this list (and are skipped below) so that the window is
            -- counted even when it holds nothing else.
            SELECT w.webhook_id, w.enabled, w.version, w.max_retries, p.level, p.window_rows, w.rate_limit_rps, w.rate_limit_burst,
                   w.max_in_flight, COALESCE(h.circuit_state, 'closed') AS circuit_state, h.circuit_open_until,
                   h.circuit_probe_until, r.tat, r.webhook_id IS NOT NULL AS has_bucket
            FROM pending_hooks p
            JOIN hookfleet.webhooks w ON w.webhook_id = p.webhook_id
            LEFT JOIN hookfleet.webhook_health_metrics h ON h.webhook_id = p.webhook_id
            LEFT JOIN hookfleet.webhook_rate_limits r ON r.webhook_id = p.webhook_id
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
            SELECT w.webhook_id, w.enabled, w.version, w.max_retries, p.level, NULL::bigint AS window_rows, w.rate_limit_rps, w.rate_limit_burst,
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
        CONTINUE WHEN NOT hook.enabled;
        -- The time now, not the transaction's start: a claim may have waited for another one.
        now_s := extract(epoch FROM clock_timestamp());
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
        decided := false;
        IF hook.max_in_flight IS NULL AND hook.circuit_state = 'closed'
           AND (rps IS NULL OR COALESCE(tokens >= 16 * batch_size, false)) THEN
            -- Nothing the claim is likely to run out of: no rate limit, or a bucket that held 16
            -- batches or more when the list was read. Take the webhook's limiter row without
            -- waiting (it is what serialises the claims of one webhook, and so what keeps per-key
            -- order when several claims, a psql one included, take the same webhook's rows), then
            -- pay for the whole allowance, provided the bucket as it is now still holds it; the
            -- unused part is refunded at the end. A bucket that ran low meanwhile is decided under
            -- the lock like any other. A limiter row another session holds (a claim, an open
            -- transaction at a psql prompt) makes the webhook `contended`: the worker looks again
            -- a moment later, and no other webhook waits for it.
            IF phase = 2 THEN
                CONTINUE WHEN NOT hookfleet.has_due_delivery(hook.webhook_id, now_at);
            END IF;
            IF NOT hook.has_bucket THEN
                INSERT INTO hookfleet.webhook_rate_limits AS r (webhook_id, tat) VALUES (hook.webhook_id, 0)
                ON CONFLICT (webhook_id) DO NOTHING;
            END IF;
            PERFORM 1 FROM hookfleet.webhook_rate_limits r WHERE r.webhook_id = hook.webhook_id
            FOR UPDATE SKIP LOCKED;
            IF NOT FOUND THEN
                RETURN QUERY SELECT * FROM hookfleet.claim_hold(hook.webhook_id, 'contended', NULL);
                CONTINUE;
            END IF;
            IF rps IS NULL THEN
                decided := true;
            ELSE
                UPDATE hookfleet.webhook_rate_limits r
                SET tat = GREATEST(r.tat, now_s) + allowance * step
                WHERE r.webhook_id = hook.webhook_id
                  AND GREATEST(r.tat, now_s) - now_s + (allowance - 1) * step <= tau + 1e-9;
                IF FOUND THEN
                    prepaid := true;
                    decided := true;
                END IF;
            END IF;
        END IF;
        IF NOT decided THEN
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
                -- Not closed: perhaps a probe is due. Marking one out writes the health row, which a
                -- write-back may hold right now: take the row without waiting, so that a claim
                -- never waits for any lock (and so is never part of a deadlock), and decide on what
                -- it says now.
                SELECT h.circuit_state, h.circuit_open_until, h.circuit_probe_until INTO health
                FROM hookfleet.webhook_health_metrics h WHERE h.webhook_id = hook.webhook_id
                FOR UPDATE SKIP LOCKED;
                IF NOT FOUND THEN
                    RETURN QUERY SELECT * FROM hookfleet.claim_hold(hook.webhook_id, 'contended', NULL);
                    CONTINUE;
                END IF;
                IF health.circuit_state <> 'closed' THEN
                    CONTINUE WHEN health.circuit_state = 'open' AND health.circuit_open_until > now_at;
                    CONTINUE WHEN health.circuit_state = 'half_open' AND health.circuit_probe_until > now_at;
                    -- The open period is over (or the last probe was lost): exactly one probe.
                    is_probe := true;
                    allowance := 1;
                    bound := NULL;
                END IF;
            END IF;
        END IF;
        hooks := hooks || hook.webhook_id;
        levels := levels || hook.level;
        versions := versions || hook.version;
        retries := retries || hook.max_retries;
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
                    -- Lock the rows first, then mark them: two simple statements whose plans
                    -- stay right whatever the statistics say (the UPDATE finds its rows by key).
                    ids := ARRAY(
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
                        ORDER BY q.webhook_id, q.priority DESC, q.next_attempt_at, q.delivery_id
                        LIMIT taking
                        FOR UPDATE OF q SKIP LOCKED);
                    -- The lease starts now, not when the claim's transaction began: a claim that
                    -- waited (for the database, a lock, a long walk) must not hand out a lease
                    -- that is partly spent before the worker even sees the row.
                    -- A level with nothing due (or all of it locked) costs no UPDATE.
                    IF cardinality(ids) = 0 THEN
                        got := 0;
                    ELSE
                        lease_until := clock_timestamp() + claim_deliveries.lease;
                        RETURN QUERY
                        UPDATE hookfleet.delivery_queue q
                        SET delivery_status = 'in_flight',
                            locked_by = claim_deliveries.worker_id,
                            locked_until = lease_until
                        WHERE q.delivery_id = ANY (ids)
                        RETURNING q.delivery_id, q.webhook_id, versions[i], q.message_id, q.event_type,
                                  q.message_body::text, q.retry_count, COALESCE(q.max_retries, retries[i]),
                                  q.created_at, q.locked_until, probes[i], NULL::text;
                        GET DIAGNOSTICS got = ROW_COUNT;
                    END IF;
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
    END LOOP;
    -- Probes out (their health rows are already this claim's, taken without waiting above).
    FOR i IN SELECT s.i FROM unnest(hooks, probes, taken) WITH ORDINALITY AS s(hook, probe, took, i)
             WHERE s.probe AND s.took > 0 ORDER BY s.hook LOOP
        UPDATE hookfleet.webhook_health_metrics h
        SET circuit_state = 'half_open', circuit_probe_until = clock_timestamp() + claim_deliveries.lease, updated_at = now_at
        WHERE h.webhook_id = hooks[i];
    END LOOP;
END
$$;
COMMENT ON FUNCTION hookfleet.claim_deliveries(text, integer, interval, double precision, integer, integer, bigint[], integer[]) IS
    'The workers'' claim: get_ready_deliveries plus fleet-wide rate limits (default_rate_limit_rps/burst apply to webhooks without their own), a per-worker cap per webhook (webhook_slots minus this worker''s busy_counts), and rows reporting webhooks held back by their rate limit';
