-- Give back every row worker $1 still holds in flight: pending again, due as before. Used at
-- graceful shutdown, after in-flight attempts were written back, so only unattempted or
-- abandoned rows remain.
UPDATE hookfleet.delivery_queue
SET delivery_status = 'pending', locked_by = NULL, locked_until = NULL
WHERE locked_by = $1::text
  AND delivery_status = 'in_flight'
