-- Claim up to $2 due deliveries for worker $1 under a lease of $3 seconds.
SELECT delivery_id, webhook_id, webhook_version, message_id, event_type, body, retry_count, max_retries, created_at,
       locked_until
FROM hookfleet.get_ready_deliveries($1::text, $2::integer, make_interval(secs => $3::float8))
