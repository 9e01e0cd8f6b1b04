//! README promises about settings, run on the real `hookfleet-worker`: a webhook written under the old
//! encryption key is delivered by a worker holding both ("Keys"), and a worker holding neither defers
//! the webhook's rows by 30 s without spending a try ("Unusable webhooks"), and a webhook's
//! `timeout_ms` below `HTTP_TIMEOUT` is what ends its attempt ("Timeouts"); `HOOKFLEET_DB_POOL_SIZE`
//! caps the worker's pool sessions and `HOOKFLEET_MAX_IN_FLIGHT` its concurrent attempts;
//! `LOG_FORMAT=json` logs one JSON object per line; a `HOOKFLEET_CONFIG` file is read, the
//! environment overrides it, and a broken one stops start-up with exit 2 naming the file; the prune
//! service removes attempts and settled rows past `HOOKFLEET_ATTEMPT_RETENTION` / `_DELIVERY_RETENTION`.

use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use hookfleet_core::crypto::EncryptionKey;
use hookfleet_core::webhooks::{NewWebhook, WebhookView};
use hookfleet_test_support::{cluster, database, eventually, Receiver, Reply, TestDatabase, WorkerProcess};

const DEADLINE: Duration = Duration::from_secs(30);

fn worker_binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_hookfleet-worker"))
}

