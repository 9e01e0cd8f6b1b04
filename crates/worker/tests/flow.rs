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
    // Just over 10 s of rows at the rate: the shortest run in which the 10 s window binds.
    const RATE: f64 = 40.0;
    const ROWS: usize = 480;
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
    // the rate) leaves room for arrival jitter. The lower bound only shows that the limit, not the
    // fleet, set the pace; it has room for a loaded machine.
    assert!(busiest as f64 <= RATE * 10.0 * 1.1, "{busiest} requests inside 10 s at a {RATE}/s limit");
    assert!(observed >= RATE * 0.7, "the fleet used only {observed:.2}/s of a {RATE}/s limit");
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

/// The whole breaker cycle with room for concurrency: three workers, `max_in_flight` 4, so
/// anything but the breaker's own rule would let several probes out at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_after_the_threshold_probes_once_reopens_and_closes_without_spending_retries() {
    const ROWS: i64 = 12;
    const HOLD: Duration = Duration::from_millis(1000);
    let db = database().await;
    let healthy = Arc::new(AtomicBool::new(false));
    // Failing: 503 at once. Healthy: 200, each answer held HOLD.
    let receiver = {
        let healthy = healthy.clone();
        Receiver::start(move |_, _| {
            if healthy.load(Ordering::SeqCst) {
                Reply::status(200).after(HOLD)
            } else {
                Reply::status(503)
            }
        })
        .await
    };
    let hook = webhook(
        &db,
        NewWebhook { url: receiver.url("/flaky"), max_in_flight: Some(4), max_retries: Some(20), ..Default::default() },
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
    let settled_attempts = || async {
        db.count(&format!(
            "SELECT count(*) FROM hookfleet.delivery_attempts a WHERE a.delivery_id IN \
             (SELECT delivery_id FROM hookfleet.delivery_queue WHERE webhook_id = {})",
            hook.webhook_id
        ))
        .await as usize
    };

    // The threshold of failures opens it; attempts already out when it opened still land, and
    // then nothing more is sent.
    eventually(Duration::from_secs(30), "the circuit to open with nothing in flight", || async {
        let open = circuit().await == Some(("open".to_owned(), "unavailable".to_owned()));
        let quiet =
            db.count("SELECT count(*) FROM hookfleet.delivery_queue WHERE delivery_status = 'in_flight'").await == 0;
        (open && quiet && settled_attempts().await == receiver.requests().len()).then_some(())
    })
    .await;
    let failures = receiver.requests().len();
    assert!(
        (3..=3 + 4).contains(&failures),
        "{failures} failures before the circuit opened (threshold 3, 4 in flight)"
    );
    let opened_at = receiver.requests()[failures - 1].received_at;
    let degraded = db
        .count(&format!("SELECT count(*) FROM hookfleet.v_degraded_webhooks WHERE webhook_id = {}", hook.webhook_id))
        .await;
    assert_eq!(degraded, 1);

    // After the open period: one probe, which fails and re-opens the circuit.
    let requests = receiver.wait_for(failures + 1, Duration::from_secs(30)).await;
    let probe = requests[failures].received_at;
    assert!(
        probe.duration_since(opened_at) >= Duration::from_millis(1500),
        "the probe came {:?} after the circuit opened",
        probe.duration_since(opened_at)
    );
    eventually(Duration::from_secs(10), "the failed probe to re-open the circuit", || async {
        (circuit().await.is_some_and(|(state, _)| state == "open") && settled_attempts().await == failures + 1)
            .then_some(())
    })
    .await;
    assert_eq!(receiver.requests().len(), failures + 1, "one probe, fleet-wide");

    // The receiver recovers: the next probe is answered after HOLD, and nothing else goes out
    // until its success has closed the circuit, though the webhook's max_in_flight and three
    // workers' claims would allow four at once.
    healthy.store(true, Ordering::SeqCst);
    let requests = receiver.wait_for(ROWS as usize + failures + 1, Duration::from_secs(60)).await;
    let second_probe = requests[failures + 1].received_at;
    assert!(
        second_probe.duration_since(probe) >= Duration::from_millis(1500),
        "the second probe came {:?} after the first",
        second_probe.duration_since(probe)
    );
    let next = requests[failures + 2].received_at;
    assert!(
        next.duration_since(second_probe) >= HOLD,
        "a second request went out {:?} after the probe, before the probe's answer (held {HOLD:?})",
        next.duration_since(second_probe)
    );
    let after_close: Vec<Instant> = requests[failures + 2..].iter().map(|request| request.received_at).collect();
    let concurrent = busiest_window(&after_close, HOLD);
    assert!(
        (2..=4).contains(&concurrent),
        "{concurrent} requests at once after the circuit closed (max_in_flight 4): the probe's solitude must be the \
         breaker's doing, not a limit on concurrency"
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
    // Retries were spent by the failed attempts only, never by the waiting while open.
    assert_eq!(
        db.count("SELECT COALESCE(sum(retry_count), 0) FROM hookfleet.delivery_queue").await as usize,
        failures + 1
    );
    assert_eq!(receiver.requests().len(), ROWS as usize + failures + 1);
    eprintln!(
        "breaker: opened after {failures} failures; probes {:?} and {:?} after opening; the next request {:?} after \
         the second probe; then {concurrent} at once; all {ROWS} delivered",
        probe.duration_since(opened_at),
        second_probe.duration_since(opened_at),
        next.duration_since(second_probe)
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

    // The hanging webhook's attempts in flight, per worker, sampled while the healthy one flows.
    let hanging_per_worker = format!(
        "SELECT COALESCE(max(n), 0) FROM (SELECT count(*) AS n FROM hookfleet.delivery_queue \
         WHERE webhook_id = {} AND delivery_status = 'in_flight' GROUP BY locked_by) per_worker",
        slow.webhook_id
    );
    let mut most_hanging = 0;
    let mut latencies = Vec::new();
    for n in 0..20 {
        most_hanging = most_hanging.max(db.count(&hanging_per_worker).await);
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
    let (median, max) = (latencies[latencies.len() / 2], latencies[latencies.len() - 1]);
    eprintln!(
        "healthy webhook next to a hanging one ({} requests held, at most {most_hanging} per worker at once), a 1/s \
         one ({limited_sent} sent) and an open circuit ({} failures): p50 {median:?}, max {max:?}",
        hanging.requests().len(),
        failing.requests().len(),
    );
    // Waiting behind any of them would cost seconds (the hanging webhook's 5 s timeout, the 1/s
    // limit, the open period); a median in milliseconds and a max well under the timeout say
    // that nothing waited, with room for a loaded machine.
    assert!(median < Duration::from_millis(500), "latencies {latencies:?}");
    assert!(max < Duration::from_secs(3), "latencies {latencies:?}");
    // The hanging webhook holds no more than its share of each worker's slots (half of 64).
    assert!((1..=32).contains(&most_hanging), "{most_hanging} hanging attempts in flight on one worker");
}
