//! Flow control across a fleet of real `hookfleet-worker` processes (spec §5, §6, §3.8 and
//! `max_in_flight`): a fleet-wide rate limit, the circuit breaker's whole cycle with a single
//! probe, `max_in_flight` under three workers, and webhooks that are slow, rate limited or open
//! never delaying another one. Receivers are loopback servers that record arrival times.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hookfleet_core::webhooks::{NewWebhook, WebhookView};
use hookfleet_test_support::{database, eventually, Receiver, Reply, TestDatabase, WorkerProcess};

fn worker_binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_hookfleet-worker"))
}

async fn webhook(db: &TestDatabase, new: NewWebhook) -> WebhookView {
    db.create_webhook(NewWebhook { enabled: true, ..new }).await
}

fn fleet(db: &TestDatabase, workers: usize, overrides: &[(&str, &str)]) -> Vec<WorkerProcess> {
    (1..=workers).map(|n| WorkerProcess::spawn(worker_binary(), db, &format!("w{n}"), overrides)).collect()
}

/// The most arrivals inside any window of `width` (windows start at an arrival).
fn busiest_window(arrivals: &[Instant], width: Duration) -> usize {
    let mut sorted = arrivals.to_vec();
    sorted.sort();
    (0..sorted.len()).map(|i| sorted[i..].iter().take_while(|at| **at < sorted[i] + width).count()).max().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_hold_a_webhook_to_its_fleet_wide_rate_and_deliver_every_row() {
    const RATE: f64 = 20.0;
    const ROWS: usize = 400;
    let db = database().await;
    let receiver = Receiver::ok().await;
    let hook =
        webhook(&db, NewWebhook { url: receiver.url("/limited"), rate_limit_rps: Some(RATE), ..Default::default() })
            .await;
    db.insert_deliveries(hook.webhook_id, ROWS as i64).await;
    let workers = fleet(&db, 3, &[]);

    let requests = receiver.wait_for(ROWS, Duration::from_secs(90)).await;
    let arrivals: Vec<Instant> = requests.iter().map(|request| request.received_at).collect();
    let span = arrivals.iter().max().unwrap().duration_since(*arrivals.iter().min().unwrap());
    let busiest = busiest_window(&arrivals, Duration::from_secs(10));
    let busiest_second = busiest_window(&arrivals, Duration::from_secs(1));
    let observed = (ROWS - 1) as f64 / span.as_secs_f64();
    let by_worker: Vec<i64> = {
        let client = db.client().await;
        let mut counts = Vec::new();
        for worker in &workers {
            let row = client
                .query_one(
                    "SELECT count(*) FROM hookfleet.delivery_attempts WHERE worker_id = $1",
                    &[&worker.worker_id],
                )
                .await
                .expect("attempts by worker");
            counts.push(row.get(0));
        }
        counts
    };
    eprintln!(
        "{ROWS} rows at {RATE}/s through 3 workers: {span:?} first to last ({observed:.2}/s), busiest 10 s window \
         {busiest}, busiest 1 s window {busiest_second}, attempts by worker {by_worker:?}"
    );
    // The contract: never more than the rate + 10 % over any 10 s window. The default burst (half
    // the rate) leaves room for arrival jitter.
    assert!(busiest <= 220, "{busiest} requests inside 10 s at a 20/s limit");
    assert!(observed >= RATE * 0.85, "the fleet used only {observed:.2}/s of a 20/s limit");
    assert_eq!(requests.len(), ROWS, "every row once");
    eventually(Duration::from_secs(10), "every row to be delivered", || async {
        (db.count("SELECT count(*) FROM hookfleet.delivery_queue WHERE delivery_status = 'delivered'").await as usize
            == ROWS)
            .then_some(())
    })
    .await;
    // Held back by the limit is not an attempt: one attempt per row, no retries.
    assert_eq!(db.count("SELECT count(*) FROM hookfleet.delivery_attempts").await as usize, ROWS);
    assert_eq!(db.count("SELECT COALESCE(sum(retry_count), 0) FROM hookfleet.delivery_queue").await, 0);
    let metrics = workers[0].get("/metrics").await.expect("metrics").1;
    assert!(
        metrics.contains(&format!("webhook_rate_limited_total{{webhook_id=\"{}\"}}", hook.webhook_id)),
        "held-back claims are counted:\n{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_after_the_threshold_probes_once_reopens_and_closes_without_spending_retries() {
    const ROWS: i64 = 10;
    let db = database().await;
    let healthy = Arc::new(AtomicBool::new(false));
    let receiver = {
        let healthy = healthy.clone();
        Receiver::start(move |_, _| Reply::status(if healthy.load(Ordering::SeqCst) { 200 } else { 503 })).await
    };
    // One attempt at a time fleet-wide, so that exactly the threshold of failures opens it.
    let hook = webhook(
        &db,
        NewWebhook { url: receiver.url("/flaky"), max_in_flight: Some(1), max_retries: Some(20), ..Default::default() },
    )
    .await;
    db.insert_deliveries(hook.webhook_id, ROWS).await;
    let settings = [("CIRCUIT_BREAKER_FAILURE_THRESHOLD", "3"), ("CIRCUIT_BREAKER_TIMEOUT_SECONDS", "2")];
    let workers = fleet(&db, 3, &settings);
    let client = db.client().await;
    let circuit = || async {
        client
            .query_opt(
                "SELECT circuit_state, health_status FROM hookfleet.webhook_health_metrics WHERE webhook_id = $1",
                &[&hook.webhook_id],
            )
            .await
            .expect("health")
            .map(|row| (row.get::<_, String>(0), row.get::<_, String>(1)))
    };

    // Three failures open it.
    eventually(Duration::from_secs(30), "the circuit to open", || async {
        (circuit().await == Some(("open".to_owned(), "unavailable".to_owned()))).then_some(())
    })
    .await;
    assert_eq!(receiver.requests().len(), 3, "the threshold of failures, then nothing");
    let degraded = db
        .count(&format!("SELECT count(*) FROM hookfleet.v_degraded_webhooks WHERE webhook_id = {}", hook.webhook_id))
        .await;
    assert_eq!(degraded, 1);
    // After the open period: one probe, which fails and re-opens the circuit.
    let requests = receiver.wait_for(4, Duration::from_secs(30)).await;
    let probe = requests[3].received_at;
    assert!(
        probe.duration_since(requests[2].received_at) >= Duration::from_millis(1500),
        "the probe came {:?} after the circuit opened",
        probe.duration_since(requests[2].received_at)
    );
    eventually(Duration::from_secs(10), "the failed probe to re-open the circuit", || async {
        (circuit().await.is_some_and(|(state, _)| state == "open")
            && db.count("SELECT count(*) FROM hookfleet.delivery_attempts").await == 4)
            .then_some(())
    })
    .await;

    // The receiver recovers: the next probe closes the circuit and everything is delivered.
    healthy.store(true, Ordering::SeqCst);
    let requests = receiver.wait_for(ROWS as usize + 4, Duration::from_secs(30)).await;
    let second_probe = requests[4].received_at;
    assert!(
        second_probe.duration_since(probe) >= Duration::from_millis(1500),
        "the second probe came {:?} after the first",
        second_probe.duration_since(probe)
    );
    assert!(
        requests[5].received_at > second_probe,
        "nothing else was sent while the probe was out (one probe across three workers)"
    );
    eventually(Duration::from_secs(30), "every row to be delivered", || async {
        (db.count("SELECT count(*) FROM hookfleet.delivery_queue WHERE delivery_status = 'delivered'").await == ROWS)
            .then_some(())
    })
    .await;
    assert_eq!(circuit().await.map(|(state, _)| state).as_deref(), Some("closed"));
    // Whichever worker opened, probed or closed it, none goes on reporting it open: each samples
    // the fleet's circuits (every 5 s). Whether one reports it open meanwhile is
    // `every_worker_reports_the_circuit_the_fleet_sees` in stalls.rs.
    let series = format!("webhook_circuit_state{{webhook_id=\"{}\"}}", hook.webhook_id);
    for worker in &workers {
        eventually(Duration::from_secs(15), "every worker to report the circuit closed", || async {
            let (_, body) = worker.get("/metrics").await?;
            matches!(hookfleet_test_support::metric_value(&body, &series), None | Some(0.0)).then_some(())
        })
        .await;
    }
    // Retries were spent by the four failed attempts only, never by the waiting while open.
    assert_eq!(db.count("SELECT COALESCE(sum(retry_count), 0) FROM hookfleet.delivery_queue").await, 4);
    assert_eq!(receiver.requests().len(), ROWS as usize + 4);
    eprintln!(
        "breaker: opened after 3 failures; probes {:?} and {:?} after opening; all {ROWS} delivered",
        probe.duration_since(requests[2].received_at),
        second_probe.duration_since(requests[2].received_at)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_in_flight_holds_across_three_workers() {
    const ROWS: usize = 40;
    const HOLD: Duration = Duration::from_millis(100);
    let db = database().await;
    let receiver = Receiver::start(|_, _| Reply::status(200).after(HOLD)).await;
    let hook =
        webhook(&db, NewWebhook { url: receiver.url("/narrow"), max_in_flight: Some(2), ..Default::default() }).await;
    db.insert_deliveries(hook.webhook_id, ROWS as i64).await;
    let _workers = fleet(&db, 3, &[]);

    let requests = receiver.wait_for(ROWS, Duration::from_secs(60)).await;
    let arrivals: Vec<Instant> = requests.iter().map(|request| request.received_at).collect();
    // A slot frees only once its answer (held HOLD) is written back, so a third request can never
    // arrive within HOLD of two others.
    let concurrent = busiest_window(&arrivals, HOLD);
    let span = arrivals.iter().max().unwrap().duration_since(*arrivals.iter().min().unwrap());
    eprintln!("max_in_flight 2, 3 workers, {ROWS} rows held {HOLD:?} each: at most {concurrent} at once, {span:?}");
    assert!(concurrent <= 2, "{concurrent} requests in flight at once with max_in_flight 2");
    eventually(Duration::from_secs(10), "every row to be delivered", || async {
        (db.count("SELECT count(*) FROM hookfleet.delivery_queue WHERE delivery_status = 'delivered'").await as usize
            == ROWS)
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_rate_limited_and_open_webhooks_never_delay_a_healthy_one() {
    const BACKLOG: i64 = 300;
    let db = database().await;
    let hanging = Receiver::start(|_, _| Reply::status(200).after(Duration::from_secs(30))).await;
    let failing = Receiver::start(|_, _| Reply::status(500)).await;
    let healthy = Receiver::ok().await;
    let slow = webhook(&db, NewWebhook { url: hanging.url("/hangs"), ..Default::default() }).await;
    let limited =
        webhook(&db, NewWebhook { url: healthy.url("/limited"), rate_limit_rps: Some(1.0), ..Default::default() })
            .await;
    let open =
        webhook(&db, NewWebhook { url: failing.url("/fails"), max_retries: Some(50), ..Default::default() }).await;
    let good = webhook(&db, NewWebhook { url: healthy.url("/good"), ..Default::default() }).await;
    for hook in [&slow, &limited, &open] {
        db.insert_deliveries(hook.webhook_id, BACKLOG).await;
    }
    let _workers = fleet(&db, 2, &[("HTTP_TIMEOUT", "5s"), ("CIRCUIT_BREAKER_FAILURE_THRESHOLD", "3")]);
    eventually(Duration::from_secs(30), "the hanging webhook to hold attempts and the circuit to open", || async {
        let open_now = db
            .count(&format!(
                "SELECT count(*) FROM hookfleet.webhook_health_metrics WHERE webhook_id = {} AND circuit_state = 'open'",
                open.webhook_id
            ))
            .await
            == 1;
        (!hanging.requests().is_empty() && open_now).then_some(())
    })
    .await;

    let mut latencies = Vec::new();
    for n in 0..20 {
        let before = healthy.requests().iter().filter(|request| request.path == "/good").count();
        let inserted = Instant::now();
        db.insert_delivery(good.webhook_id, &format!("{{\"n\":{n}}}")).await;
        let arrived = eventually(Duration::from_secs(10), "the healthy delivery", || async {
            healthy
                .requests()
                .iter()
                .filter(|request| request.path == "/good")
                .nth(before)
                .map(|request| request.received_at)
        })
        .await;
        latencies.push(arrived.saturating_duration_since(inserted));
    }
    latencies.sort();
    let limited_sent = healthy.requests().iter().filter(|request| request.path == "/limited").count();
    eprintln!(
        "healthy webhook next to a hanging one ({} requests held), a 1/s one ({limited_sent} sent) and an open \
         circuit ({} failures): p50 {:?}, max {:?}",
        hanging.requests().len(),
        failing.requests().len(),
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1]
    );
    assert!(latencies[latencies.len() - 1] < Duration::from_millis(500), "latencies {latencies:?}");
    // The hanging webhook holds no more than its share of each worker's slots (half of 64).
    assert!(hanging.requests().len() <= 64, "{} hanging requests", hanging.requests().len());
}
