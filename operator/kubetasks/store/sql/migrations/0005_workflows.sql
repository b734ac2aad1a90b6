-- 0005: workflows and the audit trail.
--
-- A task may spawn children (parent_id, with spawn_key unique per parent, so a
-- handler that runs again from the top gets the same children back) and wait
-- for them without holding a worker: it is written 'suspended' with its attempt
-- handed back, and the child whose end completes what it waits for puts it back
-- to 'pending' (trigger tasks_wake_parent). Cancelling a task cancels its
-- unfinished descendants. task_events records the transitions that have no row
-- of their own; created, claimed and succeeded are read from tasks and
-- task_attempts, so the hot path writes nothing more.

SET LOCAL search_path = kubetasks;

ALTER TABLE tasks
    ADD COLUMN parent_id   bigint CONSTRAINT tasks_parent_fk REFERENCES tasks (id) ON DELETE SET NULL,
    ADD COLUMN spawn_key   text CONSTRAINT spawn_key_length CHECK (length(spawn_key) BETWEEN 1 AND 255),
    ADD COLUMN wait_ids    bigint[],
    ADD COLUMN wait_policy text CONSTRAINT wait_policy_known CHECK (wait_policy IN ('fail_fast', 'collect'));

ALTER TABLE tasks DROP CONSTRAINT task_status_known;
ALTER TABLE tasks ADD CONSTRAINT task_status_known
    CHECK (status IN ('pending', 'running', 'succeeded', 'failed', 'cancelled', 'paused', 'suspended'));

ALTER TABLE task_attempts DROP CONSTRAINT outcome_known;
ALTER TABLE task_attempts ADD CONSTRAINT outcome_known CHECK (outcome IN (
    'succeeded', 'failed', 'retried', 'timeout', 'worker_lost', 'released', 'cancelled', 'suspended'));

-- A suspended task is unfinished: its dedupe key stays taken, its Task object is resynced.
DROP INDEX tasks_dedupe_unfinished;
CREATE UNIQUE INDEX tasks_dedupe_unfinished ON tasks (dedupe_key)
    WHERE dedupe_key IS NOT NULL AND status IN ('pending', 'running', 'paused', 'suspended');
DROP INDEX tasks_cr_unfinished;
CREATE INDEX tasks_cr_unfinished ON tasks (id)
    WHERE cr_uid IS NOT NULL AND status IN ('pending', 'running', 'paused', 'suspended');

-- The children of a task, and the identity a replayed spawn finds again.
-- Partial: top-level tasks cost the index nothing.
CREATE UNIQUE INDEX tasks_spawned ON tasks (parent_id, spawn_key) WHERE parent_id IS NOT NULL;

CREATE TABLE task_events (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id   bigint NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    at        timestamptz NOT NULL DEFAULT now(),
    kind      text NOT NULL CONSTRAINT event_kind_known CHECK (kind IN (
        'created', 'claimed', 'progress', 'retried', 'fenced_out', 'recovered', 'released', 'paused',
        'resumed', 'suspended', 'woken', 'cancelled', 'requeued', 'succeeded', 'failed')),
    attempt   integer,
    worker_id uuid,
    pod_id    text,
    detail    text
);
CREATE INDEX task_events_task ON task_events (task_id, id);

CREATE OR REPLACE FUNCTION release_worker_tasks(p_worker uuid, p_count_attempt boolean, p_reason text)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    WITH released AS (
        UPDATE tasks t SET
            status = CASE WHEN p_count_attempt AND t.attempt >= t.max_attempts THEN 'failed' ELSE 'pending' END,
            attempt = CASE WHEN p_count_attempt THEN t.attempt ELSE t.attempt - 1 END,
            error = CASE WHEN p_count_attempt THEN p_reason ELSE t.error END,
            finished_at = CASE WHEN p_count_attempt AND t.attempt >= t.max_attempts THEN now() END,
            run_at = now(),
            updated_at = now()
        WHERE t.status = 'running' AND t.worker_id = p_worker
        RETURNING t.id, t.queue, t.status, t.started_at, t.pod_id,
                  CASE WHEN p_count_attempt THEN t.attempt ELSE t.attempt + 1 END AS spent
    ), audit AS (
        INSERT INTO task_attempts (task_id, attempt, worker_id, pod_id, started_at, outcome, error)
        SELECT id, spent, p_worker, pod_id, started_at,
               CASE WHEN p_count_attempt THEN 'worker_lost' ELSE 'released' END, p_reason
        FROM released
    ), events AS (
        INSERT INTO task_events (task_id, kind, attempt, worker_id, pod_id, detail)
        SELECT r.id, k.kind, r.spent, p_worker, r.pod_id, p_reason
        FROM released r
        CROSS JOIN LATERAL (VALUES (CASE WHEN p_count_attempt THEN 'recovered' ELSE 'released' END),
                                   (CASE WHEN r.status = 'failed' THEN 'failed' END)) AS k (kind)
        WHERE k.kind IS NOT NULL
    ), wake AS (
        SELECT pg_notify('kubetasks_enqueued', q.queue)
        FROM (SELECT DISTINCT queue FROM released WHERE status = 'pending') q
    )
    SELECT (SELECT count(*) FROM released) + 0 * (SELECT count(*) FROM wake) INTO n;
    RETURN n;
