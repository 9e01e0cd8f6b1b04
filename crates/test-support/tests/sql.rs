//! SQL-level tests of the queue in PostgreSQL: the schema's producer checks and defaults
//! (`sql/migrations/V0001__schema.sql`, `sql/functions/`), the claim, the batched write-back and the
//! other queries in `sql/queries/`, health and the circuit breaker, replay, cancel, fan-out, the
//! dashboard views (`sql/views/`), migrations and wake-up notifications.
//!
//! Every test gets a fresh database cloned from the migrated template. Nothing here talks to a
//! receiver: webhooks point at a loopback URL that is never contacted.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hookfleet_core::queue::{
    AttemptRecord, BreakerSettings, ClaimLimits, ClaimedDelivery, Outcome, Queue, WorkerIdentity,
};
use hookfleet_core::webhooks::NewWebhook;
use hookfleet_test_support::{database, open_circuit, pass_open_period, psql_claim, TestDatabase};
use serde_json::json;
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, Client, NoTls, Notification};

const LEASE: Duration = Duration::from_secs(60);
const BREAKER: BreakerSettings = BreakerSettings { failure_threshold: 5, open_for: Duration::from_secs(60) };

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// An enabled webhook with no overrides; change fields before passing it to `webhook_with`.
fn spec() -> NewWebhook {
    NewWebhook { url: "http://127.0.0.1:9/x".into(), enabled: true, ..NewWebhook::default() }
}

async fn webhook(db: &TestDatabase) -> i64 {
    webhook_with(db, spec()).await
}

async fn webhook_with(db: &TestDatabase, new: NewWebhook) -> i64 {
    db.create_webhook(new).await.webhook_id
}

/// Inserts one row the way a producer does and returns its delivery id.
async fn insert(client: &Client, webhook_id: i64) -> i64 {
    client
        .query_one(
            "INSERT INTO hookfleet.delivery_queue (webhook_id, message_body) VALUES ($1, '{\"n\":1}') \
             RETURNING delivery_id",
            &[&webhook_id],
        )
        .await
        .expect("insert")
        .get(0)
}

/// Inserts `n` rows for `webhook_id` in one statement; their ids in order.
async fn insert_many(client: &Client, webhook_id: i64, n: i32) -> Vec<i64> {
    client
        .query(
            "INSERT INTO hookfleet.delivery_queue (webhook_id, message_body) \
             SELECT $1, jsonb_build_object('n', g) FROM generate_series(1, $2::integer) g RETURNING delivery_id",
            &[&webhook_id, &n],
        )
        .await
        .expect("insert rows")
        .iter()
        .map(|row| row.get(0))
        .collect::<BTreeSet<i64>>()
        .into_iter()
        .collect()
}

/// Inserts a row with an ordering key (or none).
async fn insert_keyed(client: &Client, webhook_id: i64, key: Option<&str>) -> i64 {
    client
        .query_one(
            "INSERT INTO hookfleet.delivery_queue (webhook_id, message_body, ordering_key) VALUES ($1, '{}', $2) \
             RETURNING delivery_id",
            &[&webhook_id, &key],
        )
        .await
        .expect("insert keyed row")
        .get(0)
}

/// Every row of `table` as JSON text, ordered by `key`: equal before and after means nothing changed.
async fn table(client: &Client, table: &str, key: &str) -> String {
    client
        .query_one(&format!("SELECT COALESCE(jsonb_agg(to_jsonb(t) ORDER BY t.{key}), '[]')::text FROM {table} t"), &[])
        .await
        .expect("table snapshot")
        .get(0)
}

async fn queue_rows(client: &Client) -> String {
    table(client, "hookfleet.delivery_queue", "delivery_id").await
}

/// The given rows, in full, as JSON text.
async fn rows_of(client: &Client, ids: &[i64]) -> String {
    client
        .query_one(
            "SELECT COALESCE(jsonb_agg(to_jsonb(q) ORDER BY q.delivery_id), '[]')::text \
             FROM hookfleet.delivery_queue q WHERE q.delivery_id = ANY ($1)",
            &[&ids],
        )
        .await
        .expect("rows")
        .get(0)
}

async fn count(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap_or_else(|error| panic!("{sql}: {error}")).get(0)
}

async fn queue_count(client: &Client) -> i64 {
    count(client, "SELECT count(*) FROM hookfleet.delivery_queue").await
}

async fn status(client: &Client, delivery_id: i64) -> String {
    client
        .query_one("SELECT delivery_status FROM hookfleet.delivery_queue WHERE delivery_id = $1", &[&delivery_id])
        .await
        .expect("status")
        .get(0)
}

async fn set_status(client: &Client, delivery_id: i64, status: &str) {
    client
        .execute(
            "UPDATE hookfleet.delivery_queue SET delivery_status = $2 WHERE delivery_id = $1",
            &[&delivery_id, &status],
        )
        .await
        .expect("set status");
}

/// Calls `hookfleet.cancel_delivery`: (whether this call cancelled it, the status afterwards).
async fn cancel(client: &Client, delivery_id: i64) -> (bool, String) {
    let row = client
        .query_one("SELECT cancelled, delivery_status FROM hookfleet.cancel_delivery($1)", &[&delivery_id])
        .await
        .expect("cancel_delivery");
    (row.get(0), row.get(1))
}

/// Claims through `hookfleet.get_ready_deliveries` with a 60 s lease; ids in the order returned.
async fn claim(client: &Client, worker: &str, n: i32) -> Vec<i64> {
    psql_claim(client, worker, n).await
}

fn sorted(mut ids: Vec<i64>) -> Vec<i64> {
    ids.sort_unstable();
    ids
}

/// Seconds from the current transaction's `now()` to the timestamp expression `expr` of a row.
async fn seconds_from_now(client: &Client, expr: &str, delivery_id: i64) -> f64 {
    client
        .query_one(
            &format!("SELECT extract(epoch FROM {expr} - now())::float8 FROM hookfleet.delivery_queue WHERE delivery_id = $1"),
            &[&delivery_id],
        )
        .await
        .expect("seconds from now")
        .get(0)
}

fn db_error(error: &tokio_postgres::Error) -> &tokio_postgres::error::DbError {
    error.as_db_error().unwrap_or_else(|| panic!("expected a database error, got {error}"))
}

/// Asserts that `sql` fails with `code`, optionally naming `constraint`, and changes no queue row.
async fn assert_refused(
    client: &Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    code: &SqlState,
    constraint: Option<&str>,
) -> String {
    let before = queue_rows(client).await;
    let error = client.execute(sql, params).await.expect_err(sql);
    let db = db_error(&error);
    assert_eq!(db.code(), code, "{sql}: {}", db.message());
    if let Some(constraint) = constraint {
        assert_eq!(db.constraint(), Some(constraint), "{sql}: {}", db.message());
    }
    assert_eq!(queue_rows(client).await, before, "{sql} changed the queue");
    db.message().to_owned()
}

/// A timestamp PostgreSQL stores exactly (whole microseconds).
fn micros_now() -> SystemTime {
    let micros = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_micros();
    UNIX_EPOCH + Duration::from_micros(u64::try_from(micros).expect("micros"))
}

fn record(claimed: &ClaimedDelivery, outcome: Outcome, status_code: Option<u16>) -> AttemptRecord {
    AttemptRecord {
        delivery_id: claimed.delivery_id,
        webhook_id: claimed.webhook_id,
        outcome,
        retry_count: claimed.retry_count,
        retry_delay: Duration::ZERO,
        attempt_number: claimed.retry_count + 1,
        status_code,
        started_at: micros_now(),
        duration: Duration::from_millis(120),
        error_class: None,
        error_message: None,
        response_excerpt: None,
        locked_until: claimed.locked_until,
    }
}

fn queue(db: &TestDatabase) -> Queue {
    Queue::new(hookfleet_core::db::pool(&db.url, "t", 2).expect("pool"))
}

/// Calls `hookfleet.update_webhook_health` and returns what it returns.
async fn health(
    client: &Client,
    webhook_id: i64,
    status_code: Option<i32>,
    threshold: i32,
    open_seconds: f64,
) -> Option<String> {
    let error = status_code.filter(|code| !(200..300).contains(code)).map(|code| format!("HTTP {code}"));
    client
        .query_one(
            "SELECT hookfleet.update_webhook_health($1, $2, $3, $4, $5, $6)",
            &[&webhook_id, &status_code, &10.0_f64, &error.as_deref().or(Some("timeout")), &threshold, &open_seconds],
        )
        .await
        .expect("update_webhook_health")
        .get(0)
}

#[derive(Debug, PartialEq)]
struct Health {
    total: i64,
    successes: i64,
    failures: i64,
    consecutive_failures: i32,
    health_status: String,
    circuit_state: String,
}

async fn health_row(client: &Client, webhook_id: i64) -> (Health, f64) {
    let row = client
        .query_one(
            "SELECT total_attempts, successful_attempts, failed_attempts, consecutive_failures, health_status, \
             circuit_state, success_rate FROM hookfleet.webhook_health_metrics WHERE webhook_id = $1",
            &[&webhook_id],
        )
        .await
        .expect("health row");
    (
        Health {
            total: row.get(0),
            successes: row.get(1),
            failures: row.get(2),
            consecutive_failures: row.get(3),
            health_status: row.get(4),
            circuit_state: row.get(5),
        },
        row.get(6),
    )
}

/// (seconds since circuit_opened_at, circuit_open_until - circuit_opened_at in seconds).
async fn breaker_times(client: &Client, webhook_id: i64) -> (Option<f64>, Option<f64>) {
    let row = client
        .query_one(
            "SELECT extract(epoch FROM now() - circuit_opened_at)::float8, \
                    extract(epoch FROM circuit_open_until - circuit_opened_at)::float8 \
             FROM hookfleet.webhook_health_metrics WHERE webhook_id = $1",
            &[&webhook_id],
        )
        .await
        .expect("breaker times");
    (row.get(0), row.get(1))
}

async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(connection);
    client
}

/// The objects of schema `hookfleet` (relations with their kind, and function signatures).
async fn schema_fingerprint(client: &Client) -> Vec<String> {
    let rows = client
        .query(
            "SELECT c.relkind::text || ' ' || c.relname FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'hookfleet' \
             UNION ALL \
             SELECT 'f ' || p.oid::regprocedure::text FROM pg_proc p \
             JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'hookfleet' \
             UNION ALL \
             SELECT 't ' || t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'hookfleet' AND NOT t.tgisinternal \
             ORDER BY 1",
            &[],
        )
        .await
        .expect("schema fingerprint");
    rows.iter().map(|row| row.get(0)).collect()
}

