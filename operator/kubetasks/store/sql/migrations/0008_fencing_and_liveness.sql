-- 0008: guarantees under real faults (issue 13).
--
-- * The attempt number is the fencing token, so nothing lowers it any more:
--   every claim takes a new number. An attempt handed back without being
--   charged (a graceful release, a claim whose reply was lost, a workflow
--   suspending, the same process coming back after a database stall) is
--   counted in `uncharged`; max_attempts bounds the charged ones,
--   attempt - uncharged. A task released gracefully 3 times pays for the
--   4th and every later release (`graceful_releases`), so a task longer than
--   the shutdown grace cannot be handed back for ever.
-- * Liveness of a pod id's process is a session-level advisory lock held on
--   that process's lease connection: a process that can take it supersedes
--   the predecessor at once; one that cannot (a live process holds it)
--   registers in the next free slot of the same pod id (`pod_slot`).
-- * Every write about a task and every claim holds its worker's row FOR KEY
--   SHARE; whatever takes a worker out of live status locks that row FOR
--   UPDATE first. A claim that commits late is therefore seen (and released)
--   by the reaper, or the claim sees the worker dead and claims nothing.
-- * Reaping skips worker rows that are locked (by their own heartbeat, or by
--   an in-flight claim or write of that worker: it is alive), so concurrent
--   heartbeats never deadlock and never declare a heartbeating worker dead.
-- * When no live worker reached the database for a while (the database
--   stalled, restarted or failed over), the first heartbeat or registration
--   that gets through extends every live lease before anything is reaped.
--   Lease times are read from clock_timestamp(), not now(): a heartbeat that
--   waited out a stall behind a lock must neither renew from the instant it
--   was sent (its lease would be over on arrival) nor miss the silence.
-- * Each heartbeat sends the (task, attempt) pairs its process runs and gets
--   back those no longer running under it (cancelled, released) and those
--   running under it that it does not know of (a claim whose reply was lost).
--
-- * A Forbid schedule's job lock defaults to 60 s (renewed every 20 s), not
--   600 s: a run recovered after its pod died waits for that pod's lock to
--   expire, which must end well within the default task timeout (300 s).
--
-- Functions a previous-version pod calls (register_worker/7, heartbeat/4,
-- release_worker_tasks/3 with a boolean) keep their signatures and results.

SET LOCAL search_path = kubetasks;

ALTER TABLE tasks
    ADD COLUMN uncharged integer NOT NULL DEFAULT 0,
    ADD COLUMN graceful_releases integer NOT NULL DEFAULT 0;
ALTER TABLE tasks DROP CONSTRAINT attempt_range;
-- A claim counts an attempt; no task is ever claimed past its allowance of charged attempts.
ALTER TABLE tasks ADD CONSTRAINT attempt_range
    CHECK (uncharged BETWEEN 0 AND attempt AND attempt - uncharged <= max_attempts);
ALTER TABLE tasks ADD CONSTRAINT graceful_releases_positive CHECK (graceful_releases >= 0);

ALTER TABLE schedules ALTER COLUMN lock_ttl_s SET DEFAULT 60;

ALTER TABLE workers
    ADD COLUMN pod_slot integer NOT NULL DEFAULT 1 CONSTRAINT pod_slot_range CHECK (pod_slot BETWEEN 1 AND 64);
DROP INDEX workers_one_live_per_pod;
-- One live worker per pod slot: a restarted process supersedes its predecessor.
CREATE UNIQUE INDEX workers_one_live_per_pod_slot ON workers (pod_id, pod_slot)
    WHERE status IN ('active', 'stopping');

-- The key of the advisory lock a live process holds on its pod slot.
CREATE FUNCTION pod_slot_key(p_pod text, p_slot integer) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
    SELECT hashtextextended('kubetasks.pod:' || p_pod || '#' || p_slot::text, 0)
$$;

-- Take the first free slot of a pod id for this session (a session-level lock:
-- it lasts as long as the connection). NULL when live processes hold all of them.
CREATE FUNCTION take_pod_slot(p_pod text, p_max integer) RETURNS integer
LANGUAGE plpgsql AS $$
BEGIN
    FOR s IN 1 .. p_max LOOP
        IF pg_try_advisory_lock(pod_slot_key(p_pod, s)) THEN
            RETURN s;
        END IF;
    END LOOP;
    RETURN NULL;
END;
$$;

