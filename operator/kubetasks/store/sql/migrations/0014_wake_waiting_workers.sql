-- 0014: enqueues notify only while some worker waits for work (issue 18 item 3).
-- A transaction that sends a NOTIFY takes one cluster-wide lock at commit and
-- holds it through the commit's WAL flush: notifying enqueues commit one at a
-- time (bench/contention.py: 32 enqueuers did a quarter of what they do
-- without the notification). Busy workers need no wake-up -- a worker with
-- every slot taken claims again with its next outcome -- so the notification
-- for work due now is sent only when an active worker of the queue says it
-- waits (workers.waiting). No wake-up is lost: a worker sets waiting while
-- holding the 'kubetasks.wait' advisory lock exclusively, and every enqueue
-- reads the flags under the same lock shared, taken before it reads. An
-- enqueue that read the flag before the worker's commit still held its lock
-- then, so the worker's lock waited for that enqueue's commit, and the
-- worker's next claim (after its lock) sees that task; any other enqueue
-- reads the flag after the worker's commit, and notifies. Work due later is
-- announced as before (workers set timers from it).

SET LOCAL search_path = kubetasks;

-- true by default: a worker of an earlier version never clears it, and is woken as before.
ALTER TABLE workers ADD COLUMN waiting boolean NOT NULL DEFAULT true;
CREATE INDEX workers_waiting ON workers (worker_id) WHERE status = 'active' AND waiting;

CREATE OR REPLACE FUNCTION notify_enqueued() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT queue,
               bool_or(run_at <= now()) AS due_now,
               extract(epoch FROM min(run_at) FILTER (WHERE run_at > now()) - now()) AS later
        FROM new_tasks WHERE status = 'pending' GROUP BY queue
    LOOP
        IF r.due_now THEN
            -- Before reading the flags, and held to commit: see migration 0014. A
            -- transaction with an older snapshot than this statement's could miss a
            -- flag set meanwhile: it always notifies. (Qualified: an INSERT into
            -- kubetasks.tasks may come from a session without the schema on its path.)
            PERFORM pg_advisory_xact_lock_shared(hashtext('kubetasks.wait'));
            -- A queue no active worker lists is announced too: a worker serving `*`
            -- learns of new queues from this, and the parking pass of unserved work.
            IF current_setting('transaction_isolation') <> 'read committed'
               OR EXISTS (SELECT 1 FROM kubetasks.workers w
                          WHERE w.status = 'active' AND w.waiting AND r.queue = ANY (w.queues))
               OR NOT EXISTS (SELECT 1 FROM kubetasks.workers w
                              WHERE w.status = 'active' AND r.queue = ANY (w.queues)) THEN
                PERFORM pg_notify('kubetasks_enqueued', r.queue);
            END IF;
        END IF;
        IF r.later IS NOT NULL THEN
            PERFORM pg_notify('kubetasks_enqueued', r.queue || ' ' || r.later::text);
        END IF;
    END LOOP;
    RETURN NULL;
END;
$$;
