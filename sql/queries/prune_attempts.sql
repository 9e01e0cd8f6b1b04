-- Delete attempt rows older than the retention ($1 seconds), at most $2 per run to keep locks short.
DELETE FROM hookfleet.delivery_attempts
WHERE attempt_id IN (
    SELECT attempt_id FROM hookfleet.delivery_attempts
    WHERE started_at < now() - make_interval(secs => $1::float8)
    LIMIT $2::integer
)
