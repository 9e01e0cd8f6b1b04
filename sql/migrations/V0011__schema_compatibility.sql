-- Which binaries may run against this schema (README "Upgrading"; crates/core/src/schema.rs).
-- Every binary from this release on refuses, at start-up, a database that lacks one of its own
-- migrations. A database with migrations newer than a binary's is accepted while the binary's
-- newest migration is at least this value: so a rolling upgrade (migrate, then roll the fleet)
-- keeps old workers running. A later migration that older binaries cannot work with raises it
-- in the same file: UPDATE hookfleet.settings SET value = '<its version>' WHERE name = 'oldest_compatible_migration';
-- Append-only: never edit this file once released; add a new numbered migration instead.

INSERT INTO hookfleet.settings (name, value) VALUES ('oldest_compatible_migration', '11');
COMMENT ON TABLE hookfleet.settings IS 'What the database holds for itself: limits it enforces (max_body_bytes, written by hookfleet migrate from HOOKFLEET_MAX_BODY_BYTES) and the oldest schema level a binary may have to run against it (oldest_compatible_migration, written by migrations)';
