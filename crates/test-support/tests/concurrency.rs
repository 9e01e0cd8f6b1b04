//! The queue's guarantees under concurrency, with real SQL sessions on one database: sessions that
//! hold locks (an operator at a `psql` prompt, a claim, a write-back, a webhook's deletion) never
//! stall claims for other webhooks and never deadlock; per-key order holds for every entry point;
//! a lease rescue never spends a try nor hides a delivery; every webhook change makes a version.
//!
//! Each step that may block runs in its own task on its own connection; the test waits until
//! that session is either waiting for a lock (`pg_stat_activity`) or done, so the interleavings
//! are forced, not left to timing.

use std::time::{Duration, SystemTime};

use hookfleet_core::queue::{AttemptRecord, BreakerSettings, ClaimLimits, ClaimedDelivery, Outcome, Queue};
use hookfleet_core::webhooks::NewWebhook;
use hookfleet_test_support::{database, eventually, open_circuit, pass_open_period, psql_claim, TestDatabase};
use tokio::task::JoinHandle;
use tokio_postgres::Client;

const BREAKER: BreakerSettings = BreakerSettings { failure_threshold: 5, open_for: Duration::from_secs(60) };
const DEADLINE: Duration = Duration::from_secs(20);

async fn webhook(db: &TestDatabase, new: NewWebhook) -> i64 {
    db.create_webhook(NewWebhook { url: "http://127.0.0.1:9/hook".into(), enabled: true, ..new }).await.webhook_id
}

fn queue(db: &TestDatabase) -> Queue {
    Queue::new(hookfleet_core::db::pool(&db.url, "test", 4).expect("pool"))
}

/// The worker's limits: a default rate (so every webhook has a bucket), no per-worker cap.
fn worker_limits(rps: f64) -> ClaimLimits {
    ClaimLimits { default_rate_limit_rps: Some(rps), ..ClaimLimits::default() }
}

async fn insert(client: &Client, webhook_id: i64, key: Option<&str>) -> i64 {
    client
        .query_one(
            "INSERT INTO hookfleet.delivery_queue (webhook_id, message_body, ordering_key) \
             VALUES ($1, '{}', $2) RETURNING delivery_id",
            &[&webhook_id, &key],
        )
        .await
        .expect("insert")
        .get(0)
}

async fn status(client: &Client, delivery_id: i64) -> String {
    client
        .query_one("SELECT delivery_status FROM hookfleet.delivery_queue WHERE delivery_id = $1", &[&delivery_id])
        .await
        .expect("status")
        .get(0)
}

async fn pid(client: &Client) -> i32 {
    client.query_one("SELECT pg_backend_pid()", &[]).await.expect("pid").get(0)
}

/// Waits until session `pid` waits for a lock or `task` has finished; true when it is waiting.
async fn blocked_or_done<T>(db: &TestDatabase, pid: i32, task: &JoinHandle<T>) -> bool {
    let observer = db.client().await;
    eventually(DEADLINE, &format!("session {pid} to wait for a lock or finish"), || async {
        if task.is_finished() {
            return Some(false);
        }
        let waiting: Option<String> = observer
            .query_opt("SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1", &[&pid])
            .await
            .expect("pg_stat_activity")
            .and_then(|row| row.get(0));
        (waiting.as_deref() == Some("Lock")).then_some(true)
    })
    .await
}

fn record(claimed: &ClaimedDelivery, outcome: Outcome, status_code: u16) -> AttemptRecord {
    AttemptRecord {
        delivery_id: claimed.delivery_id,
        webhook_id: claimed.webhook_id,
        outcome,
        retry_count: claimed.retry_count + u32::from(outcome == Outcome::Retry),
        retry_delay: Duration::ZERO,
        attempt_number: claimed.retry_count + 1,
        status_code: Some(status_code),
        started_at: SystemTime::now(),
        duration: Duration::from_millis(5),
        error_class: None,
        error_message: None,
        response_excerpt: None,
        locked_until: claimed.locked_until,
    }
}