END;
$$;

-- A worker's "suspended" outcomes: each task that is still this attempt's is
-- written suspended (waiting for p_waits[i], a JSON array of child ids) with
-- its attempt handed back -- or pending at once when nothing it waits for is
-- unfinished any more (or, under fail_fast, one of them already failed).
CREATE FUNCTION suspend_tasks(p_worker uuid, p_ids bigint[], p_attempts integer[], p_waits jsonb, p_policies text[])
RETURNS TABLE (suspended_id bigint, now_status text) LANGUAGE plpgsql AS $$
DECLARE
    t record;
    w bigint[];
    waiting boolean;
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_ids, 1), 0) LOOP
        SELECT x.id, x.queue, x.attempt, x.pod_id, x.started_at INTO t FROM tasks x
        WHERE x.id = p_ids[i] AND x.attempt = p_attempts[i] AND x.worker_id = p_worker AND x.status = 'running'
        FOR NO KEY UPDATE;
        CONTINUE WHEN NOT FOUND;  -- taken away: fenced out
        w := ARRAY(SELECT jsonb_array_elements_text(p_waits -> (i - 1))::bigint);
        -- A statement of its own, so a fresh snapshot: every child that ended before
        -- the lock above was granted is seen (an ending child locks its parent).
        SELECT EXISTS (SELECT 1 FROM tasks c
                       WHERE c.id = ANY (w) AND c.status NOT IN ('succeeded', 'failed', 'cancelled'))
           AND NOT (p_policies[i] = 'fail_fast' AND EXISTS (
                    SELECT 1 FROM tasks c WHERE c.id = ANY (w) AND c.status IN ('failed', 'cancelled')))
        INTO waiting;
        UPDATE tasks x
        SET status = CASE WHEN waiting THEN 'suspended' ELSE 'pending' END, attempt = x.attempt - 1,
            run_at = now(), updated_at = now(), wait_ids = w, wait_policy = p_policies[i]
        WHERE x.id = t.id;
        INSERT INTO task_attempts (task_id, attempt, worker_id, pod_id, started_at, outcome)
        VALUES (t.id, t.attempt, p_worker, t.pod_id, t.started_at, 'suspended');
        INSERT INTO task_events (task_id, kind, attempt, worker_id, pod_id, detail)
        VALUES (t.id, 'suspended', t.attempt, p_worker, t.pod_id,
                'waiting for ' || cardinality(w) || ' child task(s), ' || p_policies[i]);
        IF NOT waiting THEN
            INSERT INTO task_events (task_id, kind, detail) VALUES (t.id, 'woken', 'nothing left to wait for');
            PERFORM pg_notify('kubetasks_enqueued', t.queue);
        END IF;
        suspended_id := t.id;
        now_status := CASE WHEN waiting THEN 'suspended' ELSE 'pending' END;
        RETURN NEXT;
    END LOOP;
END;
$$;

