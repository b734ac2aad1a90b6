-- Operating many tasks at once (issue 17): filtered listings with keyset paging,
-- bulk retry / cancel / delete by filter, events and attempts queries, schedules
-- paused at runtime. Read by kubetasks/filters.py, listing.py, bulk.py, audit.py
-- and schedules.py; the format is queries.sql's.
--
-- THE TASK FILTER. Every query below that filters tasks has the same eleven
-- parameters first, in this order, and the same block of conditions (between
-- the `filter:begin` and `filter:end` lines; tests/unit/test_operations_sql.py
-- proves the copies are identical). NULL matches everything:
--   $1 statuses, $2 queues, $3 handlers, $4 tags (all of them), $5 created at
--   or after, $6 created before, $7 among these task ids (a parent's children
--   or a workflow's tree, resolved first), $8 worker_id, $9 pod_id, $10 due
--   (run_at) at or after, $11 due before.
-- Each query reaches rows through a range of the primary key (a window of ids,
-- or a batch after a cursor), never through the filter: the filter's columns
-- have no indexes of their own (every index on tasks costs the hot path), so a
-- statement costs the ids it walks, whatever the filter, with a generic plan
-- as with a custom one.

-- name: tasks_max_id :val
-- The newest task id (0: none). Where a listing starts.
SELECT coalesce(max(id), 0) FROM tasks;

-- name: tasks_page :many :replica
-- $1..$11 the filter, $12 ids below this one, $13 ids from this one (the window's
-- floor), $14 how many. Newest first; a summary of each task (no payload,
-- result or traceback; the error's first 300 characters).
SELECT t.id, t.handler, t.queue, t.priority, t.status, t.attempt, t.uncharged, t.max_attempts,
       t.run_at, t.created_at, t.started_at, t.finished_at, t.worker_id, t.pod_id, t.progress,
       t.progress_message, t.tags, t.parent_id, t.dedupe_key, left(t.error, 300) AS error, t.parked,
       t.progress_stage
FROM tasks t
WHERE t.id < $12::bigint AND t.id >= $13::bigint
  -- filter:begin
  AND ($1::text[] IS NULL OR t.status = ANY ($1::text[]))
  AND ($2::text[] IS NULL OR t.queue = ANY ($2::text[]))
  AND ($3::text[] IS NULL OR t.handler = ANY ($3::text[]))
  AND ($4::text[] IS NULL OR t.tags @> $4::text[])
  AND ($5::timestamptz IS NULL OR t.created_at >= $5::timestamptz)
  AND ($6::timestamptz IS NULL OR t.created_at < $6::timestamptz)
  AND ($7::bigint[] IS NULL OR t.id = ANY ($7::bigint[]))
  AND ($8::uuid IS NULL OR t.worker_id = $8::uuid)
  AND ($9::text IS NULL OR t.pod_id = $9::text)
  AND ($10::timestamptz IS NULL OR t.run_at >= $10::timestamptz)
  AND ($11::timestamptz IS NULL OR t.run_at < $11::timestamptz)
  -- filter:end
ORDER BY t.id DESC
LIMIT $14;

-- name: tasks_count :one
-- $1..$11 the filter, $12 up to this id (NULL: every id). How many tasks match,
-- and the newest of them: a bulk action confirmed with that id as its bound
-- never touches a task added after the count. A pass over the table: what a dry
-- run costs, on purpose (it is asked for, never refreshed).
SELECT count(*) AS n, max(t.id) AS up_to_id
FROM tasks t
WHERE ($12::bigint IS NULL OR t.id <= $12::bigint)
  -- filter:begin
  AND ($1::text[] IS NULL OR t.status = ANY ($1::text[]))
  AND ($2::text[] IS NULL OR t.queue = ANY ($2::text[]))
  AND ($3::text[] IS NULL OR t.handler = ANY ($3::text[]))
  AND ($4::text[] IS NULL OR t.tags @> $4::text[])
  AND ($5::timestamptz IS NULL OR t.created_at >= $5::timestamptz)
  AND ($6::timestamptz IS NULL OR t.created_at < $6::timestamptz)
  AND ($7::bigint[] IS NULL OR t.id = ANY ($7::bigint[]))
  AND ($8::uuid IS NULL OR t.worker_id = $8::uuid)
  AND ($9::text IS NULL OR t.pod_id = $9::text)
  AND ($10::timestamptz IS NULL OR t.run_at >= $10::timestamptz)
  AND ($11::timestamptz IS NULL OR t.run_at < $11::timestamptz)
  -- filter:end
;

-- name: bulk_retry_batch :one
-- $1..$11 the filter, $12 ids after this one, $13 up to this one, $14 batch size.
-- One batch of bulk retry: the next $14 matching failed or cancelled tasks in id
-- order start over, as retry_task does one (every attempt so far uncharged);
-- their queues are woken. picked < $14: the last batch.
WITH picked AS (
    SELECT t.id
    FROM tasks t
    WHERE t.id > $12::bigint AND t.id <= $13::bigint AND t.status IN ('failed', 'cancelled')
      -- filter:begin
      AND ($1::text[] IS NULL OR t.status = ANY ($1::text[]))
      AND ($2::text[] IS NULL OR t.queue = ANY ($2::text[]))
      AND ($3::text[] IS NULL OR t.handler = ANY ($3::text[]))
      AND ($4::text[] IS NULL OR t.tags @> $4::text[])
      AND ($5::timestamptz IS NULL OR t.created_at >= $5::timestamptz)
      AND ($6::timestamptz IS NULL OR t.created_at < $6::timestamptz)
      AND ($7::bigint[] IS NULL OR t.id = ANY ($7::bigint[]))
      AND ($8::uuid IS NULL OR t.worker_id = $8::uuid)
      AND ($9::text IS NULL OR t.pod_id = $9::text)
      AND ($10::timestamptz IS NULL OR t.run_at >= $10::timestamptz)
      AND ($11::timestamptz IS NULL OR t.run_at < $11::timestamptz)
      -- filter:end
    ORDER BY t.id
    LIMIT $14
), upd AS (
    UPDATE tasks x
    SET status = 'pending', uncharged = x.attempt, graceful_releases = 0, run_at = now(), finished_at = NULL,
        error = NULL, traceback = NULL, result = NULL, updated_at = now()
    FROM picked
    WHERE x.id = picked.id AND x.status IN ('failed', 'cancelled')
      AND ($1::text[] IS NULL OR x.status = ANY ($1::text[]))
    RETURNING x.id, x.queue
), events AS (
    INSERT INTO task_events (task_id, kind, detail) SELECT id, 'requeued', 'bulk retry' FROM upd
), wake AS (
    SELECT pg_notify('kubetasks_enqueued', q.queue) FROM (SELECT DISTINCT queue FROM upd) q
)
SELECT (SELECT count(*) FROM picked) AS picked, (SELECT max(id) FROM picked) AS last_id,
       (SELECT count(*) FROM upd) + 0 * (SELECT count(*) FROM wake) AS done;

-- name: bulk_cancel_batch :one
-- $1..$11 the filter, $12 ids after this one, $13 up to this one, $14 batch size,
-- $15 reason. One batch of bulk cancel: the next $14 matching unfinished tasks
-- in id order, and every unfinished descendant of theirs (cancel_forest: rows
-- locked in id order, running ones' workers told through NOTIFY).
WITH picked AS (
    SELECT t.id
    FROM tasks t
    WHERE t.id > $12::bigint AND t.id <= $13::bigint AND t.status IN ('pending', 'running', 'paused', 'suspended')
      -- filter:begin
      AND ($1::text[] IS NULL OR t.status = ANY ($1::text[]))
      AND ($2::text[] IS NULL OR t.queue = ANY ($2::text[]))
      AND ($3::text[] IS NULL OR t.handler = ANY ($3::text[]))
      AND ($4::text[] IS NULL OR t.tags @> $4::text[])
      AND ($5::timestamptz IS NULL OR t.created_at >= $5::timestamptz)
      AND ($6::timestamptz IS NULL OR t.created_at < $6::timestamptz)
      AND ($7::bigint[] IS NULL OR t.id = ANY ($7::bigint[]))
      AND ($8::uuid IS NULL OR t.worker_id = $8::uuid)
      AND ($9::text IS NULL OR t.pod_id = $9::text)
      AND ($10::timestamptz IS NULL OR t.run_at >= $10::timestamptz)
      AND ($11::timestamptz IS NULL OR t.run_at < $11::timestamptz)
      -- filter:end
    ORDER BY t.id
    LIMIT $14
)
SELECT (SELECT count(*) FROM picked) AS picked, (SELECT max(id) FROM picked) AS last_id,
       f.cancelled AS done, f.descendants
FROM cancel_forest(ARRAY(SELECT id FROM picked), $15::text) f;

-- name: bulk_delete_batch :one
-- $1..$11 the filter, $12 ids after this one, $13 up to this one, $14 batch size.
-- One batch of bulk delete: the next $14 matching finished tasks in id order,
-- their events and attempts with them. A child whose parent is unfinished
-- stays (the parent may still read its result), as in delete_finished_tasks.
WITH picked AS (
    SELECT t.id
    FROM tasks t
    WHERE t.id > $12::bigint AND t.id <= $13::bigint AND t.status IN ('succeeded', 'failed', 'cancelled')
      -- filter:begin
      AND ($1::text[] IS NULL OR t.status = ANY ($1::text[]))
      AND ($2::text[] IS NULL OR t.queue = ANY ($2::text[]))
      AND ($3::text[] IS NULL OR t.handler = ANY ($3::text[]))
      AND ($4::text[] IS NULL OR t.tags @> $4::text[])
      AND ($5::timestamptz IS NULL OR t.created_at >= $5::timestamptz)
      AND ($6::timestamptz IS NULL OR t.created_at < $6::timestamptz)
      AND ($7::bigint[] IS NULL OR t.id = ANY ($7::bigint[]))
      AND ($8::uuid IS NULL OR t.worker_id = $8::uuid)
      AND ($9::text IS NULL OR t.pod_id = $9::text)
      AND ($10::timestamptz IS NULL OR t.run_at >= $10::timestamptz)
      AND ($11::timestamptz IS NULL OR t.run_at < $11::timestamptz)
      -- filter:end
    ORDER BY t.id
    LIMIT $14
), del AS (
    DELETE FROM tasks x
    USING picked
    WHERE x.id = picked.id AND x.status IN ('succeeded', 'failed', 'cancelled')
      AND ($1::text[] IS NULL OR x.status = ANY ($1::text[]))
      AND (x.parent_id IS NULL OR NOT EXISTS (
          SELECT 1 FROM tasks p
          WHERE p.id = x.parent_id AND p.status NOT IN ('succeeded', 'failed', 'cancelled')))
    RETURNING x.id
)
SELECT (SELECT count(*) FROM picked) AS picked, (SELECT max(id) FROM picked) AS last_id,
       (SELECT count(*) FROM del) AS done;

-- name: task_children_ids :many
-- $1 parent task id, $2 at most this many (the caller asks for one more than it
-- accepts, to know when there are too many). Its direct children.
SELECT id FROM tasks WHERE parent_id = $1 AND parent_id IS NOT NULL ORDER BY id LIMIT $2;

-- name: task_tree_ids :many
-- $1 root task id, $2 at most this many (as task_children_ids). The root and
-- every descendant.
WITH RECURSIVE tree AS (
    SELECT id, 0 AS depth FROM tasks WHERE id = $1
    UNION ALL
    SELECT c.id, tree.depth + 1 FROM tree JOIN tasks c ON c.parent_id = tree.id AND c.parent_id IS NOT NULL
    WHERE tree.depth < 1000
)
SELECT id FROM tree LIMIT $2;

-- name: events_max_id :val
-- The newest event id (0: none).
SELECT coalesce(max(id), 0) FROM task_events;

-- name: events_page :many :replica
-- $1 kinds, $2 worker_id, $3 pod_id, $4 at or after, $5 before (NULL: any),
-- $6 ids below this one, $7 ids from this one (the window's floor), $8 how
-- many. Recorded events of every task, newest first, through a window of
-- event ids.
SELECT e.id, e.task_id, e.at, e.kind, e.attempt, e.worker_id, e.pod_id, e.detail
FROM task_events e
WHERE e.id < $6::bigint AND e.id >= $7::bigint
  AND ($1::text[] IS NULL OR e.kind = ANY ($1::text[]))
  AND ($2::uuid IS NULL OR e.worker_id = $2::uuid)
  AND ($3::text IS NULL OR e.pod_id = $3::text)
  AND ($4::timestamptz IS NULL OR e.at >= $4::timestamptz)
  AND ($5::timestamptz IS NULL OR e.at < $5::timestamptz)
ORDER BY e.id DESC
LIMIT $8;

-- name: events_of_tasks :many
-- $1 task ids, $2 kinds, $3 worker_id, $4 pod_id, $5 at or after, $6 before,
-- $7 ids below this one, $8 how many. Recorded events of these tasks (one
-- task, or a workflow's tree), newest first, through task_events_task.
SELECT e.id, e.task_id, e.at, e.kind, e.attempt, e.worker_id, e.pod_id, e.detail
FROM task_events e
WHERE e.task_id = ANY ($1::bigint[]) AND e.id < $7::bigint
  AND ($2::text[] IS NULL OR e.kind = ANY ($2::text[]))
  AND ($3::uuid IS NULL OR e.worker_id = $3::uuid)
  AND ($4::text IS NULL OR e.pod_id = $4::text)
  AND ($5::timestamptz IS NULL OR e.at >= $5::timestamptz)
  AND ($6::timestamptz IS NULL OR e.at < $6::timestamptz)
ORDER BY e.id DESC
LIMIT $8;

-- name: attempts_page :many :replica
-- $1 outcomes, $2 worker_id, $3 pod_id, $4 finished at or after, $5 finished
-- before, $6 (task id, attempt) below this pair: $6 task id, $7 attempt,
-- $8 task ids from this one (the window's floor), $9 how many. Ended attempts
-- (a success is read from its task row), newest task first, latest attempt
-- first, through a window of task ids.
SELECT a.task_id, a.attempt, a.worker_id, a.pod_id, a.started_at, a.finished_at, a.outcome,
       left(a.error, 300) AS error, extract(epoch FROM a.finished_at - a.started_at)::float8 AS duration_s
FROM task_attempts_all a
WHERE a.task_id <= $6::bigint AND a.task_id >= $8::bigint AND (a.task_id, a.attempt) < ($6::bigint, $7::integer)
  AND ($1::text[] IS NULL OR a.outcome = ANY ($1::text[]))
  AND ($2::uuid IS NULL OR a.worker_id = $2::uuid)
  AND ($3::text IS NULL OR a.pod_id = $3::text)
  AND ($4::timestamptz IS NULL OR a.finished_at >= $4::timestamptz)
  AND ($5::timestamptz IS NULL OR a.finished_at < $5::timestamptz)
ORDER BY a.task_id DESC, a.attempt DESC
LIMIT $9;

-- name: attempts_of_tasks :many
-- $1 task ids, $2 outcomes, $3 worker_id, $4 pod_id, $5 finished at or after,
-- $6 finished before, $7 task id and $8 attempt: below this pair, $9 how many.
-- Ended attempts of these tasks, newest task first, latest attempt first.
SELECT a.task_id, a.attempt, a.worker_id, a.pod_id, a.started_at, a.finished_at, a.outcome,
       left(a.error, 300) AS error, extract(epoch FROM a.finished_at - a.started_at)::float8 AS duration_s
FROM task_attempts_all a
WHERE a.task_id = ANY ($1::bigint[]) AND (a.task_id, a.attempt) < ($7::bigint, $8::integer)
  AND ($2::text[] IS NULL OR a.outcome = ANY ($2::text[]))
  AND ($3::uuid IS NULL OR a.worker_id = $3::uuid)
  AND ($4::text IS NULL OR a.pod_id = $4::text)
  AND ($5::timestamptz IS NULL OR a.finished_at >= $5::timestamptz)
  AND ($6::timestamptz IS NULL OR a.finished_at < $6::timestamptz)
ORDER BY a.task_id DESC, a.attempt DESC
LIMIT $9;

-- name: schedule_pause :one
-- $1 name, $2 who paused it. Stops its ticks until schedule_resume, whatever
-- its source's `suspend` says; a manual trigger still runs it. No row: no such
-- schedule. was_paused: it already was (nothing changed).
WITH before AS (
    SELECT name, paused FROM schedules WHERE name = $1 FOR UPDATE
), upd AS (
    UPDATE schedules s SET paused = true, paused_by = $2, paused_at = now(), updated_at = now()
    FROM before WHERE s.name = before.name AND NOT before.paused
    RETURNING s.name
)
SELECT before.name, before.paused AS was_paused FROM before;

-- name: schedule_resume :one
-- $1 name, $2 count ticks from (NULL: now()). Ticks again, from then on: the
-- cursor restarts there (as a resume of `suspend` does), so the paused time
-- brings no catch-up run. No row: no such schedule. was_paused: false when it
-- was not paused (nothing changed).
WITH before AS (
    SELECT name, paused FROM schedules WHERE name = $1 FOR UPDATE
), upd AS (
    UPDATE schedules s
    SET paused = false, paused_by = NULL, paused_at = NULL, updated_at = now(),
        ticks_from = greatest(coalesce($2::timestamptz, now()), s.last_tick_at)
    FROM before WHERE s.name = before.name AND before.paused
    RETURNING s.name
)
SELECT before.name, before.paused AS was_paused FROM before;

-- name: set_worker_periodics :exec
-- $1 worker_id, $2 the @app.periodic names its code declares (0015).
UPDATE workers SET periodics = $2::text[] WHERE worker_id = $1 AND status IN ('active', 'stopping');

-- name: schedules_orphaned :many
-- $1 names to keep whatever the workers say (the caller's own periodics). The
-- 'code' schedules that no active worker's code declares. None while no worker
-- is active, or while one's periodics are unknown (a worker of an earlier
-- version, NULL): it may still declare any of them.
SELECT s.name FROM schedules s
WHERE s.source = 'code' AND s.name <> ALL ($1::text[])
  AND EXISTS (SELECT 1 FROM workers w WHERE w.status = 'active')
  AND NOT EXISTS (SELECT 1 FROM workers w
                  WHERE w.status = 'active' AND (w.periodics IS NULL OR s.name = ANY (w.periodics)))
ORDER BY s.name;

-- name: schedules_prune :many
-- $1 names to keep (as schedules_orphaned). Deletes the orphaned 'code'
-- schedules, tested again in this statement, with their tick history (their
-- runs stay). Rows: the names deleted.
DELETE FROM schedules s
WHERE s.source = 'code' AND s.name <> ALL ($1::text[])
  AND EXISTS (SELECT 1 FROM workers w WHERE w.status = 'active')
  AND NOT EXISTS (SELECT 1 FROM workers w
                  WHERE w.status = 'active' AND (w.periodics IS NULL OR s.name = ANY (w.periodics)))
RETURNING s.name;

-- name: schedule_source :val
-- $1 name. Its source (code | crd | api); no row: no such schedule.
SELECT source FROM schedules WHERE name = $1;

-- name: retention_claim :val
-- $1 seconds that must have passed since the last retention pass anywhere.
-- True: this caller runs the pass now (others find it ran lately).
UPDATE housekeeping SET ran_at = now()
WHERE name = 'retention' AND ran_at <= now() - make_interval(secs => $1)
RETURNING true;

-- name: retention_batch :one
-- $1 $2 $3 seconds succeeded, failed, cancelled tasks are kept (NULL: for ever),
-- $4 roots per batch, $5 $6 the keyset to continue after (NULL: the oldest).
-- See retention_batch in schema.sql.
SELECT busy, picked, succeeded, failed, cancelled, last_at, last_id
FROM retention_batch($1, $2, $3, $4, $5, $6);

-- name: job_locks_list :many
-- $1 name prefix ('' for all), $2 at most. The live job locks (no Redis
-- configured), by name, with database times.
SELECT name, owner, acquired_at, expires_at, extract(epoch FROM expires_at - now())::float8 AS expires_in_s
FROM job_locks
WHERE expires_at > now() AND left(name, length($1::text)) = $1::text
ORDER BY name
LIMIT $2;

-- name: job_lock_force_release :val
-- $1 lock name, $2 the owner it must still have (NULL: any). Deletes the lock
-- whoever holds it (an administrator's act: the holder learns it at its next
-- renewal); the owner it was taken from, nothing when it was free or not $2's.
WITH del AS (
    DELETE FROM job_locks WHERE name = $1 AND ($2::text IS NULL OR owner = $2) RETURNING owner, expires_at > now() AS live
)
SELECT owner FROM del WHERE live;

-- name: record_checkpoint :val
-- $1 task id, $2 attempt, $3 worker_id, $4 detail (JSON text). A handler's
-- checkpoint, written only while the task is still this attempt's and running
-- under this worker (nothing returned: taken away).
INSERT INTO task_events (task_id, kind, attempt, worker_id, pod_id, detail)
SELECT t.id, 'checkpoint', t.attempt, t.worker_id, t.pod_id, $4
FROM tasks t
WHERE t.id = $1 AND t.attempt = $2 AND t.worker_id = $3 AND t.status = 'running'
RETURNING true;

-- name: tasks_count_by :many
-- $1..$11 the filter, $12 the grouping (handler | queue | tag | status). Counts
-- of the matching tasks per group and status (a tag counts every task carrying
-- it). A pass over the table, like a dry run's count.
SELECT g.key, t.status, count(*) AS n
FROM tasks t
CROSS JOIN LATERAL (
    SELECT CASE $12::text WHEN 'handler' THEN t.handler WHEN 'queue' THEN t.queue ELSE t.status END AS key
    WHERE $12::text <> 'tag'
    UNION ALL
    SELECT x.tag FROM unnest(t.tags) AS x (tag) WHERE $12::text = 'tag'
) g
WHERE true
  -- filter:begin
  AND ($1::text[] IS NULL OR t.status = ANY ($1::text[]))
  AND ($2::text[] IS NULL OR t.queue = ANY ($2::text[]))
  AND ($3::text[] IS NULL OR t.handler = ANY ($3::text[]))
  AND ($4::text[] IS NULL OR t.tags @> $4::text[])
  AND ($5::timestamptz IS NULL OR t.created_at >= $5::timestamptz)
  AND ($6::timestamptz IS NULL OR t.created_at < $6::timestamptz)
  AND ($7::bigint[] IS NULL OR t.id = ANY ($7::bigint[]))
  AND ($8::uuid IS NULL OR t.worker_id = $8::uuid)
  AND ($9::text IS NULL OR t.pod_id = $9::text)
  AND ($10::timestamptz IS NULL OR t.run_at >= $10::timestamptz)
  AND ($11::timestamptz IS NULL OR t.run_at < $11::timestamptz)
  -- filter:end
GROUP BY g.key, t.status
ORDER BY g.key, t.status;
