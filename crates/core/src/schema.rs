//! Whether this binary may run against a database's hookfleet schema: the start-up check every
//! binary makes before it touches a table (the worker, and each `hookfleet` command that reads or
//! writes hookfleet's tables).
//!
//! Without it a worker started on a database nobody migrated logs a failed claim every 200 ms
//! forever, and one started on a schema changed under it fails in ways that say nothing about
//! versions. The check compares the migrations embedded in this binary (`sql/migrations/V*.sql`) with the
//! ones the database records in `hookfleet.refinery_schema_history`:
//!
//! - no `hookfleet` schema or no history: never migrated, refused (run `hookfleet migrate`);
//! - one of our migrations not applied: the database is behind, refused (run this release's
//!   `hookfleet migrate` first);
//! - a migration of the same number with another name or checksum, or an unknown one below our
//!   newest: another hookfleet build migrated it, refused;
//! - every migration, but the function and view definitions not applied at that level (a migrate
//!   interrupted between its two steps): refused (run `hookfleet migrate` again);
//! - migrations newer than ours: the rolling-upgrade case (migrate first, then roll the fleet).
//!   Allowed, with a warning, as long as our newest migration is at least the
//!   `oldest_compatible_migration` the database records in `hookfleet.settings`; refused below it.
//!   A migration that older binaries cannot work with raises that value in the same file
//!   (`UPDATE hookfleet.settings SET value = '<its version>' WHERE name = 'oldest_compatible_migration'`),
//!   so old binaries learn it from the database they meet, not from code they never had.
//!
//! A worker may start together with its database (compose, a node reboot), so the first connection
//! is retried for a bounded while; the CLI, run by a person, tries once.

use std::time::{Duration, Instant};

use crate::db::{self, DbError};

/// The row of `hookfleet.settings` holding the oldest schema level that may still run.
pub const OLDEST_COMPATIBLE_SETTING: &str = "oldest_compatible_migration";

/// Why a binary refuses to start against a database.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error(
        "the database {database} has no hookfleet schema: run `hookfleet migrate` with the same DATABASE_URL \
         to create it, then start {binary} again"
    )]
    NotMigrated { binary: &'static str, database: String },
    #[error(
        "the database {database} has a hookfleet schema but no record of its migrations in {}: \
         if `hookfleet migrate` never finished there, run it (with the same DATABASE_URL); if the history \
         was removed, restore it from a backup",
        db::HISTORY_TABLE
    )]
    NoHistory { database: String },
    #[error(
        "the hookfleet schema in the database {database} was migrated by an earlier release (its history is \
         still in public.refinery_schema_history): run `hookfleet migrate` from this release (hookfleet {}) \
         before starting {binary}",
        crate::VERSION
    )]
    LegacyHistory { binary: &'static str, database: String },
    #[error(
        "the hookfleet schema in the database {database} is older than this {binary} ({}) needs: {} not applied; \
         run `hookfleet migrate` from this release first (migrate before rolling out new binaries)",
        crate::VERSION, .missing.join(", ")
    )]
    Behind { binary: &'static str, database: String, missing: Vec<String> },
    #[error(
        "migration V{version:04} in the database {database} is {recorded}, but this {binary} ({}) has {ours}: \
         a different hookfleet build migrated this database; run binaries of that build against it, or this \
         build against a database it migrated",
        crate::VERSION
    )]
    Divergent { binary: &'static str, database: String, version: i32, recorded: String, ours: String },
    #[error(
        "the database {database} was migrated by a newer hookfleet (schema V{database_level:04}) that binaries \
         before schema V{oldest_compatible:04} cannot work with, and this {binary} ({}) has schema V{ours:04}: \
         run {binary} from the release that ran `hookfleet migrate`",
        crate::VERSION
    )]
    TooOld { binary: &'static str, database: String, ours: i32, database_level: i32, oldest_compatible: i32 },
    #[error(
        "the database {database} was migrated by a newer hookfleet (schema V{database_level:04}), and \
         hookfleet.settings has no valid {OLDEST_COMPATIBLE_SETTING} ({found}) to say whether this {binary} \
         (schema V{ours:04}) may run against it: run {binary} from the release that ran `hookfleet migrate`"
    )]
    UnknownCompatibility { binary: &'static str, database: String, ours: i32, database_level: i32, found: String },
    #[error(
        "the database {database} has every migration, but its functions and views were not applied at that \
         schema level (a `hookfleet migrate` was interrupted between the two steps): run `hookfleet migrate` \
         again, then start {binary}"
    )]
    DefinitionsPending { binary: &'static str, database: String },
    #[error("cannot connect to the database (check DATABASE_URL): {0}")]
    Connect(DbError),
    #[error(
        "cannot reach the database after trying for {}: {error}; check that PostgreSQL is running and that \
         DATABASE_URL points at it",
        humantime::format_duration(*.waited)
    )]
    Unreachable { waited: Duration, error: String },
    #[error("cannot read the hookfleet schema's migration history: {}", db::describe(.0))]
    Query(#[from] tokio_postgres::Error),
}

