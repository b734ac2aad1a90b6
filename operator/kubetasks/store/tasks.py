"""Typed calls of the queries on ``tasks`` (with their ``events`` and ``attempts``): the one
place that knows each query's parameter order (``sql/queries.sql`` documents it).

Callers pass keyword arguments; a task's inserted values travel as one ``TaskColumns``
(``kubetasks.model.Prepared.columns()``), spread into columns only here.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, TypedDict

from kubetasks.store.pg import Store

#: A result row (an asyncpg Record: read by column name).
Row = Mapping[str, Any]
#: A connection of a transaction the call must run in (None: the pool).
Conn = Any


class TaskColumns(TypedDict):
    """The values one enqueue writes (see ``enqueue`` in queries.sql)."""

    handler: str
    queue: str
    priority: int
    payload: str  # JSON text
    max_attempts: int
    run_at: datetime | None  # None: now + delay
    delay: float | None
    timeout: float
    retry_delay: float
    backoff: float
    max_retry_delay: float
    tags: list[str]
    dedupe_key: str | None


def _joined_tags(tags: list[str]) -> str | None:
    # Arrays of arrays cannot be ragged: the batch inserts pass each task's tags joined by \x1f.
    return "\x1f".join(tags) if tags else None


def _arrays(tasks: Sequence[TaskColumns]) -> list[list[Any]]:
    """The per-column arrays of enqueue_many and spawn_children, $handler .. $tags in order."""
    return [
        [t["handler"] for t in tasks],
        [t["queue"] for t in tasks],
        [t["priority"] for t in tasks],
        [t["payload"] for t in tasks],
        [t["max_attempts"] for t in tasks],
        [t["run_at"] for t in tasks],
        [t["delay"] for t in tasks],
        [t["timeout"] for t in tasks],
        [t["retry_delay"] for t in tasks],
        [t["backoff"] for t in tasks],
        [t["max_retry_delay"] for t in tasks],
        [_joined_tags(t["tags"]) for t in tasks],
    ]


# -- inserts ---------------------------------------------------------------------------------


async def enqueue(
    store: Store,
    task: TaskColumns,
    *,
    cr_uid: str | None = None,
    cr_namespace: str | None = None,
    cr_name: str | None = None,
    paused: bool = False,
) -> int | None:
    """Insert one task; None when its dedupe key or Task object names a live task."""
    t = task
    value = await store.run(
        "enqueue", t["handler"], t["queue"], t["priority"], t["payload"], t["max_attempts"],
        t["run_at"], t["delay"], t["timeout"], t["retry_delay"], t["backoff"], t["max_retry_delay"],
        t["tags"], t["dedupe_key"], cr_uid, cr_namespace, cr_name, paused,
    )  # fmt: skip
    return None if value is None else int(value)


async def enqueue_many(store: Store, tasks: Sequence[TaskColumns]) -> list[Row]:
    """Insert many tasks; (id, dedupe_key) of each inserted one, in order (a live dedupe key: none)."""
    rows: list[Row] = await store.run("enqueue_many", *_arrays(tasks), [t["dedupe_key"] for t in tasks])
    return rows


async def spawn_children(
    store: Store,
    *,
    parent_id: int,
    attempt: int,
    worker_id: str,
    keys: Sequence[str],
    tasks: Sequence[TaskColumns],
) -> list[Row]:
    """Children of a running attempt, one per spawn key (see the query); none when the attempt
    is no longer this worker's."""
    rows: list[Row] = await store.run(
        "spawn_children", parent_id, attempt, uuid.UUID(worker_id), list(keys), *_arrays(tasks)
    )
    return rows


async def cron_enqueue(store: Store, task: TaskColumns, *, conn: Conn = None) -> int:
    """The run of a schedule's tick, due now (no delay, no dedupe key), in the tick's transaction."""
    t = task
    value = await store.run(
        "cron_enqueue", t["handler"], t["queue"], t["priority"], t["payload"], t["max_attempts"],
        t["timeout"], t["retry_delay"], t["backoff"], t["max_retry_delay"], t["tags"], conn=conn,
    )  # fmt: skip
    return int(value)


