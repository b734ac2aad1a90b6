-- 0013: registering a worker without a session of its own (issue 18, PgBouncer).
-- Behind a transaction-pooling proxy with no direct URL, no session can hold a
-- pod slot's advisory lock for a process's life. The slot is then the first of
-- the pod id with no live lease on it (lease_end, outages counted), chosen and
-- registered in one transaction under the pod id's lock, so two processes of
-- one pod id registering at once never share a slot; a worker whose lease ran
-- out but was not reaped yet is superseded by register_worker as usual.

SET LOCAL search_path = kubetasks;

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
