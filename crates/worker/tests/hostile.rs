//! Hostile conditions around a real `hookfleet-worker`: receivers that stall, never answer, flood,
//! speak garbage or reset the connection; SIGTERM with attempts in flight (spec §3.9); a webhook
//! deleted under an attempt; bad producer input. Every hostile receiver is a raw-TCP loopback
//! server written here, so that it can misbehave in ways a real HTTP server library would not.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hookfleet_core::webhooks::{NewWebhook, WebhookView};
use hookfleet_test_support::{database, eventually, Receiver, Reply, TestDatabase, WorkerProcess};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

const DEADLINE: Duration = Duration::from_secs(30);

fn worker_binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_hookfleet-worker"))
}

async fn webhook(db: &TestDatabase, url: String) -> WebhookView {
    db.create_webhook(NewWebhook { url, enabled: true, ..NewWebhook::default() }).await
}

/// One row of `delivery_queue` as these tests look at it.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    status: String,
    retry_count: i32,
    locked_by: Option<String>,
    last_status_code: Option<i32>,
    last_error: Option<String>,
}

async fn row(client: &tokio_postgres::Client, delivery_id: i64) -> Row {
    let row = client
        .query_one(
            "SELECT delivery_status, retry_count, locked_by, last_status_code, last_error \
             FROM hookfleet.delivery_queue WHERE delivery_id = $1",
            &[&delivery_id],
        )
        .await
        .expect("delivery row");
    Row {
        status: row.get(0),
        retry_count: row.get(1),
        locked_by: row.get(2),
        last_status_code: row.get(3),
        last_error: row.get(4),
    }
}

/// Waits until the row has left `pending`/`in_flight` for good, and returns it.
async fn settled(client: &tokio_postgres::Client, delivery_id: i64) -> Row {
    eventually(DEADLINE, &format!("delivery {delivery_id} to settle"), || async {
        let row = row(client, delivery_id).await;
        matches!(row.status.as_str(), "delivered" | "dead" | "cancelled").then_some(row)
    })
    .await
}

/// One attempt row: attempt number, status code, error class, outcome, duration.
#[derive(Debug, Clone)]
struct Attempt {
    number: i32,
    status_code: Option<i32>,
    error_class: Option<String>,
    outcome: String,
    duration_ms: f64,
}

async fn attempts(client: &tokio_postgres::Client, delivery_id: i64) -> Vec<Attempt> {
    client
        .query(
            "SELECT attempt_number, status_code, error_class, outcome, duration_ms \
             FROM hookfleet.delivery_attempts WHERE delivery_id = $1 ORDER BY attempt_number",
            &[&delivery_id],
        )
        .await
        .expect("attempts")
        .iter()
        .map(|row| Attempt {
            number: row.get(0),
            status_code: row.get(1),
            error_class: row.get(2),
            outcome: row.get(3),
            duration_ms: row.get(4),
        })
        .collect()
}

/// The peak resident set of a process (`VmHWM` in `/proc/<pid>/status`), in kB.
fn peak_rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/<pid>/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

// ---------------------------------------------------------------------------------------------
// The hostile receiver
// ---------------------------------------------------------------------------------------------

/// How long any one connection of the hostile server may live, whatever it is doing.
const CONNECTION_LIMIT: Duration = Duration::from_secs(20);
/// The body size `/huge` announces and sends.
const HUGE_BODY: usize = 10 * 1024 * 1024;
const OK_EMPTY: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// A raw-TCP loopback server whose behaviour is chosen by the request path:
///
/// - `/slow`: a valid 200 after 10 s;
/// - `/slow-ok`: a valid 200 after 2.5 s (slow, but successful);
/// - `/stall`: the head of a 200 with `Content-Length: 100`, 10 bytes of body, then nothing;
/// - `/silent`: reads the request and never writes;
/// - `/huge`: a 200 with a 10 MiB body;
/// - `/garbage`: `not http at all\r\n\r\n`, then closes;
/// - `/reset`: reads the request, then aborts the connection (RST, zero linger);
/// - `/close`: reads the request, then closes the connection cleanly (FIN) without answering;
/// - anything else: an empty 200.
///
/// It stops (with every connection) when dropped; each connection is also capped at
/// [`CONNECTION_LIMIT`].
struct HostileServer {
    addr: SocketAddr,
    seen: Arc<Mutex<HashMap<String, usize>>>,
    task: JoinHandle<()>,
}

