-- One current definition, re-applied by `hookfleet migrate` when this file changes
-- (see sql/README.md). Edit it in place; never in a migration.

CREATE OR REPLACE VIEW hookfleet.v_degraded_webhooks AS
SELECT * FROM hookfleet.v_webhook_health_dashboard
WHERE health_status <> 'healthy' OR circuit_state <> 'closed';
COMMENT ON VIEW hookfleet.v_degraded_webhooks IS 'Only the webhooks that are degraded, unavailable, or whose circuit is not closed';
