-- 0018: an outage's recovery lasts while the processes it silenced keep coming back.
--
-- 0011 gave a lease that ran when everyone fell silent one of its ttls after
-- the database came back. Coming back can take longer than that when every
-- process comes back at once: a process that fenced itself during the outage
-- reconnects and registers again, and on a starved machine (80 workers and
-- their pools reconnecting on two busy cores) the last of them registered over
-- 2 s after the database returned, with a ttl of 2 s; they were declared dead
-- while alive, their tasks released with the attempt counted.
--
-- Now the recovery lasts while those processes keep coming back: from the
-- database's return, each time a worker registered before the silence began is
-- superseded (its process registered again, or its pod restarted) no later than
-- one ttl after the previous such return, the recovery runs on to it. A lease
-- that ran when the silence began counts as run out no sooner than one of its
-- ttls after the recovery's last return. A process that died meanwhile is
-- reaped one ttl after the others stopped coming back; the chain is as long as
-- the returns are continuous, and each worker returns at most once (its new row
-- started after the silence), so it ends.

SET LOCAL search_path = kubetasks;

-- The chain of returns below walks supersessions by time.
CREATE INDEX workers_superseded_by_time ON workers (stopped_at) WHERE status = 'superseded';

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
CREATE OR REPLACE FUNCTION lease_end(p_heartbeat_at timestamptz, p_lease_expires_at timestamptz)
RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT greatest(p_lease_expires_at,
                    max(outage_recovered_at(o.silent_since, o.back_at, p_lease_expires_at - p_heartbeat_at))
                        + (p_lease_expires_at - p_heartbeat_at))
    FROM (SELECT x.silent_since, min(x.back_at) AS back_at FROM lease_outages x
          WHERE x.silent_since < p_lease_expires_at GROUP BY x.silent_since) o
$$;
