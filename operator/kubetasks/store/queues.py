"""Typed calls of the queries on queues and the handlers workers serve (``queue_state``,
``handlers``, the queue figures of stats and /metrics): the one place that knows their
parameter order (``sql/queries.sql`` documents it)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from kubetasks.store.pg import Store
from kubetasks.store.tasks import Conn, Row


async def wake_queue(store: Store, *, queue: str) -> None:
    """NOTIFY the workers of ``queue`` that a task may be due."""
    await store.run("wake_queue", queue)


async def set_queue_paused(store: Store, *, queue: str, paused: bool) -> None:
    await store.run("set_queue_paused", queue, paused)


async def paused_queues(store: Store) -> list[Row]:
    rows: list[Row] = await store.run("paused_queues")
    return rows


async def stats_counts(store: Store) -> list[Row]:
    rows: list[Row] = await store.run("stats_counts")
    return rows


async def stats_oldest_pending(store: Store) -> list[Row]:
    rows: list[Row] = await store.run("stats_oldest_pending")
    return rows


async def stats_workers(store: Store) -> list[Row]:
    rows: list[Row] = await store.run("stats_workers")
    return rows


async def metrics_queue_depths(store: Store) -> list[Row]:
    rows: list[Row] = await store.run("metrics_queue_depths")
    return rows


async def handler_options(store: Store, *, handlers: Sequence[str], conn: Conn = None) -> list[Row]:
    """The options the latest registration of each handler stored."""
    rows: list[Row] = await store.run("handler_options", list(handlers), conn=conn)
    return rows


async def served_pairs(store: Store, *, conn: Conn = None) -> list[Row]:
    rows: list[Row] = await store.run("served_pairs", conn=conn)
    return rows


async def unserved_counts(store: Store) -> list[Row]:
    rows: list[Row] = await store.run("unserved_counts")
    return rows


async def park_unserved(
    store: Store, *, handlers: Sequence[str], gap: float, force: bool, budget: int
) -> Row:
    """One parking pass (see park_unserved in schema.sql); always one row."""
    row: Row = await store.run("park_unserved", list(handlers), gap, force, budget)
    return row


async def db_now(store: Store, *, conn: Conn = None) -> datetime:
    """The database's clock."""
    now: datetime = await store.run("db_now", conn=conn)
    return now


async def health_applied_migrations(store: Store) -> list[Row]:
    rows: list[Row] = await store.run("health_applied_migrations")
    return rows


async def queues_with_pending(store: Store, *, handlers: Sequence[str]) -> list[str]:
    """The queues holding pending tasks of these handlers (claimable or parked)."""
    return [r["queue"] for r in await store.run("queues_with_pending", list(handlers))]


async def oldest_transaction(store: Store) -> Row | None:
    """The other session with the oldest open transaction holding a snapshot; None: none."""
    row: Row | None = await store.run("oldest_transaction")
    return row
