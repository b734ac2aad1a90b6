-- 0015: schedules made at runtime, and code schedules whose code is gone (issue 17 item 5).
--  * schedules.source 'api': created, changed and deleted from Python or the
--    CLI (App.create_schedule...), fired by any pod like a CronJobLock's.
--  * workers.periodics: the @app.periodic names a worker's code declares
--    (NULL: a worker of an earlier version, which may declare any). A 'code'
--    schedule that no active worker declares is orphaned: listed as such, and
--    pruned by the next scheduler to start, or by App.prune_schedules.

SET LOCAL search_path = kubetasks;

ALTER TABLE schedules DROP CONSTRAINT source_known,
    ADD CONSTRAINT source_known CHECK (source IN ('code', 'crd', 'api'));

ALTER TABLE workers ADD COLUMN periodics text[];
