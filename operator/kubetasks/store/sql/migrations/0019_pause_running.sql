-- 0019: pausing a running task (issue 17 item 7), and progress with a stage
-- and metadata (item 8).
--
-- A running task can be asked to pause. The request is a mark on its row
-- (pause_requested_at), which only a running task carries; its worker is told
-- through NOTIFY (kubetasks_pause) and, should that be missed, by its next
-- heartbeat (heartbeat's pause_ids). The handler sees it through its context
-- and may pause at a checkpoint of its choosing (pause_runs: the attempt ends
-- uncharged, outcome 'paused'); otherwise the run ends as it would have, and
-- pause_ended_run, a trigger that every path ending a run passes through (an
-- outcome, a release, a recovery after a SIGKILL, a pod of the previous
-- version), pauses the task instead of letting it run again -- or, when that
-- run finished the task, records the request as moot. pause_outcome says which
-- happened, for the Task object's status; task_events says it too.
--
-- Progress carries a stage name and a small JSON object of metadata beside
-- its percentage and message (set_progress; a change of stage is an event, as
-- a change of percentage is), reset, with the rest of a run's progress and
-- what became of a pause, when a claim starts a run.

SET LOCAL search_path = kubetasks;

ALTER TABLE tasks
    ADD COLUMN pause_requested_at timestamptz,
    ADD COLUMN pause_outcome text
        CONSTRAINT pause_outcome_known CHECK (pause_outcome IN ('checkpoint', 'after_attempt', 'moot')),
    ADD CONSTRAINT pause_requested_only_running CHECK (pause_requested_at IS NULL OR status = 'running'),
    ADD COLUMN progress_stage text
        CONSTRAINT progress_stage_name CHECK (progress_stage ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$'),
    -- The API takes 4 KiB of compact JSON; jsonb's own text adds spaces.
    ADD COLUMN progress_metadata jsonb
        CONSTRAINT progress_metadata_object CHECK (jsonb_typeof(progress_metadata) = 'object'
                                                   AND octet_length(progress_metadata::text) <= 8192);

ALTER TABLE task_events DROP CONSTRAINT event_kind_known,
    ADD CONSTRAINT event_kind_known CHECK (kind IN (
        'created', 'claimed', 'progress', 'retried', 'fenced_out', 'recovered', 'released', 'paused',
        'resumed', 'suspended', 'woken', 'cancelled', 'requeued', 'succeeded', 'failed', 'checkpoint',
        'pause_requested', 'pause_moot'));

ALTER TABLE task_attempts DROP CONSTRAINT outcome_known,
    ADD CONSTRAINT outcome_known CHECK (outcome IN (
        'succeeded', 'failed', 'retried', 'timeout', 'worker_lost', 'released', 'cancelled', 'suspended',
        'paused'));

-- A run that was asked to pause ended. Before the row is written, so whatever
-- ended it -- and whoever wrote that, a pod of the previous version included --
-- the task does not run again by itself: a task that would have (pending: a
-- retry, a release, a recovery; suspended: waiting for its children) is paused
-- instead; one the run finished keeps its end and the request is moot. A pause
-- at a checkpoint (status paused) was recorded by its writer.
CREATE FUNCTION pause_ended_run() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status IN ('pending', 'suspended') THEN
        NEW.status := 'paused';
        NEW.pause_outcome := 'after_attempt';
    ELSIF NEW.status <> 'paused' THEN
        NEW.pause_outcome := 'moot';
    END IF;
    NEW.pause_requested_at := NULL;
    RETURN NEW;
END;
$$;
CREATE TRIGGER tasks_pause_ended_run BEFORE UPDATE OF status ON tasks
    FOR EACH ROW WHEN (OLD.pause_requested_at IS NOT NULL AND NEW.status <> 'running')
    EXECUTE FUNCTION pause_ended_run();

-- Says what became of the request, after the statement (so the event follows
-- those the statement itself records for that run: retried, recovered...).
CREATE FUNCTION record_pause_end() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO task_events (task_id, kind, attempt, worker_id, pod_id, detail)
    VALUES (NEW.id, CASE WHEN NEW.pause_outcome = 'moot' THEN 'pause_moot' ELSE 'paused' END,
            OLD.attempt, OLD.worker_id, OLD.pod_id,
            CASE WHEN NEW.pause_outcome = 'moot'
                 THEN format('attempt %s ended the task (%s) before it could pause', OLD.attempt, NEW.status)
                 ELSE format('paused after attempt %s ended, instead of running again', OLD.attempt) END);
    RETURN NULL;
END;
$$;
CREATE TRIGGER tasks_pause_ended_run_event AFTER UPDATE OF status ON tasks
    FOR EACH ROW WHEN (OLD.pause_requested_at IS NOT NULL AND NEW.status <> 'running'
                       AND NEW.pause_outcome IN ('after_attempt', 'moot'))
    EXECUTE FUNCTION record_pause_end();

-- Pause a task: a pending one at once; a running one is asked to (its worker
-- told through NOTIFY; asked again, it is told again). The row is locked
-- first, so a claim or an ending run in flight is waited for and its result
-- seen. how: paused | requested | NULL (nothing to pause: status says why);
-- no row: no such task.
CREATE FUNCTION request_pause(p_id bigint) RETURNS TABLE (how text, status text, attempt integer)
LANGUAGE plpgsql AS $$
DECLARE
    t record;
BEGIN
    SELECT x.status, x.attempt, x.worker_id, x.pod_id, x.pause_requested_at INTO t
    FROM tasks x WHERE x.id = p_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    status := t.status;
    attempt := t.attempt;
    IF t.status = 'pending' THEN
        UPDATE tasks x SET status = 'paused', pause_outcome = NULL, updated_at = now() WHERE x.id = p_id;
        INSERT INTO task_events (task_id, kind) VALUES (p_id, 'paused');
        how := 'paused';
        status := 'paused';
    ELSIF t.status = 'running' THEN
        IF t.pause_requested_at IS NULL THEN
            UPDATE tasks x SET pause_requested_at = now(), updated_at = now() WHERE x.id = p_id;
            INSERT INTO task_events (task_id, kind, attempt, worker_id, pod_id, detail)
            VALUES (p_id, 'pause_requested', t.attempt, t.worker_id, t.pod_id,
                    format('asked while attempt %s ran: it pauses at a checkpoint of its handler, '
                           'or when the attempt ends', t.attempt));
        END IF;
        PERFORM pg_notify('kubetasks_pause', format('%s:%s:%s:1', p_id, t.worker_id, t.attempt));
        how := 'requested';
    END IF;
    RETURN NEXT;
END;
$$;

-- Resume a task: a paused one goes back to pending; a running one asked to
-- pause is no longer asked (its worker told through NOTIFY). how: resumed |
-- withdrawn | NULL (nothing to resume); no row: no such task.
CREATE FUNCTION resume_task(p_id bigint) RETURNS TABLE (how text, status text, queue text)
LANGUAGE plpgsql AS $$
DECLARE
    t record;
BEGIN
    SELECT x.status, x.queue, x.attempt, x.worker_id, x.pod_id, x.pause_requested_at INTO t
    FROM tasks x WHERE x.id = p_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    status := t.status;
    queue := t.queue;
    IF t.status = 'paused' THEN
        UPDATE tasks x SET status = 'pending', pause_outcome = NULL, updated_at = now() WHERE x.id = p_id;
        INSERT INTO task_events (task_id, kind) VALUES (p_id, 'resumed');
        how := 'resumed';
        status := 'pending';
    ELSIF t.status = 'running' AND t.pause_requested_at IS NOT NULL THEN
        UPDATE tasks x SET pause_requested_at = NULL, updated_at = now() WHERE x.id = p_id;
        INSERT INTO task_events (task_id, kind, attempt, worker_id, pod_id, detail)
        VALUES (p_id, 'resumed', t.attempt, t.worker_id, t.pod_id,
                format('the pause asked while attempt %s ran is withdrawn', t.attempt));
        PERFORM pg_notify('kubetasks_pause', format('%s:%s:%s:0', p_id, t.worker_id, t.attempt));
        how := 'withdrawn';
    END IF;
    RETURN NEXT;
END;
$$;

-- The heartbeat also reports which of the runs it lists are asked to pause
-- (pause_ids): the fallback for a kubetasks_pause notification missed (no
-- LISTEN connection, or one that was down). The rest is 0018's.
DROP FUNCTION heartbeat(uuid, double precision, text[], double precision, double precision, bigint[], integer[]);
CREATE FUNCTION heartbeat(
    p_worker uuid, p_ttl double precision, p_queues text[], p_suspect_after double precision,
    p_silence_after double precision, p_ids bigint[], p_attempts integer[])
RETURNS TABLE (alive boolean, lease_expires_at timestamptz, due boolean, reaped integer,
               suspect_in double precision, extended integer, gone_ids bigint[], gone_attempts integer[],
               gone_statuses text[], orphan_ids bigint[], orphan_attempts integer[], pause_ids bigint[])
LANGUAGE plpgsql AS $$
DECLARE
    q text;
    live integer;
    clock timestamptz;
BEGIN
    PERFORM 1 FROM workers w WHERE w.worker_id = p_worker AND w.status IN ('active', 'stopping')
    FOR NO KEY UPDATE;
    alive := FOUND;
    clock := clock_timestamp();
    extended := 0;
    IF alive THEN
        extended := note_outage(clock, p_silence_after);
        UPDATE workers w SET heartbeat_at = clock, lease_expires_at = clock + make_interval(secs => p_ttl)
        WHERE w.worker_id = p_worker
        RETURNING w.lease_expires_at INTO heartbeat.lease_expires_at;
    END IF;
    SELECT coalesce(sum(r.released), 0) INTO reaped FROM reap_expired_workers(p_silence_after) r;
    SELECT count(*) INTO live FROM workers w WHERE w.status IN ('active', 'stopping');
    IF random() * greatest(live, 1) < 2 THEN
        reaped := reaped + release_tasks_of_gone_workers();
    END IF;
    due := false;
    FOREACH q IN ARRAY p_queues LOOP
        IF EXISTS (SELECT 1 FROM tasks t
                   WHERE t.status = 'pending' AND NOT t.parked AND t.queue = q AND t.run_at <= now()) THEN
            due := true;
            EXIT;
        END IF;
    END LOOP;
    SELECT extract(epoch FROM min(lease_end(w.heartbeat_at, w.lease_expires_at)) - clock_timestamp())
    INTO suspect_in
    FROM workers w
    WHERE w.status IN ('active', 'stopping') AND w.worker_id <> p_worker
      AND w.heartbeat_at < clock_timestamp() - make_interval(secs => p_suspect_after);
    SELECT coalesce(array_agg(c.id) FILTER (WHERE t.id IS NULL OR t.status <> 'running'
                                                  OR t.attempt <> c.attempt OR t.worker_id <> p_worker), '{}'),
           coalesce(array_agg(c.attempt) FILTER (WHERE t.id IS NULL OR t.status <> 'running'
                                                       OR t.attempt <> c.attempt OR t.worker_id <> p_worker), '{}'),
           coalesce(array_agg(coalesce(t.status, 'deleted'))
                    FILTER (WHERE t.id IS NULL OR t.status <> 'running' OR t.attempt <> c.attempt
                                  OR t.worker_id <> p_worker), '{}'),
           coalesce(array_agg(c.id) FILTER (WHERE t.status = 'running' AND t.attempt = c.attempt
                                                  AND t.worker_id = p_worker AND t.pause_requested_at IS NOT NULL),
                    '{}')
    INTO gone_ids, gone_attempts, gone_statuses, pause_ids
    FROM unnest(coalesce(p_ids, '{}'), coalesce(p_attempts, '{}')) AS c(id, attempt)
    LEFT JOIN tasks t ON t.id = c.id;
    SELECT coalesce(array_agg(t.id), '{}'), coalesce(array_agg(t.attempt), '{}')
    INTO orphan_ids, orphan_attempts
    FROM tasks t
    WHERE alive AND t.worker_id = p_worker AND t.status = 'running' AND t.id <> ALL (coalesce(p_ids, '{}'));
    RETURN NEXT;
END;
$$;

-- A Task object's status shows a pause asked and what became of it, and the stage of its progress.
DROP TRIGGER tasks_notify_cr_updated ON tasks;
CREATE TRIGGER tasks_notify_cr_updated AFTER UPDATE ON tasks
    FOR EACH ROW WHEN (NEW.cr_uid IS NOT NULL AND
        (OLD.status, OLD.attempt, OLD.progress, OLD.progress_message, OLD.pod_id, OLD.parked,
         OLD.pause_requested_at, OLD.pause_outcome, OLD.progress_stage, OLD.progress_metadata)
        IS DISTINCT FROM (NEW.status, NEW.attempt, NEW.progress, NEW.progress_message, NEW.pod_id, NEW.parked,
                          NEW.pause_requested_at, NEW.pause_outcome, NEW.progress_stage, NEW.progress_metadata))
    EXECUTE FUNCTION notify_cr_task_changed();

-- A claim starts a run's progress afresh, its stage and metadata too, and
-- forgets what became of an earlier pause (the rest is 0009's).
CREATE OR REPLACE FUNCTION claim_limited(
    p_worker uuid, p_pod text, p_queue text, p_handler text, p_limit integer, p_want integer)
RETURNS SETOF tasks LANGUAGE plpgsql AS $$
DECLARE
    lim integer;
    room integer;
BEGIN
    PERFORM 1 FROM workers w
    WHERE w.worker_id = p_worker AND w.status = 'active' AND w.lease_expires_at > now()
    FOR KEY SHARE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    lim := least(p_limit, (SELECT h.cluster_concurrency FROM handlers h WHERE h.name = p_handler));
    room := p_want;
    IF lim IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock(hashtext('kubetasks.cluster_concurrency:' || p_handler));
        SELECT least(p_want, lim - count(*)) INTO room FROM tasks WHERE handler = p_handler AND status = 'running';
    END IF;
    IF room <= 0 THEN
        RETURN;
    END IF;
    RETURN QUERY
    WITH picked AS (
        SELECT id FROM tasks
        WHERE status = 'pending' AND NOT parked AND queue = p_queue AND handler = p_handler AND run_at <= now()
        ORDER BY priority DESC, run_at, id
        LIMIT room
        FOR UPDATE SKIP LOCKED
    )
    UPDATE tasks t
    SET status = 'running', attempt = t.attempt + 1, worker_id = p_worker, pod_id = p_pod,
        started_at = now(), updated_at = now(), progress = NULL, progress_message = NULL,
        progress_stage = NULL, progress_metadata = NULL, pause_outcome = NULL
    FROM picked
    WHERE t.id = picked.id
      AND NOT EXISTS (SELECT 1 FROM queue_state q WHERE q.queue = p_queue AND q.paused)
    RETURNING t.*;
END;
$$;
