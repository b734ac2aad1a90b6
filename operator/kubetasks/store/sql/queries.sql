-- Every statement kubetasks sends. Each block starts with
--   -- name: <query_name> :<one|many|exec|val>
-- then a comment naming the positional parameters, then the statement.
-- search_path is set to the kubetasks schema on every pooled connection.

-- name: enqueue :val
-- $1 handler, $2 queue, $3 priority, $4 payload (json text), $5 max_attempts,
-- $6 run_at (NULL: now + $7), $7 delay seconds, $8 timeout_s, $9 retry_delay_s,
-- $10 retry_backoff, $11 max_retry_delay_s, $12 tags, $13 dedupe_key, $14 cr_uid,
-- $15 cr_namespace, $16 cr_name, $17 paused (a suspended Task object: held from
-- the start, never claimable in between). Nothing is returned when the dedupe key
-- or the CR uid already names a live task: the caller then looks that one up.
INSERT INTO tasks (handler, queue, priority, payload, max_attempts, run_at, timeout_s,
                   retry_delay_s, retry_backoff, max_retry_delay_s, tags, dedupe_key,
                   cr_uid, cr_namespace, cr_name, status)
VALUES ($1, $2, $3, $4::text::jsonb, $5,
        coalesce($6::timestamptz, now() + make_interval(secs => coalesce($7::float8, 0))),
        $8, $9, $10, $11, $12, $13, $14, $15, $16,
        CASE WHEN $17::boolean THEN 'paused' ELSE 'pending' END)
ON CONFLICT DO NOTHING
RETURNING id;

-- name: enqueue_many :many
-- Same columns as enqueue, one array per column, all of equal length.
INSERT INTO tasks (handler, queue, priority, payload, max_attempts, run_at, timeout_s,
                   retry_delay_s, retry_backoff, max_retry_delay_s, tags, dedupe_key)
SELECT c.handler, c.queue, c.priority, c.payload::jsonb, c.max_attempts,
       coalesce(c.run_at, now() + make_interval(secs => coalesce(c.delay, 0))),
       c.timeout_s, c.retry_delay_s, c.retry_backoff, c.max_retry_delay_s,
       CASE WHEN c.tags IS NULL THEN '{}'::text[] ELSE string_to_array(c.tags, E'\x1f') END,
       c.dedupe_key
FROM unnest($1::text[], $2::text[], $3::int[], $4::text[], $5::int[], $6::timestamptz[],
            $7::float8[], $8::float8[], $9::float8[], $10::float8[], $11::float8[],
            $12::text[], $13::text[])
     WITH ORDINALITY AS c(handler, queue, priority, payload, max_attempts, run_at, delay,
                          timeout_s, retry_delay_s, retry_backoff, max_retry_delay_s, tags,
                          dedupe_key, ord)
ORDER BY c.ord
ON CONFLICT DO NOTHING
RETURNING id, dedupe_key;

-- name: find_live_by_dedupe_key :many
-- $1 dedupe keys.
SELECT id, dedupe_key FROM tasks
WHERE dedupe_key = ANY($1::text[]) AND status IN ('pending', 'running', 'paused', 'suspended');

-- name: find_by_cr_uid :val
-- $1 cr_uid.
SELECT id FROM tasks WHERE cr_uid = $1;

-- name: claim :many
-- The claim: claim_batch (schema.sql, 0021) says what it does and why it is a
-- function. $1 worker_id, $2 pod_id, $3 the worker's queues in the order it
-- serves them, $4 how many, $5 handlers it must not take now, $6 task ids,
-- $7 attempts, $8 results (json text): successes to write first, $9 priorities,
-- $10 run_ats, $11 ids: per queue of $3, its cursor (NULL or missing: none).
SELECT * FROM claim_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11);

-- name: complete_unsuccessful :many
-- $1 worker_id, $2 task ids, $3 attempts, $4 retry delays in seconds (NULL: no
-- retry, the task fails), $5 errors, $6 tracebacks, $7 attempt outcomes
-- (retried | failed | timeout). Fenced like the successes of claim, and like
-- them refused when the worker is no longer live (its row is locked first, see
-- claim). Each is an event (retried, or failed), unlike a success, which the
-- task row alone records. A retry of a task with no charged attempt left fails
-- it, and a delay is held within 0 s..1 year whatever the caller sent.
WITH me AS MATERIALIZED (
    SELECT 1 FROM workers w WHERE w.worker_id = $1 AND w.status IN ('active', 'stopping') FOR KEY SHARE
), done AS (
    UPDATE tasks t
    SET status = CASE WHEN c.delay IS NULL OR t.attempt - t.uncharged >= t.max_attempts
                      THEN 'failed' ELSE 'pending' END,
        run_at = CASE WHEN c.delay IS NULL THEN t.run_at
                      ELSE now() + make_interval(secs => least(greatest(c.delay, 0), 31536000)) END,
        finished_at = CASE WHEN c.delay IS NULL OR t.attempt - t.uncharged >= t.max_attempts
                           THEN now() END,
        error = c.error, traceback = c.tb, updated_at = now()
    FROM unnest($2::bigint[], $3::int[], $4::float8[], $5::text[], $6::text[], $7::text[])
         AS c(id, attempt, delay, error, tb, outcome)
    -- By primary key, per id given, never through an index of running tasks (see claim).
    WHERE t.id = c.id AND t.attempt = c.attempt
      AND (t.worker_id = $1) IS TRUE AND (t.status = 'running') IS TRUE
      AND EXISTS (SELECT 1 FROM me)
    RETURNING t.id, t.attempt, t.pod_id, t.started_at, c.outcome, c.error, t.status
), audit AS (
    INSERT INTO task_attempts (task_id, attempt, worker_id, pod_id, started_at, outcome, error)
    SELECT id, attempt, $1, pod_id, started_at, outcome, error FROM done
), events AS (
    INSERT INTO task_events (task_id, kind, attempt, worker_id, pod_id, detail)
    SELECT id, CASE WHEN status = 'failed' THEN 'failed' ELSE 'retried' END, attempt, $1, pod_id, error
    FROM done
)
SELECT id FROM done;

