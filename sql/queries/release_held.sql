-- Give back every row worker $1 still holds in flight, except $2: pending again, due as before.
-- Used at graceful shutdown, after in-flight attempts were written back. $2 lists the attempts that
-- finished but whose results could not be written in time: they were sent, so they must not be
-- made pending here (that would send them again at once, and fence off their result should its
-- write still land); their lease brings them back if it never does.
UPDATE hookfleet.delivery_queue
SET delivery_status = 'pending', locked_by = NULL, locked_until = NULL
WHERE locked_by = $1::text
  AND delivery_status = 'in_flight'
  AND delivery_id <> ALL ($2::bigint[])
