-- Write back one batch of attempts in one statement: settle each attempted row, record every
-- attempt, and update each webhook's health from the attempts recorded.
-- Settling is fenced on this worker *and* the claim's locked_until, so a result that arrives after
-- its lease expired never settles a later claim of the row (by any worker, this one included). A
-- row the lease rescue returned to pending keeps that claim's locked_by and locked_until until it
-- is claimed again, so a late result still settles it: the attempt really happened, and a success
-- must not be lost to a rescue. A success also settles a dead letter whichever claim sent it (a
-- dead letter must never hide a delivery); nothing else revives one (its key's successor may be
-- on its way already).
-- Attempts are recorded even when the lease was lost, because the HTTP request really happened;
-- ON CONFLICT makes a batch retried after a lost commit reply record each attempt once, and health
-- and lost leases count only the attempts this statement inserted.
-- Locks follow the one order of hookfleet.webhooks_lock_before_delete: the queue rows first, in
-- delivery_id order, then the health rows, once per webhook, in webhook_id order, so that
-- concurrent batches from several workers and a webhook's deletion cannot deadlock.
WITH input AS (
    SELECT *
    FROM unnest($2::bigint[], $3::bigint[], $4::text[], $5::integer[], $6::float8[], $7::integer[],
                $8::integer[], $9::timestamptz[], $10::float8[], $11::text[], $12::text[], $13::text[],
                $16::timestamptz[])
         AS i(delivery_id, webhook_id, outcome, retry_count, retry_delay_ms, attempt_number,
              status_code, started_at, duration_ms, error_class, error_message, response_excerpt,
              locked_until)
),
locked AS (
    SELECT q.delivery_id
    FROM hookfleet.delivery_queue q
    WHERE q.delivery_id = ANY ($2::bigint[])
      -- Only rows this batch may settle: never wait for a row another worker or session owns.
      AND (q.locked_by = $1::text OR q.delivery_status = 'dead')
    ORDER BY q.delivery_id
    FOR UPDATE
),
settled AS (
    UPDATE hookfleet.delivery_queue q
    SET delivery_status = CASE i.outcome WHEN 'retry' THEN 'pending' ELSE i.outcome END,
        retry_count = i.retry_count,
        next_attempt_at = CASE WHEN i.outcome = 'retry'
                               THEN now() + make_interval(secs => i.retry_delay_ms / 1000.0)
                               ELSE q.next_attempt_at END,
        delivered_at = CASE WHEN i.outcome = 'delivered' THEN now() ELSE NULL END,
        last_attempt_at = i.started_at,
        last_status_code = i.status_code,
        last_error = i.error_message,
        locked_by = NULL,
        locked_until = NULL
    FROM input i
    JOIN locked l ON l.delivery_id = i.delivery_id
    WHERE q.delivery_id = i.delivery_id
      AND ((q.locked_by = $1::text
            AND q.locked_until = i.locked_until
            AND q.delivery_status IN ('in_flight', 'pending'))
           OR (i.outcome = 'delivered' AND q.delivery_status = 'dead'))
    RETURNING q.delivery_id, i.started_at
),
attempts AS (
    INSERT INTO hookfleet.delivery_attempts
        (delivery_id, webhook_id, attempt_number, worker_id, started_at, duration_ms, status_code,
         error_class, error_message, response_excerpt, outcome)
    SELECT i.delivery_id, i.webhook_id, i.attempt_number, $1::text, i.started_at, i.duration_ms,
           i.status_code, i.error_class, i.error_message, i.response_excerpt, i.outcome
    FROM input i
    ON CONFLICT (delivery_id, started_at) DO NOTHING
    RETURNING delivery_id, webhook_id, started_at, status_code, duration_ms,
              COALESCE(error_message, error_class) AS error
),
-- One health write per webhook per batch, its attempts folded in the order they started. The
-- sorted subquery is not flattened, so the function runs in webhook_id order.
health AS (
    SELECT g.webhook_id,
           hookfleet.update_webhook_health_batch(
               g.webhook_id, g.status_codes, g.durations_ms, g.errors,
               -- The webhook's own breaker settings, else the worker's ($14, $15). Subqueries
               -- rather than a join, which could reorder the rows.
               COALESCE((SELECT w.circuit_breaker_failure_threshold FROM hookfleet.webhooks w
                         WHERE w.webhook_id = g.webhook_id), $14::integer),
               COALESCE((SELECT w.circuit_breaker_timeout_seconds FROM hookfleet.webhooks w
                         WHERE w.webhook_id = g.webhook_id), $15::float8)) AS health_status
    FROM (SELECT webhook_id,
                 array_agg(status_code ORDER BY started_at, delivery_id) AS status_codes,
                 array_agg(duration_ms ORDER BY started_at, delivery_id) AS durations_ms,
                 array_agg(error ORDER BY started_at, delivery_id) AS errors
          FROM attempts
          GROUP BY webhook_id
          ORDER BY webhook_id) g
)
SELECT ARRAY(SELECT delivery_id FROM settled) AS settled_ids,
       ARRAY(SELECT webhook_id FROM health ORDER BY webhook_id) AS webhook_ids,
       ARRAY(SELECT health_status FROM health ORDER BY webhook_id) AS health_statuses,
       -- Leases lost: attempts recorded now that settled nothing. An attempt already recorded was
       -- written by an earlier try of this batch whose reply was lost, which settled its row then
       -- (or found it lost then): not a loss now.
       -- Matched on the attempt, not the row: a batch may hold an expired claim's result and a
       -- newer claim's for one row, and only the newer one settles it.
       ARRAY(SELECT a.delivery_id FROM attempts a
             WHERE NOT EXISTS (SELECT 1 FROM settled s
                               WHERE s.delivery_id = a.delivery_id AND s.started_at = a.started_at)
             ORDER BY a.delivery_id) AS lost_ids
