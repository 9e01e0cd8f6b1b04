-- Revokes key $1 unless it already is: whether this call revoked it, and whether the key exists at
-- all (the EXISTS reads the statement's snapshot, taken before the UPDATE). Of two concurrent
-- revokes the second waits for the first's row and then finds it revoked.
WITH revoked AS (
    UPDATE hookfleet.api_keys
    SET revoked_at = now()
    WHERE key_id = $1::bigint AND revoked_at IS NULL
    RETURNING key_id
)
SELECT EXISTS (SELECT FROM revoked) AS revoked,
       EXISTS (SELECT FROM hookfleet.api_keys WHERE key_id = $1::bigint) AS known
