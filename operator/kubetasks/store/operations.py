"""Typed calls of the queries that operate many tasks (``sql/operations.sql``): filtered
listings, counts and bulk batches, the id sets of a parent or a tree, events and attempts
pages. ``TaskFilterParams`` is the filter block's eleven parameters; ``_filter`` is the one
place that orders them ($1..$11)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import TypedDict

from kubetasks.store.pg import Store
from kubetasks.store.tasks import Row


class TaskFilterParams(TypedDict):
    """A task filter as the SQL takes it; None matches everything."""

    statuses: list[str] | None
    queues: list[str] | None
    handlers: list[str] | None
    tags: list[str] | None  # all of them
    created_after: datetime | None
    created_before: datetime | None
    ids: list[int] | None  # among these (a parent's children, a workflow's tree)
    worker: uuid.UUID | None
    pod: str | None
    run_after: datetime | None  # due (run_at) at or after
    run_before: datetime | None  # due before


def _filter(f: TaskFilterParams) -> tuple[object, ...]:
    return (
        f["statuses"], f["queues"], f["handlers"], f["tags"], f["created_after"],
        f["created_before"], f["ids"], f["worker"], f["pod"], f["run_after"], f["run_before"],
    )  # fmt: skip


async def tasks_max_id(store: Store) -> int:
    """The newest task id (0: none)."""
    return int(await store.run("tasks_max_id"))


async def tasks_page(store: Store, flt: TaskFilterParams, *, below: int, floor: int, limit: int) -> list[Row]:
    """Matching tasks with ids in [floor, below), newest first, ``limit`` at most."""
    rows: list[Row] = await store.run("tasks_page", *_filter(flt), below, floor, limit)
    return rows


async def tasks_count(store: Store, flt: TaskFilterParams, *, up_to_id: int | None) -> Row:
    """How many tasks match (n) and the newest of them (up_to_id)."""
    row: Row = await store.run("tasks_count", *_filter(flt), up_to_id)
    return row


async def bulk_batch(
    store: Store,
    action: str,
    flt: TaskFilterParams,
    *,
    after_id: int,
    up_to_id: int,
    batch_size: int,
    reason: str | None = None,
) -> Row:
    """One batch of bulk ``action`` (retry | cancel | delete); ``reason``: cancel's."""
    if action not in ("retry", "cancel", "delete"):
        raise ValueError(f"unknown bulk action {action!r}")
    extra: tuple[object, ...] = (reason,) if action == "cancel" else ()
    row: Row = await store.run(f"bulk_{action}_batch", *_filter(flt), after_id, up_to_id, batch_size, *extra)
    return row


async def task_children_ids(store: Store, *, parent_id: int, limit: int) -> list[Row]:
    rows: list[Row] = await store.run("task_children_ids", parent_id, limit)
    return rows


async def task_tree_ids(store: Store, *, root_id: int, limit: int) -> list[Row]:
    rows: list[Row] = await store.run("task_tree_ids", root_id, limit)
    return rows


async def events_max_id(store: Store) -> int:
    """The newest event id (0: none)."""
    return int(await store.run("events_max_id"))


async def events_page(
    store: Store,
    *,
    kinds: list[str] | None,
    worker: uuid.UUID | None,
    pod: str | None,
    since: datetime | None,
    until: datetime | None,
    below: int,
    floor: int,
    limit: int,
) -> list[Row]:
    rows: list[Row] = await store.run("events_page", kinds, worker, pod, since, until, below, floor, limit)
    return rows


async def events_of_tasks(
    store: Store,
    *,
    task_ids: Sequence[int],
    kinds: list[str] | None,
    worker: uuid.UUID | None,
    pod: str | None,
    since: datetime | None,
    until: datetime | None,
    below: int,
    limit: int,
) -> list[Row]:
    rows: list[Row] = await store.run(
        "events_of_tasks", list(task_ids), kinds, worker, pod, since, until, below, limit
    )
    return rows


async def attempts_page(
    store: Store,
    *,
    outcomes: list[str] | None,
    worker: uuid.UUID | None,
    pod: str | None,
    since: datetime | None,
    until: datetime | None,
    below_task: int,
    below_attempt: int,
    floor: int,
    limit: int,
) -> list[Row]:
    rows: list[Row] = await store.run(
        "attempts_page", outcomes, worker, pod, since, until, below_task, below_attempt, floor, limit
    )
    return rows


async def attempts_of_tasks(
    store: Store,
    *,
    task_ids: Sequence[int],
    outcomes: list[str] | None,
    worker: uuid.UUID | None,
    pod: str | None,
    since: datetime | None,
    until: datetime | None,
    below_task: int,
    below_attempt: int,
    limit: int,
) -> list[Row]:
    rows: list[Row] = await store.run(
        "attempts_of_tasks", list(task_ids), outcomes, worker, pod, since, until, below_task,
        below_attempt, limit,
    )  # fmt: skip
    return rows


async def tasks_count_by(store: Store, flt: TaskFilterParams, *, by: str) -> list[Row]:
    """Matching tasks counted per group (``by``: handler | queue | tag | status) and status."""
    rows: list[Row] = await store.run("tasks_count_by", *_filter(flt), by)
    return rows


async def retention_claim(store: Store, *, min_gap: float) -> bool:
    """True: this caller runs the retention pass now (none ran anywhere in ``min_gap`` seconds)."""
    return bool(await store.run("retention_claim", min_gap))


async def retention_batch(
    store: Store,
    *,
    succeeded: float | None,
    failed: float | None,
    cancelled: float | None,
    batch: int,
    after_at: datetime | None,
    after_id: int | None,
) -> Row:
    """One batch of a retention pass (``retention_batch`` in schema.sql): the seconds each
    finished status is kept (None: for ever), roots per batch, the keyset to continue after."""
    row: Row = await store.run("retention_batch", succeeded, failed, cancelled, batch, after_at, after_id)
    return row
