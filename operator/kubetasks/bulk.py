"""Retry, cancel and delete every task a ``TaskFilter`` matches, a batch per statement.

The node-resque ``del``/``delQueue`` and fib-flow ``deleteTasks(filters)``
verbs (issue 17 item 3), for a table of any size:

* **Count first.** ``dry_run=True`` changes nothing and returns how many tasks
  match now and ``up_to_id``, the newest of them. Passing that ``up_to_id``
  back to the real run bounds it: a task added after the count is never
  touched, so what was confirmed is at most what happens. A run without one
  takes the newest id when it starts, for the same reason.
* **One statement per batch.** A run walks the matching tasks in id order,
  ``batch_size`` at a time; each batch is one statement (``bulk_*_batch`` in
  ``store/sql/operations.sql``) in its own transaction, so no lock is held
  longer than one batch and a million rows are a thousand short statements,
  never one long one. A batch re-checks each row's status under its row lock:
  a task that moved on since the count is skipped, not overwritten.
* **What each action takes.** ``retry``: failed tasks (``status`` may also
  name cancelled), started over with fresh attempts, their queues woken.
  ``cancel``: unfinished tasks (pending, running, paused, suspended) and every
  unfinished descendant of theirs; a running one's worker is told at once.
  ``delete``: finished tasks, their events and attempts with them; a child
  whose parent is unfinished stays. A ``status`` outside the action's set,
  and a filter with no criterion at all, are refused naming the field.
* **Bounded calls.** ``deadline`` (a ``loop.time()``) stops a run between
  batches; the result then says ``done=False`` and ``resume_after``, the id to
  pass back as ``after_id`` (the HTTP API uses this to keep every request
  short). A run interrupted any other way can be started again with the same
  ``up_to_id``: the work already done no longer matches.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import asyncpg

from kubetasks import validation
from kubetasks.errors import ValidationError
from kubetasks.filters import TaskFilter
from kubetasks.statuses import FINISHED, UNFINISHED
from kubetasks.store import Store, operations

ACTIONS = ("retry", "cancel", "delete")
#: The statuses each action may take, and those it takes when the filter names none.
ALLOWED = {"retry": ("failed", "cancelled"), "cancel": UNFINISHED, "delete": FINISHED}
DEFAULT = {"retry": ("failed",), "cancel": UNFINISHED, "delete": FINISHED}
DEFAULT_BATCH = 1000
MAX_BATCH = 10_000
DEADLOCK_RETRIES = 5


@dataclass(frozen=True)
class BulkResult:
    """What a bulk action did (or, with ``dry_run``, would do).

    ``count``: tasks that match (dry run) or that were retried, cancelled or
    deleted; ``descendants``: unfinished descendants cancelled with them;
    ``up_to_id``: the newest id the action covers (None: no task matched);
    ``done``: False when ``deadline`` stopped it, then ``resume_after`` is the
    ``after_id`` to continue from.
    """

    action: str
    dry_run: bool
    count: int
    up_to_id: int | None
    descendants: int = 0
    batches: int = 0
    done: bool = True
    resume_after: int | None = None


def effective_filter(action: str, flt: TaskFilter) -> TaskFilter:
    """``flt`` with the statuses ``action`` applies to; refuses what it cannot take."""
    if action not in ACTIONS:
        raise ValidationError("action", f"unknown bulk action {action!r}; one of {', '.join(ACTIONS)}")
    if flt.is_empty():
        raise ValidationError(
            "filter",
            f"names no criterion: a bulk {action} needs at least one of "
            f"{', '.join(TaskFilter.names())} (status={DEFAULT[action][0]} alone is enough)",
        )
    if flt.status is None:
        return flt.with_status(DEFAULT[action])
    bad = [s for s in flt.status if s not in ALLOWED[action]]
    if bad:
        raise ValidationError(
            "status",
            f"a bulk {action} applies to {' or '.join(ALLOWED[action])} tasks, not {', '.join(bad)}",
        )
    return flt


async def run(
    store: Store,
    action: str,
    flt: TaskFilter,
    *,
    dry_run: bool = False,
    up_to_id: int | None = None,
    after_id: int = 0,
    batch_size: int = DEFAULT_BATCH,
    reason: str = "cancelled by a bulk action",
    deadline: float | None = None,
) -> BulkResult:
    """Run ``action`` on the tasks ``flt`` matches (see the module docstring)."""
    flt = effective_filter(action, flt)
    validation.integer("batch_size", batch_size, 1, MAX_BATCH)
    validation.integer("after_id", after_id, 0, 2**63 - 1)
    if up_to_id is not None:
        validation.integer("up_to_id", up_to_id, 0, 2**63 - 1)
    if not isinstance(reason, str) or not 1 <= len(reason) <= 1000:
        raise ValidationError("reason", "must be 1 to 1000 characters")
    ids = await flt.task_ids(store)
    args = flt.sql_args(ids)
    if dry_run:
        row = await operations.tasks_count(store, args, up_to_id=up_to_id)
        return BulkResult(action, True, int(row["n"]), row["up_to_id"])
    if up_to_id is None:
        up_to_id = await operations.tasks_max_id(store)
    count = descendants = batches = 0
    cursor = after_id
    loop = asyncio.get_running_loop()
    while True:
        for attempt in range(DEADLOCK_RETRIES):
            try:
                row = await operations.bulk_batch(
                    store, action, args, after_id=cursor, up_to_id=up_to_id, batch_size=batch_size,
                    reason=reason,
                )  # fmt: skip
                break
            except asyncpg.DeadlockDetectedError:
                # A child ending now locks its parent after itself; a cascade locks
                # parents first. PostgreSQL picked this batch: run it again.
                if attempt == DEADLOCK_RETRIES - 1:
                    raise
        batches += 1
        count += int(row["done"] or 0)
        descendants += int(row.get("descendants") or 0) if action == "cancel" else 0
        if int(row["picked"]) < batch_size or row["last_id"] is None:
            return BulkResult(action, False, count, up_to_id, descendants, batches)
        cursor = int(row["last_id"])
        if deadline is not None and loop.time() >= deadline:
            return BulkResult(
                action, False, count, up_to_id, descendants, batches, done=False, resume_after=cursor
            )