/// Waits for a claim's lease (taken with `lease`) to pass, running the rescue until it takes the
/// row; `max_expiries` as the rescue service passes it.
async fn expire_and_rescue(queue: &Queue, lease: Duration, max_expiries: u32) {
    eventually(DEADLINE + lease, "the lease to expire and the rescue to take the row", || async {
        (queue.rescue_expired(100, max_expiries).await.expect("rescue") == 1).then_some(())
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// No lock held by another session stalls claims (issue 11.2)
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_holding_one_webhooks_bucket_stalls_no_claim_for_any_webhook() {
    let db = database().await;
    let client = db.client().await;
    let queue = queue(&db);
    // Both buckets hold many batches' worth of tokens: the claim's pay-at-once path.
    let first = webhook(&db, NewWebhook { rate_limit_rps: Some(10_000.0), ..NewWebhook::default() }).await;
    let held = webhook(&db, NewWebhook { rate_limit_rps: Some(10_000.0), ..NewWebhook::default() }).await;
    let other = webhook(&db, NewWebhook { rate_limit_rps: Some(10_000.0), ..NewWebhook::default() }).await;
    for hook in [first, held, other] {
        insert(&client, hook, None).await;
    }
    // An operator at a psql prompt, in an open transaction on the middle webhook's bucket.
    let mut operator = db.client().await;
    let open = operator.transaction().await.expect("begin");
    open.execute("SELECT 1 FROM hookfleet.webhook_rate_limits WHERE webhook_id = $1 FOR UPDATE", &[&held])
        .await
        .expect("lock the bucket");

    let claim = tokio::time::timeout(Duration::from_secs(10), queue.claim("w1", 10, DEADLINE, &worker_limits(10.0)))
        .await
        .expect("the claim must not wait for the operator's lock")
        .expect("claim");
    let mut hooks: Vec<i64> = claim.deliveries.iter().map(|delivery| delivery.webhook_id).collect();
    hooks.sort_unstable();
    assert_eq!(hooks, [first, other], "both webhooks the operator does not hold are claimed");
    assert_eq!(claim.contended, [held], "the held webhook is reported contended, to be looked at again");
    open.rollback().await.expect("rollback");
    let again = queue.claim("w1", 10, DEADLINE, &worker_limits(10.0)).await.expect("claim again");
    assert_eq!(again.deliveries.iter().map(|d| d.webhook_id).collect::<Vec<_>>(), [held]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_psql_claim_stalls_no_worker_claim() {
    let db = database().await;
    let client = db.client().await;
    let queue = queue(&db);
    let big = || NewWebhook { rate_limit_rps: Some(10_000.0), ..NewWebhook::default() };
    let at_psql = webhook(&db, big()).await;
    let other = webhook(&db, big()).await;
    insert(&client, at_psql, None).await;
    let mut operator = db.client().await;
    let open = operator.transaction().await.expect("begin");
    assert_eq!(psql_claim(&open, "psql", 10).await.len(), 1);
    insert(&client, at_psql, None).await;
    let theirs = insert(&client, other, None).await;
    let claim = tokio::time::timeout(Duration::from_secs(10), queue.claim("w1", 10, DEADLINE, &worker_limits(10.0)))
        .await
        .expect("the claim must not wait for the open psql claim")
        .expect("claim");
    assert_eq!(claim.deliveries.iter().map(|d| d.delivery_id).collect::<Vec<_>>(), [theirs]);
    assert_eq!(claim.contended, [at_psql]);
    open.commit().await.expect("commit");
}

// ---------------------------------------------------------------------------------------------
// Per-key order through every entry point (issue 11.5)
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_psql_claim_and_a_replay_never_put_two_rows_of_one_key_in_flight() {
    let db = database().await;
    let client = db.client().await;
    let queue = queue(&db);
    let hook = webhook(&db, NewWebhook::default()).await;
    let first = insert(&client, hook, Some("k")).await;
    let second = insert(&client, hook, Some("k")).await;
    let claimed = queue.claim("w1", 10, DEADLINE, &worker_limits(10.0)).await.expect("claim").deliveries;
    assert_eq!(claimed.iter().map(|d| d.delivery_id).collect::<Vec<_>>(), [first], "one of the key at a time");
    queue.complete_many("w1", &[record(&claimed[0], Outcome::Delivered, 200)], BREAKER).await.expect("deliver");

    // A claim at a psql prompt takes the key's next row and stays open...
    let mut operator = db.client().await;
    let open = operator.transaction().await.expect("begin");
    assert_eq!(psql_claim(&open, "psql", 10).await, [second]);
    // ...while someone replays the first row and a worker claims.
    client.execute("SELECT hookfleet.replay_delivery($1)", &[&first]).await.expect("replay");
    let during = queue.claim("w1", 10, DEADLINE, &worker_limits(10.0)).await.expect("claim during");
    open.commit().await.expect("commit");
    let after = queue.claim("w1", 10, DEADLINE, &worker_limits(10.0)).await.expect("claim after");
    let in_flight = db
        .count(&format!(
            "SELECT count(*) FROM hookfleet.delivery_queue WHERE webhook_id = {hook} AND ordering_key = 'k' \
             AND delivery_status = 'in_flight'"
        ))
        .await;
    assert_eq!(
        in_flight, 1,
        "two rows of one key in flight (claimed {:?} then {:?})",
        during.deliveries, after.deliveries
    );
}

// ---------------------------------------------------------------------------------------------
// Deleting a webhook never deadlocks with claims and write-backs (issue 11.6)
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleting_a_webhook_while_a_claim_and_a_write_back_hold_its_rows_does_not_deadlock() {
    let db = database().await;
    let client = db.client().await;
    let queue = queue(&db);
    // In webhook_id order: `probed` (its circuit's open period is over: the claim takes its one
    // probe), `full` (at max_in_flight: the claim holds its bucket and takes nothing), `paid` (a
    // bucket far from empty: the claim pays for it at once).
    let probed = webhook(&db, NewWebhook::default()).await;
    let full = webhook(&db, NewWebhook { max_in_flight: Some(1), ..NewWebhook::default() }).await;
    let paid = webhook(
        &db,
        NewWebhook { rate_limit_rps: Some(1000.0), rate_limit_burst: Some(1000), ..NewWebhook::default() },
    )
    .await;
    open_circuit(&client, probed).await;
    pass_open_period(&client, probed).await;
    client.execute("SELECT hookfleet.update_webhook_health($1, 200, 10, NULL)", &[&full]).await.expect("health");
    insert(&client, full, None).await;
    let in_flight = queue.claim("w0", 1, Duration::from_secs(60), &ClaimLimits::default()).await.expect("claim");
    assert_eq!(in_flight.deliveries.iter().map(|d| d.webhook_id).collect::<Vec<_>>(), [full]);
    insert(&client, full, None).await;
    insert(&client, probed, None).await;
    insert(&client, paid, None).await;

    // An operator holds the paid webhook's bucket, so that a claim which waits for it is caught
    // mid-way, holding what it took before.
    let mut operator = db.client().await;
    let open = operator.transaction().await.expect("begin");
    open.execute("SELECT 1 FROM hookfleet.webhook_rate_limits WHERE webhook_id = $1 FOR UPDATE", &[&paid])
        .await
        .expect("lock");

    let claimer = db.client().await;
    let claimer_pid = pid(&claimer).await;
    let claim = tokio::spawn(async move {
        claimer.query("SELECT * FROM hookfleet.get_ready_deliveries('psql', 10, interval '60 seconds')", &[]).await
    });
    blocked_or_done(&db, claimer_pid, &claim).await;

    let deleter = db.client().await;
    let deleter_pid = pid(&deleter).await;
    let delete =
        tokio::spawn(
            async move { deleter.execute("DELETE FROM hookfleet.webhooks WHERE webhook_id = $1", &[&full]).await },
        );
    blocked_or_done(&db, deleter_pid, &delete).await;

    // A write-back of attempts for both webhooks whose rows are gone (deleted meanwhile).
    let now = SystemTime::now();
    let gone = |webhook_id: i64, delivery_id: i64| AttemptRecord {
        delivery_id,
        webhook_id,
        outcome: Outcome::Delivered,
        retry_count: 0,
        retry_delay: Duration::ZERO,
        attempt_number: 1,
        status_code: Some(200),
        started_at: now,
        duration: Duration::from_millis(3),
        error_class: None,
        error_message: None,
        response_excerpt: None,
        locked_until: now,
    };
    let records = vec![gone(probed, i64::MAX - 1), gone(full, i64::MAX - 2)];
    let write_queue = queue.clone();
    let write = tokio::spawn(async move { write_queue.complete_many("w9", &records, BREAKER).await });
    // The write-back runs on the queue's pool: its session is found by what it runs.
    db.wait_for_lock_wait("delivery_attempts", || write.is_finished()).await;
    open.commit().await.expect("commit");
    let claimed = claim.await.expect("claim task");
    let deleted = delete.await.expect("delete task");
    let written = write.await.expect("write task");
    let deadlock = |what: &str, error: Option<String>| {
        assert!(error.is_none(), "{what} failed: {}", error.unwrap_or_default());
    };
    deadlock("the claim", claimed.as_ref().err().map(|error| format!("{error:?}")));
    deadlock("the delete", deleted.as_ref().err().map(|error| format!("{error:?}")));
    deadlock("the write-back", written.as_ref().err().map(|error| format!("{error:?}")));
    assert_eq!(deleted.expect("delete"), 1);
    assert_eq!(db.count(&format!("SELECT count(*) FROM hookfleet.delivery_queue WHERE webhook_id = {full}")).await, 0);
}

// ---------------------------------------------------------------------------------------------
// A rescue never spends a try, nor hides a delivery (issue 11.3)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_row_whose_worker_died_before_attempting_it_keeps_its_only_try() {
    let db = database().await;
    let client = db.client().await;
    let queue = queue(&db);
    let hook = webhook(&db, NewWebhook { max_retries: Some(0), ..NewWebhook::default() }).await;
    let id = insert(&client, hook, None).await;
    let lease = Duration::from_millis(200);
    // Claimed, then the worker is killed before its attempt: the lease expires.
    queue.claim("w1", 1, lease, &ClaimLimits::default()).await.expect("claim");
    expire_and_rescue(&queue, lease, 5).await;
    assert_eq!(status(&client, id).await, "pending", "kill -9 between claim and attempt loses nothing");
    let again = queue.claim("w2", 1, Duration::from_secs(60), &ClaimLimits::default()).await.expect("claim").deliveries;
    assert_eq!((again[0].delivery_id, again[0].retry_count, again[0].max_retries), (id, 0, Some(0)));
    queue.complete_many("w2", &[record(&again[0], Outcome::Delivered, 200)], BREAKER).await.expect("deliver");
    assert_eq!(status(&client, id).await, "delivered");
}

#[tokio::test]
async fn a_late_success_settles_a_rescued_row_that_no_one_claimed_again() {
    let db = database().await;
    let client = db.client().await;
    let queue = queue(&db);
    let hook = webhook(&db, NewWebhook { max_retries: Some(0), ..NewWebhook::default() }).await;
    let id = insert(&client, hook, None).await;
    let lease = Duration::from_millis(200);
    let claimed = queue.claim("w1", 1, lease, &ClaimLimits::default()).await.expect("claim").deliveries;
    // The worker stalls past its lease (SIGSTOP, a long pause): the row is rescued...
    expire_and_rescue(&queue, lease, 5).await;
    // ...and then its result arrives: the receiver did get the message.
    let report =
        queue.complete_many("w1", &[record(&claimed[0], Outcome::Delivered, 200)], BREAKER).await.expect("late");
    assert_eq!((report.settled, report.lost_leases), (1, 0), "a late success is not lost to a rescue");
    assert_eq!(status(&client, id).await, "delivered");
}

#[tokio::test]
async fn a_dead_letter_never_hides_a_delivery() {
    let db = database().await;
    let client = db.client().await;
    let queue = queue(&db);
    let hook = webhook(&db, NewWebhook::default()).await;
    let lease = Duration::from_millis(200);

    // Dead by the rescue (its lease expired as often as allowed), then its success arrives.
    let stalled = insert(&client, hook, None).await;
    let claimed = queue.claim("w1", 1, lease, &ClaimLimits::default()).await.expect("claim").deliveries;
    expire_and_rescue(&queue, lease, 1).await;
    assert_eq!(status(&client, stalled).await, "dead");
    queue.complete_many("w1", &[record(&claimed[0], Outcome::Delivered, 200)], BREAKER).await.expect("late");
    assert_eq!(status(&client, stalled).await, "delivered");

    // Only a success revives a dead letter: a late failure leaves it dead (its key's successor
    // may be on its way already).
    let failed = insert(&client, hook, None).await;
    let claimed = queue.claim("w1", 1, lease, &ClaimLimits::default()).await.expect("claim").deliveries;
    expire_and_rescue(&queue, lease, 1).await;
    let report = queue.complete_many("w1", &[record(&claimed[0], Outcome::Retry, 503)], BREAKER).await.expect("late");
    assert_eq!(report.lost_leases, 1);
    assert_eq!(status(&client, failed).await, "dead");

    // Rescued, claimed again and dead by the second claim's 4xx, then the first claim's success.
    let twice = insert(&client, hook, None).await;
    let first = queue.claim("w1", 1, lease, &ClaimLimits::default()).await.expect("claim").deliveries;
    expire_and_rescue(&queue, lease, 5).await;
    let second =
        queue.claim("w2", 1, Duration::from_secs(60), &ClaimLimits::default()).await.expect("claim").deliveries;
    assert_eq!(second[0].delivery_id, twice);
    queue.complete_many("w2", &[record(&second[0], Outcome::Dead, 410)], BREAKER).await.expect("dead");
    assert_eq!(status(&client, twice).await, "dead");
    queue.complete_many("w1", &[record(&first[0], Outcome::Delivered, 200)], BREAKER).await.expect("late");
    assert_eq!(status(&client, twice).await, "delivered", "the receiver accepted it once: it is delivered");

    // A late failure of the first claim never overrides the second claim's success.
    let third = insert(&client, hook, None).await;
    let first = queue.claim("w1", 1, lease, &ClaimLimits::default()).await.expect("claim").deliveries;
    expire_and_rescue(&queue, lease, 5).await;
    let second =
        queue.claim("w2", 1, Duration::from_secs(60), &ClaimLimits::default()).await.expect("claim").deliveries;
    queue.complete_many("w2", &[record(&second[0], Outcome::Delivered, 200)], BREAKER).await.expect("deliver");
    let report = queue.complete_many("w1", &[record(&first[0], Outcome::Dead, 400)], BREAKER).await.expect("late");
    assert_eq!(report.lost_leases, 1);
    assert_eq!(status(&client, third).await, "delivered");
}

// ---------------------------------------------------------------------------------------------
// Leases start when the rows are taken (issue 11.1)
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_that_waited_hands_out_its_whole_lease() {
    let db = database().await;
    let client = db.client().await;
    let queue = queue(&db);
    let hook = webhook(&db, NewWebhook::default()).await;
    insert(&client, hook, None).await;
    // An operator's DDL holds the webhooks table; a claim waits for it.
    let mut operator = db.client().await;
    let open = operator.transaction().await.expect("begin");
    open.execute("LOCK TABLE hookfleet.webhooks IN ACCESS EXCLUSIVE MODE", &[]).await.expect("lock");
    let claim_queue = queue.clone();
    let claim = tokio::spawn(async move {
        claim_queue.claim("w1", 1, Duration::from_secs(10), &worker_limits(10.0)).await.expect("claim")
    });
    assert!(db.wait_for_lock_wait("claim_deliveries", || claim.is_finished()).await, "the claim waits for the lock");
    tokio::time::sleep(Duration::from_secs(3)).await;
    open.commit().await.expect("commit");
    let claimed = claim.await.expect("claim task").deliveries;
    let left = claimed[0].lease_deadline.saturating_duration_since(std::time::Instant::now());
    assert!(left > Duration::from_secs(9), "the lease runs from the take, not the claim's start: {left:?} left");
    let in_db: f64 = client
        .query_one(
            "SELECT extract(epoch FROM locked_until - now())::float8 FROM hookfleet.delivery_queue WHERE delivery_id = $1",
            &[&claimed[0].delivery_id],
        )
        .await
        .expect("lease")
        .get(0);
    assert!(in_db > 9.0, "locked_until is 10 s after the take, {in_db} s from now");
}

// ---------------------------------------------------------------------------------------------
// Every webhook change makes a version (issue 11.4)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn every_change_to_a_webhook_bumps_its_version_and_nothing_else_does() {
    let db = database().await;
    let client = db.client().await;
    let hook = webhook(&db, NewWebhook::default()).await;
    let query = format!("SELECT version FROM hookfleet.webhooks WHERE webhook_id = {hook}");
    let version = || db.count(&query);
    assert_eq!(version().await, 1);
    for change in [
        "timeout_ms = 250",
        "enabled = false",
        "rate_limit_rps = 3",
        "url_encrypted = url_encrypted || '\\x00'::bytea",
        "secrets_encrypted = secrets_encrypted || '\\x00'::bytea",
        "max_in_flight = 2",
        // A caller that bumps the version itself still gets exactly one new version.
        "version = version + 1, name = 'renamed'",
    ] {
        let before = version().await;
        client
            .execute(&format!("UPDATE hookfleet.webhooks SET {change} WHERE webhook_id = $1"), &[&hook])
            .await
            .expect(change);
        assert_eq!(version().await, before + 1, "{change}");
    }
    let before = version().await;
    client
        .execute("UPDATE hookfleet.webhooks SET timeout_ms = timeout_ms WHERE webhook_id = $1", &[&hook])
        .await
        .expect("no-op");
    assert_eq!(version().await, before, "an UPDATE that changes nothing is no new version");
}

/// A worker's cache reloads a webhook when a claimed row carries another version. A webhook
/// deleted and created again under the same webhook_id (an operator's DELETE and INSERT, a
/// restore) must therefore never come back with a version it had before, or a running worker
/// would sign with the deleted webhook's secret, to its URL.
#[tokio::test]
async fn a_webhook_created_again_under_its_id_never_repeats_a_version() {
    let db = database().await;
    let client = db.client().await;
    let hook = webhook(&db, NewWebhook::default()).await;
    client
        .execute("UPDATE hookfleet.webhooks SET timeout_ms = 250 WHERE webhook_id = $1", &[&hook])
        .await
        .expect("change");
    let query = format!("SELECT version FROM hookfleet.webhooks WHERE webhook_id = {hook}");
    let before = db.count(&query).await;
    client
        .batch_execute(&format!(
            "CREATE TEMP TABLE saved AS SELECT * FROM hookfleet.webhooks WHERE webhook_id = {hook};
             DELETE FROM hookfleet.webhooks WHERE webhook_id = {hook};
             INSERT INTO hookfleet.webhooks SELECT * FROM saved;"
        ))
        .await
        .expect("delete and create again, version included");
    let again = db.count(&query).await;
    assert!(again > before, "recreated at version {again}, not above the {before} a worker may have cached");
    // A webhook created from nothing (no version given) is not at 1 either once others exist.
    let other = webhook(&db, NewWebhook::default()).await;
    let query = format!("SELECT version FROM hookfleet.webhooks WHERE webhook_id = {other}");
    assert!(db.count(&query).await > again, "versions come from one sequence");
}
