-- Forget workers silent for longer than $1 seconds: they were killed without deregistering.
DELETE FROM hookfleet.workers WHERE last_seen_at < now() - make_interval(secs => $1::float8)
