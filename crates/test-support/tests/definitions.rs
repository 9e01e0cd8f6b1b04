//! The function and view definitions (`sql/functions`, `sql/views`, `crates/core/src/definitions.rs`):
//! databases migrated by earlier releases end with exactly the catalog a new database has, the
//! schema holds exactly what the files define, a changed file is applied again and an unchanged one
//! never, and a migrate interrupted between its two steps changes nothing and is finished by the next.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use hookfleet_core::definitions::DEFINITIONS;
use hookfleet_core::schema::SchemaError;
use hookfleet_test_support::{database, empty_database};
use tokio_postgres::{Client, NoTls};

async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(connection);
    client
}

async fn migrate(client: &mut Client) -> hookfleet_core::db::MigrationReport {
    hookfleet_core::db::migrate(client, 262_144).await.expect("migrate")
}

/// Every function (with its full definition and comment), view, trigger and index of schema `hookfleet`:
/// what a database's behaviour is made of, beyond its tables.
async fn catalog(client: &Client) -> BTreeMap<String, String> {
    client
        .query(
            "SELECT 'function ' || p.oid::regprocedure::text, \
                    pg_get_functiondef(p.oid) || E'\\n-- comment: ' || COALESCE(obj_description(p.oid, 'pg_proc'), '') \
             FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'hookfleet' \
             UNION ALL \
             SELECT 'view ' || c.relname, \
                    pg_get_viewdef(c.oid) || E'\\n-- comment: ' || COALESCE(obj_description(c.oid, 'pg_class'), '') \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = 'hookfleet' AND c.relkind = 'v' \
             UNION ALL \
             SELECT 'trigger ' || t.tgname, pg_get_triggerdef(t.oid) FROM pg_trigger t \
             JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = 'hookfleet' AND NOT t.tgisinternal \
             UNION ALL \
             SELECT 'index ' || indexname, indexdef || E'\\n-- comment: ' \
                    || COALESCE(obj_description(to_regclass('hookfleet.' || indexname), 'pg_class'), '') \
             FROM pg_indexes WHERE schemaname = 'hookfleet' \
             UNION ALL \
             SELECT 'recorded ' || file, checksum || ' at V' || migration_level FROM hookfleet.definition_history",
            &[],
        )
        .await
        .expect("catalog")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// The migrations of this tree up to `level`, applied as the release at that level applied them:
/// by refinery alone, functions and views created by the migrations themselves.
async fn migrate_as_release(client: &mut Client, level: i32) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../sql/migrations");
    let mut migrations = Vec::new();
    for entry in std::fs::read_dir(dir).expect("sql/migrations") {
        let path = entry.expect("entry").path();
        let name = path.file_stem().and_then(|stem| stem.to_str()).expect("file name").to_owned();
        let (version, _) = name.strip_prefix('V').and_then(|rest| rest.split_once("__")).expect("V<n>__<name>");
        if version.parse::<i32>().expect("version") <= level {
            let sql = std::fs::read_to_string(&path).expect("migration");
            migrations.push(refinery::Migration::unapplied(&name, &sql).expect("migration"));
        }
    }
    assert_eq!(migrations.len(), level as usize);
    let mut runner = refinery::Runner::new(&migrations);
    runner.set_migration_table_name("hookfleet.refinery_schema_history");
    client.batch_execute("CREATE SCHEMA IF NOT EXISTS hookfleet").await.expect("schema");
    runner.run_async(client).await.expect("the earlier release's migrations");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn databases_migrated_by_earlier_releases_end_with_the_catalog_of_a_new_one() {
    let fresh = empty_database().await;
    let mut client = connect(&fresh.url).await;
    migrate(&mut client).await;
    let expected = catalog(&client).await;
    assert!(expected.keys().any(|key| key == "function hookfleet.claim_deliveries(text,integer,interval,double precision,integer,integer,bigint[],integer[])"));

    // Every schema level a database can be at, from the first release on: each upgraded by this
    // release's migrate. The definitions in the migrations differ from the files at most levels.
    let newest = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../../sql/migrations"))
        .expect("sql/migrations")
        .filter_map(|entry| {
            let name = entry.expect("entry").file_name().into_string().ok()?;
            name.strip_prefix('V')?.split_once("__")?.0.parse::<i32>().ok()
        })
        .max()
        .expect("migrations");
    for level in 1..newest {
        let old = empty_database().await;
        let mut client = connect(&old.url).await;
        migrate_as_release(&mut client, level).await;
        let report = migrate(&mut client).await;
        assert_eq!(report.applied.len(), (newest - level) as usize, "level {level}: {report:?}");
        assert_eq!(report.definitions.len(), DEFINITIONS.len() + 1, "level {level}: every file applied");
        let upgraded = catalog(&client).await;
        for (key, definition) in &expected {
            assert_eq!(upgraded.get(key), Some(definition), "level {level}: {key} differs after the upgrade");
        }
        let extra: Vec<&String> = upgraded.keys().filter(|key| !expected.contains_key(*key)).collect();
        assert!(extra.is_empty(), "level {level}: objects a new database does not have: {extra:?}");
        hookfleet_core::schema::check(&client, "hookfleet").await.expect("the upgraded schema is current");
    }
}

/// The names a file defines: `CREATE OR REPLACE FUNCTION|VIEW hookfleet.<name>`.
fn defined_names() -> BTreeSet<(String, String)> {
    let mut names = BTreeSet::new();
    for definition in DEFINITIONS {
        for line in definition.sql.lines() {
            for kind in ["FUNCTION", "VIEW"] {
                if let Some(rest) = line.strip_prefix(&format!("CREATE OR REPLACE {kind} hookfleet.")) {
                    let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                    assert!(
                        names.insert((kind.to_lowercase(), name.clone())),
                        "{name} is defined twice ({})",
                        definition.file
                    );
                }
            }
        }
    }
    names
}

#[tokio::test]
async fn the_schema_holds_exactly_what_the_files_define_once_each() {
    let db = database().await;
    let client = db.client().await;
    let in_schema: Vec<(String, String)> = client
        .query(
            "SELECT 'function', p.proname::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
             WHERE n.nspname = 'hookfleet' \
             UNION ALL \
             SELECT 'view', c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = 'hookfleet' AND c.relkind = 'v'",
            &[],
        )
        .await
        .expect("functions and views")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let unique: BTreeSet<(String, String)> = in_schema.iter().cloned().collect();
    assert_eq!(unique.len(), in_schema.len(), "an overload or a second definition: {in_schema:?}");
    assert_eq!(unique, defined_names(), "the schema's functions and views are exactly the files'");
}

/// `xmin` of every hookfleet function and view: changes whenever one is created or replaced.
async fn versions(client: &Client) -> BTreeMap<String, String> {
    client
        .query(
            "SELECT p.proname::text, p.xmin::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
             WHERE n.nspname = 'hookfleet' \
             UNION ALL \
             SELECT c.relname::text, r.xmin::text FROM pg_rewrite r JOIN pg_class c ON c.oid = r.ev_class \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'hookfleet' AND c.relkind = 'v'",
            &[],
        )
        .await
        .expect("versions")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

#[tokio::test]
async fn a_changed_definition_is_applied_again_and_an_unchanged_one_never() {
    let db = database().await;
    let mut client = db.client().await;
    let original = catalog(&client).await;

    // An operator's hot fix at a psql prompt, or a file this release changed: the recorded
    // checksum no longer matches the file.
    client
        .batch_execute(
            "CREATE OR REPLACE FUNCTION hookfleet.count_pending_by_status() \
                 RETURNS TABLE (delivery_status text, deliveries bigint) LANGUAGE sql STABLE AS $$ SELECT 'x', 0::bigint $$; \
             UPDATE hookfleet.definition_history SET checksum = 'changed' \
                 WHERE file IN ('functions/count_pending_by_status.sql', 'views/v_webhook_performance.sql')",
        )
        .await
        .expect("change two definitions");
    let before = versions(&client).await;
    let report = migrate(&mut client).await;
    assert!(report.applied.is_empty(), "{report:?}");
    // A view is replaced with every view after it (a `SELECT *` view is expanded when created).
    assert_eq!(
        report.definitions,
        [
            "functions/count_pending_by_status.sql",
            "views/v_webhook_performance.sql",
            "views/v_queue_depth.sql",
            "views/v_workers.sql"
        ]
    );
    assert_eq!(catalog(&client).await, original, "the files' definitions are back, recorded as before");
    let after = versions(&client).await;
    let replaced: BTreeSet<&str> =
        before.iter().filter(|(name, xmin)| after.get(*name) != Some(xmin)).map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        replaced,
        BTreeSet::from(["count_pending_by_status", "v_webhook_performance", "v_queue_depth", "v_workers"])
    );

    let again = migrate(&mut client).await;
    assert!(again.applied.is_empty() && again.definitions.is_empty(), "{again:?}");
    assert_eq!(versions(&client).await, after, "an unchanged definition is never replaced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_migrate_changes_nothing_and_the_next_one_finishes_it() {
    let db = database().await;
    let mut client = db.client().await;
    let original = catalog(&client).await;
    // The state a migrate leaves when it is stopped after the migrations committed and before the
    // definitions did: every file recorded at an older schema level.
    client
        .batch_execute(
            "UPDATE hookfleet.definition_history SET migration_level = migration_level - 1; \
             CREATE OR REPLACE FUNCTION hookfleet.max_body_bytes() RETURNS integer LANGUAGE sql STABLE AS $$ SELECT 1 $$",
        )
        .await
        .expect("an interrupted migrate");
    match hookfleet_core::schema::check(&client, "hookfleet-worker").await {
        Err(error @ SchemaError::DefinitionsPending { .. }) => {
            assert!(error.to_string().contains("run `hookfleet migrate` again"), "{error}")
        }
        other => panic!("a worker must refuse a schema whose definitions are pending: {other:?}"),
    }

    // The next migrate is stopped too, by an operator's psql session reading a view in an open
    // transaction, and gives up after its lock timeout: nothing it applied before the view stays.
    let operator = db.client().await;
    operator.batch_execute("BEGIN; LOCK TABLE hookfleet.v_workers IN ACCESS SHARE MODE").await.expect("hold the view");
    let mut second = db.client().await;
    second.batch_execute("SET lock_timeout = '300ms'").await.expect("lock timeout");
    let error = hookfleet_core::db::migrate(&mut second, 262_144).await.expect_err("the view is held");
    assert!(error.to_string().contains("lock"), "{error}");
    let levels: Vec<i32> = client
        .query("SELECT DISTINCT migration_level FROM hookfleet.definition_history", &[])
        .await
        .expect("levels")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(levels.len(), 1, "all files still recorded at the old level: {levels:?}");
    assert_eq!(db.count("SELECT hookfleet.max_body_bytes()::bigint").await, 1, "rolled back");

    operator.batch_execute("ROLLBACK").await.expect("release the view");
    let report = tokio::time::timeout(Duration::from_secs(60), migrate(&mut client)).await.expect("migrate");
    assert_eq!(report.definitions.len(), DEFINITIONS.len() + 1, "{report:?}");
    assert_eq!(catalog(&client).await, original);
    hookfleet_core::schema::check(&client, "hookfleet-worker").await.expect("current again");
}
