-- One current definition, re-applied by `hookfleet migrate` when this file changes
-- (see sql/README.md). Edit it in place; never in a migration.

CREATE OR REPLACE VIEW hookfleet.v_workers AS
SELECT worker_id, host, pid, version, started_at, last_seen_at, in_flight,
       round(extract(epoch FROM now() - last_seen_at)::numeric, 1) AS seconds_since_heartbeat
FROM hookfleet.workers
WHERE last_seen_at > now() - interval '1 minute'
ORDER BY worker_id;
COMMENT ON VIEW hookfleet.v_workers IS 'Workers that heartbeated within the last minute';