impl HostileServer {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind hostile server");
        let addr = listener.local_addr().expect("hostile server address");
        let seen: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let record = seen.clone();
        let task = tokio::spawn(async move {
            // Dropped (aborting every connection) when this task is aborted.
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        if let Ok((stream, _)) = accepted {
                            let record = record.clone();
                            connections.spawn(async move {
                                let _ = tokio::time::timeout(CONNECTION_LIMIT, serve_hostile(stream, record)).await;
                            });
                        }
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        Self { addr, seen, task }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// How many complete requests arrived for `path`.
    fn seen(&self, path: &str) -> usize {
        self.seen.lock().expect("seen lock").get(path).copied().unwrap_or(0)
    }
}

impl Drop for HostileServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one request (head and `Content-Length` body) and returns its path.
async fn read_request(stream: &mut TcpStream) -> Option<String> {
    let mut buffer = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
            break at + 4;
        }
        if buffer.len() > 64 * 1024 {
            return None;
        }
        let read = stream.read(&mut chunk).await.ok()?;
        if read == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..read]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let path = head.lines().next()?.split_whitespace().nth(1)?.to_owned();
    let length: usize = head
        .lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse().ok())
        .unwrap_or(0);
    let mut body_read = buffer.len() - head_end;
    while body_read < length.min(1024 * 1024) {
        let read = stream.read(&mut chunk).await.ok()?;
        if read == 0 {
            return None;
        }
        body_read += read;
    }
    Some(path)
}

/// Reads and discards until the peer closes (or errors): holds a connection open without answering.
async fn hold(stream: &mut TcpStream) {
    let mut chunk = [0u8; 1024];
    while let Ok(read) = stream.read(&mut chunk).await {
        if read == 0 {
            break;
        }
    }
}

