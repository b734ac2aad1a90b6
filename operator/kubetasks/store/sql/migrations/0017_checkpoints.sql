-- 0017: checkpoints a handler records (issue 17 item 8): task.audit(code,
-- message, metadata) writes a task_events row of kind 'checkpoint', its detail
-- a JSON object {"code", "message", "metadata"}, fenced like every write of a
-- running task.

SET LOCAL search_path = kubetasks;

ALTER TABLE task_events DROP CONSTRAINT event_kind_known,
    ADD CONSTRAINT event_kind_known CHECK (kind IN (
        'created', 'claimed', 'progress', 'retried', 'fenced_out', 'recovered', 'released', 'paused',
        'resumed', 'suspended', 'woken', 'cancelled', 'requeued', 'succeeded', 'failed', 'checkpoint'));
