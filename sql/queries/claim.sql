-- Claim up to $2 due deliveries for worker $1 under a lease of $3 seconds, with the worker's rate-limit
-- defaults ($4 rps, $5 burst), its per-webhook cap ($6) and its busy attempts per webhook ($7, $8).
-- Rows with a NULL delivery_id report a webhook held back by its rate limit.
-- lease_left is what remains of each lease once the whole claim has run (the function's rows are
-- all made before this outer SELECT reads them), in seconds of the database's clock: the worker
-- counts its attempt deadline from it, so neither the claim's own time nor clock skew between
-- worker and database can let an attempt outlive its lease.
SELECT delivery_id, webhook_id, webhook_version, message_id, event_type, body, retry_count, max_retries, created_at,
       locked_until, probe, held_back, extract(epoch FROM locked_until - clock_timestamp())::float8 AS lease_left
FROM hookfleet.claim_deliveries($1::text, $2::integer, make_interval(secs => $3::float8), $4::float8, $5::integer,
                                $6::integer, $7::bigint[], $8::integer[])
