-- 0006: fewer indexes written per task. A task row is updated twice in its
-- life (claim, outcome), and neither update can be HOT (status decides the
-- partial indexes), so every full index on tasks costs an index insert per
-- update. Keep full indexes to the primary key; the rest become partial,
-- covering only the rows their queries look for.

SET LOCAL search_path = kubetasks;

-- NULL cr_uids (tasks enqueued from Python) were indexed for nothing.
ALTER TABLE tasks DROP CONSTRAINT cr_uid_unique;
CREATE UNIQUE INDEX tasks_cr_uid ON tasks (cr_uid) WHERE cr_uid IS NOT NULL;

-- Only the cluster-wide concurrency count reads handler with status, and it
-- counts running tasks; retrying a handler's failed tasks is a rare admin scan.
DROP INDEX tasks_handler_status;
CREATE INDEX tasks_running_by_handler ON tasks (handler) WHERE status = 'running';

-- list_tasks pages by id; a created-range filter scans (admin use).
DROP INDEX tasks_created_at;
