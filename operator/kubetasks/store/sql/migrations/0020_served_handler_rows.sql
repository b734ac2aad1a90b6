-- 0020: what a claim costs does not grow with the handlers a worker serves.
--
-- Until now every claim carried the worker's served handlers as an array, and
-- a worker sent one claim per queue. With 10,000 handlers over 100 queues a
-- claim took 13-20 ms (the array sent, decoded, and estimated element by
-- element each time it was planned), a worker walked its emptied queues one
-- statement each, and every parking pass expanded each active worker's queues
-- times handlers (a million rows per worker) to learn what is served: two
-- workers drained 65 tasks/s where one handler drains ~9,800.
--
-- Now what a worker serves is rows (worker_handlers), kept from
-- workers.handlers by a trigger while the worker is active and dropped when
-- it stops being active. The claim (queries.sql) reads every queue of the
-- worker in one statement, in the worker's order, and probes these rows by
-- primary key for each task it reads; the parking pass and the unserved
-- report probe them by handler for each pending (queue, handler). Workers of
-- an earlier version keep their own claim, which does not read these rows.

SET LOCAL search_path = kubetasks;

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

INSERT INTO worker_handlers (worker_id, handler)
SELECT DISTINCT w.worker_id, h.name
FROM workers w CROSS JOIN LATERAL unnest(w.handlers) AS h (name)
WHERE w.status = 'active' AND h.name IS NOT NULL;

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

-- The parking pass of 0009, reading pending_pairs_served: its cost follows
-- the pending pairs and the workers serving each, not every worker's queues
-- times handlers.
CREATE OR REPLACE FUNCTION park_unserved(p_handlers text[], p_min_gap double precision, p_force boolean, p_budget integer)
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
