-- 0007: a successful attempt is no longer written twice. The task row already
-- holds everything its attempt record held (attempt, worker, pod, start and
-- finish times) and a succeeded task never changes again, so the hot path
-- stops inserting it into task_attempts -- an insert, two index entries and a
-- foreign-key check per task -- and readers see it through task_attempts_all.

SET LOCAL search_path = kubetasks;

DELETE FROM task_attempts a
USING tasks t
WHERE a.task_id = t.id AND a.outcome = 'succeeded' AND t.status = 'succeeded' AND a.attempt = t.attempt;

-- Every attempt of every task: the ended ones that did not succeed, plus the
-- successful one, read from the task row. id is NULL for the latter, which is
-- always a task's last attempt (sort with NULLS LAST). A success row that a pod
-- of the previous version still writes during a rolling upgrade is ignored
-- rather than refused: refusing it would fail that pod's completions.
CREATE VIEW task_attempts_all AS
SELECT a.id, a.task_id, a.attempt, a.worker_id, a.pod_id, a.started_at, a.finished_at, a.outcome, a.error
FROM task_attempts a
WHERE a.outcome <> 'succeeded'
UNION ALL
SELECT NULL::bigint, t.id, t.attempt, t.worker_id, t.pod_id, t.started_at, t.finished_at,
       'succeeded'::text, NULL::text
FROM tasks t
WHERE t.status = 'succeeded';
