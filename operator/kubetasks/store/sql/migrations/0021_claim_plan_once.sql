-- Issue 18 item 7: the claim's plan is made once per session, not at every call.
SET LOCAL search_path = kubetasks;

-- 0021: the claim (issue 18 item 7) as a function, for one reason: its plan.
-- As a statement it was planned at every call (PostgreSQL keeps custom plans:
-- costed without its LIMIT, the generic one looks dear), and planning was a
-- third of its time in PostgreSQL. Here the plan is made once per session and
-- kept (plan_cache_mode), with only the paths it is written for (index scans in
-- claim order: a generic plan made while the table was small could otherwise
-- read and sort the whole table) and no JIT (its cost estimate without the
-- LIMIT would compile it, hundreds of ms). The settings hold inside the function
-- only.
--
-- $1 worker_id, $2 pod_id, $3 the worker's queues in the order it serves them,
-- $4 how many, $5 handlers it must not take now (those it leaves to
-- claim_limited, and those at their limit in this process; usually empty),
-- $6 task ids, $7 attempts, $8 results (json text): successes of this worker to
-- write first, in the same statement (empty arrays: none), $9 priorities,
-- $10 run_ats, $11 ids: per queue of $3 (same position), the claim-order key of
-- the last task this worker claimed there, its cursor (NULL or missing: none,
-- the queue is read from its start).
-- First holds the worker's row FOR KEY SHARE (`me`), refusing everything when
-- the worker is no longer live: whatever declares a worker dead or superseded
-- locks that row FOR UPDATE, so it either waits for this statement's commit
-- (and then sees, and releases, what it claimed) or this statement waits for
-- it and finds the worker gone. The tests on `me` are uncorrelated, so the
-- planner puts them in one-time filters evaluated before any task row is
-- locked: the worker row is always locked first. Then writes the successes,
-- fenced: a row is written only while it is still this attempt of this worker
-- and running (the attempt record is the task row itself, see
-- task_attempts_all), each found by primary key, probed per id given: never
-- through an index of running tasks, which while a long transaction holds the
-- xmin horizon keeps an entry for every task run since (the tests on worker and
-- status are wrapped in IS TRUE so that neither is an index condition or a
-- partial index's predicate; an `id = ANY ($6)` beside the join made it a
-- 40 x 40 join filter per batch of 40). Then takes due pending tasks queue by queue in the order
-- given (a later queue is read only while the earlier ones fell short; a
-- paused queue is skipped), each in claim order, for a worker whose lease is
-- live, and counts the attempt with a new number (the fencing token: never
-- lowered, so never reused); the run's progress starts afresh, and what
-- became of an earlier pause is forgotten. Only handlers the worker serves are taken: its
-- rows in worker_handlers (0020, written when it registers), probed by primary
-- key for each task read, so the cost follows the tasks read, not how many
-- handlers it serves. OFFSET 0 keeps that probe a per-row filter: as a join,
-- the planner may read every pending task of the worker's handlers and sort
-- them. Parked tasks (no active worker serves them) are not in the claim's
-- index, and a handler with a cluster-wide limit in the database is left to
-- claim_limited whatever the worker believes (tested on the picked rows, never
-- on a scan of tasks: a filter there would skew its row estimate, and with it
-- the plan; a probe per picked row, not a read of every handler the cluster
-- ever registered). One statement, so a busy worker pays one round trip and one
-- commit per batch; the two sets cannot meet (running vs pending). Rows: the
-- written ids with `claimed` false, then the claimed tasks with `claimed` true
-- (with run_at: with priority and id, the claim-order key a cursor holds).
-- Each queue is read from its cursor: its priority with (run_at, id) beyond
-- the cursor's, then the lower priorities, each an index range that starts at
-- that boundary (an Index Cond). A queue without a cursor is read by the second
-- range alone, every priority below 1001 (the range's top, priority_range):
-- that is the read from the start. Why cursors: while a long transaction holds
-- the xmin horizon, every task claimed since it began leaves an index entry
-- whose row is recently dead and cannot be marked dead in the index, so a read
-- from the start of the queue visits the heap for each of them and cost grows
-- with the tasks claimed since; from the cursor it reads only what was claimed
-- after it (by any worker). Tasks can land behind a cursor (a higher priority
-- enqueued later, a task put back pending with its old run_at: recovery,
-- hand-back, retry, unparking, a rolled-back claim): the worker claims without
-- cursors when it has none, after it waited for work, and at least every
-- max(0.25 s, 20 x the duration of its last claim without cursors) while busy,
-- so such a task waits at most that long plus one such claim (worker.py,
-- FULL_CLAIM_*). Two ranges, not a third for the read from the start: one
-- branch less to plan and to run.
-- The commit is synchronous, like every write: a claim lost in a crash or a
-- failover would let the same attempt number start twice.
CREATE FUNCTION claim_batch(
    p_worker uuid, p_pod text, p_queues text[], p_limit integer, p_skip text[],
    p_done_ids bigint[], p_done_attempts integer[], p_done_results text[],
    p_cursor_priorities integer[], p_cursor_run_ats timestamptz[], p_cursor_ids bigint[]
) RETURNS TABLE (
    claimed boolean, id bigint, handler text, queue text, priority integer, payload jsonb,
    attempt integer, max_attempts integer, timeout_s double precision, retry_delay_s double precision,
    retry_backoff double precision, max_retry_delay_s double precision, tags text[], parent_id bigint,
    uncharged integer, run_at timestamptz
)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
SET jit = off
SET enable_seqscan = off
SET enable_sort = off
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
        WITH me AS MATERIALIZED (
            SELECT w.status = 'active' AND w.lease_expires_at > now() AS may_claim
            FROM workers w
            WHERE w.worker_id = $1 AND w.status IN ('active', 'stopping')
            FOR KEY SHARE
        ), done AS (
            UPDATE tasks t
            SET status = 'succeeded', result = c.result::jsonb, finished_at = now(), updated_at = now(),
                error = NULL, traceback = NULL
            FROM unnest($6::bigint[], $7::int[], $8::text[]) AS c(id, attempt, result)
            -- By primary key, per id given (see above).
            WHERE t.id = c.id AND t.attempt = c.attempt
              AND (t.worker_id = $1) IS TRUE AND (t.status = 'running') IS TRUE
              AND EXISTS (SELECT 1 FROM me)
            RETURNING t.id
        ), picked AS (
            SELECT p.id, p.handler
            FROM unnest($3::text[], $9::int[], $10::timestamptz[], $11::bigint[]) AS q (name, cp, crun, cid)
            CROSS JOIN LATERAL (
                SELECT * FROM (SELECT t.id, t.handler FROM tasks t
                 WHERE q.cid IS NOT NULL
                   AND t.status = 'pending' AND NOT t.parked AND t.queue = q.name AND t.run_at <= now()
                   AND t.priority = q.cp AND (t.run_at, t.id) > (q.crun, q.cid)
                   AND EXISTS (SELECT 1 FROM worker_handlers s WHERE s.worker_id = $1 AND s.handler = t.handler OFFSET 0)
                   AND t.handler <> ALL ($5::text[])
                 ORDER BY t.priority DESC, t.run_at, t.id
                 LIMIT $4
                 FOR UPDATE OF t SKIP LOCKED) AS s
                UNION ALL
                SELECT * FROM (SELECT t.id, t.handler FROM tasks t
                 WHERE t.status = 'pending' AND NOT t.parked AND t.queue = q.name AND t.run_at <= now()
                   AND t.priority < coalesce(q.cp, 1001)
                   AND EXISTS (SELECT 1 FROM worker_handlers s WHERE s.worker_id = $1 AND s.handler = t.handler OFFSET 0)
                   AND t.handler <> ALL ($5::text[])
                 ORDER BY t.priority DESC, t.run_at, t.id
                 LIMIT $4
                 FOR UPDATE OF t SKIP LOCKED) AS l
            ) p
            WHERE NOT EXISTS (SELECT 1 FROM queue_state qs WHERE qs.queue = q.name AND qs.paused)
            LIMIT $4
        ), claimed AS (
            UPDATE tasks t
            SET status = 'running', attempt = t.attempt + 1, worker_id = $1, pod_id = $2,
                started_at = now(), updated_at = now(), progress = NULL, progress_message = NULL,
                progress_stage = NULL, progress_metadata = NULL, pause_outcome = NULL
            FROM picked
            WHERE t.id = picked.id
              AND coalesce((SELECT may_claim FROM me), false)
              AND NOT EXISTS (SELECT 1 FROM handlers h
                              WHERE h.name = picked.handler AND h.cluster_concurrency IS NOT NULL OFFSET 0)
            RETURNING t.id, t.handler, t.queue, t.priority, t.payload, t.attempt, t.max_attempts,
                      t.timeout_s, t.retry_delay_s, t.retry_backoff, t.max_retry_delay_s, t.tags, t.parent_id,
                      t.uncharged, t.run_at
        )
        SELECT false AS claimed, id, NULL::text AS handler, NULL::text AS queue, NULL::integer AS priority,
               NULL::jsonb AS payload, NULL::integer AS attempt, NULL::integer AS max_attempts,
               NULL::float8 AS timeout_s, NULL::float8 AS retry_delay_s, NULL::float8 AS retry_backoff,
               NULL::float8 AS max_retry_delay_s, NULL::text[] AS tags, NULL::bigint AS parent_id,
               NULL::integer AS uncharged, NULL::timestamptz AS run_at
        FROM done
        UNION ALL
        SELECT true, * FROM claimed;
END
$$;
