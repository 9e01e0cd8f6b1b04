//! Attempt pruning: deletes `delivery_attempts` rows older than `HOOKFLEET_ATTEMPT_RETENTION`,
//! in bounded batches so that no run holds locks for long.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::run_every;
use crate::queue::Queue;

const PRUNE_INTERVAL: Duration = Duration::from_secs(60);
const PRUNE_BATCH: u32 = 10_000;

pub(super) async fn run(queue: Queue, retention: Duration, shutdown: CancellationToken) {
    run_every("prune", PRUNE_INTERVAL, shutdown, || {
        let queue = &queue;
        async move {
            match queue.prune_attempts(retention, PRUNE_BATCH).await {
                Ok(0) => {}
                Ok(pruned) => tracing::info!(pruned, "pruned old delivery attempts"),
                Err(error) => tracing::warn!(%error, "attempt pruning failed"),
            }
        }
    })
    .await;
}
