-- Put rows $2 that worker $1 claimed but cannot attempt (their webhook cannot be used right now,
-- e.g. its secrets cannot be decrypted with this worker's keys) back to pending, due again in $3
-- seconds, with the reason $4. Not an attempt: the retry budget is untouched.
UPDATE hookfleet.delivery_queue
SET delivery_status = 'pending', locked_by = NULL, locked_until = NULL,
    next_attempt_at = now() + make_interval(secs => $3::float8), last_error = $4::text
WHERE delivery_id = ANY ($2::bigint[])
  AND locked_by = $1::text
  AND delivery_status = 'in_flight'
