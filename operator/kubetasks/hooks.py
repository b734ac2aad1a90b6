"""Hooks: code of yours around every task a worker runs (issue 17 item 9).

``@app.before_task`` runs before the handler, ``@app.after_task`` after it
succeeded (with its result), ``@app.on_task_failure`` after an attempt that
did not succeed (with the exception -- ``TimeoutError`` for a timeout -- and
what becomes of the task: ``retried``, another attempt follows, or
``failed``). Enough to build logging, tracing or metrics outside the package:
the ``TaskContext`` carries the task's id, handler, queue, attempt, tags,
worker and pod.

* **Ordered.** Hooks of one kind run one after another in the order they were
  registered (a Blueprint's after the App's own when it is added later).
* **Sync or async.** An ``async def`` hook is awaited, at most ``timeout``
  seconds (5 by default); a plain ``def`` hook is called on the worker's event
  loop, so it must be quick (hand slow work to a thread or a queue).
* **Isolated.** A hook that raises or runs out of time is logged and counted
  (``kubetasks_hook_errors_total{hook}``) and the next hook runs; the task's
  outcome is the handler's, whatever its hooks do. A hook cannot change a
  result, retry or fail a task. Hooks run for both ``async def`` and plain
  ``def`` handlers, in the worker process (not in a sync handler's child).
* Not called for a run that was taken away (cancelled, fenced, released at
  shutdown): its outcome is not this worker's to report. A workflow task that
  suspends to wait for its children calls ``before`` on each run, and
  ``after`` or ``on_task_failure`` only for the run that ends it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubetasks import metrics
from kubetasks.errors import ValidationError

log = logging.getLogger("kubetasks.hooks")

KINDS = ("before", "after", "failure")
DEFAULT_TIMEOUT_S = 5.0


@dataclass
class Hook:
    kind: str
    func: Callable[..., Any]
    timeout: float
    name: str


@dataclass
class Hooks:
    """The hooks of one app, by kind, in registration order."""

    by_kind: dict[str, list[Hook]] = field(default_factory=lambda: {k: [] for k in KINDS})

    def add(self, kind: str, func: Callable[..., Any], timeout: float = DEFAULT_TIMEOUT_S) -> None:
        if kind not in KINDS:
            raise ValidationError("kind", f"unknown hook kind {kind!r}; one of {', '.join(KINDS)}")
        if not callable(func):
            raise ValidationError("hook", f"must be callable, got {type(func).__name__}")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 3600:
            raise ValidationError("timeout", f"must be between 0 and 3600 seconds, got {timeout!r}")
        name = getattr(func, "__qualname__", None) or repr(func)
        self.by_kind[kind].append(Hook(kind, func, float(timeout), name))

    def extend(self, other: Hooks) -> None:
        for kind in KINDS:
            self.by_kind[kind].extend(other.by_kind[kind])

    def __bool__(self) -> bool:
        return any(self.by_kind.values())

    async def call(self, kind: str, *args: Any) -> None:
        """Run every hook of ``kind`` in order; nothing a hook does escapes."""
        for hook in self.by_kind[kind]:
            try:
                res = hook.func(*args)
                if inspect.isawaitable(res):
                    async with asyncio.timeout(hook.timeout):
                        await res
            except TimeoutError:
                metrics.HOOK_ERRORS.labels(kind).inc()
                log.error("%s hook %s ran out of its %gs", kind, hook.name, hook.timeout)
            except asyncio.CancelledError:
                # The run itself is being torn down (taken away, shutdown): not the hook's error.
                raise
            except BaseException:
                metrics.HOOK_ERRORS.labels(kind).inc()
                log.exception("%s hook %s failed; the task's outcome is unchanged", kind, hook.name)
