-- Deletes at most $3 settled deliveries past their retention: delivered and cancelled rows $1
-- seconds after they settled, dead letters after $2 seconds (they wait for a replay). Oldest
-- first, in delivery_id order, so the scan starts where old rows are and stops after $3. Rows
-- another session holds are skipped. Their attempts are history with a retention of their own.
WITH old AS (
    SELECT q.delivery_id
    FROM hookfleet.delivery_queue q
    WHERE q.created_at < now() - make_interval(secs => LEAST($1::float8, $2::float8))
      AND ((q.delivery_status IN ('delivered', 'cancelled')
            AND COALESCE(q.delivered_at, q.last_attempt_at, q.created_at) < now() - make_interval(secs => $1::float8))
           OR (q.delivery_status = 'dead'
               AND COALESCE(q.last_attempt_at, q.created_at) < now() - make_interval(secs => $2::float8)))
    ORDER BY q.delivery_id
    LIMIT $3::integer
    FOR UPDATE SKIP LOCKED
)
DELETE FROM hookfleet.delivery_queue q
USING old
WHERE q.delivery_id = old.delivery_id
