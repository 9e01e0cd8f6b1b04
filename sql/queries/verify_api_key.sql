-- Finds the key whose SHA-256 is $1 and is not revoked, and notes that it was used. last_used_at
-- is written at most once a minute per key, so a busy key costs one write a minute, not one per
-- request; the condition is on the table's row, so concurrent requests that both saw an old value
-- write it once (the second re-checks the row it waited for and skips it).
WITH used AS (
    UPDATE hookfleet.api_keys
    SET last_used_at = now()
    WHERE key_hash = $1::bytea AND revoked_at IS NULL
      AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')
    RETURNING key_id, last_used_at
)
SELECT k.key_id, k.name, k.scope, k.key_prefix, k.created_at,
       COALESCE(used.last_used_at, k.last_used_at) AS last_used_at, k.revoked_at
FROM hookfleet.api_keys k
LEFT JOIN used ON used.key_id = k.key_id
WHERE k.key_hash = $1::bytea AND k.revoked_at IS NULL
