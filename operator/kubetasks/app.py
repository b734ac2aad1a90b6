"""The public API: handler registry, per-type options, enqueue and admin verbs.

``Blueprint`` holds registrations and opens nothing, so task modules can be
imported anywhere (a CLI, a test) without touching the database; ``App``
adds the settings and the store. Options resolve as enqueue argument > task
option > App default, and everything is validated before the one INSERT.

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
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import asyncpg

from kubetasks import audit, bulk, hooks, listing, locks, schedules, serving, subprocs, validation, workflows
from kubetasks.config import Settings
from kubetasks.context import TaskContext
from kubetasks.errors import Fail, TaskNotFound, UnknownHandler, ValidationError
from kubetasks.filters import TaskFilter
from kubetasks.store import Store

#: A handler: ``async def f(task: TaskContext)``, or ``def f(task: SyncTaskContext)`` run in a child process.
Handler = Callable[[TaskContext], Any] | Callable[[subprocs.SyncTaskContext], Any]
F = TypeVar("F", bound=Handler)
G = TypeVar("G", bound=Callable[..., Any])

log = logging.getLogger("kubetasks.app")
_MISSING: Any = object()
STATUSES = ("pending", "running", "succeeded", "failed", "cancelled", "paused", "suspended")
FINISHED = ("succeeded", "failed", "cancelled")
UNFINISHED = ("pending", "running", "paused", "suspended")  # suspended: a workflow waiting for children


@dataclass(frozen=True)
class Input:
    """One payload key a handler expects: required, a default, a validator.

    A validator returns False or raises ValueError/TypeError to refuse a value.
    """

    required: bool = False
    default: Any = _MISSING
    validator: Callable[[Any], Any] | None = None


@dataclass(frozen=True)
class TaskDef:
    """A registered handler and its per-type options (None: use the App default)."""

    name: str
    func: Handler
    is_async: bool
    queue: str | None = None
    priority: int | None = None
    timeout: float | None = None
    max_attempts: int | None = None
    retry_delay: float | None = None
    backoff: float | None = None
    max_retry_delay: float | None = None
    concurrency: int | None = None
    cluster_concurrency: int | None = None
    inputs: Mapping[str, Input] = field(default_factory=dict)

    def apply_inputs(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(payload)
        for key, spec in self.inputs.items():
            if key not in out:
                if spec.default is not _MISSING:
                    out[key] = spec.default() if callable(spec.default) else spec.default
                elif spec.required:
                    raise ValidationError(f"payload.{key}", f"is required by handler {self.name!r}")
                continue
            if spec.validator is not None:
                try:
                    ok = spec.validator(out[key])
                except (ValueError, TypeError) as exc:
                    raise ValidationError(f"payload.{key}", str(exc)) from None
                if ok is False:
                    raise ValidationError(
                        f"payload.{key}",
                        f"value {out[key]!r} refused by the validator of {self.name!r}",
                    )
        return out


def _input(spec: Input | Mapping[str, Any]) -> Input:
    if isinstance(spec, Input):
        return spec
    unknown = set(spec) - {"required", "default", "validator"}
    if unknown:
        raise ValidationError("inputs", f"unknown input option(s): {', '.join(sorted(unknown))}")
    return Input(
        required=bool(spec.get("required", False)),
        default=spec.get("default", _MISSING),
        validator=spec.get("validator"),
    )


@dataclass(frozen=True)
class HandlerOptions:
    """A handler's options as its latest registration stored them in the database (``handlers``),
    for enqueuing it from a pod whose app does not have it. None: the App default."""

    queue: str | None = None
    priority: int | None = None
    timeout: float | None = None
    max_attempts: int | None = None
    retry_delay: float | None = None
    backoff: float | None = None
    max_retry_delay: float | None = None

    @classmethod
    def from_row(cls, r: Mapping[str, Any]) -> HandlerOptions:
        return cls(
            queue=r["queue"],
            priority=r["priority"],
            timeout=r["timeout_s"],
            max_attempts=r["max_attempts"],
            retry_delay=r["retry_delay_s"],
            backoff=r["retry_backoff"],
            max_retry_delay=r["max_retry_delay_s"],
        )


@dataclass(frozen=True)
class PeriodicDef:
    """A schedule declared with ``@app.periodic``; the scheduler upserts it into ``schedules``.

    The schedule and its handler share one name; ``func`` is the user's function
    (under Forbid the registered handler wraps it in the job lock, see ``cron``).
    """

    name: str
    cron: str
    handler: str
    func: Handler
    timezone: str = "UTC"
    queue: str | None = None
    payload: Mapping[str, Any] = field(default_factory=dict)
    concurrency_policy: str = "Forbid"
    lock_ttl: int = validation.DEFAULT_LOCK_TTL_S
    starting_deadline: int | None = None
    suspend: bool = False


class Blueprint:
    """Task registrations without a connection; ``App`` is a Blueprint that can run."""

    def __init__(self) -> None:
        self.handlers: dict[str, TaskDef] = {}
        self.periodics: dict[str, PeriodicDef] = {}
        self.hooks = hooks.Hooks()

    def before_task(self, func: G | None = None, *, timeout: float = hooks.DEFAULT_TIMEOUT_S) -> Any:
        """Call ``func(task)`` before every handler this app's workers run (see ``kubetasks.hooks``):
        ``@app.before_task`` or ``@app.before_task(timeout=2)``; sync or async."""
        return self._hook("before", func, timeout)

    def after_task(self, func: G | None = None, *, timeout: float = hooks.DEFAULT_TIMEOUT_S) -> Any:
        """Call ``func(task, result)`` after every handler that succeeded."""
        return self._hook("after", func, timeout)

    def on_task_failure(self, func: G | None = None, *, timeout: float = hooks.DEFAULT_TIMEOUT_S) -> Any:
        """Call ``func(task, error, outcome)`` after every attempt that did not succeed: ``error``
        the exception (``TimeoutError`` for a timeout), ``outcome`` ``retried`` (another attempt
        follows) or ``failed`` (none does)."""
        return self._hook("failure", func, timeout)

    def _hook(self, kind: str, func: G | None, timeout: float) -> Any:
        def add(f: G) -> G:
            self.hooks.add(kind, f, timeout)
            return f

        return add if func is None else add(func)

    def task(
        self,
        name: str | None = None,
        *,
        queue: str | None = None,
        priority: int | None = None,
        timeout: float | None = None,
        max_attempts: int | None = None,
        retry_delay: float | None = None,
        backoff: float | None = None,
        max_retry_delay: float | None = None,
        concurrency: int | None = None,
        cluster_concurrency: int | None = None,
        inputs: Mapping[str, Input | Mapping[str, Any]] | None = None,
    ) -> Callable[[F], F]:
        """Register the decorated function as a handler: ``async def`` runs on the worker's loop,
        a plain ``def`` in a child process (see ``kubetasks.subprocs``)."""

        def decorate(func: F) -> F:
            self.register(
                name or f"{func.__module__}.{func.__qualname__}",
                func,
                queue=queue,
                priority=priority,
                timeout=timeout,
                max_attempts=max_attempts,
                retry_delay=retry_delay,
                backoff=backoff,
                max_retry_delay=max_retry_delay,
                concurrency=concurrency,
                cluster_concurrency=cluster_concurrency,
                inputs=inputs,
            )
            return func

        return decorate

    def register(
        self,
        name: str,
        func: Handler,
        *,
        queue: str | None = None,
        priority: int | None = None,
        timeout: float | None = None,
        max_attempts: int | None = None,
        retry_delay: float | None = None,
        backoff: float | None = None,
        max_retry_delay: float | None = None,
        concurrency: int | None = None,
        cluster_concurrency: int | None = None,
        inputs: Mapping[str, Input | Mapping[str, Any]] | None = None,
        replace: bool = False,
    ) -> TaskDef:
        validation.name("handler", name)
        if name in self.handlers and not replace:
            raise ValidationError("handler", f"{name!r} is already registered")
        if not callable(func):
            raise ValidationError("handler", f"{name!r}: the handler must be callable")
        is_async = subprocs.is_async_handler(func)
        td = TaskDef(
            name=name,
            func=func,
            is_async=is_async,
            queue=None if queue is None else validation.name("queue", queue),
            priority=None if priority is None else validation.priority(priority),
            timeout=None if timeout is None else validation.timeout(timeout),
            max_attempts=None if max_attempts is None else validation.max_attempts(max_attempts),
            retry_delay=None if retry_delay is None else validation.retry_delay(retry_delay),
            backoff=None if backoff is None else validation.backoff(backoff),
            max_retry_delay=None if max_retry_delay is None else validation.max_retry_delay(max_retry_delay),
            concurrency=None if concurrency is None else validation.concurrency("concurrency", concurrency),
            cluster_concurrency=None
            if cluster_concurrency is None
            else validation.concurrency("cluster_concurrency", cluster_concurrency),
            inputs={k: _input(v) for k, v in (inputs or {}).items()},
        )
        if not is_async:
            subprocs.check_runnable(name, func)
        self.handlers[name] = td
        return td

    def unregister(self, name: str) -> None:
        if self.handlers.pop(name, None) is None:
            raise UnknownHandler(name, list(self.handlers))

    def add_tasks_from(self, other: Blueprint) -> None:
        self.hooks.extend(other.hooks)
        for td in other.handlers.values():
            if td.name in self.handlers:
                raise ValidationError("handler", f"{td.name!r} is already registered")
            self.handlers[td.name] = td
        for pd in other.periodics.values():
            if pd.name in self.periodics:
                raise ValidationError("name", f"periodic {pd.name!r} is already declared")
            self.periodics[pd.name] = pd
            if pd.concurrency_policy == "Forbid":
                from kubetasks import cron  # noqa: PLC0415 - cron imports app

                # The job-lock wrapper must take its lock through this App.
                self.handlers[pd.handler] = cron.rebound(self, pd, self.handlers[pd.handler])

    def periodic(
        self,
        cron: str,
        *,
        name: str | None = None,
        timezone: str = "UTC",
        queue: str | None = None,
        payload: Mapping[str, Any] | None = None,
        concurrency_policy: str = "Forbid",
        lock_ttl: int | None = None,
        starting_deadline: int | None = None,
        suspend: bool = False,
        priority: int | None = None,
        timeout: float | None = None,
        max_attempts: int | None = None,
    ) -> Callable[[F], F]:
        """Run the decorated function on a cron schedule, once per tick across all pods.

        ``cron`` is croniter syntax (five fields, or six with seconds last),
        evaluated in ``timezone``. The function is also registered as a handler
        of the same name. ``concurrency_policy="Forbid"`` (default): a run holds
        the job lock ``cron:<name>`` (``lock_ttl`` seconds, renewed every third
        of it while it runs; 60 by default, or half the ``timeout`` when that
        is shorter) and a tick that finds a run unfinished or the lock held is
        skipped; ``"Allow"``: runs may overlap. Ticks older than
        ``starting_deadline`` seconds when the scheduler gets to them are
        recorded as missed. An expression that never fires or an unknown time
        zone raises ``ValidationError``, and so does a ``lock_ttl`` that is not
        shorter than ``timeout``: a run recovered after its pod died waits up to
        ``lock_ttl`` for that pod's lock, within its own timeout.
        """

        def decorate(func: F) -> F:
            from kubetasks import cron as cron_module  # noqa: PLC0415 - cron imports app

            pname = name or f"{func.__module__}.{func.__qualname__}"
            if pname in self.periodics:
                raise ValidationError("name", f"periodic {pname!r} is already declared")
            ttl = lock_ttl
            if ttl is None:
                ttl = validation.DEFAULT_LOCK_TTL_S
                if isinstance(timeout, int | float) and timeout <= 2 * ttl:
                    ttl = max(1, int(timeout // 2))
            elif (
                concurrency_policy == "Forbid"
                and isinstance(timeout, int | float)
                and cron_module.validate_lock_ttl(ttl) >= timeout
            ):
                raise ValidationError(
                    "lock_ttl",
                    f"must be shorter than the timeout ({timeout:g}s), got {ttl}: a run recovered "
                    "after its pod died waits up to lock_ttl for that pod's lock",
                )
            pd = cron_module.periodic_def(
                self, func, cron, name=pname, timezone=timezone, queue=queue, payload=payload,
                concurrency_policy=concurrency_policy, lock_ttl=ttl,
                starting_deadline=starting_deadline, suspend=suspend,
            )  # fmt: skip
            if not subprocs.is_async_handler(func):
                subprocs.check_runnable(pname, func)
            handler = cron_module.guard(self, pd) if pd.concurrency_policy == "Forbid" else func
            self.register(
                pd.handler,
                handler,
                queue=queue,
                priority=priority,
                timeout=timeout,
                max_attempts=max_attempts,
            )
            self.periodics[pd.name] = pd
            return func

        return decorate


@dataclass(frozen=True)
class TaskRecord:
    """A task row as the API returns it."""

    id: int
    handler: str
    queue: str
    priority: int
    payload: dict[str, Any]
    status: str
    attempt: int
    max_attempts: int
    run_at: datetime
    timeout: float
    result: Any
    error: str | None
    traceback: str | None
    worker_id: str | None
    pod_id: str | None
    progress: int | None
    progress_message: str | None
    tags: list[str]
    dedupe_key: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    parent_id: int | None = None  # the task that spawned this one (workflows)
    spawn_key: str | None = None
    #: Runs that did not count against max_attempts; ``attempt`` is the latest run's number.
    uncharged: int = 0

    @property
    def attempts_spent(self) -> int:
        return self.attempt - self.uncharged

    @classmethod
    def from_row(cls, r: Mapping[str, Any]) -> TaskRecord:
        return cls(
            id=r["id"],
            handler=r["handler"],
            queue=r["queue"],
            priority=r["priority"],
            payload=r["payload"],
            status=r["status"],
            attempt=r["attempt"],
            max_attempts=r["max_attempts"],
            run_at=r["run_at"],
            timeout=r["timeout_s"],
            result=r["result"],
            error=r["error"],
            traceback=r["traceback"],
            worker_id=str(r["worker_id"]) if r["worker_id"] else None,
            pod_id=r["pod_id"],
            progress=r["progress"],
            progress_message=r["progress_message"],
            tags=list(r["tags"]),
            dedupe_key=r["dedupe_key"],
            created_at=r["created_at"],
            started_at=r["started_at"],
            finished_at=r["finished_at"],
            parent_id=r.get("parent_id"),
            spawn_key=r.get("spawn_key"),
            uncharged=r.get("uncharged") or 0,
        )


@dataclass(frozen=True)
class TaskPage:
    items: list[TaskRecord]
    total: int
    limit: int
    offset: int

    @property
    def has_more(self) -> bool:
        return self.offset + len(self.items) < self.total


@dataclass(frozen=True)
class EnqueueRequest:
    """One task for ``enqueue_many``; fields mirror ``enqueue``'s arguments."""

    handler: str
    payload: Mapping[str, Any] | None = None
    delay: float | None = None
    run_at: datetime | None = None
    priority: int | None = None
    queue: str | None = None
    timeout: float | None = None
    max_attempts: int | None = None
    tags: Sequence[str] | None = None
    dedupe_key: str | None = None
    #: Retry policy of this task: seconds before the first retry, the factor each later one
    #: grows by, and the cap (None: the handler's option, else the App default).
    retry_delay: float | None = None
    backoff: float | None = None
    max_retry_delay: float | None = None


