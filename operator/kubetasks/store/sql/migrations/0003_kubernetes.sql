-- 0003: what the Kubernetes layer needs: the namespace a worker's pod runs in
-- (to reconcile workers against a Pod listing) and change notifications for
-- tasks that came from a Task object (for the status writer).

SET LOCAL search_path = kubetasks;

ALTER TABLE workers ADD COLUMN namespace text;

CREATE FUNCTION notify_cr_task_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('kubetasks_cr_changed', NEW.id::text);
    RETURN NULL;
END;
$$;
-- Only rows of Task objects, and only changes a status shows: the hot path of
-- plain enqueued tasks pays nothing but the WHEN test.
CREATE TRIGGER tasks_notify_cr_inserted AFTER INSERT ON tasks
    FOR EACH ROW WHEN (NEW.cr_uid IS NOT NULL) EXECUTE FUNCTION notify_cr_task_changed();
CREATE TRIGGER tasks_notify_cr_updated AFTER UPDATE ON tasks
    FOR EACH ROW WHEN (NEW.cr_uid IS NOT NULL AND
        (OLD.status, OLD.attempt, OLD.progress, OLD.progress_message, OLD.pod_id)
        IS DISTINCT FROM (NEW.status, NEW.attempt, NEW.progress, NEW.progress_message, NEW.pod_id))
    EXECUTE FUNCTION notify_cr_task_changed();

CREATE INDEX tasks_cr_unfinished ON tasks (id)
    WHERE cr_uid IS NOT NULL AND status IN ('pending', 'running', 'paused');