/// A connection that LISTENs on `hookfleet_deliveries` and forwards every notification.
async fn listener(url: &str) -> (Client, tokio::sync::mpsc::UnboundedReceiver<Notification>) {
    let (client, mut connection) = tokio_postgres::connect(url, NoTls).await.expect("connect listener");
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            match message {
                Ok(AsyncMessage::Notification(notification)) => {
                    let _ = sender.send(notification);
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    client.batch_execute("LISTEN hookfleet_deliveries").await.expect("LISTEN");
    (client, receiver)
}

/// Waits up to 2 s for one notification, then 300 ms to be sure no second one follows.
async fn expect_exactly_one_notification(receiver: &mut tokio::sync::mpsc::UnboundedReceiver<Notification>) {
    let first = tokio::time::timeout(Duration::from_secs(2), receiver.recv())
        .await
        .expect("a notification within 2 s")
        .expect("listener alive");
    assert_eq!(first.channel(), "hookfleet_deliveries");
    assert_eq!(first.payload(), "");
    let second = tokio::time::timeout(Duration::from_millis(300), receiver.recv()).await;
    assert!(second.is_err(), "a second notification arrived: {second:?}");
}

// ---------------------------------------------------------------------------------------------
// 1. Producer input refused
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_unknown_webhook_id_is_refused_by_the_foreign_key() {
    let db = database().await;
    let client = db.client().await;
    let hook = webhook(&db).await;
    insert(&client, hook).await;
    assert_refused(
        &client,
        "INSERT INTO hookfleet.delivery_queue (webhook_id, message_body) VALUES (999999, '{}')",
        &[],
        &SqlState::FOREIGN_KEY_VIOLATION,
        Some("delivery_queue_webhook_id_fkey"),
    )
    .await;
    // One bad row in a multi-row INSERT refuses the whole statement.
    assert_refused(
        &client,
        "INSERT INTO hookfleet.delivery_queue (webhook_id, message_body) VALUES ($1, '{}'), (999999, '{}')",
        &[&hook],
        &SqlState::FOREIGN_KEY_VIOLATION,
        Some("delivery_queue_webhook_id_fkey"),
    )
    .await;
    assert_eq!(queue_count(&client).await, 1);
}

#[tokio::test]
async fn a_body_over_the_size_limit_is_refused_naming_its_bytes_and_the_limit() {
    let db = database().await;
    let mut client = db.client().await;
    let hook = webhook(&db).await;
    // jsonb renders {"x": "<text>"}: 9 bytes around the text.
    let body_of = |bytes: usize| json!({ "x": "a".repeat(bytes - 9) });
    let sql = "INSERT INTO hookfleet.delivery_queue (webhook_id, message_body) VALUES ($1, $2)";

    client.execute(sql, &[&hook, &body_of(262_144)]).await.expect("a body of exactly 256 KiB is accepted");
    let message =
        assert_refused(&client, sql, &[&hook, &body_of(262_145)], &SqlState::PROGRAM_LIMIT_EXCEEDED, None).await;
    assert_eq!(message, "hookfleet: message_body is 262145 bytes, over the limit of 262144 bytes");
    let error = client.execute(sql, &[&hook, &body_of(262_145)]).await.expect_err("over the limit");
    assert!(db_error(&error).hint().is_some_and(|hint| hint.contains("HOOKFLEET_MAX_BODY_BYTES")), "{error:?}");

    // `hookfleet migrate` rewrites the limit; the database applies it at once.
    let report = hookfleet_core::db::migrate(&mut client, 100).await.expect("migrate");
    assert!(report.applied.is_empty(), "the database was already migrated: {report:?}");
    let setting: String = client
        .query_one("SELECT value FROM hookfleet.settings WHERE name = 'max_body_bytes'", &[])
        .await
        .expect("setting")
        .get(0);
    assert_eq!(setting, "100");
    let message = assert_refused(&client, sql, &[&hook, &body_of(200)], &SqlState::PROGRAM_LIMIT_EXCEEDED, None).await;
    assert_eq!(message, "hookfleet: message_body is 200 bytes, over the limit of 100 bytes");
    // Bytes, not characters: 50 two-byte characters make 109 bytes.
    let message = assert_refused(
        &client,
        sql,
        &[&hook, &json!({ "x": "é".repeat(50) })],
        &SqlState::PROGRAM_LIMIT_EXCEEDED,
        None,
    )
    .await;
    assert_eq!(message, "hookfleet: message_body is 109 bytes, over the limit of 100 bytes");
    let before = queue_count(&client).await;
    client.execute(sql, &[&hook, &body_of(100)]).await.expect("a body at the new limit is accepted");
    client.execute(sql, &[&hook, &json!({"small": true})]).await.expect("a small body is accepted");
    assert_eq!(queue_count(&client).await, before + 2);

    // Growing a stored body past the limit is refused too.
    let id = insert(&client, hook).await;
    let message = assert_refused(
        &client,
        "UPDATE hookfleet.delivery_queue SET message_body = $2 WHERE delivery_id = $1",
        &[&id, &body_of(101)],
        &SqlState::PROGRAM_LIMIT_EXCEEDED,
        None,
    )
    .await;
    assert_eq!(message, "hookfleet: message_body is 101 bytes, over the limit of 100 bytes");
}

#[tokio::test]
async fn negative_or_excessive_max_retries_is_refused() {
    let db = database().await;
    let client = db.client().await;
    let hook = webhook(&db).await;
    let sql = "INSERT INTO hookfleet.delivery_queue (webhook_id, message_body, max_retries) VALUES ($1, '{}', $2)";
    for retries in [-1_i32, 101] {
        assert_refused(
            &client,
            sql,
            &[&hook, &retries],
            &SqlState::CHECK_VIOLATION,
            Some("delivery_queue_max_retries_range"),
        )
        .await;
    }
    for retries in [0_i32, 100] {
        client.execute(sql, &[&hook, &retries]).await.expect("0 and 100 retries are allowed");
    }
    assert_eq!(queue_count(&client).await, 2);
}

#[tokio::test]
async fn an_unknown_delivery_status_is_refused_on_update() {
    let db = database().await;
    let client = db.client().await;
    let hook = webhook(&db).await;
    let id = insert(&client, hook).await;
    assert_refused(
        &client,
        "UPDATE hookfleet.delivery_queue SET delivery_status = 'sent' WHERE delivery_id = $1",
        &[&id],
        &SqlState::CHECK_VIOLATION,
        Some("delivery_queue_delivery_status_valid"),
    )
    .await;
    assert_eq!(status(&client, id).await, "pending");
}

#[tokio::test]
async fn inserting_a_delivery_that_is_not_pending_is_refused() {
    let db = database().await;
    let client = db.client().await;
    let hook = webhook(&db).await;
    let sql = "INSERT INTO hookfleet.delivery_queue (webhook_id, message_body, delivery_status) VALUES ($1, '{}', $2)";
    for status in ["delivered", "in_flight", "dead", "cancelled"] {
        let message = assert_refused(&client, sql, &[&hook, &status], &SqlState::CHECK_VIOLATION, None).await;
        assert_eq!(message, format!("hookfleet: new deliveries must be inserted as pending, not {status}"));
    }
    assert_eq!(queue_count(&client).await, 0);
}

#[tokio::test]
async fn a_message_id_that_is_not_header_safe_is_refused() {
    let db = database().await;
    let client = db.client().await;
    let hook = webhook(&db).await;
    let sql = "INSERT INTO hookfleet.delivery_queue (webhook_id, message_body, message_id) VALUES ($1, '{}', $2)";
    let too_long = "a".repeat(257);
    for bad in ["has space", "has\nnewline", "tab\there", "", "ünïcode", too_long.as_str()] {
        assert_refused(
            &client,
            sql,
            &[&hook, &bad],
            &SqlState::CHECK_VIOLATION,
            Some("delivery_queue_message_id_format"),
        )
        .await;
    }
    let longest = "a".repeat(256);
    for good in ["evt_1", "a:b/c-d.e~f!", longest.as_str()] {
        client.execute(sql, &[&hook, &good]).await.unwrap_or_else(|error| panic!("{good:?} refused: {error}"));
    }
    assert_eq!(queue_count(&client).await, 3);
}

#[tokio::test]
async fn an_empty_event_type_or_ordering_key_is_refused() {
    let db = database().await;
    let client = db.client().await;
    let hook = webhook(&db).await;
    assert_refused(
        &client,
        "INSERT INTO hookfleet.delivery_queue (webhook_id, message_body, event_type) VALUES ($1, '{}', '')",
        &[&hook],
        &SqlState::CHECK_VIOLATION,
        Some("delivery_queue_event_type_length"),
    )
    .await;
    assert_refused(
        &client,
        "INSERT INTO hookfleet.delivery_queue (webhook_id, message_body, ordering_key) VALUES ($1, '{}', '')",
        &[&hook],
        &SqlState::CHECK_VIOLATION,
        Some("delivery_queue_ordering_key_length"),
    )
    .await;
    assert_eq!(queue_count(&client).await, 0);
}

// ---------------------------------------------------------------------------------------------
// 2. Defaults and idempotent inserts
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_deliver_at_that_is_not_a_finite_time_is_refused() {
    let db = database().await;
    let client = db.client().await;
    let hook = webhook(&db).await;
    for when in ["-infinity", "infinity"] {
        let message = assert_refused(
            &client,
            &format!(
                "INSERT INTO hookfleet.delivery_queue (webhook_id, message_body, deliver_at) VALUES ($1, '{{}}', '{when}')"
            ),
            &[&hook],
            &SqlState::CHECK_VIOLATION,
            None,
        )
        .await;
        assert!(message.contains("deliver_at must be a finite time"), "{message}");
    }
}

#[tokio::test]
async fn a_minimal_insert_gets_the_documented_defaults() {
    let db = database().await;
    let client = db.client().await;
    let hook = webhook(&db).await;
    let id = insert(&client, hook).await;
    let row = client
        .query_one(
            "SELECT message_id ~ '^msg_[0-9a-f]{32}$', next_attempt_at = deliver_at, retry_count, delivery_status, \
                    priority, max_retries, event_type, ordering_key, locked_by, locked_until IS NULL, \
                    delivered_at IS NULL, last_status_code, last_error, \
                    abs(extract(epoch FROM now() - deliver_at))::float8 < 5 \
             FROM hookfleet.delivery_queue WHERE delivery_id = $1",
            &[&id],
        )
        .await
        .expect("row");
    assert!(row.get::<_, bool>(0), "message_id is msg_ + 32 hex");
    assert!(row.get::<_, bool>(1), "next_attempt_at = deliver_at");
    assert_eq!(row.get::<_, i32>(2), 0);
    assert_eq!(row.get::<_, String>(3), "pending");
    assert_eq!(row.get::<_, i16>(4), 0);
    assert_eq!(row.get::<_, Option<i32>>(5), None);
    assert_eq!(row.get::<_, Option<String>>(6), None);
    assert_eq!(row.get::<_, Option<String>>(7), None);
    assert_eq!(row.get::<_, Option<String>>(8), None);
    assert!(row.get::<_, bool>(9) && row.get::<_, bool>(10));
    assert_eq!(row.get::<_, Option<i32>>(11), None);
    assert_eq!(row.get::<_, Option<String>>(12), None);
    assert!(row.get::<_, bool>(13), "deliver_at defaults to now");
    insert(&client, hook).await;
    assert_eq!(
        count(&client, "SELECT count(DISTINCT message_id) FROM hookfleet.delivery_queue").await,
        2,
        "each insert gets its own message_id"
    );
}

#[tokio::test]
async fn a_scheduled_insert_starts_at_deliver_at_and_fleet_columns_are_reset() {
    let db = database().await;
    let client = db.client().await;
    let hook = webhook(&db).await;
    // A producer cannot pre-claim or pre-age a row: the trigger resets what the fleet maintains.
    let id: i64 = client
        .query_one(
            "INSERT INTO hookfleet.delivery_queue (webhook_id, message_body, deliver_at, next_attempt_at, retry_count, \
                                                  locked_by, locked_until) \
             VALUES ($1, '{}', '2030-01-01 00:00:00+00', '2000-01-01 00:00:00+00', 7, 'me', now() + interval '1 h') \
             RETURNING delivery_id",
            &[&hook],
        )
        .await
        .expect("insert")
        .get(0);
    let row = client
        .query_one(
            "SELECT next_attempt_at = timestamptz '2030-01-01 00:00:00+00', retry_count, locked_by, locked_until IS NULL \
             FROM hookfleet.delivery_queue WHERE delivery_id = $1",
            &[&id],
        )
        .await
        .expect("row");
    assert!(row.get::<_, bool>(0), "next_attempt_at = deliver_at");
    assert_eq!(row.get::<_, i32>(1), 0);
    assert_eq!(row.get::<_, Option<String>>(2), None);
    assert!(row.get::<_, bool>(3));
}

#[tokio::test]
async fn a_retried_insert_with_the_same_message_id_inserts_nothing() {
    let db = database().await;
    let client = db.client().await;
    let hook = webhook(&db).await;
    let sql = "INSERT INTO hookfleet.delivery_queue (webhook_id, message_id, message_body) VALUES ($1, 'order-1', $2) \
               ON CONFLICT ON CONSTRAINT delivery_queue_message_id_unique DO NOTHING";
    assert_eq!(client.execute(sql, &[&hook, &json!({"try": 1})]).await.expect("first insert"), 1);
    let before = queue_rows(&client).await;
    assert_eq!(client.execute(sql, &[&hook, &json!({"try": 2})]).await.expect("retried insert"), 0);
    assert_eq!(queue_rows(&client).await, before, "the first row is kept as it was");
    // Without ON CONFLICT the duplicate is a unique violation.
    assert_refused(
        &client,
        "INSERT INTO hookfleet.delivery_queue (webhook_id, message_id, message_body) VALUES ($1, 'order-1', '{}')",
        &[&hook],
        &SqlState::UNIQUE_VIOLATION,
        Some("delivery_queue_message_id_unique"),
    )
    .await;
}

#[tokio::test]
async fn the_same_message_id_for_two_webhooks_is_two_deliveries() {
    let db = database().await;
    let client = db.client().await;
    let first = webhook(&db).await;
    let second = webhook(&db).await;
    let sql =
        "INSERT INTO hookfleet.delivery_queue (webhook_id, message_id, message_body) VALUES ($1, 'shared', '{}') \
               ON CONFLICT ON CONSTRAINT delivery_queue_message_id_unique DO NOTHING";
    assert_eq!(client.execute(sql, &[&first]).await.expect("first webhook"), 1);
    assert_eq!(client.execute(sql, &[&second]).await.expect("second webhook"), 1);
    assert_eq!(count(&client, "SELECT count(*) FROM hookfleet.delivery_queue WHERE message_id = 'shared'").await, 2);
}

// ---------------------------------------------------------------------------------------------
// 3. hookfleet.get_ready_deliveries
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn claim_takes_at_most_n_rows_and_leases_them_to_the_worker() {
    let db = database().await;
    let client = db.client().await;
    let hook = webhook(&db).await;
    let ids = insert_many(&client, hook, 5).await;
    let rows = client
        .query(
            "SELECT delivery_id, webhook_id, webhook_version, message_id, event_type, body, retry_count, max_retries \
             FROM hookfleet.get_ready_deliveries('w1', 3, interval '60 seconds')",
            &[],
        )
        .await
        .expect("claim");
    let claimed = sorted(rows.iter().map(|row| row.get(0)).collect());
    assert_eq!(claimed, ids[..3]);
    for row in &rows {
        assert_eq!(row.get::<_, i64>(1), hook);
        assert_eq!(row.get::<_, i64>(2), 1, "webhook_version");
        assert!(row.get::<_, String>(3).starts_with("msg_"));
        assert_eq!(row.get::<_, Option<String>>(4), None);
        let body: serde_json::Value = serde_json::from_str(&row.get::<_, String>(5)).expect("body is JSON text");
        assert!(body["n"].is_i64());
        assert_eq!(row.get::<_, i32>(6), 0);
        assert_eq!(row.get::<_, Option<i32>>(7), None);
    }
    let untouched = rows_of(&client, &ids[3..]).await;
    for &id in &claimed {
        let row = client
            .query_one(
                "SELECT delivery_status, locked_by, retry_count FROM hookfleet.delivery_queue WHERE delivery_id = $1",
                &[&id],
            )
            .await
            .expect("row");
        assert_eq!(
            (row.get::<_, String>(0), row.get::<_, Option<String>>(1), row.get::<_, i32>(2)),
            ("in_flight".into(), Some("w1".into()), 0)
        );
        let lease = seconds_from_now(&client, "locked_until", id).await;
        assert!((55.0..=60.0).contains(&lease), "locked_until is now() + 60 s, got {lease}");
    }
    assert!(claim(&client, "w1", 0).await.is_empty(), "a batch of 0 claims nothing");
    assert_eq!(rows_of(&client, &ids[3..]).await, untouched, "unclaimed rows are not touched");
    assert_eq!(sorted(claim(&client, "w2", 10).await), ids[3..], "the rest, and no more");
}

#[tokio::test]
async fn claim_order_is_priority_then_due_time_then_delivery_id_and_never_the_future() {
    let db = database().await;
    let client = db.client().await;
    let hook = webhook(&db).await;
    let rows: [(&str, i16, &str); 6] = [
        ("a", 0, "2024-01-01 00:00:00+00"),
        ("b", 5, "2024-01-01 00:00:09+00"),
        ("c", 5, "2024-01-01 00:00:05+00"),
        ("d", 0, "2024-01-01 00:00:00+00"),
        ("e", -1, "2023-01-01 00:00:00+00"),
        ("future", 100, "2999-01-01 00:00:00+00"),
    ];
    for (message_id, priority, deliver_at) in rows {
        client
            .execute(
                "INSERT INTO hookfleet.delivery_queue (webhook_id, message_id, message_body, priority, deliver_at) \
                 VALUES ($1, $2, '{}', $3, $4::text::timestamptz)",
                &[&hook, &message_id, &priority, &deliver_at],
            )
            .await
            .expect("insert");
    }
    let future_row = queue_rows(&client).await;
    let mut order = Vec::new();
    for _ in 0..6 {
        let rows = client
            .query("SELECT message_id FROM hookfleet.get_ready_deliveries('w1', 1, interval '60 seconds')", &[])
            .await
            .expect("claim");
        assert!(rows.len() <= 1);
        order.extend(rows.iter().map(|row| row.get::<_, String>(0)));
    }
    assert_eq!(order, ["c", "b", "a", "d", "e"]);
    let future: String = client
        .query_one("SELECT to_jsonb(q)::text FROM hookfleet.delivery_queue q WHERE message_id = 'future'", &[])
        .await
        .expect("future row")
        .get(0);
    assert!(future_row.contains(&future), "the scheduled row was never touched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_skips_rows_locked_by_an_open_claim_instead_of_waiting() {
    let db = database().await;
    let mut first = db.client().await;
    let second = db.client().await;
    let hook = webhook(&db).await;
    let other_hook = webhook(&db).await;
    let mut ids = insert_many(&first, hook, 3).await;

    let transaction = first.transaction().await.expect("begin");
    let held = psql_claim(&transaction, "a", 3).await;
    assert_eq!(sorted(held.clone()), ids[..3]);
    ids.extend(insert_many(&second, other_hook, 3).await);
    // The open transaction still holds its rows: the second claim must skip them, not wait.
    let other = tokio::time::timeout(Duration::from_secs(10), claim(&second, "b", 10))
        .await
        .expect("the second claim does not wait for the open transaction");
    // The open claim holds its webhook (claims of one webhook take turns, which is what keeps
    // per-key order); every other webhook's rows are claimed at once.
    assert_eq!(sorted(other.clone()), ids[3..]);
    assert!(held.iter().all(|id| !other.contains(id)), "disjoint claims");
    transaction.commit().await.expect("commit");
    assert!(claim(&second, "c", 10).await.is_empty());
    let owners = client_owners(&second).await;
    assert_eq!(owners, BTreeMap::from([("a".to_owned(), 3), ("b".to_owned(), 3)]));
}

async fn client_owners(client: &Client) -> BTreeMap<String, i64> {
    client
        .query(
            "SELECT locked_by, count(*) FROM hookfleet.delivery_queue WHERE delivery_status = 'in_flight' GROUP BY 1",
            &[],
        )
        .await
        .expect("owners")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claims_never_take_a_row_twice() {
    let db = database().await;
    let client = db.client().await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        let hook = webhook(&db).await;
        ids.extend(insert_many(&client, hook, 10).await);
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(5));
    let mut tasks = Vec::new();
    for worker in 0..5 {
        let claimer = db.client().await;
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            // Claims of one webhook take turns (a webhook another claim is deciding for is
            // skipped, not waited for), so each claimer goes on until nothing is pending.
            let mut mine = Vec::new();
            for _ in 0..500 {
                let claimed = claim(&claimer, &format!("w{worker}"), 10).await;
                assert!(claimed.len() <= 10, "a claim of 10 took {}", claimed.len());
                mine.extend(claimed);
                let pending: i64 = claimer
                    .query_one("SELECT count(*) FROM hookfleet.delivery_queue WHERE delivery_status = 'pending'", &[])
                    .await
                    .expect("pending")
                    .get(0);
                if pending == 0 {
                    break;
                }
            }
            mine
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("claim task"));
    }
    let distinct: BTreeSet<i64> = all.iter().copied().collect();
    assert_eq!(distinct.len(), all.len(), "a row was claimed twice: {all:?}");
    assert_eq!(distinct.into_iter().collect::<Vec<_>>(), ids, "every row claimed exactly once");
    let owners = client_owners(&client).await;
    assert_eq!(owners.values().sum::<i64>(), 50);
}

#[tokio::test]
async fn claim_skips_disabled_webhooks_without_touching_their_rows() {
    let db = database().await;
    let client = db.client().await;
    let enabled = webhook(&db).await;
    let disabled = webhook(&db).await;
    let live = insert_many(&client, enabled, 2).await;
    let parked = insert_many(&client, disabled, 2).await;
    client
        .execute("UPDATE hookfleet.webhooks SET enabled = false WHERE webhook_id = $1", &[&disabled])
        .await
        .expect("disable");
    let before = rows_of(&client, &parked).await;
    assert_eq!(sorted(claim(&client, "w1", 10).await), live);
    assert_eq!(rows_of(&client, &parked).await, before);
    client
        .execute("UPDATE hookfleet.webhooks SET enabled = true WHERE webhook_id = $1", &[&disabled])
        .await
        .expect("enable");
    assert_eq!(sorted(claim(&client, "w1", 10).await), parked);
}

#[tokio::test]
async fn claim_skips_a_webhook_whose_circuit_is_open_without_touching_its_rows() {
    let db = database().await;
    let client = db.client().await;
    let healthy = webhook(&db).await;
    let broken = webhook(&db).await;
    let broken_rows = insert_many(&client, broken, 2).await;
    let healthy_rows = insert_many(&client, healthy, 2).await;
    // Threshold 1: this one failure opens the circuit for 60 s.
    assert_eq!(open_circuit(&client, broken).await.as_deref(), Some("unavailable"));
    let before = rows_of(&client, &broken_rows).await;
    assert_eq!(sorted(claim(&client, "w1", 10).await), healthy_rows, "the other webhook is not held back");
    assert!(claim(&client, "w1", 10).await.is_empty());
    assert_eq!(rows_of(&client, &broken_rows).await, before, "skipped rows keep everything, retry budget included");
}

#[tokio::test]
async fn claim_resumes_once_circuit_open_until_has_passed() {
    let db = database().await;
    let client = db.client().await;
    let hook = webhook(&db).await;
    let row = insert(&client, hook).await;
    open_circuit(&client, hook).await;
    assert!(claim(&client, "w1", 10).await.is_empty());
    pass_open_period(&client, hook).await;
    assert_eq!(claim(&client, "w1", 10).await, [row]);
}

#[tokio::test]
async fn after_the_open_period_only_one_probe_is_claimed() {
    let db = database().await;
    let client = db.client().await;
    let hook = webhook(&db).await;
    let rows = insert_many(&client, hook, 3).await;
    open_circuit(&client, hook).await;
    pass_open_period(&client, hook).await;
    let probe = claim(&client, "w1", 10).await;
    assert_eq!(probe, rows[..1], "half-open admits exactly one probe");
    assert!(claim(&client, "w2", 10).await.is_empty(), "no second probe while the first is in flight");
}

#[tokio::test]
async fn claim_stops_at_a_webhooks_max_in_flight() {
    let db = database().await;
    let client = db.client().await;
    let hook = webhook_with(&db, NewWebhook { max_in_flight: Some(2), ..spec() }).await;
    let rows = insert_many(&client, hook, 5).await;
    assert_eq!(sorted(claim(&client, "w1", 10).await), rows[..2]);
    assert!(claim(&client, "w2", 10).await.is_empty(), "the webhook is at max_in_flight");
}

/// What `claim_deliveries` answered: claimed ids (in order) and the held-back reports.
#[derive(Debug, Default)]
struct FlowClaim {
    claimed: Vec<i64>,
    probes: Vec<i64>,
    held: Vec<(i64, String)>,
    /// For `rate_limit` holds: seconds until the next token.
    token_in: Vec<f64>,
}

/// The workers' claim with flow-control inputs: default rate and burst, per-worker cap, busy counts.
async fn flow_claim(
    client: &Client,
    worker: &str,
    n: i32,
    rate: (Option<f64>, Option<i32>),
    slots: Option<i32>,
    busy: &[(i64, i32)],
) -> FlowClaim {
    let (busy_ids, busy_counts): (Vec<i64>, Vec<i32>) = busy.iter().copied().unzip();
    let rows = client
        .query(
            "SELECT delivery_id, webhook_id, probe, held_back, extract(epoch FROM locked_until - now())::float8 \
             FROM hookfleet.claim_deliveries($1, $2, interval '60 seconds', $3, $4, $5, $6, $7)",
            &[&worker, &n, &rate.0, &rate.1, &slots, &busy_ids, &busy_counts],
        )
        .await
        .expect("claim_deliveries");
    let mut claim = FlowClaim::default();
    for row in rows {
        match row.get::<_, Option<i64>>(0) {
            Some(id) => {
                claim.claimed.push(id);
                if row.get::<_, bool>(2) {
                    claim.probes.push(row.get(1));
                }
            }
            None => {
                let reason: String = row.get(3);
                if reason == "rate_limit" {
                    claim.token_in.push(row.get(4));
                }
                claim.held.push((row.get(1), reason));
            }
        }
    }
    claim
}

/// Moves a webhook's token bucket `seconds` into the past, as if that much time had gone by.
async fn age_bucket(client: &Client, webhook_id: i64, seconds: f64) {
    client
        .execute(
            "UPDATE hookfleet.webhook_rate_limits SET tat = tat - $2 WHERE webhook_id = $1",
            &[&webhook_id, &seconds],
        )
        .await
        .expect("age the bucket");
}

#[tokio::test]
async fn the_rate_limit_admits_the_burst_then_one_row_per_token_whichever_worker_claims() {
    // Slow enough that no token comes due while the test runs, unless the test says so.
    let db = database().await;
    let client = db.client().await;
    let hook = webhook_with(&db, NewWebhook { rate_limit_rps: Some(0.1), rate_limit_burst: Some(3), ..spec() }).await;
    let rows = insert_many(&client, hook, 10).await;

    let first = flow_claim(&client, "w1", 10, (None, None), None, &[]).await;
    assert_eq!(first.claimed, rows[..3], "a full bucket admits the burst, in order");
    let second = flow_claim(&client, "w2", 10, (None, None), None, &[]).await;
    assert!(second.claimed.is_empty(), "the bucket is shared by every worker");
    assert_eq!(second.held, [(hook, "rate_limit".to_owned())]);
    let wait = second.token_in[0];
    assert!((9.0..=10.0).contains(&wait), "the next token is due in about 10 s, not {wait}");

    age_bucket(&client, hook, 20.0).await;
    let third = flow_claim(&client, "w3", 10, (None, None), None, &[]).await;
    assert_eq!(third.claimed, rows[3..5], "twenty seconds at 0.1/s is two tokens");
    // Held-back rows were not touched: pending, no retry used.
    let untouched = db
        .count("SELECT count(*) FROM hookfleet.delivery_queue WHERE delivery_status = 'pending' AND retry_count = 0")
        .await;
    assert_eq!(untouched, 5);
}

#[tokio::test]
async fn the_default_rate_applies_to_webhooks_without_their_own_and_unused_tokens_stay() {
    let db = database().await;
    let client = db.client().await;
    let default_limited = webhook(&db).await;
    let own = webhook_with(&db, NewWebhook { rate_limit_rps: Some(0.1), rate_limit_burst: Some(4), ..spec() }).await;
    let defaults = insert_many(&client, default_limited, 5).await;
    let owns = insert_many(&client, own, 5).await;

    let claim = flow_claim(&client, "w1", 20, (Some(0.1), Some(2)), None, &[]).await;
    assert_eq!(sorted(claim.claimed), [&defaults[..2], &owns[..4]].concat());
    // Both took all their tokens allowed: reported, with when the next token is due (10 s at 0.1/s).
    assert_eq!(claim.held, [(default_limited, "rate_limit".to_owned()), (own, "rate_limit".to_owned())]);
    assert!(claim.token_in.iter().all(|wait| (9.0..=10.5).contains(wait)), "{:?}", claim.token_in);

    // A claim spends only the tokens of the rows it took.
    let quiet = webhook_with(&db, NewWebhook { rate_limit_rps: Some(0.1), rate_limit_burst: Some(5), ..spec() }).await;
    let one = insert_many(&client, quiet, 1).await;
    assert_eq!(flow_claim(&client, "w1", 20, (Some(0.1), Some(2)), None, &[]).await.claimed, one);
    let more = insert_many(&client, quiet, 6).await;
    let next = flow_claim(&client, "w1", 20, (Some(0.1), Some(2)), None, &[]).await;
    assert_eq!(next.claimed, more[..4], "five tokens, one spent");
}

#[tokio::test]
async fn a_bucket_far_from_empty_is_claimed_without_its_lock_and_still_spent() {
    let db = database().await;
    let client = db.client().await;
    // 1/s with a burst of 2,000: far more tokens than 16 batches, so no lock after the first claim.
    let hook =
        webhook_with(&db, NewWebhook { rate_limit_rps: Some(1.0), rate_limit_burst: Some(2000), ..spec() }).await;
    let rows = insert_many(&client, hook, 30).await;
    let debt = || async {
        client
            .query_one(
                "SELECT tat - extract(epoch FROM now()) FROM hookfleet.webhook_rate_limits WHERE webhook_id = $1",
                &[&hook],
            )
            .await
            .expect("bucket")
            .get::<_, f64>(0)
    };
    assert_eq!(flow_claim(&client, "w1", 10, (None, None), None, &[]).await.claimed, rows[..10]);
    assert!((9.0..=10.5).contains(&debt().await), "10 tokens at 1/s");
    // Lock-free now (1,990 tokens left), and still spent.
    assert_eq!(flow_claim(&client, "w2", 10, (None, None), None, &[]).await.claimed, rows[10..20]);
    assert!((19.0..=20.5).contains(&debt().await), "20 tokens spent in all");
}

#[tokio::test]
async fn a_worker_takes_at_most_its_per_webhook_cap_and_reports_the_rest_as_busy() {
    let db = database().await;
    let client = db.client().await;
    let hook = webhook(&db).await;
    let other = webhook(&db).await;
    let rows = insert_many(&client, hook, 6).await;
    let other_rows = insert_many(&client, other, 1).await;

    let claim = flow_claim(&client, "w1", 10, (None, None), Some(3), &[(hook, 1)]).await;
    assert_eq!(sorted(claim.claimed), [&rows[..2], &other_rows[..]].concat(), "3 slots, 1 already busy");
    let claim = flow_claim(&client, "w1", 10, (None, None), Some(3), &[(hook, 3)]).await;
    assert!(claim.claimed.is_empty());
    assert_eq!(claim.held, [(hook, "busy".to_owned())]);
    // Another worker has its own room.
    assert_eq!(flow_claim(&client, "w2", 10, (None, None), Some(3), &[]).await.claimed, rows[2..5]);
}

#[tokio::test]
async fn a_window_full_of_disabled_webhooks_rows_does_not_hide_the_others() {
    let db = database().await;
    let client = db.client().await;
    let disabled = webhook_with(&db, NewWebhook { enabled: false, ..spec() }).await;
    let enabled = webhook(&db).await;
    insert_many(&client, disabled, 50).await;
    let row = insert_many(&client, enabled, 1).await;
    // A claim of one looks at a window of four due rows, all of the disabled webhook.
    assert_eq!(claim(&client, "w1", 1).await, row);
}

#[tokio::test]
async fn a_batch_is_shared_between_webhooks_before_one_takes_the_rest() {
    let db = database().await;
    let client = db.client().await;
    let a = webhook(&db).await;
    let b = webhook(&db).await;
    let c = webhook(&db).await;
    let a_rows = insert_many(&client, a, 20).await;
    let b_rows = insert_many(&client, b, 20).await;
    let c_rows = insert_many(&client, c, 2).await;

    let claim = sorted(claim(&client, "w1", 12).await);
    // Round by round: each webhook's first row, then each one's second, …; c runs out after two
    // rounds and a and b share the rest.
    assert_eq!(claim, [&a_rows[..5], &b_rows[..5], &c_rows[..]].concat());
}

#[tokio::test]
async fn the_probe_closes_the_circuit_on_success_and_reopens_it_on_failure() {
    let db = database().await;
    let client = db.client().await;
    let hook = webhook(&db).await;
    let rows = insert_many(&client, hook, 4).await;
    let open_once = || async {
        open_circuit(&client, hook).await;
        pass_open_period(&client, hook).await;
    };
    let circuit = || async {
        let row = client
            .query_one(
                "SELECT circuit_state, health_status, circuit_open_until > now(), circuit_probe_until IS NOT NULL \
                 FROM hookfleet.webhook_health_metrics WHERE webhook_id = $1",
                &[&hook],
            )
            .await
            .expect("health row");
        (row.get::<_, String>(0), row.get::<_, String>(1), row.get::<_, Option<bool>>(2), row.get::<_, bool>(3))
    };

    open_once().await;
    let probe = flow_claim(&client, "w1", 10, (None, None), None, &[]).await;
    assert_eq!((probe.claimed.clone(), probe.probes), (rows[..1].to_vec(), vec![hook]));
    assert_eq!(circuit().await, ("half_open".to_owned(), "unavailable".to_owned(), Some(false), true));
    let dashboard: String = client
        .query_one("SELECT circuit_state FROM hookfleet.v_degraded_webhooks WHERE webhook_id = $1", &[&hook])
        .await
        .expect("listed as degraded")
        .get(0);
    assert_eq!(dashboard, "half_open");

    // The probe fails: open again, for a new period, and no claim until it passes.
    client.execute("SELECT hookfleet.update_webhook_health($1, 503, 1, 'down', 1, 60)", &[&hook]).await.expect("fail");
    assert_eq!(circuit().await, ("open".to_owned(), "unavailable".to_owned(), Some(true), false));
    assert!(claim(&client, "w2", 10).await.is_empty(), "re-opened: nothing is claimed");

    // The next probe succeeds: closed, and the rows flow again.
    pass_open_period(&client, hook).await;
    assert_eq!(claim(&client, "w2", 10).await, rows[1..2], "the second probe");
    client.execute("SELECT hookfleet.update_webhook_health($1, 200, 1, NULL, 1, 60)", &[&hook]).await.expect("succeed");
    assert_eq!(circuit().await.0, "closed");
    assert_eq!(sorted(claim(&client, "w3", 10).await), rows[2..]);
}

#[tokio::test]
async fn a_webhooks_own_breaker_settings_override_the_workers() {
    let db = database().await;
    let client = db.client().await;
    let strict = webhook_with(
        &db,
        NewWebhook {
            circuit_breaker_failure_threshold: Some(2),
            circuit_breaker_timeout: Some(Duration::from_secs(7)),
            ..spec()
        },
    )
    .await;
    let lenient = webhook(&db).await;
    insert_many(&client, strict, 2).await;
    insert_many(&client, lenient, 2).await;
    let queue = queue(&db);
    let claimed = queue.claim("w1", 10, LEASE, &ClaimLimits::default()).await.expect("claim").deliveries;
    let records: Vec<AttemptRecord> = claimed.iter().map(|c| record(c, Outcome::Retry, Some(503))).collect();
    // The worker's own settings: 5 failures, 60 s.
    queue.complete_many("w1", &records, BREAKER).await.expect("complete_many");
    let circuit = |hook: i64| {
        let client = &client;
        async move {
            let row = client
                .query_one(
                    "SELECT circuit_state, extract(epoch FROM circuit_open_until - now())::float8 \
                     FROM hookfleet.webhook_health_metrics WHERE webhook_id = $1",
                    &[&hook],
                )
                .await
                .expect("health row");
            (row.get::<_, String>(0), row.get::<_, Option<f64>>(1))
        }
    };
    let (state, open_for) = circuit(strict).await;
    assert_eq!(state, "open", "two failures reach the webhook's own threshold of 2");
    assert!(open_for.is_some_and(|seconds| (6.0..=7.0).contains(&seconds)), "open for its own 7 s: {open_for:?}");
    assert_eq!(circuit(lenient).await.0, "closed", "two failures are below the worker's threshold of 5");
}

#[tokio::test]
async fn a_lost_probe_is_replaced_after_its_lease() {
    let db = database().await;
    let client = db.client().await;
    let hook = webhook(&db).await;
    let rows = insert_many(&client, hook, 3).await;
    open_circuit(&client, hook).await;
    pass_open_period(&client, hook).await;
    assert_eq!(claim(&client, "w1", 10).await, rows[..1]);
    assert!(claim(&client, "w2", 10).await.is_empty());
    // The probing worker died: its probe's lease runs out.
    client
        .execute(
            "UPDATE hookfleet.webhook_health_metrics SET circuit_probe_until = now() - interval '1 second' \
             WHERE webhook_id = $1",
            &[&hook],
        )
        .await
        .expect("let the probe's lease pass");
    assert_eq!(claim(&client, "w2", 10).await, rows[1..2], "one new probe");
}

#[tokio::test]
async fn a_webhook_held_back_costs_other_webhooks_nothing_in_the_claim() {
    let db = database().await;
    let client = db.client().await;
    let open = webhook(&db).await;
    let limited =
        webhook_with(&db, NewWebhook { rate_limit_rps: Some(1.0), rate_limit_burst: Some(1), ..spec() }).await;
    let disabled = webhook_with(&db, NewWebhook { enabled: false, ..spec() }).await;
    let healthy = webhook(&db).await;
    for hook in [open, limited, disabled] {
        insert_many(&client, hook, 20_000).await;
    }
    open_circuit(&client, open).await;
    assert_eq!(claim(&client, "w1", 10).await.len(), 1, "the limited webhook's single token");
    client.execute("ANALYZE hookfleet.delivery_queue", &[]).await.expect("analyze");
    let row = insert(&client, healthy).await;

    // The claim visits webhooks, not rows: the 60,000 rows held back are never read.
    let plan: Vec<String> = client
        .query(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT TEXT) SELECT * FROM hookfleet.get_ready_deliveries('w1', 10, interval '1 minute')",
            &[],
        )
        .await
        .expect("explain")
        .iter()
        .map(|line| line.get(0))
        .collect();
    let buffers: u64 = plan
        .iter()
        .find_map(|line| line.trim().strip_prefix("Buffers: shared hit="))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|hits| hits.parse().ok())
        .unwrap_or_else(|| panic!("no buffer counts in {plan:?}"));
    assert!(buffers < 2_000, "the claim read {buffers} buffers (the held-back rows fill ~3,000 pages)");
    assert_eq!(db.delivery(row).await.0, "in_flight", "the healthy webhook's row was claimed");
}

