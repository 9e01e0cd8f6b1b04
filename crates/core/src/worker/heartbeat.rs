//! Heartbeat service: keeps this worker's row in `hookfleet.workers` fresh (the fleet sizes
//! rate-limit shares from it) and reports `worker_health_status`.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::{run_every, WorkerSettings};
use crate::metrics::Metrics;
use crate::queue::Queue;

pub(super) async fn run(
    queue: Queue,
    settings: Arc<WorkerSettings>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let identity = settings.identity.clone();
    let health = metrics.worker_health_status.with_label_values(&[&identity.worker_id]);
    run_every("heartbeat", settings.heartbeat_interval, shutdown, || {
        let (queue, identity, health, metrics) = (&queue, &identity, &health, &metrics);
        async move {
            let in_flight = u32::try_from(metrics.worker_in_flight.get()).unwrap_or(0);
            match queue.heartbeat(identity, in_flight).await {
                Ok(()) => health.set(1),
                Err(error) => {
                    health.set(0);
                    metrics.database_errors_total.with_label_values(&["heartbeat"]).inc();
                    tracing::warn!(%error, "heartbeat failed");
                }
            }
        }
    })
    .await;
}
