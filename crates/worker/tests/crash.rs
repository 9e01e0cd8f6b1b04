//! Crash and restart resilience with the real `hookfleet-worker` binary: `kill -9` of workers
//! under load, PostgreSQL stopped (fast shutdown) or crashed (immediate shutdown) and started
//! again under the fleet's feet, and scheduled rows across restarts. SPEC §3.1: nothing is lost,
//! duplicates happen only around crashes and carry the same `webhook-id`.
//!
//! Every test here restarts the test binary's one PostgreSQL server (or may), which every other
//! test of this binary shares, so the tests take [`SERIAL`] first and run one at a time.
//!
//! The throwaway server runs with `synchronous_commit=off` for speed, so a commit is durable only
//! once the WAL writer has flushed it. The producers in this file therefore commit with
//! `synchronous_commit = on`, as a real producer on a default server does: "committed" then means
//! durable, and a crash may not lose a producer's row. The workers' own commits stay
//! asynchronous; one lost in a crash can only cause a duplicate, never a loss.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::PoisonError;
use std::time::{Duration, Instant};

use hookfleet_core::webhooks::{NewWebhook, WebhookView};
use hookfleet_test_support::{
    cluster, database, eventually, ReceivedRequest, Receiver, Reply, TestDatabase, WorkerProcess,
};

/// Serialises the tests of this binary: a PostgreSQL restart would break any test running beside it.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const DEADLINE: Duration = Duration::from_secs(30);
/// How long PostgreSQL stays down in each restart.
const OUTAGE: Duration = Duration::from_secs(1);

/// Short leases so that rows held by a killed worker come back quickly; a high retry budget
/// because every rescued row's lost attempt counts as a retry; a breaker that never opens.
const CRASH_SETTINGS: [(&str, &str); 6] = [
    ("HOOKFLEET_LEASE", "2s"),
    ("HTTP_TIMEOUT", "1s"),
    ("HOOKFLEET_HEARTBEAT_INTERVAL", "500ms"),
    ("HOOKFLEET_MAX_RETRIES", "20"),
    ("CIRCUIT_BREAKER_FAILURE_THRESHOLD", "1000"),
    ("HOOKFLEET_SHUTDOWN_GRACE", "5s"),
];

/// The producers' statement: rows `m<from>` … `m<to>` with body `{"n": n}`; a retried batch
/// (after a lost commit reply) is a no-op thanks to the `(webhook_id, message_id)` key.
const INSERT_RANGE: &str = "INSERT INTO hookfleet.delivery_queue (webhook_id, message_id, message_body) \
     SELECT $1, 'm' || n, jsonb_build_object('n', n) FROM generate_series($2::bigint, $3::bigint) n \
     ON CONFLICT (webhook_id, message_id) DO NOTHING";

fn worker_binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_hookfleet-worker"))
}

fn spawn_worker(db: &TestDatabase, worker_id: &str, extra: &[(&str, &str)]) -> WorkerProcess {
    let mut settings: Vec<(&str, &str)> = CRASH_SETTINGS.to_vec();
    settings.extend_from_slice(extra);
    WorkerProcess::spawn(worker_binary(), db, worker_id, &settings)
}

async fn webhook(db: &TestDatabase, url: String) -> WebhookView {
    db.create_webhook(NewWebhook { url, enabled: true, ..NewWebhook::default() }).await
}

/// True when this binary runs its own PostgreSQL; against `HOOKFLEET_TEST_DATABASE_URL` there is
/// nothing we may stop, and the test says so and passes.
fn server_is_ours(test: &str) -> bool {
    let ours = cluster().embedded().is_some();
    if !ours {
        eprintln!("{test}: skipped, HOOKFLEET_TEST_DATABASE_URL names a server this test must not restart");
    }
    ours
}

#[derive(Clone, Copy, Debug)]
enum Restart {
    /// `stop_server`: fast shutdown (SIGINT), clients are disconnected, a checkpoint is written.
    Fast,
    /// `crash_server`: immediate shutdown (SIGQUIT), no checkpoint; the next start recovers.
    Crash,
}

