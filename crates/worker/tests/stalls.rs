//! The real `hookfleet-worker` against a database that stops answering (its sessions frozen with
//! SIGSTOP: a primary that hangs, or a partition that drops packets without resetting), and over
//! a long life: webhooks deleted, circuits that another worker opened and closed, and logs that
//! stay quiet while webhooks fail.

use std::path::Path;
use std::time::{Duration, Instant};

use hookfleet_core::webhooks::{NewWebhook, WebhookView};
use hookfleet_test_support::{
    database, eventually, metric_value, open_circuit, Receiver, Reply, TestDatabase, WorkerProcess,
};

const DEADLINE: Duration = Duration::from_secs(30);

fn worker_binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_hookfleet-worker"))
}

async fn webhook(db: &TestDatabase, url: String) -> WebhookView {
    db.create_webhook(NewWebhook { url, enabled: true, ..NewWebhook::default() }).await
}

/// Waits until the worker's `/metrics` satisfies `check`; the exposition then.
async fn metrics_until(worker: &WorkerProcess, what: &str, check: impl Fn(&str) -> bool) -> String {
    eventually(DEADLINE, what, || async {
        let (_, body) = worker.get("/metrics").await?;
        check(&body).then_some(body)
    })
    .await
}

/// A server that stops answering must cost a call limit, not the worker: each call is bounded on
/// the client side, the connection it hung on is dropped, and the work goes on over new ones.
/// Without the bound a claim on a frozen session waits for ever (`statement_timeout` is the
/// server's, and the server is not running it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_session_that_stops_answering_costs_one_call_limit_not_the_worker() {
    let db = database().await;
    let receiver = Receiver::ok().await;
    let hook = webhook(&db, receiver.url("/")).await;
    let worker = WorkerProcess::spawn(worker_binary(), &db, "w-frozen", &[("HOOKFLEET_DATABASE_TIMEOUT", "1s")]);
    let warm = db.insert_delivery(hook.webhook_id, "{}").await;
    db.wait_for_status(warm, "delivered").await;

    // Every pooled session of the worker stops answering; its wake-up listener still works.
    let frozen = db.freeze_backends("hookfleet-worker").await;
    assert!(!frozen.pids().is_empty(), "the worker has pooled sessions");
    let frozen_at = Instant::now();
    let row = db.insert_delivery(hook.webhook_id, "{}").await;
    db.wait_for_status(row, "delivered").await;
    let recovered_in = frozen_at.elapsed();
    eprintln!("delivered {recovered_in:?} after {} sessions froze", frozen.pids().len());
    assert_eq!(receiver.requests().len(), 2, "each row once");
    let log = worker.log();
    assert!(log.contains("did not answer within 3s"), "no bounded call in the log:\n{log}");
    drop(frozen);
}

/// SIGTERM while attempts hang and the database stops answering: the drain still ends within the
/// shutdown grace + 5 s of the signal (the orchestrator's kill in the shipped manifests), saying
/// that it could not give everything back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_within_the_grace_and_five_seconds_when_the_database_stops_answering() {
    let db = database().await;
    let receiver = Receiver::start(|_, _| Reply::status(200).after(Duration::from_secs(120))).await;
    let hook = webhook(&db, receiver.url("/")).await;
    let grace = Duration::from_secs(1);
    let mut worker = WorkerProcess::spawn(
        worker_binary(),
        &db,
        "w-stop-frozen",
        &[("HOOKFLEET_SHUTDOWN_GRACE", "1s"), ("HTTP_TIMEOUT", "8s"), ("HOOKFLEET_DATABASE_TIMEOUT", "30s")],
    );
    db.insert_deliveries(hook.webhook_id, 3).await;
    receiver.wait_for(3, DEADLINE).await;
    let _frozen = db.freeze_backends("hookfleet-worker").await;
    let signalled = Instant::now();
    worker.signal("TERM");
    let status = worker.wait(DEADLINE).await;
    let took = signalled.elapsed();
    eprintln!("stopped {took:?} after SIGTERM (grace {grace:?})");
    assert!(took < grace + Duration::from_secs(5), "the drain took {took:?}; log:\n{}", worker.log());
    assert!(!status.success(), "rows are still held, so the exit is not 0; log:\n{}", worker.log());
    assert!(worker.log().contains("still holding"), "{}", worker.log());
}

