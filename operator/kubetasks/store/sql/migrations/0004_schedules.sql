-- 0004: cron. The schedulers' cursor and Forbid guard on each schedule, a
-- reason and a manual flag on each tick, and a wake-up for every scheduler.

SET LOCAL search_path = kubetasks;

ALTER TABLE schedules
    ADD COLUMN ticks_from   timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN last_tick_at timestamptz,
    ADD COLUMN last_task_id bigint,
    ADD COLUMN missed_total bigint NOT NULL DEFAULT 0;

ALTER TABLE cron_ticks
    ADD COLUMN manual boolean NOT NULL DEFAULT false,
    ADD COLUMN reason text;

CREATE FUNCTION notify_schedules_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('kubetasks_schedules', CASE WHEN TG_OP = 'DELETE' THEN OLD.name ELSE NEW.name END);
    RETURN NULL;
END;
$$;
CREATE TRIGGER schedules_notify_added_removed AFTER INSERT OR DELETE ON schedules
    FOR EACH ROW EXECUTE FUNCTION notify_schedules_changed();
CREATE TRIGGER schedules_notify_changed AFTER UPDATE ON schedules
    FOR EACH ROW WHEN ((OLD.cron, OLD.timezone, OLD.suspend, OLD.starting_deadline_s, OLD.ticks_from)
                       IS DISTINCT FROM (NEW.cron, NEW.timezone, NEW.suspend, NEW.starting_deadline_s, NEW.ticks_from))
    EXECUTE FUNCTION notify_schedules_changed();
