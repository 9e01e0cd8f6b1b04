-- API keys for the producer and admin HTTP API (SPEC §9, §11): `Authorization: Bearer hfk_…`,
-- created, listed and revoked with `hookfleet api-keys` (crates/core/src/api_keys.rs).
-- A key is `hfk_` and 32 random bytes; only the SHA-256 of the whole key is stored. 256 random
-- bits cannot be guessed back from their hash, so no slow password hash is needed, and finding a
-- presented key is one probe of the unique index on key_hash. key_prefix, the key's first 12
-- characters (`hfk_` and 8 of its 43 base64url characters), is shown in lists so that an operator
-- can tell keys apart; it is all of a key the database ever sees in the clear.
-- A revoked key keeps its row (revoked_at set): lists show when it stopped working.
-- This only adds a table that older binaries never read, so oldest_compatible_migration stays.
-- Append-only: never edit this file once released; add a new numbered migration instead.

CREATE TABLE hookfleet.api_keys (
    key_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name         text NOT NULL,
    scope        text NOT NULL,
    key_hash     bytea NOT NULL,
    key_prefix   text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- Written at most once a minute per key, so a busy key costs no write per request.
    last_used_at timestamptz,
    revoked_at   timestamptz,
    CONSTRAINT api_keys_name_length CHECK (length(name) BETWEEN 1 AND 200),
    CONSTRAINT api_keys_scope_known CHECK (scope IN ('admin', 'producer')),
    CONSTRAINT api_keys_key_hash_sha256 CHECK (octet_length(key_hash) = 32),
    CONSTRAINT api_keys_key_hash_unique UNIQUE (key_hash),
    -- The prefix only: a whole key must never land in this column.
    CONSTRAINT api_keys_key_prefix_form CHECK (key_prefix ~ '^hfk_[A-Za-z0-9_-]{8}$')
);
COMMENT ON TABLE hookfleet.api_keys IS
    'Keys of the HTTP API (scope admin: everything; producer: post messages, read deliveries), stored as the SHA-256 of the key; create them with `hookfleet api-keys create`, which shows a key once';
