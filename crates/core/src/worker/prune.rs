//! Pruning, in bounded batches so that no run holds locks for long: settled deliveries past
//! `HOOKFLEET_DELIVERY_RETENTION` (dead ones past `HOOKFLEET_DEAD_RETENTION`), so the queue table
//! does not grow forever; attempt rows older than `HOOKFLEET_ATTEMPT_RETENTION`; registry rows of
//! workers that vanished without deregistering (killed). Every worker runs it; SKIP LOCKED keeps
//! them out of each other's way.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{run_every, WorkerSettings};
use crate::queue::Queue;

const PRUNE_INTERVAL: Duration = Duration::from_secs(60);
const PRUNE_BATCH: u32 = 10_000;
/// Batches of settled deliveries per run: up to 100,000 rows a minute per worker, enough to keep up
/// with several thousand deliveries a second, without one run holding the database for long.
const DELIVERY_BATCHES_PER_RUN: u32 = 10;
/// A worker silent this long is gone (v_workers already hides it after a minute).
const WORKER_SILENCE: Duration = Duration::from_secs(3600);

pub(super) async fn run(queue: Queue, settings: Arc<WorkerSettings>, shutdown: CancellationToken) {
    run_every("prune", PRUNE_INTERVAL, shutdown, || {
        let (queue, settings) = (&queue, &settings);
        async move {
            let mut pruned = 0;
            for _ in 0..DELIVERY_BATCHES_PER_RUN {
                match queue.prune_deliveries(settings.delivery_retention, settings.dead_retention, PRUNE_BATCH).await {
                    Ok(rows) => {
                        pruned += rows;
                        if rows < u64::from(PRUNE_BATCH) {
                            break;
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "delivery pruning failed");
                        break;
                    }
                }
            }
            if pruned > 0 {
                tracing::info!(pruned, "pruned settled deliveries past their retention");
            }
            match queue.prune_attempts(settings.attempt_retention, PRUNE_BATCH).await {
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
