-- The whole current schema, as the numbered migrations in migrations/ leave it.
-- tests/integration/test_schema.py proves the two agree; change both together.

CREATE SCHEMA IF NOT EXISTS kubetasks;
SET LOCAL search_path = kubetasks;

CREATE TABLE workers (
    worker_id        uuid PRIMARY KEY,
    pod_id           text NOT NULL CONSTRAINT pod_id_length CHECK (length(pod_id) BETWEEN 1 AND 253),
    epoch            bigint NOT NULL CONSTRAINT epoch_positive CHECK (epoch >= 1),
    hostname         text NOT NULL DEFAULT '',
    pid              integer NOT NULL DEFAULT 0,
    queues           text[] NOT NULL,
    concurrency      integer NOT NULL CONSTRAINT concurrency_range CHECK (concurrency BETWEEN 1 AND 10000),
    status           text NOT NULL DEFAULT 'active'
        CONSTRAINT worker_status_known CHECK (status IN ('active', 'stopping', 'dead', 'superseded')),
    started_at       timestamptz NOT NULL DEFAULT now(),
    heartbeat_at     timestamptz NOT NULL DEFAULT now(),
    lease_expires_at timestamptz NOT NULL,
    stopped_at       timestamptz,
    stop_reason      text,
    namespace        text,
    -- 0008: the slot of its pod id this worker's process holds (see take_pod_slot).
    pod_slot         integer NOT NULL DEFAULT 1 CONSTRAINT pod_slot_range CHECK (pod_slot BETWEEN 1 AND 64),
    -- What it serves (0009): its handlers (NULL: a worker of an earlier version,
    -- which claims every handler of its queues) and the cluster-wide limits it declares.
    handlers         text[],
    cluster_limits   jsonb CONSTRAINT cluster_limits_is_object CHECK (jsonb_typeof(cluster_limits) = 'object'),
    -- The release (its pods' label selector) this worker's pod belongs to (0010).
    pod_selector     text CONSTRAINT pod_selector_length CHECK (length(pod_selector) BETWEEN 1 AND 1024),
    -- Waits for work: enqueues of its queues notify (0014); false while every slot is taken.
    waiting          boolean NOT NULL DEFAULT true,
    CONSTRAINT stopped_workers_have_time CHECK ((status IN ('dead', 'superseded')) = (stopped_at IS NOT NULL))
);
-- One live worker per pod slot: a restarted process supersedes its predecessor.
CREATE UNIQUE INDEX workers_one_live_per_pod_slot ON workers (pod_id, pod_slot)
    WHERE status IN ('active', 'stopping');
CREATE INDEX workers_live_by_lease ON workers (lease_expires_at) WHERE status IN ('active', 'stopping');
CREATE INDEX workers_waiting ON workers (worker_id) WHERE status = 'active' AND waiting;
-- The chain of an outage's returns (outage_recovered_at) walks supersessions by time (0018).
CREATE INDEX workers_superseded_by_time ON workers (stopped_at) WHERE status = 'superseded';

-- A task's names (0022): checked where a value becomes one (an insert, or an
-- update that sets the column), not at every write of the row as a CHECK of
-- the table would be.
CREATE DOMAIN handler_name AS text
    CONSTRAINT handler_name CHECK (VALUE ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$');
CREATE DOMAIN queue_name AS text
    CONSTRAINT queue_name CHECK (VALUE ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$');

CREATE TABLE tasks (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    handler          handler_name NOT NULL,
    queue            queue_name NOT NULL DEFAULT 'default',
    priority         integer NOT NULL DEFAULT 0
        CONSTRAINT priority_range CHECK (priority BETWEEN -1000 AND 1000),
    payload          jsonb NOT NULL DEFAULT '{}'::jsonb
        CONSTRAINT payload_is_object CHECK (jsonb_typeof(payload) = 'object'),
    status           text NOT NULL DEFAULT 'pending'
        CONSTRAINT task_status_known
        CHECK (status IN ('pending', 'running', 'succeeded', 'failed', 'cancelled', 'paused', 'suspended')),
    attempt          integer NOT NULL DEFAULT 0,
    max_attempts     integer NOT NULL DEFAULT 3
        CONSTRAINT max_attempts_range CHECK (max_attempts BETWEEN 1 AND 100),
    run_at           timestamptz NOT NULL DEFAULT now(),
    timeout_s        double precision NOT NULL DEFAULT 300
        CONSTRAINT timeout_range CHECK (timeout_s BETWEEN 1 AND 604800),
    retry_delay_s    double precision NOT NULL DEFAULT 1
        CONSTRAINT retry_delay_range CHECK (retry_delay_s BETWEEN 0 AND 86400),
    retry_backoff    double precision NOT NULL DEFAULT 2
        CONSTRAINT retry_backoff_range CHECK (retry_backoff BETWEEN 1 AND 10),
    max_retry_delay_s double precision NOT NULL DEFAULT 3600
        CONSTRAINT max_retry_delay_range CHECK (max_retry_delay_s BETWEEN 0 AND 604800),
    result           jsonb,
    error            text,
    traceback        text,
    worker_id        uuid,
    pod_id           text,
    progress         smallint CONSTRAINT progress_range CHECK (progress BETWEEN 0 AND 100),
    progress_message text,
    tags             text[] NOT NULL DEFAULT '{}',
    dedupe_key       text CONSTRAINT dedupe_key_length CHECK (length(dedupe_key) BETWEEN 1 AND 255),
    cr_uid           text,
    cr_namespace     text,
    cr_name          text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    -- Workflows (0005): the parent that spawned this task and the key of that
    -- spawn; what a suspended task waits for, and how.
    parent_id        bigint CONSTRAINT tasks_parent_fk REFERENCES tasks (id) ON DELETE SET NULL,
    spawn_key        text CONSTRAINT spawn_key_length CHECK (length(spawn_key) BETWEEN 1 AND 255),
    wait_ids         bigint[],
    wait_policy      text CONSTRAINT wait_policy_known CHECK (wait_policy IN ('fail_fast', 'collect')),
    -- 0008: attempt is the fencing token and only grows (every claim takes a new
    -- number); attempts handed back without charge are counted in uncharged, and
    -- graceful releases in graceful_releases (from the 4th on, one is charged).
    uncharged        integer NOT NULL DEFAULT 0,
    graceful_releases integer NOT NULL DEFAULT 0 CONSTRAINT graceful_releases_positive CHECK (graceful_releases >= 0),
    -- Pending, but no active worker serves its (queue, handler): out of the claim's
    -- way until one does (0009).
    parked           boolean NOT NULL DEFAULT false,
    -- Pausing a running task (0019): asked while it runs (only a running task
    -- carries the mark), and what became of the last request.
    pause_requested_at timestamptz,
    pause_outcome    text
        CONSTRAINT pause_outcome_known CHECK (pause_outcome IN ('checkpoint', 'after_attempt', 'moot')),
    CONSTRAINT pause_requested_only_running CHECK (pause_requested_at IS NULL OR status = 'running'),
    -- Progress's stage and metadata (0019); the API takes 4 KiB of compact JSON,
    -- jsonb's own text adds spaces.
    progress_stage   text
        CONSTRAINT progress_stage_name CHECK (progress_stage ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$'),
    progress_metadata jsonb
        CONSTRAINT progress_metadata_object CHECK (jsonb_typeof(progress_metadata) = 'object'
                                                   AND octet_length(progress_metadata::text) <= 8192),
    -- A claim counts an attempt; no task is ever claimed past its allowance of charged attempts.
    CONSTRAINT attempt_range CHECK (uncharged BETWEEN 0 AND attempt AND attempt - uncharged <= max_attempts),
    CONSTRAINT running_has_worker CHECK (status <> 'running' OR (worker_id IS NOT NULL AND attempt >= 1)),
    CONSTRAINT finished_iff_finished_at
        CHECK ((status IN ('succeeded', 'failed', 'cancelled')) = (finished_at IS NOT NULL))
);
-- The claim reads the claimable set of one queue in exactly this order (or,
-- when its handlers are few among the queue's, their pairs below and a sort).
CREATE INDEX tasks_pending_claim ON tasks (queue, priority DESC, run_at, id)
    WHERE status = 'pending' AND NOT parked;
-- The (queue, handler) pairs of the claimable and of the parked tasks, read by
-- a skip scan (one index descent per pair, not a pass over the pending set),
-- and the rows of one pair, which parking and unparking rewrite. A new task
-- pays for the first; parked rows are few and rarely change (run_at lets the
-- queue-depth figures read them without the table).
CREATE INDEX tasks_pending_pairs ON tasks (queue, handler) WHERE status = 'pending' AND NOT parked;
CREATE INDEX tasks_parked ON tasks (queue, handler, run_at) WHERE status = 'pending' AND parked;
CREATE INDEX tasks_running_by_worker ON tasks (worker_id) WHERE status = 'running';
CREATE UNIQUE INDEX tasks_dedupe_unfinished ON tasks (dedupe_key)
    WHERE dedupe_key IS NOT NULL AND status IN ('pending', 'running', 'paused', 'suspended');
CREATE INDEX tasks_finished_at ON tasks (finished_at) WHERE finished_at IS NOT NULL;
CREATE UNIQUE INDEX tasks_cr_uid ON tasks (cr_uid) WHERE cr_uid IS NOT NULL;
CREATE INDEX tasks_running_by_handler ON tasks (handler) WHERE status = 'running';

-- The audit trail: one row per ended attempt, except a successful one, which
-- the task row records (0007); task_attempts_all shows both.
CREATE TABLE task_attempts (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id     bigint NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    attempt     integer NOT NULL CONSTRAINT attempt_positive CHECK (attempt >= 1),
    worker_id   uuid,
    pod_id      text,
    started_at  timestamptz,
    finished_at timestamptz NOT NULL DEFAULT now(),
    outcome     text NOT NULL CONSTRAINT outcome_known CHECK (outcome IN (
        'succeeded', 'failed', 'retried', 'timeout', 'worker_lost', 'released', 'cancelled', 'suspended',
        'paused')),
    error       text
);
CREATE INDEX task_attempts_task ON task_attempts (task_id, attempt);

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

CREATE TABLE queue_state (
    queue      text PRIMARY KEY CONSTRAINT queue_name CHECK (queue ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$'),
    paused     boolean NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Named job locks when no Redis is configured. Expiry is in database time.
CREATE TABLE job_locks (
    name        text PRIMARY KEY CONSTRAINT lock_name_length CHECK (length(name) BETWEEN 1 AND 255),
    owner       text NOT NULL,
    acquired_at timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);

CREATE TABLE schedules (
    name                 text PRIMARY KEY CONSTRAINT schedule_name_length CHECK (length(name) BETWEEN 1 AND 253),
    cron                 text NOT NULL,
    timezone             text NOT NULL DEFAULT 'UTC',
    handler              text NOT NULL
        CONSTRAINT handler_name CHECK (handler ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$'),
    queue                text NOT NULL DEFAULT 'default',
    payload              jsonb NOT NULL DEFAULT '{}'::jsonb,
    concurrency_policy   text NOT NULL DEFAULT 'Forbid'
        CONSTRAINT concurrency_policy_known CHECK (concurrency_policy IN ('Forbid', 'Allow')),
    lock_ttl_s           integer NOT NULL DEFAULT 60 CONSTRAINT lock_ttl_range CHECK (lock_ttl_s BETWEEN 1 AND 86400),
    starting_deadline_s  integer CONSTRAINT starting_deadline_range CHECK (starting_deadline_s >= 0),
    suspend              boolean NOT NULL DEFAULT false,
    source               text NOT NULL DEFAULT 'code' CONSTRAINT source_known CHECK (source IN ('code', 'crd')),
    cr_uid               text,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now()
);

-- One row per (schedule, tick): the insert that succeeds is the one run.
CREATE TABLE cron_ticks (
    schedule   text NOT NULL REFERENCES schedules (name) ON DELETE CASCADE,
    tick_at    timestamptz NOT NULL,
    outcome    text NOT NULL CONSTRAINT tick_outcome_known CHECK (outcome IN ('enqueued', 'skipped', 'missed')),
    task_id    bigint,
    holder     text,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (schedule, tick_at)
);

-- Wake waiting workers the moment work arrives: one notification per queue and
-- statement, sent only while an active worker of the queue waits for work
-- (0014: a notifying commit takes a cluster-wide lock, so busy workers are not
-- woken; the 'kubetasks.wait' lock makes sure no waiting worker misses a task).
-- Work due later is announced with the seconds until it is due ("queue 12.5"),
-- so a worker can set a timer instead of polling.
CREATE FUNCTION notify_enqueued() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT queue,
               bool_or(run_at <= now()) AS due_now,
               extract(epoch FROM min(run_at) FILTER (WHERE run_at > now()) - now()) AS later
        FROM new_tasks WHERE status = 'pending' GROUP BY queue
    LOOP
        IF r.due_now THEN
            -- Before reading the flags, and held to commit: see migration 0014. A
            -- transaction with an older snapshot than this statement's could miss a
            -- flag set meanwhile: it always notifies. (Qualified: an INSERT into
            -- kubetasks.tasks may come from a session without the schema on its path.)
            PERFORM pg_advisory_xact_lock_shared(hashtext('kubetasks.wait'));
            -- A queue no active worker lists is announced too: a worker serving `*`
            -- learns of new queues from this, and the parking pass of unserved work.
            IF current_setting('transaction_isolation') <> 'read committed'
               OR EXISTS (SELECT 1 FROM kubetasks.workers w
                          WHERE w.status = 'active' AND w.waiting AND r.queue = ANY (w.queues))
               OR NOT EXISTS (SELECT 1 FROM kubetasks.workers w
                              WHERE w.status = 'active' AND r.queue = ANY (w.queues)) THEN
                PERFORM pg_notify('kubetasks_enqueued', r.queue);
            END IF;
        END IF;
        IF r.later IS NOT NULL THEN
            PERFORM pg_notify('kubetasks_enqueued', r.queue || ' ' || r.later::text);
        END IF;
    END LOOP;
    RETURN NULL;
END;
$$;
CREATE TRIGGER tasks_notify_enqueued AFTER INSERT ON tasks
    REFERENCING NEW TABLE AS new_tasks FOR EACH STATEMENT EXECUTE FUNCTION notify_enqueued();

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
CREATE FUNCTION release_worker_tasks(p_worker uuid, p_count_attempt boolean, p_reason text)
RETURNS integer LANGUAGE sql AS $$
    SELECT release_worker_tasks(p_worker, CASE WHEN p_count_attempt THEN 'lost' ELSE 'graceful' END, p_reason)
$$;

-- Times every live worker had lost the database at once: none reached it
-- between silent_since (the last contact before) and back_at (the first after).
CREATE TABLE lease_outages (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    silent_since timestamptz NOT NULL,
    back_at      timestamptz NOT NULL,
    CONSTRAINT outage_ends_after_it_begins CHECK (back_at > silent_since)
);

-- If no live worker has reached the database in the p_silence_after seconds
-- before p_at, everyone lost it at once: record that outage (back at p_at). The
-- caller then writes a heartbeat_at of p_at, or reaps, in the same transaction.
-- Returns how many live leases ran out during the outage (0 when there was none).
CREATE FUNCTION note_outage(p_at timestamptz, p_silence_after double precision) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    since timestamptz;
    n integer;
BEGIN
    SELECT max(w.heartbeat_at) INTO since FROM workers w WHERE w.status IN ('active', 'stopping');
    IF since IS NULL OR since >= p_at - make_interval(secs => p_silence_after) THEN
        RETURN 0;
    END IF;
    INSERT INTO lease_outages (silent_since, back_at)
    SELECT since, p_at
    WHERE NOT EXISTS (SELECT 1 FROM lease_outages o WHERE o.silent_since = since);
    -- A day-old outage spares no lease any more (a ttl is at most an hour).
    -- SKIP LOCKED: concurrent reapers never wait for one another here.
    DELETE FROM lease_outages o
    WHERE o.id IN (SELECT x.id FROM lease_outages x WHERE x.back_at < p_at - interval '1 day'
                   FOR UPDATE SKIP LOCKED);
    SELECT count(*) INTO n FROM workers w
    WHERE w.status IN ('active', 'stopping') AND w.lease_expires_at > since AND w.lease_expires_at <= p_at;
    RETURN n;
END;
$$;

-- The last return of the outage that silenced everyone from p_silent_since to
-- p_back_at: the database's return, then each supersession of a worker that
-- started before the silence, as long as each comes within p_ttl of the one before.
CREATE FUNCTION outage_recovered_at(p_silent_since timestamptz, p_back_at timestamptz, p_ttl interval)
RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    WITH RECURSIVE chain (at) AS (
        SELECT p_back_at
        UNION ALL
        SELECT (SELECT max(w.stopped_at) FROM workers w
                WHERE w.status = 'superseded' AND w.stopped_at > c.at AND w.stopped_at <= c.at + p_ttl
                  AND w.started_at < p_silent_since)
        FROM chain c WHERE c.at IS NOT NULL
    )
    SELECT max(chain.at) FROM chain
$$;

-- When a live worker's lease counts as run out: at lease_expires_at, unless
-- everyone lost the database while that lease still ran; then no sooner than
-- one of its ttls (lease_expires_at - heartbeat_at) after the outage's recovery
-- (outage_recovered_at): its process has that long after the last of the others
-- came back to come back too. Rows of one outage (the transactions that ended
-- it at once each recorded it) are taken together, from its first return.
CREATE FUNCTION lease_end(p_heartbeat_at timestamptz, p_lease_expires_at timestamptz)
RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT greatest(p_lease_expires_at,
                    max(outage_recovered_at(o.silent_since, o.back_at, p_lease_expires_at - p_heartbeat_at))
                        + (p_lease_expires_at - p_heartbeat_at))
    FROM (SELECT x.silent_since, min(x.back_at) AS back_at FROM lease_outages x
          WHERE x.silent_since < p_lease_expires_at GROUP BY x.silent_since) o
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
    ext integer;
    clock timestamptz;
    r record;
BEGIN
    -- Serialise registrations of one slot; the unique index is the backstop.
    PERFORM pg_advisory_xact_lock(pod_slot_key(p_pod, p_slot));
    -- Judged before this slot's previous worker stops counting as live: its
    -- last heartbeat is a contact like any other.
    clock := clock_timestamp();
    ext := note_outage(clock, p_silence_after);
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
            p_hostname, p_pid, p_queues, p_concurrency, clock, clock + make_interval(secs => p_ttl))
    RETURNING nw.epoch, nw.lease_expires_at, old_ids, n, back, ext;
END;
$$;

-- Register in the first slot of p_pod with no live lease on it, for a lease
-- connection that cannot hold a slot's lock (behind a transaction-pooling proxy
-- with no direct URL); chosen and registered in one transaction under the pod
-- id's lock (0013).
CREATE FUNCTION register_worker_unlocked(
    p_worker uuid, p_pod text, p_max integer, p_predecessor uuid, p_hostname text, p_pid integer,
    p_queues text[], p_concurrency integer, p_ttl double precision, p_silence_after double precision)
RETURNS TABLE (slot integer, epoch bigint, lease_expires_at timestamptz, superseded uuid[],
               released integer, handed_back integer, extended integer)
LANGUAGE plpgsql AS $$
DECLARE
    s integer;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('kubetasks.pod:' || p_pod));
    SELECT g INTO s FROM generate_series(1, p_max) AS g
    WHERE NOT EXISTS (
        SELECT 1 FROM workers w
        WHERE w.pod_id = p_pod AND w.pod_slot = g AND w.status IN ('active', 'stopping')
          AND w.worker_id IS DISTINCT FROM p_predecessor
          AND lease_end(w.heartbeat_at, w.lease_expires_at) > clock_timestamp())
    ORDER BY g LIMIT 1;
    IF s IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY
    SELECT s, r.epoch, r.lease_expires_at, r.superseded, r.released, r.handed_back, r.extended
    FROM register_worker(p_worker, p_pod, s, p_predecessor, p_hostname, p_pid, p_queues, p_concurrency,
                         p_ttl, p_silence_after) AS r;
END;
$$;

-- The previous signature (a pod of the previous version registers in slot 1).
CREATE FUNCTION register_worker(
    p_worker uuid, p_pod text, p_hostname text, p_pid integer,
    p_queues text[], p_concurrency integer, p_ttl double precision)
RETURNS TABLE (epoch bigint, lease_expires_at timestamptz, superseded uuid[], released integer)
LANGUAGE sql AS $$
    SELECT r.epoch, r.lease_expires_at, r.superseded, r.released
    FROM register_worker(p_worker, p_pod, 1, NULL, p_hostname, p_pid, p_queues, p_concurrency, p_ttl,
                         p_ttl / 2) r
$$;

-- Declare dead every worker whose lease ran out (lease_end) and release its
-- tasks, after recording an outage if this reaper ends one. A row that is
-- locked belongs to a worker that is alive (its heartbeat, claim or write is in
-- flight) and is skipped; the next reap sees it again.
CREATE FUNCTION reap_expired_workers(p_silence_after double precision)
RETURNS TABLE (worker_id uuid, pod_id text, released integer)
LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    PERFORM note_outage(clock_timestamp(), p_silence_after);
    FOR r IN
        SELECT w.worker_id, w.pod_id FROM workers w
        WHERE w.status IN ('active', 'stopping') AND w.lease_expires_at < clock_timestamp()
          AND lease_end(w.heartbeat_at, w.lease_expires_at) < clock_timestamp()
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

-- The previous signature (a pod of the previous version reaps with it): the
-- silence it looks for is half the shortest ttl among the live workers.
CREATE FUNCTION reap_expired_workers() RETURNS TABLE (worker_id uuid, pod_id text, released integer)
LANGUAGE sql AS $$
    SELECT r.worker_id, r.pod_id, r.released
    FROM reap_expired_workers(coalesce(
        (SELECT extract(epoch FROM min(w.lease_expires_at - w.heartbeat_at))::float8 / 2
         FROM workers w WHERE w.status IN ('active', 'stopping')), 0)) r
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
-- heartbeat never waits for a lock (no deadlock between heartbeats): 1. lock
-- this worker's row, then read the clock; 2. if no live worker reached the
-- database for p_silence_after seconds before that instant, record the outage;
-- 3. renew this worker's lease from that instant; 4. reap leases that ran out
-- (lease_end; skipping locked rows); now and then (about twice per interval
-- across the cluster) release tasks running under workers that are not live.
-- Then report: whether due work waits in its queues (the polling fallback for
-- NOTIFY), how soon a silent peer's lease runs out (reaped the moment it does),
-- which of the (task, attempt) pairs this process runs are no longer running
-- under this worker (cancelled, released: dropped at once, NOTIFY or not), and
-- which tasks run under it that it did not list (a claim whose reply was lost),
-- and which of its pairs are asked to pause (0019: NOTIFY or not). `extended`
-- is how many live leases ran out during the outage this heartbeat ended (they
-- count from now; 0 when it ended none). Parked tasks (0009) are not due work:
-- no worker could claim them.
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

-- The previous signature.
CREATE FUNCTION heartbeat(p_worker uuid, p_ttl double precision, p_queues text[],
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
CREATE FUNCTION release_pod(p_pod text, p_reason text) RETURNS integer
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

-- Claim up to p_want due tasks of one handler, never letting more than its
-- limit run across the cluster: the smaller of p_limit (what the calling pod
-- declares, NULL for none) and the limit in handlers (0009). The worker's row
-- is held FOR KEY SHARE first (see claim). Claimers of one limited handler take
-- turns on an advisory lock held to the end of the claim's transaction; the
-- running count is read after the lock, in a fresh snapshot (READ COMMITTED
-- takes one per statement), so it includes every claim committed before ours.
-- Handlers without a limit never touch this lock.
CREATE FUNCTION claim_limited(
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

-- One operator leader per watch scope: a lease whose expiry comes from this
-- server's clock, which a leader cut off from the database cannot hold past
-- its expiry (a session advisory lock would outlive it) (0010).
CREATE TABLE operator_leases (
    scope       text PRIMARY KEY CONSTRAINT scope_length CHECK (length(scope) BETWEEN 1 AND 4096),
    holder      text NOT NULL CONSTRAINT holder_length CHECK (length(holder) BETWEEN 1 AND 253),
    holder_id   uuid NOT NULL,
    term        bigint NOT NULL CONSTRAINT term_positive CHECK (term >= 1),
    acquired_at timestamptz NOT NULL DEFAULT now(),
    renewed_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    CONSTRAINT lease_expires_after_renewal CHECK (expires_at > renewed_at)
);

-- A Task object's status is owed from the change of its row until a writer
-- has written it; ver tells the writer whether the row changed again after
-- it read it (0010).
CREATE TABLE cr_status_owed (
    task_id bigint PRIMARY KEY REFERENCES tasks (id) ON DELETE CASCADE,
    ver     bigint NOT NULL DEFAULT 1 CONSTRAINT ver_positive CHECK (ver >= 1),
    since   timestamptz NOT NULL DEFAULT now()
);

-- Change notifications for tasks that came from a Task object (0003), and the
-- status they make owed (0010).
CREATE FUNCTION notify_cr_task_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO cr_status_owed AS o (task_id) VALUES (NEW.id)
    ON CONFLICT (task_id) DO UPDATE SET ver = o.ver + 1;
    PERFORM pg_notify('kubetasks_cr_changed', NEW.id::text);
    RETURN NULL;
END;
$$;
-- Only rows of Task objects, and only changes a status shows: the hot path of
-- plain enqueued tasks pays nothing but the WHEN test. Parking is such a change (0009).
CREATE TRIGGER tasks_notify_cr_inserted AFTER INSERT ON tasks
    FOR EACH ROW WHEN (NEW.cr_uid IS NOT NULL) EXECUTE FUNCTION notify_cr_task_changed();
CREATE TRIGGER tasks_notify_cr_updated AFTER UPDATE ON tasks
    FOR EACH ROW WHEN (NEW.cr_uid IS NOT NULL AND
        (OLD.status, OLD.attempt, OLD.progress, OLD.progress_message, OLD.pod_id, OLD.parked,
         OLD.pause_requested_at, OLD.pause_outcome, OLD.progress_stage, OLD.progress_metadata)
        IS DISTINCT FROM (NEW.status, NEW.attempt, NEW.progress, NEW.progress_message, NEW.pod_id, NEW.parked,
                          NEW.pause_requested_at, NEW.pause_outcome, NEW.progress_stage, NEW.progress_metadata))
    EXECUTE FUNCTION notify_cr_task_changed();

CREATE INDEX tasks_cr_unfinished ON tasks (id)
    WHERE cr_uid IS NOT NULL AND status IN ('pending', 'running', 'paused', 'suspended');

-- Cron (0004). A schedule's cursor is greatest(last_tick_at, ticks_from):
-- ticks after it are due. ticks_from restarts when the timing changes or a
-- suspended schedule resumes; last_task_id is the latest run, which a Forbid
-- tick must find finished. Every scheduler is woken when a schedule appears,
-- goes, or its timing changes -- not by the ticks' own bookkeeping.
ALTER TABLE schedules
    ADD COLUMN ticks_from   timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN last_tick_at timestamptz,
    ADD COLUMN last_task_id bigint,
    ADD COLUMN missed_total bigint NOT NULL DEFAULT 0;
-- A schedule suspended at runtime (0012), apart from `suspend`, which its source
-- (@app.periodic, a CronJobLock) rewrites whenever it syncs.
ALTER TABLE schedules
    ADD COLUMN paused    boolean NOT NULL DEFAULT false,
    ADD COLUMN paused_by text CONSTRAINT paused_by_length CHECK (length(paused_by) BETWEEN 1 AND 253),
    ADD COLUMN paused_at timestamptz,
    ADD CONSTRAINT paused_has_time CHECK (paused = (paused_at IS NOT NULL));

ALTER TABLE cron_ticks
    ADD COLUMN manual boolean NOT NULL DEFAULT false,
    ADD COLUMN reason text;

CREATE FUNCTION notify_schedules_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('kubetasks_schedules', CASE WHEN TG_OP = 'DELETE' THEN OLD.name ELSE NEW.name END);
    RETURN NULL;
END;
$$;
CREATE TRIGGER schedules_notify_added_removed AFTER INSERT OR DELETE ON schedules
    FOR EACH ROW EXECUTE FUNCTION notify_schedules_changed();
CREATE TRIGGER schedules_notify_changed AFTER UPDATE ON schedules
    FOR EACH ROW WHEN ((OLD.cron, OLD.timezone, OLD.suspend, OLD.starting_deadline_s, OLD.ticks_from, OLD.paused)
                       IS DISTINCT FROM (NEW.cron, NEW.timezone, NEW.suspend, NEW.starting_deadline_s, NEW.ticks_from,
                                         NEW.paused))
    EXECUTE FUNCTION notify_schedules_changed();

-- Workflows and the audit trail (0005). A task may spawn children and wait for
-- them without holding a worker (status suspended, attempt handed back); the
-- child whose end completes what it waits for puts it back to pending.
-- task_events records the transitions that have no row of their own.

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

-- A worker's "suspended" outcomes: each task that is still this attempt's is
-- written suspended (waiting for p_waits[i], a JSON array of child ids) with
-- its attempt handed back uncharged -- or pending at once when nothing it waits
-- for is unfinished any more (or, under fail_fast, one of them already failed).
-- Nothing is written for a worker that is no longer live.
CREATE FUNCTION suspend_tasks(p_worker uuid, p_ids bigint[], p_attempts integer[], p_waits jsonb,
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

-- Serving (0009): what each worker serves, per-handler options and limits,
-- and the parking of tasks no active worker serves (see the migration).

-- Options of a handler as its latest registration declared them (NULL: the
-- enqueuing app's default), and the cluster-wide limit every pod obeys.
CREATE TABLE handlers (
    name                text PRIMARY KEY
        CONSTRAINT handler_name CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$'),
    queue               text CONSTRAINT queue_name CHECK (queue ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$'),
    priority            integer CONSTRAINT priority_range CHECK (priority BETWEEN -1000 AND 1000),
    timeout_s           double precision CONSTRAINT timeout_range CHECK (timeout_s BETWEEN 1 AND 604800),
    max_attempts        integer CONSTRAINT max_attempts_range CHECK (max_attempts BETWEEN 1 AND 100),
    retry_delay_s       double precision CONSTRAINT retry_delay_range CHECK (retry_delay_s BETWEEN 0 AND 86400),
    retry_backoff       double precision CONSTRAINT retry_backoff_range CHECK (retry_backoff BETWEEN 1 AND 10),
    max_retry_delay_s   double precision
        CONSTRAINT max_retry_delay_range CHECK (max_retry_delay_s BETWEEN 0 AND 604800),
    cluster_concurrency integer CONSTRAINT cluster_concurrency_range CHECK (cluster_concurrency BETWEEN 1 AND 10000),
    registered_at       timestamptz NOT NULL DEFAULT now(),
    registered_by       text NOT NULL
);

-- Periodic work that one pod does for the cluster: when it last ran.
CREATE TABLE housekeeping (
    name   text PRIMARY KEY,
    ran_at timestamptz NOT NULL DEFAULT '-infinity'
);
INSERT INTO housekeeping (name) VALUES ('park');

-- What the active workers serve: one row per (queue, handler), handler NULL
-- where a worker of an earlier version serves every handler of the queue. A
-- worker that serves no handler at all adds no row. A worker whose lease ran
-- out still serves until it is declared dead (any peer's heartbeat does that
-- at once): one that only stalled renews and goes on, never re-registering,
-- so parking its tasks meanwhile would leave them parked under a live worker.
CREATE VIEW served_pairs AS
SELECT DISTINCT q.queue, h.handler
FROM workers w
CROSS JOIN LATERAL unnest(w.queues) AS q (queue)
CROSS JOIN LATERAL unnest(coalesce(w.handlers, ARRAY[NULL::text])) AS h (handler)
WHERE w.status = 'active';

-- Every (queue, handler) of the pending set, once for its claimable tasks and
-- once for its parked ones: a skip scan, one index descent per pair.
CREATE VIEW pending_pairs AS
WITH RECURSIVE claimable AS (
    (SELECT x.queue, x.handler FROM tasks x WHERE x.status = 'pending' AND NOT x.parked
     ORDER BY x.queue, x.handler LIMIT 1)
    UNION ALL
    SELECT nx.queue, nx.handler
    FROM claimable pr
    CROSS JOIN LATERAL (
        SELECT x.queue, x.handler FROM tasks x
        WHERE x.status = 'pending' AND NOT x.parked AND (x.queue, x.handler) > (pr.queue, pr.handler)
        ORDER BY x.queue, x.handler LIMIT 1
    ) nx
), held AS (
    (SELECT x.queue, x.handler FROM tasks x WHERE x.status = 'pending' AND x.parked
     ORDER BY x.queue, x.handler LIMIT 1)
    UNION ALL
    SELECT nx.queue, nx.handler
    FROM held pr
    CROSS JOIN LATERAL (
        SELECT x.queue, x.handler FROM tasks x
        WHERE x.status = 'pending' AND x.parked AND (x.queue, x.handler) > (pr.queue, pr.handler)
        ORDER BY x.queue, x.handler LIMIT 1
    ) nx
)
SELECT queue, handler, false AS parked FROM claimable
UNION ALL
SELECT queue, handler, true AS parked FROM held;

-- Served handlers as rows (0020): what each active worker serves, read by the
-- claim and the parking pass by index probes (see the migration).

-- What each active worker serves, one row per handler (a worker of an earlier
-- version, handlers NULL, has none: it serves every handler of its queues).
CREATE TABLE worker_handlers (
    worker_id uuid NOT NULL REFERENCES workers ON DELETE CASCADE,
    handler   text NOT NULL,
    PRIMARY KEY (worker_id, handler)
);
-- Who serves a handler: the parking pass asks this once per pending pair.
CREATE INDEX worker_handlers_by_handler ON worker_handlers (handler);

-- Rewritten whole when a worker's handlers change (rare: once when it
-- registers, again only if its app's handlers change), emptied when it stops
-- being active, so the table holds the live workers' handlers only.
CREATE FUNCTION workers_sync_handlers() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        DELETE FROM worker_handlers s WHERE s.worker_id = OLD.worker_id;
    END IF;
    IF NEW.status = 'active' AND NEW.handlers IS NOT NULL THEN
        INSERT INTO worker_handlers (worker_id, handler)
        SELECT DISTINCT NEW.worker_id, h.name FROM unnest(NEW.handlers) AS h (name) WHERE h.name IS NOT NULL;
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER workers_handlers_added AFTER INSERT ON workers
    FOR EACH ROW WHEN (NEW.status = 'active' AND NEW.handlers IS NOT NULL)
    EXECUTE FUNCTION workers_sync_handlers();
CREATE TRIGGER workers_handlers_changed AFTER UPDATE OF handlers, status ON workers
    FOR EACH ROW WHEN (OLD.handlers IS DISTINCT FROM NEW.handlers
                       OR (OLD.status = 'active') IS DISTINCT FROM (NEW.status = 'active'))
    EXECUTE FUNCTION workers_sync_handlers();

-- The handlers with a cluster-wide limit: few, and what the parking pass and
-- every registration look up among a worker's handlers (however many it has),
-- and the claim for each task it takes.
CREATE INDEX handlers_limited ON handlers (name) WHERE cluster_concurrency IS NOT NULL;

-- Every (queue, handler) of the pending set (pending_pairs) and whether an
-- active worker serves it (what served_pairs lists, for that pair): per pair,
-- an index probe of the handler's workers, then of the workers of an earlier
-- version, which serve every handler of their queues.
CREATE VIEW pending_pairs_served AS
SELECT pp.queue, pp.handler, pp.parked,
       EXISTS (SELECT 1 FROM worker_handlers s JOIN workers w ON w.worker_id = s.worker_id
               WHERE s.handler = pp.handler AND w.status = 'active' AND pp.queue = ANY (w.queues))
    OR EXISTS (SELECT 1 FROM workers w
               WHERE w.status = 'active' AND w.handlers IS NULL AND pp.queue = ANY (w.queues)) AS served
FROM pending_pairs pp;

-- The cluster-wide limit of each handler: the smallest any live worker
-- declares (live: not yet declared dead, superseded or stopped). A limit
-- lapses when no live worker declares it any more.
CREATE FUNCTION refresh_cluster_limits() RETURNS void LANGUAGE sql AS $$
    WITH declared AS (
        SELECT l.key AS name, min(l.value::integer) AS lim
        FROM workers w
        CROSS JOIN LATERAL jsonb_each_text(w.cluster_limits) AS l
        WHERE w.status IN ('active', 'stopping')
        GROUP BY l.key
    ), wanted AS (
        SELECT h.name, d.lim FROM handlers h LEFT JOIN declared d ON d.name = h.name
    )
    UPDATE handlers h SET cluster_concurrency = wanted.lim
    FROM wanted
    WHERE h.name = wanted.name AND h.cluster_concurrency IS DISTINCT FROM wanted.lim;
$$;

-- A worker says what it serves (right after it registers, and again when its
-- app's handlers change): its handlers and the limits it declares, the
-- options of each handler (this registration's win), then the parked tasks it
-- can run are unparked at once (up to p_budget; park_unserved does the rest)
-- and their queues woken. Takes turns with park_unserved, so a pass that read
-- the workers before this registration cannot park what it just unparked
-- without the next registration or pass seeing it. Returns the limits of its
-- handlers, what it unparked, and whether more are left.
CREATE FUNCTION worker_serves(p_worker uuid, p_handlers text[], p_limits jsonb, p_options jsonb, p_budget integer)
RETURNS TABLE (limits jsonb, unparked bigint, more boolean) LANGUAGE plpgsql AS $$
DECLARE
    qs text[];
    pod text;
    woken text[];
    q text;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('kubetasks.park'));
    UPDATE workers w SET handlers = p_handlers, cluster_limits = p_limits
    WHERE w.worker_id = p_worker
    RETURNING w.queues, w.pod_id INTO qs, pod;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    INSERT INTO handlers AS h (name, queue, priority, timeout_s, max_attempts, retry_delay_s, retry_backoff,
                               max_retry_delay_s, registered_by)
    SELECT DISTINCT ON (s.name) s.name, o.queue, o.priority, o.timeout_s, o.max_attempts, o.retry_delay_s,
           o.retry_backoff, o.max_retry_delay_s, pod
    FROM unnest(p_handlers) AS s (name)
    LEFT JOIN jsonb_to_recordset(p_options) AS o (name text, queue text, priority integer, timeout_s float8,
                                                  max_attempts integer, retry_delay_s float8,
                                                  retry_backoff float8, max_retry_delay_s float8)
        ON o.name = s.name
    ORDER BY s.name
    ON CONFLICT (name) DO UPDATE
    SET queue = EXCLUDED.queue, priority = EXCLUDED.priority, timeout_s = EXCLUDED.timeout_s,
        max_attempts = EXCLUDED.max_attempts, retry_delay_s = EXCLUDED.retry_delay_s,
        retry_backoff = EXCLUDED.retry_backoff, max_retry_delay_s = EXCLUDED.max_retry_delay_s,
        registered_at = now(), registered_by = EXCLUDED.registered_by;
    PERFORM refresh_cluster_limits();
    WITH picked AS (
        SELECT t.id FROM tasks t
        WHERE t.status = 'pending' AND t.parked AND t.queue = ANY (qs) AND t.handler = ANY (p_handlers)
        LIMIT p_budget
        FOR UPDATE SKIP LOCKED
    ), done AS (
        UPDATE tasks t SET parked = false, updated_at = now() FROM picked WHERE t.id = picked.id
        RETURNING t.queue
    )
    SELECT count(*), coalesce(array_agg(DISTINCT done.queue), '{}') INTO unparked, woken FROM done;
    FOREACH q IN ARRAY woken LOOP
        PERFORM pg_notify('kubetasks_enqueued', q);
    END LOOP;
    more := unparked >= p_budget;
    SELECT coalesce(jsonb_object_agg(h.name, h.cluster_concurrency), '{}') INTO limits
    FROM handlers h WHERE h.name = ANY (p_handlers) AND h.cluster_concurrency IS NOT NULL;
    RETURN NEXT;
END;
$$;

-- The housekeeping pass: park the pending tasks of every (queue, handler) no
-- active worker serves, unpark those of pairs that are served again (their
-- queues woken), and recompute the cluster-wide limits. Whoever calls it runs
-- it at most once per p_min_gap seconds across the cluster (p_force: the same
-- caller goes on after a pass that ran out of p_budget rows); a call that
-- finds it ran recently, or running, returns at once with next_in, the
-- seconds until it may run. Always returns the limits of p_handlers.
--
-- The pending set is read through pending_pairs_served: pending_pairs, a skip
-- scan (one index descent per distinct (queue, handler)), and per pair a probe
-- of the workers that serve its handler (0020), so the pass costs what the
-- number of pairs, their workers and the rows it rewrites cost, not the
-- pending set nor every worker's queues times handlers.
CREATE FUNCTION park_unserved(p_handlers text[], p_min_gap double precision, p_force boolean, p_budget integer)
RETURNS TABLE (ran boolean, parked bigint, unparked bigint, more boolean, next_in double precision, limits jsonb)
LANGUAGE plpgsql AS $$
DECLARE
    p record;
    n bigint;
    left_ integer := p_budget;
    woken text[] := '{}';
    q text;
BEGIN
    ran := false;
    parked := 0;
    unparked := 0;
    more := false;
    IF NOT pg_try_advisory_xact_lock(hashtext('kubetasks.park')) THEN
        next_in := p_min_gap;  -- a pass or a registration is under way
    ELSE
        UPDATE housekeeping h SET ran_at = now()
        WHERE h.name = 'park' AND (p_force OR h.ran_at <= now() - make_interval(secs => p_min_gap));
        IF NOT FOUND THEN
            SELECT greatest(0, extract(epoch FROM h.ran_at + make_interval(secs => p_min_gap) - now()))
            INTO next_in FROM housekeeping h WHERE h.name = 'park';
        ELSE
            ran := true;
            PERFORM refresh_cluster_limits();
            FOR p IN
                SELECT pp.queue, pp.handler, pp.parked, pp.served FROM pending_pairs_served pp
            LOOP
                CONTINUE WHEN p.parked = NOT p.served;  -- already where it belongs
                -- Each statement names its partial index's predicate as a constant.
                IF p.parked THEN
                    WITH picked AS (
                        SELECT t.id FROM tasks t
                        WHERE t.status = 'pending' AND t.parked AND t.queue = p.queue AND t.handler = p.handler
                        LIMIT left_
                        FOR UPDATE SKIP LOCKED
                    )
                    UPDATE tasks t SET parked = false, updated_at = now() FROM picked WHERE t.id = picked.id;
                    GET DIAGNOSTICS n = ROW_COUNT;
                    unparked := unparked + n;
                    IF n > 0 THEN
                        woken := woken || p.queue;
                    END IF;
                ELSE
                    WITH picked AS (
                        SELECT t.id FROM tasks t
                        WHERE t.status = 'pending' AND NOT t.parked AND t.queue = p.queue AND t.handler = p.handler
                        LIMIT left_
                        FOR UPDATE SKIP LOCKED
                    )
                    UPDATE tasks t SET parked = true, updated_at = now() FROM picked WHERE t.id = picked.id;
                    GET DIAGNOSTICS n = ROW_COUNT;
                    parked := parked + n;
                END IF;
                IF n >= left_ THEN
                    more := true;  -- the pair may hold more: the caller goes on
                    EXIT;
                END IF;
                left_ := left_ - n::integer;
            END LOOP;
            FOREACH q IN ARRAY ARRAY(SELECT DISTINCT unnest(woken)) LOOP
                PERFORM pg_notify('kubetasks_enqueued', q);
            END LOOP;
        END IF;
    END IF;
    SELECT coalesce(jsonb_object_agg(h.name, h.cluster_concurrency), '{}') INTO limits
    FROM handlers h WHERE h.name = ANY (p_handlers) AND h.cluster_concurrency IS NOT NULL;
    RETURN NEXT;
END;
$$;

-- Operations and the dashboard (0012): bulk cancel's batch; partial indexes for recent failures and held
-- tasks; per-minute rollups the dashboard's overview reads.

CREATE INDEX tasks_failed_recent ON tasks (finished_at) WHERE status = 'failed';
CREATE INDEX tasks_held ON tasks (queue) WHERE status IN ('paused', 'suspended');

-- Cancel the unfinished tasks among p_ids and every unfinished descendant of
-- p_ids, level by level, as cancel_tree does for one task (each level's
-- children read after the level above was locked).
CREATE FUNCTION cancel_forest(p_ids bigint[], p_reason text)
RETURNS TABLE (cancelled integer, descendants integer) LANGUAGE plpgsql AS $$
DECLARE
    lvl bigint[] := p_ids;
BEGIN
    cancelled := cancel_tasks(lvl, p_reason);
    descendants := 0;
    LOOP
        SELECT array_agg(c.id ORDER BY c.id) INTO lvl
        FROM tasks c WHERE c.parent_id = ANY (lvl) AND c.parent_id IS NOT NULL;
        EXIT WHEN lvl IS NULL;
        descendants := descendants + cancel_tasks(lvl, 'parent task cancelled: ' || p_reason);
    END LOOP;
    RETURN NEXT;
END;
$$;

-- Finished tasks per minute of finished_at, per queue and handler. The rows
-- of queue '*' (all queues) and handler '*' (all handlers) are the sums the
-- overview reads ('*' is not a valid queue or handler name). wait_hist and
-- run_hist count due->start and start->finish seconds of succeeded and
-- failed tasks in logarithmic buckets (see kubetasks/dashboard/rollups.py).
CREATE TABLE task_minutes (
    minute    timestamptz NOT NULL,
    queue     text NOT NULL,
    handler   text NOT NULL,
    succeeded integer NOT NULL CONSTRAINT succeeded_positive CHECK (succeeded >= 0),
    failed    integer NOT NULL CONSTRAINT failed_positive CHECK (failed >= 0),
    cancelled integer NOT NULL CONSTRAINT cancelled_positive CHECK (cancelled >= 0),
    wait_hist integer[] NOT NULL CONSTRAINT wait_hist_buckets CHECK (cardinality(wait_hist) = 64),
    run_hist  integer[] NOT NULL CONSTRAINT run_hist_buckets CHECK (cardinality(run_hist) = 64),
    PRIMARY KEY (queue, handler, minute)
);
-- A pass replaces the minutes it recounted, across every queue and handler.
CREATE INDEX task_minutes_minute ON task_minutes (minute);

-- The latest sample of each queue's depth within a minute (queue '*': all).
CREATE TABLE queue_minutes (
    minute       timestamptz NOT NULL,
    queue        text NOT NULL,
    pending      integer NOT NULL,
    due          integer NOT NULL,
    running      integer NOT NULL,
    held         integer NOT NULL,
    oldest_due_s double precision,
    sampled_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (queue, minute)
);
CREATE INDEX queue_minutes_minute ON queue_minutes (minute);

-- How far the rollup of finished minutes has come: minutes before done_until are final.
CREATE TABLE rollup_state (
    name       text PRIMARY KEY,
    done_until timestamptz NOT NULL
);

-- Runtime schedules (0015): source 'api', and the periodics each worker's code declares.

ALTER TABLE schedules DROP CONSTRAINT source_known,
    ADD CONSTRAINT source_known CHECK (source IN ('code', 'crd', 'api'));

ALTER TABLE workers ADD COLUMN periodics text[];

-- Retention of finished tasks (0016): one batch at a time, whole workflow trees.

INSERT INTO housekeeping (name) VALUES ('retention') ON CONFLICT DO NOTHING;

-- Delete up to p_roots expired workflow roots (a task without a parent whose
-- status's retention has passed since it finished) after the keyset
-- (p_after_at, p_after_id), each with its whole tree, unless something in the
-- tree is unfinished (then the tree stays, and so do its results). NULL
-- retention: kept for ever. busy: another batch runs now (nothing done).
-- picked: roots looked at (fewer than p_roots: the pass is through); last_at,
-- last_id: the keyset to continue from. Rows of Task objects are never taken:
-- their object owns them.
CREATE FUNCTION retention_batch(p_keep_succeeded double precision, p_keep_failed double precision,
                                p_keep_cancelled double precision, p_roots integer,
                                p_after_at timestamptz, p_after_id bigint)
RETURNS TABLE (busy boolean, picked bigint, succeeded bigint, failed bigint, cancelled bigint,
               last_at timestamptz, last_id bigint)
LANGUAGE plpgsql AS $$
DECLARE
    shortest double precision := least(coalesce(p_keep_succeeded, 'Infinity'), coalesce(p_keep_failed, 'Infinity'),
                                       coalesce(p_keep_cancelled, 'Infinity'));
BEGIN
    busy := NOT pg_try_advisory_xact_lock(hashtext('kubetasks.retention'));
    picked := 0;
    succeeded := 0;
    failed := 0;
    cancelled := 0;
    IF busy OR shortest = 'Infinity' THEN
        RETURN NEXT;
        RETURN;
    END IF;
    UPDATE housekeeping h SET ran_at = now() WHERE h.name = 'retention';
    WITH RECURSIVE roots AS (
        -- The shortest retention bounds the index range; each status's own is tested per row.
        SELECT t.id, t.finished_at FROM tasks t
        WHERE t.finished_at IS NOT NULL
          AND t.finished_at < now() - make_interval(secs => shortest)
          AND (p_after_at IS NULL OR (t.finished_at, t.id) > (p_after_at, p_after_id))
          AND t.parent_id IS NULL AND t.cr_uid IS NULL
          AND t.finished_at < now() - make_interval(secs => CASE t.status
                WHEN 'succeeded' THEN p_keep_succeeded WHEN 'failed' THEN p_keep_failed
                WHEN 'cancelled' THEN p_keep_cancelled END)
        ORDER BY t.finished_at, t.id
        LIMIT p_roots
        FOR UPDATE SKIP LOCKED
    ), tree AS (
        SELECT r.id AS root, r.id FROM roots r
        UNION ALL
        SELECT tree.root, c.id FROM tree JOIN tasks c ON c.parent_id = tree.id
    ), whole AS (
        SELECT tree.root FROM tree JOIN tasks t ON t.id = tree.id
        GROUP BY tree.root HAVING bool_and(t.finished_at IS NOT NULL)
    ), del AS (
        DELETE FROM tasks t USING tree, whole
        WHERE t.id = tree.id AND tree.root = whole.root
        RETURNING t.status
    )
    SELECT (SELECT count(*) FROM roots),
           count(*) FILTER (WHERE del.status = 'succeeded'),
           count(*) FILTER (WHERE del.status = 'failed'),
           count(*) FILTER (WHERE del.status = 'cancelled'),
           (SELECT r.finished_at FROM roots r ORDER BY r.finished_at DESC, r.id DESC LIMIT 1),
           (SELECT r.id FROM roots r ORDER BY r.finished_at DESC, r.id DESC LIMIT 1)
    INTO picked, succeeded, failed, cancelled, last_at, last_id
    FROM del;
    RETURN NEXT;
END;
$$;

-- Checkpoints (0017): a handler's task.audit() events.

ALTER TABLE task_events DROP CONSTRAINT event_kind_known,
    ADD CONSTRAINT event_kind_known CHECK (kind IN (
        'created', 'claimed', 'progress', 'retried', 'fenced_out', 'recovered', 'released', 'paused',
        'resumed', 'suspended', 'woken', 'cancelled', 'requeued', 'succeeded', 'failed', 'checkpoint',
        'pause_requested', 'pause_moot'));

-- Pausing a running task (0019): see the migration.

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

-- 0021: the claim (issue 18 item 7) as a function, for one reason: its plan.
-- As a statement it was planned at every call (PostgreSQL keeps custom plans:
-- costed without its LIMIT, the generic one looks dear), and planning was a
-- third of its time in PostgreSQL. Here the plan is made once per session and
-- kept (plan_cache_mode), with only the paths it is written for (index scans in
-- claim order: a generic plan made while the table was small could otherwise
-- read and sort the whole table) and no JIT (its cost estimate without the
-- LIMIT would compile it, hundreds of ms). The settings hold inside the function
-- only.
--
-- $1 worker_id, $2 pod_id, $3 the worker's queues in the order it serves them,
-- $4 how many, $5 handlers it must not take now (those it leaves to
-- claim_limited, and those at their limit in this process; usually empty),
-- $6 task ids, $7 attempts, $8 results (json text): successes of this worker to
-- write first, in the same statement (empty arrays: none), $9 priorities,
-- $10 run_ats, $11 ids: per queue of $3 (same position), the claim-order key of
-- the last task this worker claimed there, its cursor (NULL or missing: none,
-- the queue is read from its start).
-- First holds the worker's row FOR KEY SHARE (`me`), refusing everything when
-- the worker is no longer live: whatever declares a worker dead or superseded
-- locks that row FOR UPDATE, so it either waits for this statement's commit
-- (and then sees, and releases, what it claimed) or this statement waits for
-- it and finds the worker gone. The tests on `me` are uncorrelated, so the
-- planner puts them in one-time filters evaluated before any task row is
-- locked: the worker row is always locked first. Then writes the successes,
-- fenced: a row is written only while it is still this attempt of this worker
-- and running (the attempt record is the task row itself, see
-- task_attempts_all), each found by primary key, probed per id given: never
-- through an index of running tasks, which while a long transaction holds the
-- xmin horizon keeps an entry for every task run since (the tests on worker and
-- status are wrapped in IS TRUE so that neither is an index condition or a
-- partial index's predicate; an `id = ANY ($6)` beside the join made it a
-- 40 x 40 join filter per batch of 40). Then takes due pending tasks queue by queue in the order
-- given (a later queue is read only while the earlier ones fell short; a
-- paused queue is skipped), each in claim order, for a worker whose lease is
-- live, and counts the attempt with a new number (the fencing token: never
-- lowered, so never reused); the run's progress starts afresh, and what
-- became of an earlier pause is forgotten. Only handlers the worker serves are taken: its
-- rows in worker_handlers (0020, written when it registers), probed by primary
-- key for each task read, so the cost follows the tasks read, not how many
-- handlers it serves. OFFSET 0 keeps that probe a per-row filter: as a join,
-- the planner may read every pending task of the worker's handlers and sort
-- them. Parked tasks (no active worker serves them) are not in the claim's
-- index, and a handler with a cluster-wide limit in the database is left to
-- claim_limited whatever the worker believes (tested on the picked rows, never
-- on a scan of tasks: a filter there would skew its row estimate, and with it
-- the plan; a probe per picked row, not a read of every handler the cluster
-- ever registered). One statement, so a busy worker pays one round trip and one
-- commit per batch; the two sets cannot meet (running vs pending). Rows: the
-- written ids with `claimed` false, then the claimed tasks with `claimed` true
-- (with run_at: with priority and id, the claim-order key a cursor holds).
-- Each queue is read from its cursor: its priority with (run_at, id) beyond
-- the cursor's, then the lower priorities, each an index range that starts at
-- that boundary (an Index Cond). A queue without a cursor is read by the second
-- range alone, every priority below 1001 (the range's top, priority_range):
-- that is the read from the start. Why cursors: while a long transaction holds
-- the xmin horizon, every task claimed since it began leaves an index entry
-- whose row is recently dead and cannot be marked dead in the index, so a read
-- from the start of the queue visits the heap for each of them and cost grows
-- with the tasks claimed since; from the cursor it reads only what was claimed
-- after it (by any worker). Tasks can land behind a cursor (a higher priority
-- enqueued later, a task put back pending with its old run_at: recovery,
-- hand-back, retry, unparking, a rolled-back claim): the worker claims without
-- cursors when it has none, after it waited for work, and at least every
-- max(0.25 s, 20 x the duration of its last claim without cursors) while busy,
-- so such a task waits at most that long plus one such claim (worker.py,
-- FULL_CLAIM_*). Two ranges, not a third for the read from the start: one
-- branch less to plan and to run.
-- The commit is synchronous, like every write: a claim lost in a crash or a
-- failover would let the same attempt number start twice.
CREATE FUNCTION claim_batch(
    p_worker uuid, p_pod text, p_queues text[], p_limit integer, p_skip text[],
    p_done_ids bigint[], p_done_attempts integer[], p_done_results text[],
    p_cursor_priorities integer[], p_cursor_run_ats timestamptz[], p_cursor_ids bigint[]
) RETURNS TABLE (
    claimed boolean, id bigint, handler text, queue text, priority integer, payload jsonb,
    attempt integer, max_attempts integer, timeout_s double precision, retry_delay_s double precision,
    retry_backoff double precision, max_retry_delay_s double precision, tags text[], parent_id bigint,
    uncharged integer, run_at timestamptz
)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
SET jit = off
SET enable_seqscan = off
SET enable_sort = off
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
        WITH me AS MATERIALIZED (
            SELECT w.status = 'active' AND w.lease_expires_at > now() AS may_claim
            FROM workers w
            WHERE w.worker_id = $1 AND w.status IN ('active', 'stopping')
            FOR KEY SHARE
        ), done AS (
            UPDATE tasks t
            SET status = 'succeeded', result = c.result::jsonb, finished_at = now(), updated_at = now(),
                error = NULL, traceback = NULL
            FROM unnest($6::bigint[], $7::int[], $8::text[]) AS c(id, attempt, result)
            -- By primary key, per id given (see above).
            WHERE t.id = c.id AND t.attempt = c.attempt
              AND (t.worker_id = $1) IS TRUE AND (t.status = 'running') IS TRUE
              AND EXISTS (SELECT 1 FROM me)
            RETURNING t.id
        ), picked AS (
            SELECT p.id, p.handler
            FROM unnest($3::text[], $9::int[], $10::timestamptz[], $11::bigint[]) AS q (name, cp, crun, cid)
            CROSS JOIN LATERAL (
                SELECT * FROM (SELECT t.id, t.handler FROM tasks t
                 WHERE q.cid IS NOT NULL
                   AND t.status = 'pending' AND NOT t.parked AND t.queue = q.name AND t.run_at <= now()
                   AND t.priority = q.cp AND (t.run_at, t.id) > (q.crun, q.cid)
                   AND EXISTS (SELECT 1 FROM worker_handlers s WHERE s.worker_id = $1 AND s.handler = t.handler OFFSET 0)
                   AND t.handler <> ALL ($5::text[])
                 ORDER BY t.priority DESC, t.run_at, t.id
                 LIMIT $4
                 FOR UPDATE OF t SKIP LOCKED) AS s
                UNION ALL
                SELECT * FROM (SELECT t.id, t.handler FROM tasks t
                 WHERE t.status = 'pending' AND NOT t.parked AND t.queue = q.name AND t.run_at <= now()
                   AND t.priority < coalesce(q.cp, 1001)
                   AND EXISTS (SELECT 1 FROM worker_handlers s WHERE s.worker_id = $1 AND s.handler = t.handler OFFSET 0)
                   AND t.handler <> ALL ($5::text[])
                 ORDER BY t.priority DESC, t.run_at, t.id
                 LIMIT $4
                 FOR UPDATE OF t SKIP LOCKED) AS l
            ) p
            WHERE NOT EXISTS (SELECT 1 FROM queue_state qs WHERE qs.queue = q.name AND qs.paused)
            LIMIT $4
        ), claimed AS (
            UPDATE tasks t
            SET status = 'running', attempt = t.attempt + 1, worker_id = $1, pod_id = $2,
                started_at = now(), updated_at = now(), progress = NULL, progress_message = NULL,
                progress_stage = NULL, progress_metadata = NULL, pause_outcome = NULL
            FROM picked
            WHERE t.id = picked.id
              AND coalesce((SELECT may_claim FROM me), false)
              AND NOT EXISTS (SELECT 1 FROM handlers h
                              WHERE h.name = picked.handler AND h.cluster_concurrency IS NOT NULL OFFSET 0)
            RETURNING t.id, t.handler, t.queue, t.priority, t.payload, t.attempt, t.max_attempts,
                      t.timeout_s, t.retry_delay_s, t.retry_backoff, t.max_retry_delay_s, t.tags, t.parent_id,
                      t.uncharged, t.run_at
        )
        SELECT false AS claimed, id, NULL::text AS handler, NULL::text AS queue, NULL::integer AS priority,
               NULL::jsonb AS payload, NULL::integer AS attempt, NULL::integer AS max_attempts,
               NULL::float8 AS timeout_s, NULL::float8 AS retry_delay_s, NULL::float8 AS retry_backoff,
               NULL::float8 AS max_retry_delay_s, NULL::text[] AS tags, NULL::bigint AS parent_id,
               NULL::integer AS uncharged, NULL::timestamptz AS run_at
        FROM done
        UNION ALL
        SELECT true, * FROM claimed;
END
$$;