@dataclass(frozen=True)
class _Prepared:
    handler: str
    queue: str
    priority: int
    payload: str
    max_attempts: int
    run_at: datetime | None
    delay: float | None
    timeout: float
    retry_delay: float
    backoff: float
    max_retry_delay: float
    tags: list[str]
    dedupe_key: str | None


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

    def _prepare(
        self,
        req: EnqueueRequest,
        max_payload: int | None = None,
        *,
        stored: HandlerOptions | None = None,
        strict: bool | None = None,
    ) -> _Prepared:
        """Validate one request into the values inserted; ``stored``: the options of a
        handler this app does not have, as read from the database (see ``_prepare_any``)."""
        s = self.settings
        validation.name("handler", req.handler)
        td: TaskDef | HandlerOptions | None = self.handlers.get(req.handler)
        inputs = td.inputs if isinstance(td, TaskDef) else None
        if td is None and (self.strict_handlers if strict is None else strict):
            raise UnknownHandler(req.handler, list(self.handlers))
        if td is None:
            td = stored
        if req.delay is not None and req.run_at is not None:
            raise ValidationError("delay", "give delay or run_at, not both")
        payload_obj: Mapping[str, Any] = req.payload if req.payload is not None else {}
        if not isinstance(payload_obj, Mapping):
            raise ValidationError(
                "payload", f"must be a JSON object (a dict), got {type(payload_obj).__name__}"
            )
        if inputs and isinstance(td, TaskDef):
            payload_obj = td.apply_inputs(payload_obj)
        payload = validation.payload(payload_obj, max_payload or s.max_payload_bytes)

        def pick(arg: Any, opt: Any, default: Any) -> Any:
            return arg if arg is not None else (opt if opt is not None else default)

        return _Prepared(
            handler=req.handler,
            queue=validation.name("queue", pick(req.queue, td and td.queue, s.default_queue)),
            priority=validation.priority(pick(req.priority, td and td.priority, 0)),
            payload=payload,
            max_attempts=validation.max_attempts(
                pick(req.max_attempts, td and td.max_attempts, s.default_max_attempts)
            ),
            run_at=None if req.run_at is None else validation.run_at(req.run_at),
            delay=None if req.delay is None else validation.delay(req.delay),
            timeout=validation.timeout(pick(req.timeout, td and td.timeout, s.default_timeout)),
            retry_delay=validation.retry_delay(
                pick(req.retry_delay, td and td.retry_delay, s.default_retry_delay)
            ),
            backoff=validation.backoff(pick(req.backoff, td and td.backoff, s.default_backoff)),
            max_retry_delay=validation.max_retry_delay(
                pick(req.max_retry_delay, td and td.max_retry_delay, s.default_max_retry_delay)
            ),
            tags=validation.tags(req.tags),
            dedupe_key=validation.dedupe_key(req.dedupe_key),
        )

    async def _stored_options(
        self, store: Store, names: Iterable[str], conn: Any = None
    ) -> dict[str, HandlerOptions]:
        """The stored options of the handlers among ``names`` that this app does not have."""
        missing = sorted({n for n in names if n not in self.handlers})
        if not missing:
            return {}
        rows = await store.run("handler_options", missing, conn=conn)
        return {r["name"]: HandlerOptions.from_row(r) for r in rows}

    async def _prepare_any(self, req: EnqueueRequest, store: Store, conn: Any = None) -> _Prepared:
        """Like ``_prepare``, but never refuses a handler for being absent from this app: its
        options come from the database (the latest registration of a pod that has it). For
        tasks that did not come from this app's code: Task objects, CronJobLocks."""
        validation.name("handler", req.handler)
        stored = (await self._stored_options(store, [req.handler], conn)).get(req.handler)
        return self._prepare(req, stored=stored, strict=False)

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
            p = self._prepare(req)
            store = await self._ready_store()
        else:
            store = await self._ready_store()
            p = await self._prepare_any(req, store)
        return await self._insert(store, p)

    async def _insert(
        self,
        store: Store,
        p: _Prepared,
        cr: tuple[str, str, str] | None = None,
        paused: bool = False,
    ) -> int:
        cr_uid, cr_ns, cr_name = cr if cr else (None, None, None)
        for _ in range(5):
            task_id = await store.run(
                "enqueue", p.handler, p.queue, p.priority, p.payload, p.max_attempts, p.run_at,
                p.delay, p.timeout, p.retry_delay, p.backoff, p.max_retry_delay, p.tags,
                p.dedupe_key, cr_uid, cr_ns, cr_name, paused,
            )  # fmt: skip
            if task_id is not None:
                return int(task_id)
            if cr_uid is not None:
                existing = await store.run("find_by_cr_uid", cr_uid)
                if existing is not None:
                    return int(existing)
            if p.dedupe_key is not None:
                rows = await store.run("find_live_by_dedupe_key", [p.dedupe_key])
                if rows:
                    return int(rows[0]["id"])
            # The conflicting task finished in between: insert again.
        raise RuntimeError("enqueue kept conflicting with a task that was finishing; try again")

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
            stored = await self._stored_options(await self._ready_store(), (r.handler for r in requests))
        prepared = [self._prepare(r, stored=stored.get(r.handler)) for r in requests]
        if not prepared:
            return []
        keys = [p.dedupe_key for p in prepared if p.dedupe_key is not None]
        if len(keys) != len(set(keys)):
            raise ValidationError("dedupe_key", "the same dedupe key appears twice in one batch")
        store = await self._ready_store()
        rows = await store.run(
            "enqueue_many",
            [p.handler for p in prepared],
            [p.queue for p in prepared],
            [p.priority for p in prepared],
            [p.payload for p in prepared],
            [p.max_attempts for p in prepared],
            [p.run_at for p in prepared],
            [p.delay for p in prepared],
            [p.timeout for p in prepared],
            [p.retry_delay for p in prepared],
            [p.backoff for p in prepared],
            [p.max_retry_delay for p in prepared],
            ["\x1f".join(p.tags) if p.tags else None for p in prepared],
            [p.dedupe_key for p in prepared],
        )
        if len(rows) == len(prepared):
            return [int(r["id"]) for r in rows]
        # Some dedupe keys named live tasks: map them, insert-order for the rest.
        by_key = {r["dedupe_key"]: int(r["id"]) for r in rows if r["dedupe_key"] is not None}
        missing = [k for k in keys if k not in by_key]
        for r in await store.run("find_live_by_dedupe_key", missing):
            by_key[r["dedupe_key"]] = int(r["id"])
        plain = iter(int(r["id"]) for r in rows if r["dedupe_key"] is None)
        return [by_key[p.dedupe_key] if p.dedupe_key is not None else next(plain) for p in prepared]

    # -- queries ---------------------------------------------------------

    async def get_task(self, task_id: int) -> TaskRecord:
        row = await (await self._ready_store()).run("get_task", task_id)
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
    ) -> TaskPage:
        statuses = _as_list(status)
        for st in statuses or []:
            if st not in STATUSES:
                raise ValidationError("status", f"unknown status {st!r}; one of {', '.join(STATUSES)}")
        validation.integer("limit", limit, 1, 1000)
        validation.integer("offset", offset, 0, 2**31 - 1)
        rows = await (await self._ready_store()).run(
            "list_tasks", statuses, _as_list(handler), _as_list(queue),
            list(tags) if tags else None, created_after, created_before, limit, offset,
        )  # fmt: skip
        total = int(rows[0]["total"]) if rows else 0
        if not rows and offset:
            # Past the end: count without a page to report the real total.
            probe = await (await self._ready_store()).run(
                "list_tasks", statuses, _as_list(handler), _as_list(queue),
                list(tags) if tags else None, created_after, created_before, 1, 0,
            )  # fmt: skip
            total = int(probe[0]["total"]) if probe else 0
        return TaskPage([TaskRecord.from_row(r) for r in rows], total, limit, offset)

    async def get_attempts(self, task_id: int) -> list[dict[str, Any]]:
        """One dict per ended attempt: attempt, worker_id, pod_id, started_at, finished_at,
        outcome, error, duration_s."""
        rows = await (await self._ready_store()).run("get_attempts", task_id)
        return [dict(r) for r in rows]

    # -- workflows and audit -------------------------------------------------

    async def get_events(self, task_id: int) -> list[dict[str, Any]]:
        """The task's history, oldest first: dicts of at, kind, attempt, worker_id, pod_id, detail.

        Kinds: created, claimed, progress, retried, fenced_out, recovered, released,
        paused, resumed, suspended, woken, cancelled, requeued, succeeded, failed.
        """
        rows = await (await self._ready_store()).run("get_events", task_id)
        if not rows:
            await self.get_task(task_id)  # raises TaskNotFound
        return [
            {**dict(r), "worker_id": None if r["worker_id"] is None else str(r["worker_id"])} for r in rows
        ]

    async def workflow_summary(self, root_id: int) -> workflows.WorkflowSummary:
        """The tree under ``root_id``: counts by status, total and wall time, retries, critical path."""
        rows = await (await self._ready_store()).run("workflow_tasks", root_id)
        if not rows:
            raise TaskNotFound(root_id)
        return workflows.summarize(rows)

    async def children_counts(self, task_ids: Sequence[int]) -> dict[int, dict[str, int]]:
        """Direct children of each task, counted by status (tasks without children are absent)."""
        out: dict[int, dict[str, int]] = {}
        for r in await (await self._ready_store()).run("children_counts", list(task_ids)):
            out.setdefault(int(r["parent_id"]), {})[r["status"]] = int(r["n"])
        return out

    async def _spawn_children(
        self, ctx: TaskContext, requests: Sequence[EnqueueRequest], keys: Sequence[str]
    ) -> list[int] | None:
        """Children of the running ``ctx``, one per key; None when ``ctx`` was taken away."""
        for k in keys:
            if not isinstance(k, str) or not 1 <= len(k) <= 255:
                raise ValidationError("key", f"a spawn key is 1 to 255 characters, got {k!r}")
        if len(set(keys)) != len(keys):
            raise ValidationError("key", "the same spawn key appears twice in one call")
        for r in requests:
            if r.dedupe_key is not None:
                raise ValidationError("dedupe_key", "a child task is identified by its spawn key instead")
        ps = [self._prepare(r) for r in requests]
        rows = await self.store.run(
            "spawn_children", ctx.id, ctx.attempt, uuid.UUID(ctx.worker_id), list(keys),
            [p.handler for p in ps], [p.queue for p in ps], [p.priority for p in ps],
            [p.payload for p in ps], [p.max_attempts for p in ps], [p.run_at for p in ps],
            [p.delay for p in ps], [p.timeout for p in ps], [p.retry_delay for p in ps],
            [p.backoff for p in ps], [p.max_retry_delay for p in ps],
            ["\x1f".join(p.tags) if p.tags else None for p in ps],
        )  # fmt: skip
        if not rows or any(r["id"] is None for r in rows):
            return None
        for p, r in zip(ps, rows, strict=True):
            if r["handler"] != p.handler:
                raise Fail(
                    f"spawn {r['spawn_key']!r} of task {ctx.id} was {r['handler']!r} in an earlier run "
                    f"and is {p.handler!r} now: a workflow handler must spawn the same children in the "
                    "same order on every run (or give each a key)"
                )
        return [int(r["id"]) for r in rows]

    async def stats(self) -> dict[str, Any]:
        """Counts per queue and status, oldest due pending age, running per worker, and the
        (handler, queue) pairs whose pending tasks no active worker serves."""
        store = await self._ready_store()
        counts: dict[str, dict[str, int]] = {}
        for r in await store.run("stats_counts"):
            counts.setdefault(r["queue"], {})[r["status"]] = int(r["n"])
        oldest = {r["queue"]: float(r["age_s"]) for r in await store.run("stats_oldest_pending")}
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
            for r in await store.run("stats_workers")
        ]
        paused = [r["queue"] for r in await store.run("paused_queues")]
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
                row = await store.run("cancel_task", task_id, reason)
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
            return int(await store.run("retry_failed_of_handler", validation.name("handler", handler)))
        row = await store.run("retry_task", task_id)
        if row is None:
            await self.get_task(task_id)  # type: ignore[arg-type]  # raises TaskNotFound
            return 0
        rec = await self.get_task(task_id)  # type: ignore[arg-type]
        await store.run("wake_queue", rec.queue)
        return 1

    async def pause_task(self, task_id: int) -> bool:
        row = await (await self._ready_store()).run("pause_task", task_id)
        if row is None:
            await self.get_task(task_id)
        return row is not None

    async def resume_task(self, task_id: int) -> bool:
        store = await self._ready_store()
        row = await store.run("resume_task", task_id)
        if row is None:
            await self.get_task(task_id)
            return False
        await store.run("wake_queue", row["queue"])
        return True

    async def pause_queue(self, queue: str) -> None:
        await (await self._ready_store()).run("set_queue_paused", validation.name("queue", queue), True)

    async def resume_queue(self, queue: str) -> None:
        store = await self._ready_store()
        await store.run("set_queue_paused", validation.name("queue", queue), False)
        await store.run("wake_queue", queue)

    async def delete_tasks(self, *, older_than: float = 0.0, statuses: Sequence[str] = FINISHED) -> int:
        """Delete finished tasks that ended more than ``older_than`` seconds ago."""
        for st in statuses:
            if st not in FINISHED:
                raise ValidationError("statuses", f"only finished statuses can be deleted, got {st!r}")
        validation.seconds("older_than", older_than, 0, 10 * 365 * 86400)
        return int(await (await self._ready_store()).run("delete_finished_tasks", list(statuses), older_than))

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
        from kubetasks import worker as worker_module  # noqa: PLC0415 - worker imports app

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


async def call_handler(td: TaskDef, ctx: TaskContext) -> Any:
    """Run a handler: coroutine functions on the loop, plain functions in a child process."""
    if td.is_async:
        return await td.func(ctx)  # type: ignore[arg-type]
    return await subprocs.run(td.func, ctx)


AsyncHandler = Callable[[TaskContext], Awaitable[Any]]
