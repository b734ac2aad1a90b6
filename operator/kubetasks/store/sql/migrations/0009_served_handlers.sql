-- 0009: a worker claims only the handlers it has; a task that no active worker
-- can run waits out of the claim's way and says why, instead of failing.
--
-- Each worker records the handlers it serves (workers.handlers). NULL is a
-- worker of an earlier version: it claims every handler of its queues, so it
-- counts as serving them all. A pending task whose (queue, handler) no active
-- worker serves is *parked*: its status stays pending, but it leaves the
-- claim's index, so a claim never walks over such tasks however many pile up.
-- One pod at a time parks them (park_unserved, at most once per interval
-- across the cluster) and a worker unparks what it serves the moment it
-- registers (worker_serves). The parked pairs are the one "no active worker
-- serves" report that stats, metrics, Task statuses and the webhook read.
--
-- Per-handler options live here too (handlers): a pod that lacks a handler
-- resolves its queue and defaults from the latest registration that declared
-- it, and every pod obeys one cluster-wide limit per handler, the smallest
-- that any live worker declares.
--
-- Pods of an earlier version claim with a statement that does not name
-- parked, so the new claim index cannot serve them: during the rollout that
-- applies this migration their claims fall back to reading the whole pending
-- set of their queue (a quarter of a second at 200,000 pending). The rollout
-- is short; the claim of every later version is served by the index below.

SET LOCAL search_path = kubetasks;

ALTER TABLE workers
    ADD COLUMN handlers text[],
    ADD COLUMN cluster_limits jsonb
        CONSTRAINT cluster_limits_is_object CHECK (jsonb_typeof(cluster_limits) = 'object');

ALTER TABLE tasks ADD COLUMN parked boolean NOT NULL DEFAULT false;

-- The claim reads the claimable set of one queue in exactly this order (or,
-- when its handlers are few among the queue's, their pairs below and a sort).
DROP INDEX tasks_pending_claim;
CREATE INDEX tasks_pending_claim ON tasks (queue, priority DESC, run_at, id)
    WHERE status = 'pending' AND NOT parked;
-- The (queue, handler) pairs of the claimable and of the parked tasks, read by
-- a skip scan (one index descent per pair, not a pass over the pending set),
-- and the rows of one pair, which parking and unparking rewrite. A new task
-- pays for the first; parked rows are few and rarely change (run_at lets the
-- queue-depth figures read them without the table).
CREATE INDEX tasks_pending_pairs ON tasks (queue, handler) WHERE status = 'pending' AND NOT parked;
CREATE INDEX tasks_parked ON tasks (queue, handler, run_at) WHERE status = 'pending' AND parked;

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
-- The pending set is read through pending_pairs, a skip scan: one index
-- descent per distinct (queue, handler), so the pass costs what the number of
-- pairs and the rows it rewrites cost, not the pending set.
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
            -- Joined, not tested pair by pair: a thousand pairs against a thousand
            -- served handlers is two hash lookups each, not a million comparisons.
            FOR p IN
                SELECT pp.queue, pp.handler, pp.parked, (sh.queue IS NOT NULL OR sq.queue IS NOT NULL) AS served
                FROM pending_pairs pp
                LEFT JOIN (SELECT s.queue, s.handler FROM served_pairs s WHERE s.handler IS NOT NULL) sh
                       ON sh.queue = pp.queue AND sh.handler = pp.handler
                LEFT JOIN (SELECT DISTINCT s.queue FROM served_pairs s WHERE s.handler IS NULL) sq
                       ON sq.queue = pp.queue
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

-- Claim up to p_want due tasks of one handler, never letting more than its
-- limit run across the cluster: the smaller of p_limit (what the calling pod
-- declares, NULL for none) and the limit in handlers (0009). The worker's row
-- is held FOR KEY SHARE first (see claim). Claimers of one limited handler take
-- turns on an advisory lock held to the end of the claim's transaction; the
-- running count is read after the lock, in a fresh snapshot (READ COMMITTED
-- takes one per statement), so it includes every claim committed before ours.
-- Handlers without a limit never touch this lock.
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
        started_at = now(), updated_at = now(), progress = NULL, progress_message = NULL
    FROM picked
    WHERE t.id = picked.id
      AND NOT EXISTS (SELECT 1 FROM queue_state q WHERE q.queue = p_queue AND q.paused)
    RETURNING t.*;
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
-- it did not list (a claim whose reply was lost). Parked tasks (0009) are not
-- due work: no worker could claim them.
CREATE OR REPLACE FUNCTION heartbeat(
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
        IF EXISTS (SELECT 1 FROM tasks t
                   WHERE t.status = 'pending' AND NOT t.parked AND t.queue = q AND t.run_at <= now()) THEN
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

-- Task objects: a task that becomes parked or unparked changes what its
-- status says, so it is announced like the other status-visible changes.
DROP TRIGGER tasks_notify_cr_updated ON tasks;
CREATE TRIGGER tasks_notify_cr_updated AFTER UPDATE ON tasks
    FOR EACH ROW WHEN (NEW.cr_uid IS NOT NULL AND
        (OLD.status, OLD.attempt, OLD.progress, OLD.progress_message, OLD.pod_id, OLD.parked)
        IS DISTINCT FROM (NEW.status, NEW.attempt, NEW.progress, NEW.progress_message, NEW.pod_id, NEW.parked))
    EXECUTE FUNCTION notify_cr_task_changed();
