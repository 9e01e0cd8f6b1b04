//! Delivery semantics with real workers: wake-ups through LISTEN/NOTIFY, per-key ordering across
//! workers and retries, fan-out with `hookfleet.publish`.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use hookfleet_core::webhooks::{NewWebhook, WebhookView};
use hookfleet_test_support::{database, eventually, Receiver, Reply, TestDatabase, WorkerProcess};

const DEADLINE: Duration = Duration::from_secs(30);

fn worker_binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_hookfleet-worker"))
}

async fn webhook(db: &TestDatabase, url: String, event_types: &[&str]) -> WebhookView {
    let event_types = event_types.iter().map(|event| (*event).to_owned()).collect();
    db.create_webhook(NewWebhook { url, event_types, enabled: true, ..NewWebhook::default() }).await
}

async fn wait_until_all(db: &TestDatabase, status: &str, rows: i64) {
    let query = format!("SELECT count(*) FROM hookfleet.delivery_queue WHERE delivery_status = '{status}'");
    let until = Instant::now() + Duration::from_secs(60);
    while db.count(&query).await != rows {
        if Instant::now() > until {
            let messages = db
                .client()
                .await
                .simple_query(
                    "SELECT delivery_id, message_id, delivery_status, retry_count, locked_by, locked_until, \
                     next_attempt_at, now(), last_error FROM hookfleet.delivery_queue \
                     WHERE delivery_status <> 'delivered' ORDER BY delivery_id LIMIT 20",
                )
                .await
                .expect("stuck rows");
            let stuck: Vec<String> = messages
                .iter()
                .filter_map(|message| match message {
                    tokio_postgres::SimpleQueryMessage::Row(row) => {
                        Some((0..row.len()).map(|i| row.get(i).unwrap_or("NULL")).collect::<Vec<_>>().join(" | "))
                    }
                    _ => None,
                })
                .collect();
            panic!("timed out waiting for {rows} rows to be {status}; not settled:\n{}", stuck.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The worker's LISTEN session, once it is connected and idle.
async fn listener_pid(db: &TestDatabase) -> i32 {
    eventually(DEADLINE, "the worker's LISTEN session", || async {
        db.client()
            .await
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'hookfleet-worker-listen' \
                 AND query ILIKE 'LISTEN%' AND datname = current_database()",
                &[],
            )
            .await
            .ok()
            .flatten()
            .map(|row| row.get(0))
    })
    .await
}

/// How many claims the worker has finished (`webhook_claim_duration_seconds` observes each one,
/// empty or not).
async fn claims(worker: &WorkerProcess) -> Option<f64> {
    let (_, body) = worker.get("/metrics").await?;
    hookfleet_test_support::metric_value(&body, "webhook_claim_duration_seconds_count")
}

/// Waits until the worker has finished more than `after` claims and then claims no more: it is
/// asleep, and only a wake-up (or its 60 s poll) can make it claim again.
async fn asleep_after(worker: &WorkerProcess, after: f64) -> f64 {
    let until = Instant::now() + DEADLINE;
    let mut previous = None;
    loop {
        let now = claims(worker).await;
        if let Some(now) = now.filter(|now| *now > after && previous == Some(*now)) {
            return now;
        }
        assert!(Instant::now() < until, "the worker never fell asleep after claim {after} (now {now:?})");
        previous = now;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insert_wakes_an_idle_worker_long_before_the_poll_interval_and_after_a_reconnect() {
    let db = database().await;
    let receiver = Receiver::ok().await;
    let hook = webhook(&db, receiver.url("/"), &[]).await;
    // With a 60 s poll, only a notification can explain a delivery within seconds, once the
    // worker has made its empty claims (at start and when the listener connects) and sleeps.
    let worker = WorkerProcess::spawn(worker_binary(), &db, "w1", &[("POLL_INTERVAL", "60s")]);
    let first_listener = listener_pid(&db).await;
    asleep_after(&worker, 0.0).await;

    let client = db.client().await;
    let mut latencies = Vec::new();
    for round in 0..2 {
        if round == 1 {
            // Kill the listener's session: the worker must reconnect and keep waking up. The
            // reconnect itself makes one (empty) claim, for rows that came while nobody listened.
            let before = asleep_after(&worker, 0.0).await;
            client.execute("SELECT pg_terminate_backend($1)", &[&first_listener]).await.expect("terminate listener");
            let second = listener_pid(&db).await;
            assert_ne!(second, first_listener);
            asleep_after(&worker, before).await;
        }
        let sent = Instant::now();
        client
            .execute(
                "INSERT INTO hookfleet.delivery_queue (webhook_id, message_body) VALUES ($1, '{}')",
                &[&hook.webhook_id],
            )
            .await
            .expect("insert");
        receiver.wait_for(round + 1, Duration::from_secs(30)).await;
        latencies.push(sent.elapsed());
    }
    eprintln!("insert → arrival with a 60 s poll interval: {latencies:?}");
    // Generous for a loaded machine, and still far below the 60 s poll.
    assert!(latencies.iter().all(|latency| *latency < Duration::from_secs(15)), "{latencies:?}");
    assert!(worker.log().contains("wake-up listener disconnected"), "the reconnect is logged:\n{}", worker.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_rows_go_one_at_a_time_in_order_across_three_workers_and_retries() {
    const KEYS: i64 = 8;
    const PER_KEY: i64 = 15;
    let db = database().await;
    // Every key's 3rd message fails on its first try (and is retried); each request is held 10 ms.
    let seen = std::sync::Mutex::new(std::collections::HashSet::new());
    let receiver = Receiver::start(move |request, _| {
        let id = request.header("webhook-id").unwrap_or_default().to_owned();
        let first_try = seen.lock().unwrap().insert(id.clone());
        if id.ends_with("-3") && first_try {
            Reply::status(503)
        } else {
            Reply::status(200).after(Duration::from_millis(10))
        }
    })
    .await;
    let hook = webhook(&db, receiver.url("/"), &[]).await;
    // Eight failures can come in a row here; the breaker (threshold 5) would rightly open and
    // pause the webhook for a minute, which is not what this test is about.
    let settings = [("BATCH_SIZE", "5"), ("CIRCUIT_BREAKER_FAILURE_THRESHOLD", "1000")];
    let workers: Vec<WorkerProcess> =
        (1..=3).map(|n| WorkerProcess::spawn(worker_binary(), &db, &format!("w{n}"), &settings)).collect();
    // Interleaved keys in one statement, plus unkeyed rows.
    db.client()
        .await
        .execute(
            "INSERT INTO hookfleet.delivery_queue (webhook_id, message_id, ordering_key, message_body) \
             SELECT $1, 'k' || k || '-' || s, 'k' || k, jsonb_build_object('key', k, 'seq', s) \
             FROM generate_series(1, $2::bigint) s, generate_series(1, $3::bigint) k ORDER BY s, k",
            &[&hook.webhook_id, &PER_KEY, &KEYS],
        )
        .await
        .expect("keyed rows");
    wait_until_all(&db, "delivered", KEYS * PER_KEY).await;

    // Arrival order per key is sequence order; the failed 3rd message is retried before the 4th.
    let mut last_seq: HashMap<i64, i64> = HashMap::new();
    for request in receiver.requests() {
        let body: serde_json::Value = serde_json::from_slice(&request.body).expect("json");
        let (key, seq) = (body["key"].as_i64().expect("key"), body["seq"].as_i64().expect("seq"));
        let previous = last_seq.insert(key, seq).unwrap_or(0);
        assert!(seq == previous + 1 || (seq == 3 && previous == 3), "key {key}: {seq} arrived after {previous}");
    }
    assert_eq!(receiver.requests().len() as i64, KEYS * PER_KEY + KEYS, "one retry per key");
    // One at a time: each row's first attempt started after its predecessor was settled.
    let overlaps = db
        .count(
            "SELECT count(*) FROM hookfleet.delivery_queue q \
         JOIN hookfleet.delivery_queue prev ON prev.webhook_id = q.webhook_id AND prev.ordering_key = q.ordering_key \
              AND prev.delivery_id = (SELECT max(p.delivery_id) FROM hookfleet.delivery_queue p \
                                       WHERE p.ordering_key = q.ordering_key AND p.delivery_id < q.delivery_id) \
         JOIN hookfleet.delivery_attempts a ON a.delivery_id = q.delivery_id AND a.attempt_number = 1 \
         WHERE a.started_at < prev.delivered_at",
        )
        .await;
    assert_eq!(overlaps, 0, "a keyed row started before its predecessor was delivered");
    let workers_used = db.count("SELECT count(DISTINCT worker_id) FROM hookfleet.delivery_attempts").await;
    assert_eq!(workers_used, 3, "all three workers took part");
    drop(workers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_head_of_key_holds_its_key_but_not_others_or_unkeyed_rows() {
    let db = database().await;
    // The head of key "stuck" fails (retryable, Retry-After 4 s) once; everything else succeeds.
    let failed = std::sync::atomic::AtomicBool::new(false);
    let receiver = Receiver::start(move |request, _| {
        if request.header("webhook-id") == Some("stuck-1") && !failed.swap(true, std::sync::atomic::Ordering::SeqCst) {
            Reply::status(503).with_header("retry-after", "4")
        } else {
            Reply::status(200)
        }
    })
    .await;
    let hook = webhook(&db, receiver.url("/"), &[]).await;
    // The harness caps retry delays at 2 s; the whole Retry-After is the window this test needs.
    let _worker = WorkerProcess::spawn(worker_binary(), &db, "w1", &[("HOOKFLEET_RETRY_MAX", "5s")]);
    let client = db.client().await;
    client
        .execute(
            "INSERT INTO hookfleet.delivery_queue (webhook_id, message_id, ordering_key, message_body) VALUES \
             ($1, 'stuck-1', 'stuck', '{}'), ($1, 'stuck-2', 'stuck', '{}'), ($1, 'free-1', 'free', '{}')",
            &[&hook.webhook_id],
        )
        .await
        .expect("keyed rows");
    let started = Instant::now();
    client
        .execute(
            "INSERT INTO hookfleet.delivery_queue (webhook_id, message_id, message_body) \
             SELECT $1, 'plain-' || n, '{}' FROM generate_series(1, 20) n",
            &[&hook.webhook_id],
        )
        .await
        .expect("unkeyed rows");
    let arrived = |prefix: &'static str| {
        let receiver = &receiver;
        move || async move {
            let requests = receiver.requests();
            let ids: Vec<String> = requests.iter().filter_map(|r| r.header("webhook-id").map(str::to_owned)).collect();
            ids.iter().any(|id| id.starts_with(prefix)).then_some(ids)
        }
    };
    eventually(DEADLINE, "other keys and unkeyed rows", || async {
        let ids = arrived("free-1")().await?;
        (ids.iter().filter(|id| id.starts_with("plain-")).count() == 20).then_some(())
    })
    .await;
    let unblocked_after = started.elapsed();
    let ids: Vec<String> =
        receiver.requests().iter().filter_map(|r| r.header("webhook-id").map(str::to_owned)).collect();
    assert!(!ids.contains(&"stuck-2".to_owned()), "stuck-2 overtook its failing predecessor: {ids:?}");
    // Causal, not timed: had the other rows waited behind the stuck key, they would have come
    // after its head's retry.
    eprintln!("other keys and unkeyed rows all arrived {unblocked_after:?} after the insert");
    assert_eq!(
        ids.iter().filter(|id| *id == "stuck-1").count(),
        1,
        "other keys and unkeyed rows waited for the stuck head's retry: {ids:?}"
    );
    // The stuck key resumes in order once its head succeeds.
    wait_until_all(&db, "delivered", 23).await;
    let ids: Vec<String> =
        receiver.requests().iter().filter_map(|r| r.header("webhook-id").map(str::to_owned)).collect();
    let position = |id: &str| ids.iter().rposition(|seen| seen == id).expect(id);
    assert!(position("stuck-1") < position("stuck-2"), "{ids:?}");
    assert_eq!(ids.iter().filter(|id| *id == "stuck-1").count(), 2, "the head was retried once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_fans_out_to_subscribed_webhooks_with_one_webhook_id() {
    let db = database().await;
    let receivers = [Receiver::ok().await, Receiver::ok().await, Receiver::ok().await, Receiver::ok().await];
    webhook(&db, receivers[0].url("/"), &["order.created"]).await;
    webhook(&db, receivers[1].url("/"), &["order.created", "order.paid"]).await;
    webhook(&db, receivers[2].url("/"), &[]).await; // all events
    webhook(&db, receivers[3].url("/"), &["order.paid"]).await;
    let _worker = WorkerProcess::spawn(worker_binary(), &db, "w1", &[]);
    let client = db.client().await;
    let published: i32 = client
        .query_one("SELECT hookfleet.publish('order.created', '{\"order\":1}', 'evt-1')", &[])
        .await
        .expect("publish")
        .get(0);
    assert_eq!(published, 3);
    let again: i32 = client
        .query_one("SELECT hookfleet.publish('order.created', '{\"order\":1}', 'evt-1')", &[])
        .await
        .expect("publish again")
        .get(0);
    assert_eq!(again, 0, "publishing the same message_id again inserts nothing");
    wait_until_all(&db, "delivered", 3).await;
    for receiver in &receivers[..3] {
        let requests = receiver.wait_for(1, DEADLINE).await;
        assert_eq!(requests.len(), 1);
        assert_eq!(requests[0].header("webhook-id"), Some("evt-1"));
        assert_eq!(String::from_utf8_lossy(&requests[0].body), r#"{"order": 1}"#);
    }
    assert!(receivers[3].requests().is_empty(), "not subscribed to order.created");
}
