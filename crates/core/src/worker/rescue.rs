//! Rescue service: returns rows whose lease expired (their worker died) to `pending`. Every
//! worker runs it; SKIP LOCKED keeps them from waiting on each other.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{run_every, WorkerSettings};
use crate::metrics::Metrics;
use crate::queue::Queue;

const RESCUE_BATCH: u32 = 1000;

pub(super) async fn run(
    queue: Queue,
    settings: Arc<WorkerSettings>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    // A quarter of the lease bounds how late past expiry a row comes back.
    let interval = (settings.lease / 4).clamp(Duration::from_millis(250), Duration::from_secs(15));
    let default_max_retries = settings.default_max_retries;
    run_every("rescue", interval, shutdown, || {
        let (queue, metrics) = (&queue, &metrics);
        async move {
            match queue.rescue_expired(RESCUE_BATCH, default_max_retries).await {
                Ok(0) => {}
                Ok(rescued) => tracing::info!(
                    rescued,
                    "returned deliveries with expired leases to pending (or dead when that was their last try)"
                ),
                Err(error) => {
                    metrics.database_errors_total.with_label_values(&["rescue"]).inc();
                    tracing::warn!(%error, "lease rescue failed");
                }
            }
        }
    })
    .await;
}
