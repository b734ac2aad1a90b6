-- 0016: retention of finished tasks (issue 17 item 2). One batch at a time
-- across the cluster (a transaction-level advisory lock), whole workflow trees
-- only, Task objects' rows never (their object's TTL or deletion decides).

SET LOCAL search_path = kubetasks;

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
