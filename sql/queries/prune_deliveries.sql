-- Deletes at most $3 settled deliveries past their retention: delivered and cancelled rows $1
-- seconds after their last activity, dead letters after $2 seconds (they wait for a replay).
-- A row's last activity is the latest of its creation, schedule, last attempt and delivery; its
-- creation bounds it from below, so delivery_queue_created_brin narrows the search to old block
-- ranges instead of the whole table. Rows another session holds are skipped. Their attempts are
-- history with a retention of their own.
WITH old AS (
    SELECT q.delivery_id
    FROM hookfleet.delivery_queue q
    WHERE q.created_at < now() - make_interval(secs => LEAST($1::float8, $2::float8))
      AND q.delivery_status IN ('delivered', 'cancelled', 'dead')
      AND GREATEST(q.created_at, q.next_attempt_at, q.last_attempt_at, q.delivered_at)
          < now() - make_interval(secs => CASE WHEN q.delivery_status = 'dead' THEN $2::float8 ELSE $1::float8 END)
    LIMIT $3::integer
    FOR UPDATE SKIP LOCKED
)
DELETE FROM hookfleet.delivery_queue q
USING old
WHERE q.delivery_id = old.delivery_id