/// A deleted webhook's decrypted target and metric series do not stay in a worker for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_webhooks_series_and_cached_target_are_forgotten() {
    let db = database().await;
    let receiver = Receiver::ok().await;
    let kept = webhook(&db, receiver.url("/kept")).await;
    let gone = webhook(&db, receiver.url("/gone")).await;
    let worker = WorkerProcess::spawn(worker_binary(), &db, "w-evict", &[]);
    let first = db.insert_delivery(kept.webhook_id, "{}").await;
    let second = db.insert_delivery(gone.webhook_id, "{}").await;
    db.wait_for_status(first, "delivered").await;
    db.wait_for_status(second, "delivered").await;
    let series =
        |webhook_id: i64| format!("webhook_deliveries_total{{status=\"delivered\",webhook_id=\"{webhook_id}\"}}");
    metrics_until(&worker, "both webhooks' series", |body| {
        metric_value(body, &series(kept.webhook_id)) == Some(1.0)
            && metric_value(body, &series(gone.webhook_id)) == Some(1.0)
    })
    .await;
    db.client()
        .await
        .execute("DELETE FROM hookfleet.webhooks WHERE webhook_id = $1", &[&gone.webhook_id])
        .await
        .expect("delete");
    let label = format!("webhook_id=\"{}\"", gone.webhook_id);
    let body = metrics_until(&worker, "the deleted webhook's series to go", |body| !body.contains(&label)).await;
    assert_eq!(metric_value(&body, &series(kept.webhook_id)), Some(1.0), "the live webhook keeps its series");
    // The live webhook still delivers from the cache it kept.
    let third = db.insert_delivery(kept.webhook_id, "{}").await;
    db.wait_for_status(third, "delivered").await;
}

/// `webhook_circuit_state` comes from the fleet's health rows: a worker that never attempted a
/// webhook reports the circuit another worker opened, and reports it closed once it closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_worker_reports_the_circuit_the_fleet_sees() {
    let db = database().await;
    let receiver = Receiver::ok().await;
    let hook = webhook(&db, receiver.url("/")).await;
    let worker = WorkerProcess::spawn(worker_binary(), &db, "w-circuit", &[]);
    let client = db.client().await;
    // Opened by "another worker": only the health row knows.
    assert_eq!(open_circuit(&client, hook.webhook_id).await.as_deref(), Some("unavailable"));
    let series = format!("webhook_circuit_state{{webhook_id=\"{}\"}}", hook.webhook_id);
    metrics_until(&worker, "the circuit open", |body| metric_value(body, &series) == Some(1.0)).await;
    client
        .query_one("SELECT hookfleet.update_webhook_health($1, 200, 1, NULL, 1, 60)", &[&hook.webhook_id])
        .await
        .expect("a success closes it");
    metrics_until(&worker, "the circuit closed", |body| metric_value(body, &series) == Some(0.0)).await;
    assert!(worker.log().contains("circuit is open"), "an open circuit is worth a warning:\n{}", worker.log());
}

