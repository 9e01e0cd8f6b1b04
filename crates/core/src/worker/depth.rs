//! Fleet-wide samples, one query each on a timer rather than one per scrape:
//! - the queue depth feeds `webhook_queue_depth{status}` and `webhook_queue_oldest_due_age_seconds`.
//!   Every worker asks, but `hookfleet.sample_queue_depth` counts at most once per interval for
//!   the whole fleet; the other workers read that sample.
//! - the circuits feed `webhook_circuit_state{webhook_id}` from the health rows, which every
//!   worker's write-backs and claims keep, so every worker reports the same state for a webhook
//!   (within one interval), whichever worker opened or closed its circuit. A webhook whose circuit
//!   is closed reads 0 for [`CLOSED_KEPT`] after it closed, then its series goes: the gauge's
//!   series are bounded by the webhooks in trouble, not by every webhook ever seen.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::run_every;
use crate::metrics::Metrics;
use crate::queue::Queue;

const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);
/// How long a circuit that closed keeps reporting 0 before its series is removed: long enough for
/// dashboards and `max_over_time` alerts to see it close.
const CLOSED_KEPT: Duration = Duration::from_secs(15 * 60);

/// `webhook_circuit_state` values.
const CIRCUIT_CLOSED: i64 = 0;
const CIRCUIT_OPEN: i64 = 1;
const CIRCUIT_HALF_OPEN: i64 = 2;

pub(super) async fn run(queue: Queue, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    // Webhooks this worker exports a circuit for, and since when each one reads closed.
    let circuits: std::sync::Mutex<HashMap<i64, Option<Instant>>> = std::sync::Mutex::default();
    run_every("depth", SAMPLE_INTERVAL, shutdown, || {
        let (queue, metrics) = (&queue, &metrics);
        let circuits = &circuits;
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
            match queue.open_circuits().await {
                Ok(open) => {
                    let mut circuits = circuits.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    export_circuits(metrics, &mut circuits, &open, Instant::now());
                }
                Err(error) => {
                    metrics.database_errors_total.with_label_values(&["circuits"]).inc();
                    tracing::debug!(%error, "circuit sample failed");
                }
            }
        }
    })
    .await;
}

/// Sets `webhook_circuit_state` from one sample of the circuits that are not closed.
fn export_circuits(
    metrics: &Metrics,
    circuits: &mut HashMap<i64, Option<Instant>>,
    not_closed: &[(i64, String)],
    now: Instant,
) {
    let mut seen = std::collections::HashSet::with_capacity(not_closed.len());
    for (webhook_id, state) in not_closed {
        let value = if state == "half_open" { CIRCUIT_HALF_OPEN } else { CIRCUIT_OPEN };
        metrics.circuit_state.with_label_values(&[&webhook_id.to_string()]).set(value);
        if !matches!(circuits.insert(*webhook_id, None), Some(None)) {
            tracing::warn!(webhook_id, "webhook's circuit is open: its deliveries wait until a probe succeeds");
        }
        seen.insert(*webhook_id);
    }
    circuits.retain(|webhook_id, closed_since| {
        if seen.contains(webhook_id) {
            return true;
        }
        let label = webhook_id.to_string();
        match closed_since {
            None => {
                tracing::info!(webhook_id, "webhook's circuit closed");
                metrics.circuit_state.with_label_values(&[&label]).set(CIRCUIT_CLOSED);
                *closed_since = Some(now);
                true
            }
            Some(since) if now.saturating_duration_since(*since) < CLOSED_KEPT => true,
            Some(_) => {
                let _ = metrics.circuit_state.remove_label_values(&[&label]);
                false
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exported(metrics: &Metrics) -> Vec<String> {
        metrics.render().lines().filter(|line| line.starts_with("webhook_circuit_state{")).map(str::to_owned).collect()
    }

    #[test]
    fn circuits_follow_the_fleet_sample_and_closed_ones_go_after_a_while() {
        let metrics = Metrics::new().unwrap();
        let mut circuits = HashMap::new();
        let start = Instant::now();
        export_circuits(&metrics, &mut circuits, &[(7, "open".into()), (8, "half_open".into())], start);
        assert_eq!(
            exported(&metrics),
            ["webhook_circuit_state{webhook_id=\"7\"} 1", "webhook_circuit_state{webhook_id=\"8\"} 2"]
        );
        // Another worker closed 7's circuit: this worker reports it closed without writing for it.
        export_circuits(&metrics, &mut circuits, &[(8, "open".into())], start + SAMPLE_INTERVAL);
        assert_eq!(
            exported(&metrics),
            ["webhook_circuit_state{webhook_id=\"7\"} 0", "webhook_circuit_state{webhook_id=\"8\"} 1"]
        );
        export_circuits(&metrics, &mut circuits, &[(8, "open".into())], start + CLOSED_KEPT);
        assert_eq!(
            exported(&metrics),
            ["webhook_circuit_state{webhook_id=\"7\"} 0", "webhook_circuit_state{webhook_id=\"8\"} 1"]
        );
        export_circuits(&metrics, &mut circuits, &[], start + SAMPLE_INTERVAL * 2 + CLOSED_KEPT);
        assert_eq!(exported(&metrics), ["webhook_circuit_state{webhook_id=\"8\"} 0"]);
        // Opening again brings the series back.
        export_circuits(&metrics, &mut circuits, &[(7, "open".into())], start + CLOSED_KEPT * 3);
        assert_eq!(exported(&metrics), ["webhook_circuit_state{webhook_id=\"7\"} 1"]);
        assert_eq!(circuits.len(), 1);
    }
}