#[tokio::test]
async fn keyed_rows_of_one_webhook_are_claimed_one_at_a_time_in_delivery_id_order() {
    let db = database().await;
    let client = db.client().await;
    let hook = webhook(&db).await;
    let other_hook = webhook(&db).await;
    let k1 = insert_keyed(&client, hook, Some("k")).await;
    let k2 = insert_keyed(&client, hook, Some("k")).await;
    let k3 = insert_keyed(&client, hook, Some("k")).await;
    let j1 = insert_keyed(&client, hook, Some("j")).await;
    let unkeyed = insert_keyed(&client, hook, None).await;
    let other_k = insert_keyed(&client, other_hook, Some("k")).await;

    // k2 waits for the pending k1; other keys, no key and another webhook's "k" are not held back.
    assert_eq!(sorted(claim(&client, "w1", 10).await), [k1, j1, unkeyed, other_k]);
    // k1 is in flight now: k2 still waits.
    assert!(claim(&client, "w1", 10).await.is_empty());
    // Back to pending (a retry): k2 still waits.
    client
        .execute(
            "UPDATE hookfleet.delivery_queue SET delivery_status = 'pending', locked_by = NULL, locked_until = NULL, \
             next_attempt_at = now() + interval '1 hour' WHERE delivery_id = $1",
            &[&k1],
        )
        .await
        .expect("retry later");
    assert!(claim(&client, "w1", 10).await.is_empty(), "a predecessor waiting for its retry holds the key");
    set_status(&client, k1, "delivered").await;
    assert_eq!(claim(&client, "w1", 10).await, [k2], "k2 after k1 was delivered, but not k3 yet");
    set_status(&client, k2, "dead").await;
    assert_eq!(claim(&client, "w1", 10).await, [k3], "k3 after k2 went dead");

    let m1 = insert_keyed(&client, hook, Some("m")).await;
    let m2 = insert_keyed(&client, hook, Some("m")).await;
    assert_eq!(cancel(&client, m1).await, (true, "cancelled".to_owned()));
    assert_eq!(claim(&client, "w1", 10).await, [m2], "m2 after m1 was cancelled");
}

