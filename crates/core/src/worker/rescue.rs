//! Rescue service: returns rows whose lease expired (their worker died or stalled) to `pending`.
//! An expired lease is not a try (the worker may have died before attempting anything); a row
//! whose lease expired [`MAX_LEASE_EXPIRIES`] times, a message that kills or stalls every worker
//! that takes it, ends `dead` with the reason. Every worker runs it; SKIP LOCKED keeps them from
//! waiting on each other.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{run_every, WorkerSettings};
use crate::metrics::Metrics;
use crate::queue::Queue;

const RESCUE_BATCH: u32 = 1000;
/// Lease expiries after which a row is dead rather than pending again.
pub const MAX_LEASE_EXPIRIES: u32 = 5;

pub(super) async fn run(
    queue: Queue,
    settings: Arc<WorkerSettings>,
    metrics: Arc<Metrics>,
    writes_failing: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    // A quarter of the lease bounds how late past expiry a row comes back.
    let interval = (settings.lease / 4).clamp(Duration::from_millis(250), Duration::from_secs(15));
    run_every("rescue", interval, shutdown, || {
        let (queue, metrics, writes_failing) = (&queue, &metrics, &writes_failing);
        async move {
            // This worker's results waiting for the database may be those of rows whose lease
            // expired during the outage: they settle their rows when written, and rescuing the
            // rows first would have them claimed and sent again.
            if writes_failing.load(Ordering::Acquire) {
                return;
            }
            match queue.rescue_expired(RESCUE_BATCH, MAX_LEASE_EXPIRIES).await {
                Ok(0) => {}
                Ok(rescued) => tracing::info!(
                    rescued,
                    "returned deliveries with expired leases to pending (dead after {MAX_LEASE_EXPIRIES} expiries)"
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
