-- Deliveries per status and, on the pending row, the age in seconds of the oldest due row.
SELECT delivery_status, deliveries, oldest_due_age_seconds::float8
FROM hookfleet.v_queue_depth
