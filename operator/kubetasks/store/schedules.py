"""Typed calls of the queries on ``schedules`` and ``cron_ticks``: the one place that knows
their parameter order (``sql/queries.sql`` documents it)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from kubetasks.store.pg import Store
from kubetasks.store.tasks import Conn, Row


async def schedule_upsert(
    store: Store,
    *,
    name: str,
    cron: str,
    timezone: str,
    handler: str,
    queue: str,
    payload: str,
    concurrency_policy: str,
    lock_ttl: int,
    starting_deadline: int | None,
    suspend: bool,
    source: str,
    cr_uid: str | None,
    since: datetime | None,
) -> Row | None:
    """Create or update a schedule; None when one of the other source holds the name."""
    row: Row | None = await store.run(
        "schedule_upsert", name, cron, timezone, handler, queue, payload, concurrency_policy,
        lock_ttl, starting_deadline, suspend, source, cr_uid, since,
    )  # fmt: skip
    return row


async def schedule_delete(store: Store, *, name: str, source: str | None) -> bool:
    return bool(await store.run("schedule_delete", name, source))


async def schedules_status(store: Store, *, names: list[str] | None) -> list[Row]:
    rows: list[Row] = await store.run("schedules_status", names)
    return rows


async def schedules_history(store: Store, *, names: list[str] | None, per_schedule: int) -> list[Row]:
    rows: list[Row] = await store.run("schedules_history", names, per_schedule)
    return rows


async def schedules_all(store: Store) -> list[Row]:
    rows: list[Row] = await store.run("schedules_all")
    return rows


async def schedule_pause(store: Store, *, name: str, by: str) -> Row | None:
    row: Row | None = await store.run("schedule_pause", name, by)
    return row


async def schedule_resume(store: Store, *, name: str, since: datetime | None) -> Row | None:
    row: Row | None = await store.run("schedule_resume", name, since)
    return row


# -- one tick's transaction (kubetasks.cron.fire): every call takes its connection -----------


async def schedule_for_tick(store: Store, *, name: str, conn: Conn) -> Row | None:
    row: Row | None = await store.run("schedule_for_tick", name, conn=conn)
    return row


async def ticks_missed(
    store: Store, *, schedule: str, ticks: Sequence[datetime], more: int, conn: Conn
) -> int:
    return int(await store.run("cron_ticks_missed", schedule, list(ticks), more, conn=conn))


async def schedule_advance(store: Store, *, name: str, newest: datetime | None, conn: Conn) -> None:
    await store.run("schedule_advance", name, newest, conn=conn)


async def notify_ticked(store: Store, *, schedule: str, conn: Conn) -> None:
    await store.run("cron_notify_ticked", schedule, conn=conn)


async def tick_claim(store: Store, *, schedule: str, tick_at: datetime, manual: bool, conn: Conn) -> bool:
    return bool(await store.run("cron_tick_claim", schedule, tick_at, manual, conn=conn))


async def tick_enqueued(store: Store, *, schedule: str, tick_at: datetime, task_id: int, conn: Conn) -> None:
    await store.run("cron_tick_enqueued", schedule, tick_at, task_id, conn=conn)


async def tick_skipped(
    store: Store, *, schedule: str, tick_at: datetime, holder: str | None, reason: str | None, conn: Conn
) -> None:
    await store.run("cron_tick_skipped", schedule, tick_at, holder, reason, conn=conn)


async def ticks_prune(store: Store, *, schedule: str, keep: int, conn: Conn) -> None:
    await store.run("cron_ticks_prune", schedule, keep, conn=conn)


async def schedule_source(store: Store, *, name: str) -> str | None:
    """The schedule's source (code | crd | api); None: no such schedule."""
    source: str | None = await store.run("schedule_source", name)
    return source


async def schedules_orphaned(store: Store, *, keep: Sequence[str]) -> list[str]:
    """The ``code`` schedules no active worker's code declares, apart from ``keep``."""
    return [r["name"] for r in await store.run("schedules_orphaned", list(keep))]


async def schedules_prune(store: Store, *, keep: Sequence[str]) -> list[str]:
    """Delete the schedules ``schedules_orphaned`` names; the names deleted."""
    return [r["name"] for r in await store.run("schedules_prune", list(keep))]
