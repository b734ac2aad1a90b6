"""TaskContext: what a handler sees of the task it runs.

Progress is coalesced: a handler may call ``progress()`` in a tight loop, and
at most one fenced write per ``PROGRESS_INTERVAL`` seconds reaches the
database, carrying the latest value. The final value is written before the
task's outcome, so nothing reported is lost. A report may name its ``stage``
and carry ``metadata`` (a small JSON object), validated when it is made.

Pausing: a running task asked to pause (``App.pause_task``, ``kubetasks tasks
pause``, ``spec.suspend`` on its Task object) has ``pause_requested`` set by
its worker -- at once through NOTIFY, else within one heartbeat. A handler that
looks at a checkpoint of its choosing and raises ``Pause`` (``task.pause()``)
ends the attempt uncharged and the task waits, paused, for ``resume_task``; one
that never looks runs on, and the task is paused when the attempt ends (or, if
that attempt finished it, the request is recorded as moot).

Workflows: ``spawn``/``spawn_many`` add child tasks linked to this one and
``wait`` returns their results once they have all ended -- until then it
suspends the task without holding a worker (see ``kubetasks.workflows``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from kubetasks import enqueue, validation
from kubetasks.errors import Fail, LeaseLost, Pause, ValidationError
from kubetasks.model import EnqueueRequest
from kubetasks.store import tasks
from kubetasks.workflows import POLICIES, TERMINAL, ChildFailed, Suspend

if TYPE_CHECKING:
    from kubetasks.store import Store

PROGRESS_INTERVAL = 0.5

#: One progress report: percent, message, stage, metadata (a JSON object's text).
Report = tuple[int, str | None, str | None, str | None]
#: Writes progress; returns False when the write was fenced out (the task is no
#: longer this attempt's), None when the database could not be reached.
ProgressWriter = Callable[["TaskContext", Report], Awaitable[bool | None]]


class TaskHost(enqueue.Registry, Protocol):
    """What a running task needs of its App: the registry and store to spawn children with,
    and ``cancel`` for ``wait``'s fail_fast."""

    @property
    def store(self) -> Store: ...

    async def cancel(self, task_id: int, reason: str = "cancelled") -> bool: ...