/// Written with the harness's key, which each test then treats as the old (or a lost) key.
async fn webhook(db: &TestDatabase, url: String) -> WebhookView {
    db.create_webhook(NewWebhook { url, enabled: true, ..NewWebhook::default() }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_under_the_previous_key_is_delivered_by_a_worker_holding_both_keys() {
    let db = database().await;
    let receiver = Receiver::ok().await;
    let hook = webhook(&db, receiver.url("/rotated")).await;
    let new_key = EncryptionKey::generate_base64();
    let old_key = cluster().encryption_key().to_owned();
    let _worker = WorkerProcess::spawn(
        worker_binary(),
        &db,
        "rotated",
        &[("HOOKFLEET_ENCRYPTION_KEY", &new_key), ("HOOKFLEET_PREVIOUS_ENCRYPTION_KEYS", &old_key)],
    );
    let delivery_id = db.insert_delivery(hook.webhook_id, r#"{"type":"rotation"}"#).await;
    let (_, retries, code, error) = db.wait_for_status(delivery_id, "delivered").await;
    assert_eq!((retries, code, error), (0, Some(200), None));
    assert_eq!(receiver.requests()[0].path, "/rotated", "the URL decrypted with the previous key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_of_a_webhook_the_worker_cannot_decrypt_are_deferred_30s_without_a_try() {
    let db = database().await;
    let receiver = Receiver::ok().await;
    let hook = webhook(&db, receiver.url("/lost-key")).await;
    let worker = WorkerProcess::spawn(
        worker_binary(),
        &db,
        "keyless",
        &[("HOOKFLEET_ENCRYPTION_KEY", &EncryptionKey::generate_base64())],
    );
    let delivery_id = db.insert_delivery(hook.webhook_id, r#"{"type":"lost"}"#).await;
    let client = db.client().await;
    let row = eventually(DEADLINE, "the undecryptable row deferred with a reason", || async {
        let row = client
            .query_one(
                "SELECT delivery_status, retry_count, last_error, \
                 extract(epoch FROM next_attempt_at - clock_timestamp())::float8 \
                 FROM hookfleet.delivery_queue WHERE delivery_id = $1",
                &[&delivery_id],
            )
            .await
            .expect("row");
        row.get::<_, Option<String>>(2).is_some().then_some(row)
    })
    .await;
    let (status, retries, error, due_in): (String, i32, Option<String>, f64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(status, "pending", "deferred, not failed: {error:?}");
    assert_eq!(retries, 0, "a deferral uses no retry");
    // Due again about 30 s after the deferral; the lower bound leaves the poll above 15 s of lag on a loaded machine.
    assert!((15.0..=30.5).contains(&due_in), "due again in {due_in:.1} s, expected about 30 s");
    let error = error.expect("reason");
    assert!(error.to_lowercase().contains("decrypt"), "the reason says the webhook cannot be decrypted: {error}");
    assert_eq!(
        db.count(&format!("SELECT count(*) FROM hookfleet.delivery_attempts WHERE delivery_id = {delivery_id}")).await,
        0,
        "no attempt was written"
    );
    assert!(receiver.requests().is_empty(), "nothing was sent");
    drop(worker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_timeout_ms_below_http_timeout_ends_the_attempt() {
    let db = database().await;
    // The receiver answers long after the webhook's 500 ms but well within HTTP_TIMEOUT.
    let receiver = Receiver::start(|_, _| Reply::status(200).after(Duration::from_secs(15))).await;
    let hook = db
        .create_webhook(NewWebhook {
            url: receiver.url("/slow"),
            enabled: true,
            timeout_ms: Some(500),
            ..NewWebhook::default()
        })
        .await;
    // A long lease, so that the attempt limit a fifth before the lease (8 s with the harness's 10 s) is not what ends it.
    let _worker = WorkerProcess::spawn(
        worker_binary(),
        &db,
        "short-timeout",
        &[("HTTP_TIMEOUT", "30s"), ("HOOKFLEET_LEASE", "120s")],
    );
    let delivery_id = db.insert_delivery(hook.webhook_id, r#"{"type":"slow"}"#).await;
    let client = db.client().await;
    let (error_class, duration_ms) = eventually(DEADLINE, "the first attempt written", || async {
        client
            .query_opt(
                "SELECT error_class, duration_ms FROM hookfleet.delivery_attempts \
                 WHERE delivery_id = $1 AND attempt_number = 1",
                &[&delivery_id],
            )
            .await
            .expect("attempt")
            .map(|row| (row.get::<_, Option<String>>(0), row.get::<_, f64>(1)))
    })
    .await;
    assert_eq!(error_class.as_deref(), Some("timeout"));
    // Ended by the 500 ms, not by the receiver's 15 s or HTTP_TIMEOUT's 30 s; room for a loaded machine.
    assert!((450.0..10_000.0).contains(&duration_ms), "attempt took {duration_ms} ms");
}

/// The most `hookfleet-worker` pool sessions seen on `db` while a worker with `pool_size` drains rows.
async fn most_pool_sessions(pool_size: &str) -> i64 {
    let db = database().await;
    let receiver = Receiver::ok().await;
    let hook = webhook(&db, receiver.url("/pool")).await;
    let _worker = WorkerProcess::spawn(
        worker_binary(),
        &db,
        "pool",
        &[("HOOKFLEET_DB_POOL_SIZE", pool_size), ("BATCH_SIZE", "5"), ("HOOKFLEET_MAX_IN_FLIGHT", "64")],
    );
    db.insert_deliveries(hook.webhook_id, 400).await;
    let client = db.client().await;
    let sessions = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' AND application_name = 'hookfleet-worker'",
        db.name
    );
    let most = AtomicI64::new(0);
    eventually(DEADLINE, "400 rows delivered", || async {
        most.fetch_max(client.query_one(&sessions, &[]).await.expect("sessions").get::<_, i64>(0), Ordering::Relaxed);
        (db.count("SELECT count(*) FROM hookfleet.delivery_queue WHERE delivery_status = 'delivered'").await == 400)
            .then_some(())
    })
    .await;
    most.into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hookfleet_db_pool_size_bounds_the_worker_sessions() {
    let most = most_pool_sessions("2").await;
    assert!((1..=2).contains(&most), "{most} pool sessions with HOOKFLEET_DB_POOL_SIZE=2");
}

/// The most requests that arrived within less than `hold` of each other: each is held open for
/// `hold`, so all of them were in flight at once.
fn most_overlapping(arrivals: &mut [std::time::Instant], hold: Duration) -> usize {
    arrivals.sort_unstable();
    let window = hold.mul_f64(0.9);
    (0..arrivals.len())
        .map(|first| arrivals[first..].iter().take_while(|at| at.duration_since(arrivals[first]) < window).count())
        .max()
        .unwrap_or(0)
}

async fn most_concurrent_attempts(max_in_flight: &str) -> usize {
    const HOLD: Duration = Duration::from_millis(400);
    let db = database().await;
    let receiver = Receiver::start(|_, _| Reply::status(200).after(HOLD)).await;
    let hook = webhook(&db, receiver.url("/slots")).await;
    // The per-webhook share (default half) is lifted to the whole cap, so only HOOKFLEET_MAX_IN_FLIGHT limits.
    let _worker = WorkerProcess::spawn(
        worker_binary(),
        &db,
        "slots",
        &[("HOOKFLEET_MAX_IN_FLIGHT", max_in_flight), ("HOOKFLEET_MAX_IN_FLIGHT_PER_WEBHOOK", max_in_flight)],
    );
    db.insert_deliveries(hook.webhook_id, 24).await;
    let requests = receiver.wait_for(24, DEADLINE).await;
    let mut arrivals: Vec<_> = requests.iter().map(|request| request.received_at).collect();
    most_overlapping(&mut arrivals, HOLD)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hookfleet_max_in_flight_bounds_one_workers_concurrent_attempts() {
    let most = most_concurrent_attempts("4").await;
    assert!((2..=4).contains(&most), "{most} attempts in flight at once with HOOKFLEET_MAX_IN_FLIGHT=4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_format_json_writes_one_json_object_per_line() {
    let db = database().await;
    let receiver = Receiver::ok().await;
    let hook = webhook(&db, receiver.url("/json-logs")).await;
    let mut worker = WorkerProcess::spawn(worker_binary(), &db, "json-logs", &[("LOG_FORMAT", "json")]);
    let delivery_id = db.insert_delivery(hook.webhook_id, r#"{"type":"log"}"#).await;
    db.wait_for_status(delivery_id, "delivered").await;
    // A clean shutdown adds the drain's lines, so start-up, work and exit are all checked.
    worker.signal("TERM");
    assert!(worker.wait(DEADLINE).await.success(), "worker exits 0:\n{}", worker.log());
    let log = worker.log();
    let lines: Vec<&str> = log.lines().collect();
    assert!(lines.len() >= 2, "the worker logged its start and its exit:\n{log}");
    for line in lines {
        let parsed: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|error| panic!("not JSON ({error}): {line}"));
        assert!(parsed.is_object(), "not a JSON object: {line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hookfleet_config_file_is_read_and_the_environment_overrides_it() {
    let db = database().await;
    let receiver = Receiver::ok().await;
    let hook = webhook(&db, receiver.url("/config-file")).await;
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("hookfleet.toml");
    // log_format is set only here; worker_id also comes from the environment, which must win.
    std::fs::write(&path, "log_format = \"json\"\nworker_id = \"from-file\"\n").expect("config file");
    let path = path.to_str().expect("UTF-8 path");
    let mut worker = WorkerProcess::spawn(worker_binary(), &db, "from-env", &[("HOOKFLEET_CONFIG", path)]);
    let delivery_id = db.insert_delivery(hook.webhook_id, r#"{"type":"config"}"#).await;
    db.wait_for_status(delivery_id, "delivered").await;
    let attempt_worker: String = db
        .client()
        .await
        .query_one("SELECT worker_id FROM hookfleet.delivery_attempts WHERE delivery_id = $1", &[&delivery_id])
        .await
        .expect("attempt")
        .get(0);
    assert_eq!(attempt_worker, "from-env", "WORKER_ID in the environment overrides the file");
    worker.signal("TERM");
    assert!(worker.wait(DEADLINE).await.success(), "worker exits 0:\n{}", worker.log());
    let log = worker.log();
    let first = log.lines().next().unwrap_or_else(|| panic!("no log lines"));
    let parsed: serde_json::Value = serde_json::from_str(first).unwrap_or_else(|error| panic!("{error}: {first}"));
    assert!(parsed.is_object(), "log_format from the file applies: {first}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_hookfleet_config_file_stops_start_up_with_exit_2_and_a_message_naming_it() {
    let db = database().await;
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("broken.toml");
    std::fs::write(&path, "log_format = [not toml\n").expect("config file");
    let path = path.to_str().expect("UTF-8 path");
    let mut worker = WorkerProcess::spawn(worker_binary(), &db, "bad-config", &[("HOOKFLEET_CONFIG", path)]);
    let status = worker.wait(DEADLINE).await;
    let log = worker.log();
    assert_eq!(status.code(), Some(2), "a configuration error is a usage error:\n{log}");
    assert!(
        log.contains("HOOKFLEET_CONFIG") && log.contains(path),
        "the message names the setting and the file:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prune_service_removes_attempts_and_settled_rows_past_their_retention() {
    let db = database().await;
    let hook = webhook(&db, "http://127.0.0.1:9/prune".to_owned()).await;
    let client = db.client().await;
    // Two settled rows, each with one attempt: one two days old, one fresh.
    for (message_id, age) in [("old", "2 days"), ("fresh", "1 minute")] {
        // Inserted as producers do (pending), then settled in the past as a worker would have.
        let delivery_id: i64 = client
            .query_one(
                "INSERT INTO hookfleet.delivery_queue (webhook_id, message_id, message_body) \
                 VALUES ($1, $2, '{}') RETURNING delivery_id",
                &[&hook.webhook_id, &message_id],
            )
            .await
            .expect("insert")
            .get(0);
        client
            .batch_execute(&format!(
                "UPDATE hookfleet.delivery_queue SET delivery_status = 'delivered', \
                     deliver_at = now() - interval '{age}', next_attempt_at = now() - interval '{age}', \
                     created_at = now() - interval '{age}', delivered_at = now() - interval '{age}', \
                     last_attempt_at = now() - interval '{age}' \
                 WHERE delivery_id = {delivery_id}; \
                 INSERT INTO hookfleet.delivery_attempts (delivery_id, webhook_id, attempt_number, worker_id, \
                     started_at, duration_ms, status_code, outcome) \
                 VALUES ({delivery_id}, {}, 1, 'earlier', now() - interval '{age}', 5, 200, 'delivered')",
                hook.webhook_id
            ))
            .await
            .expect("settle it in the past, with its attempt");
    }
    let _worker = WorkerProcess::spawn(
        worker_binary(),
        &db,
        "pruner",
        &[("HOOKFLEET_ATTEMPT_RETENTION", "1d"), ("HOOKFLEET_DELIVERY_RETENTION", "1d")],
    );
    // The service's first run is at start-up; its next is a minute later, beyond this test.
    eventually(DEADLINE, "the old row and its attempt pruned", || async {
        let rows = db.count("SELECT count(*) FROM hookfleet.delivery_queue").await;
        let attempts = db.count("SELECT count(*) FROM hookfleet.delivery_attempts").await;
        (rows == 1 && attempts == 1).then_some(())
    })
    .await;
    let kept: String =
        client.query_one("SELECT message_id FROM hookfleet.delivery_queue", &[]).await.expect("the fresh row").get(0);
    assert_eq!(kept, "fresh", "rows inside their retention stay");
    assert_eq!(
        db.count("SELECT count(*) FROM hookfleet.delivery_attempts WHERE started_at > now() - interval '1 day'").await,
        1,
        "the fresh attempt stays"
    );
}