async def find_by_cr_uid(store: Store, *, cr_uid: str) -> int | None:
    value = await store.run("find_by_cr_uid", cr_uid)
    return None if value is None else int(value)


async def find_live_by_dedupe_key(store: Store, *, keys: Sequence[str]) -> list[Row]:
    rows: list[Row] = await store.run("find_live_by_dedupe_key", list(keys))
    return rows


# -- reads -----------------------------------------------------------------------------------


async def get_task(store: Store, *, task_id: int) -> Row | None:
    row: Row | None = await store.run("get_task", task_id)
    return row


async def list_tasks(
    store: Store,
    *,
    statuses: list[str] | None,
    handlers: list[str] | None,
    queues: list[str] | None,
    tags: list[str] | None,
    created_after: datetime | None,
    created_before: datetime | None,
    limit: int,
    offset: int,
    run_after: datetime | None = None,
    run_before: datetime | None = None,
) -> list[Row]:
    """A page of tasks, newest first, each row with the total count (None filters match all);
    ``run_after``/``run_before``: due (run_at) at or after / before."""
    rows: list[Row] = await store.run(
        "list_tasks", statuses, handlers, queues, tags, created_after, created_before, limit, offset,
        run_after, run_before,
    )  # fmt: skip
    return rows


async def get_attempts(store: Store, *, task_id: int) -> list[Row]:
    rows: list[Row] = await store.run("get_attempts", task_id)
    return rows


async def get_events(store: Store, *, task_id: int) -> list[Row]:
    rows: list[Row] = await store.run("get_events", task_id)
    return rows


async def workflow_tasks(store: Store, *, root_id: int) -> list[Row]:
    rows: list[Row] = await store.run("workflow_tasks", root_id)
    return rows


async def children_counts(store: Store, *, parent_ids: Sequence[int]) -> list[Row]:
    rows: list[Row] = await store.run("children_counts", list(parent_ids))
    return rows


async def children_state(store: Store, *, task_ids: Sequence[int]) -> list[Row]:
    rows: list[Row] = await store.run("children_state", list(task_ids))
    return rows


# -- admin verbs -----------------------------------------------------------------------------


async def cancel_task(store: Store, *, task_id: int, reason: str) -> Row | None:
    """Cancel the task and its unfinished descendants; None: no such task."""
    row: Row | None = await store.run("cancel_task", task_id, reason)
    return row


async def retry_task(store: Store, *, task_id: int) -> Row | None:
    row: Row | None = await store.run("retry_task", task_id)
    return row


async def retry_failed_of_handler(store: Store, *, handler: str) -> int:
    return int(await store.run("retry_failed_of_handler", handler))


async def pause_task(store: Store, *, task_id: int) -> Row | None:
    """Pause a pending task, or ask a running one to pause: ``how`` is paused | requested | None
    (nothing to pause, ``status`` says why); None: no such task."""
    row: Row | None = await store.run("pause_task", task_id)
    return row


async def resume_task(store: Store, *, task_id: int) -> Row | None:
    """Resume a paused task, or withdraw the pause asked of a running one: ``how`` is resumed |
    withdrawn | None (nothing to resume); ``queue`` to wake. None: no such task."""
    row: Row | None = await store.run("resume_task", task_id)
    return row


async def delete_finished_tasks(store: Store, *, statuses: Sequence[str], older_than: float) -> int:
    return int(await store.run("delete_finished_tasks", list(statuses), older_than))


async def record_checkpoint(
    store: Store, *, task_id: int, attempt: int, worker_id: uuid.UUID, detail: str
) -> bool:
    """A handler's checkpoint event; False when the task is no longer this run's."""
    return bool(await store.run("record_checkpoint", task_id, attempt, worker_id, detail))