#[tokio::test]
async fn claim_returns_max_retries_from_the_row_else_the_webhook_else_null() {
    let db = database().await;
    let client = db.client().await;
    let seven = webhook_with(&db, NewWebhook { max_retries: Some(7), ..spec() }).await;
    let unset = webhook(&db).await;
    let sql = "INSERT INTO hookfleet.delivery_queue (webhook_id, message_body, max_retries) VALUES ($1, '{}', $2) \
               RETURNING delivery_id";
    let mut expected = BTreeMap::new();
    for (hook, row_value, result) in
        [(seven, Some(2), Some(2)), (seven, None, Some(7)), (unset, None, None), (unset, Some(0), Some(0))]
    {
        let id: i64 = client.query_one(sql, &[&hook, &row_value]).await.expect("insert").get(0);
        expected.insert(id, result);
    }
    let claimed: BTreeMap<i64, Option<i32>> = client
        .query(
            "SELECT delivery_id, max_retries FROM hookfleet.get_ready_deliveries('w1', 10, interval '1 minute')",
            &[],
        )
        .await
        .expect("claim")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(claimed, expected);
}

// ---------------------------------------------------------------------------------------------
// 4. Queue: complete_many, release, release_held, rescue_expired
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn complete_many_settles_delivered_retry_and_dead_and_records_every_attempt() {
    let db = database().await;
    let client = db.client().await;
    let queue = queue(&db);
    let hook = webhook(&db).await;
    let ids = insert_many(&client, hook, 4).await;
    let mut claimed = queue.claim("w1", 10, LEASE, &ClaimLimits::default()).await.expect("claim").deliveries;
    claimed.sort_by_key(|c| c.delivery_id);
    assert_eq!(claimed.iter().map(|c| c.delivery_id).collect::<Vec<_>>(), ids);
    let next_attempt_before: Vec<SystemTime> = client
        .query("SELECT next_attempt_at FROM hookfleet.delivery_queue ORDER BY delivery_id", &[])
        .await
        .expect("next_attempt_at")
        .iter()
        .map(|row| row.get(0))
        .collect();

    let delivered =
        AttemptRecord { response_excerpt: Some("ok".into()), ..record(&claimed[0], Outcome::Delivered, Some(200)) };
    let retry = AttemptRecord {
        retry_count: 1,
        retry_delay: Duration::from_secs(30),
        error_class: Some("http_5xx".into()),
        error_message: Some("HTTP 503".into()),
        ..record(&claimed[1], Outcome::Retry, Some(503))
    };
    let dead = AttemptRecord { error_class: Some("http_4xx".into()), ..record(&claimed[2], Outcome::Dead, Some(404)) };
    let untouched = rows_of(&client, &ids[3..]).await;
    // Reversed on purpose: health must still be applied in (webhook_id, delivery_id) order.
    let records = [dead.clone(), retry.clone(), delivered.clone()];
    let report = queue.complete_many("w1", &records, BREAKER).await.expect("complete_many");
    assert_eq!((report.settled, report.lost_leases), (3, 0));

    let rows = client
        .query(
            "SELECT delivery_status, retry_count, locked_by, locked_until IS NULL, delivered_at IS NOT NULL, \
                    last_status_code, last_error, last_attempt_at, next_attempt_at, \
                    extract(epoch FROM next_attempt_at - now())::float8, \
                    abs(extract(epoch FROM now() - delivered_at))::float8 < 5 \
             FROM hookfleet.delivery_queue ORDER BY delivery_id",
            &[],
        )
        .await
        .expect("rows");
    type Settled = (String, i32, Option<String>, bool, bool, Option<i32>, Option<String>, Option<SystemTime>);
    let settled = |i: usize| -> Settled {
        let row = &rows[i];
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4), row.get(5), row.get(6), row.get(7))
    };
    assert_eq!(settled(0), ("delivered".into(), 0, None, true, true, Some(200), None, Some(delivered.started_at)));
    assert_eq!(rows[0].get::<_, Option<bool>>(10), Some(true), "delivered_at is now");
    assert_eq!(rows[0].get::<_, SystemTime>(8), next_attempt_before[0]);
    assert_eq!(
        settled(1),
        ("pending".into(), 1, None, true, false, Some(503), Some("HTTP 503".into()), Some(retry.started_at))
    );
    let due_in = rows[1].get::<_, f64>(9);
    assert!((25.0..=30.0).contains(&due_in), "retry due in 30 s, got {due_in}");
    assert_eq!(settled(2), ("dead".into(), 0, None, true, false, Some(404), None, Some(dead.started_at)));
    assert_eq!(rows[2].get::<_, SystemTime>(8), next_attempt_before[2], "dead keeps its schedule");
    assert_eq!(rows_of(&client, &ids[3..]).await, untouched, "a claimed row without a record is untouched");

    let attempts = client
        .query(
            "SELECT delivery_id, webhook_id, attempt_number, worker_id, started_at, duration_ms, status_code, \
                    error_class, error_message, response_excerpt, outcome \
             FROM hookfleet.delivery_attempts ORDER BY delivery_id",
            &[],
        )
        .await
        .expect("attempts");
    assert_eq!(attempts.len(), 3, "one attempt row per record");
    for (row, expected) in attempts.iter().zip([&delivered, &retry, &dead]) {
        assert_eq!(row.get::<_, i64>(0), expected.delivery_id);
        assert_eq!(row.get::<_, i64>(1), hook);
        assert_eq!(row.get::<_, i32>(2), 1);
        assert_eq!(row.get::<_, String>(3), "w1");
        assert_eq!(row.get::<_, SystemTime>(4), expected.started_at);
        assert_eq!(row.get::<_, f64>(5), 120.0);
        assert_eq!(row.get::<_, Option<i32>>(6), expected.status_code.map(i32::from));
        assert_eq!(row.get::<_, Option<String>>(7), expected.error_class);
        assert_eq!(row.get::<_, Option<String>>(8), expected.error_message);
        assert_eq!(row.get::<_, Option<String>>(9), expected.response_excerpt);
        assert_eq!(row.get::<_, String>(10), expected.outcome.as_str());
    }

    let (health, rate) = health_row(&client, hook).await;
    assert_eq!(
        health,
        Health {
            total: 3,
            successes: 1,
            failures: 2,
            consecutive_failures: 2, // success, then 503 and 404 in delivery_id order
            health_status: "healthy".into(),
            circuit_state: "closed".into(),
        }
    );
    assert!((rate - 0.9025).abs() < 1e-9, "success rate {rate}");
    let (code, error): (Option<i32>, Option<String>) = client
        .query_one(
            "SELECT last_status_code, last_error FROM hookfleet.webhook_health_metrics WHERE webhook_id = $1",
            &[&hook],
        )
        .await
        .map(|row| (row.get(0), row.get(1)))
        .expect("health row");
    assert_eq!((code, error.as_deref()), (Some(404), Some("http_4xx")), "error_class stands in for a missing message");
}

#[tokio::test]
async fn complete_many_does_not_settle_a_row_another_worker_holds_but_records_its_attempt() {
    let db = database().await;
    let client = db.client().await;
    let queue = queue(&db);
    let hook = webhook(&db).await;
    let ids = insert_many(&client, hook, 2).await;
    let mut mine = queue.claim("w1", 10, LEASE, &ClaimLimits::default()).await.expect("claim").deliveries;
    mine.sort_by_key(|c| c.delivery_id);
    // w1's lease on the first row expires; it is rescued and claimed by w2.
    client
        .execute(
            "UPDATE hookfleet.delivery_queue SET locked_until = now() - interval '1 second' WHERE delivery_id = $1",
            &[&ids[0]],
        )
        .await
        .expect("expire");
    assert_eq!(queue.rescue_expired(100, 3).await.expect("rescue"), 1);
    let taken = queue.claim("w2", 10, LEASE, &ClaimLimits::default()).await.expect("claim by w2").deliveries;
    assert_eq!(taken.iter().map(|c| c.delivery_id).collect::<Vec<_>>(), [ids[0]]);
    let held_by_w2 = rows_of(&client, &ids[..1]).await;

    let records = [record(&mine[0], Outcome::Delivered, Some(200)), record(&mine[1], Outcome::Delivered, Some(200))];
    let report = queue.complete_many("w1", &records, BREAKER).await.expect("complete_many");
    assert_eq!((report.settled, report.lost_leases), (1, 1));
    assert_eq!(rows_of(&client, &ids[..1]).await, held_by_w2, "w2's row is left alone");
    assert_eq!(status(&client, ids[1]).await, "delivered");
    let attempts: Vec<(i64, String)> = client
        .query("SELECT delivery_id, worker_id FROM hookfleet.delivery_attempts ORDER BY delivery_id", &[])
        .await
        .expect("attempts")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(attempts, [(ids[0], "w1".to_owned()), (ids[1], "w1".to_owned())], "the lost-lease attempt happened");
    assert_eq!(health_row(&client, hook).await.0.total, 2);

    // w2 settles its row; a second write-back of the same attempt finds it no longer in flight.
    let report =
        queue.complete_many("w2", &[record(&taken[0], Outcome::Dead, Some(400))], BREAKER).await.expect("complete");
    assert_eq!((report.settled, report.lost_leases), (1, 0));
    let report =
        queue.complete_many("w2", &[record(&taken[0], Outcome::Dead, Some(400))], BREAKER).await.expect("again");
    assert_eq!((report.settled, report.lost_leases), (0, 1), "a settled row cannot be settled twice");
    assert_eq!(status(&client, ids[0]).await, "dead");
}

#[tokio::test]
async fn release_returns_only_this_workers_listed_in_flight_rows() {
    let db = database().await;
    let client = db.client().await;
    let queue = queue(&db);
    let hook = webhook(&db).await;
    let ids = insert_many(&client, hook, 4).await;
    let mine = queue.claim("w1", 2, LEASE, &ClaimLimits::default()).await.expect("w1").deliveries;
    let first_two = sorted(mine.iter().map(|c| c.delivery_id).collect());
    assert_eq!(first_two, ids[..2]);
    let third = queue.claim("w2", 1, LEASE, &ClaimLimits::default()).await.expect("w2").deliveries;
    assert_eq!(third[0].delivery_id, ids[2]);
    let before: Vec<(SystemTime, i32)> = client
        .query("SELECT next_attempt_at, retry_count FROM hookfleet.delivery_queue ORDER BY delivery_id", &[])
        .await
        .expect("rows")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let others = rows_of(&client, &ids[1..]).await;

    // w1 lists one of its rows, w2's row, the pending row, and its other row under a claim that
    // is not the current one: only its own row of the current claim is released.
    let claim_of = |id: i64| mine.iter().find(|c| c.delivery_id == id).expect("claimed").locked_until;
    let stale = claim_of(ids[1]) - Duration::from_secs(1);
    let listed =
        [(ids[0], claim_of(ids[0])), (ids[1], stale), (ids[2], third[0].locked_until), (ids[3], claim_of(ids[0]))];
    assert_eq!(queue.release("w1", &listed).await.expect("release"), 1);
    let row = client
        .query_one(
            "SELECT delivery_status, locked_by, locked_until IS NULL, next_attempt_at, retry_count \
             FROM hookfleet.delivery_queue WHERE delivery_id = $1",
            &[&ids[0]],
        )
        .await
        .expect("row");
    assert_eq!(row.get::<_, String>(0), "pending");
    assert_eq!(row.get::<_, Option<String>>(1), None);
    assert!(row.get::<_, bool>(2));
    assert_eq!((row.get::<_, SystemTime>(3), row.get::<_, i32>(4)), before[0], "due as before, same retry count");
    assert_eq!(rows_of(&client, &ids[1..]).await, others);
}

#[tokio::test]
async fn release_held_returns_every_row_this_worker_holds_and_nothing_else() {
    let db = database().await;
    let client = db.client().await;
    let queue = queue(&db);
    let hook = webhook(&db).await;
    let ids = insert_many(&client, hook, 5).await;
    queue.claim("w1", 3, LEASE, &ClaimLimits::default()).await.expect("w1");
    let settled = queue.claim("w1", 1, LEASE, &ClaimLimits::default()).await.expect("w1 again").deliveries;
    queue.complete_many("w1", &[record(&settled[0], Outcome::Delivered, Some(200))], BREAKER).await.expect("settle");
    queue.claim("w2", 1, LEASE, &ClaimLimits::default()).await.expect("w2");
    let others = rows_of(&client, &ids[3..]).await;
    // One of w1's rows was attempted but its result is not written: it is not released.
    let unwritten = ids[2];
    let before = rows_of(&client, &[unwritten]).await;
    assert_eq!(queue.release_held("w1", &[unwritten]).await.expect("release_held"), 2);
    assert_eq!(rows_of(&client, &[unwritten]).await, before, "a sent but unwritten row stays in flight");
    assert_eq!(queue.release_held("w1", &[]).await.expect("release_held"), 1);
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM hookfleet.delivery_queue \
             WHERE delivery_status = 'pending' AND locked_by IS NULL AND locked_until IS NULL",
        )
        .await,
        3
    );
    assert_eq!(rows_of(&client, &ids[3..]).await, others, "the delivered row and w2's row are unchanged");
    assert_eq!(queue.release_held("w1", &[]).await.expect("again"), 0);
}

