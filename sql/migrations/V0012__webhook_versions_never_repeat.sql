-- A webhook's version identifies what a worker's cache holds: a claimed row carries its webhook's
-- version, and a cached target of another version is reloaded. Versions counted per webhook from 1
-- repeat when a webhook is deleted and created again under the same webhook_id (an operator's
-- DELETE and INSERT, a restore), and a running worker would go on signing with the deleted
-- webhook's secret, to its URL. Versions now come from one sequence, on insert and on every
-- change, so no two states of any webhook_id ever share a version.
CREATE SEQUENCE hookfleet.webhook_versions AS bigint;
-- Above every version in use, so no version handed out from here equals one a cache holds (a
-- deleted webhook's entry leaves every worker's cache within a sweep, 10 s).
SELECT setval('hookfleet.webhook_versions', greatest((SELECT max(version) FROM hookfleet.webhooks), 0) + 1, false);

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
DROP TRIGGER webhooks_bump_version ON hookfleet.webhooks;
CREATE TRIGGER webhooks_bump_version BEFORE INSERT OR UPDATE ON hookfleet.webhooks
    FOR EACH ROW EXECUTE FUNCTION hookfleet.webhooks_bump_version();
