//! The one current definition of each SQL function and view (`sql/functions`, `sql/views`), and
//! how `hookfleet migrate` applies them after the migrations (`sql/README.md`).
//!
//! Migrations are history: once released they never change, so a function that was redefined
//! four times had four definitions and a reader had to know which came last. The definitions are
//! the present: one file each, applied whenever it changes. What was applied is recorded in
//! `hookfleet.definition_history` (V0013) by file, checksum and the migration level at the time.

use std::collections::HashMap;

use ring::digest;

/// One file of database code, embedded in the binary.
#[derive(Debug, Clone, Copy)]
pub struct Definition {
    /// The path under `sql/`, which is also its key in `hookfleet.definition_history`.
    pub file: &'static str,
    pub sql: &'static str,
}

impl Definition {
    /// SHA-256 of the file's text, in hex.
    pub fn checksum(&self) -> String {
        checksum(self.sql)
    }
}

fn checksum(sql: &str) -> String {
    digest::digest(&digest::SHA256, sql.as_bytes()).as_ref().iter().map(|byte| format!("{byte:02x}")).collect()
}

macro_rules! definition {
    ($file:literal) => {
        Definition { file: $file, sql: include_str!(concat!("../../../sql/", $file)) }
    };
}

/// Every function and view, in the order they are applied: what a file's SQL-language functions
/// and views read must come before it (PL/pgSQL bodies are resolved only when they run).
pub const DEFINITIONS: &[Definition] = &[
    definition!("functions/max_body_bytes.sql"),
    definition!("functions/delivery_queue_checks.sql"),
    definition!("functions/notify_deliveries.sql"),
    definition!("functions/webhooks_bump_version.sql"),
    definition!("functions/webhooks_create_rows.sql"),
    definition!("functions/webhooks_lock_before_delete.sql"),
    definition!("functions/update_webhook_health.sql"),
    definition!("functions/claim_deliveries.sql"),
    definition!("functions/get_ready_deliveries.sql"),
    definition!("functions/sample_queue_depth.sql"),
    definition!("functions/count_pending_by_status.sql"),
    definition!("functions/replay_delivery.sql"),
    definition!("functions/cancel_delivery.sql"),
    definition!("functions/publish.sql"),
    definition!("views/v_webhook_health_dashboard.sql"),
    definition!("views/v_degraded_webhooks.sql"),
    definition!("views/v_webhook_performance.sql"),
    definition!("views/v_queue_depth.sql"),
    definition!("views/v_workers.sql"),
];

/// The functions and views hookfleet no longer has: dropped before the definitions are applied.
pub const RETIRED: Definition = definition!("retired.sql");

/// Applies every definition that differs from what the database records, in one transaction:
/// the retired objects dropped, the changed files applied, the history written. Runs under the
/// migration lock, after the migrations. Returns the files it applied, in order (empty when all
/// were current, or when a newer release applied them: an older release's migrate, run during a
/// rolling upgrade, must not put its older definitions back).
pub async fn apply(client: &mut tokio_postgres::Client) -> Result<Vec<String>, tokio_postgres::Error> {
    let transaction = client.transaction().await?;
    let level: i32 = transaction
        .query_one("SELECT COALESCE(max(version), 0) FROM hookfleet.refinery_schema_history", &[])
        .await?
        .get(0);
    let mut recorded: HashMap<String, (String, i32)> = HashMap::new();
    let mut newest_release: Option<String> = None;
    for row in transaction
        .query("SELECT file, checksum, migration_level, hookfleet_version FROM hookfleet.definition_history", &[])
        .await?
    {
        let release: String = row.get(3);
        if newer_release(&release, crate::VERSION)
            && newest_release.as_deref().is_none_or(|n| newer_release(&release, n))
        {
            newest_release = Some(release);
        }
        recorded.insert(row.get(0), (row.get(1), row.get(2)));
    }
    if let Some(release) = newest_release {
        tracing::warn!(
            "the database's functions and views were applied by hookfleet {release}, newer than this release ({}); \
             leaving them as they are",
            crate::VERSION
        );
        return Ok(Vec::new());
    }
    let current = |definition: &Definition| {
        recorded.get(definition.file).is_some_and(|(sum, at)| *sum == definition.checksum() && *at == level)
    };

    let mut applied = Vec::new();
    // A view defined as `SELECT *` from another is expanded when it is created, so once one view
    // is replaced every view after it is replaced too; functions are resolved when they run.
    let mut views_stale = false;
    for definition in std::iter::once(&RETIRED).chain(DEFINITIONS) {
        let is_view = definition.file.starts_with("views/");
        if current(definition) && !(is_view && views_stale) {
            continue;
        }
        views_stale |= is_view;
        transaction.batch_execute(definition.sql).await?;
        transaction
            .execute(
                "INSERT INTO hookfleet.definition_history (file, checksum, migration_level, hookfleet_version) \
                 VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (file) DO UPDATE SET checksum = EXCLUDED.checksum, \
                     migration_level = EXCLUDED.migration_level, hookfleet_version = EXCLUDED.hookfleet_version, \
                     applied_at = now()",
                &[&definition.file, &definition.checksum(), &level, &crate::VERSION],
            )
            .await?;
        applied.push(definition.file.to_owned());
    }
    let files: Vec<&str> = std::iter::once(&RETIRED).chain(DEFINITIONS).map(|definition| definition.file).collect();
    transaction.execute("DELETE FROM hookfleet.definition_history WHERE file <> ALL($1)", &[&files]).await?;
    transaction.commit().await?;
    Ok(applied)
}