#[tokio::test]
async fn rescue_expired_returns_only_expired_leases_to_pending() {
    let db = database().await;
    let client = db.client().await;
    let queue = queue(&db);
    let hook = webhook(&db).await;
    let ids = insert_many(&client, hook, 4).await;
    queue.claim("w1", 3, LEASE, &ClaimLimits::default()).await.expect("claim");
    client
        .execute(
            "UPDATE hookfleet.delivery_queue SET locked_until = now() - interval '1 second' WHERE delivery_id = ANY ($1)",
            &[&&ids[..2]],
        )
        .await
        .expect("expire two leases");
    let others = rows_of(&client, &ids[2..]).await;
    assert_eq!(queue.rescue_expired(1, 3).await.expect("rescue one"), 1, "at most the limit");
    assert_eq!(queue.rescue_expired(100, 3).await.expect("rescue the rest"), 1);
    assert_eq!(queue.rescue_expired(100, 3).await.expect("nothing left"), 0);
    for &id in &ids[..2] {
        let row = client
            .query_one(
                "SELECT delivery_status, locked_by, retry_count, lease_expiries FROM hookfleet.delivery_queue \
                 WHERE delivery_id = $1",
                &[&id],
            )
            .await
            .expect("row");
        assert_eq!(
            (row.get::<_, String>(0), row.get::<_, Option<String>>(1), row.get::<_, i32>(2), row.get::<_, i32>(3)),
            ("pending".into(), Some("w1".into()), 0, 1),
            "an expired lease is not a try; the expired claim stays named until the row is claimed again"
        );
        let due = seconds_from_now(&client, "next_attempt_at", id).await;
        assert!((-5.0..=0.0).contains(&due), "due now, got {due}");
    }
    assert_eq!(rows_of(&client, &ids[2..]).await, others, "the unexpired lease and the pending row are untouched");
}

#[tokio::test]
async fn a_row_whose_lease_expired_the_most_times_allowed_is_dead_with_the_reason_and_its_tries_intact() {
    let db = database().await;
    let client = db.client().await;
    let queue = queue(&db);
    let hook = webhook(&db).await;
    let ids = insert_many(&client, hook, 1).await;
    for expected in ["pending", "pending", "dead"] {
        queue.claim("w1", 1, LEASE, &ClaimLimits::default()).await.expect("claim");
        client
            .execute("UPDATE hookfleet.delivery_queue SET locked_until = now() - interval '1 second'", &[])
            .await
            .expect("expire");
        assert_eq!(queue.rescue_expired(10, 3).await.expect("rescue"), 1);
        assert_eq!(status(&client, ids[0]).await, expected);
    }
    let (retries, expiries, error): (i32, i32, String) = client
        .query_one(
            "SELECT retry_count, lease_expiries, last_error FROM hookfleet.delivery_queue WHERE delivery_id = $1",
            &[&ids[0]],
        )
        .await
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .expect("row");
    assert_eq!((retries, expiries), (0, 3));
    assert!(error.starts_with("lease expired 3 times") && error.contains("w1"), "{error}");
    client.execute("SELECT hookfleet.replay_delivery($1)", &[&ids[0]]).await.expect("replay");
    assert_eq!(
        count(
            &client,
            &format!("SELECT lease_expiries::bigint FROM hookfleet.delivery_queue WHERE delivery_id = {}", ids[0])
        )
        .await,
        0,
        "a replay gives a fresh budget of lease expiries"
    );
}

#[tokio::test]
async fn a_stale_result_never_settles_a_later_claim_of_the_same_row_by_the_same_worker() {
    let db = database().await;
    let client = db.client().await;
    let queue = queue(&db);
    let hook = webhook(&db).await;
    let ids = insert_many(&client, hook, 1).await;
    let first = queue.claim("w1", 1, LEASE, &ClaimLimits::default()).await.expect("claim").deliveries;
    // The lease expires mid-attempt; the row is rescued and the same worker claims it again.
    client
        .execute("UPDATE hookfleet.delivery_queue SET locked_until = now() - interval '1 second'", &[])
        .await
        .expect("expire");
    queue.rescue_expired(10, 3).await.expect("rescue");
    let second = queue.claim("w1", 1, LEASE, &ClaimLimits::default()).await.expect("claim again").deliveries;
    assert_eq!(second[0].delivery_id, ids[0]);
    let report =
        queue.complete_many("w1", &[record(&first[0], Outcome::Dead, Some(400))], BREAKER).await.expect("stale");
    assert_eq!((report.settled, report.lost_leases), (0, 1), "the first claim's result is stale");
    assert_eq!(status(&client, ids[0]).await, "in_flight");
    let report =
        queue.complete_many("w1", &[record(&second[0], Outcome::Delivered, Some(200))], BREAKER).await.expect("fresh");
    assert_eq!((report.settled, report.lost_leases), (1, 0));
    assert_eq!(status(&client, ids[0]).await, "delivered");
}

#[tokio::test]
async fn a_batch_written_twice_records_each_attempt_and_its_health_once() {
    let db = database().await;
    let client = db.client().await;
    let queue = queue(&db);
    let hook = webhook(&db).await;
    insert_many(&client, hook, 2).await;
    let claimed = queue.claim("w1", 2, LEASE, &ClaimLimits::default()).await.expect("claim").deliveries;
    let records: Vec<AttemptRecord> = claimed.iter().map(|c| record(c, Outcome::Retry, Some(503))).collect();
    queue.complete_many("w1", &records, BREAKER).await.expect("first write");
    // As if the commit's reply was lost and the worker retried the same batch.
    let again = queue.complete_many("w1", &records, BREAKER).await.expect("second write");
    assert_eq!(again.settled, 0);
    assert_eq!(again.lost, Vec::<i64>::new(), "a retried write-back is not a lost lease");
    assert_eq!(count(&client, "SELECT count(*) FROM hookfleet.delivery_attempts").await, 2);
    assert_eq!(
        count(&client, "SELECT total_attempts FROM hookfleet.webhook_health_metrics").await,
        2,
        "health counts each attempt once"
    );
}

#[tokio::test]
async fn a_response_excerpt_with_nul_bytes_is_stored_and_does_not_fail_the_batch() {
    let db = database().await;
    let client = db.client().await;
    let queue = queue(&db);
    let hook = webhook(&db).await;
    let ids = insert_many(&client, hook, 2).await;
    let claimed = queue.claim("w1", 2, LEASE, &ClaimLimits::default()).await.expect("claim").deliveries;
    let records: Vec<AttemptRecord> = claimed
        .iter()
        .map(|c| AttemptRecord {
            response_excerpt: Some("ok\0bytes".into()),
            error_message: Some("bad\0".into()),
            ..record(c, Outcome::Delivered, Some(200))
        })
        .collect();
    let report = queue.complete_many("w1", &records, BREAKER).await.expect("NUL bytes are made storable");
    assert_eq!(report.settled, 2);
    for id in ids {
        assert_eq!(status(&client, id).await, "delivered");
    }
    let excerpt: String = client
        .query_one("SELECT response_excerpt FROM hookfleet.delivery_attempts LIMIT 1", &[])
        .await
        .expect("attempt")
        .get(0);
    assert_eq!(excerpt, "ok\u{FFFD}bytes");
}

// ---------------------------------------------------------------------------------------------
// 5. hookfleet.update_webhook_health
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn health_counts_2xx_as_success_and_everything_else_as_failure() {
    let db = database().await;
    let client = db.client().await;
    let hook = webhook(&db).await;
    let mut expected_rate = 1.0_f64;
    let (mut successes, mut failures, mut consecutive) = (0, 0, 0);
    for (i, code) in [Some(200), Some(302), Some(404), Some(503), None, Some(199), Some(204), Some(299), Some(301)]
        .into_iter()
        .enumerate()
    {
        let success = code.is_some_and(|code| (200..300).contains(&code));
        health(&client, hook, code, 100, 60.0).await;
        if success {
            successes += 1;
            consecutive = 0;
        } else {
            failures += 1;
            consecutive += 1;
        }
        expected_rate = expected_rate * 0.95 + if success { 0.05 } else { 0.0 };
        let (row, rate) = health_row(&client, hook).await;
        assert_eq!(
            (row.total, row.successes, row.failures, row.consecutive_failures),
            (i as i64 + 1, successes, failures, consecutive),
            "after status {code:?}"
        );
        assert!((rate - expected_rate).abs() < 1e-9, "after {code:?}: rate {rate}, expected {expected_rate}");
    }
    let row = client
        .query_one(
            "SELECT last_status_code, last_error, last_success_at IS NOT NULL, last_failure_at IS NOT NULL, \
                    avg_response_time_ms FROM hookfleet.webhook_health_metrics WHERE webhook_id = $1",
            &[&hook],
        )
        .await
        .expect("row");
    assert_eq!(row.get::<_, Option<i32>>(0), Some(301));
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("HTTP 301"));
    assert!(row.get::<_, bool>(2) && row.get::<_, bool>(3));
    let average = row.get::<_, Option<f64>>(4).expect("avg_response_time_ms");
    assert!((average - 10.0).abs() < 1e-9, "every attempt took 10 ms: {average}");
}

#[tokio::test]
async fn success_rate_stays_in_range_degrades_below_ninety_percent_and_recovers() {
    let db = database().await;
    let client = db.client().await;
    let hook = webhook(&db).await;
    // 0.95, 0.9025: still healthy; 0.857375: degraded.
    for expected in ["healthy", "healthy", "degraded"] {
        assert_eq!(health(&client, hook, Some(500), 100, 60.0).await.as_deref(), Some(expected));
    }
    // 1 - 0.142625 * 0.95^n reaches 0.9 at the seventh success.
    for n in 1..=7 {
        let expected = if n < 7 { "degraded" } else { "healthy" };
        assert_eq!(health(&client, hook, Some(200), 100, 60.0).await.as_deref(), Some(expected), "success {n}");
    }
    assert_eq!(health_row(&client, hook).await.0.health_status, "healthy");
    for _ in 0..150 {
        health(&client, hook, Some(500), 1000, 60.0).await;
        let rate = health_row(&client, hook).await.1;
        assert!((0.0..=1.0).contains(&rate), "rate {rate}");
    }
    assert!(health_row(&client, hook).await.1 < 0.001);
    for _ in 0..150 {
        health(&client, hook, Some(200), 1000, 60.0).await;
        let rate = health_row(&client, hook).await.1;
        assert!((0.0..=1.0).contains(&rate), "rate {rate}");
    }
    assert!(health_row(&client, hook).await.1 > 0.999);
}

#[tokio::test]
async fn the_breaker_opens_at_the_threshold_for_open_seconds() {
    let db = database().await;
    let client = db.client().await;
    let hook = webhook(&db).await;
    for _ in 0..2 {
        assert_eq!(health(&client, hook, Some(500), 3, 30.0).await.as_deref(), Some("healthy"));
        assert_eq!(health_row(&client, hook).await.0.circuit_state, "closed");
    }
    assert_eq!(breaker_times(&client, hook).await, (None, None));
    assert_eq!(health(&client, hook, Some(500), 3, 30.0).await.as_deref(), Some("unavailable"));
    let (row, _) = health_row(&client, hook).await;
    assert_eq!(
        (row.consecutive_failures, row.health_status.as_str(), row.circuit_state.as_str()),
        (3, "unavailable", "open")
    );
    let (since_opened, open_for) = breaker_times(&client, hook).await;
    assert!(since_opened.is_some_and(|s| (0.0..5.0).contains(&s)), "opened now: {since_opened:?}");
    assert_eq!(open_for, Some(30.0));
    let view: String = client
        .query_one("SELECT circuit_state FROM hookfleet.v_webhook_health_dashboard WHERE webhook_id = $1", &[&hook])
        .await
        .expect("dashboard")
        .get(0);
    assert_eq!(view, "open");
}

#[tokio::test]
async fn a_failure_while_open_or_half_open_reopens_the_breaker() {
    let db = database().await;
    let client = db.client().await;
    let hook = webhook(&db).await;
    assert_eq!(health(&client, hook, Some(500), 1, 30.0).await.as_deref(), Some("unavailable"));
    // Opened 10 s ago, still open: a late failure re-opens it from now (the threshold is not the reason).
    client
        .execute(
            "UPDATE hookfleet.webhook_health_metrics SET circuit_opened_at = now() - interval '10 s', \
             circuit_open_until = now() + interval '20 s' WHERE webhook_id = $1",
            &[&hook],
        )
        .await
        .expect("age the breaker");
    assert_eq!(health(&client, hook, Some(503), 100, 30.0).await.as_deref(), Some("unavailable"));
    let (since_opened, open_for) = breaker_times(&client, hook).await;
    assert!(since_opened.is_some_and(|s| (0.0..5.0).contains(&s)), "re-opened now: {since_opened:?}");
    assert_eq!(open_for, Some(30.0));

    // The open period has passed: the dashboard shows half-open, and the probe's failure re-opens it.
    client
        .execute(
            "UPDATE hookfleet.webhook_health_metrics SET circuit_opened_at = now() - interval '40 s', \
             circuit_open_until = now() - interval '10 s' WHERE webhook_id = $1",
            &[&hook],
        )
        .await
        .expect("let the open period pass");
    let view: String = client
        .query_one("SELECT circuit_state FROM hookfleet.v_webhook_health_dashboard WHERE webhook_id = $1", &[&hook])
        .await
        .expect("dashboard")
        .get(0);
    assert_eq!(view, "half_open");
    assert_eq!(health(&client, hook, None, 100, 30.0).await.as_deref(), Some("unavailable"));
    let (row, _) = health_row(&client, hook).await;
    assert_eq!((row.consecutive_failures, row.circuit_state.as_str()), (3, "open"));
    let (since_opened, open_for) = breaker_times(&client, hook).await;
    assert!(since_opened.is_some_and(|s| (0.0..5.0).contains(&s)), "re-opened now: {since_opened:?}");
    assert_eq!(open_for, Some(30.0));
}

#[tokio::test]
async fn a_success_closes_the_breaker_and_resets_consecutive_failures() {
    let db = database().await;
    let client = db.client().await;
    let hook = webhook(&db).await;
    for _ in 0..5 {
        health(&client, hook, Some(500), 5, 60.0).await;
    }
    assert_eq!(health_row(&client, hook).await.0.circuit_state, "open");
    // 0.95^5 * 0.95 + 0.05 = 0.785: closed, but still degraded.
    assert_eq!(health(&client, hook, Some(200), 5, 60.0).await.as_deref(), Some("degraded"));
    let (row, _) = health_row(&client, hook).await;
    assert_eq!(
        row,
        Health {
            total: 6,
            successes: 1,
            failures: 5,
            consecutive_failures: 0,
            health_status: "degraded".into(),
            circuit_state: "closed".into()
        }
    );
    assert_eq!(breaker_times(&client, hook).await, (None, None), "opened_at and open_until cleared");
    // Closed means the threshold counts from zero again.
    for _ in 0..4 {
        health(&client, hook, Some(500), 5, 60.0).await;
    }
    assert_eq!(health_row(&client, hook).await.0.circuit_state, "closed");
}