async fn serve_hostile(mut stream: TcpStream, seen: Arc<Mutex<HashMap<String, usize>>>) {
    let Some(path) = read_request(&mut stream).await else {
        return;
    };
    *seen.lock().expect("seen lock").entry(path.clone()).or_default() += 1;
    match path.as_str() {
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(10)).await;
            let _ = stream.write_all(OK_EMPTY).await;
        }
        "/slow-ok" => {
            tokio::time::sleep(Duration::from_millis(2500)).await;
            let _ = stream.write_all(OK_EMPTY).await;
        }
        "/stall" => {
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789").await;
            hold(&mut stream).await;
        }
        "/silent" => hold(&mut stream).await,
        "/huge" => {
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {HUGE_BODY}\r\nConnection: close\r\n\r\n");
            if stream.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let chunk = vec![b'x'; 64 * 1024];
            let mut sent = 0;
            // Ends early when the worker stops reading (it caps the body) and closes.
            while sent < HUGE_BODY {
                if stream.write_all(&chunk).await.is_err() {
                    return;
                }
                sent += chunk.len();
            }
        }
        "/drip" => {
            // A valid head, then one body byte every 100 ms: only a total timeout ends this.
            if stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n").await.is_err() {
                return;
            }
            for _ in 0..1000 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if stream.write_all(b"x").await.is_err() {
                    return;
                }
            }
        }
        "/endless-headers" => {
            // A status line, then header lines that never end (up to 10 MiB).
            if stream.write_all(b"HTTP/1.1 200 OK\r\n").await.is_err() {
                return;
            }
            let line = format!("X-Junk: {}\r\n", "j".repeat(1000));
            for _ in 0..HUGE_BODY / line.len() {
                if stream.write_all(line.as_bytes()).await.is_err() {
                    return;
                }
            }
        }
        "/huge-chunked" => {
            // 10 MiB in 64 KiB chunks, with no length announced.
            if stream.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").await.is_err() {
                return;
            }
            let mut chunk = format!("{:x}\r\n", 64 * 1024).into_bytes();
            chunk.extend(std::iter::repeat_n(b'y', 64 * 1024));
            chunk.extend_from_slice(b"\r\n");
            for _ in 0..HUGE_BODY / (64 * 1024) {
                if stream.write_all(&chunk).await.is_err() {
                    return;
                }
            }
            let _ = stream.write_all(b"0\r\n\r\n").await;
        }
        "/informational" => {
            // Interim 1xx answers every 50 ms, never a final one.
            for _ in 0..1000 {
                if stream.write_all(b"HTTP/1.1 102 Processing\r\n\r\n").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        "/garbage" => {
            let _ = stream.write_all(b"not http at all\r\n\r\n").await;
            let _ = stream.shutdown().await;
        }
        "/reset" => {
            // An abortive close: the peer gets RST instead of FIN.
            let _ = stream.set_zero_linger();
            drop(stream);
        }
        "/close" => drop(stream),
        _ => {
            let _ = stream.write_all(OK_EMPTY).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Hostile receivers
// ---------------------------------------------------------------------------------------------

/// What one hostile path must produce with `HOOKFLEET_MAX_RETRIES=0`.
struct Case {
    path: &'static str,
    rows: usize,
    status: &'static str,
    status_code: Option<i32>,
    error_class: Option<&'static str>,
    /// Bounds on the recorded attempt duration.
    duration_ms: std::ops::RangeInclusive<f64>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_receivers_settle_every_row_and_a_healthy_webhook_keeps_flowing() {
    let db = database().await;
    let hostile = HostileServer::start().await;
    let healthy = Receiver::ok().await;
    let healthy_hook = webhook(&db, healthy.url("/healthy")).await;
    // An attempt bounded by HTTP_TIMEOUT=3s takes at least 3 s; the slack allows a loaded machine.
    // The 3 s are the window in which the healthy webhook must get through.
    let timed_out = 2950.0..=5000.0;
    let quick = 0.0..=2500.0;
    let cases = [
        Case {
            path: "/slow",
            rows: 1,
            status: "dead",
            status_code: None,
            error_class: Some("timeout"),
            duration_ms: timed_out.clone(),
        },
        Case {
            path: "/stall",
            rows: 1,
            status: "dead",
            status_code: None,
            error_class: Some("timeout"),
            duration_ms: timed_out.clone(),
        },
        Case {
            path: "/silent",
            rows: 1,
            status: "dead",
            status_code: None,
            error_class: Some("timeout"),
            duration_ms: timed_out.clone(),
        },
        Case {
            path: "/huge",
            rows: 20,
            status: "delivered",
            status_code: Some(200),
            error_class: None,
            duration_ms: quick.clone(),
        },
        Case {
            path: "/drip",
            rows: 1,
            status: "dead",
            status_code: None,
            error_class: Some("timeout"),
            duration_ms: timed_out.clone(),
        },
        Case {
            path: "/informational",
            rows: 1,
            status: "dead",
            status_code: None,
            error_class: Some("timeout"),
            duration_ms: timed_out.clone(),
        },
        Case {
            path: "/endless-headers",
            // Below CIRCUIT_BREAKER_FAILURE_THRESHOLD (5), so that no row waits for the breaker.
            rows: 3,
            status: "dead",
            status_code: None,
            error_class: Some("protocol"),
            duration_ms: quick.clone(),
        },
        Case {
            path: "/huge-chunked",
            rows: 5,
            status: "delivered",
            status_code: Some(200),
            error_class: None,
            duration_ms: quick.clone(),
        },
        Case {
            path: "/garbage",
            rows: 1,
            status: "dead",
            status_code: None,
            error_class: Some("protocol"),
            duration_ms: quick.clone(),
        },
        Case {
            path: "/reset",
            rows: 1,
            status: "dead",
            status_code: None,
            error_class: Some("connect"),
            duration_ms: quick.clone(),
        },
        Case {
            path: "/close",
            rows: 1,
            status: "dead",
            status_code: None,
            error_class: Some("protocol"),
            duration_ms: quick.clone(),
        },
    ];
    let mut hooks = HashMap::new();
    for case in &cases {
        hooks.insert(case.path, webhook(&db, hostile.url(case.path)).await.webhook_id);
    }
    let worker =
        WorkerProcess::spawn(worker_binary(), &db, "w1", &[("HTTP_TIMEOUT", "3s"), ("HOOKFLEET_MAX_RETRIES", "0")]);
    let client = db.client().await;
    eventually(DEADLINE, "the worker to register", || async {
        (db.count("SELECT count(*) FROM hookfleet.workers WHERE worker_id = 'w1'").await == 1).then_some(())
    })
    .await;

    let hostile_started = Instant::now();
    let mut rows: Vec<(&Case, Vec<i64>)> = Vec::new();
    for case in &cases {
        let mut ids = Vec::new();
        for n in 0..case.rows {
            ids.push(db.insert_delivery(hooks[case.path], &format!("{{\"case\":\"{}\",\"n\":{n}}}", case.path)).await);
        }
        rows.push((case, ids));
    }

    // While the slow, stalling and silent receivers hold their attempts, the healthy webhook's
    // rows must go straight through.
    eventually(DEADLINE, "the holding receivers to have their requests", || async {
        ["/slow", "/stall", "/silent"].iter().all(|path| hostile.seen(path) == 1).then_some(())
    })
    .await;
    let held_since = Instant::now();
    let slow_id = rows[0].1[0];
    let mut inserted_at = Vec::new();
    let mut healthy_ids = Vec::new();
    for n in 0..5 {
        inserted_at.push(Instant::now());
        healthy_ids.push(db.insert_delivery(healthy_hook.webhook_id, &format!("{{\"healthy\":{n}}}")).await);
    }
    let requests = healthy.wait_for(5, DEADLINE).await;
    let all_arrived = held_since.elapsed();
    let slow_still_in_flight = row(&client, slow_id).await.status == "in_flight";
    let latencies: Vec<Duration> = requests
        .iter()
        .map(|request| {
            let body: serde_json::Value = serde_json::from_slice(&request.body).expect("json body");
            let n = body["healthy"].as_u64().expect("healthy row number") as usize;
            request.received_at.saturating_duration_since(inserted_at[n])
        })
        .collect();
    eprintln!(
        "healthy webhook latency (insert -> request at the receiver) during hostile load: {latencies:?}; \
         all five arrived {all_arrived:?} after the holding receivers got their requests \
         (/slow still in flight then: {slow_still_in_flight}); hostile rows inserted {:?} before",
        held_since.duration_since(hostile_started)
    );
    // Causal rather than timed: all five went through while /slow still held its attempt, so none
    // waited for a hostile receiver to let go.
    assert!(
        slow_still_in_flight,
        "the healthy deliveries took {all_arrived:?}, longer than /slow held its attempt: {latencies:?}"
    );
    for id in &healthy_ids {
        assert_eq!(settled(&client, *id).await.status, "delivered");
    }

    for (case, ids) in &rows {
        for id in ids {
            let row = settled(&client, *id).await;
            let attempts = attempts(&client, *id).await;
            assert_eq!(attempts.len(), 1, "{}: exactly one attempt (max_retries 0): {attempts:?}", case.path);
            let attempt = &attempts[0];
            eprintln!(
                "{:>8}: status {} class {:?} code {:?} after {:.0} ms; last_error {:?}",
                case.path, row.status, attempt.error_class, attempt.status_code, attempt.duration_ms, row.last_error
            );
            assert_eq!(row.status, case.status, "{}: {row:?}", case.path);
            assert_eq!(row.locked_by, None, "{}: settled rows hold no lease", case.path);
            assert_eq!(row.last_status_code, case.status_code, "{}: {row:?}", case.path);
            assert_eq!(attempt.number, 1);
            assert_eq!(attempt.status_code, case.status_code, "{}: {attempt:?}", case.path);
            assert_eq!(attempt.error_class.as_deref(), case.error_class, "{}: {attempt:?}", case.path);
            assert_eq!(attempt.outcome, case.status, "{}: {attempt:?}", case.path);
            assert!(
                case.duration_ms.contains(&attempt.duration_ms),
                "{}: attempt took {:.0} ms, expected within {:?}",
                case.path,
                attempt.duration_ms,
                case.duration_ms
            );
            if let Some(class) = case.error_class {
                assert!(
                    row.last_error.as_deref().is_some_and(|error| error.starts_with(class)),
                    "{}: last_error names the class: {row:?}",
                    case.path
                );
            }
        }
        assert_eq!(hostile.seen(case.path), case.rows, "{}: requests that reached the receiver", case.path);
    }
    assert_eq!(
        db.count("SELECT count(*) FROM hookfleet.delivery_queue WHERE delivery_status IN ('pending', 'in_flight')")
            .await,
        0,
        "nothing is left pending or in flight"
    );

    // 20 bodies of 10 MiB each went through a worker that reads at most HOOKFLEET_RESPONSE_BODY_CAP.
    let peak_kb = peak_rss_kb(worker.pid());
    eprintln!(
        "worker peak RSS (VmHWM) after 20 x 10 MiB responses: {} kB ({:.1} MiB)",
        peak_kb,
        peak_kb as f64 / 1024.0
    );
    assert!(peak_kb < 100 * 1024, "worker peak RSS {peak_kb} kB is not bounded by the body cap");

    // The worker is still healthy and delivering.
    let (status, _) = eventually(DEADLINE, "/healthz", || worker.get("/healthz")).await;
    assert_eq!(status, 200);
    let last = db.insert_delivery(healthy_hook.webhook_id, "{\"after\":true}").await;
    assert_eq!(settled(&client, last).await.status, "delivered");
    let log = worker.log();
    assert!(!log.contains("panicked"), "the worker panicked:\n{log}");
}

/// Spec §3.8: a slow webhook never delays deliveries to other webhooks. Here one webhook answers
/// every request successfully but slowly (2.5 s, inside HTTP_TIMEOUT, so its circuit never opens)
/// and has more due rows than the worker has attempt slots (`HOOKFLEET_MAX_IN_FLIGHT`, default 64).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_webhook_with_a_backlog_does_not_delay_a_healthy_webhook() {
    const BACKLOG: i64 = 192;
    const HEALTHY: usize = 5;
    let db = database().await;
    let hostile = HostileServer::start().await;
    let healthy = Receiver::ok().await;
    let slow = webhook(&db, hostile.url("/slow-ok")).await;
    let healthy_hook = webhook(&db, healthy.url("/healthy")).await;
    let _worker = WorkerProcess::spawn(worker_binary(), &db, "w1", &[("HTTP_TIMEOUT", "4s")]);
    let client = db.client().await;
    db.insert_deliveries(slow.webhook_id, BACKLOG).await;
    eventually(DEADLINE, "the first slow requests", || async { (hostile.seen("/slow-ok") > 0).then_some(()) }).await;
    let mut latencies = Vec::new();
    for n in 0..HEALTHY {
        let inserted = Instant::now();
        let healthy_id = db.insert_delivery(healthy_hook.webhook_id, "{}").await;
        let requests = healthy.wait_for(n + 1, DEADLINE).await;
        latencies.push(requests[n].received_at.saturating_duration_since(inserted));
        assert_eq!(settled(&client, healthy_id).await.status, "delivered");
    }
    let slow_done = db
        .count(&format!(
            "SELECT count(*) FROM hookfleet.delivery_queue WHERE webhook_id = {} AND delivery_status = 'delivered'",
            slow.webhook_id
        ))
        .await;
    latencies.sort();
    let median = latencies[HEALTHY / 2];
    eprintln!(
        "healthy latency behind a slow webhook's backlog of {BACKLOG}: {latencies:?} \
         ({slow_done} of the backlog delivered by then)"
    );
    // A healthy row that had to wait for one of the slow webhook's slots would wait 1.25 s on
    // average (answers take 2.5 s); the backlog itself takes 15 s to drain.
    assert!(median < Duration::from_millis(500), "healthy deliveries waited {latencies:?} behind a slow webhook");
    assert!(
        slow_done < BACKLOG / 2,
        "the backlog was mostly drained ({slow_done} of {BACKLOG}) before the healthy rows"
    );
}

/// A webhook's own `timeout_ms` longer than the lease is capped at four fifths of the lease, so a
/// receiver that never answers cannot make an attempt outlive its claim (and be rescued and sent
/// twice while the first attempt still waits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_never_answering_receiver_cannot_hold_an_attempt_past_its_lease() {
    let db = database().await;
    let hostile = HostileServer::start().await;
    let hook = db
        .create_webhook(NewWebhook {
            url: hostile.url("/silent"),
            enabled: true,
            timeout_ms: Some(60_000),
            ..NewWebhook::default()
        })
        .await;
    let _worker = WorkerProcess::spawn(
        worker_binary(),
        &db,
        "w1",
        &[("HTTP_TIMEOUT", "1s"), ("HOOKFLEET_LEASE", "3s"), ("HOOKFLEET_MAX_RETRIES", "0")],
    );
    let client = db.client().await;
    let id = db.insert_delivery(hook.webhook_id, "{}").await;
    let row = settled(&client, id).await;
    let attempts = attempts(&client, id).await;
    eprintln!("60 s webhook timeout under a 3 s lease: {attempts:?}");
    assert_eq!((row.status.as_str(), row.locked_by.as_deref()), ("dead", None));
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    assert_eq!(attempts[0].error_class.as_deref(), Some("timeout"));
    assert!(
        (2350.0..=3000.0).contains(&attempts[0].duration_ms),
        "the attempt took {:.0} ms; four fifths of the 3 s lease is 2400 ms",
        attempts[0].duration_ms
    );
    assert_eq!(hostile.seen("/silent"), 1, "the row was never rescued and sent again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_or_closed_connection_is_retried_then_dead() {
    let db = database().await;
    let hostile = HostileServer::start().await;
    let reset = webhook(&db, hostile.url("/reset")).await;
    let close = webhook(&db, hostile.url("/close")).await;
    let _worker =
        WorkerProcess::spawn(worker_binary(), &db, "w1", &[("HTTP_TIMEOUT", "1s"), ("HOOKFLEET_MAX_RETRIES", "1")]);
    let client = db.client().await;
    let reset_id = db.insert_delivery(reset.webhook_id, "{}").await;
    let close_id = db.insert_delivery(close.webhook_id, "{}").await;
    for (id, path, class) in [(reset_id, "/reset", "connect"), (close_id, "/close", "protocol")] {
        let row = settled(&client, id).await;
        assert_eq!((row.status.as_str(), row.retry_count, row.locked_by.as_deref()), ("dead", 1, None), "{path}");
        let attempts = attempts(&client, id).await;
        let summary: Vec<(i32, Option<&str>, &str)> = attempts
            .iter()
            .map(|attempt| (attempt.number, attempt.error_class.as_deref(), attempt.outcome.as_str()))
            .collect();
        eprintln!("{path}: attempts {summary:?}; last_error {:?}", row.last_error);
        assert_eq!(summary, [(1, Some(class), "retry"), (2, Some(class), "dead")], "{path}");
        assert_eq!(hostile.seen(path), 2, "{path}: one attempt and one retry reached the receiver");
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Graceful shutdown (spec §3.9)
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_attempts_within_the_grace() {
    let db = database().await;
    let receiver = Receiver::start(|_, _| Reply::status(200).after(Duration::from_secs(1))).await;
    let hook = webhook(&db, receiver.url("/")).await;
    let mut worker = WorkerProcess::spawn(worker_binary(), &db, "w-term", &[]);
    let client = db.client().await;
    let mut held = Vec::new();
    for n in 0..5 {
        held.push(db.insert_delivery(hook.webhook_id, &format!("{{\"n\":{n}}}")).await);
    }
    receiver.wait_for(5, DEADLINE).await;
    let in_flight = db.count("SELECT count(*) FROM hookfleet.delivery_queue WHERE delivery_status = 'in_flight' AND locked_by = 'w-term'",
    )
    .await;
    assert_eq!(in_flight, 5, "all five rows are claimed and in flight");

    let signalled = Instant::now();
    worker.signal("TERM");
    // Once the worker has acknowledged the signal it must not claim anything more.
    eventually(DEADLINE, "the worker to acknowledge SIGTERM", || async {
        worker.log().contains("shutting down gracefully").then_some(())
    })
    .await;
    let mut late = Vec::new();
    for n in 0..3 {
        late.push(db.insert_delivery(hook.webhook_id, &format!("{{\"late\":{n}}}")).await);
    }
    let status = worker.wait(DEADLINE).await;
    let took = signalled.elapsed();
    eprintln!("SIGTERM -> exit with five 1 s attempts in flight: {took:?}");
    assert!(status.success(), "exit status {status:?}; log:\n{}", worker.log());
    assert!(took < Duration::from_secs(10), "the drain took {took:?}");

    for id in &held {
        let row = row(&client, *id).await;
        assert_eq!((row.status.as_str(), row.last_status_code, row.locked_by), ("delivered", Some(200), None));
    }
    for id in &late {
        let row = row(&client, *id).await;
        assert_eq!(
            (row.status.as_str(), row.retry_count, row.locked_by),
            ("pending", 0, None),
            "claimed after SIGTERM"
        );
        assert!(attempts(&client, *id).await.is_empty());
    }
    assert_eq!(receiver.requests().len(), 5, "nothing was sent after the signal");
    assert_eq!(db.count("SELECT count(*) FROM hookfleet.workers WHERE worker_id = 'w-term'").await, 0);
    let log = worker.log();
    assert!(!log.contains("abandoning"), "the grace (25 s) did not run out:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_grace_runs_out_unfinished_rows_are_released() {
    const HELD: usize = 3;
    let db = database().await;
    // The first HELD requests are held 10 s; later ones are answered at once.
    let receiver = Receiver::start(|_, seen| {
        if seen < HELD {
            Reply::status(200).after(Duration::from_secs(10))
        } else {
            Reply::status(200)
        }
    })
    .await;
    let hook = webhook(&db, receiver.url("/")).await;
    // The attempt timeout (15 s) is longer than the receiver's hold, so only the grace can end it.
    let settings = [("HOOKFLEET_SHUTDOWN_GRACE", "500ms"), ("HTTP_TIMEOUT", "15s"), ("HOOKFLEET_LEASE", "20s")];
    let mut first = WorkerProcess::spawn(worker_binary(), &db, "w-first", &settings);
    let client = db.client().await;
    let mut ids = Vec::new();
    for n in 0..HELD {
        ids.push(db.insert_delivery(hook.webhook_id, &format!("{{\"n\":{n}}}")).await);
    }
    receiver.wait_for(HELD, DEADLINE).await;

    let signalled = Instant::now();
    first.signal("TERM");
    let status = first.wait(DEADLINE).await;
    let took = signalled.elapsed();
    eprintln!("SIGTERM -> exit with a 500 ms grace and 10 s attempts in flight: {took:?}");
    assert!(status.success(), "exit status {status:?}; log:\n{}", first.log());
    assert!(took < Duration::from_secs(5), "the worker took {took:?} to exit with a 500 ms grace");
    for id in &ids {
        let row = row(&client, *id).await;
        assert_eq!(
            (row.status.as_str(), row.retry_count, row.locked_by.as_deref()),
            ("pending", 0, None),
            "released untouched: {row:?}"
        );
        assert!(attempts(&client, *id).await.is_empty(), "an abandoned attempt records nothing");
    }
    assert_eq!(db.count("SELECT count(*) FROM hookfleet.workers WHERE worker_id = 'w-first'").await, 0);
    assert!(first.log().contains("abandoning"), "the log says the grace ran out:\n{}", first.log());

    let _second = WorkerProcess::spawn(worker_binary(), &db, "w-second", &settings);
    for id in &ids {
        let row = settled(&client, *id).await;
        assert_eq!((row.status.as_str(), row.last_status_code), ("delivered", Some(200)));
        let attempts = attempts(&client, *id).await;
        assert_eq!(attempts.len(), 1, "only w-second's attempt is recorded: {attempts:?}");
    }
    let requests = receiver.requests();
    assert_eq!(requests.len(), 2 * HELD, "each row was sent again (at least once)");
    let mut first_ids: Vec<_> = requests[..HELD].iter().map(|r| r.header("webhook-id").map(str::to_owned)).collect();
    let mut second_ids: Vec<_> = requests[HELD..].iter().map(|r| r.header("webhook-id").map(str::to_owned)).collect();
    first_ids.sort();
    second_ids.sort();
    assert_eq!(first_ids, second_ids, "the redelivery carries the same webhook-id");
}

// ---------------------------------------------------------------------------------------------
// 3. A webhook deleted under an attempt
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_deleted_mid_attempt_does_not_break_the_worker() {
    let db = database().await;
    // Every request is held 1 s, so the deleted webhook's result and the survivor's results finish
    // together and share write-back batches.
    let receiver = Receiver::start(|_, _| Reply::status(200).after(Duration::from_secs(1))).await;
    let doomed = webhook(&db, receiver.url("/doomed")).await;
    let survivor = webhook(&db, receiver.url("/survivor")).await;
    let worker = WorkerProcess::spawn(worker_binary(), &db, "w1", &[]);
    let client = db.client().await;
    let doomed_row = db.insert_delivery(doomed.webhook_id, "{}").await;
    let mut neighbours = Vec::new();
    for n in 0..3 {
        neighbours.push(db.insert_delivery(survivor.webhook_id, &format!("{{\"neighbour\":{n}}}")).await);
    }
    receiver.wait_for(4, DEADLINE).await;
    assert_eq!(row(&client, doomed_row).await.status, "in_flight");
    let deleted = client
        .execute("DELETE FROM hookfleet.webhooks WHERE webhook_id = $1", &[&doomed.webhook_id])
        .await
        .expect("delete webhook");
    assert_eq!(deleted, 1);
    assert_eq!(
        db.count(&format!("SELECT count(*) FROM hookfleet.delivery_queue WHERE delivery_id = {doomed_row}")).await,
        0,
        "the row went with its webhook"
    );

    // The attempts end (1 s); the deleted webhook's write-back matches no row: a lost lease, not a
    // failure, and it does not keep the survivor's results from settling.
    for id in &neighbours {
        let row = settled(&client, *id).await;
        assert_eq!((row.status.as_str(), row.last_status_code), ("delivered", Some(200)));
    }
    eventually(DEADLINE, "the worker to log the lost lease", || async {
        worker.log().contains("lease lost").then_some(())
    })
    .await;
    eventually(DEADLINE, "webhook_lease_lost_total 1", || async {
        let (_, body) = worker.get("/metrics").await?;
        body.lines().any(|line| line == "webhook_lease_lost_total 1").then_some(())
    })
    .await;
    let recorded = attempts(&client, doomed_row).await;
    assert_eq!(recorded.len(), 1, "the HTTP request happened, so its attempt is recorded: {recorded:?}");
    assert_eq!(recorded[0].outcome, "delivered");
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM hookfleet.webhook_health_metrics WHERE webhook_id = {}",
            doomed.webhook_id
        ))
        .await,
        0,
        "no health row is resurrected for the deleted webhook"
    );

    // Rows inserted afterwards are delivered as usual.
    let mut later = Vec::new();
    for n in 0..5 {
        later.push(db.insert_delivery(survivor.webhook_id, &format!("{{\"n\":{n}}}")).await);
    }
    for id in later {
        assert_eq!(settled(&client, id).await.status, "delivered");
    }
    let paths: Vec<String> = receiver.requests().iter().map(|request| request.path.clone()).collect();
    assert_eq!(paths.iter().filter(|path| *path == "/survivor").count(), 8, "{paths:?}");
    assert_eq!(paths.iter().filter(|path| *path == "/doomed").count(), 1, "{paths:?}");
    let (status, _) = eventually(DEADLINE, "/healthz", || worker.get("/healthz")).await;
    assert_eq!(status, 200);
    let log = worker.log();
    assert!(!log.contains("panicked"), "the worker panicked:\n{log}");
    assert!(!log.contains("refuses"), "the database refused a write-back:\n{log}");
    assert_eq!(db.count("SELECT count(*) FROM hookfleet.workers WHERE worker_id = 'w1'").await, 1);
}

// ---------------------------------------------------------------------------------------------
// 4. Bad producer input
// ---------------------------------------------------------------------------------------------

/// Runs `sql`, expects PostgreSQL to refuse it, and returns (SQLSTATE, message, detail).
async fn refused(client: &tokio_postgres::Client, sql: &str) -> (String, String, String) {
    let error = client.execute(sql, &[]).await.expect_err(sql);
    let db_error = error.as_db_error().unwrap_or_else(|| panic!("{sql}: not a database error: {error}"));
    eprintln!(
        "refused: {} ({}) {:?} {:?}",
        db_error.message(),
        db_error.code().code(),
        db_error.detail(),
        db_error.hint()
    );
    (db_error.code().code().to_owned(), db_error.message().to_owned(), db_error.detail().unwrap_or_default().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_producer_input_leaves_the_worker_untouched() {
    let db = database().await;
    let receiver = Receiver::ok().await;
    let hook = webhook(&db, receiver.url("/")).await;
    let worker = WorkerProcess::spawn(worker_binary(), &db, "w1", &[]);
    let client = db.client().await;
    let before = db.insert_delivery(hook.webhook_id, "{\"valid\":\"before\"}").await;
    assert_eq!(settled(&client, before).await.status, "delivered");
    let id = hook.webhook_id;

    let (code, message, detail) =
        refused(&client, "INSERT INTO hookfleet.delivery_queue (webhook_id, message_body) VALUES (987654, '{}')").await;
    assert_eq!(code, "23503");
    assert!(message.contains("foreign key constraint \"delivery_queue_webhook_id_fkey\""), "{message}");
    assert!(detail.contains("(webhook_id)=(987654) is not present in table \"webhooks\""), "{detail}");

    let (code, message, _) = refused(
        &client,
        &format!(
            "INSERT INTO hookfleet.delivery_queue (webhook_id, message_body) \
             VALUES ({id}, jsonb_build_object('blob', repeat('x', 300000)))"
        ),
    )
    .await;
    assert_eq!(code, "54000");
    assert_eq!(
        message, "hookfleet: message_body is 300012 bytes, over the limit of 262144 bytes",
        "the message says how big the body is and what the limit is"
    );

    let (code, message, _) = refused(
        &client,
        &format!(
            "INSERT INTO hookfleet.delivery_queue (webhook_id, message_body, max_retries) VALUES ({id}, '{{}}', -1)"
        ),
    )
    .await;
    assert_eq!(code, "23514");
    assert!(message.contains("check constraint \"delivery_queue_max_retries_range\""), "{message}");

    // One bad row refuses the whole statement: its valid neighbour is not inserted either.
    let (code, _, _) = refused(
        &client,
        &format!(
            "INSERT INTO hookfleet.delivery_queue (webhook_id, message_body, max_retries) \
             VALUES ({id}, '{{\"neighbour\":true}}', 1), ({id}, '{{}}', -5)"
        ),
    )
    .await;
    assert_eq!(code, "23514");
    assert_eq!(db.count("SELECT count(*) FROM hookfleet.delivery_queue").await, 1, "nothing else changed");

    let after = db.insert_delivery(hook.webhook_id, "{\"valid\":\"after\"}").await;
    let row = settled(&client, after).await;
    assert_eq!((row.status.as_str(), row.retry_count, row.last_status_code), ("delivered", 0, Some(200)));
    let bodies: Vec<String> =
        receiver.requests().iter().map(|request| String::from_utf8_lossy(&request.body).into_owned()).collect();
    assert_eq!(bodies, [r#"{"valid": "before"}"#, r#"{"valid": "after"}"#]);
    assert_eq!(db.count("SELECT count(*) FROM hookfleet.delivery_attempts").await, 2);
    let (status, _) = eventually(DEADLINE, "/healthz", || worker.get("/healthz")).await;
    assert_eq!(status, 200);
    assert!(!worker.log().contains("panicked"));
}
