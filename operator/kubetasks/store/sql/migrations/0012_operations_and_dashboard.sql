-- 0012: what operating a large queue by hand needs (issue 17: bulk actions,
-- schedules paused at runtime) and what the dashboard reads (issue 19).
--  * schedules.paused: a schedule suspended at runtime (dashboard, CLI, API)
--    apart from `suspend`, which its source (@app.periodic, a CronJobLock)
--    rewrites whenever it syncs. Either one stops the ticks; a resume restarts
--    the cursor, as resuming `suspend` does, so no catch-up run comes from the
--    paused time.
--  * cancel_forest: bulk cancel's batch, with every unfinished descendant.
--  * tasks_failed_recent, tasks_held: the overview's recent failures and the
--    queue page's held counts, read without a pass over the finished rows.
--    Both are partial: a task pays for them only while failed / held.
--  * task_minutes, queue_minutes: per-minute rollups of finished tasks and
--    samples of queue depth, written by the dashboard's rollup pass (one
--    process at a time), so the overview never counts the tasks table.

SET LOCAL search_path = kubetasks;

ALTER TABLE schedules
    ADD COLUMN paused    boolean NOT NULL DEFAULT false,
    ADD COLUMN paused_by text CONSTRAINT paused_by_length CHECK (length(paused_by) BETWEEN 1 AND 253),
    ADD COLUMN paused_at timestamptz,
    ADD CONSTRAINT paused_has_time CHECK (paused = (paused_at IS NOT NULL));

DROP TRIGGER schedules_notify_changed ON schedules;
CREATE TRIGGER schedules_notify_changed AFTER UPDATE ON schedules
    FOR EACH ROW WHEN ((OLD.cron, OLD.timezone, OLD.suspend, OLD.starting_deadline_s, OLD.ticks_from, OLD.paused)
                       IS DISTINCT FROM (NEW.cron, NEW.timezone, NEW.suspend, NEW.starting_deadline_s, NEW.ticks_from,
                                         NEW.paused))
    EXECUTE FUNCTION notify_schedules_changed();

CREATE INDEX tasks_failed_recent ON tasks (finished_at) WHERE status = 'failed';
CREATE INDEX tasks_held ON tasks (queue) WHERE status IN ('paused', 'suspended');

-- Cancel the unfinished tasks among p_ids and every unfinished descendant of
-- p_ids, level by level, as cancel_tree does for one task (each level's
-- children read after the level above was locked).
CREATE FUNCTION cancel_forest(p_ids bigint[], p_reason text)
RETURNS TABLE (cancelled integer, descendants integer) LANGUAGE plpgsql AS $$
DECLARE
    lvl bigint[] := p_ids;
BEGIN
    cancelled := cancel_tasks(lvl, p_reason);
    descendants := 0;
    LOOP
        SELECT array_agg(c.id ORDER BY c.id) INTO lvl
        FROM tasks c WHERE c.parent_id = ANY (lvl) AND c.parent_id IS NOT NULL;
        EXIT WHEN lvl IS NULL;
        descendants := descendants + cancel_tasks(lvl, 'parent task cancelled: ' || p_reason);
    END LOOP;
    RETURN NEXT;
END;
$$;

-- Finished tasks per minute of finished_at, per queue and handler. The rows
-- of queue '*' (all queues) and handler '*' (all handlers) are the sums the
-- overview reads ('*' is not a valid queue or handler name). wait_hist and
-- run_hist count due->start and start->finish seconds of succeeded and
-- failed tasks in logarithmic buckets (see kubetasks/dashboard/rollups.py).
CREATE TABLE task_minutes (
    minute    timestamptz NOT NULL,
    queue     text NOT NULL,
    handler   text NOT NULL,
    succeeded integer NOT NULL CONSTRAINT succeeded_positive CHECK (succeeded >= 0),
    failed    integer NOT NULL CONSTRAINT failed_positive CHECK (failed >= 0),
    cancelled integer NOT NULL CONSTRAINT cancelled_positive CHECK (cancelled >= 0),
    wait_hist integer[] NOT NULL CONSTRAINT wait_hist_buckets CHECK (cardinality(wait_hist) = 64),
    run_hist  integer[] NOT NULL CONSTRAINT run_hist_buckets CHECK (cardinality(run_hist) = 64),
    PRIMARY KEY (queue, handler, minute)
);
-- A pass replaces the minutes it recounted, across every queue and handler.
CREATE INDEX task_minutes_minute ON task_minutes (minute);

-- The latest sample of each queue's depth within a minute (queue '*': all).
CREATE TABLE queue_minutes (
    minute       timestamptz NOT NULL,
    queue        text NOT NULL,
    pending      integer NOT NULL,
    due          integer NOT NULL,
    running      integer NOT NULL,
    held         integer NOT NULL,
    oldest_due_s double precision,
    sampled_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (queue, minute)
);
CREATE INDEX queue_minutes_minute ON queue_minutes (minute);

-- How far the rollup of finished minutes has come: minutes before done_until are final.
CREATE TABLE rollup_state (
    name       text PRIMARY KEY,
    done_until timestamptz NOT NULL
);
