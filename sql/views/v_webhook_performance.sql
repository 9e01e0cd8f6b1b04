-- One current definition, re-applied by `hookfleet migrate` when this file changes
-- (see sql/README.md). Edit it in place; never in a migration.

-- Latency percentiles and throughput per webhook over the last 5 minutes and the last hour.
CREATE OR REPLACE VIEW hookfleet.v_webhook_performance AS
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
