//! The `hookfleet` command line, run as a real process against test databases.

use std::collections::HashMap;
use std::process::{Command, Output};
use std::time::Duration;

use hookfleet_core::config::Config;
use hookfleet_test_support::{cluster, database, empty_database, TestDatabase};

fn hookfleet(env: &HashMap<String, String>, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hookfleet"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env)
        .args(args)
        .output()
        .expect("run hookfleet")
}

/// `hookfleet` with `input` on its standard input.
fn hookfleet_with_stdin(env: &HashMap<String, String>, args: &[&str], input: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_hookfleet"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run hookfleet");
    child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("write stdin");
    child.wait_with_output().expect("hookfleet output")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn ok(output: Output) -> String {
    assert!(output.status.success(), "hookfleet failed: {}{}", stdout(&output), stderr(&output));
    stdout(&output)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_is_idempotent_and_safe_when_run_concurrently() {
    let db = empty_database().await;
    let mut env = db.env();
    env.insert("HOOKFLEET_MAX_BODY_BYTES".into(), "1000".into());
    let runs: Vec<_> = (0..3)
        .map(|_| {
            let env = env.clone();
            std::thread::spawn(move || hookfleet(&env, &["migrate"]))
        })
        .collect();
    let outputs: Vec<String> = runs.into_iter().map(|run| ok(run.join().expect("thread"))).collect();
    let applied = outputs.iter().filter(|output| output.starts_with("applied")).count();
    assert_eq!(applied, 1, "exactly one concurrent run applies the migrations: {outputs:?}");
    assert!(ok(hookfleet(&env, &["migrate"])).contains("schema is up to date"));
    let limit: String = db
        .client()
        .await
        .query_one("SELECT value FROM hookfleet.settings WHERE name = 'max_body_bytes'", &[])
        .await
        .expect("setting")
        .get(0);
    assert_eq!(limit, "1000", "migrate writes HOOKFLEET_MAX_BODY_BYTES into the database");
    // The schema's own tables; refinery's history lives beside them (checked separately).
    assert_eq!(
        db.count(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'hookfleet' AND tablename <> 'refinery_schema_history'"
        )
        .await,
        10
    );
    assert_history_recorded_once_in_the_hookfleet_schema(&db).await;
}

/// The versions of the embedded migrations (`sql/migrations/V*.sql`), ascending.
fn migration_versions() -> Vec<i32> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../sql/migrations");
    let mut versions: Vec<i32> = std::fs::read_dir(dir)
        .expect("sql directory")
        .filter_map(|entry| {
            let name = entry.expect("sql entry").file_name().into_string().ok()?;
            let (version, _) = name.strip_prefix('V')?.split_once("__")?;
            version.parse().ok()
        })
        .collect();
    versions.sort_unstable();
    versions
}

/// The migration history exists exactly once, at `hookfleet.refinery_schema_history`, and records
/// every embedded migration once.
async fn assert_history_recorded_once_in_the_hookfleet_schema(db: &TestDatabase) {
    let client = db.client().await;
    let places: Vec<String> = client
        .query(
            "SELECT n.nspname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relname = 'refinery_schema_history' ORDER BY 1",
            &[],
        )
        .await
        .expect("history tables")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(places, ["hookfleet"], "the history lives in one place");
    let versions: Vec<i32> = client
        .query("SELECT version FROM hookfleet.refinery_schema_history ORDER BY version", &[])
        .await
        .expect("history")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(versions, migration_versions(), "every migration is recorded once");
}

/// The README's setup: an empty database owned by a login role named `hookfleet` that is not a
/// superuser. Returns the database (its `client()` and `count()` connect as the superuser, for
/// checks) and the environment that runs `hookfleet` as the `hookfleet` role, whose default
/// `search_path` (`"$user", public`) finds the `hookfleet` schema once it exists. `None` (the
/// test says so and passes) against `HOOKFLEET_TEST_DATABASE_URL`, where we cannot know how the
/// new role would authenticate; the embedded server trusts every local role.
async fn database_owned_by_hookfleet(test: &str) -> Option<(TestDatabase, HashMap<String, String>)> {
    if cluster().embedded().is_none() {
        eprintln!(
            "{test}: skipped, HOOKFLEET_TEST_DATABASE_URL names a server where the hookfleet role may not log in"
        );
        return None;
    }
    let db = empty_database().await;
    let admin = db.client().await;
    // Roles are cluster-wide and this binary's tests run in parallel: create it once, whoever
    // comes first (a concurrent CREATE ROLE can fail either way).
    admin
        .batch_execute(
            "DO $$ BEGIN CREATE ROLE hookfleet LOGIN NOSUPERUSER; \
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$",
        )
        .await
        .expect("create role hookfleet");
    admin
        .batch_execute(&format!("ALTER DATABASE {} OWNER TO hookfleet", db.name))
        .await
        .expect("hand the database over");
    let superuser: bool =
        admin.query_one("SELECT rolsuper FROM pg_roles WHERE rolname = 'hookfleet'", &[]).await.expect("role").get(0);
    assert!(!superuser, "the hookfleet role must not be a superuser");
    let mut env = db.env();
    // Later key=value pairs override earlier ones.
    env.insert("DATABASE_URL".into(), format!("{} user=hookfleet", db.url));
    Some((db, env))
}