-- A child ended: if its parent is suspended waiting for it and nothing else it
-- waits for is unfinished (or, under fail_fast, this child did not succeed),
-- the parent goes back to pending and its queue is woken. The parent row is
-- locked first, always, so two last children ending at once -- or a child
-- ending while its parent writes its suspension -- take turns, and the later
-- one sees the other's effect (each plpgsql statement takes a fresh snapshot).
CREATE FUNCTION wake_parent() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    p record;
BEGIN
    SELECT x.status, x.queue, x.wait_ids, x.wait_policy INTO p FROM tasks x
    WHERE x.id = NEW.parent_id FOR NO KEY UPDATE;
    IF NOT FOUND OR p.status <> 'suspended' OR NOT (NEW.id = ANY (p.wait_ids)) THEN
        RETURN NULL;
    END IF;
    IF NOT (p.wait_policy = 'fail_fast' AND NEW.status <> 'succeeded') AND EXISTS (
        SELECT 1 FROM tasks c WHERE c.id = ANY (p.wait_ids) AND c.status NOT IN ('succeeded', 'failed', 'cancelled')
    ) THEN
        RETURN NULL;
    END IF;
    UPDATE tasks SET status = 'pending', run_at = now(), updated_at = now() WHERE id = NEW.parent_id;
    INSERT INTO task_events (task_id, kind, detail)
    VALUES (NEW.parent_id, 'woken', 'child ' || NEW.id || ' ' || NEW.status);
    PERFORM pg_notify('kubetasks_enqueued', p.queue);
    RETURN NULL;
END;
$$;
-- Plain tasks pay only the WHEN test.
CREATE TRIGGER tasks_wake_parent AFTER UPDATE OF status ON tasks
    FOR EACH ROW WHEN (NEW.parent_id IS NOT NULL AND NEW.status IN ('succeeded', 'failed', 'cancelled')
                       AND OLD.status NOT IN ('succeeded', 'failed', 'cancelled'))
    EXECUTE FUNCTION wake_parent();

-- Cancel the unfinished tasks among p_ids; a running one's worker is told
-- through NOTIFY (its own writes are fenced out by the status change either way).
CREATE FUNCTION cancel_tasks(p_ids bigint[], p_reason text) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    WITH old AS (
        SELECT t.id, t.status, t.worker_id, t.attempt, t.pod_id, t.started_at FROM tasks t
        WHERE t.id = ANY (p_ids) AND t.status IN ('pending', 'running', 'paused', 'suspended')
        ORDER BY t.id
        FOR NO KEY UPDATE
    ), upd AS (
        UPDATE tasks t SET status = 'cancelled', finished_at = now(), updated_at = now(), error = p_reason
        FROM old WHERE t.id = old.id
        RETURNING t.id
    ), audit AS (
        INSERT INTO task_attempts (task_id, attempt, worker_id, pod_id, started_at, outcome, error)
        SELECT old.id, old.attempt, old.worker_id, old.pod_id, old.started_at, 'cancelled', p_reason
        FROM old JOIN upd ON upd.id = old.id WHERE old.status = 'running'
    ), events AS (
        INSERT INTO task_events (task_id, kind, attempt, worker_id, pod_id, detail)
        SELECT old.id, 'cancelled', old.attempt, old.worker_id, old.pod_id, p_reason
        FROM old JOIN upd ON upd.id = old.id
    ), notify AS (
        SELECT pg_notify('kubetasks_cancel', old.id::text || ':' || old.worker_id::text)
        FROM old JOIN upd ON upd.id = old.id WHERE old.status = 'running'
    )
    SELECT (SELECT count(*) FROM upd) + 0 * (SELECT count(*) FROM notify) INTO n;
    RETURN n;
END;
$$;

-- Cancel a task and every unfinished descendant, level by level. Each level's
-- children are read after the level above was locked: a spawn that committed
-- first is seen, and a later one finds its parent no longer running.
CREATE FUNCTION cancel_tree(p_id bigint, p_reason text)
RETURNS TABLE (previous text, cancelled boolean, descendants integer) LANGUAGE plpgsql AS $$
DECLARE
    lvl bigint[] := ARRAY[p_id];
BEGIN
    SELECT t.status INTO previous FROM tasks t WHERE t.id = p_id;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    cancelled := cancel_tasks(lvl, p_reason) > 0;
    descendants := 0;
    LOOP
        SELECT array_agg(c.id ORDER BY c.id) INTO lvl
        FROM tasks c WHERE c.parent_id = ANY (lvl) AND c.parent_id IS NOT NULL;
        EXIT WHEN lvl IS NULL;
        descendants := descendants + cancel_tasks(lvl, 'parent task ' || p_id || ' cancelled: ' || p_reason);
    END LOOP;
    RETURN NEXT;
END;
$$;
