-- Claim up to $2 due deliveries for worker $1 under a lease of $3 seconds, with the worker's rate-limit
-- defaults ($4 rps, $5 burst), its per-webhook cap ($6) and its busy attempts per webhook ($7, $8).
-- Rows with a NULL delivery_id report a webhook held back by its rate limit.
SELECT delivery_id, webhook_id, webhook_version, message_id, event_type, body, retry_count, max_retries, created_at,
       locked_until, probe, held_back
FROM hookfleet.claim_deliveries($1::text, $2::integer, make_interval(secs => $3::float8), $4::float8, $5::integer,
                                $6::integer, $7::bigint[], $8::integer[])
