"""TaskContext: what a handler sees of the task it runs.

Progress is coalesced: a handler may call ``progress()`` in a tight loop, and
at most one fenced write per ``PROGRESS_INTERVAL`` seconds reaches the
database, carrying the latest value. The final value is written before the
task's outcome, so nothing reported is lost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from kubetasks.errors import LeaseLost

PROGRESS_INTERVAL = 0.5

#: Writes progress; returns False when the write was fenced out (the task is no
#: longer this attempt's), None when the database could not be reached.
ProgressWriter = Callable[["TaskContext", int, str | None], Awaitable[bool | None]]


@dataclass
class TaskContext:
    """The running task: identity, input and a way to report progress."""

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
    _writer: ProgressWriter | None = field(default=None, repr=False)
    _pending: tuple[int, str | None] | None = field(default=None, repr=False)
    _flusher: asyncio.Task[None] | None = field(default=None, repr=False)
    _last_write: float = field(default=-1e9, repr=False)
    _sleeping: bool = field(default=False, repr=False)
    _taken_away: bool = field(default=False, repr=False)

    @property
    def is_last_attempt(self) -> bool:
        return self.attempt >= self.max_attempts

    async def progress(self, percent: int | float, message: str | None = None) -> None:
        """Report progress (0-100); cheap to call often, written at most every 0.5 s.

        Raises LeaseLost once a write has found the task taken away from this
        attempt (cancelled, or recovered after this worker lost its lease), so a
        long handler learns it should stop.
        """
        if self._taken_away:
            raise LeaseLost(f"task {self.id} attempt {self.attempt} is no longer held by this worker")
        p = max(0, min(100, int(percent)))
        self._pending = (p, message)
        if self._writer is None or (self._flusher is not None and not self._flusher.done()):
            return
        loop = asyncio.get_running_loop()
        wait = self._last_write + PROGRESS_INTERVAL - loop.time()
        self._sleeping = wait > 0
        self._flusher = loop.create_task(self._flush_after(max(0.0, wait)))
        if wait <= 0:
            await asyncio.sleep(0)  # let the first report go out promptly

    async def _flush_after(self, wait: float) -> None:
        if wait > 0:
            await asyncio.sleep(wait)
        self._sleeping = False
        await self.flush_progress()

    async def flush_progress(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None or self._writer is None:
            return
        self._last_write = asyncio.get_running_loop().time()
        if await self._writer(self, pending[0], pending[1]) is False:
            self._taken_away = True

    async def close(self) -> None:
        """Write the last reported progress, if any is still unwritten."""
        flusher, self._flusher = self._flusher, None
        if flusher is not None and not flusher.done():
            if self._sleeping:
                flusher.cancel()  # still waiting out the interval: write now instead
            await asyncio.gather(flusher, return_exceptions=True)
        await self.flush_progress()