/// Failing attempts are counted, not logged one by one at info or warn: a fleet with many failing
/// webhooks must not flood its logs. The counters and the held-slots gauge say what happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_attempts_are_counted_and_logged_only_at_debug() {
    let db = database().await;
    let receiver = Receiver::start(|_, _| Reply::status(503)).await;
    let hook = db
        .create_webhook(NewWebhook {
            url: receiver.url("/"),
            max_retries: Some(2),
            circuit_breaker_failure_threshold: Some(1000),
            enabled: true,
            ..NewWebhook::default()
        })
        .await;
    // Debug for the engine only, to see that its per-attempt lines are there, at debug, and say
    // which message they are about.
    let worker =
        WorkerProcess::spawn(worker_binary(), &db, "w-quiet", &[("LOG_LEVEL", "info,hookfleet_core::worker=debug")]);
    let row = db.insert_delivery(hook.webhook_id, "{}").await;
    db.wait_for_status(row, "dead").await;
    let retried = format!("webhook_deliveries_total{{status=\"retry\",webhook_id=\"{}\"}}", hook.webhook_id);
    let dead = format!("webhook_deliveries_total{{status=\"dead\",webhook_id=\"{}\"}}", hook.webhook_id);
    // The row reads dead a moment before the completer frees its slot: wait for both.
    metrics_until(&worker, "the attempts counted and nothing held", |body| {
        metric_value(body, &retried) == Some(2.0)
            && metric_value(body, &dead) == Some(1.0)
            && metric_value(body, "worker_slots_held") == Some(0.0)
            && metric_value(body, "worker_in_flight") == Some(0.0)
    })
    .await;
    let log = worker.log();
    for line in log.lines().filter(|line| line.contains("INFO") || line.contains("WARN")) {
        assert!(
            !line.contains("attempt failed") && !line.contains("delivery is dead"),
            "a per-attempt outcome logged above debug: {line}"
        );
    }
    let failed: Vec<&str> =
        log.lines().filter(|line| line.contains("DEBUG") && line.contains("attempt failed")).collect();
    assert_eq!(failed.len(), 2, "{log}");
    assert!(failed.iter().all(|line| line.contains("message_id=")), "the attempt span names the message: {failed:?}");
}

/// An operator's open transaction holding one in-flight row makes that row's write-back time out
/// (the server's statement_timeout): a refusal, not an outage. The worker neither stops claiming
/// nor holds every other result back behind it: other webhooks' rows are delivered and settled
/// while the lock is still held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_held_by_an_operator_holds_back_no_other_delivery() {
    let db = database().await;
    let slow = Receiver::start(|_, _| Reply::status(200).after(Duration::from_millis(1500))).await;
    let fast = Receiver::ok().await;
    let held_hook = webhook(&db, slow.url("/held")).await;
    let other_hook = webhook(&db, fast.url("/other")).await;
    let worker = WorkerProcess::spawn(worker_binary(), &db, "w-operator", &[("HOOKFLEET_DATABASE_TIMEOUT", "1s")]);
    let held = db.insert_delivery(held_hook.webhook_id, "{}").await;
    slow.wait_for(1, DEADLINE).await;
    // The attempt is out; the operator locks its row before the answer comes back.
    let mut operator = db.client().await;
    let open = operator.transaction().await.expect("begin");
    open.execute("SELECT 1 FROM hookfleet.delivery_queue WHERE delivery_id = $1 FOR UPDATE", &[&held])
        .await
        .expect("lock the row");
    // The result came back and its write-back waits for the operator's lock.
    assert!(db.wait_for_lock_wait("Write back one batch", || false).await, "the write-back waits for the row");
    let others: Vec<i64> = {
        let mut ids = Vec::new();
        for _ in 0..3 {
            ids.push(db.insert_delivery(other_hook.webhook_id, "{}").await);
        }
        ids
    };
    for id in &others {
        db.wait_for_status(*id, "delivered").await;
    }
    let (state, ..) = db.delivery(held).await;
    assert_eq!(state, "in_flight", "the held row cannot have been settled while locked");
    open.rollback().await.expect("rollback");
    let log = worker.log();
    assert!(log.contains("refuses this result for now"), "the refusal is logged:\n{log}");
    assert!(!log.contains("retrying until the database answers"), "a refusal is not an outage:\n{log}");
}
