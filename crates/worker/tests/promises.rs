//! README promises proven on the real `hookfleet-worker`, end to end:
//! - "Metrics and probes": `/readyz` answers non-200 and `worker_health_status` reads 0 while the
//!   database is down, 200 and 1 once it is back.
//!
//! Tests that stop PostgreSQL take [`GATE`] exclusively; every other test of this binary holds it
//! shared, so that no test meets an outage it did not cause.

use std::path::Path;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use hookfleet_core::pg_embedded::EmbeddedPostgres;
use hookfleet_test_support::{cluster, database, eventually, metric_value, WorkerProcess};

const DEADLINE: Duration = Duration::from_secs(30);

/// Shared by every test, exclusive for a test that stops the test server.
static GATE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

fn worker_binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_hookfleet-worker"))
}

/// Waits until the worker's `/metrics` satisfies `check`; the exposition then. On timeout the
/// panic shows the last exposition.
async fn metrics_until(worker: &WorkerProcess, what: &str, check: impl Fn(&str) -> bool) -> String {
    let until = std::time::Instant::now() + DEADLINE;
    let mut last = String::new();
    loop {
        if let Some((_, body)) = worker.get("/metrics").await {
            if check(&body) {
                return body;
            }
            last = body;
        }
        assert!(std::time::Instant::now() < until, "timed out waiting for {what}; last /metrics:\n{last}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The test server, stopped (fast shutdown) until [`Outage::end`] or drop, panics included, so a
/// failing assert never leaves the other tests of this binary without a database.
struct Outage {
    server: &'static Mutex<EmbeddedPostgres>,
    down: bool,
}

impl Outage {
    async fn begin() -> Self {
        let server = cluster().embedded().expect(
            "this test stops PostgreSQL: run it without HOOKFLEET_TEST_DATABASE_URL, on the server the harness starts",
        );
        tokio::task::spawn_blocking(move || {
            server.lock().unwrap_or_else(PoisonError::into_inner).stop_server().expect("stop PostgreSQL")
        })
        .await
        .expect("join the stop");
        Self { server, down: true }
    }

    async fn end(mut self) {
        let server = self.server;
        tokio::task::spawn_blocking(move || {
            server.lock().unwrap_or_else(PoisonError::into_inner).start_again().expect("start PostgreSQL again")
        })
        .await
        .expect("join the start");
        self.down = false;
    }
}

impl Drop for Outage {
    fn drop(&mut self) {
        if self.down {
            let _ = self.server.lock().unwrap_or_else(PoisonError::into_inner).start_again();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_and_worker_health_status_follow_the_database_down_and_back() {
    let _exclusive = GATE.write().await;
    let db = database().await;
    let worker = WorkerProcess::spawn(worker_binary(), &db, "w-outage", &[]);
    let health = "worker_health_status{worker_id=\"w-outage\"}";
    eventually(DEADLINE, "/readyz 200 with the database up", || async {
        (worker.get("/readyz").await?.0 == 200).then_some(())
    })
    .await;
    metrics_until(&worker, "health 1 with the database up", |body| metric_value(body, health) == Some(1.0)).await;

    let outage = Outage::begin().await;
    let status = eventually(DEADLINE, "/readyz to refuse while the database is down", || async {
        let (status, _) = worker.get("/readyz").await?;
        (status != 200).then_some(status)
    })
    .await;
    assert_eq!(status, 503, "readiness says unavailable");
    metrics_until(&worker, "health 0 while the database is down", |body| metric_value(body, health) == Some(0.0)).await;
    // Still alive: liveness does not depend on the database.
    assert_eq!(worker.get("/healthz").await.map(|(status, _)| status), Some(200));
    // And still not ready: the refusal was not a passing blip.
    assert_ne!(worker.get("/readyz").await.map(|(status, _)| status), Some(200));

    outage.end().await;
    eventually(DEADLINE, "/readyz 200 once the database is back", || async {
        (worker.get("/readyz").await?.0 == 200).then_some(())
    })
    .await;
    metrics_until(&worker, "health 1 once the database is back", |body| metric_value(body, health) == Some(1.0)).await;
}
