-- 0020: what a claim costs does not grow with the handlers a worker serves.
--
-- Until now every claim carried the worker's served handlers as an array, and
-- a worker sent one claim per queue. With 10,000 handlers over 100 queues a
-- claim took 13-20 ms (the array sent, decoded, and estimated element by
-- element each time it was planned) and a worker walked its emptied queues
-- one statement each: two workers drained 65 tasks/s where one handler
-- drains ~9,800.
--
-- Now what a worker serves is rows (worker_handlers), kept from
-- workers.handlers by a trigger while the worker is active and dropped when
-- it stops being active. The claim (queries.sql) reads every queue of the
-- worker in one statement, in the worker's order, and probes these rows by
-- primary key for each task it reads. Workers of an earlier version keep
-- their own claim, which does not read these rows.

SET LOCAL search_path = kubetasks;

-- What each active worker serves, one row per handler (a worker of an earlier
-- version, handlers NULL, has none: it serves every handler of its queues).
CREATE TABLE worker_handlers (
    worker_id uuid NOT NULL REFERENCES workers ON DELETE CASCADE,
    handler   text NOT NULL,
    PRIMARY KEY (worker_id, handler)
);

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
