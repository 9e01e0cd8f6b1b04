-- Return rows whose lease expired (their worker died or stalled) to pending, at most $1 per run.
-- The lost attempt counts as a retry: a message that kills or stalls every worker that takes it
-- ends up dead (with the reason) instead of circling forever. $2 is the configured default
-- max_retries for rows and webhooks that set none.
-- SKIP LOCKED lets every worker run this concurrently without waiting on each other.
WITH expired AS (
    SELECT q.delivery_id, COALESCE(q.max_retries, w.max_retries, $2::integer) AS max_retries
    FROM hookfleet.delivery_queue q
    JOIN hookfleet.webhooks w ON w.webhook_id = q.webhook_id
    WHERE q.delivery_status = 'in_flight' AND q.locked_until < now()
    ORDER BY q.locked_until
    LIMIT $1::integer
    FOR UPDATE OF q SKIP LOCKED
)
UPDATE hookfleet.delivery_queue q
SET delivery_status = CASE WHEN q.retry_count >= e.max_retries THEN 'dead' ELSE 'pending' END,
    retry_count = CASE WHEN q.retry_count >= e.max_retries THEN q.retry_count ELSE q.retry_count + 1 END,
    last_error = 'lease expired: the worker holding it stopped or stalled (' || q.locked_by || ')',
    locked_by = NULL,
    locked_until = NULL,
    next_attempt_at = now()
FROM expired e
WHERE q.delivery_id = e.delivery_id
RETURNING q.delivery_id
