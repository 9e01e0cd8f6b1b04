//! API keys against the real schema (`sql/migrations/V0015__api_keys.sql`,
//! `crates/core/src/api_keys.rs`): a created key verifies, the database keeps nothing of it but its
//! hash and prefix, a revoked key stops working, and the table refuses what the store never writes.

use hookfleet_core::api_keys::{ApiKeyError, ApiKeyStore, RevokeOutcome, Scope, MAX_NAME_CHARS};
use std::time::Duration;

use hookfleet_test_support::{database, eventually, TestDatabase};
use secrecy::ExposeSecret as _;

fn store(db: &TestDatabase) -> ApiKeyStore {
    ApiKeyStore::new(hookfleet_core::db::pool(&db.url, "hookfleet-test", 2).expect("pool"))
}

/// The key's row, every column as text.
async fn row_text(db: &TestDatabase, key_id: i64) -> String {
    let client = db.client().await;
    client
        .query_one("SELECT k::text FROM hookfleet.api_keys k WHERE key_id = $1", &[&key_id])
        .await
        .expect("the key's row")
        .get(0)
}

/// What `last_used_at` holds (to the microsecond) and the row version (`xmin`): a write changes the
/// second even when it writes the same value.
async fn last_used(db: &TestDatabase, key_id: i64) -> (Option<String>, String) {
    let client = db.client().await;
    let row = client
        .query_one("SELECT last_used_at::text, xmin::text FROM hookfleet.api_keys WHERE key_id = $1", &[&key_id])
        .await
        .expect("last_used_at");
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn a_created_key_verifies_and_the_database_keeps_only_its_hash_and_prefix() {
    let db = database().await;
    let store = store(&db);
    let (created, token) = store.create("ci producer", Scope::Producer).await.expect("create");
    let token = token.expose_secret().to_owned();
    assert!(token.starts_with("hfk_") && token.len() == 47, "{token}");
    assert_eq!(created.name, "ci producer");
    assert_eq!(created.scope, Scope::Producer);
    assert_eq!(created.key_prefix, token[..12]);
    assert_eq!((created.last_used_at.as_deref(), created.revoked_at.as_deref()), (None, None));

    // Every column as text: neither the key nor its random part (in base64 or as hex) is there.
    let text = row_text(&db, created.key_id).await;
    assert!(text.contains(&created.key_prefix), "{text}");
    for secret in [token.clone(), token[4..].to_owned(), token[12..].to_owned()] {
        assert!(!text.contains(&secret), "the row holds {secret:?}: {text}");
    }
    let client = db.client().await;
    let row = client
        .query_one(
            "SELECT key_hash = sha256(convert_to($2, 'UTF8')), \
                    position(encode(decode(translate($3, '-_', '+/') || '=', 'base64'), 'hex') IN k::text) \
             FROM hookfleet.api_keys k WHERE key_id = $1",
            &[&created.key_id, &token, &&token[4..]],
        )
        .await
        .expect("hash");
    assert!(row.get::<_, bool>(0), "key_hash is the SHA-256 of the whole key");
    assert_eq!(row.get::<_, i32>(1), 0, "the random bytes are not in the row as hex");

    let verified = store.verify(&token).await.expect("verify").expect("the new key works");
    assert_eq!((verified.key_id, verified.scope), (created.key_id, Scope::Producer));
    assert!(verified.last_used_at.is_some(), "its use is noted");

    // A list shows the key's prefix, never the key or its hash.
    let listed = store.list().await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].key_prefix, created.key_prefix);
    let json = serde_json::to_string(&listed).expect("JSON");
    assert!(!json.contains(&token[4..]) && !json.contains("hash") && !json.contains("\"key\""), "{json}");
}

#[tokio::test]
async fn last_used_at_is_written_at_most_once_a_minute() {
    let db = database().await;
    let store = store(&db);
    let (created, token) = store.create("busy", Scope::Producer).await.expect("create");
    assert_eq!(last_used(&db, created.key_id).await.0, None);

    store.verify(token.expose_secret()).await.expect("verify").expect("valid");
    let first = last_used(&db, created.key_id).await;
    assert!(first.0.is_some());
    for _ in 0..5 {
        store.verify(token.expose_secret()).await.expect("verify").expect("valid");
    }
    assert_eq!(last_used(&db, created.key_id).await, first, "no write within the minute");

    db.client()
        .await
        .execute(
            "UPDATE hookfleet.api_keys SET last_used_at = now() - interval '61 seconds' WHERE key_id = $1",
            &[&created.key_id],
        )
        .await
        .expect("a use a minute ago");
    let aged = last_used(&db, created.key_id).await;
    let verified = store.verify(token.expose_secret()).await.expect("verify").expect("valid");
    let again = last_used(&db, created.key_id).await;
    assert!(again.0 > aged.0, "written again after a minute: {aged:?} then {again:?}");
    let client = db.client().await;
    let shown: String = client
        .query_one(
            "SELECT to_char(last_used_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') FROM hookfleet.api_keys WHERE key_id = $1",
            &[&created.key_id],
        )
        .await
        .expect("last_used_at")
        .get(0);
    assert_eq!(verified.last_used_at.as_deref(), Some(shown.as_str()), "verify answers the new value");
}

