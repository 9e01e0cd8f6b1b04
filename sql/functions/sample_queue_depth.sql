-- One current definition, re-applied by `hookfleet migrate` when this file changes
-- (see sql/README.md). Edit it in place; never in a migration.
--
-- One depth sample for the whole fleet (webhook_queue_depth, the oldest due age): the first
-- worker whose sample is older than max_age takes it, the others read it.

CREATE OR REPLACE FUNCTION hookfleet.sample_queue_depth(max_age interval)
RETURNS TABLE (delivery_status text, deliveries bigint, oldest_due_age_seconds double precision, sampled_at timestamptz)
LANGUAGE plpgsql VOLATILE
-- A worker's session keeps the plans it made: made on an empty queue they were sequential scans,
-- read in full at every sample once the queue is large (plans.rs, "planned on an empty queue").
SET enable_seqscan = off
-- queue_depth_sample has no index to read instead, and the penalty seqscan = off puts on its scan
-- would make every sample compile its statements (JIT): 20–150 ms instead of 0.2.
SET jit = off
AS $$
#variable_conflict use_column
BEGIN
    IF NOT EXISTS (SELECT 1 FROM hookfleet.queue_depth_sample s WHERE s.sampled_at > now() - max_age)
       AND pg_try_advisory_xact_lock(hashtextextended('hookfleet.sample_queue_depth', 0)) THEN
        -- Again under the lock, in a statement of its own (a fresh snapshot): another worker may
        -- have sampled in between.
        IF NOT EXISTS (SELECT 1 FROM hookfleet.queue_depth_sample s WHERE s.sampled_at > now() - max_age) THEN
            INSERT INTO hookfleet.queue_depth_sample AS s (delivery_status, deliveries, oldest_due_age_seconds, sampled_at)
            VALUES
                -- retry_count >= 0 (every row) matches delivery_queue_due_idx (V0014).
                ('pending',
                 (SELECT count(*) FROM hookfleet.delivery_queue q
                   WHERE q.delivery_status = 'pending' AND q.retry_count >= 0),
                 (SELECT extract(epoch FROM now() - min(q.next_attempt_at))::float8 FROM hookfleet.delivery_queue q
                   WHERE q.delivery_status = 'pending' AND q.retry_count >= 0 AND q.next_attempt_at <= now()),
                 now()),
                ('in_flight',
                 (SELECT count(*) FROM hookfleet.delivery_queue q WHERE q.delivery_status = 'in_flight'), NULL, now()),
                ('dead',
                 (SELECT count(*) FROM hookfleet.delivery_queue q WHERE q.delivery_status = 'dead'), NULL, now())
            ON CONFLICT ON CONSTRAINT queue_depth_sample_pkey DO UPDATE
            SET deliveries = EXCLUDED.deliveries,
                oldest_due_age_seconds = EXCLUDED.oldest_due_age_seconds,
                sampled_at = EXCLUDED.sampled_at;
        END IF;
    END IF;
    RETURN QUERY SELECT s.delivery_status, s.deliveries, s.oldest_due_age_seconds, s.sampled_at
                 FROM hookfleet.queue_depth_sample s ORDER BY s.delivery_status;
END
$$;
COMMENT ON FUNCTION hookfleet.sample_queue_depth(interval) IS 'The fleet''s queue depth (pending, in_flight, dead; oldest due age), counted by at most one caller per max_age';