@dataclass
class TaskContext:
    """The running task: identity, input and a way to report progress.

    ``attempt`` is this run's number: every claim of the task takes a new one
    and none is ever reused, so (id, attempt) names one run. ``uncharged`` of
    the runs so far did not count against ``max_attempts`` (handed back at a
    graceful shutdown, a workflow that waited for its children, ...):
    ``attempts_spent`` is the count that does.
    """

    id: int
    handler: str
    queue: str
    payload: dict[str, Any]
    attempt: int
    max_attempts: int
    priority: int = 0
    tags: list[str] = field(default_factory=list)
    worker_id: str = ""
    pod_id: str = ""
    parent_id: int | None = None
    uncharged: int = 0
    _writer: ProgressWriter | None = field(default=None, repr=False)
    _pending: Report | None = field(default=None, repr=False)
    _flusher: asyncio.Task[None] | None = field(default=None, repr=False)
    _last_write: float = field(default=-1e9, repr=False)
    _sleeping: bool = field(default=False, repr=False)
    _write_lock: asyncio.Lock | None = field(default=None, repr=False)  # made at the first write
    _closing: bool = field(default=False, repr=False)
    _taken_away: bool = field(default=False, repr=False)
    _app: TaskHost | None = field(default=None, repr=False)
    _spawn_seq: int = field(default=0, repr=False)
    _pause_asked: bool = field(default=False, repr=False)
    #: Told of each change of ``pause_requested`` (a sync handler's child process is).
    _pause_listeners: list[Callable[[bool], None]] = field(default_factory=list, repr=False)

    @property
    def pause_requested(self) -> bool:
        """True while this run is asked to pause: pause at a checkpoint with ``pause()`` (or
        ``raise Pause(...)``), or carry on and the task pauses when this attempt ends."""
        return self._pause_asked

    def pause(self, message: str | None = None) -> NoReturn:
        """End this attempt here without charging it; the task stays paused until resumed, and
        its handler runs again from the top then. Asked or not: a handler may pause itself."""
        raise Pause(message)

    def set_pause_requested(self, asked: bool) -> None:
        """The worker's side: the database says this run is (or no longer is) asked to pause."""
        if asked == self._pause_asked:
            return
        self._pause_asked = asked
        for tell in list(self._pause_listeners):
            tell(asked)

    def on_pause_change(self, tell: Callable[[bool], None]) -> Callable[[], None]:
        """The worker's side: ``tell`` hears each change of ``pause_requested`` (a sync handler's
        child process must) until the returned function is called."""
        self._pause_listeners.append(tell)
        return lambda: self._pause_listeners.remove(tell)

    @property
    def attempts_spent(self) -> int:
        """Attempts counted against ``max_attempts``, this one included."""
        return self.attempt - self.uncharged

    @property
    def is_last_attempt(self) -> bool:
        return self.attempts_spent >= self.max_attempts

    async def progress(
        self,
        percent: int | float,
        message: str | None = None,
        *,
        stage: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        """Report progress (0-100); cheap to call often, written at most every 0.5 s.

        ``stage`` names the step the run is in (letters, digits and _ . : -, at most 63
        characters: ``download``, ``resize``); ``metadata`` is a JSON object of at most 4 KiB
        (``{"done": 120, "of": 400}``). Each report replaces the last whole; a change of
        percentage or stage is recorded as an event, and the latest report shows in
        ``get_task``, the listings and the Task object's status. Bad input raises
        ``ValidationError`` naming the field and its limit.

        Raises LeaseLost once a write has found the task taken away from this
        attempt (cancelled, or recovered after this worker lost its lease), so a
        long handler learns it should stop.
        """
        stage, meta = validation.progress_details(stage, metadata)
        if self._taken_away:
            raise LeaseLost(f"task {self.id} attempt {self.attempt} is no longer held by this worker")
        p = max(0, min(100, int(percent)))
        self._pending = (p, message, stage, meta)
        if self._writer is not None and (self._flusher is None or self._flusher.done()):
            loop = asyncio.get_running_loop()
            wait = self._last_write + PROGRESS_INTERVAL - loop.time()
            self._sleeping = wait > 0
            self._flusher = loop.create_task(self._flush_after(max(0.0, wait)))
        # Always yield: the first report goes out promptly, and a tight loop of
        # progress() calls cannot starve the writes, the heartbeat or other tasks.
        await asyncio.sleep(0)

    async def audit(
        self, code: str, message: str | None = None, metadata: dict[str, Any] | None = None
    ) -> None:
        """Record a checkpoint of this run as an event (kind ``checkpoint``): ``code`` in
        lowercase snake_case (``payload_validated``), an optional display ``message`` and JSON
        ``metadata``. Written at once, one round trip; the event carries the task, attempt,
        worker and pod. Raises LeaseLost when the task was taken away from this run."""
        from kubetasks import audit  # noqa: PLC0415 - audit imports filters, which app imports

        detail = audit.checkpoint_detail(code, message, metadata)
        if self._taken_away:
            raise LeaseLost(f"task {self.id} attempt {self.attempt} is no longer held by this worker")
        if self._app is None:
            raise RuntimeError("audit() needs a task run by a kubetasks worker")
        if not await audit.record_checkpoint(self._app.store, self.id, self.attempt, self.worker_id, detail):
            self._taken_away = True
            raise LeaseLost(f"task {self.id} attempt {self.attempt} is no longer held by this worker")

    async def _flush_after(self, wait: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if wait > 0:
                self._sleeping = True
                await asyncio.sleep(wait)
            self._sleeping = False
            await self.flush_progress()
            # A report made while that write was in flight goes out one interval
            # after it, not only at the next call or at the task's end.
            if self._pending is None or self._closing or self._taken_away:
                return
            wait = self._last_write + PROGRESS_INTERVAL - loop.time()

    async def flush_progress(self) -> None:
        """Write the latest report now, if one is unwritten, once a write still in flight has
        landed: two writes at once could land newest first, and each, reading the row as it
        was before both, would record the same change as an event."""
        if self._writer is None or (self._pending is None and self._write_lock is None):
            return
        if self._write_lock is None:
            self._write_lock = asyncio.Lock()
        async with self._write_lock:
            pending, self._pending = self._pending, None
            if pending is None:
                return
            self._last_write = asyncio.get_running_loop().time()
            if await self._writer(self, pending) is False:
                self._taken_away = True

    async def close(self) -> None:
        """Write the last reported progress, if any is still unwritten."""
        self._closing = True
        flusher, self._flusher = self._flusher, None
        if flusher is not None and not flusher.done():
            if self._sleeping:
                flusher.cancel()  # still waiting out the interval: write now instead
            await asyncio.gather(flusher, return_exceptions=True)
        await self.flush_progress()

    # -- workflows -------------------------------------------------------

    async def spawn(
        self,
        handler: str,
        payload: Mapping[str, Any] | None = None,
        *,
        key: str | None = None,
        delay: float | None = None,
        run_at: datetime | None = None,
        priority: int | None = None,
        queue: str | None = None,
        timeout: float | None = None,
        max_attempts: int | None = None,
        tags: Sequence[str] | None = None,
        retry_delay: float | None = None,
        backoff: float | None = None,
        max_retry_delay: float | None = None,
    ) -> int:
        """Add a child task of this one and return its id; any handler, any queue.

        Idempotent across runs of this handler: the n-th spawn without a ``key``
        is ``#n``, and a key this task spawned before returns that child again.
        Options resolve as for ``App.enqueue``; nothing is inherited.
        """
        req = EnqueueRequest(
            handler, payload, delay, run_at, priority, queue, timeout, max_attempts, tags,
            retry_delay=retry_delay, backoff=backoff, max_retry_delay=max_retry_delay,
        )  # fmt: skip
        ids = await self.spawn_many([req], keys=None if key is None else [key])
        return ids[0]

    async def spawn_many(
        self, requests: Iterable[EnqueueRequest], *, keys: Sequence[str] | None = None
    ) -> list[int]:
        """Add many children in one round trip; ids in the order given (see ``spawn``)."""
        reqs = list(requests)
        if keys is not None and len(keys) != len(reqs):
            raise ValidationError("keys", f"one key per request: {len(keys)} keys for {len(reqs)} requests")
        if self._app is None:
            raise RuntimeError("spawn() needs a task run by a kubetasks worker")
        if self._taken_away:
            raise LeaseLost(f"task {self.id} attempt {self.attempt} is no longer held by this worker")
        if not reqs:
            return []
        if keys is None:
            spawn_keys = [f"#{self._spawn_seq + i}" for i in range(len(reqs))]
            self._spawn_seq += len(reqs)
        else:
            spawn_keys = list(keys)
        ids = await enqueue.spawn_children(
            self._app, self._app.store, (self.id, self.attempt, self.worker_id), reqs, spawn_keys
        )
        if ids is None:
            self._taken_away = True
            raise LeaseLost(f"task {self.id} attempt {self.attempt} is no longer held by this worker")
        return ids

    async def wait(self, children: Sequence[int], *, policy: str = "fail_fast") -> list[Any]:
        """The results of these children of this task, in order, once all have ended.

        While any is unfinished the task is suspended (it holds no worker) and
        its handler runs again from the top when they have ended. ``fail_fast``:
        the first child that fails or is cancelled cancels the other unfinished
        ones and raises ``ChildFailed`` (the task fails, without retry, unless
        the handler catches it). ``collect``: a failed child's place in the list
        holds its ``ChildFailed`` instead of a result.
        """
        if policy not in POLICIES:
            raise ValidationError("policy", f"unknown policy {policy!r}; one of {', '.join(POLICIES)}")
        if self._app is None:
            raise RuntimeError("wait() needs a task run by a kubetasks worker")
        ids = [int(c) for c in children]
        if not ids:
            return []
        rows = {r["id"]: r for r in await tasks.children_state(self._app.store, task_ids=ids)}
        for i in ids:
            r = rows.get(i)
            if r is None or r["parent_id"] != self.id:
                raise Fail(f"wait(): task {i} is not a child of task {self.id}")
        failed = [rows[i] for i in ids if rows[i]["status"] in ("failed", "cancelled")]
        unfinished = list(dict.fromkeys(i for i in ids if rows[i]["status"] not in TERMINAL))
        if policy == "fail_fast" and failed:
            first = failed[0]
            for i in unfinished:
                await self._app.cancel(i, f"sibling task {first['id']} {first['status']} (fail_fast)")
            raise ChildFailed(first["id"], first["handler"], first["status"], first["error"])
        if unfinished:
            raise Suspend(ids, policy)
        return [
            rows[i]["result"]
            if rows[i]["status"] == "succeeded"
            else ChildFailed(i, rows[i]["handler"], rows[i]["status"], rows[i]["error"])
            for i in ids
        ]
