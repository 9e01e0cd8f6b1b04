-- One current definition, re-applied by `hookfleet migrate` when this file changes
-- (see sql/README.md). Edit it in place; never in a migration.

-- Counts deliveries by status (all five statuses, zeros included).
CREATE OR REPLACE FUNCTION hookfleet.count_pending_by_status()
RETURNS TABLE (delivery_status text, deliveries bigint)
LANGUAGE sql STABLE AS $$
    SELECT s.status, COALESCE(c.n, 0)
    FROM unnest(ARRAY['pending', 'in_flight', 'delivered', 'dead', 'cancelled']) AS s(status)
    LEFT JOIN (SELECT q.delivery_status, count(*) AS n FROM hookfleet.delivery_queue q GROUP BY 1) c
           ON c.delivery_status = s.status
$$;
COMMENT ON FUNCTION hookfleet.count_pending_by_status() IS 'Number of deliveries in each delivery_status';
