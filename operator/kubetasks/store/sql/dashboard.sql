-- The dashboard's reads and its rollup pass (kubetasks/dashboard/). Every read
-- here goes through an index: the overview reads the rollup tables (minutes,
-- never the tasks table), the queue and pod pages read the partial indexes of
-- the unfinished sets (pending, running, held), the failures list its own
-- partial index. tests/integration/test_dashboard_plans.py EXPLAINs each at
-- 1,000,000 finished and 100,000 pending tasks. The format is queries.sql's.

-- name: rollup_try_lock :val
-- One rollup pass at a time across every dashboard process (the transaction's lock).
SELECT pg_try_advisory_xact_lock(hashtext('kubetasks.dashboard.rollup'));

-- name: rollup_window :one
-- $1 backfill seconds, $2 grace seconds, $3 most seconds per pass. The span of
-- finished_at this pass recounts: from the first minute not yet final (or the
-- backfill's start, whichever is later) to now, at most $3 of it; and the
-- minutes that will be final after it (ended more than $2 ago: a task's
-- finished_at is its statement's start, so a commit later than the grace is
-- counted only if it lands in a minute not yet final).
WITH w AS (
    SELECT now() AS now,
           greatest(coalesce((SELECT done_until FROM rollup_state WHERE name = 'task_minutes'), '-infinity'),
                    date_trunc('minute', now() - make_interval(secs => $1::float8))) AS from_at
)
SELECT w.now, w.from_at, least(w.now, w.from_at + make_interval(secs => $3::float8)) AS to_at,
       greatest(w.from_at, least(date_trunc('minute', w.now - make_interval(secs => $2::float8)),
                                 date_trunc('minute', least(w.now, w.from_at + make_interval(secs => $3::float8)))))
           AS final_until
FROM w;

-- name: rollup_finished :many
-- $1 from, $2 to. Tasks that finished in [from, to), counted per minute, queue,
-- handler, status and the logarithmic buckets of their due->start and
-- start->finish seconds (succeeded and failed tasks that ran; bucket 0: under
-- 1 ms, bucket i: [10^((i-1)/7), 10^(i/7)) ms, bucket 63: the rest). Through
-- tasks_finished_at.
SELECT date_trunc('minute', t.finished_at) AS minute, t.queue, t.handler, t.status,
       CASE WHEN t.status IN ('succeeded', 'failed') AND t.started_at IS NOT NULL THEN
           CASE WHEN t.started_at - t.run_at < interval '1 ms' THEN 0
                ELSE least(63, 1 + floor(log(extract(epoch FROM t.started_at - t.run_at) * 1000) * 7))::int END
       END AS wait_b,
       CASE WHEN t.status IN ('succeeded', 'failed') AND t.started_at IS NOT NULL THEN
           CASE WHEN t.finished_at - t.started_at < interval '1 ms' THEN 0
                ELSE least(63, 1 + floor(log(extract(epoch FROM t.finished_at - t.started_at) * 1000) * 7))::int END
       END AS run_b,
       count(*) AS n
FROM tasks t
WHERE t.finished_at >= $1::timestamptz AND t.finished_at < $2::timestamptz
GROUP BY 1, 2, 3, 4, 5, 6;

-- name: rollup_store :one
-- $1 from, $2 to, then one array per column: $3 minute, $4 queue, $5 handler,
-- $6 succeeded, $7 failed, $8 cancelled, $9 wait_hist and $10 run_hist (each
-- an int[] as text). The minutes in [from, to) become exactly these rows.
WITH new AS (
    SELECT * FROM unnest($3::timestamptz[], $4::text[], $5::text[], $6::int[], $7::int[], $8::int[],
                         $9::text[], $10::text[])
        AS n(minute, queue, handler, succeeded, failed, cancelled, wait_hist, run_hist)
), up AS (
    INSERT INTO task_minutes AS m (minute, queue, handler, succeeded, failed, cancelled, wait_hist, run_hist)
    SELECT minute, queue, handler, succeeded, failed, cancelled, wait_hist::int[], run_hist::int[] FROM new
    ON CONFLICT (queue, handler, minute) DO UPDATE
    SET succeeded = EXCLUDED.succeeded, failed = EXCLUDED.failed, cancelled = EXCLUDED.cancelled,
        wait_hist = EXCLUDED.wait_hist, run_hist = EXCLUDED.run_hist
    WHERE (m.succeeded, m.failed, m.cancelled, m.wait_hist, m.run_hist)
          IS DISTINCT FROM (EXCLUDED.succeeded, EXCLUDED.failed, EXCLUDED.cancelled, EXCLUDED.wait_hist,
                            EXCLUDED.run_hist)
    RETURNING 1
), gone AS (
    DELETE FROM task_minutes m
    WHERE m.minute >= $1::timestamptz AND m.minute < $2::timestamptz
      AND NOT EXISTS (SELECT 1 FROM new
                      WHERE new.minute = m.minute AND new.queue = m.queue AND new.handler = m.handler)
    RETURNING 1
)
SELECT (SELECT count(*) FROM up) AS changed, (SELECT count(*) FROM gone) AS removed;

-- name: rollup_done :exec
-- $1 minutes before this are final.
INSERT INTO rollup_state (name, done_until) VALUES ('task_minutes', $1)
ON CONFLICT (name) DO UPDATE SET done_until = greatest(rollup_state.done_until, EXCLUDED.done_until);

-- name: queue_sample :many
-- The depth of every queue now (and of all, queue '*'), stored as this
-- minute's sample; a queue sampled earlier this minute and empty now gets
-- zeros. Counts the unfinished sets through their partial indexes:
-- tasks_pending_claim and tasks_parked (a parked task is pending too: it
-- waits for a worker that serves it), tasks_running_by_worker, tasks_held.
WITH pend AS (
    SELECT queue, sum(pending)::bigint AS pending, sum(due)::bigint AS due,
           extract(epoch FROM now() - min(oldest_due))::float8 AS oldest_due_s
    FROM (
        SELECT queue, count(*) AS pending, count(*) FILTER (WHERE run_at <= now()) AS due,
               min(run_at) FILTER (WHERE run_at <= now()) AS oldest_due
        FROM tasks WHERE status = 'pending' AND NOT parked GROUP BY queue
        UNION ALL
        SELECT queue, count(*), count(*) FILTER (WHERE run_at <= now()), min(run_at) FILTER (WHERE run_at <= now())
        FROM tasks WHERE status = 'pending' AND parked GROUP BY queue
    ) p GROUP BY queue
), run AS (
    SELECT queue, count(*) AS running FROM tasks WHERE status = 'running' GROUP BY queue
), held AS (
    SELECT queue, count(*) AS held FROM tasks WHERE status IN ('paused', 'suspended') GROUP BY queue
), per_queue AS (
    SELECT q.queue, coalesce(p.pending, 0) AS pending, coalesce(p.due, 0) AS due,
           coalesce(r.running, 0) AS running, coalesce(h.held, 0) AS held, p.oldest_due_s
    FROM (SELECT queue FROM pend UNION SELECT queue FROM run UNION SELECT queue FROM held) q
    LEFT JOIN pend p ON p.queue = q.queue
    LEFT JOIN run r ON r.queue = q.queue
    LEFT JOIN held h ON h.queue = q.queue
), sample AS (
    SELECT * FROM per_queue
    UNION ALL
    SELECT '*', coalesce(sum(pending), 0), coalesce(sum(due), 0), coalesce(sum(running), 0),
           coalesce(sum(held), 0), max(oldest_due_s)
    FROM per_queue
), zeroed AS (
    UPDATE queue_minutes z SET pending = 0, due = 0, running = 0, held = 0, oldest_due_s = NULL, sampled_at = now()
    WHERE z.minute = date_trunc('minute', now()) AND z.queue NOT IN (SELECT queue FROM sample)
), stored AS (
    INSERT INTO queue_minutes AS m (minute, queue, pending, due, running, held, oldest_due_s, sampled_at)
    SELECT date_trunc('minute', now()), queue, pending, due, running, held, oldest_due_s, now() FROM sample
    ON CONFLICT (queue, minute) DO UPDATE
    SET pending = EXCLUDED.pending, due = EXCLUDED.due, running = EXCLUDED.running, held = EXCLUDED.held,
        oldest_due_s = EXCLUDED.oldest_due_s, sampled_at = EXCLUDED.sampled_at
)
SELECT queue, pending, due, running, held FROM sample ORDER BY queue;

-- name: rollup_prune :exec
-- $1 seconds of rollups to keep.
WITH a AS (
    DELETE FROM task_minutes WHERE minute < now() - make_interval(secs => $1::float8)
)
DELETE FROM queue_minutes WHERE minute < now() - make_interval(secs => $1::float8);

-- name: dashboard_notify :exec
-- $1 what changed (a comma-separated list of topics), for every dashboard process.
SELECT pg_notify('kubetasks_dashboard', $1);

-- name: dash_minutes :many :replica
-- $1 queue ('*': all), $2 from. Finished tasks per minute, with the histograms.
SELECT minute, succeeded, failed, cancelled, wait_hist, run_hist
FROM task_minutes
WHERE queue = $1 AND handler = '*' AND minute >= $2::timestamptz
ORDER BY minute;

-- name: dash_handlers :many :replica
-- $1 from. Finished tasks per queue and handler since then (the overview's table).
SELECT queue, handler, sum(succeeded) AS succeeded, sum(failed) AS failed, sum(cancelled) AS cancelled
FROM task_minutes
WHERE minute >= $1::timestamptz AND queue <> '*' AND handler <> '*'
GROUP BY queue, handler
ORDER BY sum(succeeded) + sum(failed) + sum(cancelled) DESC, queue, handler
LIMIT 50;

-- name: dash_depth_series :many :replica
-- $1 queue ('*': all), $2 from. The depth samples, one per minute.
SELECT minute, pending, due, running, held, oldest_due_s
FROM queue_minutes
WHERE queue = $1 AND minute >= $2::timestamptz
ORDER BY minute;

-- name: dash_depth_latest :many :replica
-- The newest depth sample of each queue within the last two minutes, and when it was taken.
SELECT DISTINCT ON (queue) queue, pending, due, running, held, oldest_due_s, sampled_at
FROM queue_minutes
WHERE minute >= date_trunc('minute', now()) - interval '2 minutes'
ORDER BY queue, minute DESC;

-- name: dash_failures :many :replica
-- $1 how many. The newest failed tasks, through tasks_failed_recent.
SELECT id, handler, queue, attempt, finished_at, pod_id, left(error, 300) AS error
FROM tasks
WHERE status = 'failed'
ORDER BY finished_at DESC
LIMIT $1;

-- name: dash_workers :many :replica
-- Live workers with their lease, the handlers they serve (NULL: a worker of an earlier version,
-- which serves every handler of its queues), what they run (through tasks_running_by_worker) and the
-- database's now().
SELECT w.worker_id, w.pod_id, w.pod_slot, w.namespace, w.hostname, w.pid, w.status, w.queues, w.concurrency,
       w.handlers,
       w.epoch, w.started_at, w.heartbeat_at, w.lease_expires_at,
       extract(epoch FROM w.lease_expires_at - now())::float8 AS lease_left_s,
       extract(epoch FROM now() - w.heartbeat_at)::float8 AS heartbeat_age_s,
       coalesce(r.ids, '{}') AS running_ids, coalesce(r.handlers, '{}') AS running_handlers
FROM workers w
LEFT JOIN LATERAL (
    SELECT array_agg(t.id ORDER BY t.id) AS ids, array_agg(t.handler ORDER BY t.id) AS handlers
    FROM tasks t WHERE t.worker_id = w.worker_id AND t.status = 'running'
) r ON true
WHERE w.status IN ('active', 'stopping')
ORDER BY w.pod_id, w.pod_slot, w.started_at;

-- name: dash_workers_stopped :many :replica
-- $1 how many. The workers that stopped most recently, and why.
SELECT worker_id, pod_id, pod_slot, status, queues, started_at, stopped_at, stop_reason
FROM workers
WHERE status IN ('dead', 'superseded')
ORDER BY stopped_at DESC
LIMIT $1;

-- name: dash_worker :one
-- $1 worker_id. One worker and its lease (what a running task's page shows).
SELECT worker_id, pod_id, pod_slot, status, epoch, heartbeat_at, lease_expires_at,
       extract(epoch FROM lease_expires_at - now())::float8 AS lease_left_s, stopped_at, stop_reason
FROM workers WHERE worker_id = $1;

-- name: dash_queues :many :replica
-- Every queue that has unfinished tasks, workers, a paused flag or finished
-- tasks in the last hour: depth now (parked: pending tasks no active worker
-- serves, counted apart through tasks_parked), who serves it, the last hour's
-- outcomes.
WITH pend AS (
    SELECT queue, sum(pending)::bigint AS pending, sum(due)::bigint AS due, sum(parked)::bigint AS parked,
           extract(epoch FROM now() - min(oldest_due))::float8 AS oldest_due_s
    FROM (
        SELECT queue, count(*) AS pending, count(*) FILTER (WHERE run_at <= now()) AS due, 0 AS parked,
               min(run_at) FILTER (WHERE run_at <= now()) AS oldest_due
        FROM tasks WHERE status = 'pending' AND NOT parked GROUP BY queue
        UNION ALL
        SELECT queue, count(*), count(*) FILTER (WHERE run_at <= now()), count(*),
               min(run_at) FILTER (WHERE run_at <= now())
        FROM tasks WHERE status = 'pending' AND parked GROUP BY queue
    ) p GROUP BY queue
), run AS (
    SELECT queue, count(*) AS running FROM tasks WHERE status = 'running' GROUP BY queue
), held AS (
    SELECT queue, count(*) FILTER (WHERE status = 'paused') AS paused_tasks,
           count(*) FILTER (WHERE status = 'suspended') AS suspended
    FROM tasks WHERE status IN ('paused', 'suspended') GROUP BY queue
), served AS (
    SELECT q.queue, count(*) AS workers, sum(w.concurrency) AS slots
    FROM workers w CROSS JOIN LATERAL unnest(w.queues) AS q(queue)
    WHERE w.status = 'active' GROUP BY q.queue
), hour AS (
    SELECT queue, sum(succeeded) AS succeeded, sum(failed) AS failed, sum(cancelled) AS cancelled
    FROM task_minutes
    WHERE minute >= now() - interval '1 hour' AND handler = '*' AND queue <> '*'
    GROUP BY queue
), names AS (
    SELECT queue FROM pend UNION SELECT queue FROM run UNION SELECT queue FROM held
    UNION SELECT queue FROM served UNION SELECT queue FROM hour UNION SELECT queue FROM queue_state
)
SELECT n.queue, coalesce(p.pending, 0) AS pending, coalesce(p.due, 0) AS due, p.oldest_due_s,
       coalesce(p.parked, 0) AS parked, coalesce(r.running, 0) AS running, coalesce(h.paused_tasks, 0) AS paused_tasks,
       coalesce(h.suspended, 0) AS suspended, coalesce(s.workers, 0) AS workers, coalesce(s.slots, 0) AS slots,
       coalesce(qs.paused, false) AS paused,
       coalesce(hr.succeeded, 0) AS succeeded_1h, coalesce(hr.failed, 0) AS failed_1h,
       coalesce(hr.cancelled, 0) AS cancelled_1h
FROM names n
LEFT JOIN pend p ON p.queue = n.queue
LEFT JOIN run r ON r.queue = n.queue
LEFT JOIN held h ON h.queue = n.queue
LEFT JOIN served s ON s.queue = n.queue
LEFT JOIN hour hr ON hr.queue = n.queue
LEFT JOIN queue_state qs ON qs.queue = n.queue
ORDER BY n.queue;

-- name: dash_task_parked :val
-- $1 task id. Whether the parking pass took it out of the claim's way (NULL: no such task).
SELECT parked FROM tasks WHERE id = $1;
