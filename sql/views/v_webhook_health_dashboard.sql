-- One current definition, re-applied by `hookfleet migrate` when this file changes
-- (see sql/README.md). Edit it in place; never in a migration.

-- The circuit state as the claim sees it: an open circuit whose timeout has passed admits a probe.
CREATE OR REPLACE VIEW hookfleet.v_webhook_health_dashboard AS
SELECT w.webhook_id,
       w.name,
       w.enabled,
       COALESCE(h.health_status, 'healthy') AS health_status,
       CASE WHEN h.circuit_state = 'open' AND h.circuit_open_until <= now() THEN 'half_open'
            ELSE COALESCE(h.circuit_state, 'closed') END AS circuit_state,
       COALESCE(h.total_attempts, 0) AS total_attempts,
       COALESCE(h.successful_attempts, 0) AS successful_attempts,
       COALESCE(h.failed_attempts, 0) AS failed_attempts,
       COALESCE(h.consecutive_failures, 0) AS consecutive_failures,
       round((COALESCE(h.success_rate, 1.0) * 100)::numeric, 1) AS success_rate_pct,
       round(h.avg_response_time_ms::numeric, 1) AS avg_response_time_ms,
       (SELECT count(*) FROM hookfleet.delivery_queue q
         WHERE q.webhook_id = w.webhook_id AND q.delivery_status = 'pending') AS pending,
       (SELECT count(*) FROM hookfleet.delivery_queue q
         WHERE q.webhook_id = w.webhook_id AND q.delivery_status = 'in_flight') AS in_flight,
       h.last_success_at,
       h.last_failure_at,
       h.last_status_code,
       h.last_error,
       h.circuit_open_until
FROM hookfleet.webhooks w
LEFT JOIN hookfleet.webhook_health_metrics h ON h.webhook_id = w.webhook_id;
COMMENT ON VIEW hookfleet.v_webhook_health_dashboard IS 'One row per webhook: health, circuit, success rate, latency, pending and in-flight rows';
