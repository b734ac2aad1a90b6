-- 0002: per-handler cluster-wide concurrency limits, enforced inside the claim.

SET LOCAL search_path = kubetasks;

-- Claim up to p_want due tasks of one handler, never letting more than p_limit
-- of them run across the cluster. Claimers of one limited handler take turns
-- on an advisory lock held to the end of the claim's transaction; the running
-- count is read after the lock, in a fresh snapshot (READ COMMITTED takes one
-- per statement), so it includes every claim committed before ours. Handlers
-- without a limit never touch this lock.
CREATE FUNCTION claim_limited(
    p_worker uuid, p_pod text, p_queue text, p_handler text, p_limit integer, p_want integer)
RETURNS SETOF tasks LANGUAGE plpgsql AS $$
DECLARE
    room integer;
BEGIN
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
      AND EXISTS (SELECT 1 FROM workers w
                  WHERE w.worker_id = p_worker AND w.status = 'active' AND w.lease_expires_at > now())
      AND NOT EXISTS (SELECT 1 FROM queue_state q WHERE q.queue = p_queue AND q.paused)
    RETURNING t.*;
END;
$$;
