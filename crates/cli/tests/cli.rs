//! The `hookfleet` command line, run as a real process against test databases.

use std::collections::HashMap;
use std::process::{Command, Output};
use std::time::Duration;

use hookfleet_core::config::Config;
use hookfleet_test_support::{database, empty_database};

fn hookfleet(env: &HashMap<String, String>, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hookfleet"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env)
        .args(args)
        .output()
        .expect("run hookfleet")
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
    assert_eq!(db.count("SELECT count(*) FROM pg_tables WHERE schemaname = 'hookfleet'").await, 8);
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

    let listed: serde_json::Value =
        serde_json::from_str(&ok(hookfleet(&env, &["webhooks", "list", "--json"]))).expect("JSON");
    assert_eq!(listed[0]["url"], "http://127.0.0.1:9/hook?token=abc");
    assert!(listed[0].get("secret").is_none(), "list never shows secrets");
    assert!(ok(hookfleet(&env, &["webhooks", "list"])).contains("order.created,order.paid"));

    // A given secret is kept.
    let given = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let created = ok(hookfleet(&env, &["webhooks", "create", "--url", "http://127.0.0.1:9/b", "--secret", given]));
    assert!(created.contains(given));
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_prints_every_dashboard() {
    let db = database().await;
    let env = db.env();
    ok(hookfleet(&env, &["webhooks", "create", "--url", "http://127.0.0.1:9/", "--name", "billing"]));
    db.client()
        .await
        .batch_execute("INSERT INTO hookfleet.delivery_queue (webhook_id, message_body) VALUES (100, '{}')")
        .await
        .expect("insert");
    let text = ok(hookfleet(&env, &["status"]));
    for section in ["Queue", "Webhooks", "Performance", "Workers", "billing", "pending", "healthy"] {
        assert!(text.contains(section), "{section} missing from:\n{text}");
    }
}

#[test]
fn the_readme_documents_every_setting() {
    let readme = include_str!("../../../README.md");
    for setting in Config::settings() {
        assert!(
            readme.contains(&format!("| `{}` |", setting.env)),
            "README's configuration table lacks {}",
            setting.env
        );
    }
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
