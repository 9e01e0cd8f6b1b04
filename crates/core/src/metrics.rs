//! The Prometheus metrics of SPEC §7 in one registry per process, and the small HTTP server that
//! exposes them with `/healthz` (the process is alive) and `/readyz` (the database answers).
//!
//! `webhook_id` labels are bounded by the number of webhooks; message and delivery ids never
//! become labels.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{
    exponential_buckets, Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio_util::sync::CancellationToken;

/// All metrics a process exports. Cheap to clone handles are taken from it by the hot path.
pub struct Metrics {
    registry: Registry,
    /// `webhook_deliveries_total{status,webhook_id}`: attempts by outcome (`delivered`, `retry`, `dead`).
    pub deliveries_total: IntCounterVec,
    pub delivery_duration_seconds: HistogramVec,
    pub queue_depth: IntGaugeVec,
    pub queue_oldest_due_age_seconds: Gauge,
    pub retries_total: IntCounterVec,
    pub rate_limited_total: IntCounterVec,
    /// 0 closed, 1 open, 2 half-open.
    pub circuit_state: IntGaugeVec,
    pub worker_health_status: IntGaugeVec,
    pub worker_in_flight: IntGauge,
    /// Attempt slots taken: attempts in flight plus finished ones whose result is not written back
    /// yet. At `HOOKFLEET_MAX_IN_FLIGHT` with few in flight, write-backs are stalling claims.
    pub worker_slots_held: IntGauge,
    pub claim_duration_seconds: Histogram,
    pub lease_lost_total: IntCounter,
    pub database_errors_total: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let deliveries_total = IntCounterVec::new(
            Opts::new("webhook_deliveries_total", "Delivery attempts by outcome (delivered, retry, dead)"),
            &["status", "webhook_id"],
        )?;
        // 5 ms .. ~328 s: from loopback receivers up to the longest attempt allowed (HTTP_TIMEOUT
        // and a webhook's timeout_ms both stop at 5 minutes), so no attempt lands only in +Inf.
        let delivery_duration_seconds = HistogramVec::new(
            HistogramOpts::new("webhook_delivery_duration_seconds", "Duration of one delivery attempt")
                .buckets(exponential_buckets(0.005, 2.0, 17)?),
            &["webhook_id"],
        )?;
        let queue_depth =
            IntGaugeVec::new(Opts::new("webhook_queue_depth", "Deliveries in the queue by status"), &["status"])?;
        let queue_oldest_due_age_seconds = Gauge::new(
            "webhook_queue_oldest_due_age_seconds",
            "Age of the oldest pending delivery that is due (0 when none)",
        )?;
        let retries_total = IntCounterVec::new(
            Opts::new("webhook_retries_total", "Failed attempts scheduled for a retry"),
            &["webhook_id"],
        )?;
        let rate_limited_total = IntCounterVec::new(
            Opts::new(
                "webhook_rate_limited_total",
                "Claims that held a webhook's due deliveries back because its fleet-wide rate limit was spent",
            ),
            &["webhook_id"],
        )?;
        let circuit_state = IntGaugeVec::new(
            Opts::new("webhook_circuit_state", "Circuit breaker state: 0 closed, 1 open, 2 half-open"),
            &["webhook_id"],
        )?;
        let worker_health_status = IntGaugeVec::new(
            Opts::new("worker_health_status", "1 when this worker's last heartbeat reached the database"),
            &["worker_id"],
        )?;
        let worker_in_flight = IntGauge::new("worker_in_flight", "Attempts this worker has in flight")?;
        let worker_slots_held = IntGauge::new(
            "worker_slots_held",
            "Attempt slots taken: attempts in flight plus finished attempts whose result is not written back yet",
        )?;
        let claim_duration_seconds = Histogram::with_opts(
            HistogramOpts::new("webhook_claim_duration_seconds", "Duration of one claim query")
                .buckets(exponential_buckets(0.0005, 2.0, 14)?),
        )?;
        let lease_lost_total = IntCounter::new(
            "webhook_lease_lost_total",
            "Write-backs that matched no row: the lease had expired and another worker took the row",
        )?;
        let database_errors_total = IntCounterVec::new(
            Opts::new("hookfleet_database_errors_total", "Failed database operations by operation"),
            &["operation"],
        )?;
        let build_info = IntGaugeVec::new(Opts::new("hookfleet_build_info", "Build information"), &["version"])?;
        build_info.with_label_values(&[crate::VERSION]).set(1);

