-- Return rows whose lease expired (their worker died or stalled) to pending, at most $1 per run.
-- SKIP LOCKED lets every worker run this concurrently without waiting on each other.
WITH expired AS (
    SELECT delivery_id
    FROM hookfleet.delivery_queue
    WHERE delivery_status = 'in_flight' AND locked_until < now()
    ORDER BY locked_until
    LIMIT $1::integer
    FOR UPDATE SKIP LOCKED
)
UPDATE hookfleet.delivery_queue q
SET delivery_status = 'pending', locked_by = NULL, locked_until = NULL, next_attempt_at = now()
FROM expired e
WHERE q.delivery_id = e.delivery_id
RETURNING q.delivery_id