#[tokio::test]
async fn health_for_an_unknown_webhook_is_null_and_writes_nothing() {
    let db = database().await;
    let client = db.client().await;
    webhook(&db).await;
    assert_eq!(health(&client, 999_999, Some(500), 5, 60.0).await, None);
    assert_eq!(health(&client, 999_999, Some(200), 5, 60.0).await, None);
    assert_eq!(
        count(&client, "SELECT count(*) FROM hookfleet.webhook_health_metrics WHERE webhook_id = 999999").await,
        0
    );
    assert_eq!(
        count(&client, "SELECT sum(total_attempts)::bigint FROM hookfleet.webhook_health_metrics").await,
        0,
        "the existing webhook's row (made with it) is untouched"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. replay_delivery and cancel_delivery
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn replay_resets_dead_cancelled_and_delivered_rows_to_pending_due_now() {
    let db = database().await;
    let client = db.client().await;
    let hook = webhook(&db).await;
    let ids = insert_many(&client, hook, 4).await;
    for (&id, status) in ids.iter().zip(["dead", "cancelled", "delivered"]) {
        client
            .execute(
                "UPDATE hookfleet.delivery_queue SET delivery_status = $2, retry_count = 3, \
                 next_attempt_at = now() + interval '1 day', last_status_code = 500, last_error = 'boom', \
                 delivered_at = CASE WHEN $2 = 'delivered' THEN now() END WHERE delivery_id = $1",
                &[&id, &status],
            )
            .await
            .expect("settle");
    }
    let untouched = rows_of(&client, &ids[3..]).await;
    for &id in &ids[..3] {
        let result: String =
            client.query_one("SELECT hookfleet.replay_delivery($1)", &[&id]).await.expect("replay").get(0);
        assert_eq!(result, "pending");
        let row = client
            .query_one(
                "SELECT delivery_status, retry_count, delivered_at IS NULL, locked_by, locked_until IS NULL \
                 FROM hookfleet.delivery_queue WHERE delivery_id = $1",
                &[&id],
            )
            .await
            .expect("row");
        assert_eq!(
            (row.get::<_, String>(0), row.get::<_, i32>(1), row.get::<_, bool>(2), row.get::<_, Option<String>>(3)),
            ("pending".into(), 0, true, None)
        );
        assert!(row.get::<_, bool>(4));
        let due = seconds_from_now(&client, "next_attempt_at", id).await;
        assert!((-5.0..=0.0).contains(&due), "due now, got {due}");
    }
    assert_eq!(rows_of(&client, &ids[3..]).await, untouched);
    assert_eq!(sorted(claim(&client, "w1", 10).await), ids, "replayed rows are claimable at once");
}

#[tokio::test]
async fn replay_refuses_pending_and_in_flight_deliveries() {
    let db = database().await;
    let client = db.client().await;
    let hook = webhook(&db).await;
    let pending = insert(&client, hook).await;
    let in_flight = insert(&client, hook).await;
    set_status(&client, in_flight, "in_flight").await;
    for (id, status) in [(pending, "pending"), (in_flight, "in_flight")] {
        let message = assert_refused(
            &client,
            "SELECT hookfleet.replay_delivery($1)",
            &[&id],
            &SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE,
            None,
        )
        .await;
        assert_eq!(
            message,
            format!(
                "hookfleet: delivery {id} is {status}; only dead, cancelled or delivered deliveries can be replayed"
            )
        );
    }
}

#[tokio::test]
async fn replay_of_an_unknown_delivery_is_no_data_found() {
    let db = database().await;
    let client = db.client().await;
    let message =
        assert_refused(&client, "SELECT hookfleet.replay_delivery(424242)", &[], &SqlState::NO_DATA_FOUND, None).await;
    assert_eq!(message, "hookfleet: delivery 424242 does not exist");
}

#[tokio::test]
async fn cancel_cancels_a_pending_delivery_and_nothing_else() {
    let db = database().await;
    let client = db.client().await;
    let hook = webhook(&db).await;
    let ids = insert_many(&client, hook, 2).await;
    let other = rows_of(&client, &ids[1..]).await;
    assert_eq!(cancel(&client, ids[0]).await, (true, "cancelled".to_owned()));
    assert_eq!(status(&client, ids[0]).await, "cancelled");
    assert_eq!(rows_of(&client, &ids[1..]).await, other);
    let before = queue_rows(&client).await;
    assert_eq!(cancel(&client, ids[0]).await, (false, "cancelled".to_owned()), "already cancelled: not by this call");
    assert_eq!(queue_rows(&client).await, before);
    assert_eq!(claim(&client, "w1", 10).await, [ids[1]], "a cancelled delivery is never claimed");
}

#[tokio::test]
async fn cancel_leaves_in_flight_and_settled_deliveries_alone() {
    let db = database().await;
    let client = db.client().await;
    let hook = webhook(&db).await;
    let ids = insert_many(&client, hook, 2).await;
    assert_eq!(claim(&client, "w1", 1).await, [ids[0]]);
    set_status(&client, ids[1], "delivered").await;
    let before = queue_rows(&client).await;
    for (id, expected) in [(ids[0], "in_flight"), (ids[1], "delivered")] {
        assert_eq!(cancel(&client, id).await, (false, expected.to_owned()));
    }
    assert_eq!(queue_rows(&client).await, before);
}

#[tokio::test]
async fn cancel_of_an_unknown_delivery_is_no_data_found() {
    let db = database().await;
    let client = db.client().await;
    let message =
        assert_refused(&client, "SELECT hookfleet.cancel_delivery(424242)", &[], &SqlState::NO_DATA_FOUND, None).await;
    assert_eq!(message, "hookfleet: delivery 424242 does not exist");
}

// ---------------------------------------------------------------------------------------------
// 7. hookfleet.publish
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn publish_fans_out_to_enabled_subscribed_webhooks_only() {
    let db = database().await;
    let client = db.client().await;
    let all = webhook(&db).await;
    let orders =
        webhook_with(&db, NewWebhook { event_types: vec!["order.created".into(), "order.paid".into()], ..spec() })
            .await;
    let users = webhook_with(&db, NewWebhook { event_types: vec!["user.created".into()], ..spec() }).await;
    webhook_with(&db, NewWebhook { enabled: false, ..spec() }).await;
    webhook_with(&db, NewWebhook { enabled: false, event_types: vec!["order.created".into()], ..spec() }).await;

    let inserted: i32 = client
        .query_one("SELECT hookfleet.publish('order.created', $1)", &[&json!({"order": 1})])
        .await
        .expect("publish")
        .get(0);
    assert_eq!(inserted, 2);
    let rows: Vec<(i64, String, Option<String>, serde_json::Value)> = client
        .query(
            "SELECT webhook_id, message_id, event_type, message_body FROM hookfleet.delivery_queue ORDER BY webhook_id",
            &[],
        )
        .await
        .expect("rows")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
        .collect();
    assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), [all, orders]);
    assert!(rows[0].1.starts_with("msg_") && rows[0].1 == rows[1].1, "one message id for the fan-out");
    assert!(rows.iter().all(|r| r.2.as_deref() == Some("order.created") && r.3 == json!({"order": 1})));

    let inserted: i32 =
        client.query_one("SELECT hookfleet.publish('user.created', '{}')", &[]).await.expect("publish").get(0);
    assert_eq!(inserted, 2);
    assert_eq!(
        count(&client, &format!("SELECT count(*) FROM hookfleet.delivery_queue WHERE webhook_id = {users}")).await,
        1
    );
    let inserted: i32 =
        client.query_one("SELECT hookfleet.publish('nobody.cares', '{}')", &[]).await.expect("publish").get(0);
    assert_eq!(inserted, 1, "only the catch-all webhook");
    assert_eq!(queue_count(&client).await, 5);
}

#[tokio::test]
async fn publish_again_with_the_same_message_id_inserts_nothing() {
    let db = database().await;
    let client = db.client().await;
    webhook(&db).await;
    webhook(&db).await;
    let publish = "SELECT hookfleet.publish('order.created', '{\"order\":1}', 'order-1')";
    assert_eq!(client.query_one(publish, &[]).await.expect("publish").get::<_, i32>(0), 2);
    let before = queue_rows(&client).await;
    assert_eq!(client.query_one(publish, &[]).await.expect("publish again").get::<_, i32>(0), 0);
    assert_eq!(queue_rows(&client).await, before);
    // A webhook added since gets the message; the others still don't get it twice.
    let late = webhook(&db).await;
    assert_eq!(client.query_one(publish, &[]).await.expect("publish a third time").get::<_, i32>(0), 1);
    assert_eq!(
        count(&client, &format!("SELECT count(*) FROM hookfleet.delivery_queue WHERE webhook_id = {late}")).await,
        1
    );
    assert_eq!(count(&client, "SELECT count(*) FROM hookfleet.delivery_queue WHERE message_id = 'order-1'").await, 3);
    // A body over the limit is refused for the whole fan-out.
    let big = json!({ "x": "a".repeat(262_144) });
    let message =
        assert_refused(&client, "SELECT hookfleet.publish('e', $1)", &[&big], &SqlState::PROGRAM_LIMIT_EXCEEDED, None)
            .await;
    assert!(message.starts_with("hookfleet: message_body is 262153 bytes"), "{message}");
}

// ---------------------------------------------------------------------------------------------
// 8. Views and count_pending_by_status
// ---------------------------------------------------------------------------------------------

type Depth = BTreeMap<String, (i64, Option<f64>)>;

async fn queue_depth(client: &Client) -> Depth {
    client
        .query("SELECT delivery_status, deliveries, oldest_due_age_seconds::float8 FROM hookfleet.v_queue_depth", &[])
        .await
        .expect("v_queue_depth")
        .iter()
        .map(|row| (row.get(0), (row.get(1), row.get(2))))
        .collect()
}

#[tokio::test]
async fn queue_depth_lists_all_five_statuses_with_counts_and_the_oldest_due_age() {
    let db = database().await;
    let client = db.client().await;
    let hook = webhook(&db).await;
    let statuses = ["cancelled", "dead", "delivered", "in_flight", "pending"];
    let empty: Depth = statuses.iter().map(|s| ((*s).to_owned(), (0, None))).collect();
    assert_eq!(queue_depth(&client).await, empty);

    for offset in ["-30 seconds", "-5 seconds", "+1 hour"] {
        client
            .execute(
                "INSERT INTO hookfleet.delivery_queue (webhook_id, message_body, deliver_at) \
                 VALUES ($1, '{}', now() + $2::text::interval)",
                &[&hook, &offset],
            )
            .await
            .expect("insert");
    }
    for status in ["in_flight", "delivered", "delivered", "dead"] {
        let id = insert(&client, hook).await;
        set_status(&client, id, status).await;
    }
    let depth = queue_depth(&client).await;
    let counts: BTreeMap<&str, i64> = depth.iter().map(|(s, (n, _))| (s.as_str(), *n)).collect();
    assert_eq!(
        counts,
        BTreeMap::from([("cancelled", 0), ("dead", 1), ("delivered", 2), ("in_flight", 1), ("pending", 3)])
    );
    let age = depth["pending"].1.expect("age of the oldest due row");
    assert!((30.0..35.0).contains(&age), "oldest due row is 30 s old, got {age}");
    assert!(depth.iter().filter(|(s, _)| s.as_str() != "pending").all(|(_, (_, age))| age.is_none()));

    let by_function: BTreeMap<String, i64> = client
        .query("SELECT delivery_status, deliveries FROM hookfleet.count_pending_by_status()", &[])
        .await
        .expect("count_pending_by_status")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(by_function, counts.iter().map(|(s, n)| ((*s).to_owned(), *n)).collect::<BTreeMap<_, _>>());
}

#[tokio::test]
async fn count_pending_by_status_includes_zero_counts() {
    let db = database().await;
    let client = db.client().await;
    let hook = webhook(&db).await;
    insert_many(&client, hook, 3).await;
    let rows: Vec<(String, i64)> = client
        .query("SELECT delivery_status, deliveries FROM hookfleet.count_pending_by_status() ORDER BY 1", &[])
        .await
        .expect("count_pending_by_status")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(
        rows,
        [
            ("cancelled".into(), 0),
            ("dead".into(), 0),
            ("delivered".into(), 0),
            ("in_flight".into(), 0),
            ("pending".into(), 3)
        ]
    );
}

#[tokio::test]
async fn health_dashboard_has_one_row_per_webhook_with_pending_and_in_flight_counts() {
    let db = database().await;
    let client = db.client().await;
    let busy = webhook(&db).await;
    let idle = webhook(&db).await;
    let off = webhook_with(&db, NewWebhook { enabled: false, ..spec() }).await;
    insert_many(&client, busy, 4).await;
    insert_many(&client, off, 2).await;
    assert_eq!(claim(&client, "w1", 1).await.len(), 1);
    health(&client, busy, Some(200), 5, 60.0).await;
    let rows: Vec<(i64, bool, String, String, i64, i64, i64)> = client
        .query(
            "SELECT webhook_id, enabled, health_status, circuit_state, total_attempts, pending, in_flight \
             FROM hookfleet.v_webhook_health_dashboard ORDER BY webhook_id",
            &[],
        )
        .await
        .expect("dashboard")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4), row.get(5), row.get(6)))
        .collect();
    assert_eq!(
        rows,
        [
            (busy, true, "healthy".into(), "closed".into(), 1, 3, 1),
            (idle, true, "healthy".into(), "closed".into(), 0, 0, 0),
            (off, false, "healthy".into(), "closed".into(), 0, 2, 0),
        ]
    );
}

#[tokio::test]
async fn degraded_webhooks_lists_only_the_unhealthy_ones() {
    let db = database().await;
    let client = db.client().await;
    let fine = webhook(&db).await;
    let degraded = webhook(&db).await;
    let open = webhook(&db).await;
    let half_open = webhook(&db).await;
    webhook(&db).await; // never attempted
    for _ in 0..3 {
        health(&client, fine, Some(200), 5, 60.0).await;
        health(&client, degraded, Some(500), 100, 60.0).await;
    }
    health(&client, open, Some(500), 1, 60.0).await;
    health(&client, half_open, Some(500), 1, 60.0).await;
    client
        .execute(
            "UPDATE hookfleet.webhook_health_metrics SET circuit_open_until = now() - interval '1 s' WHERE webhook_id = $1",
            &[&half_open],
        )
        .await
        .expect("let the open period pass");
    let rows: Vec<(i64, String, String)> = client
        .query(
            "SELECT webhook_id, health_status, circuit_state FROM hookfleet.v_degraded_webhooks ORDER BY webhook_id",
            &[],
        )
        .await
        .expect("v_degraded_webhooks")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    assert_eq!(
        rows,
        [
            (degraded, "degraded".into(), "closed".into()),
            (open, "unavailable".into(), "open".into()),
            (half_open, "unavailable".into(), "half_open".into()),
        ]
    );
}

#[tokio::test]
async fn webhook_performance_reports_percentiles_and_throughput_per_window() {
    let db = database().await;
    let client = db.client().await;
    let hook = webhook(&db).await;
    let old_only = webhook(&db).await;
    let attempt = "INSERT INTO hookfleet.delivery_attempts \
                   (delivery_id, webhook_id, attempt_number, worker_id, started_at, duration_ms, status_code, outcome) \
                   VALUES (1, $1, 1, 'w', now() - $2::text::interval, $3, $4, 'delivered')";
    // 101 attempts a minute ago taking 0, 10, ..., 1000 ms; the even ones succeeded (51).
    for i in 0..=100_i32 {
        let status = if i % 2 == 0 { 200 } else { 503 };
        client.execute(attempt, &[&hook, &"1 minute", &f64::from(i * 10), &status]).await.expect("attempt");
    }
    // Two slow successes half an hour ago: only in the hour window.
    for _ in 0..2 {
        client.execute(attempt, &[&hook, &"30 minutes", &5000.0_f64, &200_i32]).await.expect("attempt");
    }
    // Attempts two hours ago are in no window.
    client.execute(attempt, &[&old_only, &"2 hours", &1.0_f64, &200_i32]).await.expect("attempt");

    let rows: Vec<Vec<String>> = client
        .query(
            "SELECT webhook_id::text, window_name, attempts::text, successes::text, delivered_per_second::text, \
                    p50_ms::text, p95_ms::text, p99_ms::text, max_ms::text \
             FROM hookfleet.v_webhook_performance ORDER BY webhook_id, window_name",
            &[],
        )
        .await
        .expect("v_webhook_performance")
        .iter()
        .map(|row| (0..9).map(|i| row.get::<_, String>(i)).collect())
        .collect();
    let hook = hook.to_string();
    assert_eq!(
        rows,
        [
            // 103 values: position 51 = 510; 96.9 -> 969; 100.98 -> 1000 + 0.98 * 4000 = 4920; 53 / 3600 s.
            [hook.as_str(), "1h", "103", "53", "0.01", "510.0", "969.0", "4920.0", "5000.0"],
            // 101 values 0..1000: exact percentiles; 51 / 300 s = 0.17.
            [hook.as_str(), "5m", "101", "51", "0.17", "500.0", "950.0", "990.0", "1000.0"],
        ]
    );
}

