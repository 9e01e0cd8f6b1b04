-- The fleet's depth sample (pending, in_flight, dead; the oldest due row's age on pending),
-- recounted by this call only when it is older than $1 seconds and no other worker is at it.
SELECT delivery_status, deliveries, oldest_due_age_seconds
FROM hookfleet.sample_queue_depth(make_interval(secs => $1::float8))