#[tokio::test]
async fn a_revoked_key_is_refused_and_revoking_it_again_changes_nothing() {
    let db = database().await;
    let store = store(&db);
    let (created, token) = store.create("to revoke", Scope::Admin).await.expect("create");
    let (other, other_token) = store.create("stays", Scope::Admin).await.expect("create");
    assert!(store.verify(token.expose_secret()).await.expect("verify").is_some());

    assert_eq!(store.revoke(created.key_id).await.expect("revoke"), RevokeOutcome::Revoked);
    assert_eq!(store.verify(token.expose_secret()).await.expect("verify"), None, "a revoked key is refused");
    let revoked_row = row_text(&db, created.key_id).await;
    let listed = store.list().await.expect("list");
    assert!(listed[0].revoked_at.is_some() && listed[1].revoked_at.is_none(), "{listed:?}");

    assert_eq!(store.revoke(created.key_id).await.expect("revoke again"), RevokeOutcome::AlreadyRevoked);
    assert_eq!(row_text(&db, created.key_id).await, revoked_row, "the second revoke wrote nothing");
    assert_eq!(store.revoke(987_654).await.expect("revoke unknown"), RevokeOutcome::NotFound);
    assert_eq!(db.count("SELECT count(*) FROM hookfleet.api_keys WHERE revoked_at IS NOT NULL").await, 1);

    // The other key is untouched.
    let still = store.verify(other_token.expose_secret()).await.expect("verify").expect("still valid");
    assert_eq!(still.key_id, other.key_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_revokes_that_wait_for_the_same_row_one_revokes_and_the_other_finds_it_revoked() {
    let db = database().await;
    let (created, _) = store(&db).create("raced", Scope::Admin).await.expect("create");
    // An operator's open transaction holds the row, so both revokes wait for it together.
    let mut operator = db.client().await;
    let holding = operator.transaction().await.expect("begin");
    holding
        .execute("UPDATE hookfleet.api_keys SET name = name WHERE key_id = $1", &[&created.key_id])
        .await
        .expect("hold the row");
    let revokes: Vec<_> = (0..2)
        .map(|_| {
            let store = store(&db);
            tokio::spawn(async move { store.revoke(created.key_id).await.expect("revoke") })
        })
        .collect();
    eventually(Duration::from_secs(10), "both revokes waiting for the row", || async {
        let waiting = db
            .count(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'hookfleet-test' \
                 AND wait_event_type = 'Lock' AND datname = current_database()",
            )
            .await;
        (waiting == 2).then_some(())
    })
    .await;
    holding.commit().await.expect("let them go");
    let mut outcomes = Vec::new();
    for revoke in revokes {
        outcomes.push(revoke.await.expect("revoke task"));
    }
    outcomes.sort_by_key(|outcome| *outcome != RevokeOutcome::Revoked);
    assert_eq!(outcomes, [RevokeOutcome::Revoked, RevokeOutcome::AlreadyRevoked]);
}

#[tokio::test]
async fn keys_of_both_scopes_verify_as_their_own_scope() {
    let db = database().await;
    let store = store(&db);
    let (admin, admin_token) = store.create("operator", Scope::Admin).await.expect("admin");
    let (producer, producer_token) = store.create("orders service", Scope::Producer).await.expect("producer");
    assert_ne!(admin.key_id, producer.key_id);
    assert_ne!(admin.key_prefix, producer.key_prefix);
    assert_ne!(admin_token.expose_secret(), producer_token.expose_secret());

    let verified_admin = store.verify(admin_token.expose_secret()).await.expect("verify").expect("admin");
    let verified_producer = store.verify(producer_token.expose_secret()).await.expect("verify").expect("producer");
    assert_eq!((verified_admin.key_id, verified_admin.scope), (admin.key_id, Scope::Admin));
    assert_eq!((verified_producer.key_id, verified_producer.scope), (producer.key_id, Scope::Producer));
    assert!(verified_admin.scope.allows(Scope::Producer) && !verified_producer.scope.allows(Scope::Admin));

    let scopes: Vec<(String, String)> = db
        .client()
        .await
        .query("SELECT name, scope FROM hookfleet.api_keys ORDER BY key_id", &[])
        .await
        .expect("rows")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(
        scopes,
        [("operator".to_owned(), "admin".to_owned()), ("orders service".to_owned(), "producer".to_owned())]
    );
}

#[tokio::test]
async fn malformed_and_unknown_keys_are_refused() {
    let db = database().await;
    let store = store(&db);
    let (_, token) = store.create("real", Scope::Admin).await.expect("create");
    let token = token.expose_secret().to_owned();
    let random = &token[4..];
    let mut changed_last = token.clone();
    changed_last.replace_range(46.., if token.ends_with('A') { "E" } else { "A" });
    let cases = [
        (String::new(), "empty"),
        (format!("hfx_{random}"), "wrong prefix"),
        (random.to_owned(), "no prefix"),
        (token[..46].to_owned(), "too short"),
        (format!("{token}A"), "too long"),
        (format!("hfk_{}*", &random[..42]), "not base64"),
        (format!("hfk_{}+", &random[..42]), "standard base64, not base64url"),
        (format!("Bearer {token}"), "the whole header"),
        (token.to_uppercase(), "changed case"),
        (changed_last, "well formed, unknown"),
        (format!("hfk_{}", "A".repeat(43)), "well formed, unknown"),
    ];
    for (candidate, why) in &cases {
        assert_eq!(store.verify(candidate).await.expect("verify"), None, "{why}: {candidate:?} accepted");
    }
    assert!(store.verify(&token).await.expect("verify").is_some());
}

#[tokio::test]
async fn bad_names_are_refused_and_nothing_is_written() {
    let db = database().await;
    let store = store(&db);
    for name in [String::new(), "x".repeat(MAX_NAME_CHARS + 1), "tab\there".to_owned()] {
        match store.create(&name, Scope::Producer).await {
            Err(ApiKeyError::Invalid(message)) => assert!(message.starts_with("name: "), "{message}"),
            other => panic!("{name:?}: {other:?}"),
        }
    }
    assert_eq!(db.count("SELECT count(*) FROM hookfleet.api_keys").await, 0);
    let longest = "é".repeat(MAX_NAME_CHARS);
    let (created, _) = store.create(&longest, Scope::Producer).await.expect("200 characters fit");
    assert_eq!(created.name, longest);
}

#[tokio::test]
async fn the_table_refuses_rows_the_store_never_writes() {
    let db = database().await;
    let client = db.client().await;
    let insert = "INSERT INTO hookfleet.api_keys (name, scope, key_hash, key_prefix) VALUES ($1, $2, $3, $4)";
    let hash = vec![7u8; 32];
    client.execute(insert, &[&"fits", &"admin", &hash, &"hfk_AbCdEfGh"]).await.expect("a well-formed row");
    let token = format!("hfk_{}", "A".repeat(43));
    let cases: [(&str, &str, Vec<u8>, &str, &str); 7] = [
        ("bad scope", "root", vec![1; 32], "hfk_AbCdEfGh", "api_keys_scope_known"),
        ("bad scope", "Admin", vec![1; 32], "hfk_AbCdEfGh", "api_keys_scope_known"),
        ("short hash", "admin", vec![1; 31], "hfk_AbCdEfGh", "api_keys_key_hash_sha256"),
        ("long hash", "admin", vec![1; 64], "hfk_AbCdEfGh", "api_keys_key_hash_sha256"),
        ("", "admin", vec![1; 32], "hfk_AbCdEfGh", "api_keys_name_length"),
        ("whole key", "admin", vec![1; 32], &token, "api_keys_key_prefix_form"),
        ("same hash", "admin", vec![7; 32], "hfk_AbCdEfGh", "api_keys_key_hash_unique"),
    ];
    for (name, scope, hash, prefix, constraint) in &cases {
        let error = client.execute(insert, &[name, scope, hash, prefix]).await.expect_err(constraint);
        let refused = error.as_db_error().and_then(|db_error| db_error.constraint());
        assert_eq!(refused, Some(*constraint), "{name}: {error:?}");
    }
    let too_long = "x".repeat(MAX_NAME_CHARS + 1);
    let error =
        client.execute(insert, &[&too_long, &"admin", &vec![2u8; 32], &"hfk_AbCdEfGh"]).await.expect_err("long");
    assert_eq!(error.as_db_error().and_then(|db_error| db_error.constraint()), Some("api_keys_name_length"));
    assert_eq!(db.count("SELECT count(*) FROM hookfleet.api_keys").await, 1);
}