/// Whether release `a` is newer than `b`, comparing the numeric `major.minor.patch` (a
/// pre-release suffix is ignored: builds of one version count as the same release).
fn newer_release(a: &str, b: &str) -> bool {
    fn parts(version: &str) -> [u64; 3] {
        let mut parts = [0; 3];
        for (slot, part) in parts.iter_mut().zip(version.split(['.', '-', '+'])) {
            *slot = part.parse().unwrap_or(0);
        }
        parts
    }
    parts(a) > parts(b)
}

/// Whether the database's definitions were applied at its current migration level: a `migrate`
/// whose migrations committed but whose definitions did not (interrupted between the two) left
/// the functions of an older schema in place.
pub(crate) async fn pending(client: &tokio_postgres::Client) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT to_regclass('hookfleet.definition_history') IS NULL \
                 OR COALESCE((SELECT min(migration_level) FROM hookfleet.definition_history), -1) \
                    < (SELECT max(version) FROM hookfleet.refinery_schema_history)",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sql_dir() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sql")
    }

    #[test]
    fn every_definition_file_is_listed_once() {
        let mut on_disk = Vec::new();
        for dir in ["functions", "views"] {
            for entry in std::fs::read_dir(sql_dir().join(dir)).expect("sql directory") {
                let name = entry.expect("entry").file_name().into_string().expect("utf-8 name");
                on_disk.push(format!("{dir}/{name}"));
            }
        }
        on_disk.sort();
        let mut listed: Vec<String> = DEFINITIONS.iter().map(|definition| definition.file.to_owned()).collect();
        listed.sort();
        assert_eq!(listed, on_disk, "sql/functions and sql/views must match DEFINITIONS, each once");
    }

    /// A definition file may only replace what it defines and comment on it: anything else (a
    /// table change, a DROP, data) belongs in a migration, which runs once, in order.
    #[test]
    fn definitions_only_replace_and_retired_only_drops() {
        for definition in DEFINITIONS {
            for statement in statements(definition.sql) {
                let upper = statement.to_ascii_uppercase();
                assert!(
                    upper.starts_with("CREATE OR REPLACE FUNCTION HOOKFLEET.")
                        || upper.starts_with("CREATE OR REPLACE VIEW HOOKFLEET.")
                        || upper.starts_with("COMMENT ON FUNCTION HOOKFLEET.")
                        || upper.starts_with("COMMENT ON VIEW HOOKFLEET."),
                    "{}: not a definition: {}",
                    definition.file,
                    statement.lines().next().unwrap_or_default()
                );
            }
        }
        for statement in statements(RETIRED.sql) {
            let upper = statement.to_ascii_uppercase();
            assert!(
                upper.starts_with("DROP FUNCTION IF EXISTS HOOKFLEET.")
                    || upper.starts_with("DROP VIEW IF EXISTS HOOKFLEET."),
                "retired.sql: not a drop: {statement}"
            );
        }
    }

    /// The file's top-level statements, without comments: split at semicolons outside comments,
    /// quotes and dollar-quoted bodies (enough for these files, which the database parses anyway).
    fn statements(sql: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut current = String::new();
        let mut rest = sql;
        while let Some(c) = rest.chars().next() {
            if rest.starts_with("--") {
                rest = rest.find('\n').map_or("", |end| &rest[end..]);
                continue;
            }
            if c == '$' {
                if let Some(close) = rest[1..].find('$') {
                    let tag = &rest[..close + 2];
                    if tag[1..tag.len() - 1].chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                        let end = rest[tag.len()..].find(tag).expect("closed dollar quote") + 2 * tag.len();
                        current.push_str(&rest[..end]);
                        rest = &rest[end..];
                        continue;
                    }
                }
            }
            if c == '\'' {
                let mut end = 1;
                loop {
                    end += rest[end..].find('\'').expect("closed quote") + 1;
                    if !rest[end..].starts_with('\'') {
                        break;
                    }
                    end += 1;
                }
                current.push_str(&rest[..end]);
                rest = &rest[end..];
                continue;
            }
            if c == ';' {
                out.push(current.trim().to_owned());
                current.clear();
            } else {
                current.push(c);
            }
            rest = &rest[c.len_utf8()..];
        }
        assert!(current.trim().is_empty(), "text after the last statement: {current}");
        out.into_iter().filter(|statement| !statement.is_empty()).collect()
    }

    #[test]
    fn releases_compare_by_number() {
        assert!(newer_release("0.2.0", "0.1.9"));
        assert!(newer_release("0.10.0", "0.9.0"));
        assert!(newer_release("1.0.0", "0.99.99"));
        assert!(!newer_release("0.1.0", "0.1.0"));
        assert!(!newer_release("0.1.0-rc.1", "0.1.0"));
        assert!(!newer_release("0.1.0", "0.2.0"));
    }

    #[test]
    fn the_checksum_is_sha256_of_the_text() {
        assert_eq!(checksum("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
