-- 0022: a task's handler and queue names are checked when they are written,
-- not at every change of the row.
--
-- PostgreSQL evaluates every CHECK constraint of a table on every row an
-- UPDATE writes, whichever columns it changes. A task row is written twice on
-- its way through (claimed, then finished), and the two name checks are
-- regular expressions: profiled (perf, two workers draining no-op tasks) they
-- were 6 % of all the CPU the machine spent, 13 % of PostgreSQL's, for names
-- that never change after the insert. As domains, the same rule is checked
-- where a value is made into a name -- an INSERT, COPY, or an UPDATE that sets
-- the column -- and nowhere else (200,000-row UPDATE of another column: 1.27 s
-- with the two CHECKs, 0.55 s with the domains, 0.56 s with neither). The
-- constraints keep their names, so a refusal still says which field it was.
--
-- No rewrite of the table: the column changes to a domain without constraints
-- (same storage), then the domain gets its rule, which checks the rows already
-- there (a scan, under the lock this migration holds on tasks anyway). The
-- indexes over these columns are rebuilt; each holds unfinished tasks only
-- (pending, running or held), not the finished history.
-- The one view over these columns, and the one over it, are made again.
-- PL/pgSQL's RETURN QUERY wants exact types: the functions that return these
-- columns return text through a UNION with text columns (claim_batch) or the
-- table's own row type (claim_limited).

SET LOCAL search_path = kubetasks;

CREATE DOMAIN handler_name AS text;
CREATE DOMAIN queue_name AS text;

DROP VIEW pending_pairs_served;
DROP VIEW pending_pairs;

ALTER TABLE tasks
    DROP CONSTRAINT handler_name,
    DROP CONSTRAINT queue_name,
    ALTER COLUMN handler TYPE handler_name,
    ALTER COLUMN queue TYPE queue_name;

ALTER DOMAIN handler_name ADD CONSTRAINT handler_name CHECK (VALUE ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$');
ALTER DOMAIN queue_name ADD CONSTRAINT queue_name CHECK (VALUE ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$');

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
