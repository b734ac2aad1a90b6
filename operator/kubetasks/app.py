"""The public API's facade: ``App`` is a ``Blueprint`` (``kubetasks.registry``) plus settings,
a connection pool, enqueue and the admin verbs.

``App()`` opens nothing until first used. Options resolve as enqueue argument >
task option > App default (``kubetasks.enqueue``), and everything is validated
before the one INSERT.

A handler this app does not have is refused by ``enqueue`` under
``strict_handlers`` (a typo in code fails fast). Everywhere else -- a Task
object, a CronJobLock, ``strict_handlers=False`` -- such a task is accepted
with the options the handler's latest registration stored in the database
(``handlers``; App defaults when none did), and waits for a worker that has
the handler (see ``serving``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import asyncpg

from kubetasks import audit, bulk, enqueue, listing, locks, schedules, serving, validation, workflows
from kubetasks import worker as worker_module
from kubetasks.config import Settings
from kubetasks.errors import TaskNotFound, ValidationError
from kubetasks.filters import TaskFilter

# The model and the registry, re-exported (``__all__``): ``kubetasks.app`` was their home.
from kubetasks.model import (
    EnqueueRequest,
    HandlerOptions,
    Input,
    PeriodicDef,
    Prepared,
    TaskDef,
    TaskPage,
    TaskRecord,
)
from kubetasks.registry import AsyncHandler, Blueprint, Handler, call_handler
from kubetasks.statuses import FINISHED, STATUSES, UNFINISHED
from kubetasks.store import Store, queues, tasks

log = logging.getLogger("kubetasks.app")


class App(Blueprint):
    """Registrations plus settings and a connection pool.

    ``App()`` reads nothing until first used, so a module can create it at import
    time; settings come from arguments, then KUBETASKS_* variables.
    """

    def __init__(
        self,
        database_url: str | None = None,
        redis_url: str | None = None,
        *,
        settings: Settings | None = None,
        strict_handlers: bool = True,
        **overrides: Any,
    ) -> None:
        super().__init__()
        self._settings = settings
        self._overrides = dict(overrides, database_url=database_url, redis_url=redis_url)
        self.strict_handlers = strict_handlers
        self._store: Store | None = None
        self._locks: locks.LockBackend | None = None
        self._open_lock: asyncio.Lock | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = Settings.load(**self._overrides)
        return self._settings

    def configure(self, **overrides: Any) -> None:
        """Change settings before the app is opened (the CLI uses this)."""
        if self._store is not None:
            raise RuntimeError("configure() must be called before the app is opened")
        self._overrides.update({k: v for k, v in overrides.items() if v is not None})
        self._settings = None

    @property
    def store(self) -> Store:
        if self._store is None:
            raise RuntimeError("the app is not open: `await app.open()` or `async with app:`")
        return self._store

    async def open(self) -> App:
        if self._open_lock is None:
            self._open_lock = asyncio.Lock()
        async with self._open_lock:
            if self._store is None:
                s = self.settings
                store = Store(
                    s.database_url, max_size=s.pool_size, pooled=s.transaction_pooled,
                    replica=s.database_replica_url,
                )  # fmt: skip
                await store.open()
                self._store = store
                self._locks = locks.make_backend(store, s.redis_url)
        return self

    async def close(self) -> None:
        if self._locks is not None:
            backend, self._locks = self._locks, None
            await backend.close()
        if self._store is not None:
            store, self._store = self._store, None
            await store.close()

    async def __aenter__(self) -> App:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _ready_store(self) -> Store:
        if self._store is None:
            await self.open()
        return self.store

    # -- enqueue ---------------------------------------------------------

    async def enqueue(
        self,
        handler: str,
        payload: Mapping[str, Any] | None = None,
        *,
        delay: float | None = None,
        run_at: datetime | None = None,
        priority: int | None = None,
        queue: str | None = None,
        timeout: float | None = None,
        max_attempts: int | None = None,
        tags: Sequence[str] | None = None,
        dedupe_key: str | None = None,
        retry_delay: float | None = None,
        backoff: float | None = None,
        max_retry_delay: float | None = None,
    ) -> int:
        """Add one task and return its id.

        ``retry_delay`` (seconds before the first retry), ``backoff`` (the factor
        each later retry's delay grows by) and ``max_retry_delay`` (its cap) set
        this task's retry policy; each one not given comes from the handler's
        option, else the App default (``KUBETASKS_DEFAULT_RETRY_DELAY``...).
        With a ``dedupe_key`` that names an unfinished task, that task's id is
        returned and nothing is added. A handler this app does not have raises
        ``UnknownHandler`` under ``strict_handlers``; without it, the task waits
        for a worker that has the handler, with the options that handler's
        registration stored.
        """
        req = EnqueueRequest(
            handler, payload, delay, run_at, priority, queue, timeout, max_attempts, tags, dedupe_key,
            retry_delay, backoff, max_retry_delay,
        )  # fmt: skip
        if handler in self.handlers or self.strict_handlers:
            p = enqueue.prepare(self, req)
            store = await self._ready_store()
        else:
            store = await self._ready_store()
            p = await enqueue.prepare_any(self, req, store)
        return await enqueue.insert(store, p)

    async def enqueue_many(self, requests: Iterable[EnqueueRequest]) -> list[int]:
        """Add many tasks in one round trip; ids in the order given.

        Every request is validated before anything is written. A request whose
        dedupe key names an unfinished task gets that task's id.
        """
        requests = list(requests)
        stored: dict[str, HandlerOptions] = {}
        if not self.strict_handlers and any(r.handler not in self.handlers for r in requests):
            for r in requests:
                validation.name("handler", r.handler)
            stored = await enqueue.stored_options(
                self, await self._ready_store(), (r.handler for r in requests)
            )
        prepared = [enqueue.prepare(self, r, stored=stored.get(r.handler)) for r in requests]
        if not prepared:
            return []
        return await enqueue.insert_many(await self._ready_store(), prepared)

    # -- queries ---------------------------------------------------------

    async def get_task(self, task_id: int) -> TaskRecord:
        row = await tasks.get_task(await self._ready_store(), task_id=task_id)
        if row is None:
            raise TaskNotFound(task_id)
        return TaskRecord.from_row(row)

    async def list_tasks(
        self,
        *,
        status: str | Sequence[str] | None = None,
        handler: str | Sequence[str] | None = None,
        queue: str | Sequence[str] | None = None,
        tags: Sequence[str] | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        limit: int = 50,
        offset: int = 0,
        run_after: datetime | None = None,
        run_before: datetime | None = None,
    ) -> TaskPage:
        """A page of tasks, newest first, with the total; ``run_after`` (inclusive) and
        ``run_before`` (exclusive) bound when each is due (``run_at``): with
        ``status="pending"``, the delayed tasks of a time range."""
        statuses = _as_list(status)
        for st in statuses or []:
            if st not in STATUSES:
                raise ValidationError("status", f"unknown status {st!r}; one of {', '.join(STATUSES)}")
        validation.integer("limit", limit, 1, 1000)
        validation.integer("offset", offset, 0, 2**31 - 1)
        filters: dict[str, Any] = {
            "statuses": statuses, "handlers": _as_list(handler), "queues": _as_list(queue),
            "tags": list(tags) if tags else None, "created_after": created_after,
            "created_before": created_before,
        }  # fmt: skip
        if run_after is not None or run_before is not None:
            due = TaskFilter.of(run_after=run_after, run_before=run_before)  # validated as the filter's
            filters.update(run_after=due.run_after, run_before=due.run_before)
        rows = await tasks.list_tasks(await self._ready_store(), **filters, limit=limit, offset=offset)
        total = int(rows[0]["total"]) if rows else 0
        if not rows and offset:
            # Past the end: count without a page to report the real total.
            probe = await tasks.list_tasks(await self._ready_store(), **filters, limit=1, offset=0)
            total = int(probe[0]["total"]) if probe else 0
        return TaskPage([TaskRecord.from_row(r) for r in rows], total, limit, offset)

    async def get_attempts(self, task_id: int) -> list[dict[str, Any]]:
        """One dict per ended attempt: attempt, worker_id, pod_id, started_at, finished_at,
        outcome, error, duration_s."""
        rows = await tasks.get_attempts(await self._ready_store(), task_id=task_id)
        return [dict(r) for r in rows]

    # -- workflows and audit -------------------------------------------------

    async def get_events(self, task_id: int) -> list[dict[str, Any]]:
        """The task's history, oldest first: dicts of at, kind, attempt, worker_id, pod_id, detail.

        Kinds: created, claimed, progress, retried, fenced_out, recovered, released,
        paused, pause_requested, pause_moot, resumed, suspended, woken, cancelled, requeued,
        succeeded, failed, checkpoint.
        """
        rows = await tasks.get_events(await self._ready_store(), task_id=task_id)
        if not rows:
            await self.get_task(task_id)  # raises TaskNotFound
        return [
            {**dict(r), "worker_id": None if r["worker_id"] is None else str(r["worker_id"])} for r in rows
        ]

    async def workflow_summary(self, root_id: int) -> workflows.WorkflowSummary:
        """The tree under ``root_id``: counts by status, total and wall time, retries, critical path."""
        rows = await tasks.workflow_tasks(await self._ready_store(), root_id=root_id)
        if not rows:
            raise TaskNotFound(root_id)
        return workflows.summarize(rows)

    async def children_counts(self, task_ids: Sequence[int]) -> dict[int, dict[str, int]]:
        """Direct children of each task, counted by status (tasks without children are absent)."""
        out: dict[int, dict[str, int]] = {}
        for r in await tasks.children_counts(await self._ready_store(), parent_ids=task_ids):
            out.setdefault(int(r["parent_id"]), {})[r["status"]] = int(r["n"])
        return out

    async def stats(self) -> dict[str, Any]:
        """Counts per queue and status, oldest due pending age, running per worker, and the
        (handler, queue) pairs whose pending tasks no active worker serves."""
        store = await self._ready_store()
        counts: dict[str, dict[str, int]] = {}
        for r in await queues.stats_counts(store):
            counts.setdefault(r["queue"], {})[r["status"]] = int(r["n"])
        oldest = {r["queue"]: float(r["age_s"]) for r in await queues.stats_oldest_pending(store)}
        workers = [
            {
                "worker_id": str(r["worker_id"]),
                "pod_id": r["pod_id"],
                "status": r["status"],
                "queues": list(r["queues"]),
                "concurrency": r["concurrency"],
                "running": int(r["running"]),
                "lease_left_s": float(r["lease_left_s"]),
            }
            for r in await queues.stats_workers(store)
        ]
        paused = [r["queue"] for r in await queues.paused_queues(store)]
        return {
            "queues": {
                q: {"counts": c, "oldest_pending_s": oldest.get(q), "paused": q in paused}
                for q, c in counts.items()
            },
            "workers": workers,
            "paused_queues": paused,
            # Pending tasks that no active worker serves (parked), per handler and queue.
            "unserved": [u.as_dict() for u in await serving.unserved(store)],
        }

    # -- admin verbs -----------------------------------------------------

    async def cancel(self, task_id: int, reason: str = "cancelled") -> bool:
        """Cancel a pending, paused, suspended or running task and its unfinished descendants.

        False if the task itself had already ended (its descendants are cancelled all the same).
        """
        store = await self._ready_store()
        for attempt in range(5):
            try:
                row = await tasks.cancel_task(store, task_id=task_id, reason=reason)
                break
            except asyncpg.DeadlockDetectedError:
                # A child ending at this moment locks its parent after itself; the
                # cascade locks parents first. Postgres picked us: go again.
                if attempt == 4:
                    raise
        if row is None:
            raise TaskNotFound(task_id)
        return bool(row["cancelled"])

    async def retry(self, task_id: int | None = None, *, handler: str | None = None) -> int:
        """Start a failed or cancelled task over, or every failed task of ``handler``."""
        if (task_id is None) == (handler is None):
            raise ValidationError("task_id", "give a task id or handler=, not both or neither")
        store = await self._ready_store()
        if handler is not None:
            return await tasks.retry_failed_of_handler(store, handler=validation.name("handler", handler))
        row = await tasks.retry_task(store, task_id=task_id)  # type: ignore[arg-type]
        if row is None:
            await self.get_task(task_id)  # type: ignore[arg-type]  # raises TaskNotFound
            return 0
        rec = await self.get_task(task_id)  # type: ignore[arg-type]
        await queues.wake_queue(store, queue=rec.queue)
        return 1

    async def pause_task(self, task_id: int) -> str | None:
        """Pause a task: ``"paused"`` when it was pending (held at once); ``"requested"`` when it
        runs: its handler sees ``task.pause_requested`` (at once, or within a heartbeat) and may
        pause at a checkpoint; otherwise the task is paused when the attempt ends, or, if that
        attempt finishes it, the request is recorded as moot (``get_task(...).pause_outcome`` and
        the task's events say which happened). None: nothing to pause (paused already, waiting
        for its children, or finished)."""
        row = await tasks.pause_task(await self._ready_store(), task_id=task_id)
        if row is None:
            raise TaskNotFound(task_id)
        how: str | None = row["how"]
        return how

    async def resume_task(self, task_id: int) -> str | None:
        """``"resumed"``: a paused task is pending again (its handler runs from the top);
        ``"withdrawn"``: a running task is no longer asked to pause. None: neither applies."""
        store = await self._ready_store()
        row = await tasks.resume_task(store, task_id=task_id)
        if row is None:
            raise TaskNotFound(task_id)
        if row["how"] == "resumed":
            await queues.wake_queue(store, queue=row["queue"])
        how: str | None = row["how"]
        return how

    async def pause_queue(self, queue: str) -> None:
        await queues.set_queue_paused(
            await self._ready_store(), queue=validation.name("queue", queue), paused=True
        )

    async def resume_queue(self, queue: str) -> None:
        store = await self._ready_store()
        await queues.set_queue_paused(store, queue=validation.name("queue", queue), paused=False)
        await queues.wake_queue(store, queue=queue)

    async def delete_tasks(self, *, older_than: float = 0.0, statuses: Sequence[str] = FINISHED) -> int:
        """Delete finished tasks that ended more than ``older_than`` seconds ago."""
        for st in statuses:
            if st not in FINISHED:
                raise ValidationError("statuses", f"only finished statuses can be deleted, got {st!r}")
        validation.seconds("older_than", older_than, 0, 10 * 365 * 86400)
        return await tasks.delete_finished_tasks(
            await self._ready_store(), statuses=statuses, older_than=older_than
        )

    async def run_retention(
        self,
        *,
        succeeded: float | None = None,
        failed: float | None = None,
        cancelled: float | None = None,
    ) -> Any:
        """Run one retention pass now (``kubetasks.retention``): delete finished tasks kept
        longer than their status's retention, workflow trees whole; a ``retention.Result``.
        Each argument (seconds, 0: keep for ever) overrides the setting for this pass."""
        from kubetasks import retention  # noqa: PLC0415

        s = self.settings
        for key, v in (("succeeded", succeeded), ("failed", failed), ("cancelled", cancelled)):
            if v is not None and v != 0:
                validation.seconds(key, v, 60, 10 * 365 * 86400)
        policy = retention.Policy(
            (s.retention_succeeded if succeeded is None else succeeded) or None,
            (s.retention_failed if failed is None else failed) or None,
            (s.retention_cancelled if cancelled is None else cancelled) or None,
        )
        return await retention.run_pass(await self._ready_store(), policy, batch=s.retention_batch)

    # -- operations on many tasks (kubetasks.bulk, listing, audit) ----------

    async def find_tasks(
        self,
        filter: TaskFilter | None = None,
        *,
        cursor: str | None = None,
        limit: int = 50,
        scan: int = listing.DEFAULT_SCAN,
        **criteria: Any,
    ) -> listing.TaskListPage:
        """Tasks matching ``filter`` (or the ``TaskFilter`` criteria given as keywords), newest
        first, ``limit`` at most, continuing at ``cursor``; bounded work per call (see ``listing``)."""
        return await listing.find_tasks(
            await self._ready_store(), _filter(filter, criteria), cursor=cursor, limit=limit, scan=scan
        )

    async def bulk_retry(
        self,
        filter: TaskFilter | None = None,
        *,
        dry_run: bool = False,
        up_to_id: int | None = None,
        batch_size: int = bulk.DEFAULT_BATCH,
        **criteria: Any,
    ) -> bulk.BulkResult:
        """Start over every failed task the filter matches (``status="cancelled"`` for cancelled
        ones too). ``dry_run``: count them instead (see ``bulk``)."""
        return await bulk.run(
            await self._ready_store(), "retry", _filter(filter, criteria),
            dry_run=dry_run, up_to_id=up_to_id, batch_size=batch_size,
        )  # fmt: skip

    async def bulk_cancel(
        self,
        filter: TaskFilter | None = None,
        *,
        dry_run: bool = False,
        up_to_id: int | None = None,
        batch_size: int = bulk.DEFAULT_BATCH,
        reason: str = "cancelled by a bulk action",
        **criteria: Any,
    ) -> bulk.BulkResult:
        """Cancel every unfinished task the filter matches, with its unfinished descendants.
        ``dry_run``: count them instead (see ``bulk``)."""
        return await bulk.run(
            await self._ready_store(), "cancel", _filter(filter, criteria),
            dry_run=dry_run, up_to_id=up_to_id, batch_size=batch_size, reason=reason,
        )  # fmt: skip

    async def bulk_delete(
        self,
        filter: TaskFilter | None = None,
        *,
        dry_run: bool = False,
        up_to_id: int | None = None,
        batch_size: int = bulk.DEFAULT_BATCH,
        **criteria: Any,
    ) -> bulk.BulkResult:
        """Delete every finished task the filter matches, with its events and attempts (a child
        of an unfinished parent stays). ``dry_run``: count them instead (see ``bulk``)."""
        return await bulk.run(
            await self._ready_store(), "delete", _filter(filter, criteria),
            dry_run=dry_run, up_to_id=up_to_id, batch_size=batch_size,
        )  # fmt: skip

    async def count_tasks(
        self, by: str = "handler", filter: TaskFilter | None = None, **criteria: Any
    ) -> dict[str, dict[str, int]]:
        """Matching tasks counted per ``by`` (handler, queue, tag or status) and status, e.g.
        ``{"images.resize": {"succeeded": 10, "failed": 2}}``; a tag counts every task carrying it."""
        return await audit.count_by(await self._ready_store(), by, _filter(filter, criteria))

    async def query_events(
        self,
        *,
        task: int | None = None,
        root: int | None = None,
        worker: str | None = None,
        pod: str | None = None,
        kind: str | Sequence[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        cursor: str | None = None,
        limit: int = 100,
    ) -> audit.Page:
        """Recorded events across tasks, newest first, filtered and paged (see ``audit``)."""
        return await audit.events(
            await self._ready_store(), task=task, root=root, worker=worker, pod=pod, kind=kind,
            since=since, until=until, cursor=cursor, limit=limit,
        )  # fmt: skip

    async def query_attempts(
        self,
        *,
        task: int | None = None,
        root: int | None = None,
        worker: str | None = None,
        pod: str | None = None,
        outcome: str | Sequence[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        cursor: str | None = None,
        limit: int = 100,
    ) -> audit.Page:
        """Ended attempts across tasks, newest task first, filtered and paged (see ``audit``)."""
        return await audit.attempts(
            await self._ready_store(), task=task, root=root, worker=worker, pod=pod, outcome=outcome,
            since=since, until=until, cursor=cursor, limit=limit,
        )  # fmt: skip

    # -- schedules at runtime (kubetasks.schedules) -----------------------

    async def pause_schedule(self, name: str, *, by: str = "api") -> bool:
        """Stop a schedule's ticks until ``resume_schedule`` (its source's ``suspend`` aside);
        False when it was already paused."""
        return await schedules.pause(self, name, by=by)

    async def resume_schedule(self, name: str) -> bool:
        """Let a paused schedule tick again, from now on; False when it was not paused."""
        return await schedules.resume(self, name)

    async def create_schedule(
        self,
        name: str,
        cron: str,
        handler: str,
        *,
        timezone: str = "UTC",
        queue: str | None = None,
        payload: Mapping[str, Any] | None = None,
        concurrency_policy: str = "Forbid",
        lock_ttl: int | None = None,
        starting_deadline: int | None = None,
        suspend: bool = False,
    ) -> None:
        """Add a schedule at runtime (``cron`` as for ``@app.periodic``): every pod's scheduler
        runs ``handler`` once per tick from now on. Refused when ``name`` exists."""
        await schedules.create(
            self, name, cron, handler, timezone=timezone, queue=queue, payload=payload,
            concurrency_policy=concurrency_policy, lock_ttl=lock_ttl,
            starting_deadline=starting_deadline, suspend=suspend,
        )  # fmt: skip

    async def update_schedule(self, name: str, **changes: Any) -> None:
        """Change a runtime schedule's fields (``schedules.UPDATABLE``); one from the code or a
        CronJobLock is refused."""
        await schedules.update(self, name, **changes)

    async def delete_schedule(self, name: str) -> None:
        """Delete a runtime schedule and its tick history (its runs stay)."""
        await schedules.delete(self, name)

    async def list_schedules(self, names: Sequence[str] | None = None, *, history: int = 0) -> list[Any]:
        """Every schedule (or those named) as ``cron.ScheduleStatus``: source, next and last
        runs, paused, orphaned, lock holder, ``history`` recent runs."""
        return await schedules.statuses(self, names, history=history)

    async def prune_schedules(self, *, dry_run: bool = False) -> list[str]:
        """Delete the ``@app.periodic`` schedules no active worker's code declares any more
        (``dry_run``: list them); returns their names."""
        return await schedules.prune(self, dry_run=dry_run)

    async def trigger_schedule(self, name: str) -> Any:
        """Run a schedule now (paused or not), respecting its concurrency policy; a ``cron.TickResult``."""
        return await schedules.trigger(self, name)

    # -- locks -------------------------------------------------------------

    def job_lock(
        self,
        name: str,
        *,
        ttl: float = 30.0,
        wait: float | None = 0.0,
        renew: bool = True,
        owner: str | None = None,
        on_lost: Callable[[str], Any] | None = None,
    ) -> locks.JobLock:
        """A named lock held across the cluster: ``async with app.job_lock("x", ttl=30):``.

        Redis when a Redis URL is configured, else the ``job_locks`` table. Renewed
        every ttl/3 while held; ``lock.lost`` is set if it slips away. ``wait=None``
        waits forever; when the wait runs out, ``LockNotAcquired`` names the holder.
        The app must be open (``await app.open()``).
        """
        if self._locks is None:
            raise RuntimeError("the app is not open: `await app.open()` or `async with app:`")
        return locks.JobLock(self._locks, name, ttl=ttl, wait=wait, renew=renew, owner=owner, on_lost=on_lost)

    async def list_locks(self, prefix: str = "", *, limit: int = locks.LIST_MAX) -> list[locks.LockInfo]:
        """The live job locks (Redis when configured, else PostgreSQL) whose name starts with
        ``prefix``: owner, acquired and expiry on the backend's clock."""
        if not isinstance(prefix, str) or len(prefix) > locks.NAME_MAX:
            raise ValidationError("prefix", f"must be a string of at most {locks.NAME_MAX} characters")
        validation.integer("limit", limit, 1, locks.LIST_MAX)
        await self.open()
        assert self._locks is not None
        return await self._locks.list(prefix, limit)

    async def force_release_lock(self, name: str, *, owner: str | None = None) -> str | None:
        """Delete job lock ``name`` whoever holds it -- only while ``owner`` does, when given, so
        a lock taken anew meanwhile is left alone. Returns the owner it was taken from (None:
        it was free). WARNING: that holder may still be doing the work the lock protects; it
        learns it lost the lock at its next renewal (within a third of its ttl) and another
        holder may start at once."""
        if owner is not None:
            locks.validate_owner(owner)
        await self.open()
        assert self._locks is not None
        taken = await self._locks.force_release(locks.validate_name(name), owner)
        if taken is not None:
            log.warning("job lock %r force-released from %s", name, taken)
        return taken

    # -- running ---------------------------------------------------------

    async def run_worker(
        self,
        *,
        queues: Sequence[str] | None = None,
        concurrency: int | None = None,
        stop: asyncio.Event | None = None,
    ) -> None:
        """Run a worker in this process until ``stop`` is set (see ``kubetasks.worker``)."""
        w = worker_module.Worker(self, queues=queues, concurrency=concurrency)
        await w.run(stop)


def _filter(flt: TaskFilter | None, criteria: Mapping[str, Any]) -> TaskFilter:
    if flt is not None and criteria:
        raise ValidationError("filter", "give a TaskFilter or criteria as keywords, not both")
    return flt if flt is not None else TaskFilter.of(**criteria)


def _as_list(v: str | Sequence[str] | None) -> list[str] | None:
    if v is None:
        return None
    return [v] if isinstance(v, str) else list(v)


__all__ = [
    "FINISHED",
    "STATUSES",
    "UNFINISHED",
    "App",
    "AsyncHandler",
    "Blueprint",
    "EnqueueRequest",
    "Handler",
    "HandlerOptions",
    "Input",
    "PeriodicDef",
    "Prepared",
    "TaskDef",
    "TaskPage",
    "TaskRecord",
    "call_handler",
]
