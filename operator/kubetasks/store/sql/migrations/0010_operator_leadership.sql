-- 0010: what the Kubernetes side needs to survive faults.
--  * operator_leases: one operator leader per watch scope, a lease whose
--    expiry comes from this server's clock. The session advisory lock used
--    before outlives a leader cut off from the database (the server keeps the
--    session until TCP notices), so no other replica could take over.
--  * cr_status_owed: a Task object's status is owed from the change of its row
--    until a writer has written it, however long the API server is away; ver
--    tells a writer whether the row changed again after it read it.
--  * workers.pod_selector: the release a worker's pod belongs to, so an
--    operator recovers its own release's workers only.

SET LOCAL search_path = kubetasks;

ALTER TABLE workers ADD COLUMN pod_selector text
    CONSTRAINT pod_selector_length CHECK (length(pod_selector) BETWEEN 1 AND 1024);

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

CREATE TABLE cr_status_owed (
    task_id bigint PRIMARY KEY REFERENCES tasks (id) ON DELETE CASCADE,
    ver     bigint NOT NULL DEFAULT 1 CONSTRAINT ver_positive CHECK (ver >= 1),
    since   timestamptz NOT NULL DEFAULT now()
);

CREATE OR REPLACE FUNCTION notify_cr_task_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO cr_status_owed AS o (task_id) VALUES (NEW.id)
    ON CONFLICT (task_id) DO UPDATE SET ver = o.ver + 1;
    PERFORM pg_notify('kubetasks_cr_changed', NEW.id::text);
    RETURN NULL;
END;
$$;

-- What may not have been written before the upgrade: every unfinished Task
-- object's status, and those of rows changed in the last hour.
INSERT INTO cr_status_owed (task_id)
SELECT id FROM tasks
WHERE cr_uid IS NOT NULL
  AND (status IN ('pending', 'running', 'paused', 'suspended') OR updated_at > now() - interval '1 hour')
ON CONFLICT DO NOTHING;
