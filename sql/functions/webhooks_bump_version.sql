-- One current definition, re-applied by `hookfleet migrate` when this file changes
-- (see sql/README.md). Edit it in place; never in a migration.
--
-- Every state of a webhook gets a version no other state of any webhook_id ever had: workers
-- cache a webhook's decrypted target by version and reload it when a claimed row carries another.

-- SECURITY DEFINER: a role allowed to write webhooks needs no grant on the sequence.
CREATE OR REPLACE FUNCTION hookfleet.webhooks_bump_version() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        -- Whatever the INSERT said: a copied row must not bring its old version back.
        NEW.version := nextval('hookfleet.webhook_versions');
    ELSIF NEW IS DISTINCT FROM OLD THEN
        NEW.version := nextval('hookfleet.webhook_versions');
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END
$$;
