//! Pruning: deletes `delivery_attempts` rows older than `HOOKFLEET_ATTEMPT_RETENTION`, in
//! bounded batches so that no run holds locks for long, and registry rows of workers that
//! vanished without deregistering (killed).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::run_every;
use crate::queue::Queue;

const PRUNE_INTERVAL: Duration = Duration::from_secs(60);
const PRUNE_BATCH: u32 = 10_000;
/// A worker silent this long is gone (v_workers already hides it after a minute).
const WORKER_SILENCE: Duration = Duration::from_secs(3600);

pub(super) async fn run(queue: Queue, retention: Duration, shutdown: CancellationToken) {
    run_every("prune", PRUNE_INTERVAL, shutdown, || {
        let queue = &queue;
        async move {
            match queue.prune_attempts(retention, PRUNE_BATCH).await {
                Ok(0) => {}
                Ok(pruned) => tracing::info!(pruned, "pruned old delivery attempts"),
                Err(error) => tracing::warn!(%error, "attempt pruning failed"),
            }
            if let Err(error) = queue.prune_workers(WORKER_SILENCE).await {
                tracing::warn!(%error, "worker registry pruning failed");
            }
        }
    })
    .await;
}
