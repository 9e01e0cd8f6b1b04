-- delivery_queue_due_idx (claim order over every webhook) and delivery_queue_webhook_due_idx (one
-- webhook's rows in claim order) both cover every pending row, so a statement about one webhook's
-- due rows at one priority (the claim's take, has_due_delivery) could be served by either. With
-- statistics taken while the queue was empty both look like one page, and the planner took
-- delivery_queue_due_idx, filtering webhook_id: every other webhook's due rows were read to find
-- one webhook's (crates/test-support/tests/plans.rs, on V0013). V0008's covering column did not
-- prevent that: no estimate can, when both are estimated at one page.
-- The index now also states `retry_count >= 0`, which every row meets (the CHECK constraint
-- delivery_queue_retry_count_not_negative) and which only the statements that walk the whole
-- claim order say (the claim's window, the depth sample), so only they can use it; the planner's
-- proof that a query matches a partial index reads the query's conditions, not constraints.
-- The build reads the whole table (settled rows too: about 0.1 s for 300,000 rows, 0.3 s for
-- 3 million, cached) and blocks every write to it until this migration commits: producers'
-- inserts, claims, write-backs. Swapping the index then needs the table to itself for a moment.
-- A claim caught half-way (it locks the table statement by statement) may fail with a deadlock
-- error, which the worker retries. The lock timeout keeps an open transaction elsewhere (a
-- dashboard, pg_dump, a psql prompt) from making everything queue behind this migration: the
-- migration fails instead, changing nothing, and `hookfleet migrate` can be run again.
-- Append-only: never edit this file once released; add a new numbered migration instead.

SET LOCAL lock_timeout = '10s';

CREATE INDEX delivery_queue_due_window_idx ON hookfleet.delivery_queue (priority DESC, next_attempt_at, delivery_id)
    INCLUDE (webhook_id)
    WHERE delivery_status = 'pending' AND retry_count >= 0;
DROP INDEX hookfleet.delivery_queue_due_idx;
ALTER INDEX hookfleet.delivery_queue_due_window_idx RENAME TO delivery_queue_due_idx;
COMMENT ON INDEX hookfleet.delivery_queue_due_idx IS
    'Due rows of every webhook in claim order, for the claim''s window and the depth sample only: a statement must say retry_count >= 0 (true of every row) to use it; one webhook''s rows are read by delivery_queue_webhook_due_idx';
