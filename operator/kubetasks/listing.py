"""Filtered task listings that cost the same at a thousand rows and at a million.

``find_tasks`` pages through tasks newest first with a ``TaskFilter`` and an
opaque cursor. Each call walks at most ``scan`` task ids (a window of the
primary key below the cursor) and returns the matches it found there, up to
``limit``: a selective filter over a large table therefore answers in bounded
time with a short (or empty) page and a ``next_cursor`` that continues below
the window, instead of one slow statement that reads the table. There is no
total: counting a million rows is what a bulk action's dry run is for
(``bulk``). ``parent`` and ``root`` criteria walk their own id set instead.

Items are summaries (no payload, result or traceback; the error's first 300
characters); ``App.get_task`` reads a whole task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kubetasks import validation
from kubetasks.filters import TaskFilter, decode_cursor, encode_cursor
from kubetasks.store import Store, operations

#: Task ids one call walks at most, by default.
DEFAULT_SCAN = 20_000
MAX_SCAN = 200_000
MAX_LIMIT = 500
CURSOR_KIND = "tasks"


@dataclass(frozen=True)
class TaskSummary:
    """One task as a listing shows it."""

    id: int
    handler: str
    queue: str
    priority: int
    status: str
    attempt: int
    attempts_spent: int
    max_attempts: int
    run_at: datetime
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    worker_id: str | None
    pod_id: str | None
    progress: int | None
    progress_message: str | None
    tags: list[str]
    parent_id: int | None
    dedupe_key: str | None
    error: str | None
    #: Pending, but no active worker serves its handler in its queue: it waits out of the claim's way.
    parked: bool = False
    #: The latest progress report's stage (its metadata: ``App.get_task``).
    progress_stage: str | None = None

    @classmethod
    def from_row(cls, r: Any) -> TaskSummary:
        return cls(
            id=int(r["id"]), handler=r["handler"], queue=r["queue"], priority=r["priority"],
            status=r["status"],
            attempt=r["attempt"], attempts_spent=r["attempt"] - (r["uncharged"] or 0),
            max_attempts=r["max_attempts"], run_at=r["run_at"], created_at=r["created_at"],
            started_at=r["started_at"], finished_at=r["finished_at"],
            worker_id=None if r["worker_id"] is None else str(r["worker_id"]), pod_id=r["pod_id"],
            progress=r["progress"], progress_message=r["progress_message"], tags=list(r["tags"]),
            parent_id=r["parent_id"], dedupe_key=r["dedupe_key"], error=r["error"], parked=r["parked"],
            progress_stage=r["progress_stage"],
        )  # fmt: skip


@dataclass(frozen=True)
class TaskListPage:
    """Up to ``limit`` matches, newest first. ``next_cursor`` is None when no older task is left
    to look at; ``scanned_below``/``scanned_from``: the ids this call walked ([from, below))."""

    items: list[TaskSummary]
    next_cursor: str | None
    scanned_below: int
    scanned_from: int
    filter: TaskFilter = field(default_factory=TaskFilter)


async def find_tasks(
    store: Store,
    flt: TaskFilter | None = None,
    *,
    cursor: str | None = None,
    limit: int = 50,
    scan: int = DEFAULT_SCAN,
) -> TaskListPage:
    """One page of the tasks ``flt`` matches, newest first, continuing at ``cursor``."""
    flt = flt or TaskFilter()
    validation.integer("limit", limit, 1, MAX_LIMIT)
    validation.integer("scan", scan, 1, MAX_SCAN)
    below = decode_cursor(CURSOR_KIND, cursor, 1)[0] if cursor is not None else None
    ids = await flt.task_ids(store)
    if below is None:
        below = (ids[-1] + 1 if ids else 1) if ids is not None else await operations.tasks_max_id(store) + 1
    if ids is not None:
        # A parent's children or a workflow's tree: walk the set itself, `scan` ids at a time.
        window = [i for i in ids if i < below][-scan:]
        if not window:
            return TaskListPage([], None, below, below, flt)
        floor = window[0]
        rows = await operations.tasks_page(store, flt.sql_args(window), below=below, floor=floor, limit=limit)
        more = ids[0] < floor
    else:
        floor = max(below - scan, 1)
        rows = await operations.tasks_page(store, flt.sql_args(None), below=below, floor=floor, limit=limit)
        more = floor > 1
    items = [TaskSummary.from_row(r) for r in rows]
    if len(items) == limit:
        nxt: str | None = encode_cursor(CURSOR_KIND, items[-1].id)
    else:
        nxt = encode_cursor(CURSOR_KIND, floor) if more else None
    return TaskListPage(items, nxt, below, floor, flt)
