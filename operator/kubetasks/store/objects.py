"""Typed calls of the queries on rows that mirror Kubernetes objects (Task objects' rows and
statuses, CronJobLock schedules, pods' workers): the one place that knows their parameter
order (``sql/queries.sql`` documents it)."""

from __future__ import annotations

from collections.abc import Sequence

from kubetasks.store.pg import Store
from kubetasks.store.tasks import Conn, Row


async def ingest_refused(
    store: Store, *, handler: str, queue: str, error: str, cr_uid: str, cr_namespace: str, cr_name: str
) -> int | None:
    """A Task object we cannot run, recorded failed with the reason; None: its row exists."""
    value = await store.run("ingest_refused", handler, queue, error, cr_uid, cr_namespace, cr_name)
    return None if value is None else int(value)


async def cr_task_by_uid(store: Store, *, cr_uid: str) -> Row | None:
    row: Row | None = await store.run("cr_task_by_uid", cr_uid)
    return row


async def cr_tasks_by_uids(store: Store, *, cr_uids: Sequence[str]) -> list[Row]:
    rows: list[Row] = await store.run("cr_tasks_by_uids", list(cr_uids))
    return rows


async def cr_unfinished(store: Store, *, namespaces: list[str] | None) -> list[Row]:
    rows: list[Row] = await store.run("cr_unfinished", namespaces)
    return rows


async def cr_status_owed(store: Store, *, namespaces: list[str] | None, limit: int) -> list[Row]:
    rows: list[Row] = await store.run("cr_status_owed", namespaces, limit)
    return rows


async def cr_tasks_by_ids(
    store: Store, *, task_ids: Sequence[int], namespaces: list[str] | None
) -> list[Row]:
    rows: list[Row] = await store.run("cr_tasks_by_ids", list(task_ids), namespaces)
    return rows


async def cr_status_written(store: Store, *, task_id: int, version: int) -> None:
    await store.run("cr_status_written", task_id, version)


async def cr_status_drop(store: Store, *, task_ids: Sequence[int]) -> None:
    await store.run("cr_status_drop", list(task_ids))


async def crd_schedules(store: Store, *, namespaces: list[str] | None) -> list[Row]:
    rows: list[Row] = await store.run("crd_schedules", namespaces)
    return rows


async def crd_schedule_delete(store: Store, *, name: str, cr_uid: str) -> bool:
    return bool(await store.run("crd_schedule_delete", name, cr_uid))


async def workers_of_pod_dead(
    store: Store, *, pod: str, namespace: str, selector: str, reason: str, conn: Conn = None
) -> list[Row]:
    """Declare a pod's live workers of this release dead (release their tasks next, same transaction)."""
    rows: list[Row] = await store.run("workers_of_pod_dead", pod, namespace, selector, reason, conn=conn)
    return rows


async def live_workers_of_release(store: Store, *, namespace: str, selector: str) -> list[Row]:
    rows: list[Row] = await store.run("live_workers_of_release", namespace, selector)
    return rows
