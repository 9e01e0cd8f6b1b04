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

-- What a claim costs: a fixed number of set-based statements for the webhooks it looks at
-- (the window, their settings, their limiter rows, the rows to take, the marking, the charge),
-- whatever their number, plus one short index descent per webhook only where a webhook's rows
-- lie outside the window (the walk of phase 2 and a top-up). A claim that takes one row from
-- each of 100 webhooks runs the same nine statements as one that takes 100 rows of one webhook;
-- it used to run about eight statements per webhook (crates/bench, bench/README.md).
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
-- One plan per statement, made once per session. Left to choose, the plan cache compares a
-- generic plan (which guesses 100 elements per array) with custom plans (which know how many),
-- finds the generic one dearer and plans every statement afresh on every call: 0.3 ms of a
-- 0.36 ms claim that found its one webhook contended. Every statement is written to keep its
-- plan whatever the arrays hold (plans.rs checks the generic plans).
SET plan_cache_mode = force_generic_plan
-- A generic plan's estimates (100 elements per array, thousands of rows per webhook) can cost a
-- statement past jit_above_cost, and compiling it takes 10 ms where running it takes 0.1 ms.
SET jit = off
-- The session keeps its plans while the queue grows: planned on an empty queue, the window was a
-- sequential scan and a sort of every row, 0.9 ms a claim by 10,000 rows and growing, until an
-- ANALYZE made the session plan again (plans.rs, "planned on an empty queue"). Every statement
-- here has its index; none may read a table from end to end.
SET enable_seqscan = off
AS $$
#variable_conflict use_column
DECLARE
    now_at       timestamptz := now();
    now_s        double precision;
    wanted       integer := batch_size;
    phase        integer;
    window_full  boolean := false;
    window_count bigint;
    -- The webhooks a phase looks at, in claim order (phase 2: webhook order), with the highest
    -- priority level they have due rows at and how many due rows the window holds of them
    -- (phase 2: none known).
    p_ids        bigint[];
    p_levels     smallint[];
    p_counts     bigint[];
    seen         bigint[] := '{}';
    -- Those that may send, from one read of their settings (c_*), in the same order. c_kinds:
    -- take (worth locking), busy (this worker's cap) or rate_limit (no token by that read).
    c_ids        bigint[];
    c_levels     smallint[];
    c_counts     bigint[];
    c_versions   bigint[];
    c_retries    integer[];
    c_rooms      integer[];
    c_steps      double precision[];
    c_taus       double precision[];
    c_mifs       integer[];
    c_kinds      text[];
    c_untils     timestamptz[];
    c_buckets    boolean[];
    c_fresh      boolean[];
    takeable     integer;
    -- Those whose limiter row this claim holds (l_*: index into c_*, fresh reads under the lock)
    -- and what each may take (a_*).
    l_ci         integer[];
    l_ids        bigint[];
    l_tats       double precision[];
    l_states     text[];
    l_in_flight  bigint[];
    a_allow      integer[];
    a_share      integer[];
    a_taken      integer[];
    a_bound      text[];
    a_probe      boolean[];
    -- Report rows: webhooks held back, and why.
    h_ids        bigint[] := '{}';
    h_reasons    text[] := '{}';
    h_untils     timestamptz[] := '{}';
    last_reached integer;
    chunk_start  integer;
    chunk_end    integer;
    slice_base   integer;
    -- Set once webhooks this claim locked gave less than the batch wanted: from then on a slice's
    -- candidates are locked all at once, so that a window of webhooks that cannot send costs
    -- a pass per slice, not one per `wanted` webhooks.
    shortfall    boolean := false;
    c_places     integer[];
    slice_rest   integer;
    a_cap        integer[];
    ids          bigint[];
    id_hooks     bigint[];
    charges      double precision[];
    ci           integer;
    j            integer;
    pass         integer;
    share        integer;
    taking       integer;
    got          integer;
    tokens       double precision;
    allowance    integer;
    bound        text;
    health       record;
    level        smallint;
    lease_until  timestamptz;
BEGIN
    IF wanted IS NULL OR wanted <= 0 THEN
        RETURN;
    END IF;
    FOR phase IN 1 .. 2 LOOP
        IF phase = 1 THEN
            -- The first 4 batches of due rows in claim order (priority DESC, next_attempt_at,
            -- delivery_id): one short walk of delivery_queue_due_idx. retry_count >= 0 holds for
            -- every row; it is how this walk, and no statement about one webhook, matches
            -- delivery_queue_due_idx (V0014).
            WITH claim_window AS (
                SELECT q.webhook_id, q.priority,
                       row_number() OVER (ORDER BY q.priority DESC, q.next_attempt_at, q.delivery_id) AS ord
                FROM (SELECT q.webhook_id, q.priority, q.next_attempt_at, q.delivery_id
                      FROM hookfleet.delivery_queue q
                      WHERE q.delivery_status = 'pending' AND q.retry_count >= 0 AND q.next_attempt_at <= now_at
                      ORDER BY q.priority DESC, q.next_attempt_at, q.delivery_id
                      LIMIT batch_size * 4) q
            )
            SELECT array_agg(h.webhook_id ORDER BY h.first), array_agg(h.level ORDER BY h.first),
                   array_agg(h.n ORDER BY h.first), COALESCE(sum(h.n), 0)
            INTO p_ids, p_levels, p_counts, window_count
            FROM (SELECT cw.webhook_id, min(cw.ord) AS first, max(cw.priority) AS level, count(*) AS n
                  FROM claim_window cw GROUP BY cw.webhook_id) h;
            window_full := window_count >= batch_size * 4;
            seen := COALESCE(p_ids, '{}');
        ELSE
            -- That window could not fill the batch and there may be more due rows past it (behind
            -- backlogs that are held back): visit every other enabled webhook with due rows, one
            -- descent of delivery_queue_webhook_due_idx each, so a held-back backlog of any size
            -- never hides another webhook's rows.
            EXIT WHEN wanted <= 0 OR NOT window_full;
            SELECT array_agg(s.webhook_id ORDER BY s.webhook_id), array_agg(s.level ORDER BY s.webhook_id)
            INTO p_ids, p_levels
            FROM (
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
                SELECT o.webhook_id, o.level
                FROM (SELECT p.webhook_id, p.level
                      FROM pending_hooks p
                      -- By key (see the settings read below for why LATERAL … LIMIT 1).
                      CROSS JOIN LATERAL (SELECT w.enabled FROM hookfleet.webhooks w
                                          WHERE w.webhook_id = p.webhook_id LIMIT 1) w
                      -- An anti-join, hashed: the window's webhooks are not looked at twice.
                      LEFT JOIN unnest(seen) AS s(webhook_id) ON s.webhook_id = p.webhook_id
                      WHERE w.enabled AND s.webhook_id IS NULL
                      -- OFFSET 0 keeps the test below out of this query, so it runs only for the
                      -- webhooks left.
                      OFFSET 0) o
                WHERE hookfleet.has_due_delivery(o.webhook_id, now_at)
            ) s;
            p_counts := NULL;
        END IF;
        CONTINUE WHEN p_ids IS NULL;
        -- The webhooks in slices of one batch, in order, until the batch is full: a slice is
        -- looked at (settings, locks) only when the ones before it could not fill the batch, so a
        -- window of 400 webhooks costs a claim of 100 the reads of 100 in the common case.
        chunk_start := 1;
        WHILE wanted > 0 AND chunk_start <= cardinality(p_ids) LOOP
            chunk_end := chunk_start + batch_size - 1;
            slice_base := chunk_start;
            chunk_start := chunk_end + 1;

            now_s := extract(epoch FROM clock_timestamp());
            -- Their settings, read once without locks (a stale read only ever errs towards looking
            -- further): disabled webhooks and open circuits drop out; this worker's cap and an empty
            -- bucket hold a webhook back at once; the rest are worth taking the limiter row of.
            SELECT array_agg(s.webhook_id), array_agg(s.level), array_agg(s.n), array_agg(s.version), array_agg(s.max_retries),
                   array_agg(s.room), array_agg(s.step), array_agg(s.tau), array_agg(s.max_in_flight),
                   array_agg(CASE WHEN s.room <= 0 THEN 'busy' WHEN s.tokens <= 0 THEN 'rate_limit' ELSE 'take' END),
                   array_agg(to_timestamp(s.tat - s.tau)), array_agg(s.has_bucket),
                   array_agg(s.max_in_flight IS NOT NULL OR s.circuit_state <> 'closed'), array_agg(s.i),
                   count(*) FILTER (WHERE s.room > 0 AND COALESCE(s.tokens > 0, true))
            INTO c_ids, c_levels, c_counts, c_versions, c_retries, c_rooms, c_steps, c_taus, c_mifs, c_kinds, c_untils, c_buckets,
                 c_fresh, c_places, takeable
            FROM (
                SELECT p.i, p.webhook_id, p.level, p.n, w.version, w.max_retries, w.max_in_flight, r.tat, r.webhook_id IS NOT NULL AS has_bucket,
                       COALESCE(h.circuit_state, 'closed') AS circuit_state,
                       CASE WHEN claim_deliveries.webhook_slots IS NULL THEN batch_size
                            ELSE claim_deliveries.webhook_slots - COALESCE(b.busy, 0) END AS room,
                       g.step, g.tau,
                       CASE WHEN r.webhook_id IS NOT NULL AND g.step IS NOT NULL
                            THEN floor((g.tau - (GREATEST(r.tat, now_s) - now_s)) / g.step + 1e-9) + 1
                       END AS tokens
                -- Each lookup a LATERAL with LIMIT 1, so that it stays one index descent per webhook
                -- whatever the statistics: joined freely, a generic plan (which guesses 100 webhooks)
                -- hashes every webhook's row instead.
                FROM unnest(p_ids[chunk_end - batch_size + 1 : chunk_end], p_levels[chunk_end - batch_size + 1 : chunk_end],
                                p_counts[chunk_end - batch_size + 1 : chunk_end]) WITH ORDINALITY AS p(webhook_id, level, n, i)
                CROSS JOIN LATERAL (SELECT w.enabled, w.version, w.max_retries, w.max_in_flight, w.rate_limit_rps, w.rate_limit_burst
                                    FROM hookfleet.webhooks w WHERE w.webhook_id = p.webhook_id LIMIT 1) w
                LEFT JOIN LATERAL (SELECT h.circuit_state, h.circuit_open_until, h.circuit_probe_until
                                   FROM hookfleet.webhook_health_metrics h WHERE h.webhook_id = p.webhook_id LIMIT 1) h ON true
                LEFT JOIN LATERAL (SELECT r.webhook_id, r.tat
                                   FROM hookfleet.webhook_rate_limits r WHERE r.webhook_id = p.webhook_id LIMIT 1) r ON true
                -- (One count per webhook, even if a caller lists one twice.)
                LEFT JOIN (SELECT u.webhook_id, max(u.busy) AS busy
                           FROM unnest(busy_webhook_ids, busy_counts) AS u(webhook_id, busy) GROUP BY u.webhook_id) b
                       ON b.webhook_id = p.webhook_id
                CROSS JOIN LATERAL (
                    SELECT 1.0 / x.rps AS step,
                           (GREATEST(COALESCE(w.rate_limit_burst, default_rate_limit_burst, ceil(x.rps / 2)::integer), 1) - 1) / x.rps AS tau
                    FROM (SELECT COALESCE(w.rate_limit_rps, default_rate_limit_rps) AS rps) x
                ) g
                WHERE w.enabled
                  AND NOT (COALESCE(h.circuit_state, 'closed') = 'open' AND h.circuit_open_until > now_at)
                  AND NOT (COALESCE(h.circuit_state, 'closed') = 'half_open' AND h.circuit_probe_until > now_at)
                ORDER BY p.i
            ) s;
            CONTINUE WHEN c_ids IS NULL;
            last_reached := cardinality(c_ids);
            IF takeable > 0 THEN
                -- Limiter rows of every webhook that got one only at creation: a hand-deleted one is
                -- recreated (this insert checks the webhook's foreign key, the one wait a claim can meet).
                IF false = ANY (c_buckets) THEN
                    INSERT INTO hookfleet.webhook_rate_limits AS r (webhook_id, tat)
                    SELECT c.webhook_id, 0 FROM unnest(c_ids, c_kinds, c_buckets) AS c(webhook_id, kind, has_bucket)
                    WHERE c.kind = 'take' AND NOT c.has_bucket
                    ORDER BY c.webhook_id
                    ON CONFLICT (webhook_id) DO NOTHING;
                END IF;

                -- The limiter rows of as many webhooks as the batch can use (each yields a row at least),
                -- in claim order, without waiting: one another session holds (a concurrent claim, an
                -- open transaction at a psql prompt) is skipped for the next one, so concurrent claims
                -- spread over the window instead of meeting on its first webhooks. The limiter row is
                -- what serialises one webhook's claims, and with them its rate, max_in_flight and
                -- per-key order, for every entry point (get_ready_deliveries too).
                -- The webhooks are visited in their order (a nested loop over unnest, which yields its
                -- elements in order), each limiter row locked on its own as it is reached, and the LIMIT
                -- stops the loop: a sort here would lock every candidate before choosing. A locked row
                -- is read as the last holder committed it (READ COMMITTED locks the newest version and
                -- returns that), so the bucket read here is fresh.
                SELECT array_agg(k.i ORDER BY k.i), array_agg(k.webhook_id ORDER BY k.i), array_agg(k.tat ORDER BY k.i)
                INTO l_ci, l_ids, l_tats
                FROM (
                    SELECT c.i, c.webhook_id, r.tat
                    FROM unnest(c_ids, c_kinds) WITH ORDINALITY AS c(webhook_id, kind, i)
                    CROSS JOIN LATERAL (SELECT r.tat FROM hookfleet.webhook_rate_limits r
                                        WHERE r.webhook_id = c.webhook_id LIMIT 1 FOR UPDATE SKIP LOCKED) r
                    WHERE c.kind = 'take'
                    LIMIT CASE WHEN shortfall THEN takeable ELSE LEAST(wanted, takeable) END
                ) k;
                -- Skipped (another session holds it): reported contended, looked at again soon.
                last_reached := CASE WHEN shortfall OR COALESCE(cardinality(l_ci), 0) < LEAST(wanted, takeable)
                                     THEN cardinality(c_ids) ELSE l_ci[cardinality(l_ci)] END;
            END IF;
            -- Held back by the settings read, up to the last webhook reached (those after it are
            -- looked at again, in the next slice).
            IF takeable < cardinality(c_ids) THEN
                SELECT h_ids || array_agg(c.webhook_id ORDER BY c.i), h_reasons || array_agg(c.kind ORDER BY c.i),
                       h_untils || array_agg(CASE WHEN c.kind = 'rate_limit' THEN c.until END ORDER BY c.i)
                INTO h_ids, h_reasons, h_untils
                FROM unnest(c_ids, c_kinds, c_untils) WITH ORDINALITY AS c(webhook_id, kind, until, i)
                WHERE c.kind <> 'take' AND c.i <= last_reached;
            END IF;
            -- The webhooks past the last one reached: the next slice starts with them.
            IF last_reached < cardinality(c_ids) THEN
                chunk_start := slice_base + c_places[last_reached];
            END IF;
            slice_rest := last_reached;
            CONTINUE WHEN takeable = 0;
            -- (Nothing was skipped when the webhooks locked are the first ones, one after another.)
            IF l_ci IS NULL OR last_reached > cardinality(l_ci) THEN
                SELECT h_ids || array_agg(c.webhook_id ORDER BY c.i), h_reasons || array_agg('contended'::text),
                       h_untils || array_agg(NULL::timestamptz)
                INTO h_ids, h_reasons, h_untils
                FROM unnest(c_ids, c_kinds) WITH ORDINALITY AS c(webhook_id, kind, i)
                LEFT JOIN unnest(l_ci) AS l(i) ON l.i = c.i
                WHERE c.kind = 'take' AND c.i <= last_reached AND l.i IS NULL;
            END IF;
            CONTINUE WHEN l_ci IS NULL;

            -- Decided under the locks, on fresh reads (this statement sees what the previous holders
            -- committed): the circuit and the attempts in flight, for webhooks where either may
            -- decide (max_in_flight set, a circuit not closed when the settings were read).
            l_states := NULL;
            l_in_flight := NULL;
            IF true = ANY (c_fresh) THEN
                SELECT array_agg(COALESCE(h.circuit_state, 'closed')), array_agg(f.in_flight)
                INTO l_states, l_in_flight
                FROM (SELECT l.webhook_id, l.i FROM unnest(l_ids) WITH ORDINALITY AS l(webhook_id, i) ORDER BY l.i) l
                LEFT JOIN LATERAL (SELECT h.circuit_state, h.circuit_open_until, h.circuit_probe_until
                                   FROM hookfleet.webhook_health_metrics h WHERE h.webhook_id = l.webhook_id LIMIT 1) h ON true
                CROSS JOIN LATERAL (
                    SELECT CASE WHEN c_mifs[l_ci[l.i]] IS NOT NULL THEN (
                               SELECT count(*) FROM hookfleet.delivery_queue q
                               WHERE q.webhook_id = l.webhook_id AND q.delivery_status = 'in_flight') END AS in_flight
                ) f;
            END IF;
            -- The time now, not the transaction's start: a claim may have waited for the database.
            now_s := extract(epoch FROM clock_timestamp());
            a_allow := '{}';
            a_taken := '{}';
            a_bound := '{}';
            a_probe := '{}';
            a_cap := '{}';
            FOR j IN 1 .. cardinality(l_ids) LOOP
                ci := l_ci[j];
                allowance := LEAST(c_rooms[ci], batch_size);
                bound := CASE WHEN c_rooms[ci] < batch_size THEN 'busy' END;
                a_probe[j] := false;
                IF c_steps[ci] IS NOT NULL THEN
                    tokens := floor((c_taus[ci] - (GREATEST(l_tats[j], now_s) - now_s)) / c_steps[ci] + 1e-9) + 1;
                    IF tokens <= 0 THEN
                        h_ids := h_ids || l_ids[j];
                        h_reasons := h_reasons || 'rate_limit'::text;
                        h_untils := h_untils || to_timestamp(l_tats[j] - c_taus[ci]);
                        allowance := 0;
                    ELSIF tokens < allowance THEN
                        allowance := tokens;
                        bound := 'rate_limit';
                    END IF;
                END IF;
                IF allowance > 0 AND c_mifs[ci] IS NOT NULL THEN
                    IF l_in_flight[j] >= c_mifs[ci] THEN
                        h_ids := h_ids || l_ids[j];
                        h_reasons := h_reasons || 'max_in_flight'::text;
                        h_untils := h_untils || NULL::timestamptz;
                        allowance := 0;
                    ELSIF c_mifs[ci] - l_in_flight[j] < allowance THEN
                        allowance := c_mifs[ci] - l_in_flight[j];
                        bound := 'max_in_flight';
                    END IF;
                END IF;
                IF allowance > 0 AND COALESCE(l_states[j], 'closed') <> 'closed' THEN
                    -- Not closed: perhaps a probe is due. Marking one out writes the health row, which a
                    -- write-back may hold right now: take the row without waiting, so that a claim
                    -- never waits for any lock (and so is never part of a deadlock), and decide on what
                    -- it says now.
                    SELECT h.circuit_state, h.circuit_open_until, h.circuit_probe_until INTO health
                    FROM hookfleet.webhook_health_metrics h WHERE h.webhook_id = l_ids[j]
                    FOR UPDATE SKIP LOCKED;
                    IF NOT FOUND THEN
                        h_ids := h_ids || l_ids[j];
                        h_reasons := h_reasons || 'contended'::text;
                        h_untils := h_untils || NULL::timestamptz;
                        allowance := 0;
                    ELSIF health.circuit_state <> 'closed' THEN
                        IF health.circuit_state = 'open' AND health.circuit_open_until > now_at
                           OR health.circuit_state = 'half_open' AND health.circuit_probe_until > now_at THEN
                            allowance := 0;
                        ELSE
                            -- The open period is over (or the last probe was lost): exactly one probe.
                            a_probe[j] := true;
                            allowance := 1;
                            bound := NULL;
                        END IF;
                    END IF;
                END IF;
                a_allow[j] := allowance;
                a_bound[j] := bound;
                -- The most it can take in this claim: its allowance, and while the window holds every
                -- due row, no more than the window holds of it.
                a_cap[j] := CASE WHEN phase = 2 OR window_full THEN allowance
                                 ELSE LEAST(allowance, c_counts[ci])::integer END;
            END LOOP;

            -- What each takes: an equal share first, round by round (every webhook's first row,
            -- then every second row, …) so that a batch is shared before one webhook takes the rest,
            -- each bounded by what it may take and, in phase 1, by the due rows the window holds of
            -- it; computed over those rows' ranks, without reading the queue.
            IF cardinality(l_ids) = 1 THEN
                a_share := ARRAY[LEAST(a_cap[1], wanted)];
            ELSIF phase = 2 THEN
                -- Nothing known of how many due rows each has: an equal split, the rest by the top-up.
                -- (wanted / n each, one more for the first wanted % n: never more than wanted in all.)
                a_share := ARRAY(SELECT LEAST(c.cap, wanted / cardinality(l_ids)
                                                     + CASE WHEN c.j <= wanted % cardinality(l_ids) THEN 1 ELSE 0 END)::integer
                                 FROM unnest(a_cap) WITH ORDINALITY AS c(cap, j) ORDER BY c.j);
            ELSE
                -- One row per rank up to each cap: at most the window's rows.
                SELECT array_agg(COALESCE(x.share, 0) ORDER BY l.j) INTO a_share
                FROM unnest(l_ids) WITH ORDINALITY AS l(webhook_id, j)
                LEFT JOIN (
                    SELECT r.j, count(*)::integer AS share
                    FROM (SELECT a.j, g.rank
                          FROM unnest(a_cap) WITH ORDINALITY AS a(cap, j)
                          CROSS JOIN LATERAL generate_series(1, a.cap) AS g(rank)
                          ORDER BY g.rank, a.j
                          LIMIT wanted) r
                    GROUP BY r.j
                ) x ON x.j = l.j;
            END IF;

            -- The rows: each webhook's share of its highest level, in claim order, from one tight range
            -- of its index (webhook_id, priority, next_attempt_at) each, locked without waiting.
            -- Keyed rows are taken only once their predecessor has settled.
            SELECT array_agg(t.delivery_id), array_agg(t.webhook_id) INTO ids, id_hooks
            FROM unnest(l_ids, a_share, l_ci) AS a(webhook_id, share, ci)
            CROSS JOIN LATERAL (
                SELECT q.delivery_id, q.webhook_id
                FROM hookfleet.delivery_queue q
                WHERE q.webhook_id = a.webhook_id
                  AND q.delivery_status = 'pending'
                  AND q.priority = c_levels[a.ci]
                  AND q.next_attempt_at <= now_at
                  AND (q.ordering_key IS NULL OR NOT EXISTS (
                      SELECT 1 FROM hookfleet.delivery_queue p
                      WHERE p.webhook_id = q.webhook_id
                        AND p.ordering_key = q.ordering_key
                        AND p.delivery_id <> q.delivery_id
                        -- In flight blocks whatever its id: a row committed late with a lower id
                        -- must not overtake one already being attempted.
                        AND (p.delivery_status = 'in_flight'
                             OR (p.delivery_status = 'pending' AND p.delivery_id < q.delivery_id))))
                ORDER BY q.webhook_id, q.priority DESC, q.next_attempt_at, q.delivery_id
                LIMIT a.share
                FOR UPDATE OF q SKIP LOCKED
            ) t
            WHERE a.share > 0;
            a_taken := array_fill(0, ARRAY[cardinality(l_ids)]);
            IF ids IS NOT NULL THEN
                -- The lease starts now, not when the claim's transaction began: a claim that waited
                -- (for the database, a lock, a long walk) must not hand out a lease that is partly
                -- spent before the worker even sees the row.
                lease_until := clock_timestamp() + claim_deliveries.lease;
                RETURN QUERY
                WITH marked AS (
                    UPDATE hookfleet.delivery_queue q
                    SET delivery_status = 'in_flight',
                        locked_by = claim_deliveries.worker_id,
                        locked_until = lease_until
                    WHERE q.delivery_id = ANY (ids)
                    RETURNING q.delivery_id, q.webhook_id, q.message_id, q.event_type, q.message_body, q.retry_count,
                              q.max_retries, q.created_at, q.locked_until, q.priority, q.next_attempt_at
                )
                SELECT m.delivery_id, m.webhook_id, c_versions[l_ci[l.j]], m.message_id, m.event_type,
                       m.message_body::text, m.retry_count, COALESCE(m.max_retries, c_retries[l_ci[l.j]]),
                       m.created_at, m.locked_until, a_probe[l.j], NULL::text
                FROM marked m
                JOIN unnest(l_ids) WITH ORDINALITY AS l(webhook_id, j) ON l.webhook_id = m.webhook_id
                ORDER BY m.priority DESC, m.next_attempt_at, m.delivery_id;
                IF cardinality(l_ids) = 1 THEN
                    a_taken := ARRAY[cardinality(ids)];
                ELSE
                    a_taken := ARRAY(
                        SELECT count(t.webhook_id)::integer
                        FROM unnest(l_ids) WITH ORDINALITY AS l(webhook_id, j)
                        LEFT JOIN unnest(id_hooks) AS t(webhook_id) ON t.webhook_id = l.webhook_id
                        GROUP BY l.j ORDER BY l.j);
                END IF;
                wanted := wanted - cardinality(ids);
            END IF;

            -- More, while the batch is not full, from the webhooks that took less than their cap:
            -- what another could not take (rows at a lower level, locked by another session or
            -- waiting for their key's predecessor) goes to the others, and when more due rows may
            -- lie past the window, a webhook may take more than the window held of it. One webhook
            -- at a time, level by level, an equal share each first, then what is left.
            -- (A webhook never takes more than its cap, so any shortfall makes the arrays differ.)
            IF wanted > 0 AND a_taken <> a_cap THEN
                FOR pass IN 1 .. 2 LOOP
                    EXIT WHEN wanted <= 0;
                    share := CASE WHEN pass = 1 THEN ceil(wanted::numeric / cardinality(l_ids))::integer ELSE wanted END;
                    FOR j IN 1 .. cardinality(l_ids) LOOP
                        EXIT WHEN wanted <= 0;
                        taking := LEAST(a_cap[j] - a_taken[j], share, wanted);
                        CONTINUE WHEN taking <= 0;
                        -- One priority level at a time, highest first: each level is a tight range of the
                        -- webhook's index (webhook_id, priority, next_attempt_at), so rows scheduled for
                        -- later are never read, however many there are.
                        level := c_levels[l_ci[j]];
                        WHILE level IS NOT NULL AND taking > 0 LOOP
                            ids := ARRAY(
                                SELECT q.delivery_id
                                FROM hookfleet.delivery_queue q
                                WHERE q.webhook_id = l_ids[j]
                                  AND q.delivery_status = 'pending'
                                  AND q.priority = level
                                  AND q.next_attempt_at <= now_at
                                  AND (q.ordering_key IS NULL OR NOT EXISTS (
                                      SELECT 1 FROM hookfleet.delivery_queue p
                                      WHERE p.webhook_id = q.webhook_id
                                        AND p.ordering_key = q.ordering_key
                                        AND p.delivery_id <> q.delivery_id
                                        AND (p.delivery_status = 'in_flight'
                                             OR (p.delivery_status = 'pending' AND p.delivery_id < q.delivery_id))))
                                ORDER BY q.webhook_id, q.priority DESC, q.next_attempt_at, q.delivery_id
                                LIMIT taking
                                FOR UPDATE OF q SKIP LOCKED);
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
                                RETURNING q.delivery_id, q.webhook_id, c_versions[l_ci[j]], q.message_id, q.event_type,
                                          q.message_body::text, q.retry_count, COALESCE(q.max_retries, c_retries[l_ci[j]]),
                                          q.created_at, q.locked_until, a_probe[j], NULL::text;
                                GET DIAGNOSTICS got = ROW_COUNT;
                            END IF;
                            a_taken[j] := a_taken[j] + got;
                            wanted := wanted - got;
                            taking := taking - got;
                            EXIT WHEN taking <= 0;
                            level := (SELECT q.priority FROM hookfleet.delivery_queue q
                                      WHERE q.webhook_id = l_ids[j] AND q.delivery_status = 'pending' AND q.priority < level
                                      ORDER BY q.priority DESC LIMIT 1);
                        END LOOP;
                        -- Fewer than asked: this webhook has nothing more to give in this claim.
                        IF taking > 0 THEN
                            a_allow[j] := a_taken[j];
                            a_cap[j] := a_taken[j];
                            a_bound[j] := NULL;
                        END IF;
                    END LOOP;
                END LOOP;
            END IF;

            -- Spend the tokens taken, in one statement (adding to the bucket as it is now, which this
            -- claim holds), and mark the probes out (their health rows are this claim's already).
            -- (By key, = ANY: an UPDATE joined to unnest may hash the whole table in a generic plan.)
            IF cardinality(l_ids) = 1 THEN
                ids := CASE WHEN a_taken[1] > 0 AND c_steps[l_ci[1]] IS NOT NULL THEN ARRAY[l_ids[1]] END;
                charges := ARRAY[a_taken[1] * c_steps[l_ci[1]]];
            ELSE
                SELECT array_agg(t.webhook_id), array_agg(t.taken * c_steps[l_ci[t.j]]) INTO ids, charges
                FROM unnest(l_ids, a_taken) WITH ORDINALITY AS t(webhook_id, taken, j)
                WHERE t.taken > 0 AND c_steps[l_ci[t.j]] IS NOT NULL;
            END IF;
            IF ids IS NOT NULL THEN
                UPDATE hookfleet.webhook_rate_limits r
                SET tat = GREATEST(r.tat, now_s) + charges[array_position(ids, r.webhook_id)]
                WHERE r.webhook_id = ANY (ids);
            END IF;
            IF true = ANY (a_probe) THEN
                UPDATE hookfleet.webhook_health_metrics h
                SET circuit_state = 'half_open', circuit_probe_until = clock_timestamp() + claim_deliveries.lease, updated_at = now_at
                WHERE h.webhook_id = ANY (ARRAY(SELECT t.webhook_id FROM unnest(l_ids, a_probe, a_taken) AS t(webhook_id, probe, taken)
                                                WHERE t.probe AND t.taken > 0));
            END IF;
            -- The webhooks that took all they were allowed while a limit bounded them: the worker
            -- waits for the next token or for a slot rather than for the poll interval.
            FOR j IN 1 .. cardinality(l_ids) LOOP
                IF a_bound[j] IS NOT NULL AND a_taken[j] >= a_allow[j] AND a_allow[j] > 0 THEN
                    h_ids := h_ids || l_ids[j];
                    h_reasons := h_reasons || a_bound[j];
                    h_untils := h_untils || CASE WHEN a_bound[j] = 'rate_limit'
                        THEN to_timestamp(GREATEST(l_tats[j], now_s) + a_taken[j] * c_steps[l_ci[j]] - c_taus[l_ci[j]]) END;
                END IF;
            END LOOP;
            -- The batch is full: this slice's webhooks past the last one reached are not looked at
            -- again in this claim, so those its settings read held back are reported now.
            IF wanted <= 0 AND slice_rest < cardinality(c_ids) AND takeable < cardinality(c_ids) THEN
                SELECT h_ids || array_agg(c.webhook_id ORDER BY c.i), h_reasons || array_agg(c.kind ORDER BY c.i),
                       h_untils || array_agg(CASE WHEN c.kind = 'rate_limit' THEN c.until END ORDER BY c.i)
                INTO h_ids, h_reasons, h_untils
                FROM unnest(c_ids, c_kinds, c_untils) WITH ORDINALITY AS c(webhook_id, kind, until, i)
                WHERE c.kind <> 'take' AND c.i > slice_rest;
            END IF;
            IF wanted > 0 THEN
                shortfall := true;
            END IF;
        END LOOP;
    END LOOP;

    IF cardinality(h_ids) > 0 THEN
        RETURN QUERY
        SELECT x.* FROM unnest(h_ids, h_reasons, h_untils) AS h(webhook_id, reason, until),
                        LATERAL hookfleet.claim_hold(h.webhook_id, h.reason, h.until) x;
    END IF;
END
$$;
COMMENT ON FUNCTION hookfleet.claim_deliveries(text, integer, interval, double precision, integer, integer, bigint[], integer[]) IS
    'The workers'' claim: get_ready_deliveries plus fleet-wide rate limits (default_rate_limit_rps/burst apply to webhooks without their own), a per-worker cap per webhook (webhook_slots minus this worker''s busy_counts), and rows reporting webhooks held back by their rate limit';