#[tokio::test]
async fn v_workers_hides_workers_not_seen_for_over_a_minute() {
    let db = database().await;
    let client = db.client().await;
    let queue = queue(&db);
    queue
        .heartbeat(&WorkerIdentity { worker_id: "fresh".into(), host: "h1".into(), pid: 42 }, 3)
        .await
        .expect("heartbeat");
    client
        .batch_execute(
            "INSERT INTO hookfleet.workers (worker_id, host, version, last_seen_at) VALUES \
             ('recent', 'h2', 'x', now() - interval '30 seconds'), \
             ('stale', 'h3', 'x', now() - interval '61 seconds'), \
             ('long_gone', 'h4', 'x', now() - interval '1 day')",
        )
        .await
        .expect("workers");
    let rows: Vec<(String, String, Option<i32>, String, i32)> = client
        .query("SELECT worker_id, host, pid, version, in_flight FROM hookfleet.v_workers", &[])
        .await
        .expect("v_workers")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4)))
        .collect();
    assert_eq!(
        rows,
        [
            ("fresh".into(), "h1".into(), Some(42), hookfleet_core::VERSION.into(), 3),
            ("recent".into(), "h2".into(), None, "x".into(), 0),
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// 9. Migrations
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn migrating_twice_applies_nothing_the_second_time() {
    let db = database().await;
    let url = hookfleet_test_support::empty_database().await.url;
    {
        let mut client = connect(&url).await;
        let first = hookfleet_core::db::migrate(&mut client, 262_144).await.expect("first migrate");
        assert_eq!(
            first.applied,
            [
                "V1__schema",
                "V2__functions",
                "V3__views",
                "V4__flow_control",
                "V5__claim_holds_and_queue_upkeep",
                "V6__webhook_breaker_overrides",
                "V7__claim_fixes_and_retention_index",
                "V8__covering_due_index",
                "V9__cheaper_claim_and_write_back",
                "V10__review_fixes",
                "V11__schema_compatibility",
                "V12__webhook_versions_never_repeat",
                "V13__definition_history",
                "V14__due_index_for_the_window_only",
                "V15__api_keys",
            ]
        );
        let mut every_file = vec!["retired.sql".to_owned()];
        every_file.extend(hookfleet_core::definitions::DEFINITIONS.iter().map(|d| d.file.to_owned()));
        assert_eq!(first.definitions, every_file);
        let second = hookfleet_core::db::migrate(&mut client, 262_144).await.expect("second migrate");
        assert!(second.applied.is_empty() && second.definitions.is_empty(), "{second:?}");
        // The template-cloned test database is current too.
        let mut cloned = db.client().await;
        assert!(hookfleet_core::db::migrate(&mut cloned, 262_144).await.expect("migrate clone").applied.is_empty());
        assert_eq!(schema_fingerprint(&client).await, schema_fingerprint(&cloned).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn concurrent_migrations_of_an_empty_database_all_succeed_with_one_schema() {
    let db = database().await;
    let url = hookfleet_test_support::empty_database().await.url;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(connect(&url).await);
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(3));
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                let report = hookfleet_core::db::migrate(&mut client, 1000).await;
                (client, report)
            })
        })
        .collect();
    let mut applied = Vec::new();
    for task in tasks {
        let (_client, report) = task.await.expect("migrate task");
        let report = report.expect("every concurrent migrate succeeds");
        // Whoever applied the migrations applied the definitions, under the same lock.
        assert_eq!(report.applied.is_empty(), report.definitions.is_empty(), "{report:?}");
        applied.push(report.applied);
    }
    applied.sort();
    assert_eq!(
        applied,
        [
            vec![],
            vec![],
            vec![
                "V1__schema".to_owned(),
                "V2__functions".to_owned(),
                "V3__views".to_owned(),
                "V4__flow_control".to_owned(),
                "V5__claim_holds_and_queue_upkeep".to_owned(),
                "V6__webhook_breaker_overrides".to_owned(),
                "V7__claim_fixes_and_retention_index".to_owned(),
                "V8__covering_due_index".to_owned(),
                "V9__cheaper_claim_and_write_back".to_owned(),
                "V10__review_fixes".to_owned(),
                "V11__schema_compatibility".to_owned(),
                "V12__webhook_versions_never_repeat".to_owned(),
                "V13__definition_history".to_owned(),
                "V14__due_index_for_the_window_only".to_owned(),
                "V15__api_keys".to_owned(),
            ]
        ],
        "exactly one run applied the migrations"
    );
    {
        let client = connect(&url).await;
        let history: Vec<i32> = client
            .query("SELECT version FROM hookfleet.refinery_schema_history ORDER BY version", &[])
            .await
            .expect("history")
            .iter()
            .map(|row| row.get(0))
            .collect();
        assert_eq!(history, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]);
        let settings: Vec<(String, String)> = client
            .query("SELECT name, value FROM hookfleet.settings ORDER BY name", &[])
            .await
            .expect("settings")
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        assert_eq!(
            settings,
            [
                ("max_body_bytes".to_owned(), "1000".to_owned()),
                ("oldest_compatible_migration".to_owned(), "11".to_owned())
            ]
        );
        let template = db.client().await;
        assert_eq!(schema_fingerprint(&client).await, schema_fingerprint(&template).await);
    }
}

// ---------------------------------------------------------------------------------------------
// 10. NOTIFY hookfleet_deliveries
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn one_insert_of_a_hundred_rows_sends_one_notification() {
    let db = database().await;
    let client = db.client().await;
    let hook = webhook(&db).await;
    let (_listener, mut notifications) = listener(&db.url).await;
    assert_eq!(insert_many(&client, hook, 100).await.len(), 100);
    expect_exactly_one_notification(&mut notifications).await;
}

#[tokio::test]
async fn a_transaction_with_several_inserts_sends_one_notification_and_a_rollback_none() {
    let db = database().await;
    let mut client = db.client().await;
    let hook = webhook(&db).await;
    let (_listener, mut notifications) = listener(&db.url).await;

    let one = "INSERT INTO hookfleet.delivery_queue (webhook_id, message_body) VALUES ($1, '{}')";
    let rolled_back = client.transaction().await.expect("begin");
    rolled_back.execute(one, &[&hook]).await.expect("insert");
    rolled_back.rollback().await.expect("rollback");

    let transaction = client.transaction().await.expect("begin");
    transaction.execute(one, &[&hook]).await.expect("insert");
    transaction
        .execute(
            "INSERT INTO hookfleet.delivery_queue (webhook_id, message_body) SELECT $1, '{}' FROM generate_series(1, 3)",
            &[&hook],
        )
        .await
        .expect("insert three");
    transaction.query_one("SELECT hookfleet.publish('e', '{}')", &[]).await.expect("publish");
    transaction.commit().await.expect("commit");
    assert_eq!(queue_count(&client).await, 5);
    // Had the rolled-back transaction notified, its notification would have come first.
    expect_exactly_one_notification(&mut notifications).await;
}

#[tokio::test]
async fn complete_many_reports_each_webhooks_health_after_the_batch() {
    let db = database().await;
    let client = db.client().await;
    let queue = queue(&db);
    let hook = webhook(&db).await;
    insert_many(&client, hook, 3).await;
    let claimed = queue.claim("w1", 3, LEASE, &ClaimLimits::default()).await.expect("claim").deliveries;
    let breaker = BreakerSettings { failure_threshold: 3, open_for: Duration::from_secs(60) };
    let records: Vec<AttemptRecord> = claimed.iter().map(|c| record(c, Outcome::Dead, Some(500))).collect();
    let report = queue.complete_many("w1", &records, breaker).await.expect("complete");
    assert_eq!(report.health, vec![(hook, "unavailable".to_owned())], "three failures opened the circuit");
}

#[tokio::test]
async fn settled_deliveries_past_their_retention_are_pruned_oldest_first_and_nothing_else() {
    let db = database().await;
    let client = db.client().await;
    let hook = webhook(&db).await;
    let ids = insert_many(&client, hook, 9).await;
    // (status, created days ago, settled days ago)
    let rows = [
        ("delivered", 9, 8),   // pruned: delivered 8 days ago
        ("delivered", 9, 1),   // kept: delivered yesterday, after a long retry
        ("cancelled", 8, 8),   // pruned
        ("dead", 31, 31),      // pruned: past the dead-letter retention
        ("dead", 10, 10),      // kept: still replayable
        ("pending", 10, 10),   // kept: not settled (scheduled, or retrying)
        ("in_flight", 10, 10), // kept
        ("delivered", 0, 0),   // kept
        ("dead", 40, 1),       // kept: scheduled long ago, but it died yesterday
    ];
    for (id, (status, created, settled)) in ids.iter().zip(rows) {
        client
            .execute(
                "UPDATE hookfleet.delivery_queue SET delivery_status = $2, \
                 created_at = now() - make_interval(days => $3), \
                 next_attempt_at = now() - make_interval(days => $3), \
                 delivered_at = CASE WHEN $2 = 'delivered' THEN now() - make_interval(days => $4) END, \
                 last_attempt_at = now() - make_interval(days => $4) WHERE delivery_id = $1",
                &[id, &status, &created, &settled],
            )
            .await
            .expect("age the row");
    }
    let queue = queue(&db);
    let day = Duration::from_secs(24 * 3600);
    assert_eq!(queue.prune_deliveries(7 * day, 30 * day, 2).await.expect("prune"), 2, "at most the limit");
    assert_eq!(queue.prune_deliveries(7 * day, 30 * day, 100).await.expect("prune"), 1);
    assert_eq!(queue.prune_deliveries(7 * day, 30 * day, 100).await.expect("prune"), 0);
    let left: Vec<i64> = client
        .query("SELECT delivery_id FROM hookfleet.delivery_queue ORDER BY delivery_id", &[])
        .await
        .expect("rows")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(left, [ids[1], ids[4], ids[5], ids[6], ids[7], ids[8]]);
}

#[tokio::test]
async fn the_depth_sample_is_counted_at_most_once_per_interval_for_the_fleet() {
    let db = database().await;
    let client = db.client().await;
    let hook = webhook(&db).await;
    let rows = insert_many(&client, hook, 3).await;
    set_status(&client, rows[0], "dead").await;
    let queue = queue(&db);
    let counts = |depth: &hookfleet_core::queue::QueueDepth| -> BTreeMap<String, i64> {
        depth.by_status.iter().cloned().collect()
    };
    let first = queue.depth(Duration::from_secs(60)).await.expect("depth");
    assert_eq!(
        counts(&first),
        BTreeMap::from([("dead".to_owned(), 1), ("in_flight".to_owned(), 0), ("pending".to_owned(), 2)])
    );
    insert_many(&client, hook, 5).await;
    let cached = queue.depth(Duration::from_secs(60)).await.expect("depth");
    assert_eq!(counts(&cached)["pending"], 2, "a fresh sample is read, not recounted");
    let recounted = queue.depth(Duration::ZERO).await.expect("depth");
    assert_eq!(counts(&recounted)["pending"], 7);
    assert!(recounted.oldest_due_age < Duration::from_secs(60));
}

#[tokio::test]
async fn prune_workers_forgets_only_long_silent_workers() {
    let db = database().await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO hookfleet.workers (worker_id, host, version, last_seen_at) VALUES \
             ('gone', 'h', 'v', now() - interval '2 hours'), ('alive', 'h', 'v', now() - interval '10 seconds')",
        )
        .await
        .expect("workers");
    assert_eq!(queue(&db).prune_workers(Duration::from_secs(3600)).await.expect("prune"), 1);
    assert_eq!(count(&client, "SELECT count(*) FROM hookfleet.workers WHERE worker_id = 'alive'").await, 1);
}

#[tokio::test]
async fn producers_of_one_ordering_key_get_ids_in_commit_order() {
    let db = database().await;
    let hook = webhook(&db).await;
    let mut first = db.client().await;
    let second = db.client().await;
    let insert = "INSERT INTO hookfleet.delivery_queue (webhook_id, ordering_key, message_body) \
                  VALUES ($1, 'k', $2) RETURNING delivery_id";
    let t1 = first.transaction().await.expect("begin");
    let early: i64 = t1.query_one(insert, &[&hook, &serde_json::json!({"seq": 1})]).await.expect("t1").get(0);
    // The second producer of the key waits for the first to commit…
    let late = tokio::spawn(async move {
        second.query_one(insert, &[&hook, &serde_json::json!({"seq": 2})]).await.expect("t2").get::<_, i64>(0)
    });
    // Observed, not guessed at: the second session is seen waiting on the key's advisory lock (from
    // a session of its own: a transaction sees one snapshot of pg_stat_activity).
    let watcher = db.client().await;
    hookfleet_test_support::eventually(
        Duration::from_secs(10),
        "the second producer to wait on the key's lock",
        || {
            let client = &watcher;
            async move {
                let waiting: i64 = client
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                     AND wait_event_type = 'Lock' AND wait_event = 'advisory'",
                        &[],
                    )
                    .await
                    .expect("pg_stat_activity")
                    .get(0);
                (waiting == 1).then_some(())
            }
        },
    )
    .await;
    assert!(!late.is_finished(), "the second producer of the key must wait for the first");
    // …while another key is not held up.
    let other: i64 = db
        .client()
        .await
        .query_one(
            "INSERT INTO hookfleet.delivery_queue (webhook_id, ordering_key, message_body) VALUES ($1, 'other', '{}') RETURNING delivery_id",
            &[&hook],
        )
        .await
        .expect("other key")
        .get(0);
    t1.commit().await.expect("commit");
    let late = late.await.expect("t2 finished");
    assert!(late > early && late > other, "ids follow commit order: {early} < {late}");
}

#[tokio::test]
async fn health_from_a_batch_folds_its_attempts_in_order() {
    let db = database().await;
    let client = db.client().await;
    let hook = webhook(&db).await;
    let fold = |codes: Vec<Option<i32>>| {
        let client = &client;
        async move {
            let times: Vec<f64> = codes.iter().map(|_| 10.0).collect();
            let errors: Vec<Option<String>> = codes.iter().map(|_| Some("x".to_owned())).collect();
            client
                .query_one(
                    "SELECT hookfleet.update_webhook_health_many($1, $2, $3, $4, 3, 60)",
                    &[&hook, &codes, &times, &errors],
                )
                .await
                .expect("health")
                .get::<_, Option<String>>(0)
        }
    };
    // Failures then a success: the success resets the run, the circuit stays closed.
    assert_eq!(fold(vec![Some(500), Some(500), Some(200)]).await.as_deref(), Some("healthy"));
    let row = client
        .query_one(
            "SELECT total_attempts, consecutive_failures, circuit_state FROM hookfleet.webhook_health_metrics WHERE webhook_id = $1",
            &[&hook],
        )
        .await
        .expect("row");
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i32>(1), row.get::<_, String>(2)), (3, 0, "closed".into()));
    // A success then three failures (threshold 3): the batch ends with the circuit open.
    assert_eq!(fold(vec![Some(200), None, Some(502), Some(404)]).await.as_deref(), Some("unavailable"));
    assert_eq!(count(&client, "SELECT consecutive_failures::bigint FROM hookfleet.webhook_health_metrics").await, 3);
    // An empty batch changes nothing but the timestamp.
    assert_eq!(fold(vec![]).await.as_deref(), Some("unavailable"));
    assert_eq!(count(&client, "SELECT total_attempts FROM hookfleet.webhook_health_metrics").await, 7);
}

