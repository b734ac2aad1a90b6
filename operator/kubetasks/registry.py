"""Registrations: handlers and periodic schedules by name, and handler dispatch.

``Blueprint`` holds registrations and opens nothing, so task modules can be
imported anywhere (a CLI, a test) without touching the database; ``App``
(``kubetasks.app``) is a Blueprint that can run. ``call_handler`` is the one
place that runs a handler: a coroutine function on the loop, a plain function
in a child process (``kubetasks.subprocs``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar, runtime_checkable

from kubetasks import crontab, hooks, locks, subprocs, validation
from kubetasks.context import TaskContext
from kubetasks.errors import UnknownHandler, ValidationError
from kubetasks.model import Input, PeriodicDef, TaskDef, as_input

#: A handler: ``async def f(task: TaskContext)``, or ``def f(task: SyncTaskContext)`` run in a child process.
Handler = Callable[[TaskContext], Any] | Callable[[subprocs.SyncTaskContext], Any]
F = TypeVar("F", bound=Handler)
G = TypeVar("G", bound=Callable[..., Any])
AsyncHandler = Callable[[TaskContext], Awaitable[Any]]


@runtime_checkable
class Locking(Protocol):
    """What a Forbid schedule's run needs of its owner: job locks (an open ``App``)."""

    def job_lock(
        self,
        name: str,
        *,
        ttl: float = ...,
        wait: float | None = ...,
        renew: bool = ...,
        owner: str | None = ...,
        on_lost: Callable[[str], Any] | None = ...,
    ) -> locks.JobLock: ...


async def run_handler(func: Callable[..., Any], is_async: bool, ctx: TaskContext) -> Any:
    """Run a handler: coroutine functions on the loop, plain functions in a child process."""
    if is_async:
        return await func(ctx)
    return await subprocs.run(func, ctx)


async def call_handler(td: TaskDef, ctx: TaskContext) -> Any:
    """Run a registered handler (see ``run_handler``)."""
    return await run_handler(td.func, td.is_async, ctx)


class Blueprint:
    """Task registrations without a connection; ``App`` is a Blueprint that can run."""

    def __init__(self) -> None:
        self.handlers: dict[str, TaskDef] = {}
        self.periodics: dict[str, PeriodicDef] = {}
        self.hooks = hooks.Hooks()
        self._handlers_version = 0

    @property
    def handlers_version(self) -> int:
        """Moves on with every change of ``handlers`` made here (register, unregister,
        add_tasks_from): a worker compares it, not its thousands of names, before each claim."""
        return self._handlers_version

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
            inputs={k: as_input(v) for k, v in (inputs or {}).items()},
        )
        if not is_async:
            subprocs.check_runnable(name, func)
        self.handlers[name] = td
        self._handlers_version += 1
        return td

    def unregister(self, name: str) -> None:
        if self.handlers.pop(name, None) is None:
            raise UnknownHandler(name, list(self.handlers))
        self._handlers_version += 1

    def add_tasks_from(self, other: Blueprint) -> None:
        self.hooks.extend(other.hooks)
        self._handlers_version += 1
        for td in other.handlers.values():
            if td.name in self.handlers:
                raise ValidationError("handler", f"{td.name!r} is already registered")
            self.handlers[td.name] = td
        for pd in other.periodics.values():
            if pd.name in self.periodics:
                raise ValidationError("name", f"periodic {pd.name!r} is already declared")
            self.periodics[pd.name] = pd
            if pd.concurrency_policy == "Forbid":
                # The job-lock wrapper must take its lock through this App.
                self.handlers[pd.handler] = rebound(self, pd, self.handlers[pd.handler])

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
                and crontab.validate_lock_ttl(ttl) >= timeout
            ):
                raise ValidationError(
                    "lock_ttl",
                    f"must be shorter than the timeout ({timeout:g}s), got {ttl}: a run recovered "
                    "after its pod died waits up to lock_ttl for that pod's lock",
                )
            pd = periodic_def(
                self, func, cron, name=pname, timezone=timezone, queue=queue, payload=payload,
                concurrency_policy=concurrency_policy, lock_ttl=ttl,
                starting_deadline=starting_deadline, suspend=suspend,
            )  # fmt: skip
            if not subprocs.is_async_handler(func):
                subprocs.check_runnable(pname, func)
            handler = guard(self, pd) if pd.concurrency_policy == "Forbid" else func
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


def guard(owner: Blueprint, pd: PeriodicDef) -> Callable[[TaskContext], Awaitable[Any]]:
    """The handler ``@app.periodic`` registers under Forbid: the user's function inside the job lock.

    ``owner`` must be (or be merged into) an open App when the run starts.
    The lock is waited for up to ``lock_ttl``: a holder that died lets it
    expire within that time; a live holder is a run enqueued outside the
    scheduler, and the attempt fails naming it.
    """
    func = pd.func
    is_async = subprocs.is_async_handler(func)

    async def body(ctx: TaskContext) -> Any:
        # A sync function runs in a child process: killed if the lock is lost.
        return await run_handler(func, is_async, ctx)

    async def run_locked(ctx: TaskContext) -> Any:
        if not isinstance(owner, Locking):
            raise RuntimeError(f"periodic {pd.name!r} is declared on a Blueprint that no App includes")
        owner_token = f"{ctx.pod_id or 'pod'}/task-{ctx.id}.{ctx.attempt}/{secrets.token_hex(6)}"
        lock = owner.job_lock(
            crontab.lock_name(pd.name), ttl=pd.lock_ttl, wait=pd.lock_ttl, owner=owner_token
        )
        async with lock:
            work = asyncio.ensure_future(body(ctx))
            lost = asyncio.ensure_future(lock.lost.wait())
            try:
                await asyncio.wait({work, lost}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await work
                raise
            finally:
                lost.cancel()
            if not work.done():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await work
                lock.raise_if_lost()
            return work.result()

    run_locked.__name__ = getattr(func, "__name__", "periodic")
    run_locked.__qualname__ = getattr(func, "__qualname__", run_locked.__name__)
    return run_locked


def rebound(owner: Blueprint, pd: PeriodicDef, td: TaskDef) -> TaskDef:
    """``td`` with its job-lock wrapper taking the lock through ``owner`` (``add_tasks_from``)."""
    return dataclasses.replace(td, func=guard(owner, pd), is_async=True)


def periodic_def(
    owner: Blueprint,
    func: Handler,
    cron: str,
    *,
    name: str,
    timezone: str,
    queue: str | None,
    payload: Mapping[str, Any] | None,
    concurrency_policy: str,
    lock_ttl: int,
    starting_deadline: int | None,
    suspend: bool,
) -> PeriodicDef:
    """Validate ``@app.periodic``'s arguments into a PeriodicDef (the handler is registered by the caller)."""
    crontab.validate_name(name)
    validation.name("handler", name)
    crontab.validate(cron, timezone)
    if queue is not None:
        validation.name("queue", queue)
    crontab.validate_policy(concurrency_policy)
    crontab.validate_lock_ttl(lock_ttl)
    crontab.validate_deadline(starting_deadline)
    body = dict(payload or {})
    validation.to_json("payload", body, validation.DEFAULT_MAX_PAYLOAD_BYTES)
    return PeriodicDef(
        name=name, cron=cron, handler=name, func=func, timezone=timezone, queue=queue, payload=body,
        concurrency_policy=concurrency_policy, lock_ttl=lock_ttl, starting_deadline=starting_deadline,
        suspend=suspend,
    )  # fmt: skip