-- The one path that takes tasks away from a worker. p_mode:
--   lost      the attempt is spent (outcome worker_lost; failed when none are left);
--   graceful  handed back without charge, except from the 4th graceful release
--             of a task on, which is charged and says why;
--   handback  handed back without charge (the same process takes them back
--             after a stall, or a claim whose reply was lost).
-- Rows are locked in id order, like cancel_tasks, so the two never deadlock.
CREATE FUNCTION release_worker_tasks(p_worker uuid, p_mode text, p_reason text)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    IF p_mode NOT IN ('lost', 'graceful', 'handback') THEN
        RAISE EXCEPTION 'release mode must be lost, graceful or handback, got %', p_mode;
    END IF;
    PERFORM 1 FROM tasks t WHERE t.status = 'running' AND t.worker_id = p_worker ORDER BY t.id
    FOR NO KEY UPDATE;
    WITH decided AS (
        SELECT t.id,
               p_mode = 'lost' OR (p_mode = 'graceful' AND t.graceful_releases >= 3) AS charge,
               CASE WHEN p_mode = 'graceful' AND t.graceful_releases >= 3 THEN
                   format('%s; released %s times while it ran: from the 4th release on each one '
                          'counts an attempt (%s of %s spent)',
                          p_reason, t.graceful_releases + 1, t.attempt - t.uncharged, t.max_attempts)
               ELSE p_reason END AS why
        FROM tasks t WHERE t.status = 'running' AND t.worker_id = p_worker
    ), released AS (
        UPDATE tasks t SET
            status = CASE WHEN d.charge AND t.attempt - t.uncharged >= t.max_attempts
                          THEN 'failed' ELSE 'pending' END,
            uncharged = t.uncharged + CASE WHEN d.charge THEN 0 ELSE 1 END,
            graceful_releases = t.graceful_releases + CASE WHEN p_mode = 'graceful' THEN 1 ELSE 0 END,
            error = CASE WHEN d.charge THEN d.why ELSE t.error END,
            finished_at = CASE WHEN d.charge AND t.attempt - t.uncharged >= t.max_attempts THEN now() END,
            run_at = now(),
            updated_at = now()
        FROM decided d
        WHERE t.id = d.id AND t.status = 'running' AND t.worker_id = p_worker
        RETURNING t.id, t.queue, t.status, t.started_at, t.pod_id, t.attempt AS spent, d.charge, d.why
    ), audit AS (
        INSERT INTO task_attempts (task_id, attempt, worker_id, pod_id, started_at, outcome, error)
        SELECT id, spent, p_worker, pod_id, started_at,
               CASE WHEN p_mode = 'lost' THEN 'worker_lost' ELSE 'released' END, why
        FROM released
    ), events AS (
        INSERT INTO task_events (task_id, kind, attempt, worker_id, pod_id, detail)
        SELECT r.id, k.kind, r.spent, p_worker, r.pod_id, r.why
        FROM released r
        CROSS JOIN LATERAL (VALUES (CASE WHEN p_mode = 'lost' THEN 'recovered' ELSE 'released' END),
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

-- The previous signature: true counts the attempt, false is a graceful release.
CREATE OR REPLACE FUNCTION release_worker_tasks(p_worker uuid, p_count_attempt boolean, p_reason text)
RETURNS integer LANGUAGE sql AS $$
    SELECT release_worker_tasks(p_worker, CASE WHEN p_count_attempt THEN 'lost' ELSE 'graceful' END, p_reason)
$$;

-- True when no live worker has reached the database for p_silence_after
-- seconds: everyone lost it at once (a stall, a restart, a failover), so an
-- expired lease says nothing about whether its process is alive.
CREATE FUNCTION everyone_silent(p_silence_after double precision) RETURNS boolean
LANGUAGE sql VOLATILE AS $$
    SELECT coalesce(max(w.heartbeat_at) < clock_timestamp() - make_interval(secs => p_silence_after), false)
    FROM workers w WHERE w.status IN ('active', 'stopping')
$$;

-- Give every live worker but p_except a lease of p_ttl from now. Rows locked by
-- their own heartbeat are skipped (they are renewing themselves), so this never waits.
CREATE FUNCTION extend_live_leases(p_ttl double precision, p_except uuid) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    WITH ext AS (
        UPDATE workers w
        SET lease_expires_at = greatest(w.lease_expires_at, clock_timestamp() + make_interval(secs => p_ttl))
        WHERE w.worker_id IN (
            SELECT x.worker_id FROM workers x
            WHERE x.status IN ('active', 'stopping') AND x.worker_id IS DISTINCT FROM p_except
            ORDER BY x.worker_id
            FOR NO KEY UPDATE SKIP LOCKED)
        RETURNING 1
    )
    SELECT count(*) INTO n FROM ext;
    RETURN n;
END;
$$;

-- Register a worker in slot p_slot of pod p_pod (the caller holds that slot's
-- advisory lock, so any live worker of the slot belongs to a process that is
-- gone): that worker is superseded at once and its tasks released with the
-- attempt counted. p_predecessor is this same process's previous worker (it
-- lost its lease and comes back): its tasks are handed back without charge.
CREATE FUNCTION register_worker(
    p_worker uuid, p_pod text, p_slot integer, p_predecessor uuid, p_hostname text, p_pid integer,
    p_queues text[], p_concurrency integer, p_ttl double precision, p_silence_after double precision)
RETURNS TABLE (epoch bigint, lease_expires_at timestamptz, superseded uuid[], released integer,
               handed_back integer, extended integer)
LANGUAGE plpgsql AS $$
DECLARE
    old_ids uuid[] := '{}';
    n integer := 0;
    back integer := 0;
    ext integer := 0;
    r record;
BEGIN
    -- Serialise registrations of one slot; the unique index is the backstop.
    PERFORM pg_advisory_xact_lock(pod_slot_key(p_pod, p_slot));
    IF everyone_silent(p_silence_after) THEN
        ext := extend_live_leases(p_ttl, NULL);
    END IF;
    FOR r IN
        SELECT w.worker_id FROM workers w
        WHERE ((w.pod_id = p_pod AND w.pod_slot = p_slot) OR w.worker_id = p_predecessor)
          AND w.status IN ('active', 'stopping')
        ORDER BY w.worker_id
        FOR UPDATE
    LOOP
        UPDATE workers w SET status = 'superseded', stopped_at = now(),
                             stop_reason = 'superseded by ' || p_worker::text
        WHERE w.worker_id = r.worker_id;
        old_ids := old_ids || r.worker_id;
        IF r.worker_id = p_predecessor THEN
            back := back + release_worker_tasks(r.worker_id, 'handback',
                'handed back: the same process registered again after losing its lease');
        ELSE
            n := n + release_worker_tasks(r.worker_id, 'lost', 'worker lost: pod ' || p_pod || ' restarted');
        END IF;
    END LOOP;
    RETURN QUERY
    INSERT INTO workers AS nw (worker_id, pod_id, pod_slot, epoch, hostname, pid, queues, concurrency,
                               heartbeat_at, lease_expires_at)
    VALUES (p_worker, p_pod, p_slot,
            coalesce((SELECT max(x.epoch) FROM workers x WHERE x.pod_id = p_pod), 0) + 1,
            p_hostname, p_pid, p_queues, p_concurrency, clock_timestamp(),
            clock_timestamp() + make_interval(secs => p_ttl))
    RETURNING nw.epoch, nw.lease_expires_at, old_ids, n, back, ext;
END;
$$;

-- The previous signature (a pod of the previous version registers in slot 1).
CREATE OR REPLACE FUNCTION register_worker(
    p_worker uuid, p_pod text, p_hostname text, p_pid integer,
    p_queues text[], p_concurrency integer, p_ttl double precision)
RETURNS TABLE (epoch bigint, lease_expires_at timestamptz, superseded uuid[], released integer)
LANGUAGE sql AS $$
    SELECT r.epoch, r.lease_expires_at, r.superseded, r.released
    FROM register_worker(p_worker, p_pod, 1, NULL, p_hostname, p_pid, p_queues, p_concurrency, p_ttl,
                         p_ttl / 2) r
$$;

-- Declare dead every worker whose lease ran out and release its tasks. A row
-- that is locked belongs to a worker that is alive (its heartbeat, claim or
-- write is in flight) and is skipped; the next reap sees it again.
CREATE OR REPLACE FUNCTION reap_expired_workers() RETURNS TABLE (worker_id uuid, pod_id text, released integer)
LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT w.worker_id, w.pod_id FROM workers w
        WHERE w.status IN ('active', 'stopping') AND w.lease_expires_at < clock_timestamp()
        ORDER BY w.worker_id
        FOR UPDATE SKIP LOCKED
    LOOP
        UPDATE workers w SET status = 'dead', stopped_at = now(), stop_reason = 'lease expired'
        WHERE w.worker_id = r.worker_id;
        worker_id := r.worker_id;
        pod_id := r.pod_id;
        released := release_worker_tasks(r.worker_id, 'lost', 'worker lost: lease expired');
        RETURN NEXT;
    END LOOP;
END;
$$;

-- Tasks running under a worker that is no longer live (a claim of a
-- previous-version pod that committed after its worker was declared dead):
-- released with the attempt counted.
CREATE FUNCTION release_tasks_of_gone_workers() RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    r record;
    n integer := 0;
BEGIN
    FOR r IN
        SELECT DISTINCT t.worker_id FROM tasks t
        WHERE t.status = 'running'
          AND NOT EXISTS (SELECT 1 FROM workers w
                          WHERE w.worker_id = t.worker_id AND w.status IN ('active', 'stopping'))
    LOOP
        n := n + release_worker_tasks(r.worker_id, 'lost', 'worker lost: its worker was no longer live');
    END LOOP;
    RETURN n;
END;
$$;

-- One round trip per heartbeat. In this order, so that after its own row a
-- heartbeat never waits for a lock (no deadlock between heartbeats):
-- 1. note when any live worker last reached the database; 2. renew this
-- worker's lease; 3. if nobody did for p_silence_after seconds, extend every
-- live lease first; 4. reap expired leases (skipping locked rows); now and
-- then (about twice per interval across the cluster) release tasks running
-- under workers that are not live. Then report: whether due work waits in its
-- queues (the polling fallback for NOTIFY), how soon a silent peer's lease
-- runs out (reaped the moment it expires), which of the (task, attempt) pairs
-- this process runs are no longer running under this worker (cancelled,
-- released: dropped at once, NOTIFY or not), and which tasks run under it that
-- it did not list (a claim whose reply was lost).
CREATE FUNCTION heartbeat(
    p_worker uuid, p_ttl double precision, p_queues text[], p_suspect_after double precision,
    p_silence_after double precision, p_ids bigint[], p_attempts integer[])
RETURNS TABLE (alive boolean, lease_expires_at timestamptz, due boolean, reaped integer,
               suspect_in double precision, extended integer, gone_ids bigint[], gone_attempts integer[],
               gone_statuses text[], orphan_ids bigint[], orphan_attempts integer[])
LANGUAGE plpgsql AS $$
DECLARE
    q text;
    silent boolean;
    live integer;
BEGIN
    silent := everyone_silent(p_silence_after);
    UPDATE workers w
    SET heartbeat_at = clock_timestamp(), lease_expires_at = clock_timestamp() + make_interval(secs => p_ttl)
    WHERE w.worker_id = p_worker AND w.status IN ('active', 'stopping')
    RETURNING w.lease_expires_at INTO heartbeat.lease_expires_at;
    alive := FOUND;
    extended := 0;
    IF alive AND silent THEN
        extended := extend_live_leases(p_ttl, p_worker);
    END IF;
    SELECT coalesce(sum(r.released), 0) INTO reaped FROM reap_expired_workers() r;
    SELECT count(*) INTO live FROM workers w WHERE w.status IN ('active', 'stopping');
    IF random() * greatest(live, 1) < 2 THEN
        reaped := reaped + release_tasks_of_gone_workers();
    END IF;
    due := false;
    FOREACH q IN ARRAY p_queues LOOP
        IF EXISTS (SELECT 1 FROM tasks t WHERE t.status = 'pending' AND t.queue = q AND t.run_at <= now()) THEN
            due := true;
            EXIT;
        END IF;
    END LOOP;
    SELECT extract(epoch FROM min(w.lease_expires_at) - clock_timestamp()) INTO suspect_in
    FROM workers w
    WHERE w.status IN ('active', 'stopping') AND w.worker_id <> p_worker
      AND w.heartbeat_at < clock_timestamp() - make_interval(secs => p_suspect_after);
    SELECT coalesce(array_agg(c.id), '{}'), coalesce(array_agg(c.attempt), '{}'),
           coalesce(array_agg(coalesce(t.status, 'deleted')), '{}')
    INTO gone_ids, gone_attempts, gone_statuses
    FROM unnest(coalesce(p_ids, '{}'), coalesce(p_attempts, '{}')) AS c(id, attempt)
    LEFT JOIN tasks t ON t.id = c.id
    WHERE t.id IS NULL OR t.status <> 'running' OR t.attempt <> c.attempt OR t.worker_id <> p_worker;
    SELECT coalesce(array_agg(t.id), '{}'), coalesce(array_agg(t.attempt), '{}')
    INTO orphan_ids, orphan_attempts
    FROM tasks t
    WHERE alive AND t.worker_id = p_worker AND t.status = 'running' AND t.id <> ALL (coalesce(p_ids, '{}'));
    RETURN NEXT;
END;
$$;

-- The previous signature.
CREATE OR REPLACE FUNCTION heartbeat(p_worker uuid, p_ttl double precision, p_queues text[],
                                     p_suspect_after double precision)
RETURNS TABLE (alive boolean, lease_expires_at timestamptz, due boolean, reaped integer, suspect_in double precision)
LANGUAGE sql AS $$
    SELECT h.alive, h.lease_expires_at, h.due, h.reaped, h.suspect_in
    FROM heartbeat(p_worker, p_ttl, p_queues, p_suspect_after, p_ttl / 2, NULL, NULL) h
$$;

-- Stop a worker: release what it still holds (a graceful release), then end its lease.
CREATE FUNCTION stop_worker(p_worker uuid, p_status text, p_reason text) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    PERFORM 1 FROM workers w WHERE w.worker_id = p_worker AND w.status IN ('active', 'stopping') FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    n := release_worker_tasks(p_worker, 'graceful', p_reason);
    UPDATE workers w SET status = p_status, stopped_at = now(), stop_reason = p_reason
    WHERE w.worker_id = p_worker;
    RETURN n;
END;
$$;

-- Declare the live workers of a pod dead (the Pod was deleted or failed).
CREATE OR REPLACE FUNCTION release_pod(p_pod text, p_reason text) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    r record;
    n integer := 0;
BEGIN
    FOR r IN
        SELECT w.worker_id FROM workers w
        WHERE w.pod_id = p_pod AND w.status IN ('active', 'stopping')
        ORDER BY w.worker_id
        FOR UPDATE
    LOOP
        UPDATE workers w SET status = 'dead', stopped_at = now(), stop_reason = p_reason
        WHERE w.worker_id = r.worker_id;
        n := n + release_worker_tasks(r.worker_id, 'lost', 'worker lost: ' || p_reason);
    END LOOP;
    RETURN n;
END;
$$;

-- Claim up to p_want due tasks of one handler, never letting more than p_limit
-- of them run across the cluster. The worker's row is held FOR KEY SHARE first
-- (see claim). Claimers of one limited handler take turns on an advisory lock
-- held to the end of the claim's transaction; the running count is read after
-- the lock, in a fresh snapshot (READ COMMITTED takes one per statement), so it
-- includes every claim committed before ours. Handlers without a limit never
-- touch this lock.
CREATE OR REPLACE FUNCTION claim_limited(
    p_worker uuid, p_pod text, p_queue text, p_handler text, p_limit integer, p_want integer)
RETURNS SETOF tasks LANGUAGE plpgsql AS $$
DECLARE
    room integer;
BEGIN
    PERFORM 1 FROM workers w
    WHERE w.worker_id = p_worker AND w.status = 'active' AND w.lease_expires_at > now()
    FOR KEY SHARE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('kubetasks.cluster_concurrency:' || p_handler));
    SELECT p_limit - count(*) INTO room FROM tasks WHERE handler = p_handler AND status = 'running';
    IF room <= 0 THEN
        RETURN;
    END IF;
    RETURN QUERY
    WITH picked AS (
        SELECT id FROM tasks
        WHERE status = 'pending' AND queue = p_queue AND handler = p_handler AND run_at <= now()
        ORDER BY priority DESC, run_at, id
        LIMIT least(room, p_want)
        FOR UPDATE SKIP LOCKED
    )
    UPDATE tasks t
    SET status = 'running', attempt = t.attempt + 1, worker_id = p_worker, pod_id = p_pod,
        started_at = now(), updated_at = now(), progress = NULL, progress_message = NULL
    FROM picked
    WHERE t.id = picked.id
      AND NOT EXISTS (SELECT 1 FROM queue_state q WHERE q.queue = p_queue AND q.paused)
    RETURNING t.*;
END;
$$;

-- A worker's "suspended" outcomes: each task that is still this attempt's is
-- written suspended (waiting for p_waits[i], a JSON array of child ids) with
-- its attempt handed back uncharged -- or pending at once when nothing it waits
-- for is unfinished any more (or, under fail_fast, one of them already failed).
-- Nothing is written for a worker that is no longer live.
CREATE OR REPLACE FUNCTION suspend_tasks(p_worker uuid, p_ids bigint[], p_attempts integer[], p_waits jsonb,
                                         p_policies text[])
RETURNS TABLE (suspended_id bigint, now_status text) LANGUAGE plpgsql AS $$
DECLARE
    t record;
    w bigint[];
    waiting boolean;
BEGIN
    PERFORM 1 FROM workers x WHERE x.worker_id = p_worker AND x.status IN ('active', 'stopping') FOR KEY SHARE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
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
        SET status = CASE WHEN waiting THEN 'suspended' ELSE 'pending' END, uncharged = x.uncharged + 1,
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
