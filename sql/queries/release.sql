-- Give back rows that worker $1 claimed but did not attempt: pending again, due as before. Each
-- of $2 is fenced on its claim's locked_until ($3): a release that comes late must not undo a
-- later claim of the row.
UPDATE hookfleet.delivery_queue q
SET delivery_status = 'pending', locked_by = NULL, locked_until = NULL
FROM unnest($2::bigint[], $3::timestamptz[]) AS r(delivery_id, locked_until)
WHERE q.delivery_id = r.delivery_id
  AND q.locked_until = r.locked_until
  AND q.locked_by = $1::text
  AND q.delivery_status = 'in_flight'