/// How the database's schema stands to this binary's, when it may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compatibility {
    /// The database has exactly this binary's migrations.
    Current { level: i32 },
    /// The database has newer migrations that declare this binary still compatible.
    Newer { ours: i32, database_level: i32, oldest_compatible: i32 },
}

/// One migration, as the database records it or as this binary embeds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Migration {
    pub version: i32,
    pub name: String,
    pub checksum: String,
}

impl Migration {
    /// The way the file is named in `sql/`, so an operator can find it.
    fn label(&self) -> String {
        format!("V{:04}__{}", self.version, self.name)
    }
}

/// Where the database stands once every migration it records was matched with ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Standing {
    Current,
    Ahead { database_level: i32 },
}

/// The migrations embedded in this binary, by version.
fn embedded() -> Vec<Migration> {
    let mut migrations: Vec<Migration> = db::embedded_migrations()
        .iter()
        .map(|migration| Migration {
            version: migration.version(),
            name: migration.name().to_owned(),
            checksum: migration.checksum().to_string(),
        })
        .collect();
    migrations.sort_by_key(|migration| migration.version);
    migrations
}

/// The newest migration this binary embeds: its schema level.
pub fn level() -> i32 {
    embedded().last().map_or(0, |migration| migration.version)
}

/// Connects (retrying a database that is not up yet for up to `patience`) and checks the schema;
/// the checked connection, for callers that go on using it.
pub async fn connect_checked(
    url: &str,
    binary: &'static str,
    patience: Duration,
) -> Result<tokio_postgres::Client, SchemaError> {
    let client = connect_patiently(url, binary, patience).await?;
    check(&client, binary).await?;
    Ok(client)
}

