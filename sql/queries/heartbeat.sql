-- Register or refresh this worker in the registry.
INSERT INTO hookfleet.workers AS w (worker_id, host, pid, version, in_flight)
VALUES ($1::text, $2::text, $3::integer, $4::text, $5::integer)
ON CONFLICT (worker_id) DO UPDATE
SET last_seen_at = now(), in_flight = EXCLUDED.in_flight, host = EXCLUDED.host, pid = EXCLUDED.pid,
    version = EXCLUDED.version