/// Connects as the role `env` runs `hookfleet` as.
async fn connect_as(env: &HashMap<String, String>) -> tokio_postgres::Client {
    let (client, connection) =
        tokio_postgres::connect(&env["DATABASE_URL"], tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(connection);
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_runs_twice_as_a_role_named_hookfleet() {
    let Some((db, env)) = database_owned_by_hookfleet("migrate_runs_twice_as_a_role_named_hookfleet").await else {
        return;
    };
    let first = ok(hookfleet(&env, &["migrate"]));
    assert!(first.starts_with(&format!("applied {} migration(s)", migration_versions().len())), "{first}");
    let second = ok(hookfleet(&env, &["migrate"]));
    assert!(second.contains("schema is up to date"), "{second}");
    assert_history_recorded_once_in_the_hookfleet_schema(&db).await;
    let owner: String = db
        .client()
        .await
        .query_one(
            "SELECT tableowner::text FROM pg_tables WHERE schemaname = 'hookfleet' AND tablename = 'settings'",
            &[],
        )
        .await
        .expect("settings table")
        .get(0);
    assert_eq!(owner, "hookfleet", "the schema was made by the hookfleet role");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_runs_concurrently_twice_over_as_a_role_named_hookfleet() {
    let test = "migrate_runs_concurrently_twice_over_as_a_role_named_hookfleet";
    let Some((db, env)) = database_owned_by_hookfleet(test).await else {
        return;
    };
    let mut outputs = Vec::new();
    for _ in 0..2 {
        let runs: Vec<_> = (0..2)
            .map(|_| {
                let env = env.clone();
                std::thread::spawn(move || hookfleet(&env, &["migrate"]))
            })
            .collect();
        outputs.extend(runs.into_iter().map(|run| ok(run.join().expect("thread"))));
    }
    let applied = outputs.iter().filter(|output| output.starts_with("applied")).count();
    assert_eq!(applied, 1, "exactly one of four runs applies the migrations: {outputs:?}");
    let current = outputs.iter().filter(|output| output.contains("schema is up to date")).count();
    assert_eq!(current, 3, "{outputs:?}");
    assert_history_recorded_once_in_the_hookfleet_schema(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_adopts_the_history_earlier_releases_left_in_public() {
    let test = "migrate_adopts_the_history_earlier_releases_left_in_public";
    let Some((db, env)) = database_owned_by_hookfleet(test).await else {
        return;
    };
    ok(hookfleet(&env, &["migrate"]));
    let admin = db.client().await;

    // Where earlier releases put it: unqualified, in the first schema of the search_path, which
    // was `public` on the first run.
    admin.batch_execute("ALTER TABLE hookfleet.refinery_schema_history SET SCHEMA public").await.expect("move back");
    let upgraded = ok(hookfleet(&env, &["migrate"]));
    assert!(upgraded.contains("schema is up to date"), "nothing is applied again: {upgraded}");
    assert_history_recorded_once_in_the_hookfleet_schema(&db).await;

    // The state a failed second run of those releases left: the full history in `public` and an
    // empty one, made by refinery's CREATE TABLE IF NOT EXISTS as the hookfleet role, in
    // `hookfleet`.
    admin.batch_execute("ALTER TABLE hookfleet.refinery_schema_history SET SCHEMA public").await.expect("move back");
    connect_as(&env)
        .await
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS refinery_schema_history( \
             version int4 PRIMARY KEY, name VARCHAR(255), applied_on VARCHAR(255), checksum VARCHAR(255))",
        )
        .await
        .expect("the empty history of a failed run");
    assert_eq!(db.count("SELECT count(*) FROM hookfleet.refinery_schema_history").await, 0);
    let repaired = ok(hookfleet(&env, &["migrate"]));
    assert!(repaired.contains("schema is up to date"), "nothing is applied again: {repaired}");
    assert_history_recorded_once_in_the_hookfleet_schema(&db).await;
    // max_body_bytes (V0001, then migrate) and oldest_compatible_migration (V0011), once each.
    assert_eq!(db.count("SELECT count(*) FROM hookfleet.settings").await, 2, "V0001 did not run again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_leaves_another_applications_history_in_public_alone() {
    let test = "migrate_leaves_another_applications_history_in_public_alone";
    let Some((db, env)) = database_owned_by_hookfleet(test).await else {
        return;
    };
    // refinery's default table name, used by some other application in the same database.
    connect_as(&env)
        .await
        .batch_execute(
            "CREATE TABLE public.refinery_schema_history( \
             version int4 PRIMARY KEY, name VARCHAR(255), applied_on VARCHAR(255), checksum VARCHAR(255)); \
             INSERT INTO public.refinery_schema_history VALUES (1, 'schema', '2024-01-01T00:00:00Z', '42')",
        )
        .await
        .expect("another application's history");
    let output = ok(hookfleet(&env, &["migrate"]));
    assert!(output.starts_with("applied"), "{output}");
    assert_eq!(db.count("SELECT count(*) FROM public.refinery_schema_history WHERE checksum = '42'").await, 1);
    let versions = db.count("SELECT count(*) FROM hookfleet.refinery_schema_history").await;
    assert_eq!(versions, migration_versions().len() as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_create_prints_json_and_list_decrypts() {
    let db = database().await;
    let env = db.env();
    let created = ok(hookfleet(
        &env,
        &[
            "webhooks",
            "create",
            "--url",
            "http://127.0.0.1:9/hook?token=abc",
            "--events",
            "order.created,order.paid",
            "--rate-limit-rps",
            "5",
            "--max-retries",
            "2",
            "--timeout-ms",
            "1500",
            "--circuit-breaker-threshold",
            "3",
            "--circuit-breaker-timeout",
            "30s",
        ],
    ));
    let webhook: serde_json::Value = serde_json::from_str(&created).expect("JSON");
    assert_eq!(webhook["webhook_id"], 100);
    assert_eq!(webhook["url"], "http://127.0.0.1:9/hook?token=abc");
    assert_eq!(webhook["event_types"], serde_json::json!(["order.created", "order.paid"]));
    assert_eq!(webhook["rate_limit_rps"], 5.0);
    assert_eq!(webhook["max_retries"], 2);
    assert_eq!(webhook["timeout_ms"], 1500);
    assert_eq!(webhook["circuit_breaker_failure_threshold"], 3);
    assert_eq!(webhook["circuit_breaker_timeout_seconds"], 30.0);
    let secret = webhook["secret"].as_str().expect("secret");
    assert!(secret.starts_with("whsec_"));

    // Encrypted at rest: neither the URL nor the secret is in the row.
    let row = db
        .client()
        .await
        .query_one("SELECT url_encrypted, secrets_encrypted, encryption_key_id FROM hookfleet.webhooks", &[])
        .await
        .expect("row");
    let (url, secrets): (Vec<u8>, Vec<u8>) = (row.get(0), row.get(1));
    let contains = |haystack: &[u8], needle: &[u8]| haystack.windows(needle.len()).any(|window| window == needle);
    assert!(!contains(&url, b"127.0.0.1") && !contains(&secrets, secret.as_bytes()));
    assert_eq!(row.get::<_, String>(2).len(), 8);

    // Lists hide the query string (a receiver's token) unless asked to show URLs whole.
    let listed: serde_json::Value =
        serde_json::from_str(&ok(hookfleet(&env, &["webhooks", "list", "--json"]))).expect("JSON");
    assert_eq!(listed[0]["url"], "http://127.0.0.1:9/hook?…");
    assert!(listed[0].get("secret").is_none(), "list never shows secrets");
    let table = ok(hookfleet(&env, &["webhooks", "list"]));
    assert!(table.contains("order.created,order.paid") && table.contains("http://127.0.0.1:9/hook?…"), "{table}");
    assert!(!table.contains("abc"), "{table}");
    let whole: serde_json::Value =
        serde_json::from_str(&ok(hookfleet(&env, &["webhooks", "list", "--json", "--show-urls"]))).expect("JSON");
    assert_eq!(whole[0]["url"], "http://127.0.0.1:9/hook?token=abc");
    assert!(ok(hookfleet(&env, &["webhooks", "list", "--show-urls"])).contains("http://127.0.0.1:9/hook?token=abc"));

    // A given secret is kept, whether on the command line, in the environment or on standard input.
    let given = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let created = ok(hookfleet(&env, &["webhooks", "create", "--url", "http://127.0.0.1:9/b", "--secret", given]));
    assert!(created.contains(given));
    let from_env = "whsec_QkZ5c2VjcmV0RnJvbUVudmlyb25tZW50MDE=";
    let mut with_secret = env.clone();
    with_secret.insert("HOOKFLEET_WEBHOOK_SECRET".into(), from_env.into());
    let created: serde_json::Value =
        serde_json::from_str(&ok(hookfleet(&with_secret, &["webhooks", "create", "--url", "http://127.0.0.1:9/c"])))
            .expect("JSON");
    assert_eq!(created["secret"], from_env);
    let from_stdin = "whsec_U3RhbmRhcmRJbnB1dFNlY3JldDAxMjM0NTY3";
    let created: serde_json::Value = serde_json::from_str(&ok(hookfleet_with_stdin(
        &env,
        &["webhooks", "create", "--url", "http://127.0.0.1:9/d", "--secret-stdin"],
        &format!("{from_stdin}\n"),
    )))
    .expect("JSON");
    assert_eq!(created["secret"], from_stdin);
    // Nothing on standard input: refused, nothing written.
    let before = ok(hookfleet(&env, &["webhooks", "list", "--json"]));
    let empty =
        hookfleet_with_stdin(&env, &["webhooks", "create", "--url", "http://127.0.0.1:9/e", "--secret-stdin"], "");
    assert!(!empty.status.success() && stderr(&empty).contains("--secret-stdin"), "{}", stderr(&empty));
    assert_eq!(ok(hookfleet(&env, &["webhooks", "list", "--json"])), before);
    // Both at once is a mistake, not a choice.
    let both = hookfleet_with_stdin(
        &env,
        &["webhooks", "create", "--url", "http://127.0.0.1:9/f", "--secret", given, "--secret-stdin"],
        &format!("{from_stdin}\n"),
    );
    assert!(!both.status.success(), "--secret and --secret-stdin together were accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_create_refuses_bad_input_and_changes_nothing() {
    let db = database().await;
    let base = db.env();
    let without = |names: &[&str]| {
        let mut env = base.clone();
        for name in names {
            env.remove(*name);
        }
        env
    };
    let cases: Vec<(HashMap<String, String>, Vec<&str>, &str)> = vec![
        (without(&["HOOKFLEET_ALLOW_HTTP"]), vec!["--url", "http://127.0.0.1:9/"], "https"),
        (without(&["HOOKFLEET_ALLOWED_CIDRS"]), vec!["--url", "http://127.0.0.1:9/"], "refused"),
        (without(&["HOOKFLEET_ALLOWED_CIDRS"]), vec!["--url", "http://[::1]:9/"], "refused"),
        (base.clone(), vec!["--url", "ftp://127.0.0.1/"], "url"),
        (base.clone(), vec!["--url", "http://user:pw@127.0.0.1:9/"], "url"),
        (base.clone(), vec!["--url", "http://127.0.0.1:9/", "--secret", "whsec_short"], "secret"),
        (base.clone(), vec!["--url", "http://127.0.0.1:9/", "--max-retries", "101"], "max_retries"),
        (base.clone(), vec!["--url", "http://127.0.0.1:9/", "--timeout-ms", "0"], "timeout_ms"),
        (base.clone(), vec!["--url", "http://127.0.0.1:9/", "--circuit-breaker-threshold", "0"], "circuit_breaker"),
        (without(&["HOOKFLEET_ENCRYPTION_KEY"]), vec!["--url", "http://127.0.0.1:9/"], "hookfleet keygen"),
    ];
    for (env, args, expected) in cases {
        let mut full = vec!["webhooks", "create"];
        full.extend(args.iter());
        let output = hookfleet(&env, &full);
        assert!(!output.status.success(), "{args:?} was accepted");
        let message = stderr(&output);
        assert!(message.to_lowercase().contains(&expected.to_lowercase()), "{args:?}: {message}");
        assert!(!message.contains("pw@"), "credentials leaked into the error: {message}");
    }
    assert_eq!(db.count("SELECT count(*) FROM hookfleet.webhooks").await, 0);
}

fn api_key_store(db: &TestDatabase) -> hookfleet_core::api_keys::ApiKeyStore {
    hookfleet_core::api_keys::ApiKeyStore::new(hookfleet_core::db::pool(&db.url, "hookfleet-test", 2).expect("pool"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_create_prints_the_key_once_and_list_and_revoke_never_show_it() {
    let db = database().await;
    let env = db.env();
    let output = hookfleet(&env, &["api-keys", "create", "--name", "orders service", "--scope", "producer"]);
    let warning = stderr(&output);
    let created: serde_json::Value = serde_json::from_str(&ok(output)).expect("JSON");
    let key = created["key"].as_str().expect("key").to_owned();
    let key_id = created["key_id"].as_i64().expect("key_id");
    assert!(key.starts_with("hfk_") && key.len() == 47, "{key}");
    assert_eq!(created["name"], "orders service");
    assert_eq!(created["scope"], "producer");
    assert_eq!(created["key_prefix"], key[..12]);
    assert!(created["created_at"].as_str().is_some_and(|at| at.ends_with('Z')), "{created}");
    assert!(warning.contains("only time") && warning.contains("SHA-256"), "{warning}");
    assert!(!warning.contains(&key[4..]), "the key is on standard output only: {warning}");

    let verified = api_key_store(&db).verify(&key).await.expect("verify").expect("the printed key works");
    assert_eq!(verified.key_id, key_id);
    let row: String =
        db.client().await.query_one("SELECT k::text FROM hookfleet.api_keys k", &[]).await.expect("row").get(0);
    assert!(!row.contains(&key[4..]) && !row.contains(&key[12..]), "the database holds the key: {row}");

    let admin: serde_json::Value =
        serde_json::from_str(&ok(hookfleet(&env, &["api-keys", "create", "--name", "operator", "--scope", "admin"])))
            .expect("JSON");
    let admin_key = admin["key"].as_str().expect("key").to_owned();

    let listed_text = ok(hookfleet(&env, &["api-keys", "list", "--json"]));
    let listed: serde_json::Value = serde_json::from_str(&listed_text).expect("JSON");
    assert_eq!(listed.as_array().map(Vec::len), Some(2));
    assert_eq!(listed[0]["key_prefix"], key[..12]);
    assert_eq!((listed[0]["scope"].as_str(), listed[1]["scope"].as_str()), (Some("producer"), Some("admin")));
    assert!(listed[0]["last_used_at"].is_string() && listed[1]["last_used_at"].is_null(), "{listed}");
    let table = ok(hookfleet(&env, &["api-keys", "list"]));
    for shown in [&listed_text, &table] {
        assert!(!shown.contains(&key[4..]) && !shown.contains(&admin_key[4..]), "a list shows a key: {shown}");
        assert!(!shown.contains("hash") && !shown.contains("\\x"), "a list shows a hash: {shown}");
    }
    assert!(table.contains(&key[..12]) && table.contains("orders service") && table.contains("never"), "{table}");

    let revoked = ok(hookfleet(&env, &["api-keys", "revoke", &key_id.to_string()]));
    assert_eq!(revoked.trim(), format!("api key {key_id} revoked"));
    assert_eq!(api_key_store(&db).verify(&key).await.expect("verify"), None, "a revoked key is refused");
    assert!(api_key_store(&db).verify(&admin_key).await.expect("verify").is_some(), "the other key still works");
    let again = ok(hookfleet(&env, &["api-keys", "revoke", &key_id.to_string()]));
    assert!(again.contains("already revoked"), "{again}");
    let listed: serde_json::Value =
        serde_json::from_str(&ok(hookfleet(&env, &["api-keys", "list", "--json"]))).expect("JSON");
    assert!(listed[0]["revoked_at"].is_string() && listed[1]["revoked_at"].is_null(), "{listed}");

    let unknown = hookfleet(&env, &["api-keys", "revoke", "424242"]);
    assert!(!unknown.status.success(), "{}", stdout(&unknown));
    assert!(stderr(&unknown).contains("api key 424242 does not exist"), "{}", stderr(&unknown));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_create_refuses_bad_input_and_writes_nothing() {
    let db = database().await;
    let env = db.env();
    let too_long = "x".repeat(201);
    let cases: [(&[&str], &str); 6] = [
        (&["--name", "ci", "--scope", "root"], "expected admin"),
        (&["--name", "ci", "--scope", "Admin"], "expected admin"),
        (&["--name", "ci"], "--scope"),
        (&["--scope", "admin"], "--name"),
        (&["--name", "", "--scope", "admin"], "name: must be 1 to 200 characters"),
        (&["--name", too_long.as_str(), "--scope", "admin"], "name: must be 1 to 200 characters"),
    ];
    for (args, expected) in cases {
        let mut full = vec!["api-keys", "create"];
        full.extend(args.iter());
        let output = hookfleet(&env, &full);
        assert!(!output.status.success(), "{args:?} was accepted: {}", stdout(&output));
        assert!(stderr(&output).contains(expected), "{args:?}: {}", stderr(&output));
        assert!(!stdout(&output).contains("hfk_"), "{args:?} printed a key");
    }
    assert_eq!(db.count("SELECT count(*) FROM hookfleet.api_keys").await, 0);
}

#[test]
fn keygen_prints_a_fresh_key_without_a_database() {
    let env = HashMap::new();
    let first = ok(hookfleet(&env, &["keygen"]));
    let second = ok(hookfleet(&env, &["keygen"]));
    assert_ne!(first, second);
    let key = hookfleet_core::crypto::EncryptionKey::parse_base64(first.trim()).expect("a valid key");
    assert_eq!(key.key_id().len(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_and_cancel_report_what_happened() {
    let db = database().await;
    let env = db.env();
    ok(hookfleet(&env, &["webhooks", "create", "--url", "http://127.0.0.1:9/"]));
    let client = db.client().await;
    let ids: Vec<i64> = client
        .query(
            "INSERT INTO hookfleet.delivery_queue (webhook_id, message_body) SELECT 100, '{}' FROM generate_series(1, 2) RETURNING delivery_id",
            &[],
        )
        .await
        .expect("insert")
        .iter()
        .map(|row| row.get(0))
        .collect();
    let (dead, pending) = (ids[0], ids[1]);
    client
        .execute(
            "UPDATE hookfleet.delivery_queue SET delivery_status = 'dead', retry_count = 3 WHERE delivery_id = $1",
            &[&dead],
        )
        .await
        .expect("make it dead");

    assert!(ok(hookfleet(&env, &["replay", &dead.to_string()])).contains("pending again"));
    let (status, retries): (String, i32) = {
        let row = client
            .query_one(
                "SELECT delivery_status, retry_count FROM hookfleet.delivery_queue WHERE delivery_id = $1",
                &[&dead],
            )
            .await
            .expect("row");
        (row.get(0), row.get(1))
    };
    assert_eq!((status.as_str(), retries), ("pending", 0));

    let refused = hookfleet(&env, &["replay", &pending.to_string()]);
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("is pending"), "{}", stderr(&refused));
    let missing = hookfleet(&env, &["replay", "999999"]);
    assert!(!missing.status.success() && stderr(&missing).contains("does not exist"), "{}", stderr(&missing));

    assert!(ok(hookfleet(&env, &["cancel", &pending.to_string()])).contains("cancelled"));
    let again = hookfleet(&env, &["cancel", &pending.to_string()]);
    assert!(!again.status.success());
    assert!(stderr(&again).contains("is cancelled"), "{}", stderr(&again));
}

/// One dashboard of `hookfleet status`: its rows, each a map from column name to cell text.
type Dashboard = Vec<HashMap<String, String>>;

/// Parses `hookfleet status`: a title line per dashboard, then either a table (a header row
/// and data rows between `│`, cells separated by `┆`) or `  (none)`. Returns the dashboards in
/// the order printed, so that checks compare whole cells, never substrings of the text.
fn dashboards(text: &str) -> Vec<(String, Dashboard)> {
    let mut parsed: Vec<(String, Dashboard)> = Vec::new();
    let mut header: Option<Vec<String>> = None;
    for line in text.lines() {
        if line.trim().is_empty() || "┌╞└".contains(line.chars().next().expect("non-empty")) {
            continue;
        }
        if line == "  (none)" {
            assert!(parsed.last().is_some_and(|(_, rows)| rows.is_empty()), "(none) after rows:\n{text}");
            continue;
        }
        if let Some(inner) = line.strip_prefix('│').and_then(|line| line.strip_suffix('│')) {
            let cells: Vec<String> = inner.split('┆').map(|cell| cell.trim().to_owned()).collect();
            let (_, rows) = parsed.last_mut().unwrap_or_else(|| panic!("a table before any title:\n{text}"));
            match &header {
                None => header = Some(cells),
                Some(columns) => {
                    assert_eq!(cells.len(), columns.len(), "a row of another width: {line}");
                    rows.push(columns.iter().cloned().zip(cells).collect());
                }
            }
            continue;
        }
        assert!(!line.starts_with(' ') && !line.contains('│'), "an unexpected line {line:?} in:\n{text}");
        parsed.push((line.to_owned(), Vec::new()));
        header = None;
    }
    parsed
}

/// The one row of `dashboard` whose `column` is exactly `value`.
fn row<'a>(dashboard: &'a Dashboard, column: &str, value: &str) -> &'a HashMap<String, String> {
    let matching: Vec<_> = dashboard.iter().filter(|row| row.get(column).map(String::as_str) == Some(value)).collect();
    assert_eq!(matching.len(), 1, "one row with {column} = {value}: {dashboard:?}");
    matching[0]
}

/// Asserts that `row` has exactly these cells (other columns are not checked).
fn assert_cells(row: &HashMap<String, String>, expected: &[(&str, &str)]) {
    for (column, value) in expected {
        assert_eq!(row.get(*column).map(String::as_str), Some(*value), "{column} in {row:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_prints_every_dashboard() {
    let db = database().await;
    let env = db.env();
    ok(hookfleet(&env, &["webhooks", "create", "--url", "http://127.0.0.1:9/", "--name", "billing"]));
    ok(hookfleet(&env, &["webhooks", "create", "--url", "http://127.0.0.1:9/", "--name", "payments"]));
    // One pending row for billing; payments' circuit is open (so it is unavailable) and has
    // had two attempts; one live worker holds three attempts.
    db.client()
        .await
        .batch_execute(
            "INSERT INTO hookfleet.delivery_queue (webhook_id, message_body) VALUES (100, '{}'); \
             UPDATE hookfleet.webhook_health_metrics SET health_status = 'unavailable', circuit_state = 'open', \
                 circuit_opened_at = now(), circuit_open_until = now() + interval '1 hour', consecutive_failures = 7 \
             WHERE webhook_id = 101; \
             INSERT INTO hookfleet.delivery_attempts \
                 (delivery_id, webhook_id, attempt_number, worker_id, started_at, duration_ms, status_code, outcome) \
             VALUES (1, 101, 1, 'worker-a', now() - interval '1 second', 10, 500, 'retry'), (1, 101, 2, 'worker-a', now(), 30, 200, 'delivered'); \
             INSERT INTO hookfleet.workers (worker_id, host, pid, version, in_flight) \
             VALUES ('worker-a', 'host-a', 4242, '0.1.0', 3)",
        )
        .await
        .expect("insert");
    let text = ok(hookfleet(&env, &["status"]));
    let parsed = dashboards(&text);
    let titles: Vec<&str> = parsed.iter().map(|(title, _)| title.as_str()).collect();
    assert_eq!(titles, ["Queue", "Webhooks", "Performance", "Workers"], "{text}");
    let [queue, webhooks, performance, workers] = [0, 1, 2, 3].map(|index| &parsed[index].1);

    assert_cells(row(queue, "delivery_status", "pending"), &[("deliveries", "1")]);
    for status in ["in_flight", "delivered", "dead", "cancelled"] {
        assert_cells(row(queue, "delivery_status", status), &[("deliveries", "0")]);
    }
    assert_eq!(webhooks.len(), 2, "{text}");
    assert_cells(
        row(webhooks, "webhook_id", "100"),
        &[("name", "billing"), ("health_status", "healthy"), ("circuit_state", "closed"), ("pending", "1")],
    );
    assert_cells(
        row(webhooks, "webhook_id", "101"),
        &[
            ("name", "payments"),
            ("health_status", "unavailable"),
            ("circuit_state", "open"),
            ("pending", "0"),
            ("consecutive_failures", "7"),
        ],
    );
    assert_eq!(performance.len(), 2, "a 5m and a 1h window for payments: {text}");
    for window in ["5m", "1h"] {
        assert_cells(
            row(performance, "window_name", window),
            &[("webhook_id", "101"), ("attempts", "2"), ("successes", "1"), ("max_ms", "30.0")],
        );
    }
    assert_eq!(workers.len(), 1, "{text}");
    assert_cells(row(workers, "worker_id", "worker-a"), &[("host", "host-a"), ("pid", "4242"), ("in_flight", "3")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_refuse_a_database_that_was_never_migrated_and_say_what_to_do() {
    let db = empty_database().await;
    let mut env = db.env();
    // The embedded server trusts local roles, so a password is accepted and ignored: what matters
    // is that it never reaches the message.
    env.insert("DATABASE_URL".into(), format!("{} password=sekrit-123", db.url));
    for args in [&["status"][..], &["webhooks", "list"], &["api-keys", "list"], &["replay", "1"], &["cancel", "1"]] {
        let output = hookfleet(&env, args);
        let text = stderr(&output);
        assert!(!output.status.success(), "{args:?}: {}{text}", stdout(&output));
        assert_eq!(text.matches("has no hookfleet schema: run `hookfleet migrate`").count(), 1, "{args:?}: {text}");
        assert!(text.contains(&db.name), "{args:?} names the database: {text}");
        assert!(!text.contains("sekrit-123"), "{args:?} shows the password: {text}");
        assert!(!text.contains("does not exist"), "{args:?}: no raw relation error: {text}");
    }
}

/// Records a migration newer than any this build has, as a later release's `migrate` would.
async fn migrate_from_the_future(db: &TestDatabase) {
    db.client()
        .await
        .batch_execute(
            "INSERT INTO hookfleet.refinery_schema_history (version, name, applied_on, checksum) \
             VALUES (9999, 'from_a_later_release', '2030-01-01T00:00:00Z', '1')",
        )
        .await
        .expect("a later release's migration");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_release_works_with_a_newer_schema_until_the_schema_refuses_it() {
    let db = database().await;
    let env = db.env();
    migrate_from_the_future(&db).await;
    // An old pod's migrate step during a rolling upgrade: nothing to do, not a failure.
    let migrated = hookfleet(&env, &["migrate"]);
    assert!(migrated.status.success(), "{}{}", stdout(&migrated), stderr(&migrated));
    assert!(stdout(&migrated).contains("schema is up to date (V9999"), "{}", stdout(&migrated));
    let status = hookfleet(&env, &["status"]);
    assert!(status.status.success(), "{}", stderr(&status));
    assert!(stderr(&status).contains("is newer than this hookfleet's"), "warns: {}", stderr(&status));

    db.client()
        .await
        .batch_execute("UPDATE hookfleet.settings SET value = '9999' WHERE name = 'oldest_compatible_migration'")
        .await
        .expect("the later release raised the floor");
    for args in [&["status"][..], &["migrate"]] {
        let output = hookfleet(&env, args);
        let text = stderr(&output);
        assert!(!output.status.success(), "{args:?}: {}{text}", stdout(&output));
        assert!(text.contains("binaries before schema V9999 cannot work with"), "{args:?}: {text}");
    }
}

/// The rows of a Markdown table whose header is `header`, each split into trimmed cells.
fn markdown_rows<'a>(text: &'a str, header: &str) -> Vec<Vec<&'a str>> {
    let mut lines = text.lines().skip_while(|line| *line != header);
    assert_eq!(lines.next(), Some(header), "no table headed {header}");
    assert!(lines.next().is_some_and(|line| line.starts_with("|---")), "{header} has no separator line");
    lines
        .take_while(|line| line.starts_with('|'))
        .map(|line| line.trim_matches('|').split('|').map(str::trim).collect())
        .collect()
}

#[test]
fn the_readme_documents_every_setting_as_hookfleet_settings_does() {
    let header = "| environment | file key | default | meaning |";
    let readme = markdown_rows(include_str!("../../../README.md"), header);
    let printed = ok(hookfleet(&HashMap::new(), &["settings"]));
    let settings = markdown_rows(&printed, header);
    assert_eq!(settings.len(), Config::settings().len(), "hookfleet settings prints every setting: {printed}");
    for (index, setting) in Config::settings().iter().enumerate() {
        assert_eq!(settings[index][0], format!("`{}`", setting.env), "hookfleet settings, row {index}");
        assert_eq!(settings[index][2], setting.default, "hookfleet settings' default of {}", setting.env);
    }
    // Name, file key, default and meaning, row by row and in the same order.
    for (index, (documented, printed)) in readme.iter().zip(&settings).enumerate() {
        assert_eq!(documented, printed, "README's configuration table, row {index}, differs from hookfleet settings");
    }
    assert_eq!(readme.len(), settings.len(), "README's configuration table has other rows than hookfleet settings");
}

#[test]
fn demo_runs_the_whole_system_and_delivers_everything() {
    let worker = std::path::Path::new(env!("CARGO_BIN_EXE_hookfleet")).with_file_name("hookfleet-worker");
    assert!(worker.exists(), "{} is missing: run the tests with `cargo test --workspace`", worker.display());
    let started = std::time::Instant::now();
    let output = hookfleet(&HashMap::new(), &["demo", "--messages", "60", "--workers", "2", "--exit-when-done"]);
    let text = ok(output);
    assert!(text.contains("120/120 delivered in"), "{text}");
    assert!(text.contains("psql \"postgresql://"), "the demo says how to look: {text}");
    assert!(started.elapsed() < Duration::from_secs(120));
}
