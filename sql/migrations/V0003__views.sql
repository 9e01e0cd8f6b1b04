-- hookfleet dashboard views, for psql and for `hookfleet status`.

-- The circuit state as the claim sees it: an open circuit whose timeout has passed admits a probe.
CREATE VIEW hookfleet.v_webhook_health_dashboard AS
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

CREATE VIEW hookfleet.v_degraded_webhooks AS
SELECT * FROM hookfleet.v_webhook_health_dashboard
WHERE health_status <> 'healthy' OR circuit_state <> 'closed';
COMMENT ON VIEW hookfleet.v_degraded_webhooks IS 'Only the webhooks that are degraded, unavailable, or whose circuit is not closed';

-- Latency percentiles and throughput per webhook over the last 5 minutes and the last hour.
CREATE VIEW hookfleet.v_webhook_performance AS
SELECT a.webhook_id,
       win.window_name,
       count(*) AS attempts,
       count(*) FILTER (WHERE a.status_code BETWEEN 200 AND 299) AS successes,
       round((count(*) FILTER (WHERE a.status_code BETWEEN 200 AND 299))::numeric
             / extract(epoch FROM win.span)::numeric, 2) AS delivered_per_second,
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY a.duration_ms)::numeric, 1) AS p50_ms,
       round(percentile_cont(0.95) WITHIN GROUP (ORDER BY a.duration_ms)::numeric, 1) AS p95_ms,
       round(percentile_cont(0.99) WITHIN GROUP (ORDER BY a.duration_ms)::numeric, 1) AS p99_ms,
       round(max(a.duration_ms)::numeric, 1) AS max_ms
FROM (VALUES ('5m', interval '5 minutes'), ('1h', interval '1 hour')) AS win(window_name, span)
JOIN hookfleet.delivery_attempts a ON a.started_at > now() - win.span
GROUP BY a.webhook_id, win.window_name, win.span;
COMMENT ON VIEW hookfleet.v_webhook_performance IS 'Per-webhook attempt latency percentiles (ms) and delivered/s over the last 5 minutes and hour';

CREATE VIEW hookfleet.v_queue_depth AS
SELECT c.delivery_status,
       c.deliveries,
       CASE WHEN c.delivery_status = 'pending' THEN
           (SELECT extract(epoch FROM now() - min(q.next_attempt_at))
              FROM hookfleet.delivery_queue q
             WHERE q.delivery_status = 'pending' AND q.next_attempt_at <= now())
       END AS oldest_due_age_seconds
FROM hookfleet.count_pending_by_status() c;
COMMENT ON VIEW hookfleet.v_queue_depth IS 'Deliveries per status, and for pending the age in seconds of the oldest due row';

CREATE VIEW hookfleet.v_workers AS
SELECT worker_id, host, pid, version, started_at, last_seen_at, in_flight,
       round(extract(epoch FROM now() - last_seen_at)::numeric, 1) AS seconds_since_heartbeat
FROM hookfleet.workers
WHERE last_seen_at > now() - interval '1 minute'
ORDER BY worker_id;
COMMENT ON VIEW hookfleet.v_workers IS 'Workers that heartbeated within the last minute';
