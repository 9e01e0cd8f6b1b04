-- Return rows whose lease expired (their worker died or stalled) to pending, at most $1 per run.
-- An expired lease is not a try: the worker may have died before it attempted anything. It counts
-- in lease_expiries instead, and a row whose lease expired $2 times (a message that kills or stalls
-- every worker that takes it) ends dead, with the reason, instead of circling forever.
-- locked_by and locked_until stay: they name the expired claim, whose late result may still settle
-- the row (complete_many.sql) until another claim takes it.
-- SKIP LOCKED lets every worker run this concurrently without waiting on each other.
WITH expired AS (
    SELECT q.delivery_id
    FROM hookfleet.delivery_queue q
    WHERE q.delivery_status = 'in_flight' AND q.locked_until < now()
    ORDER BY q.locked_until
    LIMIT $1::integer
    FOR UPDATE SKIP LOCKED
)
UPDATE hookfleet.delivery_queue q
SET delivery_status = CASE WHEN q.lease_expiries + 1 >= $2::integer THEN 'dead' ELSE 'pending' END,
    lease_expiries = q.lease_expiries + 1,
    last_error = CASE WHEN q.lease_expiries + 1 >= $2::integer
                      THEN 'lease expired ' || (q.lease_expiries + 1) || ' times: every worker that took it stopped or stalled (last: ' || q.locked_by || ')'
                      ELSE 'lease expired: the worker holding it stopped or stalled (' || q.locked_by || ')' END,
    next_attempt_at = now()
FROM expired e
WHERE q.delivery_id = e.delivery_id
RETURNING q.delivery_id
