-- One current definition, re-applied by `hookfleet migrate` when this file changes
-- (see sql/README.md). Edit it in place; never in a migration.
--
-- The largest message body the database accepts: hookfleet.settings.max_body_bytes, which
-- `hookfleet migrate` writes from HOOKFLEET_MAX_BODY_BYTES, with the built-in default when unset.

-- The body size limit, from hookfleet.settings (written by `hookfleet migrate`).
CREATE OR REPLACE FUNCTION hookfleet.max_body_bytes() RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT COALESCE((SELECT value::integer FROM hookfleet.settings WHERE name = 'max_body_bytes'), 262144)
$$;
COMMENT ON FUNCTION hookfleet.max_body_bytes() IS 'Largest accepted message_body, in bytes of its JSON text (HOOKFLEET_MAX_BODY_BYTES)';
