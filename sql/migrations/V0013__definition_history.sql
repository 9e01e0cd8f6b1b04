-- Functions and views now live in sql/functions and sql/views, one current definition each, and
-- `hookfleet migrate` applies them after the migrations (see sql/README.md). This table records
-- what it applied: a file is applied again when its checksum changes, and every file is applied
-- again after a new migration (which may have dropped or replaced an object a file defines). The
-- release that applied it is kept so that an older release's migrate, run during a rolling
-- upgrade, never puts its older definitions back.
-- Append-only: never edit this file once released; add a new numbered migration instead.

CREATE TABLE hookfleet.definition_history (
    file              text PRIMARY KEY,
    checksum          text NOT NULL,
    migration_level   integer NOT NULL,
    hookfleet_version text NOT NULL,
    applied_at        timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE hookfleet.definition_history IS
    'The function and view files (sql/functions, sql/views) hookfleet migrate applied: SHA-256 of each, the newest migration at the time and the release that applied it';