/// The write-back's health call: a batch of successes is computed in closed form, anything else is
/// folded one by one. Either way the row must be what folding the attempts one at a time gives.
#[tokio::test]
async fn health_of_a_batch_in_closed_form_equals_the_fold_one_attempt_at_a_time() {
    let db = database().await;
    let client = db.client().await;
    type Attempts = Vec<(Option<i32>, Option<f64>)>;
    // Each case runs on a webhook without a health row, then again on the row the first left.
    let cases: Vec<Attempts> = vec![
        vec![(Some(200), Some(5.0)), (Some(201), None), (Some(204), Some(7.5)), (Some(299), Some(11.0))],
        vec![(Some(200), None), (Some(200), Some(3.0))],
        vec![(Some(200), None)],
        vec![(Some(500), Some(4.0)), (Some(200), Some(2.0)), (None, None), (Some(200), Some(9.0))],
        (0..100).map(|i| (Some(200), Some(f64::from(i % 7)))).collect(),
    ];
    let columns = "total_attempts, successful_attempts, failed_attempts, consecutive_failures, success_rate, \
                   avg_response_time_ms, last_status_code, health_status, circuit_state, last_success_at IS NOT NULL";
    for (n, attempts) in cases.iter().enumerate() {
        let (batched, one_by_one) = (webhook(&db).await, webhook(&db).await);
        let codes: Vec<Option<i32>> = attempts.iter().map(|(code, _)| *code).collect();
        let times: Vec<Option<f64>> = attempts.iter().map(|(_, ms)| *ms).collect();
        let errors: Vec<Option<String>> =
            codes.iter().map(|code| code.is_none().then(|| "timeout".to_owned())).collect();
        for _round in 0..2 {
            let status: Option<String> = client
                .query_one(
                    "SELECT hookfleet.update_webhook_health_batch($1, $2, $3, $4, 5, 60)",
                    &[&batched, &codes, &times, &errors],
                )
                .await
                .expect("batch")
                .get(0);
            let mut last = None;
            for i in 0..codes.len() {
                last = client
                    .query_one(
                        "SELECT hookfleet.update_webhook_health_many($1, $2, $3, $4, 5, 60)",
                        &[&one_by_one, &vec![codes[i]], &vec![times[i]], &vec![errors[i].clone()]],
                    )
                    .await
                    .expect("one attempt")
                    .get::<_, Option<String>>(0);
            }
            assert_eq!(status, last, "case {n}");
            let row = |hook: i64| {
                let client = &client;
                async move {
                    client
                        .query_one(
                            &format!("SELECT {columns} FROM hookfleet.webhook_health_metrics WHERE webhook_id = $1"),
                            &[&hook],
                        )
                        .await
                        .expect("health row")
                }
            };
            let (a, b) = (row(batched).await, row(one_by_one).await);
            for column in [0, 1, 2] {
                assert_eq!(a.get::<_, i64>(column), b.get::<_, i64>(column), "case {n}, column {column}");
            }
            assert_eq!(a.get::<_, i32>(3), b.get::<_, i32>(3), "case {n}: consecutive failures");
            for column in [4, 5] {
                let (x, y) = (a.get::<_, Option<f64>>(column), b.get::<_, Option<f64>>(column));
                assert!(
                    x.zip(y).is_some_and(|(x, y)| (x - y).abs() < 1e-9) || (x.is_none() && y.is_none()),
                    "case {n}, column {column}: {x:?} vs {y:?}"
                );
            }
            assert_eq!(a.get::<_, Option<i32>>(6), b.get::<_, Option<i32>>(6), "case {n}: last status");
            for column in [7, 8] {
                assert_eq!(a.get::<_, String>(column), b.get::<_, String>(column), "case {n}, column {column}");
            }
            assert_eq!(a.get::<_, bool>(9), b.get::<_, bool>(9), "case {n}: last success");
        }
    }
}

#[tokio::test]
async fn a_claim_spans_priority_levels_highest_first_and_stops_at_the_batch_size() {
    let db = database().await;
    let client = db.client().await;
    let hook = webhook(&db).await;
    client
        .execute(
            "INSERT INTO hookfleet.delivery_queue (webhook_id, message_id, priority, message_body) \
             SELECT $1, 'p' || p || '-' || n, p, '{}' FROM generate_series(1, 3) p, generate_series(1, 4) n",
            &[&hook],
        )
        .await
        .expect("rows");
    // A future row at the top priority must neither be claimed nor stop the lower levels.
    client
        .execute(
            "INSERT INTO hookfleet.delivery_queue (webhook_id, message_id, priority, message_body, deliver_at) \
             VALUES ($1, 'later', 9, '{}', now() + interval '1 hour')",
            &[&hook],
        )
        .await
        .expect("future row");
    let ids: Vec<String> = client
        .query("SELECT message_id FROM hookfleet.get_ready_deliveries('w1', 6, interval '1 minute')", &[])
        .await
        .expect("claim")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(ids, ["p3-1", "p3-2", "p3-3", "p3-4", "p2-1", "p2-2"]);
    assert_eq!(
        count(&client, "SELECT count(*) FROM hookfleet.delivery_queue WHERE delivery_status = 'in_flight'").await,
        6
    );
}

#[tokio::test]
async fn worker_sessions_commit_asynchronously_with_statement_timeouts() {
    let db = database().await;
    let pool =
        hookfleet_core::db::worker_pool(&db.url, 1, hookfleet_core::db::DEFAULT_STATEMENT_TIMEOUT).expect("pool");
    let client = pool.get().await.expect("connection");
    for (setting, expected) in [("synchronous_commit", "off"), ("statement_timeout", "30s")] {
        let value: String = client.query_one(&format!("SHOW {setting}"), &[]).await.expect(setting).get(0);
        assert_eq!(value, expected, "{setting}");
    }
}

// ---------------------------------------------------------------------------------------------
// 11. Sessions
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn options_in_the_database_url_are_kept_beside_hookfleets_own_session_settings() {
    let db = database().await;
    let url = format!("{} options='-c work_mem=7MB -c statement_timeout=45s'", db.url);
    let pool = hookfleet_core::db::worker_pool(&url, 1, hookfleet_core::db::DEFAULT_STATEMENT_TIMEOUT).expect("pool");
    let session = pool.get().await.expect("session");
    let row = session
        .query_one(
            "SELECT current_setting('work_mem'), current_setting('synchronous_commit'), \
             current_setting('idle_in_transaction_session_timeout'), current_setting('statement_timeout')",
            &[],
        )
        .await
        .expect("settings");
    let settings: (String, String, String, String) = (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(
        settings,
        ("7MB".into(), "off".into(), "1min".into(), "45s".into()),
        "the URL's own options are kept beside the worker's, and an operator's setting of the same name wins"
    );
}

// ---------------------------------------------------------------------------------------------
// Many webhooks in one claim (issue 15: the claim decides set-based)
// ---------------------------------------------------------------------------------------------

/// `count` webhooks made in one statement, as a busy service has them; their URL and secrets are
/// placeholders (nothing here decrypts or sends). The creation trigger gives each its health and
/// limiter rows.
async fn many_webhooks(client: &Client, count: i32, rate_limit_rps: Option<f64>, burst: Option<i32>) -> Vec<i64> {
    client
        .query(
            "INSERT INTO hookfleet.webhooks (name, url_encrypted, secrets_encrypted, encryption_key_id, rate_limit_rps, rate_limit_burst) \
             SELECT 'wide-' || n, '\\x00', '\\x00', 'none', $2, $3 FROM generate_series(1, $1::integer) n \
             RETURNING webhook_id",
            &[&count, &rate_limit_rps, &burst],
        )
        .await
        .expect("create webhooks")
        .iter()
        .map(|row| row.get(0))
        .collect::<BTreeSet<i64>>()
        .into_iter()
        .collect()
}

/// One row for each webhook, in one statement, in webhook order (so also in claim order).
async fn one_row_each(client: &Client, webhooks: &[i64]) -> Vec<i64> {
    client
        .query(
            "INSERT INTO hookfleet.delivery_queue (webhook_id, message_body) \
             SELECT w, '{}' FROM unnest($1::bigint[]) w ORDER BY w RETURNING delivery_id",
            &[&webhooks],
        )
        .await
        .expect("insert rows")
        .iter()
        .map(|row| row.get(0))
        .collect::<BTreeSet<i64>>()
        .into_iter()
        .collect()
}

#[tokio::test]
async fn a_claim_over_thousands_of_webhooks_takes_the_oldest_rows_one_per_webhook_and_spends_one_token_each() {
    let db = database().await;
    let client = db.client().await;
    let hooks = many_webhooks(&client, 3_000, Some(1.0), Some(1)).await;
    let first = one_row_each(&client, &hooks).await;
    let second = one_row_each(&client, &hooks).await;

    let claim = flow_claim(&client, "w1", 100, (None, None), Some(50), &[]).await;
    assert_eq!(claim.claimed, first[..100], "the 100 oldest rows, in claim order");
    // Each of those webhooks spent its one token (and so is reported held by its rate limit);
    // no other webhook's bucket was touched.
    let spent: Vec<i64> = client
        .query("SELECT webhook_id FROM hookfleet.webhook_rate_limits WHERE tat > 0 ORDER BY webhook_id", &[])
        .await
        .expect("buckets")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(spent, hooks[..100]);
    let held: BTreeSet<i64> =
        claim.held.iter().filter(|(_, reason)| reason == "rate_limit").map(|(hook, _)| *hook).collect();
    assert_eq!(held, hooks[..100].iter().copied().collect::<BTreeSet<_>>());

    // The next claim passes over those (no token) to the next 100 webhooks' rows, never to their
    // second rows.
    let claim = flow_claim(&client, "w2", 100, (None, None), Some(50), &[]).await;
    assert_eq!(claim.claimed, first[100..200]);
    assert!(claim.claimed.iter().all(|id| !second.contains(id)));
    assert_eq!(
        count(&client, "SELECT count(*) FROM hookfleet.delivery_queue WHERE delivery_status = 'in_flight'").await,
        200
    );
}

#[tokio::test]
async fn a_claim_passes_over_webhooks_another_claim_holds_to_the_next_ones() {
    let db = database().await;
    let client = db.client().await;
    let hooks = many_webhooks(&client, 1_000, None, None).await;
    let rows = one_row_each(&client, &hooks).await;

    // A claim left open (a psql prompt, or a worker's claim in progress) holds the first 10
    // webhooks' limiter rows and their rows.
    let other = db.client().await;
    other.batch_execute("BEGIN").await.expect("begin");
    let open: Vec<i64> = other
        .query("SELECT delivery_id FROM hookfleet.get_ready_deliveries('psql', 10, interval '60 seconds')", &[])
        .await
        .expect("open claim")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(sorted(open), rows[..10]);

    // The next claim neither waits nor comes back empty: it takes the following webhooks' rows
    // and reports the held ones as contended, to be looked at again soon.
    let claim = tokio::time::timeout(Duration::from_secs(10), flow_claim(&client, "w1", 20, (None, None), None, &[]))
        .await
        .expect("the claim did not wait");
    assert_eq!(claim.claimed, rows[10..30]);
    let contended: Vec<i64> =
        claim.held.iter().filter(|(_, reason)| reason == "contended").map(|(hook, _)| *hook).collect();
    assert_eq!(sorted(contended), hooks[..10]);
    other.batch_execute("ROLLBACK").await.expect("rollback");
    assert_eq!(flow_claim(&client, "w2", 10, (None, None), None, &[]).await.claimed, rows[..10]);
}

#[tokio::test]
async fn concurrent_claims_over_many_webhooks_take_every_row_once_and_keep_each_rate() {
    let db = database().await;
    let client = db.client().await;
    // 500 webhooks with a burst of 2 and 4 rows each: at most 2 rows of each may go now.
    let hooks = many_webhooks(&client, 500, Some(0.001), Some(2)).await;
    for _ in 0..4 {
        one_row_each(&client, &hooks).await;
    }
    let claims: Vec<_> = (0..6)
        .map(|n| {
            let url = db.url.clone();
            tokio::spawn(async move {
                let (client, connection) = tokio_postgres::connect(&url, NoTls).await.expect("connect");
                tokio::spawn(connection);
                let mut taken = Vec::new();
                // Bounded: far more rounds than the 1,000 rows need.
                for _ in 0..200 {
                    let claim = flow_claim(&client, &format!("w{n}"), 37, (None, None), None, &[]).await;
                    if claim.claimed.is_empty() && claim.held.iter().all(|(_, reason)| reason != "contended") {
                        break;
                    }
                    taken.extend(claim.claimed);
                }
                taken
            })
        })
        .collect();
    let mut all = Vec::new();
    for claim in claims {
        all.extend(claim.await.expect("claimer"));
    }
    let distinct: BTreeSet<i64> = all.iter().copied().collect();
    assert_eq!(distinct.len(), all.len(), "no row was claimed twice");
    assert_eq!(all.len(), 1_000, "two rows of each of the 500 webhooks, no more");
    let per_webhook: Vec<(i64, i64)> = client
        .query(
            "SELECT webhook_id, count(*) FROM hookfleet.delivery_queue WHERE delivery_status = 'in_flight' GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .expect("per webhook")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(per_webhook, hooks.iter().map(|hook| (*hook, 2)).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_webhook_found_full_under_its_lock_gives_its_place_in_the_batch_to_the_next_one() {
    let db = database().await;
    let client = db.client().await;
    // Six webhooks with a due row each; the third and fourth are at max_in_flight, which only the
    // read under the lock can tell (their rows in flight were marked after the settings read in
    // a real fleet; here they are simply there).
    let mut hooks = Vec::new();
    for n in 0..6 {
        let max_in_flight = (n == 2 || n == 3).then_some(1);
        hooks.push(webhook_with(&db, NewWebhook { max_in_flight, ..spec() }).await);
    }
    let rows: Vec<i64> = {
        let mut rows = Vec::new();
        for hook in &hooks {
            rows.push(insert(&client, *hook).await);
        }
        rows
    };
    for hook in &hooks[2..4] {
        let busy = insert(&client, *hook).await;
        set_status(&client, busy, "in_flight").await;
    }
    let claim = flow_claim(&client, "w1", 3, (None, None), None, &[]).await;
    assert_eq!(sorted(claim.claimed), [rows[0], rows[1], rows[4]], "the fifth webhook takes the place");
    let mut held = claim.held.clone();
    held.sort();
    assert_eq!(held, [(hooks[2], "max_in_flight".to_owned()), (hooks[3], "max_in_flight".to_owned())]);
}

#[tokio::test]
async fn what_one_webhook_cannot_take_goes_to_the_others_and_no_limit_is_reported_falsely() {
    let db = database().await;
    let client = db.client().await;
    let keyed = webhook(&db).await;
    let plain = webhook(&db).await;
    // Four rows of one key (only the first may go) and four plain rows: a batch of 4 takes the
    // keyed webhook's one row and three plain ones.
    let keyed_rows: Vec<i64> = {
        let mut rows = Vec::new();
        for _ in 0..4 {
            rows.push(insert_keyed(&client, keyed, Some("k")).await);
        }
        rows
    };
    let plain_rows = insert_many(&client, plain, 4).await;
    let claim = flow_claim(&client, "w1", 4, (None, None), Some(5), &[]).await;
    assert_eq!(sorted(claim.claimed), [&keyed_rows[..1], &plain_rows[..3]].concat());
    // Neither took all its cap (5 slots) allowed: nothing to report.
    assert!(claim.held.is_empty(), "{:?}", claim.held);
}

#[tokio::test]
async fn a_webhook_listed_twice_as_busy_is_claimed_once() {
    let db = database().await;
    let client = db.client().await;
    let hook = webhook(&db).await;
    let rows = insert_many(&client, hook, 3).await;
    let claim = flow_claim(&client, "w1", 10, (None, None), Some(10), &[(hook, 0), (hook, 0)]).await;
    assert_eq!(claim.claimed, rows);
}

#[tokio::test]
async fn a_claim_past_a_held_back_window_never_takes_more_than_its_batch() {
    let db = database().await;
    let client = db.client().await;
    // The disabled webhook's backlog fills the window (4 batches), so the claim walks past it to
    // three webhooks with three rows each, and shares 5 between them.
    let disabled = webhook_with(&db, NewWebhook { enabled: false, ..spec() }).await;
    insert_many(&client, disabled, 50).await;
    let mut rows = Vec::new();
    for _ in 0..3 {
        let hook = webhook(&db).await;
        rows.push(insert_many(&client, hook, 3).await);
    }
    let claimed = claim(&client, "w1", 5).await;
    assert_eq!(claimed.len(), 5, "{claimed:?}");
    let per_webhook: Vec<usize> =
        rows.iter().map(|of_one| of_one.iter().filter(|id| claimed.contains(id)).count()).collect();
    assert_eq!(per_webhook, [2, 2, 1], "an equal share each, the rest to the first");
}

#[tokio::test]
async fn every_function_that_forbids_sequential_scans_also_turns_jit_off() {
    let db = database().await;
    let client = db.client().await;
    // seqscan = off prices a scan no index can replace (a small table without one) at 1e10, past
    // jit_above_cost: each call would then compile its statements (tens of ms for a 0.2 ms call).
    let rows = client
        .query(
            "SELECT p.proname, coalesce(p.proconfig, '{}') FROM pg_proc p \
             JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'hookfleet' ORDER BY 1",
            &[],
        )
        .await
        .expect("functions");
    let forbidding: Vec<(String, Vec<String>)> = rows
        .iter()
        .map(|row| (row.get::<_, String>(0), row.get::<_, Vec<String>>(1)))
        .filter(|(_, config)| config.iter().any(|setting| setting == "enable_seqscan=off"))
        .collect();
    let names: Vec<&str> = forbidding.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["claim_deliveries", "sample_queue_depth"]);
    for (name, config) in &forbidding {
        assert!(config.iter().any(|setting| setting == "jit=off"), "{name}: {config:?}");
    }
}