-- name: set_progress :val
-- $1 task id, $2 attempt, $3 worker_id, $4 percent, $5 message, $6 stage, $7
-- metadata (a JSON object's text; NULL: none). Fenced. A change of the
-- percentage or of the stage is an event (the stage in brackets), however often
-- it is called. Refused when the worker is no longer live (its row is locked
-- first, see claim).
WITH me AS MATERIALIZED (
    SELECT 1 FROM workers w WHERE w.worker_id = $3 AND w.status IN ('active', 'stopping') FOR KEY SHARE
), before AS (
    SELECT progress, progress_stage FROM tasks WHERE id = $1
), upd AS (
    UPDATE tasks SET progress = $4, progress_message = $5, progress_stage = $6,
                     progress_metadata = $7::text::jsonb, updated_at = now()
    WHERE id = $1 AND attempt = $2 AND worker_id = $3 AND status = 'running' AND EXISTS (SELECT 1 FROM me)
    RETURNING pod_id
), events AS (
    INSERT INTO task_events (task_id, kind, attempt, worker_id, pod_id, detail)
    SELECT $1, 'progress', $2, $3, upd.pod_id,
           $4::text || '%' || coalesce(' [' || $6::text || ']', '') || coalesce(': ' || $5, '')
    FROM upd, before
    WHERE before.progress IS DISTINCT FROM $4::smallint OR before.progress_stage IS DISTINCT FROM $6::text
)
SELECT count(*) FROM upd;

-- name: take_pod_slot :val
-- $1 pod_id, $2 how many slots to try. Sent on the lease connection: the first
-- slot whose session-level advisory lock is free, now held by this session for
-- the life of the connection (NULL: live processes hold every slot).
SELECT take_pod_slot($1, $2);

-- name: retake_pod_slot :val
-- $1 pod_id, $2 slot. On a new lease connection: true when this session holds
-- the slot's lock again (false: another session holds it).
SELECT pg_try_advisory_lock(pod_slot_key($1, $2));

-- name: register_worker :one
-- $1 worker_id, $2 pod_id, $3 pod slot (its lock held by this session), $4 this
-- process's previous worker (NULL: none; its tasks are handed back uncharged),
-- $5 hostname, $6 pid, $7 queues, $8 concurrency, $9 lease ttl s, $10 seconds
-- without any heartbeat that mean everyone lost the database (the outage is
-- recorded: no lease that ran out during it counts as expired for one more ttl).
SELECT * FROM register_worker($1, $2, $3, $4, $5, $6, $7, $8, $9, $10);

-- name: register_worker_unlocked :one
-- As register_worker, for a lease connection through a transaction-pooling proxy
-- (no slot lock can be held): $3 how many slots to try instead of a slot; the
-- slot is the first with no live lease, returned as `slot` (no row: all taken).
SELECT * FROM register_worker_unlocked($1, $2, $3, $4, $5, $6, $7, $8, $9, $10);

-- name: worker_waits :exec
-- $1 worker_id. It waits for work: enqueues of its queues notify from this commit
-- on. The exclusive lock waits for every enqueue that read the flags before this
-- commit (they hold it shared), so the claim sent after this sees their tasks
-- (migration 0014).
WITH w AS (UPDATE workers SET waiting = true WHERE worker_id = $1 AND NOT waiting RETURNING 1)
SELECT pg_advisory_xact_lock(hashtext('kubetasks.wait')), (SELECT count(*) FROM w);

-- name: worker_busy :exec
-- $1 worker_id. Every slot is taken: it claims again with its next outcome, and
-- enqueues need not wake it.
UPDATE workers SET waiting = false WHERE worker_id = $1 AND waiting;

-- name: heartbeat :one
-- $1 worker_id, $2 lease ttl s, $3 queues, $4 seconds of silence that make a peer
-- suspect, $5 seconds without any heartbeat that mean everyone lost the database
-- (the outage is recorded before anything is reaped), $6 task ids and $7
-- attempts this process runs for the worker (pause_ids: those asked to pause).
SELECT * FROM heartbeat($1, $2, $3, $4, $5, $6, $7);

-- name: reap_expired_workers :many
-- $1 seconds without any heartbeat that mean everyone lost the database.
-- Declares the workers whose lease ran out dead and releases their tasks.
SELECT * FROM reap_expired_workers($1);

-- name: release_worker :val
-- $1 worker_id, $2 lost | graceful | handback (see release_worker_tasks), $3 reason.
SELECT release_worker_tasks($1, $2::text, $3);

-- name: stop_worker :val
-- $1 worker_id, $2 final status (dead), $3 reason. Releases what it still holds
-- (a graceful release: uncharged, except a task's 4th and later), then ends
-- the worker's lease; returns how many tasks were released.
SELECT stop_worker($1, $2, $3);

-- name: set_worker_stopping :exec
-- $1 worker_id. The worker stops claiming but keeps its lease while it drains.
UPDATE workers SET status = 'stopping' WHERE worker_id = $1 AND status = 'active';

-- name: release_pod :val
-- $1 pod_id, $2 reason.
SELECT release_pod($1, $2);

-- name: get_task :one
-- $1 task id.
SELECT * FROM tasks WHERE id = $1;

-- name: list_tasks :many :replica
-- $1 statuses, $2 handlers, $3 queues, $4 tags (all required), $5 created after,
-- $6 created before, $7 limit, $8 offset, $9 due (run_at) at or after, $10 due
-- before. NULL filters match everything.
SELECT t.*, count(*) OVER () AS total
FROM tasks t
WHERE ($1::text[] IS NULL OR t.status = ANY ($1))
  AND ($2::text[] IS NULL OR t.handler = ANY ($2))
  AND ($3::text[] IS NULL OR t.queue = ANY ($3))
  AND ($4::text[] IS NULL OR t.tags @> $4)
  AND ($5::timestamptz IS NULL OR t.created_at >= $5)
  AND ($6::timestamptz IS NULL OR t.created_at < $6)
  AND ($9::timestamptz IS NULL OR t.run_at >= $9)
  AND ($10::timestamptz IS NULL OR t.run_at < $10)
ORDER BY t.id DESC
LIMIT $7 OFFSET $8;

-- name: stats_counts :many :replica
SELECT queue, status, count(*) AS n FROM tasks GROUP BY queue, status ORDER BY queue, status;

-- name: stats_oldest_pending :many :replica
-- Parked tasks (no active worker serves them) wait too: each half read by its own index.
SELECT queue, extract(epoch FROM now() - min(oldest))::float8 AS age_s
FROM (
    SELECT queue, min(run_at) AS oldest FROM tasks
    WHERE status = 'pending' AND NOT parked AND run_at <= now() GROUP BY queue
    UNION ALL
    SELECT queue, min(run_at) FROM tasks WHERE status = 'pending' AND parked AND run_at <= now() GROUP BY queue
) q
GROUP BY queue;

-- name: stats_workers :many :replica
SELECT w.worker_id, w.pod_id, w.status, w.queues, w.concurrency,
       extract(epoch FROM w.lease_expires_at - now())::float8 AS lease_left_s,
       count(t.id) AS running
FROM workers w
LEFT JOIN tasks t ON t.worker_id = w.worker_id AND t.status = 'running'
WHERE w.status IN ('active', 'stopping')
GROUP BY w.worker_id ORDER BY w.pod_id;

-- name: paused_queues :many
SELECT queue FROM queue_state WHERE paused ORDER BY queue;

-- name: cancel_task :one
-- $1 task id, $2 reason. Cancels the task and its unfinished descendants (see
-- cancel_tree). A running task's worker is told through NOTIFY; its own writes
-- are fenced out by the status change either way. No row: no such task.
SELECT previous, cancelled, descendants FROM cancel_tree($1, $2);

-- name: retry_task :one
-- $1 task id. A failed or cancelled task starts over with fresh attempts (every
-- attempt so far becomes uncharged: the numbers themselves are never reused).
WITH upd AS (
    UPDATE tasks SET status = 'pending', uncharged = attempt, graceful_releases = 0, run_at = now(),
                     finished_at = NULL,
                     error = NULL, traceback = NULL, result = NULL, updated_at = now()
    WHERE id = $1 AND status IN ('failed', 'cancelled')
    RETURNING id
), events AS (
    INSERT INTO task_events (task_id, kind) SELECT id, 'requeued' FROM upd
)
SELECT id FROM upd;

-- name: retry_failed_of_handler :val
-- $1 handler. As retry_task.
WITH upd AS (
    UPDATE tasks SET status = 'pending', uncharged = attempt, graceful_releases = 0, run_at = now(),
                     finished_at = NULL,
                     error = NULL, traceback = NULL, result = NULL, updated_at = now()
    WHERE handler = $1 AND status = 'failed'
    RETURNING id, queue
), events AS (
    INSERT INTO task_events (task_id, kind) SELECT id, 'requeued' FROM upd
), wake AS (
    SELECT pg_notify('kubetasks_enqueued', q.queue) FROM (SELECT DISTINCT queue FROM upd) q
)
SELECT (SELECT count(*) FROM upd) + 0 * (SELECT count(*) FROM wake);

-- name: wake_queue :exec
-- $1 queue.
SELECT pg_notify('kubetasks_enqueued', $1);

-- name: pause_task :one
-- $1 task id. A pending task is paused at once; a running one is asked to pause
-- (request_pause: its worker is told, its handler may pause at a checkpoint, and
-- the run pauses the task when it ends). how: paused | requested | NULL (nothing
-- to pause; status says why); no row: no such task.
SELECT how, status, attempt FROM request_pause($1);

-- name: resume_task :one
-- $1 task id. A paused task goes back to pending; a running one asked to pause
-- is no longer asked. how: resumed | withdrawn | NULL (nothing to resume); no
-- row: no such task. The caller wakes the queue of a resumed one.
SELECT how, status, queue FROM resume_task($1);

-- name: pause_runs :many
-- $1 worker_id, $2 task ids, $3 attempts, $4 what each handler said (NULL:
-- nothing). Handlers that paused at a checkpoint: each task is paused with its
-- attempt handed back uncharged (outcome paused), fenced like every write of a
-- running task and refused when the worker is no longer live (its row is locked
-- first, see claim). A request that stood is cleared by pause_ended_run.
WITH me AS MATERIALIZED (
    SELECT 1 FROM workers w WHERE w.worker_id = $1 AND w.status IN ('active', 'stopping') FOR KEY SHARE
), asked AS (
    SELECT id, pause_requested_at IS NOT NULL AS asked FROM tasks WHERE id = ANY ($2::bigint[])
), done AS (
    UPDATE tasks t
    SET status = 'paused', uncharged = t.uncharged + 1, pause_outcome = 'checkpoint', run_at = now(),
        updated_at = now()
    FROM unnest($2::bigint[], $3::int[], $4::text[]) AS c(id, attempt, reason)
    -- By primary key, per id given, never through an index of running tasks (see claim).
    WHERE t.id = c.id AND t.attempt = c.attempt
      AND (t.worker_id = $1) IS TRUE AND (t.status = 'running') IS TRUE
      AND EXISTS (SELECT 1 FROM me)
    RETURNING t.id, t.attempt, t.pod_id, t.started_at, c.reason
), audit AS (
    INSERT INTO task_attempts (task_id, attempt, worker_id, pod_id, started_at, outcome, error)
    SELECT id, attempt, $1, pod_id, started_at, 'paused', reason FROM done
), events AS (
    INSERT INTO task_events (task_id, kind, attempt, worker_id, pod_id, detail)
    SELECT done.id, 'paused', done.attempt, $1, done.pod_id,
           format('at a checkpoint of attempt %s (%s)%s', done.attempt,
                  CASE WHEN asked.asked THEN 'as asked' ELSE 'by its handler, unasked' END,
                  coalesce(': ' || done.reason, ''))
    FROM done LEFT JOIN asked ON asked.id = done.id
)
SELECT id FROM done;

-- name: set_queue_paused :exec
-- $1 queue, $2 paused.
INSERT INTO queue_state (queue, paused) VALUES ($1, $2)
ON CONFLICT (queue) DO UPDATE SET paused = EXCLUDED.paused, updated_at = now();

-- name: delete_finished_tasks :val
-- $1 statuses (a subset of succeeded, failed, cancelled), $2 older than seconds.
-- A child whose parent is unfinished stays: the parent may still read its result.
-- Events and attempts go with their task.
WITH del AS (
    DELETE FROM tasks
    WHERE status = ANY ($1::text[]) AND finished_at < now() - make_interval(secs => $2)
      AND (parent_id IS NULL OR NOT EXISTS (
          SELECT 1 FROM tasks p
          WHERE p.id = tasks.parent_id AND p.status NOT IN ('succeeded', 'failed', 'cancelled')))
    RETURNING 1
)
SELECT count(*) FROM del;

-- name: get_attempts :many
-- $1 task id.
SELECT attempt, worker_id, pod_id, started_at, finished_at, outcome, error,
       extract(epoch FROM finished_at - started_at)::float8 AS duration_s
FROM task_attempts_all WHERE task_id = $1 ORDER BY id NULLS LAST;

-- name: db_now :val
SELECT now();

-- name: release_orphans :val
-- $1 worker_id, $2 ids the worker is running (or gave up writing), $3 reason.
-- Tasks running under this worker that it does not know of: a claim whose reply
-- was lost. Back to pending, the attempt handed back uncharged (its number is
-- not reused: the next claim takes a new one). The worker sends this only while
-- no claim of its own is in flight.
WITH released AS (
    UPDATE tasks SET status = 'pending', uncharged = uncharged + 1, run_at = now(), updated_at = now()
    WHERE worker_id = $1 AND status = 'running' AND id <> ALL ($2::bigint[])
    RETURNING id, attempt AS spent, pod_id, started_at, queue
), audit AS (
    INSERT INTO task_attempts (task_id, attempt, worker_id, pod_id, started_at, outcome, error)
    SELECT id, spent, $1, pod_id, started_at, 'released', $3 FROM released
), events AS (
    INSERT INTO task_events (task_id, kind, attempt, worker_id, pod_id, detail)
    SELECT id, 'released', spent, $1, pod_id, $3 FROM released
), wake AS (
    SELECT pg_notify('kubetasks_enqueued', q.queue) FROM (SELECT DISTINCT queue FROM released) q
)
SELECT (SELECT count(*) FROM released) + 0 * (SELECT count(*) FROM wake);

-- name: job_lock_acquire :val
-- $1 lock name, $2 owner token, $3 ttl seconds. Takes the lock when it is free
-- or expired, all in database time; returns the owner when taken, nothing when
-- another owner's lock is still live. Two racing acquirers of an expired row
-- serialise on its row lock and the second re-checks expires_at, so one wins.
INSERT INTO job_locks AS l (name, owner, acquired_at, expires_at)
VALUES ($1, $2, now(), now() + make_interval(secs => $3::float8))
ON CONFLICT (name) DO UPDATE
SET owner = EXCLUDED.owner, acquired_at = EXCLUDED.acquired_at, expires_at = EXCLUDED.expires_at
WHERE l.expires_at <= now()
RETURNING owner;

-- name: job_lock_renew :val
-- $1 lock name, $2 owner token, $3 ttl seconds. Extends a live lock of this
-- owner to now() + ttl; true when renewed, nothing when it expired or is not ours.
UPDATE job_locks SET expires_at = now() + make_interval(secs => $3::float8)
WHERE name = $1 AND owner = $2 AND expires_at > now()
RETURNING true;

-- name: job_lock_release :val
-- $1 lock name, $2 owner token. Deletes the lock only when this owner holds it;
-- true when it was still live (an expired row of ours is removed too, but false).
WITH del AS (
    DELETE FROM job_locks WHERE name = $1 AND owner = $2
    RETURNING expires_at > now() AS live
)
SELECT coalesce((SELECT live FROM del), false);

-- name: job_lock_holder :one
-- $1 lock name. The live holder and the seconds left on its lock, database time.
SELECT owner, extract(epoch FROM expires_at - now())::float8 AS expires_in_s
FROM job_locks WHERE name = $1 AND expires_at > now();

-- name: job_lock_holders :many
-- $1 lock names. job_lock_holder for many locks at once: one row per live lock.
SELECT name, owner, extract(epoch FROM expires_at - now())::float8 AS expires_in_s
FROM job_locks WHERE name = ANY ($1::text[]) AND expires_at > now();

-- name: claim_limited :many
-- $1 worker_id, $2 pod_id, $3 queue, $4 handler, $5 the limit this pod declares
-- (NULL: none; the database's applies either way), $6 how many.
SELECT * FROM claim_limited($1, $2, $3, $4, $5, $6);

-- name: set_worker_namespace :exec
-- $1 worker_id, $2 namespace of its pod (POD_NAMESPACE), $3 its release's pod
-- label selector (NULL: none).
UPDATE workers SET namespace = $2, pod_selector = $3 WHERE worker_id = $1;

-- name: ingest_refused :val
-- $1 handler (as written, may be unknown), $2 queue, $3 error, $4 cr_uid,
-- $5 cr_namespace, $6 cr_name. A Task object the API server accepted but we
-- cannot run: recorded as failed at once, with the reason, so its status says why.
INSERT INTO tasks (handler, queue, status, error, finished_at, cr_uid, cr_namespace, cr_name)
VALUES ($1, $2, 'failed', $3, now(), $4, $5, $6)
ON CONFLICT (cr_uid) WHERE cr_uid IS NOT NULL DO NOTHING
RETURNING id;

-- name: cr_task_by_uid :one
-- $1 cr_uid.
SELECT id, status, attempt, pause_requested_at FROM tasks WHERE cr_uid = $1;

-- name: cr_tasks_by_ids :many
-- $1 task ids, $2 namespaces (NULL: every one). What a Task object's status is
-- written from, with the version of the status owed (NULL: none owed).
SELECT t.id, t.cr_uid, t.cr_namespace, t.cr_name, t.handler, t.queue, t.status, t.attempt,
       t.max_attempts, t.pod_id, t.started_at, t.finished_at, t.error, t.result, t.progress,
       t.progress_message, t.updated_at, t.attempt - t.uncharged AS attempts_spent, o.ver AS owed_ver,
       t.parked, t.pause_requested_at, t.pause_outcome, t.progress_stage, t.progress_metadata
FROM tasks t LEFT JOIN cr_status_owed o ON o.task_id = t.id
WHERE t.id = ANY ($1::bigint[]) AND t.cr_uid IS NOT NULL
  AND ($2::text[] IS NULL OR t.cr_namespace = ANY ($2::text[]));

-- name: cr_status_owed :many
-- $1 namespaces (NULL: every one), $2 how many. Statuses not yet written, oldest first.
SELECT o.task_id FROM cr_status_owed o JOIN tasks t ON t.id = o.task_id
WHERE ($1::text[] IS NULL OR t.cr_namespace = ANY ($1::text[]))
ORDER BY o.task_id LIMIT $2;

-- name: cr_status_written :exec
-- $1 task id, $2 the owed version that was written. A change since then keeps it owed.
DELETE FROM cr_status_owed WHERE task_id = $1 AND ver = $2;

-- name: cr_status_drop :exec
-- $1 task ids whose object is gone: nothing is owed to an object that no longer exists.
DELETE FROM cr_status_owed WHERE task_id = ANY ($1::bigint[]);

-- name: cr_tasks_by_uids :many
-- $1 object uids. Which of them have a row, and in what state.
SELECT cr_uid, id, status, pause_requested_at FROM tasks WHERE cr_uid = ANY ($1::text[]);

-- name: cr_unfinished :many
-- $1 namespaces (NULL: every one). Unfinished rows of Task objects, to compare with a listing.
SELECT id, cr_uid, cr_namespace, cr_name, status FROM tasks
WHERE cr_uid IS NOT NULL AND status IN ('pending', 'running', 'paused', 'suspended')
  AND ($1::text[] IS NULL OR cr_namespace = ANY ($1::text[]));

-- name: live_workers_of_release :many
-- $1 namespace, $2 the release's pod label selector.
SELECT worker_id, pod_id FROM workers
WHERE namespace = $1 AND pod_selector = $2 AND status IN ('active', 'stopping');

-- name: operator_lease_take :one
-- $1 scope, $2 holder (pod), $3 holder id (one per process), $4 seconds it lasts.
-- Takes the lease when it is free or expired, renews it when it is ours; no
-- row: another process holds it. A new holder starts a new term.
INSERT INTO operator_leases AS l (scope, holder, holder_id, term, expires_at)
VALUES ($1, $2, $3, 1, now() + make_interval(secs => $4))
ON CONFLICT (scope) DO UPDATE
SET holder = EXCLUDED.holder, holder_id = EXCLUDED.holder_id,
    term = CASE WHEN l.holder_id = EXCLUDED.holder_id THEN l.term ELSE l.term + 1 END,
    acquired_at = CASE WHEN l.holder_id = EXCLUDED.holder_id THEN l.acquired_at ELSE now() END,
    renewed_at = now(), expires_at = EXCLUDED.expires_at
WHERE l.holder_id = EXCLUDED.holder_id OR l.expires_at <= now()
RETURNING term;

-- name: operator_lease_release :exec
-- $1 scope, $2 holder id. A leader stepping down lets the next one in at once.
DELETE FROM operator_leases WHERE scope = $1 AND holder_id = $2;

-- name: operator_lease_get :one
-- $1 scope.
SELECT scope, holder, holder_id, term, acquired_at, renewed_at, expires_at, expires_at > now() AS live
FROM operator_leases WHERE scope = $1;

-- name: metrics_queue_depths :many :replica
-- Per queue with pending tasks: all pending (delayed included), the due ones, and
-- how long the oldest due one has waited -- parked ones (no active worker serves
-- them) included: they wait too. Read by /metrics, cached ~2 s; it walks the
-- claim's index and the small one of parked tasks, so it costs what the pending
-- set costs.
SELECT queue, sum(pending)::bigint AS pending, sum(due)::bigint AS due,
       extract(epoch FROM now() - min(oldest_due))::float8 AS oldest_due_age_s
FROM (
    SELECT queue, count(*) AS pending, count(*) FILTER (WHERE run_at <= now()) AS due,
           min(run_at) FILTER (WHERE run_at <= now()) AS oldest_due
    FROM tasks WHERE status = 'pending' AND NOT parked
    GROUP BY queue
    UNION ALL
    SELECT queue, count(*), count(*) FILTER (WHERE run_at <= now()), min(run_at) FILTER (WHERE run_at <= now())
    FROM tasks WHERE status = 'pending' AND parked
    GROUP BY queue
) q
GROUP BY queue ORDER BY queue;

-- name: health_applied_migrations :many
-- The readiness probe's one statement: proves the database answers and lists the
-- applied migration versions, which the caller compares with the ones it ships.
SELECT version FROM schema_migrations ORDER BY version;

-- name: schedule_upsert :one
-- $1 name, $2 cron, $3 timezone, $4 handler, $5 queue, $6 payload (json text),
-- $7 concurrency_policy, $8 lock_ttl_s, $9 starting_deadline_s, $10 suspend,
-- $11 source (code | crd | api), $12 cr_uid, $13 count ticks from (NULL: now()).
-- A change of timing or cr_uid, or a resume, restarts the cursor; a schedule
-- of the other source under this name is left alone (nothing is returned).
INSERT INTO schedules AS s (name, cron, timezone, handler, queue, payload, concurrency_policy,
                            lock_ttl_s, starting_deadline_s, suspend, source, cr_uid, ticks_from)
VALUES ($1, $2, $3, $4, $5, $6::text::jsonb, $7, $8, $9, $10, $11, $12, coalesce($13::timestamptz, now()))
ON CONFLICT (name) DO UPDATE
SET cron = EXCLUDED.cron, timezone = EXCLUDED.timezone, handler = EXCLUDED.handler,
    queue = EXCLUDED.queue, payload = EXCLUDED.payload,
    concurrency_policy = EXCLUDED.concurrency_policy, lock_ttl_s = EXCLUDED.lock_ttl_s,
    starting_deadline_s = EXCLUDED.starting_deadline_s, suspend = EXCLUDED.suspend,
    cr_uid = EXCLUDED.cr_uid, updated_at = now(),
    ticks_from = CASE
        WHEN (s.cron, s.timezone, s.cr_uid) IS DISTINCT FROM (EXCLUDED.cron, EXCLUDED.timezone, EXCLUDED.cr_uid)
          OR (s.suspend AND NOT EXCLUDED.suspend)
        THEN greatest(EXCLUDED.ticks_from, s.last_tick_at) ELSE s.ticks_from END
WHERE s.source = EXCLUDED.source
RETURNING s.name, (s.xmax = 0) AS created;

-- name: schedule_delete :val
-- $1 name, $2 source (NULL: either). Its tick history goes with it; its runs stay.
WITH del AS (
    DELETE FROM schedules WHERE name = $1 AND ($2::text IS NULL OR source = $2) RETURNING 1
)
SELECT count(*) > 0 FROM del;

-- name: schedules_all :many
-- What a scheduler pass reads. A schedule paused at runtime (0012) is suspended.
SELECT name, cron, timezone, suspend OR paused AS suspend, source, starting_deadline_s, ticks_from, last_tick_at
FROM schedules ORDER BY name;

-- name: schedule_for_tick :one
-- $1 name. Locks the schedule for one tick's transaction: its schedulers take
-- turns and each turn re-reads the cursor. The latest run is the Forbid guard.
SELECT s.name, s.handler, s.queue, s.payload, s.concurrency_policy, s.lock_ttl_s,
       s.ticks_from, s.last_tick_at, s.last_task_id, t.status AS last_status, t.pod_id AS last_pod
FROM schedules s LEFT JOIN tasks t ON t.id = s.last_task_id
WHERE s.name = $1
FOR UPDATE OF s;

-- name: schedule_advance :exec
-- $1 name, $2 the newest tick handled.
UPDATE schedules SET last_tick_at = greatest(last_tick_at, $2) WHERE name = $1;

-- name: cron_ticks_missed :val
-- $1 schedule, $2 missed tick times, $3 further missed ticks counted but not listed.
WITH ins AS (
    INSERT INTO cron_ticks (schedule, tick_at, outcome)
    SELECT $1, m.t, 'missed' FROM unnest($2::timestamptz[]) AS m(t)
    ON CONFLICT DO NOTHING
    RETURNING 1
), n AS (
    SELECT count(*) + $3::bigint AS n FROM ins
), upd AS (
    UPDATE schedules SET missed_total = missed_total + n.n FROM n WHERE name = $1
)
SELECT n FROM n;

-- name: cron_tick_claim :val
-- $1 schedule, $2 tick_at, $3 manual. The one insert that succeeds runs the tick.
INSERT INTO cron_ticks (schedule, tick_at, outcome, manual) VALUES ($1, $2, 'enqueued', $3)
ON CONFLICT DO NOTHING
RETURNING true;

-- name: cron_enqueue :val
-- $1 handler, $2 queue, $3 priority, $4 payload (json text), $5 max_attempts,
-- $6 timeout_s, $7 retry_delay_s, $8 retry_backoff, $9 max_retry_delay_s, $10 tags.
-- The run of a tick, due now, inserted in the tick's transaction.
INSERT INTO tasks (handler, queue, priority, payload, max_attempts, timeout_s,
                   retry_delay_s, retry_backoff, max_retry_delay_s, tags)
VALUES ($1, $2, $3, $4::text::jsonb, $5, $6, $7, $8, $9, $10)
RETURNING id;

-- name: cron_tick_enqueued :exec
-- $1 schedule, $2 tick_at, $3 task id.
WITH tick AS (
    UPDATE cron_ticks SET task_id = $3 WHERE schedule = $1 AND tick_at = $2
)
UPDATE schedules SET last_task_id = $3 WHERE name = $1;

-- name: cron_tick_skipped :exec
-- $1 schedule, $2 tick_at, $3 holder, $4 reason.
UPDATE cron_ticks SET outcome = 'skipped', holder = $3, reason = $4 WHERE schedule = $1 AND tick_at = $2;

-- name: cron_ticks_prune :exec
-- $1 schedule, $2 how many of its newest ticks to keep.
DELETE FROM cron_ticks
WHERE schedule = $1
  AND tick_at <= (SELECT tick_at FROM cron_ticks WHERE schedule = $1 ORDER BY tick_at DESC OFFSET $2 LIMIT 1);

-- name: schedules_status :many :replica
-- $1 names (NULL: all). With the database's now().
SELECT s.name, s.cron, s.timezone, s.handler, s.queue, s.concurrency_policy, s.lock_ttl_s,
       s.starting_deadline_s, s.suspend, s.source, s.cr_uid, s.last_tick_at, s.last_task_id,
       s.missed_total, s.paused, s.paused_by, s.paused_at, t.status AS last_status, t.error AS last_error,
       k.outcome AS last_outcome, k.reason AS last_reason,
       (SELECT c.tick_at FROM cron_ticks c
        WHERE c.schedule = s.name AND c.task_id = s.last_task_id) AS last_scheduled_at,
       -- Each tick's task by its id (a scalar subquery, one index probe per tick): as a join the
       -- planner may merge it with the tasks table's whole primary key. The ticks newest first in
       -- a subquery of their own (its ORDER BY keeps it from being flattened), so the walk stops
       -- at the first success instead of probing every tick and sorting.
       (SELECT c.tick_at FROM (SELECT c.tick_at, c.task_id FROM cron_ticks c
                               WHERE c.schedule = s.name ORDER BY c.tick_at DESC) c
        WHERE (SELECT r.status FROM tasks r WHERE r.id = c.task_id) = 'succeeded'
        LIMIT 1) AS last_successful_at,
       (SELECT count(*) FROM cron_ticks c
        WHERE c.schedule = s.name AND c.task_id IS NOT NULL
          AND (SELECT r.status FROM tasks r WHERE r.id = c.task_id)
              IN ('pending', 'running', 'paused', 'suspended')) AS active,
       -- A 'code' schedule no active worker's code declares (see schedules_orphaned).
       (s.source = 'code' AND EXISTS (SELECT 1 FROM workers w WHERE w.status = 'active')
        AND NOT EXISTS (SELECT 1 FROM workers w
                        WHERE w.status = 'active' AND (w.periodics IS NULL OR s.name = ANY (w.periodics))))
           AS orphaned,
       s.payload, now() AS db_now
FROM schedules s
LEFT JOIN tasks t ON t.id = s.last_task_id
LEFT JOIN LATERAL (
    SELECT c.outcome, c.reason FROM cron_ticks c WHERE c.schedule = s.name ORDER BY c.tick_at DESC LIMIT 1
) k ON true
WHERE $1::text[] IS NULL OR s.name = ANY ($1)
ORDER BY s.name;

-- name: schedules_history :many :replica
-- $1 names (NULL: all), $2 ticks per schedule, newest first (missed ticks left out).
SELECT c.schedule, c.tick_at, c.outcome, c.manual, c.task_id, c.holder, c.reason,
       t.status, t.started_at, t.finished_at
FROM schedules s
CROSS JOIN LATERAL (
    SELECT * FROM cron_ticks c
    WHERE c.schedule = s.name AND c.outcome <> 'missed'
    ORDER BY c.tick_at DESC LIMIT $2
) c
LEFT JOIN tasks t ON t.id = c.task_id
WHERE $1::text[] IS NULL OR s.name = ANY ($1)
ORDER BY c.schedule, c.tick_at DESC;

-- name: spawn_children :many
-- $1 parent id, $2 its attempt, $3 worker_id (the spawn is fenced like every
-- write of a running task, and holds the parent row FOR SHARE, so a cancel of
-- the parent either sees these children or makes this insert nothing),
-- $4 spawn keys, then one array per column as in enqueue_many: $5 handler,
-- $6 queue, $7 priority, $8 payload (json text), $9 max_attempts, $10 run_at,
-- $11 delay, $12 timeout_s, $13 retry_delay_s, $14 retry_backoff,
-- $15 max_retry_delay_s, $16 tags (joined by \x1f). Refused when the worker is
-- no longer live (its row is locked first, see claim). A key the parent already
-- spawned (an earlier run of its handler) returns that child. One row per key,
-- in order; none when the parent is no longer this attempt's.
WITH me AS MATERIALIZED (
    SELECT 1 FROM workers w WHERE w.worker_id = $3 AND w.status IN ('active', 'stopping') FOR KEY SHARE
), parent AS (
    SELECT id FROM tasks WHERE id = $1 AND attempt = $2 AND worker_id = $3 AND status = 'running'
      AND EXISTS (SELECT 1 FROM me)
    FOR SHARE
), ins AS (
    INSERT INTO tasks (handler, queue, priority, payload, max_attempts, run_at, timeout_s,
                       retry_delay_s, retry_backoff, max_retry_delay_s, tags, parent_id, spawn_key)
    SELECT c.handler, c.queue, c.priority, c.payload::jsonb, c.max_attempts,
           coalesce(c.run_at, now() + make_interval(secs => coalesce(c.delay, 0))),
           c.timeout_s, c.retry_delay_s, c.retry_backoff, c.max_retry_delay_s,
           CASE WHEN c.tags IS NULL THEN '{}'::text[] ELSE string_to_array(c.tags, E'\x1f') END,
           parent.id, c.spawn_key
    FROM parent,
         unnest($4::text[], $5::text[], $6::text[], $7::int[], $8::text[], $9::int[], $10::timestamptz[],
                $11::float8[], $12::float8[], $13::float8[], $14::float8[], $15::float8[], $16::text[])
         WITH ORDINALITY AS c(spawn_key, handler, queue, priority, payload, max_attempts, run_at, delay,
                              timeout_s, retry_delay_s, retry_backoff, max_retry_delay_s, tags, ord)
    ORDER BY c.ord
    ON CONFLICT (parent_id, spawn_key) WHERE parent_id IS NOT NULL DO NOTHING
    RETURNING id, spawn_key, handler
)
SELECT k.spawn_key, coalesce(ins.id, old.id) AS id, coalesce(ins.handler, old.handler) AS handler,
       ins.id IS NOT NULL AS created
FROM parent
CROSS JOIN unnest($4::text[]) WITH ORDINALITY AS k(spawn_key, ord)
LEFT JOIN ins ON ins.spawn_key = k.spawn_key
LEFT JOIN tasks old ON old.parent_id = $1 AND old.parent_id IS NOT NULL AND old.spawn_key = k.spawn_key
ORDER BY k.ord;

-- name: children_state :many
-- $1 task ids. What a waiting parent reads of the children it waits for.
SELECT id, parent_id, handler, status, result, error FROM tasks WHERE id = ANY ($1::bigint[]);

-- name: suspend_tasks :many
-- $1 worker_id, $2 task ids, $3 attempts, $4 what each waits for (a JSON array
-- of arrays of child ids), $5 policies (fail_fast | collect). Fenced; returns
-- the ids written and whether each is now suspended or (nothing left to wait
-- for) pending again.
SELECT suspended_id AS id, now_status AS status FROM suspend_tasks($1, $2, $3, $4::text::jsonb, $5);

-- name: record_fenced_out :exec
-- $1 worker_id, $2 pod_id, $3 task ids, $4 attempts, $5 what was dropped. Best
-- effort, off the hot path: a write of this worker found its task taken away.
INSERT INTO task_events (task_id, kind, attempt, worker_id, pod_id, detail)
SELECT t.id, 'fenced_out', c.attempt, $1, $2, c.detail
FROM unnest($3::bigint[], $4::int[], $5::text[]) AS c(id, attempt, detail)
JOIN tasks t ON t.id = c.id;

-- name: get_events :many
-- $1 task id. The task's history, oldest first: the events table, plus the kinds
-- read from rows that already record them (created from the task; claimed from
-- each ended attempt's start and from the task row while it runs or once it
-- succeeded; succeeded from the task row), which the hot path therefore never
-- writes twice.
SELECT e.at, e.kind, e.attempt, e.worker_id, e.pod_id, e.detail
FROM (
    SELECT t.created_at AS at, 'created' AS kind, NULL::integer AS attempt, NULL::uuid AS worker_id,
           NULL::text AS pod_id, NULL::text AS detail, 0 AS rank, 0::bigint AS seq
    FROM tasks t WHERE t.id = $1
    UNION ALL
    SELECT a.started_at, 'claimed', a.attempt, a.worker_id, a.pod_id, NULL, 1, a.id
    FROM task_attempts a WHERE a.task_id = $1 AND a.started_at IS NOT NULL
    UNION ALL
    SELECT t.started_at, 'claimed', t.attempt, t.worker_id, t.pod_id, NULL, 1, 0
    FROM tasks t WHERE t.id = $1 AND t.status = 'running'
    UNION ALL
    SELECT x.at, x.kind, x.attempt, x.worker_id, x.pod_id, x.detail, 2, x.id
    FROM task_events x WHERE x.task_id = $1
    UNION ALL
    SELECT t.finished_at, 'succeeded', t.attempt, t.worker_id, t.pod_id, NULL, 3, 0
    FROM tasks t WHERE t.id = $1 AND t.status = 'succeeded'
    UNION ALL
    SELECT t.started_at, 'claimed', t.attempt, t.worker_id, t.pod_id, NULL, 1, 0
    FROM tasks t WHERE t.id = $1 AND t.status = 'succeeded'
) e
ORDER BY e.at, e.rank, e.seq;

-- name: workflow_tasks :many
-- $1 root task id. The root and all its descendants, parents before children,
-- with the seconds each has spent running (its ended attempts, suspended runs
-- included, plus the current one), and the database's now().
WITH RECURSIVE tree AS (
    SELECT id, 0 AS depth FROM tasks WHERE id = $1
    UNION ALL
    SELECT c.id, tree.depth + 1 FROM tree JOIN tasks c ON c.parent_id = tree.id AND c.parent_id IS NOT NULL
    WHERE tree.depth < 1000
)
SELECT t.id, t.parent_id, t.spawn_key, t.handler, t.queue, t.status, t.attempt, t.uncharged, t.max_attempts, t.error,
       t.progress, t.progress_message, t.created_at, t.started_at, t.finished_at, tree.depth,
       coalesce(a.run_s, 0)
         + CASE WHEN t.status = 'running' THEN extract(epoch FROM now() - t.started_at)::float8 ELSE 0 END
         AS run_s,
       coalesce(a.runs, 0) AS runs, now() AS db_now
FROM tree
JOIN tasks t ON t.id = tree.id
LEFT JOIN LATERAL (
    SELECT sum(extract(epoch FROM x.finished_at - x.started_at))::float8 AS run_s, count(*) AS runs
    FROM task_attempts_all x WHERE x.task_id = t.id
) a ON true
ORDER BY tree.depth, t.id;

-- name: children_counts :many
-- $1 parent task ids. Direct children per parent and status: what the Task
-- object of a workflow root shows in its status.
SELECT parent_id, status, count(*) AS n
FROM tasks
WHERE parent_id = ANY ($1::bigint[]) AND parent_id IS NOT NULL
GROUP BY parent_id, status
ORDER BY parent_id, status;

-- name: cron_notify_ticked :exec
-- $1 schedule. Sent (at commit) when a tick was enqueued, skipped or missed, for
-- whoever shows schedules' status; schedulers do not listen to it.
SELECT pg_notify('kubetasks_cron_ticked', $1);

-- name: crd_schedules :many
-- $1 namespaces (NULL: every one). Schedules that came from CronJobLock objects
-- (named <namespace>/<name>).
SELECT name, cr_uid FROM schedules
WHERE source = 'crd' AND ($1::text[] IS NULL OR split_part(name, '/', 1) = ANY ($1::text[]));

-- name: crd_schedule_delete :val
-- $1 name, $2 the uid of the object it came from. A schedule re-created by a
-- newer object of the same name has another uid and stays.
WITH del AS (
    DELETE FROM schedules WHERE source = 'crd' AND name = $1 AND cr_uid = $2 RETURNING 1
)
SELECT count(*) > 0 FROM del;

-- name: workers_of_pod_dead :many
-- $1 pod, $2 its namespace, $3 its release's pod label selector, $4 reason.
-- Declares that pod's live workers of this release dead; the caller releases
-- their tasks next in the same transaction (release_worker, mode 'lost'), as
-- release_pod does for a pod of any release.
WITH live AS (
    SELECT worker_id FROM workers
    WHERE pod_id = $1 AND namespace = $2 AND pod_selector = $3 AND status IN ('active', 'stopping')
    ORDER BY worker_id
    FOR UPDATE
)
UPDATE workers w SET status = 'dead', stopped_at = now(), stop_reason = $4
FROM live WHERE w.worker_id = live.worker_id
RETURNING w.worker_id;

-- name: worker_serves :one
-- $1 worker_id, $2 the handlers it serves, $3 the cluster-wide limits it declares
-- (json object text, handler -> limit), $4 each handler's options (json array
-- text of {name, queue, priority, timeout_s, max_attempts, retry_delay_s,
-- retry_backoff, max_retry_delay_s}), $5 how many parked tasks to unpark at most.
-- Right after registering: unparks what it serves, returns the database's limits
-- of its handlers, how many it unparked and whether more are left.
SELECT limits, unparked, more FROM worker_serves($1, $2, $3::text::jsonb, $4::text::jsonb, $5);

-- name: set_worker_queues :exec
-- $1 worker_id, $2 the queues it serves now (its handlers changed, or under `*` it
-- found tasks of them in another queue). worker_serves, called next, unparks there.
UPDATE workers SET queues = $2::text[] WHERE worker_id = $1 AND status IN ('active', 'stopping');

-- name: queues_with_pending :many
-- $1 handlers. The queues holding pending tasks of these handlers, claimable or
-- parked: pending_pairs, a skip scan (one index descent per (queue, handler)).
SELECT DISTINCT queue FROM pending_pairs WHERE handler = ANY ($1::text[]) ORDER BY queue;

-- name: park_unserved :one
-- $1 the caller's handlers (for the limits returned), $2 seconds between passes
-- across the cluster, $3 force (a pass that ran out of rows goes on), $4 rows to
-- rewrite at most. See park_unserved in schema.sql.
SELECT ran, parked, unparked, more, next_in, limits FROM park_unserved($1, $2, $3, $4);

-- name: served_pairs :many
-- What the active workers serve: (queue, handler), handler NULL for a worker of
-- an earlier version, which serves every handler of the queue.
SELECT queue, handler FROM served_pairs ORDER BY queue, handler NULLS FIRST;

-- name: unserved_counts :many
-- The (queue, handler) pairs whose pending tasks no active worker serves, and how
-- many tasks each holds: the parking pass's pairs (pending_pairs_served: a skip
-- scan, and a probe of each pair's workers) as the workers stand now, so it holds
-- even while no pod is up to park anything, then an index count of each such pair.
SELECT pp.queue, pp.handler,
       (SELECT count(*) FROM tasks x
        WHERE x.status = 'pending' AND NOT x.parked AND x.queue = pp.queue AND x.handler = pp.handler)
     + (SELECT count(*) FROM tasks x
        WHERE x.status = 'pending' AND x.parked AND x.queue = pp.queue AND x.handler = pp.handler) AS tasks
FROM (SELECT DISTINCT queue, handler FROM pending_pairs_served WHERE NOT served) pp
ORDER BY pp.handler, pp.queue;

-- name: handler_options :many
-- $1 handler names. Their options as the latest registration declared them.
SELECT name, queue, priority, timeout_s, max_attempts, retry_delay_s, retry_backoff, max_retry_delay_s,
       cluster_concurrency
FROM handlers WHERE name = ANY ($1::text[]);

-- name: hand_back :val
-- $1 worker_id, $2 task id, $3 attempt, $4 reason. A task this worker claimed but
-- cannot run (its handler is no longer registered here) goes back to pending
-- with its attempt handed back uncharged (like release_orphans: its number is
-- not reused), fenced like every write of a running task.
WITH back AS (
    UPDATE tasks SET status = 'pending', uncharged = uncharged + 1, run_at = now(), updated_at = now()
    WHERE id = $2 AND attempt = $3 AND worker_id = $1 AND status = 'running'
    RETURNING id, attempt AS spent, pod_id, started_at, queue
), audit AS (
    INSERT INTO task_attempts (task_id, attempt, worker_id, pod_id, started_at, outcome, error)
    SELECT id, spent, $1, pod_id, started_at, 'released', $4 FROM back
), events AS (
    INSERT INTO task_events (task_id, kind, attempt, worker_id, pod_id, detail)
    SELECT id, 'released', spent, $1, pod_id, $4 FROM back
), wake AS (
    SELECT pg_notify('kubetasks_enqueued', queue) FROM back
)
SELECT (SELECT count(*) FROM back) + 0 * (SELECT count(*) FROM wake);

-- name: oldest_transaction :one
-- The session of this database, other than the caller's, with the oldest open
-- transaction holding a snapshot: it holds back what vacuum may remove from
-- every table here (horizon.py). No row: none.
SELECT pid, usename, application_name, client_addr::text AS client_addr, state,
       extract(epoch FROM now() - xact_start)::float8 AS xact_age_s,
       extract(epoch FROM xact_start)::float8 AS xact_start_epoch,
       left(query, 300) AS query
FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
  AND backend_xmin IS NOT NULL AND xact_start IS NOT NULL
ORDER BY xact_start
LIMIT 1;
