-- 0011: an outage every worker saw at once declares no live worker dead (issue 13 item 5).
--
-- 0008 answered an outage (no live worker reached the database for a while:
-- a stall, a restart, a failover) by having the first heartbeat or
-- registration through it extend every other live lease, skipping the rows it
-- found locked. A row is locked by its own worker's heartbeat, or by another
-- heartbeat's extension; when that transaction then rolls back (its client had
-- given up on it during the outage and cancelled it), its rows miss the only
-- extension there is: the extension's own commit ends the silence, and the
-- next heartbeat anywhere declares those workers dead while their processes
-- are still coming back.
--
-- Now the outage itself is written down, in lease_outages, by the transaction
-- that ends it, in the same commit as the contact that ends it: nothing can end
-- the silence without recording it, and a rollback takes back both. The table
-- only ever gets inserts, so there is no row lock to skip or to wait for. A
-- lease that still ran when everyone fell silent counts as run out no sooner
-- than one of its ttls after the database came back (lease_end), whatever
-- became of any other transaction. Every reaper looks for the silence before
-- it reaps, so the reaper that ends an outage records it too. A heartbeat
-- reads the clock after its own row is locked, judges the silence at that
-- instant, and stores that same instant as its heartbeat_at: neither a lock
-- wait nor a frozen server between the judging and the storing can end a
-- silence unseen (0008 judged before the row lock and stored the time after it).

SET LOCAL search_path = kubetasks;

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

-- When a live worker's lease counts as run out: at lease_expires_at, unless
-- everyone lost the database while that lease still ran; then no sooner than
-- one of its ttls (lease_expires_at - heartbeat_at) after the database came back.
CREATE FUNCTION lease_end(p_heartbeat_at timestamptz, p_lease_expires_at timestamptz) RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT greatest(p_lease_expires_at, max(o.back_at) + (p_lease_expires_at - p_heartbeat_at))
    FROM lease_outages o WHERE o.silent_since < p_lease_expires_at
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
CREATE OR REPLACE FUNCTION reap_expired_workers() RETURNS TABLE (worker_id uuid, pod_id text, released integer)
LANGUAGE sql AS $$
    SELECT r.worker_id, r.pod_id, r.released
    FROM reap_expired_workers(coalesce(
        (SELECT extract(epoch FROM min(w.lease_expires_at - w.heartbeat_at))::float8 / 2
         FROM workers w WHERE w.status IN ('active', 'stopping')), 0)) r
$$;

CREATE OR REPLACE FUNCTION register_worker(
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
-- which tasks run under it that it did not list (a claim whose reply was lost).
-- `extended` is how many live leases ran out during the outage this heartbeat
-- ended (they count from now; 0 when it ended none). Parked tasks (0009) are not
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

DROP FUNCTION extend_live_leases(double precision, uuid);
DROP FUNCTION everyone_silent(double precision);
