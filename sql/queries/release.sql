-- Give back rows $2 that worker $1 claimed but did not attempt: pending again, due as before.
UPDATE hookfleet.delivery_queue
SET delivery_status = 'pending', locked_by = NULL, locked_until = NULL
WHERE delivery_id = ANY ($2::bigint[])
  AND locked_by = $1::text
  AND delivery_status = 'in_flight'