/// Stops or crashes the test binary's PostgreSQL, keeps it down for `outage`, starts it again and
/// waits until it accepts connections; returns how long it was unavailable. The sleep paces the
/// outage; it is not a wait for a condition.
async fn restart_postgres(kind: Restart, outage: Duration) -> Duration {
    tokio::task::spawn_blocking(move || {
        let server = cluster().embedded().expect("the embedded server (checked by server_is_ours)");
        let mut server = server.lock().unwrap_or_else(PoisonError::into_inner);
        let started = Instant::now();
        match kind {
            Restart::Fast => server.stop_server().expect("stop_server"),
            Restart::Crash => server.crash_server().expect("crash_server"),
        }
        std::thread::sleep(outage);
        server.start_again().expect("start_again");
        started.elapsed()
    })
    .await
    .expect("join the restart")
}

async fn try_connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A producer's session: commits are durable before they are acknowledged (see the module doc).
async fn producer(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let client = try_connect(url).await?;
    client.batch_execute("SET synchronous_commit = on").await?;
    Ok(client)
}

/// Inserts rows `m<from>` … `m<to>`, reconnecting and retrying through a database restart until
/// `deadline`; returns how many tries it took.
async fn insert_range(url: &str, webhook_id: i64, from: i64, to: i64, deadline: Duration) -> u32 {
    let until = Instant::now() + deadline;
    let mut tries = 0;
    loop {
        tries += 1;
        let result = async { producer(url).await?.execute(INSERT_RANGE, &[&webhook_id, &from, &to]).await }.await;
        match result {
            Ok(_) => return tries,
            Err(error) => {
                assert!(Instant::now() < until, "inserting m{from}..m{to} still fails after {deadline:?}: {error}");
                // Paces the retries while the server is down.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Rows per `delivery_status`.
async fn status_counts(client: &tokio_postgres::Client) -> Result<BTreeMap<String, i64>, tokio_postgres::Error> {
    let rows = client.query("SELECT delivery_status, count(*) FROM hookfleet.delivery_queue GROUP BY 1", &[]).await?;
    Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
}

/// Waits until exactly `rows` rows exist and all are `delivered`; panics with the last counts
/// seen when `deadline` passes. Reconnects if the session was lost to a restart.
async fn wait_until_all_delivered(db: &TestDatabase, rows: i64, deadline: Duration) -> BTreeMap<String, i64> {
    let until = Instant::now() + deadline;
    let mut client = None;
    let mut last = Err("no answer yet".to_owned());
    loop {
        if client.is_none() {
            client = try_connect(&db.url).await.ok();
        }
        if let Some(session) = &client {
            match status_counts(session).await {
                Ok(counts) => {
                    let total: i64 = counts.values().sum();
                    if total == rows && counts.get("delivered") == Some(&rows) {
                        return counts;
                    }
                    last = Ok(counts);
                }
                Err(error) => {
                    last = Err(error.to_string());
                    client = None;
                }
            }
        }
        assert!(
            Instant::now() < until,
            "not every one of {rows} rows was delivered within {deadline:?}; last counts: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the receiver saw of messages `m1` … `m<rows>`.
#[derive(Debug)]
struct Receipts {
    requests: usize,
    unique: usize,
    duplicates: usize,
    /// The largest number of times one message arrived.
    most_copies: usize,
}

/// Checks that every message arrived at least once, nothing else arrived, and every copy of a
/// message (a duplicate after a crash included) carried that message's own `webhook-id`.
fn check_receipts(requests: &[ReceivedRequest], rows: i64) -> Receipts {
    let mut copies: HashMap<i64, usize> = HashMap::new();
    for request in requests {
        let body: serde_json::Value = serde_json::from_slice(&request.body).expect("a JSON body");
        let n = body["n"].as_i64().unwrap_or_else(|| panic!("unexpected body {body}"));
        let id = request.header("webhook-id").unwrap_or_default();
        assert_eq!(id, format!("m{n}"), "the copy of message {n} carries another webhook-id");
        assert!((1..=rows).contains(&n), "a message that was never inserted arrived: {n}");
        *copies.entry(n).or_default() += 1;
    }
    let missing: Vec<i64> = (1..=rows).filter(|n| !copies.contains_key(n)).collect();
    assert!(
        missing.is_empty(),
        "{} of {rows} messages never reached the receiver, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    Receipts {
        requests: requests.len(),
        unique: copies.len(),
        duplicates: requests.len() - copies.len(),
        most_copies: copies.values().copied().max().unwrap_or(0),
    }
}

/// The largest `retry_count` and how many rows used at least one retry (rescued after a crash).
async fn retry_figures(db: &TestDatabase) -> (i32, i64) {
    let row = db
        .client()
        .await
        .query_one(
            "SELECT COALESCE(max(retry_count), 0), count(*) FILTER (WHERE retry_count > 0) FROM hookfleet.delivery_queue",
            &[],
        )
        .await
        .expect("retry figures");
    (row.get(0), row.get(1))
}

/// Waits up to `deadline` for `worker_id` to hold rows in flight and returns how many it holds
/// (0 when it held none in time). `observer` is the session it polls with, reopened when a
/// restart closed it.
async fn rows_held_when_busy(
    db: &TestDatabase,
    observer: &mut Option<tokio_postgres::Client>,
    worker_id: &str,
    deadline: Duration,
) -> i64 {
    let until = Instant::now() + deadline;
    while Instant::now() < until {
        if observer.is_none() {
            *observer = try_connect(&db.url).await.ok();
        }
        if let Some(client) = observer.as_ref() {
            let held = client
                .query_one(
                    "SELECT count(*) FROM hookfleet.delivery_queue \
                     WHERE delivery_status = 'in_flight' AND locked_by = $1",
                    &[&worker_id],
                )
                .await;
            match held {
                Ok(row) if row.get::<_, i64>(0) > 0 => return row.get(0),
                Ok(_) => {}
                Err(_) => *observer = None,
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    0
}

/// The chaos run behind the two `kill_nine_under_load_…` tests: `ROWS` rows inserted in paced
/// batches while three workers deliver them; every `KILL_EVERY` (once it holds rows) one worker,
/// round-robin, gets SIGKILL and a replacement with a new WORKER_ID; halfway through PostgreSQL
/// goes down once.
async fn kill_nine_and_restart_under_load(test: &str, restart: Restart) {
    const ROWS: i64 = 2000;
    const BATCH: i64 = 100;
    const INSERT_PACE: Duration = Duration::from_millis(600);
    const WORKERS: usize = 3;
    const KILLS: usize = 6;
    const KILL_EVERY: Duration = Duration::from_millis(1500);
    /// How long a kill may wait for its victim to hold rows.
    const BUSY_DEADLINE: Duration = Duration::from_secs(1);
    const RESTART_AFTER_KILL: usize = 3;
    const DRAIN_DEADLINE: Duration = Duration::from_secs(60);

    let db = database().await;
    let receiver = Receiver::ok().await;
    let hook = webhook(&db, receiver.url("/")).await;
    let mut workers: Vec<WorkerProcess> = (1..=WORKERS).map(|n| spawn_worker(&db, &format!("w{n}"), &[])).collect();
    let mut next_worker = WORKERS + 1;
    let started = Instant::now();

    // The producer inserts in batches while the workers run, through the restart.
    let url = db.url.clone();
    let webhook_id = hook.webhook_id;
    let producer = tokio::spawn(async move {
        let mut retried_batches = 0;
        let mut last_insert = Instant::now();
        for from in (1..=ROWS).step_by(BATCH as usize) {
            let tries = insert_range(&url, webhook_id, from, from + BATCH - 1, DEADLINE).await;
            last_insert = Instant::now();
            retried_batches += usize::from(tries > 1);
            // Spreads the load over the chaos; not a wait for a condition.
            tokio::time::sleep(INSERT_PACE).await;
        }
        (retried_batches, last_insert)
    });

    let mut observer = None;
    let mut kills = 0;
    let mut held_by_killed = 0;
    let mut outage = None;
    for round in 0..KILLS {
        // Paces the kills.
        tokio::time::sleep(KILL_EVERY).await;
        let slot = round % WORKERS;
        let victim = &mut workers[slot];
        let victim_id = victim.worker_id.clone();
        // Aim the kill at a moment when the victim holds rows, so that it dies mid-delivery.
        let held = rows_held_when_busy(&db, &mut observer, &victim_id, BUSY_DEADLINE).await;
        held_by_killed += held;
        victim.signal("KILL");
        victim.wait(DEADLINE).await;
        kills += 1;
        let replacement = format!("w{next_worker}");
        next_worker += 1;
        eprintln!("{test}: t={:?} kill -9 {victim_id} (holding {held} rows), started {replacement}", started.elapsed());
        workers[slot] = spawn_worker(&db, &replacement, &[]);
        if kills == RESTART_AFTER_KILL {
            let took = restart_postgres(restart, OUTAGE).await;
            eprintln!("{test}: t={:?} PostgreSQL {restart:?} restart, down for {took:?}", started.elapsed());
            outage = Some(took);
        }
    }
    let (retried_batches, last_insert) =
        tokio::time::timeout(DEADLINE, producer).await.expect("producer finished").expect("producer task");
    let chaos_ended = Instant::now();

    let counts = wait_until_all_delivered(&db, ROWS, DRAIN_DEADLINE).await;
    let drain_after_chaos = chaos_ended.elapsed();
    let drain_after_last_insert = last_insert.elapsed();
    let total = started.elapsed();
    assert_eq!(counts, BTreeMap::from([("delivered".to_owned(), ROWS)]), "no row dead, pending or in flight");
    let receipts = check_receipts(&receiver.requests(), ROWS);
    let (max_retry, rows_retried) = retry_figures(&db).await;
    eprintln!(
        "{test}: rows={ROWS} workers={WORKERS} kills={kills} restarts=1 ({restart:?}, down {outage:?}) \
         rows_held_by_killed_workers={held_by_killed} producer_batches_retried={retried_batches} \
         requests={} unique={} duplicates={} most_copies={} rows_lost=0 rows_with_retries={rows_retried} \
         max_retry_count={max_retry} drained_after_last_insert={drain_after_last_insert:?} \
         drained_after_chaos={drain_after_chaos:?} first_insert_to_all_delivered={total:?}",
        receipts.requests, receipts.unique, receipts.duplicates, receipts.most_copies
    );
    assert_eq!(receipts.unique as i64, ROWS);
    assert!(max_retry <= 20, "a row used more than its retry budget: {max_retry}");
    drop(workers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_under_load_and_a_postgres_restart_lose_nothing() {
    let _serial = SERIAL.lock().await;
    let test = "kill_nine_under_load_and_a_postgres_restart_lose_nothing";
    if server_is_ours(test) {
        kill_nine_and_restart_under_load(test, Restart::Fast).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_under_load_and_a_postgres_crash_lose_nothing() {
    let _serial = SERIAL.lock().await;
    let test = "kill_nine_under_load_and_a_postgres_crash_lose_nothing";
    if server_is_ours(test) {
        kill_nine_and_restart_under_load(test, Restart::Crash).await;
    }
}

/// Whether `pid` is a live process (a zombie counts as gone).
fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
}

/// Inserts one row `m<n>` with body `{"n": n}`, durably.
async fn insert_one(db: &TestDatabase, webhook_id: i64, n: i64) {
    let client = producer(&db.url).await.expect("producer session");
    client.execute(INSERT_RANGE, &[&webhook_id, &n, &n]).await.expect("insert");
}

async fn delivery_status(db: &TestDatabase, message_id: &str) -> Option<String> {
    let client = try_connect(&db.url).await.ok()?;
    let row = client
        .query_opt("SELECT delivery_status FROM hookfleet.delivery_queue WHERE message_id = $1", &[&message_id])
        .await
        .ok()??;
    Some(row.get(0))
}

async fn wait_delivered(db: &TestDatabase, message_id: &str, deadline: Duration) {
    eventually(deadline, &format!("{message_id} to be delivered"), || async {
        (delivery_status(db, message_id).await.as_deref() == Some("delivered")).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_reconnect_after_postgres_restarts_without_being_restarted() {
    let _serial = SERIAL.lock().await;
    if !server_is_ours("workers_reconnect_after_postgres_restarts_without_being_restarted") {
        return;
    }
    let db = database().await;
    let receiver = Receiver::ok().await;
    let hook = webhook(&db, receiver.url("/")).await;
    let worker = spawn_worker(&db, "w1", &[]);
    let pid = worker.pid();

    insert_one(&db, hook.webhook_id, 1).await;
    wait_delivered(&db, "m1", DEADLINE).await;

    let down_for = restart_postgres(Restart::Fast, OUTAGE).await;
    let restarted = Instant::now();
    insert_one(&db, hook.webhook_id, 2).await;
    wait_delivered(&db, "m2", DEADLINE).await;
    let recovered_in = restarted.elapsed();

    // The same process delivered it: still alive, never respawned, and it made the attempt.
    assert!(process_alive(pid), "the worker process died; log:\n{}", worker.log());
    let client = db.client().await;
    let attempt_by: String = client
        .query_one(
            "SELECT a.worker_id FROM hookfleet.delivery_attempts a \
             JOIN hookfleet.delivery_queue q USING (delivery_id) WHERE q.message_id = 'm2'",
            &[],
        )
        .await
        .expect("one attempt for m2")
        .get(0);
    assert_eq!(attempt_by, "w1");
    // Every service reconnected: the heartbeat refreshes the registry (same pid), /readyz sees the
    // database, and the wake-up listener holds a session again.
    eventually(DEADLINE, "a heartbeat after the restart", || async {
        let row = client
            .query_one(
                "SELECT pid, now() - last_seen_at < interval '1 second' FROM hookfleet.workers WHERE worker_id = 'w1'",
                &[],
            )
            .await
            .ok()?;
        (row.get::<_, i32>(0) == pid as i32 && row.get::<_, bool>(1)).then_some(())
    })
    .await;
    let (ready, _) = eventually(DEADLINE, "/readyz answers", || worker.get("/readyz")).await;
    assert_eq!(ready, 200);
    eventually(DEADLINE, "the wake-up listener's session", || async {
        let listeners: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND application_name = 'hookfleet-worker-listen'",
                &[],
            )
            .await
            .ok()?
            .get(0);
        (listeners == 1).then_some(())
    })
    .await;
    assert_eq!(receiver.requests().len(), 2, "each row once");

    let log = worker.log();
    let notable: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("WARN") || line.contains("ERROR") || line.contains("listener"))
        .collect();
    eprintln!(
        "workers_reconnect_after_postgres_restarts_without_being_restarted: down {down_for:?}, \
         second row delivered {recovered_in:?} after the restart; the worker logged:"
    );
    for line in &notable {
        eprintln!("    {line}");
    }
    assert!(log.contains("claim failed; the database may be restarting"), "no claim failure logged:\n{log}");
    assert!(log.contains("wake-up listener disconnected"), "no listener disconnect logged:\n{log}");
    assert!(log.contains("wake-up listener reconnected"), "no listener recovery logged:\n{log}");
    assert!(log.contains("database reachable again"), "no claim recovery logged:\n{log}");
}

/// SPEC §3.10: inserts wake idle workers, so latency does not wait for `POLL_INTERVAL`. With a
/// poll interval far beyond the deadline, only the wake-up listener can get a row delivered in
/// time, so each restart's row measures how soon the listener is back — after every restart,
/// not only the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wake_up_listener_reconnects_promptly_after_every_restart() {
    const RESTARTS: i64 = 4;
    const PROMPT: Duration = Duration::from_secs(3);
    let _serial = SERIAL.lock().await;
    let test = "the_wake_up_listener_reconnects_promptly_after_every_restart";
    if !server_is_ours(test) {
        return;
    }
    let db = database().await;
    let receiver = Receiver::ok().await;
    let hook = webhook(&db, receiver.url("/")).await;
    let worker = spawn_worker(&db, "w1", &[("POLL_INTERVAL", "60s")]);
    insert_one(&db, hook.webhook_id, 1).await;
    wait_delivered(&db, "m1", DEADLINE).await;

    let mut latencies = Vec::new();
    for n in 2..=RESTARTS + 1 {
        restart_postgres(Restart::Fast, OUTAGE).await;
        let restarted = Instant::now();
        insert_one(&db, hook.webhook_id, n).await;
        wait_delivered(&db, &format!("m{n}"), DEADLINE).await;
        latencies.push(restarted.elapsed());
    }
    eprintln!("{test}: delivery latency of the row inserted right after each restart: {latencies:?}");
    assert!(
        latencies.iter().all(|latency| *latency < PROMPT),
        "after restart k the worker needed {latencies:?} to deliver a fresh row (expected each < {PROMPT:?}); log:\n{}",
        worker.log().lines().filter(|line| line.contains("listener")).collect::<Vec<_>>().join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_postgres_recovers_committed_rows() {
    const ROWS: i64 = 400;
    let _serial = SERIAL.lock().await;
    let test = "a_crashed_postgres_recovers_committed_rows";
    if !server_is_ours(test) {
        return;
    }
    let db = database().await;
    // Slow enough answers that some rows are in flight when the server dies.
    let receiver = Receiver::start(|_, _| Reply::status(200).after(Duration::from_millis(200))).await;
    let hook = webhook(&db, receiver.url("/")).await;
    insert_range(&db.url, hook.webhook_id, 1, ROWS, DEADLINE).await;
    let settings = [("HOOKFLEET_MAX_IN_FLIGHT", "16"), ("BATCH_SIZE", "8")];
    let workers = [spawn_worker(&db, "w1", &settings), spawn_worker(&db, "w2", &settings)];

    let client = db.client().await;
    let before = eventually(DEADLINE, "rows delivered, in flight and pending at once", || async {
        let counts = status_counts(&client).await.ok()?;
        let has = |status: &str| counts.get(status).is_some_and(|count| *count > 0);
        (has("delivered") && has("in_flight") && has("pending")).then_some(counts)
    })
    .await;
    let down_for = restart_postgres(Restart::Crash, OUTAGE).await;
    let restarted = Instant::now();

    let counts = wait_until_all_delivered(&db, ROWS, DEADLINE).await;
    let drain = restarted.elapsed();
    assert_eq!(counts, BTreeMap::from([("delivered".to_owned(), ROWS)]));
    let receipts = check_receipts(&receiver.requests(), ROWS);
    let (max_retry, rows_retried) = retry_figures(&db).await;
    eprintln!(
        "{test}: rows={ROWS} at the crash {before:?}; down {down_for:?}; requests={} unique={} duplicates={} \
         most_copies={} rows_lost=0 rows_with_retries={rows_retried} max_retry_count={max_retry} \
         drain_after_restart={drain:?}",
        receipts.requests, receipts.unique, receipts.duplicates, receipts.most_copies
    );
    drop(workers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_delivery_waits_and_survives_restarts() {
    const ROWS: i64 = 20;
    const DELAY: Duration = Duration::from_secs(3);
    const TOLERANCE: Duration = Duration::from_millis(100);
    let _serial = SERIAL.lock().await;
    let test = "scheduled_delivery_waits_and_survives_restarts";
    if !server_is_ours(test) {
        return;
    }
    let db = database().await;
    let receiver = Receiver::ok().await;
    let hook = webhook(&db, receiver.url("/")).await;
    let mut first = spawn_worker(&db, "w1", &[]);
    // The worker is up before the rows exist, so it sees them (NOTIFY) and must leave them be.
    eventually(DEADLINE, "w1 to register", || async {
        let count: i64 = db
            .client()
            .await
            .query_one("SELECT count(*) FROM hookfleet.workers WHERE worker_id = 'w1'", &[])
            .await
            .ok()?
            .get(0);
        (count == 1).then_some(())
    })
    .await;

    // Captured before the INSERT, so the server's now() (and thus deliver_at) is no earlier.
    let inserted = Instant::now();
    let due = inserted + DELAY;
    producer(&db.url)
        .await
        .expect("producer session")
        .execute(
            "INSERT INTO hookfleet.delivery_queue (webhook_id, message_id, message_body, deliver_at) \
             SELECT $1, 'm' || n, jsonb_build_object('n', n), now() + interval '3 seconds' \
             FROM generate_series(1, $2::bigint) n",
            &[&hook.webhook_id, &ROWS],
        )
        .await
        .expect("insert scheduled rows");

    // Restart the worker (graceful) and PostgreSQL while the rows wait.
    first.signal("TERM");
    let status = first.wait(DEADLINE).await;
    assert!(status.success(), "w1 exit status {status:?}; log:\n{}", first.log());
    let down_for = restart_postgres(Restart::Fast, OUTAGE).await;
    let _second = spawn_worker(&db, "w2", &[]);
    let restarts_done = inserted.elapsed();
    eprintln!(
        "{test}: worker and PostgreSQL (down {down_for:?}) restarted {restarts_done:?} after the insert; due after {DELAY:?}"
    );
    if Instant::now() + TOLERANCE < due {
        // Still early: nothing sent, every row untouched and waiting.
        assert!(receiver.requests().is_empty(), "a scheduled row was delivered early");
        let untouched: i64 = db
            .client()
            .await
            .query_one(
                "SELECT count(*) FROM hookfleet.delivery_queue \
                 WHERE delivery_status = 'pending' AND retry_count = 0 AND locked_by IS NULL \
                   AND next_attempt_at = deliver_at AND deliver_at > now()",
                &[],
            )
            .await
            .expect("pending rows")
            .get(0);
        assert_eq!(untouched, ROWS, "every row waits for its deliver_at, schedule intact after the restarts");
    }

    let requests = receiver.wait_for(ROWS as usize, DEADLINE).await;
    let earliest = requests.iter().map(|request| request.received_at).min().expect("requests");
    let latest = requests.iter().map(|request| request.received_at).max().expect("requests");
    for request in &requests {
        assert!(
            request.received_at + TOLERANCE >= due,
            "{:?} arrived {:?} before its deliver_at",
            request.header("webhook-id"),
            due - request.received_at
        );
    }
    wait_until_all_delivered(&db, ROWS, DEADLINE).await;
    let receipts = check_receipts(&receiver.requests(), ROWS);
    let client = db.client().await;
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE a.started_at < q.deliver_at), max(q.retry_count), count(*) \
             FROM hookfleet.delivery_attempts a JOIN hookfleet.delivery_queue q USING (delivery_id)",
            &[],
        )
        .await
        .expect("attempts");
    let (early_attempts, max_retry, attempts): (i64, Option<i32>, i64) = (row.get(0), row.get(1), row.get(2));
    eprintln!(
        "{test}: rows={ROWS} first arrival {:?} after the insert, last {:?}; requests={} duplicates={} attempts={attempts}",
        earliest - inserted,
        latest - inserted,
        receipts.requests,
        receipts.duplicates
    );
    assert_eq!(early_attempts, 0, "an attempt started before the row's deliver_at");
    assert_eq!(max_retry, Some(0), "waiting for deliver_at used no retries");
    assert_eq!(receipts.duplicates, 0, "a graceful restart causes no duplicates");
}

/// A database outage longer than the lease while results wait to be written back: nobody can
/// rescue the rows meanwhile, so the results are kept and land once the database is back. Each
/// message is sent once, its attempt recorded, its row settled by that attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_waiting_through_an_outage_longer_than_the_lease_land_and_nothing_is_sent_twice() {
    const ROWS: i64 = 5;
    const LEASE: Duration = Duration::from_secs(8);
    let _serial = SERIAL.lock().await;
    let test = "results_waiting_through_an_outage_longer_than_the_lease_land_and_nothing_is_sent_twice";
    if !server_is_ours(test) {
        return;
    }
    let db = database().await;
    // Answers come while the database is down: 5 s leave the fast stop time even on a loaded
    // machine (if the results land before it, the wait for held slots below fails loudly).
    let receiver = Receiver::start(|_, _| Reply::status(200).after(Duration::from_secs(5))).await;
    let hook = webhook(&db, receiver.url("/")).await;
    let worker = spawn_worker(&db, "w1", &[("HOOKFLEET_LEASE", "8s"), ("HTTP_TIMEOUT", "7s")]);
    insert_range(&db.url, hook.webhook_id, 1, ROWS, DEADLINE).await;
    receiver.wait_for(ROWS as usize, DEADLINE).await;

    let outage = tokio::spawn(restart_postgres(Restart::Fast, LEASE * 2));
    // While the database is down the results wait, holding their slots: no attempt in flight.
    let held = eventually(DEADLINE, "every result waiting for the database", || async {
        let (_, body) = worker.get("/metrics").await?;
        let held = hookfleet_test_support::metric_value(&body, "worker_slots_held")?;
        let in_flight = hookfleet_test_support::metric_value(&body, "worker_in_flight")?;
        (held == ROWS as f64 && in_flight == 0.0).then_some(held)
    })
    .await;
    let down_for = outage.await.expect("restart");
    assert!(down_for > LEASE, "the outage ({down_for:?}) must outlast the lease");

    let counts = wait_until_all_delivered(&db, ROWS, DEADLINE).await;
    assert_eq!(counts, BTreeMap::from([("delivered".to_owned(), ROWS)]));
    let requests = receiver.requests();
    assert_eq!(requests.len(), ROWS as usize, "a message was sent again; log:\n{}", worker.log());
    let client = db.client().await;
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM hookfleet.delivery_attempts), \
                    (SELECT coalesce(sum(lease_expiries), 0)::bigint FROM hookfleet.delivery_queue)",
            &[],
        )
        .await
        .expect("figures");
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (ROWS, 0), "one attempt each, no lease rescued");
    assert!(worker.log().contains("results written back after the database came back"), "{}", worker.log());
    eprintln!("{test}: held {held} results through {down_for:?} down (lease {LEASE:?}); each sent once");
}