async fn connect_patiently(
    url: &str,
    binary: &'static str,
    patience: Duration,
) -> Result<tokio_postgres::Client, SchemaError> {
    let started = Instant::now();
    let mut delay = Duration::from_millis(200);
    loop {
        let error = match db::connect(url, binary).await {
            Ok(client) => return Ok(client),
            Err(DbError::Postgres(error)) if patience > Duration::ZERO && transient(&error) => error,
            Err(error) => return Err(SchemaError::Connect(error)),
        };
        let waited = started.elapsed();
        if waited + delay > patience {
            return Err(SchemaError::Unreachable { waited, error: db::describe(&error) });
        }
        tracing::warn!(
            "cannot reach the database yet ({}); trying again for up to {} more",
            db::describe(&error),
            humantime::format_duration(Duration::from_secs((patience - waited).as_secs()))
        );
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Whether a failed connection may succeed by itself shortly: no answer at all (refused, timed
/// out, reset), a server starting up or shutting down, or one out of connection slots. A wrong
/// password or a database that does not exist will not fix itself, so those end start-up at once.
fn transient(error: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    match error.code() {
        None => true,
        Some(code) => {
            code.code().starts_with("08")
                || *code == SqlState::CANNOT_CONNECT_NOW
                || *code == SqlState::TOO_MANY_CONNECTIONS
        }
    }
}

/// Checks the database's schema against this binary's migrations; logs a warning when the
/// database is ahead but still compatible.
pub async fn check(client: &tokio_postgres::Client, binary: &'static str) -> Result<Compatibility, SchemaError> {
    // The catalog by qualified names: an unqualified name would resolve through `search_path`.
    let row = client
        .query_one(
            "SELECT format('%I (as user %I)', current_database(), current_user), \
                    to_regnamespace('hookfleet') IS NOT NULL, \
                    to_regclass('hookfleet.refinery_schema_history') IS NOT NULL, \
                    to_regclass('public.refinery_schema_history') IS NOT NULL",
            &[],
        )
        .await?;
    let (database, schema, history, legacy_history): (String, bool, bool, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    if !schema {
        return Err(SchemaError::NotMigrated { binary, database });
    }
    let recorded: Vec<Migration> = if history {
        client
            .query("SELECT version, name, checksum FROM hookfleet.refinery_schema_history ORDER BY version", &[])
            .await?
            .iter()
            .map(|row| Migration { version: row.get(0), name: row.get(1), checksum: row.get(2) })
            .collect()
    } else {
        Vec::new()
    };
    if recorded.is_empty() {
        return Err(if legacy_history {
            SchemaError::LegacyHistory { binary, database }
        } else {
            SchemaError::NoHistory { database }
        });
    }
    let ours = embedded();
    let level = ours.last().map_or(0, |migration| migration.version);
    let database_level = match compare(&recorded, &ours, binary, &database)? {
        // Only at our own level: definitions a newer release has yet to finish applying are the
        // older ones, which this binary works with.
        Standing::Current if crate::definitions::pending(client).await? => {
            return Err(SchemaError::DefinitionsPending { binary, database })
        }
        Standing::Current => return Ok(Compatibility::Current { level }),
        Standing::Ahead { database_level } => database_level,
    };
    let floor: Option<String> = client
        .query_opt("SELECT value FROM hookfleet.settings WHERE name = $1", &[&OLDEST_COMPATIBLE_SETTING])
        .await?
        .map(|row| row.get(0));
    let compatibility = judge_newer(level, database_level, floor.as_deref(), binary, &database)?;
    tracing::warn!(
        "the database's hookfleet schema (V{database_level:04}) is newer than this {binary}'s (V{level:04}, {}); \
         it accepts binaries from schema V{:04} on, so {binary} runs, but upgrade it to the release that migrated \
         the database",
        crate::VERSION,
        match compatibility {
            Compatibility::Newer { oldest_compatible, .. } => oldest_compatible,
            Compatibility::Current { level } => level,
        }
    );
    Ok(compatibility)
}

/// Matches every migration the database records with ours (both sorted by version).
pub(crate) fn compare(
    recorded: &[Migration],
    ours: &[Migration],
    binary: &'static str,
    database: &str,
) -> Result<Standing, SchemaError> {
    let level = ours.last().map_or(0, |migration| migration.version);
    for migration in recorded.iter().filter(|migration| migration.version <= level) {
        let mine = ours.iter().find(|mine| mine.version == migration.version);
        if mine != Some(migration) {
            return Err(SchemaError::Divergent {
                binary,
                database: database.to_owned(),
                version: migration.version,
                recorded: format!("{} (checksum {})", migration.label(), migration.checksum),
                ours: mine.map_or_else(
                    || "no migration of that number".to_owned(),
                    |mine| format!("{} (checksum {})", mine.label(), mine.checksum),
                ),
            });
        }
    }
    let missing: Vec<String> = ours
        .iter()
        .filter(|mine| !recorded.iter().any(|migration| migration.version == mine.version))
        .map(Migration::label)
        .collect();
    if !missing.is_empty() {
        return Err(SchemaError::Behind { binary, database: database.to_owned(), missing });
    }
    match recorded.last().map_or(0, |migration| migration.version) {
        newest if newest > level => Ok(Standing::Ahead { database_level: newest }),
        _ => Ok(Standing::Current),
    }
}

/// Whether a binary at schema `ours` may run against a database at `database_level` whose
/// recorded floor is `floor`.
pub(crate) fn judge_newer(
    ours: i32,
    database_level: i32,
    floor: Option<&str>,
    binary: &'static str,
    database: &str,
) -> Result<Compatibility, SchemaError> {
    let oldest_compatible = match floor.map(|value| value.trim().parse::<i32>()) {
        Some(Ok(oldest_compatible)) => oldest_compatible,
        // Refused rather than guessed: the database says nothing about binaries older than it.
        _ => {
            return Err(SchemaError::UnknownCompatibility {
                binary,
                database: database.to_owned(),
                ours,
                database_level,
                found: floor.map_or_else(|| "no such row".to_owned(), |value| format!("{value:?}")),
            })
        }
    };
    if ours < oldest_compatible {
        return Err(SchemaError::TooOld {
            binary,
            database: database.to_owned(),
            ours,
            database_level,
            oldest_compatible,
        });
    }
    Ok(Compatibility::Newer { ours, database_level, oldest_compatible })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn migration(version: i32, name: &str, checksum: &str) -> Migration {
        Migration { version, name: name.into(), checksum: checksum.into() }
    }

    fn ours() -> Vec<Migration> {
        vec![migration(1, "schema", "11"), migration(2, "functions", "22")]
    }

    #[test]
    fn the_embedded_migrations_are_this_trees_sql_files() {
        let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../../sql/migrations"))
            .expect("sql directory")
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .filter(|name| name.starts_with('V') && name.ends_with(".sql"))
            .count();
        assert_eq!(embedded().len(), files);
        assert_eq!(embedded().last().map(|migration| migration.version), Some(level()));
    }

    #[test]
    fn the_same_migrations_are_current() {
        assert_eq!(compare(&ours(), &ours(), "w", "d").expect("current"), Standing::Current);
    }

    #[test]
    fn a_missing_migration_is_behind_and_named_like_its_file() {
        let error = compare(&ours()[..1], &ours(), "w", "d").expect_err("behind");
        assert!(matches!(&error, SchemaError::Behind { missing, .. } if missing == &["V0002__functions"]), "{error}");
        assert!(error.to_string().contains("run `hookfleet migrate` from this release"), "{error}");
    }

    #[test]
    fn another_checksum_or_name_or_an_unknown_older_migration_is_another_build() {
        for recorded in [
            vec![migration(1, "schema", "99"), migration(2, "functions", "22")],
            vec![migration(1, "schema", "11"), migration(2, "other", "22")],
            vec![migration(1, "schema", "11"), migration(2, "functions", "22")]
                .into_iter()
                .chain([migration(0, "branch", "7")])
                .collect(),
        ] {
            let mut recorded = recorded;
            recorded.sort_by_key(|migration| migration.version);
            let error = compare(&recorded, &ours(), "w", "d").expect_err("divergent");
            assert!(matches!(error, SchemaError::Divergent { .. }), "{error}");
            assert!(error.to_string().contains("a different hookfleet build"), "{error}");
        }
    }

    #[test]
    fn newer_migrations_are_ahead() {
        let mut recorded = ours();
        recorded.push(migration(3, "future", "33"));
        assert_eq!(compare(&recorded, &ours(), "w", "d").expect("ahead"), Standing::Ahead { database_level: 3 });
    }

    #[test]
    fn a_newer_schema_runs_binaries_from_its_floor_on_and_refuses_older_ones() {
        assert_eq!(
            judge_newer(11, 13, Some("11"), "w", "d").expect("compatible"),
            Compatibility::Newer { ours: 11, database_level: 13, oldest_compatible: 11 }
        );
        assert!(judge_newer(12, 13, Some("11"), "w", "d").is_ok());
        let error = judge_newer(11, 13, Some("13"), "w", "d").expect_err("too old");
        assert!(matches!(error, SchemaError::TooOld { oldest_compatible: 13, .. }), "{error}");
        for floor in [None, Some("eleven")] {
            let error = judge_newer(11, 13, floor, "w", "d").expect_err("unknown");
            assert!(matches!(error, SchemaError::UnknownCompatibility { .. }), "{error}");
        }
    }
}
