//! End-to-end delivery with the real `hookfleet-worker` binary, a test database and a loopback
//! receiver: the spine from a producer's INSERT to a signed request and back to the row.

use std::path::Path;
use std::time::Duration;

use hookfleet_core::webhooks::{NewWebhook, WebhookView};
use hookfleet_test_support::{
    database, eventually, verify_with_python, LoopbackTls, Receiver, Reply, TestDatabase, WorkerProcess,
};

const DEADLINE: Duration = Duration::from_secs(30);

fn worker_binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_hookfleet-worker"))
}

async fn webhook(db: &TestDatabase, url: String) -> WebhookView {
    db.create_webhook(NewWebhook { url, enabled: true, ..NewWebhook::default() }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_insert_is_delivered_signed_and_verifiable() {
    let db = database().await;
    let receiver = Receiver::ok().await;
    let hook = webhook(&db, receiver.url("/hook")).await;
    assert_eq!(hook.webhook_id, 100, "the first webhook gets the id the README's example uses");
    let _worker = WorkerProcess::spawn(worker_binary(), &db, "w1", &[]);

    let delivery_id = db.insert_delivery(hook.webhook_id, r#"{"type":"test","n":1}"#).await;
    let requests = receiver.wait_for(1, DEADLINE).await;
    let request = &requests[0];
    assert_eq!(request.path, "/hook");
    assert_eq!(String::from_utf8_lossy(&request.body), r#"{"n": 1, "type": "test"}"#);
    assert_eq!(request.header("content-type"), Some("application/json"));
    assert!(request.header("user-agent").is_some_and(|agent| agent.starts_with("hookfleet/")));
    assert!(request.header("webhook-id").is_some_and(|id| id.starts_with("msg_")));
    assert!(request.header("x-webhook-signature").is_some_and(|sig| sig.starts_with("sha256=")));
    assert_eq!(request.header("x-webhook-timestamp"), request.header("webhook-timestamp"));
    verify_with_python(hook.secret.as_deref().expect("secret"), request).expect("official verifier accepts it");

    let (_, retries, code, error) = db.wait_for_status(delivery_id, "delivered").await;
    assert_eq!((retries, code, error), (0, Some(200), None));
    let client = db.client().await;
    let attempt = client
        .query_one(
            "SELECT attempt_number, worker_id, status_code, error_class, outcome FROM hookfleet.delivery_attempts WHERE delivery_id = $1",
            &[&delivery_id],
        )
        .await
        .expect("one attempt row");
    assert_eq!(attempt.get::<_, i32>(0), 1);
    assert_eq!(attempt.get::<_, String>(1), "w1");
    assert_eq!(attempt.get::<_, Option<i32>>(2), Some(200));
    assert_eq!(attempt.get::<_, Option<String>>(3), None);
    assert_eq!(attempt.get::<_, String>(4), "delivered");
    let health = client
        .query_one(
            "SELECT total_attempts, successful_attempts, health_status FROM hookfleet.webhook_health_metrics WHERE webhook_id = $1",
            &[&hook.webhook_id],
        )
        .await
        .expect("health row");
    assert_eq!(
        (health.get::<_, i64>(0), health.get::<_, i64>(1), health.get::<_, String>(2)),
        (1, 1, "healthy".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_insert_is_never_delivered_and_a_committed_one_is() {
    let db = database().await;
    let receiver = Receiver::ok().await;
    let hook = webhook(&db, receiver.url("/")).await;
    let mut client = db.client().await;
    client.batch_execute("CREATE TABLE orders (id int PRIMARY KEY)").await.expect("business table");

    // The producer's own business transaction, rolled back: neither row may survive.
    let transaction = client.transaction().await.expect("begin");
    transaction.execute("INSERT INTO orders VALUES (1)", &[]).await.expect("order");
    transaction
        .execute(
            "INSERT INTO hookfleet.delivery_queue (webhook_id, message_id, message_body) VALUES ($1, 'rolled-back', '{\"order\":1}')",
            &[&hook.webhook_id],
        )
        .await
        .expect("outbox row");
    transaction.rollback().await.expect("rollback");
    // The same, committed: delivered.
    let transaction = client.transaction().await.expect("begin");
    transaction.execute("INSERT INTO orders VALUES (2)", &[]).await.expect("order");
    transaction
        .execute(
            "INSERT INTO hookfleet.delivery_queue (webhook_id, message_id, message_body) VALUES ($1, 'committed', '{\"order\":2}')",
            &[&hook.webhook_id],
        )
        .await
        .expect("outbox row");
    transaction.commit().await.expect("commit");

    let _worker = WorkerProcess::spawn(worker_binary(), &db, "w1", &[]);
    receiver.wait_for(1, DEADLINE).await;
    let committed: i64 = client
        .query_one("SELECT delivery_id FROM hookfleet.delivery_queue WHERE message_id = 'committed'", &[])
        .await
        .expect("committed row")
        .get(0);
    db.wait_for_status(committed, "delivered").await;
    let rows: i64 = client.query_one("SELECT count(*) FROM hookfleet.delivery_queue", &[]).await.expect("count").get(0);
    assert_eq!(rows, 1, "the rolled-back row never existed");
    let ids: Vec<String> =
        receiver.requests().iter().map(|request| request.header("webhook-id").unwrap_or_default().to_owned()).collect();
    assert_eq!(ids, ["committed"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_is_a_failure_and_is_never_followed() {
    let db = database().await;
    let receiver = Receiver::start(|request, _| {
        if request.path == "/elsewhere" {
            Reply::status(200)
        } else {
            Reply::status(302).with_header("location", "/elsewhere")
        }
    })
    .await;
    let hook = webhook(&db, receiver.url("/hook")).await;
    let _worker = WorkerProcess::spawn(worker_binary(), &db, "w1", &[]);
    let delivery_id = db.insert_delivery(hook.webhook_id, "{}").await;
    let (_, retries, code, error) = db.wait_for_status(delivery_id, "dead").await;
    assert_eq!((retries, code, error.as_deref()), (0, Some(302), Some("HTTP 302")));
    assert!(receiver.requests().iter().all(|request| request.path == "/hook"), "the redirect was followed");
    assert_eq!(receiver.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_error_is_dead_at_once() {
    let db = database().await;
    let receiver = Receiver::start(|_, _| Reply::status(404)).await;
    let hook = webhook(&db, receiver.url("/")).await;
    let _worker = WorkerProcess::spawn(worker_binary(), &db, "w1", &[]);
    let delivery_id = db.insert_delivery(hook.webhook_id, "{}").await;
    let (_, retries, code, _) = db.wait_for_status(delivery_id, "dead").await;
    assert_eq!((retries, code), (0, Some(404)));
    assert_eq!(receiver.requests().len(), 1, "a 404 is not retried");
    let class = attempt_error_class(&db, delivery_id).await;
    assert_eq!(class.as_deref(), Some("http_4xx"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_on_429_and_408_is_honoured() {
    for status in [429u16, 408] {
        let db = database().await;
        // The first answer asks for one second; the second succeeds.
        let receiver = Receiver::start(move |_, seen| {
            if seen == 0 {
                Reply::status(status).with_header("retry-after", "1")
            } else {
                Reply::status(200)
            }
        })
        .await;
        let hook = webhook(&db, receiver.url("/")).await;
        let _worker = WorkerProcess::spawn(worker_binary(), &db, "w1", &[]);
        let delivery_id = db.insert_delivery(hook.webhook_id, "{}").await;
        let (_, retries, code, _) = db.wait_for_status(delivery_id, "delivered").await;
        assert_eq!((retries, code), (1, Some(200)), "status {status}");
        let requests = receiver.requests();
        assert_eq!(requests.len(), 2);
        let waited = requests[1].received_at - requests[0].received_at;
        assert!(waited >= Duration::from_millis(900), "Retry-After: 1 but retried after {waited:?} (status {status})");
        assert_eq!(requests[0].header("webhook-id"), requests[1].header("webhook-id"), "a retry keeps its webhook-id");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried_until_dead_then_replay_delivers() {
    let db = database().await;
    let failing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let switch = failing.clone();
    let receiver = Receiver::start(move |_, _| {
        if switch.load(std::sync::atomic::Ordering::SeqCst) {
            Reply::status(503)
        } else {
            Reply::status(204)
        }
    })
    .await;
    let hook = webhook(&db, receiver.url("/")).await;
    let _worker = WorkerProcess::spawn(worker_binary(), &db, "w1", &[]);
    let client = db.client().await;
    let delivery_id: i64 = client
        .query_one(
            "INSERT INTO hookfleet.delivery_queue (webhook_id, message_body, max_retries) VALUES ($1, '{}', 2) RETURNING delivery_id",
            &[&hook.webhook_id],
        )
        .await
        .expect("insert")
        .get(0);
    let (_, retries, code, error) = db.wait_for_status(delivery_id, "dead").await;
    assert_eq!((retries, code, error.as_deref()), (2, Some(503), Some("HTTP 503")));
    assert_eq!(receiver.requests().len(), 3, "one attempt and two retries");
    let outcomes: Vec<String> = client
        .query(
            "SELECT outcome FROM hookfleet.delivery_attempts WHERE delivery_id = $1 ORDER BY attempt_number",
            &[&delivery_id],
        )
        .await
        .expect("attempts")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(outcomes, ["retry", "retry", "dead"]);
    let consecutive: i32 = client
        .query_one(
            "SELECT consecutive_failures FROM hookfleet.webhook_health_metrics WHERE webhook_id = $1",
            &[&hook.webhook_id],
        )
        .await
        .expect("health")
        .get(0);
    assert_eq!(consecutive, 3);

    failing.store(false, std::sync::atomic::Ordering::SeqCst);
    let replayed: String =
        client.query_one("SELECT hookfleet.replay_delivery($1)", &[&delivery_id]).await.expect("replay").get(0);
    assert_eq!(replayed, "pending");
    let (_, retries, code, _) = db.wait_for_status(delivery_id, "delivered").await;
    assert_eq!((retries, code), (0, Some(204)));
    assert_eq!(receiver.requests().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_deliver_every_row_exactly_once() {
    const ROWS: i64 = 600;
    let db = database().await;
    let receiver = Receiver::ok().await;
    let hook = webhook(&db, receiver.url("/")).await;
    let workers: Vec<WorkerProcess> = (1..=3)
        // Ten attempts at a time each: one worker cannot hold the whole queue while the others
        // wait to start or meet its claims on the webhook's limiter row, so all three take part.
        .map(|n| {
            WorkerProcess::spawn(
                worker_binary(),
                &db,
                &format!("w{n}"),
                &[("BATCH_SIZE", "20"), ("HOOKFLEET_MAX_IN_FLIGHT", "10")],
            )
        })
        .collect();
    let client = db.client().await;
    // Inserted in several statements while the workers run, as producers would.
    for chunk in 0i64..6 {
        client
            .execute(
                "INSERT INTO hookfleet.delivery_queue (webhook_id, message_id, message_body) \
                 SELECT $1, 'm' || n, jsonb_build_object('n', n) FROM generate_series($2::bigint, $3::bigint) n",
                &[&hook.webhook_id, &(chunk * 100 + 1), &(chunk * 100 + 100)],
            )
            .await
            .expect("insert");
    }
    let requests = receiver.wait_for(ROWS as usize, Duration::from_secs(60)).await;
    eventually(DEADLINE, "every row delivered", || async {
        let delivered: i64 = client
            .query_one("SELECT count(*) FROM hookfleet.delivery_queue WHERE delivery_status = 'delivered'", &[])
            .await
            .ok()?
            .get(0);
        (delivered == ROWS).then_some(())
    })
    .await;
    let mut ids: Vec<String> =
        requests.iter().map(|request| request.header("webhook-id").unwrap_or_default().to_owned()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len() as i64, ROWS, "every message arrived");
    assert_eq!(receiver.requests().len() as i64, ROWS, "and none twice");
    let per_worker = client
        .query("SELECT worker_id, count(*) FROM hookfleet.delivery_attempts GROUP BY 1 ORDER BY 1", &[])
        .await
        .expect("attempts");
    assert_eq!(per_worker.len(), 3, "all three workers took part: {per_worker:?}");
    drop(workers);
}

/// The error class of the delivery's one attempt.
async fn attempt_error_class(db: &TestDatabase, delivery_id: i64) -> Option<String> {
    db.client()
        .await
        .query_one("SELECT error_class FROM hookfleet.delivery_attempts WHERE delivery_id = $1", &[&delivery_id])
        .await
        .expect("attempt")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_address_is_dead_with_class_blocked() {
    let db = database().await;
    let receiver = Receiver::ok().await;
    let hook = webhook(&db, receiver.url("/")).await;
    // This worker allows http but not loopback: the guard must refuse 127.0.0.1 before connecting.
    let _worker = WorkerProcess::spawn(worker_binary(), &db, "w1", &[("HOOKFLEET_ALLOWED_CIDRS", "")]);
    let delivery_id = db.insert_delivery(hook.webhook_id, "{}").await;
    let (_, retries, code, error) = db.wait_for_status(delivery_id, "dead").await;
    assert_eq!((retries, code), (0, None));
    assert!(error.as_deref().is_some_and(|error| error.contains("blocked")), "last_error: {error:?}");
    let class = attempt_error_class(&db, delivery_id).await;
    assert_eq!(class.as_deref(), Some("blocked"));
    assert!(receiver.requests().is_empty(), "nothing reached the receiver");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_http_url_refused_by_policy_is_dead_with_class_blocked() {
    let db = database().await;
    let receiver = Receiver::ok().await;
    // Stored while http was allowed (the harness allows it), sent by a worker that refuses it.
    let hook = webhook(&db, receiver.url("/")).await;
    let _worker = WorkerProcess::spawn(worker_binary(), &db, "w1", &[("HOOKFLEET_ALLOW_HTTP", "false")]);
    let delivery_id = db.insert_delivery(hook.webhook_id, "{}").await;
    let (_, retries, code, error) = db.wait_for_status(delivery_id, "dead").await;
    assert_eq!((retries, code), (0, None));
    assert!(error.as_deref().is_some_and(|error| error.contains("http://")), "last_error: {error:?}");
    let class = attempt_error_class(&db, delivery_id).await;
    assert_eq!(class.as_deref(), Some("blocked"), "refused by the URL policy, as a refused address is");
    assert!(receiver.requests().is_empty(), "nothing reached the receiver");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_readiness_are_served() {
    let db = database().await;
    let receiver = Receiver::start(|request, _| match request.path.as_str() {
        "/gone" => Reply::status(404),
        "/held" => Reply::status(200).after(Duration::from_secs(60)),
        _ => Reply::status(200),
    })
    .await;
    let hook = webhook(&db, receiver.url("/")).await;
    let gone = webhook(&db, receiver.url("/gone")).await;
    let held = webhook(&db, receiver.url("/held")).await;
    // Rows of a disabled webhook wait, pending and due, for as long as it stays disabled.
    let disabled =
        db.create_webhook(NewWebhook { url: receiver.url("/disabled"), enabled: false, ..NewWebhook::default() }).await;
    for _ in 0..3 {
        db.insert_delivery(disabled.webhook_id, "{}").await;
    }
    let worker = WorkerProcess::spawn(worker_binary(), &db, "w-metrics", &[]);
    let delivery_id = db.insert_delivery(hook.webhook_id, "{}").await;
    let dead_id = db.insert_delivery(gone.webhook_id, "{}").await;
    db.insert_delivery(held.webhook_id, "{}").await;
    db.wait_for_status(delivery_id, "delivered").await;
    db.wait_for_status(dead_id, "dead").await;
    let (status, _) = eventually(DEADLINE, "/healthz", || worker.get("/healthz")).await;
    assert_eq!(status, 200);
    let (status, _) = eventually(DEADLINE, "/readyz", || worker.get("/readyz")).await;
    assert_eq!(status, 200);
    // The depth sampler and the heartbeat run on timers: wait until every series reads what the
    // queue holds: 3 pending (the disabled webhook's), 1 in flight (held), 1 dead (the 404).
    let expected = [
        "webhook_deliveries_total{status=\"delivered\",webhook_id=\"100\"} 1",
        "webhook_deliveries_total{status=\"dead\",webhook_id=\"101\"} 1",
        "webhook_delivery_duration_seconds_bucket",
        "worker_in_flight 1",
        "worker_health_status{worker_id=\"w-metrics\"} 1",
        "webhook_queue_depth{status=\"pending\"} 3",
        "webhook_queue_depth{status=\"in_flight\"} 1",
        "webhook_queue_depth{status=\"dead\"} 1",
        "process_resident_memory_bytes",
    ];
    // A series with its value must match a whole line ("worker_in_flight 1" is not "… 10").
    let has = |body: &str, series: &str| {
        body.lines().any(|line| if series.contains(' ') { line == series } else { line.starts_with(series) })
    };
    let last = std::sync::Mutex::new(String::new());
    let found = tokio::time::timeout(DEADLINE, async {
        loop {
            if let Some((_, body)) = worker.get("/metrics").await {
                let done = expected.iter().all(|series| has(&body, series));
                *last.lock().unwrap() = body;
                if done {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let text = last.lock().unwrap().clone();
    let missing: Vec<&&str> = expected.iter().filter(|series| !has(&text, series)).collect();
    assert!(found.is_ok() && missing.is_empty(), "missing from /metrics: {missing:?}\n{text}");
    let age = hookfleet_test_support::metric_value(&text, "webhook_queue_oldest_due_age_seconds");
    assert!(age.is_some_and(|age| age > 0.0), "the disabled webhook's rows are due and waiting: age {age:?}");
    let live: i64 = db
        .client()
        .await
        .query_one("SELECT count(*) FROM hookfleet.v_workers WHERE worker_id = 'w-metrics'", &[])
        .await
        .expect("v_workers")
        .get(0);
    assert_eq!(live, 1);
}

/// SIGTERM while attempts are in flight: they finish inside the grace and their results are
/// written, nothing is handed back to be sent again, and the worker deregisters and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_deregisters_and_exits_zero() {
    const ROWS: usize = 3;
    let db = database().await;
    let receiver = Receiver::start(|_, _| Reply::status(200).after(Duration::from_millis(1500))).await;
    let hook = webhook(&db, receiver.url("/")).await;
    let mut worker = WorkerProcess::spawn(worker_binary(), &db, "w-term", &[("HOOKFLEET_SHUTDOWN_GRACE", "20s")]);
    let mut ids = Vec::new();
    for n in 0..ROWS {
        ids.push(db.insert_delivery(hook.webhook_id, &format!("{{\"n\":{n}}}")).await);
    }
    receiver.wait_for(ROWS, DEADLINE).await;
    let in_flight = db.count("SELECT count(*) FROM hookfleet.delivery_queue WHERE delivery_status = 'in_flight'").await;
    worker.signal("TERM");
    let status = worker.wait(DEADLINE).await;
    assert!(status.success(), "exit status {status:?}; log:\n{}", worker.log());
    assert_eq!(in_flight, ROWS as i64, "the signal came while every attempt was in flight");
    for id in ids {
        let (status, retries, code, _) = db.delivery(id).await;
        assert_eq!((status.as_str(), retries, code), ("delivered", 0, Some(200)), "delivery {id}");
    }
    assert_eq!(
        db.count(
            "SELECT count(*) FROM hookfleet.delivery_attempts WHERE worker_id = 'w-term' AND outcome = 'delivered'"
        )
        .await,
        ROWS as i64
    );
    assert_eq!(receiver.requests().len(), ROWS, "nothing was sent twice");
    let registered = db.count("SELECT count(*) FROM hookfleet.workers WHERE worker_id = 'w-term'").await;
    assert_eq!(registered, 0, "the worker deregistered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_configuration_stops_start_up_naming_the_setting() {
    let db = database().await;
    for (name, value) in [("HOOKFLEET_LEASE", "soon"), ("BATCH_SIZE", "0"), ("HOOKFLEET_ENCRYPTION_KEY", "short")] {
        let mut worker = WorkerProcess::spawn(worker_binary(), &db, "w-bad", &[(name, value)]);
        let status = worker.wait(DEADLINE).await;
        assert!(!status.success(), "{name}={value} was accepted");
        let log = worker.log();
        assert!(log.contains(name), "{name}={value}: the message does not name the setting:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_lease_expires_and_another_worker_delivers() {
    let db = database().await;
    // The first request is held long enough for its worker to be killed mid-attempt.
    let receiver = Receiver::start(|_, seen| {
        let reply = Reply::status(200);
        if seen == 0 {
            reply.after(Duration::from_secs(2))
        } else {
            reply
        }
    })
    .await;
    let hook = webhook(&db, receiver.url("/")).await;
    let settings = [("HOOKFLEET_LEASE", "3s"), ("HTTP_TIMEOUT", "2500ms")];
    let mut doomed = WorkerProcess::spawn(worker_binary(), &db, "w-doomed", &settings);
    let delivery_id = db.insert_delivery(hook.webhook_id, "{}").await;
    receiver.wait_for(1, DEADLINE).await;
    doomed.signal("KILL");
    doomed.wait(DEADLINE).await;
    let (status, _, _, _) = db.delivery(delivery_id).await;
    assert_eq!(status, "in_flight", "the killed worker still holds the row");

    let _rescuer = WorkerProcess::spawn(worker_binary(), &db, "w-rescuer", &settings);
    let (_, retries, code, _) = db.wait_for_status(delivery_id, "delivered").await;
    assert_eq!((retries, code), (0, Some(200)), "an expired lease is not a try: the worker may never have sent it");
    let requests = receiver.requests();
    assert_eq!(requests.len(), 2, "delivered again after the crash (at least once)");
    assert_eq!(
        requests[0].header("webhook-id"),
        requests[1].header("webhook-id"),
        "the duplicate has the same webhook-id"
    );
    let attempts = db
        .client()
        .await
        .query("SELECT worker_id FROM hookfleet.delivery_attempts WHERE delivery_id = $1", &[&delivery_id])
        .await
        .expect("attempts")
        .iter()
        .map(|row| row.get::<_, String>(0))
        .collect::<Vec<_>>();
    assert_eq!(attempts, ["w-rescuer"], "one attempt, the rescuer's: the killed worker never wrote one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_answering_nul_bytes_does_not_stall_the_write_back() {
    let db = database().await;
    let receiver = Receiver::start(|_, _| Reply { body: "ok\0\0garbage".into(), ..Reply::status(200) }).await;
    let hook = webhook(&db, receiver.url("/")).await;
    let _worker = WorkerProcess::spawn(worker_binary(), &db, "w1", &[]);
    let first = db.insert_delivery(hook.webhook_id, "{}").await;
    let second = db.insert_delivery(hook.webhook_id, "{}").await;
    for id in [first, second] {
        db.wait_for_status(id, "delivered").await;
    }
    assert_eq!(receiver.requests().len(), 2, "each delivered once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_the_right_key_defers_rows_without_using_retries() {
    let db = database().await;
    let receiver = Receiver::ok().await;
    let hook = webhook(&db, receiver.url("/")).await;
    let wrong_key = hookfleet_core::crypto::EncryptionKey::generate_base64();
    let mut wrong =
        WorkerProcess::spawn(worker_binary(), &db, "w-wrong-key", &[("HOOKFLEET_ENCRYPTION_KEY", &wrong_key)]);
    let delivery_id = db.insert_delivery(hook.webhook_id, "{}").await;
    let (status, retries, _, error) = eventually(DEADLINE, "the row to be deferred", || async {
        let row = db.delivery(delivery_id).await;
        row.3.is_some().then_some(row)
    })
    .await;
    assert_eq!((status.as_str(), retries), ("pending", 0), "deferred, not attempted");
    assert!(error.as_deref().is_some_and(|error| error.contains("HOOKFLEET_PREVIOUS_ENCRYPTION_KEYS")), "{error:?}");
    assert!(receiver.requests().is_empty());
    let attempts: i64 = db
        .client()
        .await
        .query_one("SELECT count(*) FROM hookfleet.delivery_attempts", &[])
        .await
        .expect("attempts")
        .get(0);
    assert_eq!(attempts, 0);
    wrong.signal("TERM");
    wrong.wait(DEADLINE).await;
    // A worker with the right key delivers it once it is due again.
    db.client()
        .await
        .execute("UPDATE hookfleet.delivery_queue SET next_attempt_at = now() WHERE delivery_id = $1", &[&delivery_id])
        .await
        .expect("due now");
    let _right = WorkerProcess::spawn(worker_binary(), &db, "w-right-key", &[]);
    db.wait_for_status(delivery_id, "delivered").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_failures_open_the_circuit_and_later_rows_wait_untouched() {
    let db = database().await;
    let receiver = Receiver::start(|_, _| Reply::status(500)).await;
    let hook = webhook(&db, receiver.url("/")).await;
    let worker = WorkerProcess::spawn(
        worker_binary(),
        &db,
        "w1",
        &[
            ("CIRCUIT_BREAKER_FAILURE_THRESHOLD", "3"),
            ("CIRCUIT_BREAKER_TIMEOUT_SECONDS", "600"),
            ("HOOKFLEET_MAX_RETRIES", "0"),
        ],
    );
    let client = db.client().await;
    for n in 0..3 {
        let id = db.insert_delivery(hook.webhook_id, &format!("{{\"n\":{n}}}")).await;
        db.wait_for_status(id, "dead").await;
    }
    let (health, circuit): (String, String) = client
        .query_one(
            "SELECT health_status, circuit_state FROM hookfleet.v_webhook_health_dashboard WHERE webhook_id = $1",
            &[&hook.webhook_id],
        )
        .await
        .map(|row| (row.get(0), row.get(1)))
        .expect("dashboard");
    assert_eq!((health.as_str(), circuit.as_str()), ("unavailable", "open"));
    eventually(DEADLINE, "webhook_circuit_state 1", || async {
        let (_, body) = worker.get("/metrics").await?;
        body.contains("webhook_circuit_state{webhook_id=\"100\"} 1").then_some(())
    })
    .await;
    // Another row for the open webhook is skipped at claim time: still pending, retries untouched.
    let waiting = db.insert_delivery(hook.webhook_id, "{}").await;
    let other_receiver = Receiver::ok().await;
    let other = webhook(&db, other_receiver.url("/")).await;
    let delivered = db.insert_delivery(other.webhook_id, "{}").await;
    db.wait_for_status(delivered, "delivered").await;
    let (status, retries, _, _) = db.delivery(waiting).await;
    assert_eq!((status.as_str(), retries), ("pending", 0));
    assert_eq!(receiver.requests().len(), 3, "nothing was sent while the circuit is open");
}

/// A receiver whose certificate comes from a private CA: with the public roots only, the attempt
/// fails as `tls` and nothing reaches the receiver; once the worker is told to trust the CA with
/// `HOOKFLEET_CA_CERTIFICATES`, the row is delivered, over HTTP/2 (ALPN).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_ca_is_trusted_through_the_setting_and_http2_is_used() {
    let db = database().await;
    let tls = LoopbackTls::generate().expect("loopback CA");
    let receiver = Receiver::start_tls(&tls, |_, _| Reply::status(200)).await;
    let hook = webhook(&db, receiver.url("/hook")).await;
    let client = db.client().await;

    let first = db.insert_delivery(hook.webhook_id, r#"{"n":1}"#).await;
    let mut untrusting = WorkerProcess::spawn(worker_binary(), &db, "w-public-roots", &[]);
    eventually(DEADLINE, "an attempt that failed the TLS handshake", || {
        let client = &client;
        async move {
            let classes: Vec<Option<String>> = client
                .query("SELECT error_class FROM hookfleet.delivery_attempts WHERE delivery_id = $1", &[&first])
                .await
                .expect("attempts")
                .iter()
                .map(|row| row.get(0))
                .collect();
            (!classes.is_empty()).then_some(classes)
        }
    })
    .await
    .iter()
    .for_each(|class| assert_eq!(class.as_deref(), Some("tls")));
    untrusting.signal("TERM");
    assert!(untrusting.wait(DEADLINE).await.success(), "{}", untrusting.log());
    assert!(receiver.requests().is_empty(), "no request passes an untrusted handshake");

    let dir = tempfile::tempdir().expect("temp dir");
    let ca = tls.write_ca(dir.path()).expect("CA file");
    let ca = ca.to_str().expect("utf-8 path");
    let _trusting = WorkerProcess::spawn(worker_binary(), &db, "w-private-ca", &[("HOOKFLEET_CA_CERTIFICATES", ca)]);
    let second = db.insert_delivery(hook.webhook_id, r#"{"n":2}"#).await;
    for delivery_id in [first, second] {
        db.wait_for_status(delivery_id, "delivered").await;
    }
    let requests = receiver.requests();
    assert!(requests.len() >= 2, "{} requests", requests.len());
    for request in &requests {
        assert_eq!(request.version, http::Version::HTTP_2);
        verify_with_python(hook.secret.as_deref().expect("secret"), request).expect("signed as over HTTP/1.1");
    }
}

/// The lease of a claim that waited (here for an operator's lock on the webhooks table) runs from
/// the moment its rows were taken, and the attempt ends inside it: its own write-back settles the
/// row, no rescue hands it to another attempt meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_never_outlives_its_lease_even_when_its_claim_waited() {
    let db = database().await;
    // The receiver never answers in time: the attempt runs until its timeout.
    let receiver = Receiver::start(|_, _| Reply::status(200).after(Duration::from_secs(60))).await;
    let hook = db
        .create_webhook(NewWebhook {
            url: receiver.url("/"),
            max_retries: Some(0),
            // Longer than the lease: the lease is what must end the attempt.
            timeout_ms: Some(30_000),
            enabled: true,
            ..NewWebhook::default()
        })
        .await;
    let delivery_id = db.insert_delivery(hook.webhook_id, "{}").await;
    let mut operator = db.client().await;
    let open = operator.transaction().await.expect("begin");
    open.execute("LOCK TABLE hookfleet.webhooks IN ACCESS EXCLUSIVE MODE", &[]).await.expect("lock");
    let worker = WorkerProcess::spawn(worker_binary(), &db, "w-lease", &[("HOOKFLEET_LEASE", "4s")]);
    assert!(db.wait_for_lock_wait("claim_deliveries", || false).await);
    // The fault: the operator's lock is held for most of a lease.
    tokio::time::sleep(Duration::from_secs(3)).await;
    open.commit().await.expect("commit");

    let settled = tokio::time::timeout(DEADLINE, async {
        loop {
            let state = db.delivery(delivery_id).await;
            if state.0 == "dead" {
                return state;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let (status, retries, _, error) = settled
        .unwrap_or_else(|_| panic!("the delivery never settled: {:?}\n{}", receiver.requests().len(), worker.log()));
    let error = error.unwrap_or_default();
    assert!(
        !error.starts_with("lease expired"),
        "the lease expired while the attempt was running ({status}, {retries}): {error}\n{}",
        worker.log()
    );
    let outcomes: Vec<(String, Option<String>)> = db
        .client()
        .await
        .query("SELECT outcome, error_class FROM hookfleet.delivery_attempts WHERE delivery_id = $1", &[&delivery_id])
        .await
        .expect("attempts")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(outcomes, [("dead".to_owned(), Some("timeout".to_owned()))], "one attempt, settled by itself");
    assert_eq!(receiver.requests().len(), 1);
    let (_, metrics) = worker.get("/metrics").await.expect("metrics");
    assert!(metrics.contains("webhook_lease_lost_total 0"), "{metrics}");
}

/// A rotated secret reaches a running worker with the next claim (the rotation makes a new
/// version), and the rotated-out secret stops signing at its expiry with no further change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_reaches_a_running_worker_and_the_old_secret_stops_at_its_expiry() {
    let db = database().await;
    let receiver = Receiver::ok().await;
    let hook = webhook(&db, receiver.url("/")).await;
    let old = hook.secret.clone().expect("secret");
    let _worker = WorkerProcess::spawn(worker_binary(), &db, "w-rotate", &[]);
    let first = db.insert_delivery(hook.webhook_id, r#"{"n":1}"#).await;
    db.wait_for_status(first, "delivered").await;

    let new = db.webhook_store().rotate_secret(hook.webhook_id, Duration::from_secs(3), None).await.expect("rotate");
    let rotated_at = std::time::Instant::now();
    let second = db.insert_delivery(hook.webhook_id, r#"{"n":2}"#).await;
    db.wait_for_status(second, "delivered").await;
    let request = receiver.requests().pop().expect("request");
    let signatures = request.header("webhook-signature").unwrap_or_default().split(' ').count();
    assert_eq!(signatures, 2, "both secrets sign during the rotation: {request:?}");
    assert!(signed_by(&new, &request), "the new secret signs");
    assert!(signed_by(&old, &request), "the old secret still signs");

    let version =
        db.count(&format!("SELECT version FROM hookfleet.webhooks WHERE webhook_id = {}", hook.webhook_id)).await;
    let mut n = 2;
    let request = eventually(DEADLINE, "a request signed by the new secret only", || {
        n += 1;
        let body = format!(r#"{{"n":{n}}}"#);
        let (db, receiver) = (&db, &receiver);
        async move {
            let id = db.insert_delivery(hook.webhook_id, &body).await;
            db.wait_for_status(id, "delivered").await;
            let request = receiver.requests().pop().expect("request");
            let count = request.header("webhook-signature").unwrap_or_default().split(' ').count();
            (count == 1).then_some(request)
        }
    })
    .await;
    // Expiries are whole unix seconds: up to a second early.
    assert!(rotated_at.elapsed() >= Duration::from_secs(2), "the old secret stopped signing before its expiry");
    assert!(signed_by(&new, &request), "the new secret signs");
    assert!(!signed_by(&old, &request), "the expired secret no longer signs");
    let after =
        db.count(&format!("SELECT version FROM hookfleet.webhooks WHERE webhook_id = {}", hook.webhook_id)).await;
    assert_eq!(after, version, "the expiry needed no change to the webhook");
}

/// At shutdown, an attempt that was sent but whose result cannot be written back in time is not
/// released to `pending` (which would send it again at once): its result lands when it can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_that_cannot_write_a_result_back_never_releases_what_was_sent() {
    let db = database().await;
    let receiver = Receiver::ok().await;
    let hook = webhook(&db, receiver.url("/")).await;
    let mut worker = WorkerProcess::spawn(worker_binary(), &db, "w-stop", &[("HOOKFLEET_SHUTDOWN_GRACE", "1s")]);
    let warm = db.insert_delivery(hook.webhook_id, "{}").await;
    db.wait_for_status(warm, "delivered").await;
    // Write-backs stall: an operator holds a lock that keeps attempts from being recorded.
    let mut operator = db.client().await;
    let open = operator.transaction().await.expect("begin");
    open.execute("LOCK TABLE hookfleet.delivery_attempts IN SHARE MODE", &[]).await.expect("lock");
    let sent = db.insert_delivery(hook.webhook_id, "{}").await;
    receiver.wait_for(2, DEADLINE).await;
    worker.signal("TERM");
    let status = worker.wait(DEADLINE).await;
    // A worker that stops with rows still held says so, and does not exit 0.
    assert!(!status.success(), "exit status {status:?}; log:\n{}", worker.log());
    assert!(worker.log().contains("still holding 1 delivery"), "{}", worker.log());
    let (state, ..) = db.delivery(sent).await;
    assert_eq!(state, "in_flight", "a delivery that was sent was released to be sent again:\n{}", worker.log());
    open.commit().await.expect("commit");
    // The write-back the worker left waiting lands if the statement reached the server; if not,
    // the row comes back after its lease (at least once), never sooner.
    let _next = WorkerProcess::spawn(worker_binary(), &db, "w-next", &[]);
    db.wait_for_status(sent, "delivered").await;
    let requests = receiver.requests();
    assert!(requests.len() <= 3, "{requests:?}");
    if let Some(again) = requests.get(2) {
        // The test lease is 10 s, counted from the claim, just before the first send.
        let after = again.received_at.saturating_duration_since(requests[1].received_at);
        assert!(after >= Duration::from_secs(9), "sent again {after:?} after the first send, inside its lease");
    }
}

/// Two live processes with one WORKER_ID would release each other's rows: the second is refused.
/// A worker killed with `kill -9` frees its id at once, so a restart under it is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_with_a_live_worker_id_is_refused_and_a_restart_is_not() {
    let db = database().await;
    let mut first = WorkerProcess::spawn(worker_binary(), &db, "w-same", &[]);
    let registered = |pid: u32| {
        let db = &db;
        async move {
            db.count(&format!("SELECT count(*) FROM hookfleet.workers WHERE worker_id = 'w-same' AND pid = {pid}"))
                .await
                == 1
        }
    };
    eventually(DEADLINE, "the first worker to register", || async { registered(first.pid()).await.then_some(()) })
        .await;
    let mut second = WorkerProcess::spawn(worker_binary(), &db, "w-same", &[]);
    let status = second.wait(DEADLINE).await;
    assert!(!status.success(), "a second process with a live WORKER_ID started");
    let log = second.log();
    assert!(log.contains("WORKER_ID") && log.contains("in use"), "{log}");
    assert!(first.get("/healthz").await.is_some(), "the first worker keeps running");

    first.signal("KILL");
    first.wait(DEADLINE).await;
    let restarted = WorkerProcess::spawn(worker_binary(), &db, "w-same", &[]);
    eventually(DEADLINE, "the restarted worker to register", || async {
        registered(restarted.pid()).await.then_some(())
    })
    .await;
    let receiver = Receiver::ok().await;
    let hook = webhook(&db, receiver.url("/")).await;
    let id = db.insert_delivery(hook.webhook_id, "{}").await;
    db.wait_for_status(id, "delivered").await;
}

/// Whether a `v1,` entry of the request's `webhook-signature` is `secret`'s signature.
fn signed_by(secret: &str, request: &hookfleet_test_support::ReceivedRequest) -> bool {
    let secret = hookfleet_core::signing::SigningSecret::parse(secret).expect("secret");
    let timestamp = request.header("webhook-timestamp").and_then(|t| t.parse().ok()).expect("timestamp");
    hookfleet_core::signing::verify_v1(
        &secret,
        request.header("webhook-id").expect("webhook-id"),
        timestamp,
        &request.body,
        request.header("webhook-signature").expect("signature"),
    )
}

/// A worker whose WORKER_ID lock session is lost (a database restart ends every session) takes
/// the lock again and keeps working; if another session holds the id by then, the worker gives
/// way without releasing anything that id holds, and exits with an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_loses_its_worker_id_lock_takes_it_again_or_gives_way_without_releasing() {
    let db = database().await;
    let receiver =
        Receiver::start(
            |_, seen| if seen == 0 { Reply::status(200) } else { Reply::status(200).after(Duration::from_secs(60)) },
        )
        .await;
    // The hanging attempt outlasts the shutdown grace: it is abandoned, not written back.
    let hook = db
        .create_webhook(NewWebhook {
            url: receiver.url("/"),
            timeout_ms: Some(30_000),
            enabled: true,
            ..NewWebhook::default()
        })
        .await;
    let mut worker = WorkerProcess::spawn(worker_binary(), &db, "w-lock", &[("HOOKFLEET_SHUTDOWN_GRACE", "1s")]);
    let client = db.client().await;
    let lock_session = || async {
        client
            .query_opt(
                "SELECT a.pid FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid \
                 WHERE a.application_name = 'hookfleet-worker-id' AND a.datname = current_database() \
                 AND l.locktype = 'advisory' AND l.granted",
                &[],
            )
            .await
            .expect("lock session")
            .map(|row| row.get::<_, i32>(0))
    };
    let first = eventually(DEADLINE, "the worker to hold its WORKER_ID lock", lock_session).await;
    client.execute("SELECT pg_terminate_backend($1, 5000)", &[&first]).await.expect("terminate");
    let second = eventually(DEADLINE, "the worker to take its lock again", || async {
        lock_session().await.filter(|pid| *pid != first)
    })
    .await;
    let delivered = db.insert_delivery(hook.webhook_id, "{}").await;
    db.wait_for_status(delivered, "delivered").await;

    // A row in flight (its receiver hangs), then the lock is lost to another session.
    let held = db.insert_delivery(hook.webhook_id, "{}").await;
    receiver.wait_for(2, DEADLINE).await;
    // In one statement, so that the worker cannot take its lock again in between.
    let thief = db.client().await;
    thief
        .execute(
            "SELECT pg_terminate_backend($1, 5000), pg_advisory_lock(x'686f6f6b'::int4, hashtext('w-lock'))",
            &[&second],
        )
        .await
        .expect("end the worker's lock session and take the id");
    let status = worker.wait(DEADLINE).await;
    assert!(!status.success(), "a worker that gave way exits with an error: {status:?}");
    assert!(worker.log().contains("another live process took this WORKER_ID"), "{}", worker.log());
    let (state, ..) = db.delivery(held).await;
    assert_eq!(state, "in_flight", "what the id holds may be the other process's: nothing is released");
    assert_eq!(
        db.count("SELECT count(*) FROM hookfleet.workers WHERE worker_id = 'w-lock'").await,
        1,
        "and it does not deregister the id"
    );
}

/// A worker that claims rows but cannot load their webhook backs off like a failed claim instead
/// of claiming, failing and releasing in a loop, and delivers once the webhook can be loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_load_that_fails_backs_off_instead_of_spinning() {
    let db = database().await;
    let receiver = Receiver::ok().await;
    let hook = webhook(&db, receiver.url("/")).await;
    let worker = WorkerProcess::spawn(worker_binary(), &db, "w-load", &[]);
    let client = db.client().await;
    // The claim does not read the URL column; loading the webhook does, and now fails.
    client
        .batch_execute("ALTER TABLE hookfleet.webhooks RENAME COLUMN url_encrypted TO url_encrypted_away")
        .await
        .expect("break the load");
    let id = db.insert_delivery(hook.webhook_id, "{}").await;
    let failures = || async {
        let (_, text) = worker.get("/metrics").await.unwrap_or_default();
        text.lines()
            .find(|line| line.starts_with("hookfleet_database_errors_total{operation=\"load_webhooks\"}"))
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|value| value.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    eventually(DEADLINE, "a failed webhook load", || async { (failures().await >= 1.0).then_some(()) }).await;
    // The fault lasts three seconds: backing off (100 ms doubling) makes a handful of tries.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let tries = failures().await;
    assert!(tries <= 8.0, "{tries} failed loads in about 3 s: the worker spins");
    client
        .batch_execute("ALTER TABLE hookfleet.webhooks RENAME COLUMN url_encrypted_away TO url_encrypted")
        .await
        .expect("mend the load");
    let (_, retries, ..) = db.wait_for_status(id, "delivered").await;
    assert_eq!(retries, 0, "the failed loads used no try");
}