        registry.register(Box::new(deliveries_total.clone()))?;
        registry.register(Box::new(delivery_duration_seconds.clone()))?;
        registry.register(Box::new(queue_depth.clone()))?;
        registry.register(Box::new(queue_oldest_due_age_seconds.clone()))?;
        registry.register(Box::new(retries_total.clone()))?;
        registry.register(Box::new(rate_limited_total.clone()))?;
        registry.register(Box::new(circuit_state.clone()))?;
        registry.register(Box::new(worker_health_status.clone()))?;
        registry.register(Box::new(worker_in_flight.clone()))?;
        registry.register(Box::new(worker_slots_held.clone()))?;
        registry.register(Box::new(claim_duration_seconds.clone()))?;
        registry.register(Box::new(lease_lost_total.clone()))?;
        registry.register(Box::new(database_errors_total.clone()))?;
        registry.register(Box::new(build_info))?;
        registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        Ok(Self {
            registry,
            deliveries_total,
            delivery_duration_seconds,
            queue_depth,
            queue_oldest_due_age_seconds,
            retries_total,
            rate_limited_total,
            circuit_state,
            worker_health_status,
            worker_in_flight,
            worker_slots_held,
            claim_duration_seconds,
            lease_lost_total,
            database_errors_total,
        })
    }

    /// Drops every series of one webhook this process exports (deleted, or idle for long), so that
    /// months of webhooks coming and going do not grow the exposition without bound.
    pub fn remove_webhook(&self, webhook_id: i64) {
        let label = webhook_id.to_string();
        for status in ["delivered", "retry", "dead"] {
            let _ = self.deliveries_total.remove_label_values(&[status, &label]);
        }
        let _ = self.delivery_duration_seconds.remove_label_values(&[&label]);
        let _ = self.retries_total.remove_label_values(&[&label]);
        let _ = self.rate_limited_total.remove_label_values(&[&label]);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families, and ours are built above.
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::warn!(%error, "cannot encode metrics");
        }
        String::from_utf8_lossy(&buffer).into_owned()
    }
}

/// Answers whether the process is ready (e.g. the database answers).
pub type ReadinessCheck = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

#[derive(Clone)]
struct ServerState {
    metrics: Arc<Metrics>,
    ready: ReadinessCheck,
}

/// The routes `/metrics`, `/healthz` and `/readyz`, to serve alone (worker) or merge (API).
pub fn router(metrics: Arc<Metrics>, ready: ReadinessCheck) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readiness))
        .with_state(ServerState { metrics, ready })
}

async fn render_metrics(State(state): State<ServerState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
}

async fn readiness(State(state): State<ServerState>) -> impl IntoResponse {
    match tokio::time::timeout(Duration::from_secs(2), (state.ready)()).await {
        Ok(true) => (StatusCode::OK, "ready\n"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "database unreachable\n"),
    }
}

/// Binds `addr` and serves `router` until `shutdown` fires. Returns the bound address (port 0
/// picks a free port) and the server task.
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        axum::serve(listener, router).with_graceful_shutdown(async move { shutdown.cancelled().await }).await
    });
    Ok((bound, task))
}

/// One webhook's series, looked up once per worker and webhook rather than once per delivery
/// (a label lookup takes a lock and formats the id).
pub struct WebhookMetrics {
    delivered: IntCounter,
    retry: IntCounter,
    dead: IntCounter,
    retries: IntCounter,
    duration: Histogram,
}

impl WebhookMetrics {
    pub fn new(metrics: &Metrics, webhook_id: i64) -> Self {
        let label = webhook_id.to_string();
        Self {
            delivered: metrics.deliveries_total.with_label_values(&["delivered", &label]),
            retry: metrics.deliveries_total.with_label_values(&["retry", &label]),
            dead: metrics.deliveries_total.with_label_values(&["dead", &label]),
            retries: metrics.retries_total.with_label_values(&[&label]),
            duration: metrics.delivery_duration_seconds.with_label_values(&[&label]),
        }
    }

    /// Counts one attempt with its outcome (`delivered`, `retry` or `dead`) and duration.
    pub fn attempt(&self, outcome: crate::queue::Outcome, duration: Duration) {
        use crate::queue::Outcome;
        match outcome {
            Outcome::Delivered => self.delivered.inc(),
            Outcome::Retry => {
                self.retry.inc();
                self.retries.inc();
            }
            Outcome::Dead => self.dead.inc(),
        }
        self.duration.observe(duration.as_secs_f64());
    }
}
