-- One current definition, re-applied by `hookfleet migrate` when this file changes
-- (see sql/README.md). Edit it in place; never in a migration.

CREATE OR REPLACE VIEW hookfleet.v_queue_depth AS
SELECT c.delivery_status,
       c.deliveries,
       CASE WHEN c.delivery_status = 'pending' THEN
           (SELECT extract(epoch FROM now() - min(q.next_attempt_at))
              FROM hookfleet.delivery_queue q
             WHERE q.delivery_status = 'pending' AND q.next_attempt_at <= now())
       END AS oldest_due_age_seconds
FROM hookfleet.count_pending_by_status() c;
COMMENT ON VIEW hookfleet.v_queue_depth IS 'Deliveries per status, and for pending the age in seconds of the oldest due row';
