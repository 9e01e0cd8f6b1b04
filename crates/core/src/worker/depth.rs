//! Queue-depth sampler: one query on a timer feeds `webhook_queue_depth{status}` and
//! `webhook_queue_oldest_due_age_seconds`, rather than one query per scrape. Every worker asks,
//! but `hookfleet.sample_queue_depth` counts at most once per interval for the whole fleet; the
//! other workers read that sample.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::run_every;
use crate::metrics::Metrics;
use crate::queue::Queue;

const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

pub(super) async fn run(queue: Queue, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    run_every("depth", SAMPLE_INTERVAL, shutdown, || {
        let (queue, metrics) = (&queue, &metrics);
        async move {
            match queue.depth(SAMPLE_INTERVAL.mul_f64(0.8)).await {
                Ok(depth) => {
                    for (status, count) in &depth.by_status {
                        metrics.queue_depth.with_label_values(&[status]).set(*count);
                    }
                    metrics.queue_oldest_due_age_seconds.set(depth.oldest_due_age.as_secs_f64());
                }
                Err(error) => {
                    metrics.database_errors_total.with_label_values(&["depth"]).inc();
                    tracing::debug!(%error, "queue depth sample failed");
                }
            }
        }
    })
    .await;
}
