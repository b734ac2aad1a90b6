"""Typed calls of the dashboard's queries (``sql/dashboard.sql``): the per-minute rollups it
keeps and the reads of its pages. The one place that knows their parameter order."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from kubetasks.store.pg import Store
from kubetasks.store.tasks import Conn, Row

# -- the rollup pass (kubetasks.dashboard.rollups): one transaction, every call takes it ----


async def rollup_try_lock(store: Store, *, conn: Conn) -> bool:
    return bool(await store.run("rollup_try_lock", conn=conn))


async def rollup_window(
    store: Store, *, backfill_s: float, grace_s: float, chunk_s: float, conn: Conn
) -> Row:
    row: Row = await store.run("rollup_window", backfill_s, grace_s, chunk_s, conn=conn)
    return row


async def rollup_finished(store: Store, *, from_at: datetime, to_at: datetime, conn: Conn) -> list[Row]:
    rows: list[Row] = await store.run("rollup_finished", from_at, to_at, conn=conn)
    return rows


async def rollup_store(
    store: Store,
    *,
    from_at: datetime,
    to_at: datetime,
    minutes: Sequence[datetime],
    queues: Sequence[str],
    handlers: Sequence[str],
    succeeded: Sequence[int],
    failed: Sequence[int],
    cancelled: Sequence[int],
    wait_hists: Sequence[str],
    run_hists: Sequence[str],
    conn: Conn,
) -> Row:
    """The minutes in [from_at, to_at) become exactly these rows (one array per column)."""
    row: Row = await store.run(
        "rollup_store", from_at, to_at, list(minutes), list(queues), list(handlers), list(succeeded),
        list(failed), list(cancelled), list(wait_hists), list(run_hists), conn=conn,
    )  # fmt: skip
    return row


async def rollup_done(store: Store, *, final_until: datetime, conn: Conn) -> None:
    await store.run("rollup_done", final_until, conn=conn)


async def queue_sample(store: Store, *, conn: Conn) -> list[Row]:
    rows: list[Row] = await store.run("queue_sample", conn=conn)
    return rows


async def rollup_prune(store: Store, *, keep_s: float, conn: Conn) -> None:
    await store.run("rollup_prune", keep_s, conn=conn)


async def dashboard_notify(store: Store, *, topics: Sequence[str], conn: Conn) -> None:
    await store.run("dashboard_notify", ",".join(topics), conn=conn)


# -- the pages' reads ----------------------------------------------------------------------


async def minutes(store: Store, *, queue: str, since: datetime) -> list[Row]:
    rows: list[Row] = await store.run("dash_minutes", queue, since)
    return rows


async def handlers(store: Store, *, since: datetime) -> list[Row]:
    rows: list[Row] = await store.run("dash_handlers", since)
    return rows


async def depth_series(store: Store, *, queue: str, since: datetime) -> list[Row]:
    rows: list[Row] = await store.run("dash_depth_series", queue, since)
    return rows


async def depth_latest(store: Store) -> list[Row]:
    rows: list[Row] = await store.run("dash_depth_latest")
    return rows


async def failures(store: Store, *, limit: int) -> list[Row]:
    rows: list[Row] = await store.run("dash_failures", limit)
    return rows


async def workers(store: Store) -> list[Row]:
    rows: list[Row] = await store.run("dash_workers")
    return rows


async def workers_stopped(store: Store, *, limit: int) -> list[Row]:
    rows: list[Row] = await store.run("dash_workers_stopped", limit)
    return rows


async def worker(store: Store, *, worker_id: uuid.UUID) -> Row | None:
    row: Row | None = await store.run("dash_worker", worker_id)
    return row


async def queues(store: Store) -> list[Row]:
    rows: list[Row] = await store.run("dash_queues")
    return rows


async def task_parked(store: Store, *, task_id: int) -> bool:
    """Whether the parking pass took the task out of the claim's way."""
    return bool(await store.run("dash_task_parked", task_id))
