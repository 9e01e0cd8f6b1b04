-- The delivery settings of the given webhooks (URL and secrets still encrypted).
SELECT webhook_id, version, url_encrypted, secrets_encrypted, timeout_ms, max_retries, enabled
FROM hookfleet.webhooks
WHERE webhook_id = ANY ($1::bigint[])
